"""Copy a store, with its metadata and texts, between a VectorMemory directory and a Milvus collection.

``migrate(source, destination)`` reads the source in batches (``get``: vector, metadata, text)
and adds each batch to the destination, so a store of any size is copied in bounded memory,
and a copy that stopped (a crash, Ctrl-C, a lost connection) continues with ``resume=True``:
records whose ids the destination already holds are skipped. Locations are a store directory
or ``milvus://HOST:PORT/COLLECTION`` / ``milvus://PATH.db/COLLECTION``
(:func:`headwise.memory.milvus_collection.parse_location`); any pair works, in either direction.

The destination gets the source's configuration (dim, metric, index kind, HNSW parameters;
``index=`` overrides the kind, which a Milvus "autoindex" collection needs to become a
directory) and the same ids, metadata, texts and vectors, bit for bit (cosine rows that are
already unit vectors are not normalised again, as in :mod:`headwise.memory.export`). Not
copied: feedback pairs, a saved enhancer, the automatic id counter (the destination numbers
new records from its largest id + 1, as an import does).

Records are copied in the source's order: insertion order for a directory, ascending ids for
Milvus. The source is read as it is during the copy: a directory is opened read-only (one
snapshot), so copy from a store that no writer changes meanwhile.

Example:
    >>> import tempfile, pathlib, numpy as np
    >>> from headwise.memory import VectorMemory
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with VectorMemory(3, path=d / "a") as mem:
    ...     _ = mem.add(np.eye(3, dtype=np.float32), texts=["x", "y", "z"])
    >>> report = migrate(str(d / "a"), str(d / "b"), batch=2)
    >>> report["copied"], report["skipped"], migrate(str(d / "a"), str(d / "b"), resume=True)["skipped"]
    (3, 0, 3)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from headwise.errors import HeadwiseError, bad_argument
from headwise.memory.checks import check_positive_int
from headwise.memory.export import EXPORT_BATCH, Progress, _add_exact, _exact_rows, store_config, store_order
from headwise.memory.index import INDEX_KINDS
from headwise.memory.milvus_collection import (
    LITE_SERVERS,
    connect,
    is_local,
    is_location,
    milvus_errors,
    parse_location,
)


def open_source(location: str, *, token: str = "") -> Any:
    """The store at ``location`` to read: a directory opened read-only, or an existing Milvus collection."""
    if is_location(location):
        uri, collection = parse_location(location, "--from")
        if not collection_exists(uri, collection, token):
            raise bad_argument("--from", "an existing Milvus collection", f"{location}, which does not exist")
        from headwise.memory.milvus import MilvusMemory

        return MilvusMemory(uri, collection, token=token)
    from headwise.memory.store import VectorMemory

    directory = Path(location)
    if not directory.is_dir():
        raise bad_argument("--from", "a store directory or milvus://...", f"{location}, which is not a directory")
    return VectorMemory.open(directory, read_only=True)


def collection_exists(uri: str, collection: str, token: str = "") -> bool:
    """Whether ``collection`` exists at ``uri`` (one connection, closed again)."""
    local = is_local(uri)
    if local:  # counted, so that a milvus-lite server started for this question stops after it
        LITE_SERVERS.acquire(uri)
    try:
        client = connect(uri, token, 30.0)
        try:
            with milvus_errors("has_collection", uri):
                return bool(client.has_collection(collection))
        finally:
            client.close()
    finally:
        if local:
            LITE_SERVERS.release(uri)


def open_destination(location: str, config: dict[str, Any], *, resume: bool, token: str = "") -> Any:
    """The store to write at ``location``: created with ``config``, or with ``resume`` the one already there.

    Without ``resume`` the destination must be new (a directory new or empty, a collection that
    does not exist); with it, an existing destination must hold vectors of the same dim and metric.
    """
    dim, metric = config["dim"], config["metric"]
    if is_location(location):
        from headwise.memory.milvus import MilvusMemory

        uri, collection = parse_location(location, "--to")
        if collection_exists(uri, collection, token):
            if not resume:
                raise bad_argument("--to", "a new collection (or --resume to continue a copy into it)",
                                   f"{location}, which exists")  # fmt: skip
            return MilvusMemory(uri, collection, dim, metric=metric, ef_search=config["ef_search"], token=token)
        return MilvusMemory(uri, collection, dim, token=token, **{k: v for k, v in config.items() if k != "dim"})
    from headwise.memory.store import VectorMemory

    directory = Path(location)
    if directory.is_dir() and any(directory.iterdir()):
        if not resume:
            raise bad_argument("--to", "a new or empty directory (or --resume to continue a copy into it)",
                               f"{location}, which is not empty")  # fmt: skip
        mem = VectorMemory.open(directory)
        if (mem.dim, mem.metric) != (dim, metric):
            mem.close()
            raise bad_argument("--to", f"a store of dim {dim} and metric {metric!r} (the source's)",
                               f"dim {mem.dim}, metric {mem.metric!r}")  # fmt: skip
        return mem
    if config["index"] not in INDEX_KINDS:
        want = f"one of {INDEX_KINDS} for a store directory (--index, where the source's has no equivalent)"
        raise bad_argument("--index", want, repr(config["index"]))
    return VectorMemory(dim, path=directory, **{k: v for k, v in config.items() if k != "dim"})


def source_config(mem: Any) -> dict[str, Any]:
    """dim, metric, index, hnsw_m, ef_construction, ef_search of a VectorMemory or MilvusMemory."""
    config = getattr(mem, "config", None)
    return dict(config()) if callable(config) else store_config(mem)


def copy_records(
    source: Any, destination: Any, *, batch: int = EXPORT_BATCH, resume: bool = False,
    progress: Progress | None = None,
) -> dict[str, int]:  # fmt: skip
    """Add every record of ``source`` to ``destination`` in batches; returns total, copied and skipped.

    With ``resume``, records whose ids ``destination`` holds are skipped (not compared).
    ``progress(done, total)`` is called after each batch.
    """
    check_positive_int("batch", batch)
    ids = store_order(source)
    total, copied, skipped = len(ids), 0, 0
    for lo in range(0, total, batch):
        chunk = ids[lo : lo + batch]
        if resume:
            held = np.asarray([r is not None for r in destination.get(chunk)], dtype=bool)
            skipped += int(held.sum())
            chunk = chunk[~held]
        if len(chunk):
            records = source.get(chunk)
            if any(r is None for r in records):
                raise HeadwiseError("migrate: expected the source unchanged during the copy, got records deleted")
            vectors = _exact_rows(np.stack([r.vector for r in records]).astype(np.float32), destination.metric)
            metadata, texts = [r.metadata for r in records], [r.text for r in records]
            _add_exact(destination, vectors, chunk, metadata, texts)
            copied += len(chunk)
        if progress is not None:
            progress(min(lo + batch, total), total)
    return {"total": total, "copied": copied, "skipped": skipped}


def migrate(
    source: str, destination: str, *, batch: int = EXPORT_BATCH, resume: bool = False, index: str | None = None,
    token: str = "", progress: Progress | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Copy the store at ``source`` to ``destination`` (see the module docstring); returns a report.

    ``index``: the destination's index kind instead of the source's. ``token``: Milvus
    credentials for either side. The report: from, to, total, copied, skipped, count (records
    in the destination afterwards), seconds.
    """
    check_positive_int("batch", batch)
    start = time.perf_counter()
    src = open_source(source, token=token)
    try:
        config = source_config(src)
        if index is not None:
            config["index"] = index
        dst = open_destination(destination, config, resume=resume, token=token)
        try:
            counts = copy_records(src, dst, batch=batch, resume=resume, progress=progress)
            if hasattr(dst, "save"):
                dst.save()  # a directory: the next open need not rebuild the index
            count = len(dst)
        finally:
            dst.close()
    finally:
        src.close()
    seconds = round(time.perf_counter() - start, 3)
    return {"from": source, "to": destination, **counts, "count": count, "seconds": seconds}
