"""VectorMemory: an embedded vector store with a faiss-style API, durable on disk.

Search mirrors faiss: ``add(vectors, ids=None)`` and ``search(queries, k) -> (scores, ids)``
with id -1 and score -inf where fewer than k records exist. Scores are "higher is better"
for every metric: cosine similarity ("cosine": stored vectors and queries are
L2-normalised), inner product ("ip"), negative squared L2 distance ("l2").

Durability. SQLite (WAL, ``synchronous=FULL``) is the source of truth: each ``add`` or
``delete`` is one transaction holding the vectors (float32 BLOBs), ids, metadata and texts,
and returns only after the commit. The faiss index is a cache of it. On disk ``path/`` holds::

    manifest.json          {"format": "headwise.memory", "version": 1, "index": {file names, sha256, ...}}
    memory.sqlite (+ -wal) the records
    index-<token>.faiss    the faiss index as of the last save()        (written by save)
    slots-<token>.npy      the seq of each faiss slot (int64, no pickle) (written by save)

``save()`` writes the two index files under new names (temporary file, fsync, rename), then
replaces the manifest atomically, then removes the previous files: at any crash point the
manifest names complete, checksummed files. ``open()`` verifies the checksums, loads the
index and reconciles it with SQLite by ``seq`` (records added since the save are added,
deleted ones become tombstones), so records acknowledged after the last save are never lost;
without a saved index it rebuilds from SQLite. Leftover temporary and unreferenced files are
removed on open by a writer.

Sharing. One writer at a time, any number of readers, as in SQLite and LMDB: a writable store
holds an OS lock on ``writer.lock`` until ``close()`` (a second writer waits ``lock_timeout``
seconds, then gets a HeadwiseError naming the holder's pid; the OS drops the lock of a killed
process). ``VectorMemory.open(path, read_only=True)`` takes no lock and reads one committed
snapshot (a SQLite read transaction) until ``refresh()`` moves it to the latest commit: its
``search`` and ``get`` always agree. Readers never delete a file.

Delete on HNSW: faiss's HNSW cannot remove vectors, so deleted slots are tombstones filtered
inside the faiss search (an ID selector of the live slots); the index is rebuilt without them
when they pass 25% of the slots, and on ``save()`` (flat: any tombstone; HNSW: over 10%).

With an enhancer (``set_enhancer``), a search takes the top-K candidates (K =
``enhancer.candidates``), lets the enhancer refine the queries from the candidates'
vectors and scores, and searches again with the refined queries. On HNSW the first pass
may use a narrower beam (``candidate_ef``) than the second: it only gathers the enhancer's
inputs, while the second pass returns the answer. The first pass searches with
``enhancer.first_pass_queries(q)`` where the enhancer has that method (an adapted query
finds better candidates than the raw one), else with q; an enhancer whose
``uses_candidates`` is False gets no first pass at all.

Filters and updates. ``search(q, k, filter={"lang": "en"})`` returns the top-k among the
records whose metadata match a Mongo-style filter (:mod:`headwise.memory.filters`, searched as
:mod:`headwise.memory.filtered` describes); ``index_field`` indexes a field for them.
``upsert`` and ``update_metadata`` (:mod:`headwise.memory.updates`) are single transactions, like ``add``.

Shapes: n queries, d = ``dim``, k results, K candidates -> scores (n, k) float32, ids (n, k) int64;
the enhancer sees queries (n, d), candidate vectors (n, K, d), candidate scores (n, K).

Example:
    >>> import numpy as np
    >>> mem = VectorMemory(3, metric="l2")
    >>> mem.add(np.eye(3, dtype=np.float32), metadata=[{"axis": a} for a in "xyz"]).tolist()
    [0, 1, 2]
    >>> scores, ids = mem.search(np.array([[0.9, 0.1, 0.0]], dtype=np.float32), k=4)
    >>> ids.tolist(), [round(s, 2) for s in scores[0].tolist()]
    ([[0, 1, 2, -1]], [-0.02, -1.62, -1.82, -inf])
    >>> mem.delete([0]), len(mem), mem.get([1])[0].metadata
    (1, 2, {'axis': 'y'})
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import write_atomic
from headwise.memory.cache import ResultCache
from headwise.memory.checks import (
    as_ids,
    check_metadata,
    check_positive_int,
    check_texts,
    check_vectors,
    encode_texts,
    ids_for_rows,
)
from headwise.memory.encoder import TextEncoder
from headwise.memory.feedback import check_relevant, insert_feedback, read_feedback
from headwise.memory.filtered import FilterMatches
from headwise.memory.filters import compile_filter
from headwise.memory.index import INDEX_KINDS, METRICS, SlotIndex
from headwise.memory.integrity import VerifyReport, verify_store
from headwise.memory.layout import create_on_disk, open_store, read_manifest, reconcile, sha256, write_manifest
from headwise.memory.locking import SharedLock, WriterLock
from headwise.memory.metrics import MetricsCollector
from headwise.memory.passes import check_enhancer
from headwise.memory.records import Feedback, Hit, Record
from headwise.memory.searching import SearchPasses
from headwise.memory.storage import Storage
from headwise.memory.updates import RecordUpdates

#: Tombstone fraction of the slots above which delete() rebuilds the index in memory.
COMPACT_AT = 0.25
#: ... and above which save() rebuilds an HNSW index before writing it (flat: any tombstone).
COMPACT_HNSW_ON_SAVE_AT = 0.10


class VectorMemory(RecordUpdates, SearchPasses):
    """An embedded vector store (see the module docstring for the layout and guarantees).

    Args:
        dim: vector dimension d.
        metric: "cosine" (default), "ip" or "l2".
        index: "flat" (exact; for evaluation), "hnsw" (approximate; for serving) or "hnsw-fp16"
            (the same graph over half-precision vectors: faster searches, scores rounded to
            about 3 significant digits; see :mod:`headwise.memory.index`).
        path: a new or empty directory to persist to; None keeps everything in memory.
        hnsw_m, ef_construction, ef_search: HNSW graph degree, build and search beam widths.
        encoder: a :class:`~headwise.memory.encoder.TextEncoder` for ``add_texts`` / ``search_text``.
        cache_size, cache_ttl: LRU result cache entries (0: off) and their lifetime in seconds.
    """

    def __init__(
        self,
        dim: int,
        *,
        metric: str = "cosine",
        index: str = "flat",
        path: str | Path | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 64,
        encoder: TextEncoder | None = None,
        cache_size: int = 0,
        cache_ttl: float | None = None,
    ) -> None:
        check_positive_int("dim", dim)
        if metric not in METRICS:
            raise bad_argument("metric", f"one of {METRICS}", repr(metric))
        if index not in INDEX_KINDS:
            raise bad_argument("index", f"one of {INDEX_KINDS}", repr(index))
        check_positive_int("hnsw_m", hnsw_m, minimum=2)
        check_positive_int("ef_construction", ef_construction)
        check_positive_int("ef_search", ef_search)
        cache = ResultCache(cache_size, cache_ttl)
        config = {
            "dim": str(dim),
            "metric": metric,
            "index": index,
            "hnsw_m": str(hnsw_m),
            "ef_construction": str(ef_construction),
            "ef_search": str(ef_search),
        }
        directory = Path(path) if path is not None else None
        storage = create_on_disk(directory, config) if directory is not None else Storage.create(None, config)
        try:  # the creator is the store's first writer
            lock = WriterLock(directory, timeout=0) if directory is not None else None
        except BaseException:
            storage.close()
            raise
        slot_index = SlotIndex(dim, metric, index, hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
        self._setup(directory, storage, slot_index, encoder, cache, lock=lock)

    def _setup(
        self,
        directory: Path | None,
        storage: Storage,
        slot_index: SlotIndex,
        encoder: TextEncoder | None,
        cache: ResultCache,
        *,
        lock: WriterLock | None = None,
        read_only: bool = False,
    ) -> None:
        self.path = directory
        self.read_only = read_only
        self._writer_lock = lock
        self._closed = False
        self.dim, self.metric, self.index_kind = slot_index.dim, slot_index.metric, slot_index.kind
        if encoder is not None:
            enc_dim = getattr(encoder, "dim", None)
            if enc_dim != self.dim or not callable(getattr(encoder, "encode", None)):
                storage.close()
                raise bad_argument("encoder", f"a TextEncoder with dim {self.dim}", f"dim {enc_dim}")
        self.encoder = encoder
        self.cache = cache
        self.metrics = MetricsCollector()
        self.enhancer: Any = None
        self._db = storage
        self._index = slot_index
        self._lock = SharedLock()  # `with self._lock`: exclusive (writes); `.shared()`: searches
        self._search_guard = threading.Lock()  # what concurrent searches share (see SearchPasses._match)
        self._candidate_ef: int | None = None
        self._merge_candidates = True
        self._filter_matches = FilterMatches()
        self._exact_filter_max: int | None = None

    # ------------------------------------------------------------------ open / save / close
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        read_only: bool = False,
        lock_timeout: float = 5.0,
        encoder: TextEncoder | None = None,
        cache_size: int = 0,
        cache_ttl: float | None = None,
        rebuild_index: bool = False,
    ) -> VectorMemory:
        """Open a store written by ``VectorMemory(..., path=...)``.

        ``read_only=False`` (a writer) takes the store's writer lock, waiting up to
        ``lock_timeout`` seconds for another writer to close (see :mod:`headwise.memory.locking`).
        ``read_only=True`` (a reader, any number) takes no lock and sees the snapshot committed
        when it opened until :meth:`refresh`. Raises HeadwiseError for a missing path, a
        directory of another program, a manifest of another format version or naming files
        outside the store, a damaged database, a store locked by another writer, or an index
        file whose checksum does not match the manifest (``rebuild_index=True`` then rebuilds
        the index from SQLite).
        """
        directory = Path(path)
        if not directory.is_dir():
            raise bad_argument("path", "a directory written by VectorMemory", f"{directory} (not a directory)")
        read_manifest(directory)  # a foreign directory is refused before a lock file is written into it
        cache = ResultCache(cache_size, cache_ttl)
        lock = None if read_only else WriterLock(directory, timeout=lock_timeout)
        try:
            storage, slot_index = open_store(directory, read_only=read_only, rebuild=rebuild_index)
            mem = cls.__new__(cls)
            mem._setup(directory, storage, slot_index, encoder, cache, lock=lock, read_only=read_only)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return mem

    def refresh(self) -> None:
        """A reader moves to the latest committed state (its index catches up); a no-op for a writer.

        A read-only store answers ``search`` and ``get`` from one snapshot, so the two never
        disagree; writes committed by the writer after that snapshot appear after ``refresh()``.
        """
        if not self.read_only:
            return
        with self._lock:
            self._db.end_snapshot()
            self._db.begin_snapshot()
            reconcile(self._index, self._db)
            self._contents_changed()

    def save(self) -> None:
        """Write the faiss index and the manifest so that ``open`` need not rebuild (see the module docstring).

        Records are durable without ``save``: each add/delete is committed to SQLite.
        """
        if self.path is None:
            raise HeadwiseError("save: expected a VectorMemory created with path=..., got an in-memory one")
        self._require_writer("save")
        with self._lock:
            tombstones = self._index.n_slots - self._index.n_live
            threshold = 0 if self.index_kind == "flat" else COMPACT_HNSW_ON_SAVE_AT * self._index.n_slots
            if tombstones > threshold:
                self._index.compact()
            old = read_manifest(self.path).get("index") or {}
            index_bytes, slot_bytes = self._index.serialize()
            token = uuid.uuid4().hex[:16]
            entry = {
                "file": f"index-{token}.faiss",
                "sha256": sha256(index_bytes),
                "slots_file": f"slots-{token}.npy",
                "slots_sha256": sha256(slot_bytes),
                "n_slots": self._index.n_slots,
                "n_live": self._index.n_live,
            }
            write_atomic(self.path / entry["file"], index_bytes)
            write_atomic(self.path / entry["slots_file"], slot_bytes)
            write_manifest(self.path, entry)
            for name in (old.get("file"), old.get("slots_file")):
                if name:
                    (self.path / name).unlink(missing_ok=True)
            self._db.checkpoint()

    def close(self) -> None:
        """Close the database connection and drop the writer lock (records are already durable). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.end_snapshot()
            self._db.close()
            if self._writer_lock is not None:
                self._writer_lock.release()

    def _require_writer(self, op: str) -> None:
        if self.read_only:
            raise HeadwiseError(f"{op}: expected a writable VectorMemory, got one opened with read_only=True")

    def __enter__(self) -> VectorMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self._index.n_live

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "in memory"
        return (
            f"VectorMemory(dim={self.dim}, metric={self.metric!r}, index={self.index_kind!r}, n={len(self)}, {where})"
        )

    @property
    def ef_search(self) -> int:
        """HNSW search beam width (larger: higher recall, slower); ignored by "flat"."""
        return self._index.ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        check_positive_int("ef_search", value)
        with self._lock:
            self._index.ef_search = value
            self.cache.clear()

    @property
    def candidate_ef(self) -> int | None:
        """HNSW beam width of an enhanced search's first pass (None: ``ef_search``); not saved.

        faiss searches with at least K (the enhancer's candidates), so ``candidate_ef = 1``
        means exactly K. Ignored by "flat" and by searches without an enhancer.
        """
        return self._candidate_ef

    @candidate_ef.setter
    def candidate_ef(self, value: int | None) -> None:
        if value is not None:
            check_positive_int("candidate_ef", value)
        with self._lock:
            self._candidate_ef = None if value is None else int(value)
            self.cache.clear()

    @property
    def merge_candidates(self) -> bool:
        """Whether an enhanced HNSW search merges its first-pass candidates into its result (default True); not saved.

        The second pass is approximate and may miss a neighbour of the refined query that the
        first pass already found: merged, the K candidates are scored against the refined query
        and compete with the second pass's top-k, so the result is never worse than either
        pass, and the second pass reaches a given recall with a smaller ``ef_search``.
        Exact ("flat") searches do not merge: their second pass already holds the true top-k.
        """
        return self._merge_candidates

    @merge_candidates.setter
    def merge_candidates(self, value: bool) -> None:
        if not isinstance(value, bool | np.bool_):
            raise bad_argument("merge_candidates", "a bool", repr(value))
        with self._lock:
            self._merge_candidates = bool(value)
            self.cache.clear()

    # ------------------------------------------------------------------ writes
    def add(
        self,
        vectors: Any,
        ids: Any = None,
        metadata: Sequence[Any] | None = None,
        texts: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """Add vectors (n, d) (or one (d,)) and return their ids (n,) int64.

        ``ids``: non-negative ints not yet stored (None: the next free ids). ``metadata``: one
        JSON-serialisable value (or None) per vector. ``texts``: one str (or None) per vector.
        Raises HeadwiseError, leaving the store unchanged, on any bad input.
        """
        self._require_writer("add")
        with self._lock:
            start = time.perf_counter()
            x = self._check_vectors(vectors, "vectors")
            n = len(x)
            id_arr = self._check_new_ids(ids, n)
            meta = check_metadata(metadata, n)
            txt = check_texts(texts, n)
            if n:
                seqs = self._db.insert(id_arr, x, meta, txt)
                self._index.add(seqs, id_arr, x)
                self._contents_changed()
            self.metrics.record("add", time.perf_counter() - start, n)
            return id_arr

    def add_texts(self, texts: Sequence[str], metadata: Sequence[Any] | None = None, ids: Any = None) -> np.ndarray:
        """Encode ``texts`` with the store's encoder and add them (the texts are stored too)."""
        vectors, texts = encode_texts(self._require_encoder("add_texts"), texts, self.dim)
        return self.add(vectors, ids=ids, metadata=metadata, texts=texts)

    def delete(self, ids: Any) -> int:
        """Delete the records of ``ids`` (absent ids are ignored); returns how many were deleted."""
        self._require_writer("delete")
        id_arr = as_ids(ids, "ids")
        with self._lock:
            seqs = self._db.delete(id_arr) if len(id_arr) else np.empty(0, dtype=np.int64)
            if len(seqs):
                self._index.remove_seqs(seqs)
                self._contents_changed()
                self._compact_if_needed()
            return len(seqs)

    def compact(self) -> tuple[int, int]:
        """Rebuild the index without the slots of deleted records now; returns (slots before, after).

        The store compacts on its own thresholds (see the module docstring); this forces it,
        e.g. before a ``save()`` that should write the smallest index. Writers only.
        """
        self._require_writer("compact")
        with self._lock:
            before = self._index.n_slots
            self._index.compact()
            return before, self._index.n_slots

    def _compact_if_needed(self) -> None:
        if self._index.n_slots - self._index.n_live > COMPACT_AT * self._index.n_slots:
            self._index.compact()

    def set_enhancer(self, enhancer: Any) -> None:
        """Use ``enhancer`` (``candidates: int`` and ``refine(queries, cand_vectors, cand_scores)``) or None.

        An enhancer with an ``attach(store)`` method is attached first: a "flash" QueryEnhancer
        then reads this store's live vectors and follows every later write (headwise.memory.binding).
        """
        check_enhancer(enhancer, self)
        with self._lock:
            self.enhancer = enhancer
            self.cache.clear()

    # ------------------------------------------------------------------ feedback
    def record_feedback(self, query: Any, relevant_ids: Any) -> int:
        """Record that ``relevant_ids`` (ids, or {id: grade > 0}) answered ``query`` (str or (d,)); returns its id.

        Committed to SQLite before it returns; see :mod:`headwise.memory.feedback`.
        """
        self._require_writer("record_feedback")
        text = query if isinstance(query, str) else None
        if text is not None:
            query = self._require_encoder("record_feedback of a str").encode([text])
        with self._lock:
            q = self._check_vectors(query, "query")
            if len(q) != 1:
                raise bad_argument("query", f"one query (a str or a ({self.dim},) vector)", f"{len(q)} rows")
            relevant = check_relevant(relevant_ids, self._db.existing)
            return insert_feedback(self._db, q[0], text, relevant)

    def feedback(self) -> list[Feedback]:
        """Every (query, relevant ids) pair recorded with :meth:`record_feedback`, oldest first."""
        with self._lock:
            return read_feedback(self._db, self.dim)

    # ------------------------------------------------------------------ reads
    def search(
        self, queries: Any, k: int, *, enhance: bool | None = None, filter: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of ``queries`` (n, d) or (d,): scores (n, k) float32 and ids (n, k) int64, -inf/-1 padded.

        ``enhance``: None uses the enhancer when one is set; True requires one; False never uses it.
        ``filter``: only records whose metadata match it (:mod:`headwise.memory.filters`); every
        row has min(k, matching records) results, also on HNSW.
        Rows already answered are served by the result cache (when ``cache_size > 0``).
        """
        return self._search(queries, k, enhance, "search", filter)

    def search_batch(
        self, queries: Any, k: int, *, enhance: bool | None = None, filter: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` for a 2-d batch: one faiss call and one enhancer call for all uncached rows."""
        if np.ndim(queries) != 2:
            raise bad_argument("queries", "a 2-d array (n, d)", f"shape {np.shape(queries)}")
        return self._search(queries, k, enhance, "search_batch", filter)

    def refine_queries(self, queries: Any, *, filter: dict[str, Any] | None = None) -> np.ndarray:
        """The queries (n, d) that an enhanced search sends to its second pass (needs an enhancer).

        Inspection and evaluation: ``search(q, k)`` returns the same as
        ``search(refine_queries(q), k, enhance=False)`` on a flat index, and on HNSW when
        ``merge_candidates`` is off (with it on, the first-pass candidates compete too); with
        a ``filter``, the first pass searched only the matching records.
        """
        flt = None if filter is None else compile_filter(filter)
        with self._lock:
            self._use_enhancer(True)
            return self._second_pass_inputs(self._check_vectors(queries, "queries"), self._match(flt))[0]

    def search_text(
        self, query: str, k: int, *, enhance: bool | None = None, filter: dict[str, Any] | None = None
    ) -> list[Hit]:
        """Encode ``query`` and return up to k hits (id, score, text, metadata), best first; ``filter`` as in search."""
        encoder = self._require_encoder("search_text")
        if not isinstance(query, str):
            raise bad_argument("query", "a str", type(query).__name__)
        if filter is not None:
            compile_filter(filter)  # a bad filter is refused before the encoder runs
        scores, ids = self.search(encoder.encode([query]), k, enhance=enhance, filter=filter)
        found = ids[0][ids[0] >= 0]
        with self._lock:
            info = self._db.fetch_text_meta(found)
        return [Hit(int(i), float(s), *reversed(info[int(i)])) for i, s in zip(found, scores[0]) if int(i) in info]

    def get(self, ids: Any) -> list[Record | None]:
        """The record of each id (vector, metadata, text), None where the id is not stored."""
        id_arr = as_ids(ids, "ids")
        with self._lock:
            rows = self._db.fetch_records(id_arr)
        return [None if r is None else Record(int(i), *r) for i, r in zip(id_arr, rows)]

    def vectors(self, ids: Any) -> np.ndarray:
        """Stored vectors (n, d) float32 of ``ids`` (normalised for "cosine"); HeadwiseError if one is absent."""
        id_arr = as_ids(ids, "ids")
        with self._lock:
            return self._db.fetch_vectors(id_arr, self.dim)

    def ids(self) -> np.ndarray:
        """Every stored id, ascending, (n,) int64."""
        with self._lock:
            _, id_arr = self._db.seq_ids()
        return np.sort(id_arr)

    def verify(self) -> VerifyReport:
        """Scan everything: SQLite's integrity check, each record's checksum, the index against SQLite.

        Returns a :class:`~headwise.memory.integrity.VerifyReport` (``report.ok``); see
        :mod:`headwise.memory.integrity`. A reader verifies its snapshot.
        """
        with self._lock:
            return verify_store(self._db, self._index)

    def footprint(self) -> dict[str, Any]:
        """Bytes per stored vector, from faiss's accounting and the files (see :mod:`headwise.memory.footprint`)."""
        from headwise.memory.footprint import measure

        with self._lock:
            return measure(self._index, self._db, self.path)

    # ------------------------------------------------------------------ validation
    def _check_vectors(self, vectors: Any, name: str) -> np.ndarray:
        return check_vectors(vectors, name, self.dim, self.metric)

    def _check_new_ids(self, ids: Any, n: int) -> np.ndarray:
        if ids is None:
            return self._db.next_ids(n)
        id_arr = ids_for_rows(ids, n)
        taken = self._db.existing(id_arr)
        if len(taken):
            raise bad_argument("ids", "ids not yet in the memory", f"already stored: {sorted(taken.tolist())[:10]}")
        return id_arr

    def _require_encoder(self, what: str) -> TextEncoder:
        if self.encoder is None:
            raise HeadwiseError(f"{what}: expected a VectorMemory with an encoder (encoder=...), got none")
        return self.encoder
