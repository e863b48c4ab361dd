"""Export a store to one file and import it back: Parquet (pyarrow) or JSONL(.gz).

``export_store(mem, path)`` writes every record (id, vector as float32, metadata as JSON,
text) with the store's configuration (dim, metric, index kind, HNSW parameters): in Parquet
as schema metadata, in JSONL as a first header line (format in :mod:`headwise.memory.records_io`).
``import_store(path, directory)`` creates a new store from such a file, so that a round trip
gives an identical store: the same ids, bit-identical vectors, metadata, texts and
configuration, the records added in the exported order (the store's insertion order, so an
HNSW graph is built from the same sequence). ``add_records(mem, records)`` adds a file's
records to an existing store (``headwise memory add --file``).

Bit-identical vectors: a float32 written to JSON as its float64 value reads back exactly. A
cosine store holds unit vectors, and normalising a unit vector again can move its last bit
(about a third of 384-d rows do), so rows that are already unit vectors (norm within
:data:`UNIT_TOLERANCE` of 1) are stored exactly as given; other rows are normalised as usual.

Not exported: feedback pairs, a saved enhancer (copy ``DIR/enhancer``), the automatic id
counter (an imported store numbers new records from the largest id + 1).

Example:
    >>> import tempfile, pathlib, numpy as np
    >>> from headwise.memory import VectorMemory
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> mem = VectorMemory(3, metric="cosine", index="hnsw", hnsw_m=8)
    >>> _ = mem.add(np.random.default_rng(0).standard_normal((5, 3)), metadata=[{"n": i} for i in range(5)])
    >>> export_store(mem, d / "mem.jsonl.gz")
    5
    >>> copy = import_store(d / "mem.jsonl.gz", d / "copy")
    >>> copy.index_kind, store_config(copy)["hnsw_m"], bool((copy.vectors(copy.ids()) == mem.vectors(mem.ids())).all())
    ('hnsw', 8, True)
    >>> copy.close()
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import atomic_writer
from headwise.memory.checks import check_vectors, normalise_rows
from headwise.memory.records_io import EXPORT_FORMAT, EXPORT_VERSION, Records, first_duplicate, read_records

#: A cosine row whose norm is this close to 1 is stored as given (see the module docstring):
#: a normalised float32 row is within ~1e-7 of 1, a user's raw vector almost never is.
UNIT_TOLERANCE = 1e-6
#: Records read from the store (and written) per step: bounds the memory an export holds.
EXPORT_BATCH = 4096
#: Records per add() call, each one SQLite transaction (and one progress step).
ADD_BATCH = 2048

Progress = Callable[[int, int], None]  # (records done, total)


def store_config(mem: Any) -> dict[str, Any]:
    """dim, metric, index, hnsw_m, ef_construction, ef_search of a store (what ``VectorMemory(...)`` takes)."""
    index = getattr(mem, "_index", None)  # the HNSW build parameters are not public attributes of the store
    return {
        "dim": int(mem.dim),
        "metric": mem.metric,
        "index": mem.index_kind,
        "hnsw_m": int(getattr(index, "hnsw_m", 32)),
        "ef_construction": int(getattr(index, "ef_construction", 200)),
        "ef_search": int(mem.ef_search),
    }


def store_order(mem: Any) -> np.ndarray:
    """Every stored id in the store's insertion order (its ``seq`` order), or ascending for other stores."""
    db = getattr(mem, "_db", None)
    if db is not None and hasattr(db, "seq_ids"):
        with mem._lock:
            return db.seq_ids()[1]
    return np.asarray(mem.ids(), dtype=np.int64)


def _format(path: Path, name_of: str = "path") -> str:
    """The format of ``path`` from its name: "parquet" or "jsonl"."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    raise bad_argument(name_of, "a file named *.parquet, *.jsonl or *.jsonl.gz", path.name)


def export_store(mem: Any, path: Path | str, *, progress: Progress | None = None) -> int:
    """Write every record of ``mem`` and its configuration to ``path``; returns the number of records.

    The format follows the name: ``.parquet`` (needs pyarrow), ``.jsonl`` or ``.jsonl.gz``.
    The file is written atomically (a temporary file renamed into place). A read-only store
    exports the snapshot it holds.
    """
    path = Path(path)
    kind = _format(path)
    pa = _pyarrow() if kind == "parquet" else None
    ids = store_order(mem)
    header = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "store": store_config(mem), "count": len(ids)}
    with atomic_writer(path) as fh:
        if kind == "parquet":
            _write_parquet(mem, ids, header, fh, pa, progress)
        else:
            _write_jsonl(mem, ids, header, fh, gz=path.name.lower().endswith(".gz"), progress=progress)
    return len(ids)


def _batches(mem: Any, ids: np.ndarray, progress: Progress | None) -> Iterator[list]:
    for lo in range(0, len(ids), EXPORT_BATCH):
        records = mem.get(ids[lo : lo + EXPORT_BATCH])
        if any(r is None for r in records):  # a writer deleted them since the ids were read
            raise HeadwiseError("export: expected the store unchanged during the export, got records deleted")
        yield records
        if progress is not None:
            progress(min(lo + EXPORT_BATCH, len(ids)), len(ids))


def _write_jsonl(mem: Any, ids: np.ndarray, header: dict, fh: IO[bytes], *, gz: bool,
                 progress: Progress | None) -> None:  # fmt: skip
    # mtime 0: exporting the same store twice gives the same bytes.
    out = gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) if gz else fh
    out.write((json.dumps(header) + "\n").encode())
    for records in _batches(mem, ids, progress):
        lines = [
            json.dumps(
                {"id": r.id, "vector": r.vector.astype(np.float64).tolist(), "metadata": r.metadata, "text": r.text},
                ensure_ascii=False,
            )
            for r in records
        ]
        out.write(("\n".join(lines) + "\n").encode())
    if gz:
        out.close()  # writes the gzip trailer into fh (fh stays open)


def _write_parquet(mem: Any, ids: np.ndarray, header: dict, fh: IO[bytes], pa: Any, progress: Progress | None) -> None:
    import pyarrow.parquet as pq

    dim = header["store"]["dim"]
    schema = pa.schema(
        [("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim)), ("metadata", pa.string()),
         ("text", pa.string())],
        metadata={EXPORT_FORMAT: json.dumps(header)},
    )  # fmt: skip
    with pq.ParquetWriter(fh, schema) as writer:
        for records in _batches(mem, ids, progress):
            flat = pa.array(np.stack([r.vector for r in records]).reshape(-1), type=pa.float32())
            columns = [
                pa.array([r.id for r in records], type=pa.int64()),
                pa.FixedSizeListArray.from_arrays(flat, dim),
                pa.array([None if r.metadata is None else json.dumps(r.metadata) for r in records], pa.string()),
                pa.array([r.text for r in records], type=pa.string()),
            ]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
        if not len(ids):
            writer.write_table(schema.empty_table())


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise HeadwiseError("parquet: expected pyarrow installed (pip install 'headwise[parquet]'), got none") from None
    return pyarrow


# ---------------------------------------------------------------------------------------- import


def encode_missing(records: Records, dim: int, encoder: Any | None) -> None:
    """Fill the vectors of records that only had a text, with ``encoder`` (MiniLM for 384-d stores)."""
    if not records.missing.any():
        return
    first = records.where(int(np.flatnonzero(records.missing)[0]))
    if dim != 384:
        want = f"a vector (texts are encoded with MiniLM, 384-d; the store has dim {dim})"
        raise bad_argument(f"{first}: vector", want, "only a text")
    if encoder is None:
        from headwise.memory.encoder import MiniLMEncoder

        encoder = MiniLMEncoder()
    rows = np.flatnonzero(records.missing)
    records.vectors[rows] = encoder.encode([records.texts[i] for i in rows])
    records.missing[rows] = False


def _exact_rows(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Rows as the store will hold them: for cosine, unit rows unchanged and the others normalised."""
    if metric != "cosine":
        return vectors
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    redo = np.abs(norms - 1.0) > UNIT_TOLERANCE
    if redo.any():
        vectors = vectors.copy()
        vectors[redo] = normalise_rows(vectors[redo], "vectors")
    return vectors


def _add_exact(mem: Any, vectors: np.ndarray, ids: Any, metadata: list, texts: list) -> np.ndarray:
    """``mem.add`` of rows already as the store holds them (see :func:`_exact_rows`), stored bit for bit.

    ``add`` normalises cosine rows again, which can move a unit vector's last bit; for this
    call the store's vector check is the same check without normalising (shape, finiteness).
    """
    if mem.metric != "cosine":
        return mem.add(vectors, ids=ids, metadata=metadata, texts=texts)
    dim = mem.dim
    with mem._lock:  # another thread's search must not meet the unnormalising check (add takes it anyway)
        mem._check_vectors = lambda v, name: check_vectors(v, name, dim, "ip")  # shadows the method on this object
        try:
            return mem.add(vectors, ids=ids, metadata=metadata, texts=texts)
        finally:
            del mem._check_vectors


def add_records(
    mem: Any, records: Records, *, encoder: Any | None = None, progress: Progress | None = None
) -> np.ndarray:
    """Add ``records`` to ``mem`` in transactions of :data:`ADD_BATCH`; returns their ids (n,) int64.

    Everything is checked first (texts are encoded, ids are checked against the store), so a
    bad file writes nothing. Each batch is its own transaction: a crash keeps the batches
    committed before it.
    """
    if records.vectors.shape[1] != mem.dim:
        raise bad_argument(f"{records.path.name}: vectors", f"dim {mem.dim} (the store's)", records.vectors.shape[1])
    encode_missing(records, mem.dim, encoder)
    dup = first_duplicate(records, mem.ids())
    if dup is not None:
        raise dup
    vectors = _exact_rows(records.vectors, mem.metric)
    n, out = len(records), []
    for lo in range(0, n, ADD_BATCH):
        hi = min(lo + ADD_BATCH, n)
        ids = None if records.ids is None else records.ids[lo:hi]
        out.append(_add_exact(mem, vectors[lo:hi], ids, records.metadata[lo:hi], records.texts[lo:hi]))
        if progress is not None:
            progress(hi, n)
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def import_store(
    path: Path | str,
    directory: Path | str,
    *,
    index: str | None = None,
    metric: str | None = None,
    encoder: Any | None = None,
    progress: Progress | None = None,
) -> Any:
    """A new store in ``directory`` (new or empty) holding the records of ``path``; returned open (a writer).

    An export's header gives the configuration; ``index`` / ``metric`` override it (a file
    that is not an export needs neither: flat and cosine by default). The file is read and
    checked completely before the store is created; if adding fails after that, the new
    store is removed again. The store is saved before it is returned (a fast next open).
    """
    from headwise.memory.store import VectorMemory

    records = read_records(path, name="path")
    config = dict((records.header or {}).get("store") or {"dim": records.vectors.shape[1]})
    config.update({k: v for k, v in (("index", index), ("metric", metric)) if v is not None})
    dim = int(config.pop("dim"))
    encode_missing(records, dim, encoder)
    directory = Path(directory)
    existed = directory.exists()
    if existed and (not directory.is_dir() or any(directory.iterdir())):
        raise bad_argument("directory", "a new or empty directory", str(directory))
    unknown = sorted(set(config) - {"metric", "index", "hnsw_m", "ef_construction", "ef_search"})
    if unknown:
        raise bad_argument(f"{records.path.name}: header store", "dim, metric, index and HNSW parameters",
                           f"also {unknown}")  # fmt: skip
    mem = VectorMemory(dim, path=directory, **config)
    try:
        add_records(mem, records, encoder=encoder, progress=progress)
        mem.save()
    except BaseException:
        mem.close()
        if existed:  # leave the empty directory the caller gave, as it was
            for child in directory.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return mem
