"""Argument checks of :class:`~headwise.memory.store.VectorMemory`: each raises a HeadwiseError
that names the argument, the expected and the actual value, before anything is written.

Example:
    >>> as_ids([3, 1], "ids").tolist()
    [3, 1]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from headwise.errors import bad_argument

#: Ids live in [0, MAX_ID): SQLite's signed 64-bit keys, one value kept free so next_id never overflows.
MAX_ID = 2**63 - 1
#: The largest k a search accepts: results are padded to k, so k bounds their memory (n x k x 12 bytes).
MAX_K = 16_384


def check_k(k: Any) -> int:
    """``k`` as an int in [1, MAX_K]; a HeadwiseError otherwise (bool, float, too large)."""
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise bad_argument("k", f"an int in [1, {MAX_K}] (enumerate a store with ids() and get())", repr(k))
    return int(k)


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise bad_argument(name, f"an int >= {minimum}", repr(value))


def normalise_rows(x: np.ndarray, name: str) -> np.ndarray:
    """Rows of ``x`` (n, d) scaled to unit L2 norm, float32; a HeadwiseError names all-zero rows.

    Overflow-safe: a row whose float32 norm overflows (components near 1e38) or underflows
    (components near 1e-30, whose squares flush to 0) is first divided by its largest magnitude.
    """
    with np.errstate(over="ignore", under="ignore"):  # those rows are handled below
        norms = np.linalg.norm(x, axis=1, keepdims=True)
    awkward = ~((norms > 1e-18) & (norms < 1e18))[:, 0]
    if awkward.any():
        rows = x[awkward].astype(np.float64)
        peak = np.abs(rows).max(axis=1, keepdims=True)
        zero = np.flatnonzero(awkward)[peak[:, 0] == 0]
        if len(zero):
            raise bad_argument(name, "non-zero vectors for metric 'cosine'", f"zero rows {zero[:10].tolist()}")
        rows /= peak
        x = x.astype(np.float32, copy=True)
        x[awkward] = rows
        norms[awkward] = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def as_ids(ids: Any, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise bad_argument(name, "a 1-d sequence of ints", f"dtype {arr.dtype}, shape {arr.shape}")
    if (arr < 0).any():
        raise bad_argument(name, "ids >= 0 (-1 marks a missing result)", f"{arr[arr < 0][:10].tolist()}")
    # SQLite keys are signed 64-bit: a uint64 id >= 2**63 would wrap to a negative number.
    too_big = arr >= np.uint64(MAX_ID) if arr.dtype.kind == "u" else arr >= MAX_ID
    if too_big.any():
        raise bad_argument(name, f"ids in [0, 2**63 - 1) (below {MAX_ID})", f"{arr[too_big][:10].tolist()}")
    return arr.astype(np.int64)


def check_metadata(metadata: Sequence[Any] | None, n: int) -> list[str | None]:
    if metadata is None:
        return [None] * n
    if isinstance(metadata, dict | str) or len(metadata) != n:
        raise bad_argument("metadata", f"a sequence of {n} JSON values (one per vector)", type(metadata).__name__)
    out: list[str | None] = []
    for i, m in enumerate(metadata):
        try:
            out.append(None if m is None else json.dumps(m, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise bad_argument(f"metadata[{i}]", "a JSON-serialisable value", f"{m!r} ({exc})") from exc
    return out


def check_texts(texts: Sequence[str | None] | None, n: int) -> list[str | None]:
    if texts is None:
        return [None] * n
    if isinstance(texts, str) or len(texts) != n:
        raise bad_argument("texts", f"a sequence of {n} str or None", type(texts).__name__)
    for i, t in enumerate(texts):
        if t is not None and not isinstance(t, str):
            raise bad_argument(f"texts[{i}]", "a str or None", type(t).__name__)
    return list(texts)


def check_vectors(vectors: Any, name: str, dim: int, metric: str) -> np.ndarray:
    """``vectors`` (n, d) or (d,) as a C-contiguous float32 (n, d) array, finite, L2-normalised for "cosine"."""
    try:
        x = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise bad_argument(name, "a float array (n, d)", f"{type(vectors).__name__} ({exc})") from exc
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise bad_argument(name, f"shape (n, {dim}) or ({dim},)", f"shape {np.shape(vectors)}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise bad_argument(name, "finite values", f"NaN or Inf in rows {np.flatnonzero(bad)[:10].tolist()}")
    if metric == "cosine":
        return normalise_rows(x, name)
    return np.ascontiguousarray(x)


def ids_for_rows(ids: Any, n: int) -> np.ndarray:
    """``ids`` as n unique valid ids (one per vector of a call), or a HeadwiseError naming ``ids``."""
    id_arr = as_ids(ids, "ids")
    if len(id_arr) != n:
        raise bad_argument("ids", f"{n} ids (one per vector)", f"{len(id_arr)}")
    uniq, counts = np.unique(id_arr, return_counts=True)
    if (counts > 1).any():
        raise bad_argument("ids", "unique ids", f"duplicates within the call: {uniq[counts > 1][:10].tolist()}")
    return id_arr


def encode_texts(encoder: Any, texts: Any, dim: int) -> tuple[np.ndarray, list[str]]:
    """(vectors (n, dim) float32, the texts as a list) of ``texts`` through ``encoder`` (add_texts of every store)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise bad_argument("texts", "a sequence of str", type(texts).__name__)
    vectors = encoder.encode(list(texts)) if len(texts) else np.empty((0, dim), dtype=np.float32)
    return vectors, list(texts)
