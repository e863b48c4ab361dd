"""The binary wire formats of ``headwise serve``, shared by the app and :class:`RemoteMemory` (numpy only).

Vectors and search answers travel in one of two binary forms besides JSON:

- ``application/x-npy``: a ``.npy`` file (never pickles);
- ``application/octet-stream`` with an ``X-Shape: n,d`` header: raw little-endian values, the
  cheapest to parse (no header to evaluate), what :class:`RemoteMemory` sends.

A search answers in the request's form: records (``score`` float32, ``id`` int64) of shape (n, k),
exactly the store's arrays.

Example:
    >>> import numpy as np
    >>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> body, shape = raw_bytes(x)
    >>> shape, bool(np.array_equal(from_raw(body, shape, np.float32), x))
    ('2,3', True)
    >>> hits = pack_hits(np.array([[0.5, -np.inf]], np.float32), np.array([[7, -1]]))
    >>> from_raw(hits.tobytes(), "1,2", HITS_DTYPE)["id"].tolist()
    [[7, -1]]
"""

from __future__ import annotations

import io

import numpy as np

from headwise.errors import bad_argument

NPY = "application/x-npy"
RAW = "application/octet-stream"
SHAPE_HEADER = "X-Shape"
#: A search answer: (score, id) records, 12 bytes each, little-endian.
HITS_DTYPE = np.dtype([("score", "<f4"), ("id", "<i8")])
_MAX_DIMS = 2


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def read_npy(body: bytes) -> np.ndarray:
    """A .npy body as an array; never unpickles (``allow_pickle=False``) and never reads an .npz."""
    try:
        return np.lib.format.read_array(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise bad_argument("request body", "a .npy array (numeric, no pickles)", str(exc)) from None


def raw_bytes(array: np.ndarray) -> tuple[bytes, str]:
    """(little-endian float32 bytes, X-Shape value) of a (d,) or (n, d) array."""
    a = np.ascontiguousarray(array, dtype="<f4")
    return a.tobytes(), ",".join(map(str, a.shape))


def from_raw(body: bytes, shape: str | None, dtype: np.dtype | type) -> np.ndarray:
    """Raw little-endian ``dtype`` values of ``shape`` ("n,d" or "d"); HeadwiseError on a mismatch."""
    if shape is None:
        raise bad_argument(SHAPE_HEADER, "a header 'n,d' (or 'd') with the raw body's shape", "none")
    try:
        dims = tuple(int(s) for s in shape.split(","))
    except ValueError:
        raise bad_argument(SHAPE_HEADER, "comma-separated integers, e.g. '16,384'", repr(shape[:40])) from None
    if not 1 <= len(dims) <= _MAX_DIMS or min(dims) < 0:
        raise bad_argument(SHAPE_HEADER, "one or two non-negative integers", repr(shape[:40]))
    dt = np.dtype(dtype)
    want = int(np.prod(dims)) * dt.itemsize
    if len(body) != want:
        raise bad_argument("request body", f"{want} bytes for shape {dims} of {dt}", f"{len(body)} bytes")
    return np.frombuffer(body, dtype=dt).reshape(dims)


def pack_hits(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(n, k) records of HITS_DTYPE from scores (n, k) and ids (n, k)."""
    hits = np.empty(scores.shape, dtype=HITS_DTYPE)
    hits["score"], hits["id"] = scores, ids
    return hits


def unpack_hits(hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores (n, k) float32 and ids (n, k) int64, contiguous, from HITS_DTYPE records."""
    return np.ascontiguousarray(hits["score"], dtype=np.float32), np.ascontiguousarray(hits["id"], dtype=np.int64)
