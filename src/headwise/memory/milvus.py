""":class:`MilvusMemory`: the :class:`~headwise.memory.store.VectorMemory` API on a Milvus collection.

The same code reaches milvus-lite (a local directory whose name ends in ``.db``; milvus-lite runs
a server on a thread of this process) and a Milvus standalone or cluster
(``http://host:19530``): pymilvus's ``MilvusClient`` speaks gRPC to both. The collection's
schema and properties are described in :mod:`headwise.memory.milvus_collection`.

Semantics are those of the embedded store; where Milvus differs, the client makes up for it:

- **Duplicate ids are refused** (a HeadwiseError naming them), within a call and against the
  collection: Milvus itself overwrites an existing primary key (milvus-lite) or keeps both (a
  cluster does not check keys). The check is a query before the insert, so two *concurrent*
  writers of the same new id can still race; ``ids=None`` numbers records from the collection
  property ``headwise.next_id``, above every id ever added through headwise, reserved
  before the insert.
- **Padding**: where fewer than k records exist, ids are -1 and scores -inf, as in faiss.
- **Scores are "higher is better"** for every metric: cosine similarity (stored vectors and
  queries L2-normalised here, as the embedded store does), inner product, or the *negative*
  squared L2 distance (Milvus returns the distance).
- **Read-after-write**: the collection is created with ``consistency_level="Strong"`` and every
  search, query and get asks for Strong, so a search sees every acknowledged write.
- **Errors**: a connection, schema or server failure is a HeadwiseError naming the operation,
  the uri and Milvus's message; bad arguments are refused, as by VectorMemory, before
  anything is sent.

Enhanced search (:mod:`headwise.memory.milvus_search`) runs the embedded store's steps
(:mod:`headwise.memory.passes`): the first pass asks Milvus for the top-K *with their vectors*
(``output_fields=["vector"]``), the enhancer refines the queries locally, the second pass
searches Milvus again; on an approximate index (HNSW, autoindex) the first pass's candidates,
scored against the refined query, are merged into the result (``merge_candidates``).

Not here: metadata filters (``filter=`` is refused), the result cache, feedback pairs,
``save``/``open``/``verify`` (Milvus persists on its own). An ``add`` of more rows than one
insert carries is several inserts: a failure between them leaves the earlier ones stored.

Shapes: n vectors or queries of d = ``dim``, k results, K candidates -> scores (n, k) float32,
ids (n, k) int64; the enhancer sees queries (n, d), candidate vectors (n, K, d), scores (n, K).

Example (a new collection in a temporary milvus-lite directory; not run by the doctests)::

    import tempfile, numpy as np
    from headwise.memory import MilvusMemory
    with MilvusMemory(tempfile.mkdtemp() + "/mem.db", "docs", dim=3, metric="l2") as mem:
        mem.add(np.eye(3, dtype=np.float32), metadata=[{"axis": a} for a in "xyz"])  # ids [0, 1, 2]
        scores, ids = mem.search(np.array([[0.9, 0.1, 0.0]]), k=4)
        # ids [[0, 1, 2, -1]], scores [[-0.02, -1.62, -1.82, -inf]]: as VectorMemory's

Arguments are checked before anything connects:

    >>> MilvusMemory("mem", "docs", dim=3)
    Traceback (most recent call last):
    ...
    headwise.errors.HeadwiseError: uri: expected http(s)://host:port or a milvus-lite directory named *.db, got 'mem'
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headwise.errors import HeadwiseError, bad_argument
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
from headwise.memory.metrics import MetricsCollector
from headwise.memory.milvus_collection import (
    INDEX_TYPES,
    LITE_SERVERS,
    METRICS,
    NEXT_ID_PROPERTY,
    STRONG,
    VARCHAR_MAX,
    CollectionConfig,
    check_collection_name,
    check_uri,
    connect,
    create_collection,
    is_local,
    milvus_errors,
    parse_location,
    quiet_iterator,
    read_config,
)
from headwise.memory.milvus_search import MilvusSearch
from headwise.memory.records import Record

#: Ids per query or get request (a Milvus expression ``id in [...]`` of this many ids).
IDS_PER_REQUEST = 1000
#: Rough bytes of rows per insert request (gRPC messages are limited; pymilvus's default is 64 MiB).
INSERT_BYTES = 8 << 20


class MilvusMemory(MilvusSearch):
    """A vector memory on Milvus collection ``collection`` at ``uri`` (see the module docstring).

    Opens the collection when it exists (checking its schema; arguments given must match it)
    and creates it otherwise.

    Args:
        uri: ``PATH.db`` (a milvus-lite directory, started in this process) or
            ``http://host:19530`` / ``https://...`` (a Milvus standalone or cluster).
        collection: the collection's name (letters, digits, _).
        dim: vector dimension d; None opens an existing collection with its own.
        metric: "cosine" (default for a new collection), "ip" or "l2"; None: the collection's.
        index: "flat" (exact, default), "hnsw", "hnsw-fp16" (Milvus HNSW_SQ, FP16) or
            "autoindex" (the server chooses); None: the collection's.
        hnsw_m, ef_construction: HNSW graph degree and build beam (defaults 32, 200).
        ef_search: HNSW search beam (default 64, or as saved); a setting of this client.
        encoder: a :class:`~headwise.memory.encoder.TextEncoder` for ``add_texts`` / ``search_text``.
        token: Milvus credentials (``"user:password"`` or an API key); "" for none.
        timeout: seconds per Milvus call.
    """

    def __init__(
        self,
        uri: str | Path,
        collection: str,
        dim: int | None = None,
        *,
        metric: str | None = None,
        index: str | None = None,
        hnsw_m: int | None = None,
        ef_construction: int | None = None,
        ef_search: int | None = None,
        encoder: TextEncoder | None = None,
        token: str = "",
        timeout: float = 30.0,
    ) -> None:
        uri = check_uri(uri)
        check_collection_name(collection)
        asked = {"dim": dim, "hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
        for name, value in asked.items():
            if value is not None:
                check_positive_int(name, value, minimum=2 if name == "hnsw_m" else 1)
        if metric is not None and metric not in METRICS:
            raise bad_argument("metric", f"one of {tuple(METRICS)}", repr(metric))
        if index is not None and index not in INDEX_TYPES:
            raise bad_argument("index", f"one of {tuple(INDEX_TYPES)}", repr(index))
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
            raise bad_argument("timeout", "a number of seconds > 0", repr(timeout))
        self.uri, self.collection = uri, collection
        self._closed = True
        self._client = connect(uri, token, float(timeout))
        if is_local(uri):
            LITE_SERVERS.acquire(uri)
        self._closed = False
        try:
            self._config = self._open_or_create(dim, metric, index, hnsw_m, ef_construction)
            if ef_search is not None:
                self._config.ef_search = int(ef_search)
            enc_dim = getattr(encoder, "dim", None)
            if encoder is not None and (enc_dim != self.dim or not callable(getattr(encoder, "encode", None))):
                raise bad_argument("encoder", f"a TextEncoder with dim {self.dim}", f"dim {enc_dim}")
        except BaseException:
            self.close()
            raise
        self.encoder = encoder
        self.enhancer: Any = None
        self.metrics = MetricsCollector()
        self._lock = threading.RLock()
        self._candidate_ef: int | None = None
        self._merge_candidates = True

    @classmethod
    def from_location(cls, location: str, dim: int | None = None, **kwargs: Any) -> MilvusMemory:
        """Open or create the collection of ``milvus://HOST:PORT/COLLECTION`` or ``milvus://PATH.db/COLLECTION``."""
        uri, collection = parse_location(location)
        return cls(uri, collection, dim, **kwargs)

    def _open_or_create(
        self, dim: int | None, metric: str | None, index: str | None, hnsw_m: int | None, ef_construction: int | None
    ) -> CollectionConfig:
        with milvus_errors("has_collection", self.uri):
            exists = self._client.has_collection(self.collection)
        if not exists:
            if dim is None:
                want = f"an int >= 1 to create collection {self.collection!r} (it does not exist at {self.uri})"
                raise bad_argument("dim", want, None)
            config = CollectionConfig(
                dim, metric or "cosine", INDEX_TYPES[index or "flat"], hnsw_m or 32, ef_construction or 200
            )
            create_collection(self._client, self.collection, config, self.uri)
            return config
        config = read_config(self._client, self.collection, self.uri)
        held = {"dim": config.dim, "metric": config.metric, "index": config.index_kind, "hnsw_m": config.hnsw_m,
                "ef_construction": config.ef_construction}  # fmt: skip
        asked = {"dim": dim, "metric": metric, "index": index, "hnsw_m": hnsw_m, "ef_construction": ef_construction}
        for name, value in asked.items():
            if value is not None and value != held[name]:
                want = f"{held[name]!r}, as collection {self.collection!r} holds (or None)"
                raise bad_argument(name, want, repr(value))
        return config

    # ------------------------------------------------------------------ configuration
    @property
    def dim(self) -> int:
        return self._config.dim

    @property
    def metric(self) -> str:
        return self._config.metric

    @property
    def index_kind(self) -> str:
        """The index kind: "flat", "hnsw", "hnsw-fp16", "autoindex", or another Milvus index type lower-cased."""
        return self._config.index_kind

    @property
    def ef_search(self) -> int:
        """HNSW search beam width of this client (Milvus uses at least k); ignored by exact indexes."""
        return self._config.ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        check_positive_int("ef_search", value)
        self._config.ef_search = int(value)

    def config(self) -> dict[str, Any]:
        """dim, metric, index, hnsw_m, ef_construction, ef_search (what ``VectorMemory(...)`` takes)."""
        c = self._config
        return {"dim": c.dim, "metric": c.metric, "index": c.index_kind, "hnsw_m": c.hnsw_m,
                "ef_construction": c.ef_construction, "ef_search": c.ef_search}  # fmt: skip

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the connection; the last MilvusMemory of a milvus-lite directory stops its server. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._client.close()
        finally:
            if is_local(self.uri):
                LITE_SERVERS.release(self.uri)

    def __enter__(self) -> MilvusMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"index={self.index_kind!r}"
        return f"MilvusMemory({self.uri!r}, {self.collection!r}, dim={self.dim}, metric={self.metric!r}, {state})"

    def _milvus(self, what: str) -> Any:
        """The pymilvus client, or a HeadwiseError when this memory was closed."""
        if self._closed:
            raise HeadwiseError(f"{what}: expected an open MilvusMemory, got one that was closed")
        return self._client

    def __len__(self) -> int:
        client = self._milvus("len")
        with milvus_errors("count", self.uri):
            rows = client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level=STRONG)
        return int(rows[0]["count(*)"])

    # ------------------------------------------------------------------ writes
    def add(
        self,
        vectors: Any,
        ids: Any = None,
        metadata: Sequence[Any] | None = None,
        texts: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """Add vectors (n, d) (or one (d,)) and return their ids (n,) int64.

        ``ids``: non-negative ints not yet stored (None: the next automatic ids). ``metadata``:
        one JSON value (or None) per vector, at most 65,535 bytes of JSON each; ``texts``: one
        str (or None) per vector, at most 65,535 UTF-8 bytes. Raises HeadwiseError, before
        anything is sent, on bad input or an id already stored.
        """
        return self._write("add", vectors, ids, metadata, texts)

    def upsert(
        self,
        vectors: Any,
        ids: Any,
        metadata: Sequence[Any] | None = None,
        texts: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """Insert each id, or replace its record (vector, metadata and text); returns the ids (n,) int64."""
        if ids is None:
            raise bad_argument("ids", "one id per vector (upsert replaces records by id)", None)
        return self._write("upsert", vectors, ids, metadata, texts)

    def _write(self, op: str, vectors: Any, ids: Any, metadata: Any, texts: Any) -> np.ndarray:
        client = self._milvus(op)
        with self._lock:
            start = time.perf_counter()
            x = self._check_vectors(vectors, "vectors")
            n = len(x)
            id_arr = ids_for_rows(ids, n) if ids is not None else None
            meta = check_metadata(metadata, n)
            txt = check_texts(texts, n)
            for name, values in (("metadata", meta), ("texts", txt)):
                for i, value in enumerate(values):
                    if value is not None and len(value) > VARCHAR_MAX // 4 and len(value.encode()) > VARCHAR_MAX:
                        want = f"at most {VARCHAR_MAX:,} UTF-8 bytes (Milvus VARCHAR)"
                        raise bad_argument(f"{name}[{i}]", want, f"{len(value.encode()):,} bytes")
            if n == 0:
                return np.empty(0, dtype=np.int64)
            if id_arr is None:
                id_arr = self._reserve(n)
            elif op == "add":
                taken = self._existing(id_arr)
                if len(taken):
                    got = f"already stored: {sorted(taken.tolist())[:10]}"
                    raise bad_argument("ids", "ids not yet in the memory", got)
                self._reserve_above(int(id_arr.max()))
            else:
                self._reserve_above(int(id_arr.max()))
            rows = [
                {"id": int(i), "vector": v, "metadata": m, "text": t}
                for i, v, m, t in zip(id_arr.tolist(), x, meta, txt)
            ]
            write = client.insert if op == "add" else client.upsert
            with milvus_errors(op, self.uri):
                for lo, hi in _chunks(rows, 4 * self.dim + 64, INSERT_BYTES):
                    write(self.collection, rows[lo:hi])
            self.metrics.record(op, time.perf_counter() - start, n)
            return id_arr

    def add_texts(self, texts: Sequence[str], metadata: Sequence[Any] | None = None, ids: Any = None) -> np.ndarray:
        """Encode ``texts`` with the encoder and add them (the texts are stored too)."""
        vectors, texts = encode_texts(self._require_encoder("add_texts"), texts, self.dim)
        return self.add(vectors, ids=ids, metadata=metadata, texts=texts)

    def delete(self, ids: Any) -> int:
        """Delete the records of ``ids`` (absent ids are ignored); returns how many were deleted."""
        client = self._milvus("delete")
        id_arr = np.unique(as_ids(ids, "ids"))
        with self._lock:
            found = self._existing(id_arr)
            with milvus_errors("delete", self.uri):
                for lo in range(0, len(found), IDS_PER_REQUEST):
                    client.delete(self.collection, ids=found[lo : lo + IDS_PER_REQUEST].tolist())
            return len(found)

    def _reserve(self, n: int) -> np.ndarray:
        """``n`` fresh ids from ``headwise.next_id``, reserved in the collection before they are used."""
        with milvus_errors("next_id", self.uri):
            props = self._client.describe_collection(self.collection).get("properties") or {}
        start = max(self._config.next_id, int(props.get(NEXT_ID_PROPERTY, 0)))
        if start + n > 2**63 - 1:
            raise HeadwiseError(f"ids: expected {n} free automatic ids, got {2**63 - 1 - start} left below 2**63 - 1")
        id_arr = np.arange(start, start + n, dtype=np.int64)
        taken = self._existing(id_arr)  # ids added by a client that does not keep headwise.next_id
        if len(taken):
            want = "automatic ids above every stored id (the collection holds ids that headwise did not number)"
            raise bad_argument("ids", want, f"already stored: {sorted(taken.tolist())[:10]}; pass explicit ids")
        self._reserve_above(start + n - 1)
        return id_arr

    def _reserve_above(self, largest: int) -> None:
        """Move ``headwise.next_id`` above ``largest`` (before the insert: a failed insert leaves a gap)."""
        if largest + 1 <= self._config.next_id:
            return
        self._config.next_id = largest + 1
        with milvus_errors("next_id", self.uri):
            self._client.alter_collection_properties(self.collection, {NEXT_ID_PROPERTY: str(largest + 1)})

    # ------------------------------------------------------------------ reads
    def get(self, ids: Any) -> list[Record | None]:
        """The record of each id (vector, metadata, text), None where the id is not stored."""
        id_arr = as_ids(ids, "ids")
        rows = self._fetch(np.unique(id_arr), ["id", "vector", "metadata", "text"])
        out: list[Record | None] = []
        for i in id_arr.tolist():
            row = rows.get(i)
            if row is None:
                out.append(None)
                continue
            try:
                meta = None if row.get("metadata") is None else json.loads(row["metadata"])
            except json.JSONDecodeError as exc:  # written by another program
                raise bad_argument(f"id {i}: metadata", "JSON text (as headwise writes it)", exc.msg) from None
            out.append(Record(i, np.asarray(row["vector"], dtype=np.float32), meta, row.get("text")))
        return out

    def vectors(self, ids: Any) -> np.ndarray:
        """Stored vectors (n, d) float32 of ``ids`` (normalised for "cosine"); HeadwiseError if one is absent."""
        id_arr = as_ids(ids, "ids")
        rows = self._fetch(np.unique(id_arr), ["id", "vector"])
        missing = [i for i in id_arr.tolist() if i not in rows]
        if missing:
            raise HeadwiseError(f"ids: expected stored ids, got {len(missing)} absent: {missing[:10]}")
        if not len(id_arr):
            return np.empty((0, self.dim), dtype=np.float32)
        return np.asarray([rows[i]["vector"] for i in id_arr.tolist()], dtype=np.float32)

    def ids(self) -> np.ndarray:
        """Every stored id, ascending, (n,) int64 (a scan of the collection's ids)."""
        client = self._milvus("ids")
        found: list[int] = []
        with milvus_errors("ids", self.uri), quiet_iterator():
            it = client.query_iterator(
                self.collection, batch_size=4096, filter="", output_fields=["id"], consistency_level=STRONG
            )
            try:
                while batch := it.next():
                    found += [row["id"] for row in batch]
            finally:
                it.close()
        return np.sort(np.asarray(found, dtype=np.int64))

    # ------------------------------------------------------------------ internals
    def _check_vectors(self, vectors: Any, name: str) -> np.ndarray:
        return check_vectors(vectors, name, self.dim, self.metric)

    def _require_encoder(self, what: str) -> TextEncoder:
        if self.encoder is None:
            raise HeadwiseError(f"{what}: expected a MilvusMemory with an encoder (encoder=...), got none")
        return self.encoder

    def _fetch(self, ids: np.ndarray, fields: list[str]) -> dict[int, dict[str, Any]]:
        """Rows of the stored ``ids`` (unique) by id, with ``fields``."""
        client = self._milvus("get")
        out: dict[int, dict[str, Any]] = {}
        with milvus_errors("get", self.uri):
            for lo in range(0, len(ids), IDS_PER_REQUEST):
                chunk = ids[lo : lo + IDS_PER_REQUEST].tolist()
                for row in client.get(self.collection, ids=chunk, output_fields=fields, consistency_level=STRONG):
                    out[int(row["id"])] = row
        return out

    def _existing(self, ids: np.ndarray) -> np.ndarray:
        """The subset of ``ids`` that are stored, (m,) int64."""
        return np.asarray(sorted(self._fetch(np.unique(ids), ["id"])), dtype=np.int64)


def _chunks(rows: list[dict[str, Any]], fixed: int, budget: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of ``rows`` of about ``budget`` bytes each (``fixed`` per row plus its strings)."""
    out, lo, size = [], 0, 0
    for i, row in enumerate(rows):
        size += fixed + len(row["metadata"] or "") + len(row["text"] or "")
        if size > budget and i > lo:
            out.append((lo, i))
            lo, size = i, fixed + len(row["metadata"] or "") + len(row["text"] or "")
    out.append((lo, len(rows)))
    return out
