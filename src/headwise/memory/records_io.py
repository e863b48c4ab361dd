"""Records from a file: what ``headwise memory add --file`` and ``import`` read.

Three formats, chosen by the file name:

- **JSONL** (``.jsonl``, or ``.jsonl.gz`` gzipped): one object per line,
  ``{"id"?: int, "vector"?: [numbers], "text"?: str, "metadata"?: any JSON}``. A line without a
  ``vector`` must have a ``text``, which is encoded (MiniLM, 384-d stores only). ``id`` is on
  every line or on none (then the store numbers the records). An export written by
  :func:`headwise.memory.export.export_store` starts with a header line
  ``{"format": "headwise.memory.export", "version": 1, "store": {...}, "count": N}``.
- **Parquet** (``.parquet``, needs pyarrow: ``pip install 'headwise[parquet]'``): the same
  columns; ``vector`` a list (or fixed-size list) of floats, ``metadata`` a struct or JSON
  text; an export keeps its header in the schema metadata (key ``headwise.memory.export``).
- **NumPy** (``.npy``): vectors only, (n, d) or (d,), loaded without pickle.

Everything is checked before anything is written: an unknown field, a vector of the wrong
length or with NaN, an id that is negative or repeated is a :class:`HeadwiseError` naming the
file, the line (or Parquet row) and the field.

Example:
    >>> import json, tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "data.jsonl"
    >>> _ = f.write_text(json.dumps({"vector": [1, 0], "metadata": {"tag": "a"}}) + "\\n"
    ...                  + json.dumps({"text": "hello"}) + "\\n")
    >>> recs = read_records(f, dim=2)
    >>> len(recs), recs.ids, recs.missing.tolist(), recs.metadata
    (2, None, [False, True], [{'tag': 'a'}, None])
    >>> _ = f.write_text(json.dumps({"vector": [1, 0, 0]}) + "\\n")
    >>> read_records(f, dim=2)
    Traceback (most recent call last):
    ...
    headwise.errors.HeadwiseError: data.jsonl line 1: vector: expected 2 numbers (the store's dim), got 3
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headwise.errors import HeadwiseError, bad_argument
from headwise.memory.checks import MAX_ID
from headwise.memory.transfer import json_field, jsonl_rows, read_parquet

#: The ``format`` of an export's header (a JSONL first line, a Parquet schema metadata key).
EXPORT_FORMAT = "headwise.memory.export"
EXPORT_VERSION = 1
FIELDS = ("id", "vector", "text", "metadata")
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".npy")


@dataclass
class Records:
    """Records read from a file, checked: n rows of ids, vectors, texts and metadata.

    ``vectors`` is (n, d) float32; rows where ``missing`` is True had no vector (they are
    zeros until their text is encoded). ``ids`` is None when the file gives none. ``rows``
    holds each record's line (JSONL) or row (Parquet, .npy) number, for error messages.
    ``header`` is the export header, or None for a file that is not an export.
    """

    path: Path
    ids: np.ndarray | None
    vectors: np.ndarray
    missing: np.ndarray
    texts: list[str | None]
    metadata: list[Any]
    rows: np.ndarray
    header: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.vectors)

    def where(self, i: int) -> str:
        """'data.jsonl line 7' (or 'row 7') for record i, the prefix of an error about it."""
        unit = "line" if _kind(self.path) == "jsonl" else "row"
        return f"{self.path.name} {unit} {int(self.rows[i])}"


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".npy"):
        return "npy"
    raise bad_argument("file", f"a file named *{', *'.join(SUFFIXES)}", path.name)


def check_header(header: Any, where: str) -> dict[str, Any]:
    """An export header, checked: format, version and the store's configuration."""
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        raise bad_argument(f"{where}: header", f"format {EXPORT_FORMAT!r}", repr(header)[:80])
    if header.get("version") != EXPORT_VERSION:
        raise bad_argument(f"{where}: header version", str(EXPORT_VERSION), repr(header.get("version")))
    store = header.get("store")
    dim = store.get("dim") if isinstance(store, dict) else None
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise bad_argument(f"{where}: header store.dim", "a positive integer", repr(dim))
    return header


def read_records(path: Path | str, *, dim: int | None = None, name: str = "--file") -> Records:
    """Read and check every record of ``path`` (JSONL(.gz), Parquet or .npy; see the module docstring).

    ``dim``: the vectors' length (a store's dim); None takes it from the export header or the
    first vector. ``name`` is the option the path came from, used in errors about the file.
    """
    path = Path(path)
    kind = _kind(path)
    if not path.is_file():
        raise bad_argument(name, "an existing file", f"{path}, which does not exist")
    if kind == "npy":
        return _npy_records(path, dim, name)
    rows, header = _parquet_rows(path, name) if kind == "parquet" else _jsonl_rows(path, name)
    if header is not None:
        check_header(header, path.name)
        header_dim = header["store"]["dim"]
        if dim is not None and header_dim != dim:
            raise bad_argument(f"{path.name}: header store.dim", f"{dim} (the store's dim)", header_dim)
        dim = header_dim
    # Metadata: a JSONL line holds the value itself; a Parquet column of text holds JSON (an
    # export's is always JSON text, a user's column is decoded where it looks like an object).
    mode = "value" if kind == "jsonl" else "json-text" if header is not None else "parquet"
    records = _from_rows(path, rows, dim, mode)
    records.header = header
    return records


def _jsonl_rows(path: Path, name: str) -> tuple[list[tuple[int, dict]], dict | None]:
    rows = list(jsonl_rows(path, name))
    header = None
    if rows and "format" in rows[0][1]:  # no record has a "format" field: this is a header
        header = rows.pop(0)[1]
    return rows, header


def _parquet_rows(path: Path, name: str) -> tuple[list[tuple[int, dict]], dict | None]:
    """(row number, dict) of every row, and the export header from the schema metadata."""
    table = read_parquet(path, name)
    unknown = [c for c in table.column_names if c not in FIELDS]
    if unknown:
        raise bad_argument(f"{path.name}: columns", f"some of {FIELDS}", f"also {unknown}")
    meta = table.schema.metadata or {}
    raw = meta.get(EXPORT_FORMAT.encode())
    try:
        header = json.loads(raw) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_argument(f"{path.name}: header", "JSON in the schema metadata", str(exc)) from None
    vectors = _parquet_vectors(table.column("vector")) if "vector" in table.column_names else None
    if vectors is None:
        return list(enumerate(table.to_pylist(), 1)), header
    rows = table.drop_columns(["vector"]).to_pylist() if table.num_columns > 1 else [{} for _ in range(len(table))]
    for row, vec in zip(rows, vectors):
        row["vector"] = vec
    return list(enumerate(rows, 1)), header


def _parquet_vectors(column: Any) -> list[np.ndarray | None] | None:
    """A list column of numbers as one array cut into rows (None for a null row), or None to go row by row.

    Converting every float to a Python object costs ~80 µs a 384-d row; one flattened array
    costs a fraction of that. Columns of other types fall back to the row-by-row checks,
    which name the row.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    col = column.combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        return None
    if not (pa.types.is_floating(col.type.value_type) or pa.types.is_integer(col.type.value_type)):
        return None
    if pc.list_flatten(col).null_count:  # a null inside a vector: let the row checks name it
        return None
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)  # NaN where the row is null
    null = col.is_null().to_numpy(zero_copy_only=False)
    ends = np.cumsum(np.where(null, 0, lengths).astype(np.int64))
    starts = ends - np.where(null, 0, lengths).astype(np.int64)
    return [None if n else values[a:b] for n, a, b in zip(null.tolist(), starts.tolist(), ends.tolist())]


def _npy_records(path: Path, dim: int | None, name: str) -> Records:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # a pickled or damaged file
        raise bad_argument(name, "a plain .npy array (no pickle)", f"{path}: {type(exc).__name__}: {exc}") from None
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.dtype.kind not in "fiu" or (dim is not None and arr.shape[1] != dim):
        want = f"a ({'n'}, {dim if dim is not None else 'd'}) array of numbers"
        raise bad_argument(path.name, want, f"{arr.dtype} {arr.shape}")
    vectors = np.ascontiguousarray(arr, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise bad_argument(f"{path.name} row {bad[0] + 1}", "finite numbers", "NaN or Inf")
    n = len(vectors)
    return Records(path, None, vectors, np.zeros(n, dtype=bool), [None] * n, [None] * n, np.arange(1, n + 1))


def _from_rows(path: Path, rows: list[tuple[int, dict]], dim: int | None, mode: str) -> Records:
    """Check each row's fields; vectors into one (n, d) float32 array."""
    unit = "line" if _kind(path) == "jsonl" else "row"
    ids: list[int | None] = []
    vecs: list[np.ndarray | None] = []
    texts: list[str | None] = []
    metadata: list[Any] = []
    first_seen: dict[int, int] = {}
    dim_from = "the store's dim" if dim is not None else "as on the first vector"
    for number, row in rows:
        where = f"{path.name} {unit} {number}"
        unknown = sorted(set(row) - set(FIELDS))
        if unknown:
            raise bad_argument(where, f"only the fields {FIELDS}", f"also {unknown}")
        rid, vec, text = row.get("id"), row.get("vector"), row.get("text")
        if rid is not None:
            if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid < MAX_ID:
                raise bad_argument(f"{where}: id", "an integer in [0, 2**63 - 1)", repr(rid))
            if rid in first_seen:
                raise bad_argument(f"{where}: id", "ids unique in the file", f"{rid} again ({unit} {first_seen[rid]})")
            first_seen[rid] = number
        if text is not None and not isinstance(text, str):
            raise bad_argument(f"{where}: text", "a string", type(text).__name__)
        if vec is None:
            if text is None or not text.strip():
                raise bad_argument(where, "a vector, or a text to encode", "neither")
        else:
            vec = _vector(vec, f"{where}: vector", dim, dim_from)
            dim = len(vec)
        ids.append(rid)
        vecs.append(vec)
        texts.append(text)
        metadata.append(_metadata(row.get("metadata"), f"{where}: metadata", mode))
    given = [i for i in ids if i is not None]
    if given and len(given) != len(ids):
        lacking = next(n for (n, _), i in zip(rows, ids) if i is None)
        raise bad_argument(f"{path.name} {unit} {lacking}: id", "an id on every record or on none", "none")
    if dim is None:  # only texts: the encoder decides the dim
        dim = 384
    n = len(rows)
    vectors = np.zeros((n, dim), dtype=np.float32)
    missing = np.zeros(n, dtype=bool)
    for i, v in enumerate(vecs):
        if v is None:
            missing[i] = True
        else:
            vectors[i] = v
    id_arr = np.asarray(given, dtype=np.int64) if given else None
    return Records(path, id_arr, vectors, missing, texts, metadata, np.asarray([r for r, _ in rows], dtype=np.int64))


def _vector(value: Any, where: str, dim: int | None, dim_from: str = "the store's dim") -> np.ndarray:
    """A list of numbers as float32 (d,), finite, of length ``dim`` when given."""
    arr = value if isinstance(value, np.ndarray) else np.asarray(value) if isinstance(value, list) else None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "fiu" or len(arr) == 0:
        got = type(value).__name__ if arr is None else f"{arr.dtype.kind!r} values of shape {arr.shape}"
        raise bad_argument(where, "a non-empty list of numbers", got)
    if dim is not None and len(arr) != dim:
        raise bad_argument(where, f"{dim} numbers ({dim_from})", len(arr))
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise bad_argument(where, "finite numbers (within float32)", "NaN, Inf or an overflow")
    return out


def _metadata(value: Any, where: str, mode: str) -> Any:
    """Metadata as a JSON value; ``mode`` "value" (JSONL), "json-text" (an export's Parquet) or "parquet"."""
    if mode == "json-text" and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise bad_argument(where, "JSON text", f"invalid JSON ({exc.msg})") from None
    if mode == "parquet":
        value = json_field(value)  # a user's column of JSON objects or lists
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise bad_argument(where, "a JSON value", f"{type(value).__name__} ({exc})") from None
    return value


def first_duplicate(records: Records, stored: np.ndarray) -> HeadwiseError | None:
    """An error naming the first record whose id is already in ``stored`` (ids), or None."""
    if records.ids is None:
        return None
    hit = np.flatnonzero(np.isin(records.ids, stored))
    if not len(hit):
        return None
    i = int(hit[0])
    return bad_argument(f"{records.where(i)}: id", "ids not yet in the store", f"{int(records.ids[i])}, already stored")
