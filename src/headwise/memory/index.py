"""The faiss side of a vector memory: an exact or HNSW index over slots, with tombstones.

faiss numbers the vectors of ``IndexFlat*`` and ``IndexHNSWFlat`` 0, 1, 2, ... in the order
they were added: that number is a *slot*. This module keeps, per slot, the record's ``seq``
(the never-reused insertion number from SQLite) and its user id, plus a ``live`` flag.

Delete: ``IndexHNSWFlat`` has no ``remove_ids``, and removing from an ``IndexFlat`` shifts
every later slot. Both kinds therefore mark deleted slots as tombstones and search with a
faiss ``IDSelectorBitmap`` of the live slots, so a deleted id is never returned, the flat
search stays exact, and HNSW still walks through deleted nodes (the graph keeps its links).
:meth:`SlotIndex.compact` rebuilds the index from the live slots; the store calls it when
tombstones pass a fraction of the slots and on ``save``.

``"hnsw-fp16"`` is the same HNSW graph over vectors stored in IEEE half precision (faiss
``IndexHNSWSQ`` with ``QT_fp16``): half the bytes per vector, so a search, which is bound by
fetching the vectors of the nodes it visits, is faster at the same recall on MiniLM
embeddings (``headwise memory bench`` times both; benchmarks/results/memory_latency.md).
Its scores are computed against the rounded vectors (relative error about 2^-11 per
component); the exact vectors stay in SQLite.

Scores are "higher is better" for every metric: cosine similarity, inner product, or the
*negative squared* L2 distance; padding is id -1 with score -inf.

Shapes: n queries, d dims, k results -> scores (n, k) float32, ids (n, k) int64.

Example:
    >>> import numpy as np
    >>> idx = SlotIndex(2, "l2", "flat")
    >>> idx.add(np.array([0, 1]), np.array([10, 11]), np.array([[0, 0], [3, 4]], dtype=np.float32))
    >>> idx.remove_seqs(np.array([0]))
    >>> scores, ids, _ = idx.search(np.zeros((1, 2), dtype=np.float32), 2)
    >>> ids.tolist(), scores.tolist()
    ([[11, -1]], [[-25.0, -inf]])
"""

from __future__ import annotations

import threading

import faiss
import numpy as np
import torch

from headwise.errors import HeadwiseError
from headwise.memory.passes import merge_top

METRICS = ("cosine", "ip", "l2")
INDEX_KINDS = ("flat", "hnsw", "hnsw-fp16")
#: Largest workspace that ``SlotIndex.reconstruct(..., reuse=True)`` keeps between calls
#: (1,000 queries x 32 candidates x 384 dims is 47 MiB).
WORKSPACE_BYTES = 64 << 20
_WIDEN_BLOCK = 8192  # rows widened from half precision per step (6 MB of codes at d = 384)
_NUMPY_MAX_ROWS = 256  # reconstruct() gathers up to this many rows with numpy, more with torch on both cores


class _Growable:
    """An int64 array with amortised O(1) append (adds one at a time must not be quadratic)."""

    def __init__(self, values: np.ndarray | None = None, dtype: type = np.int64) -> None:
        data = np.asarray(values if values is not None else [], dtype=dtype)
        self._buf = data.copy() if len(data) else np.empty(16, dtype=dtype)
        self._n = len(data)

    def extend(self, values: np.ndarray) -> None:
        need = self._n + len(values)
        if need > len(self._buf):
            grown = np.empty(max(need, 2 * len(self._buf)), dtype=self._buf.dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = values
        self._n = need

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self._n]

    def __len__(self) -> int:
        return self._n


class SlotIndex:
    """A faiss index plus per-slot (seq, id, live); see the module docstring."""

    def __init__(
        self,
        dim: int,
        metric: str,
        kind: str,
        *,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 64,
        index: faiss.Index | None = None,
        slot_seq: np.ndarray | None = None,
    ) -> None:
        self.dim, self.metric, self.kind = dim, metric, kind
        self.hnsw_m, self.ef_construction = hnsw_m, ef_construction
        self._ef_search = ef_search
        self.is_hnsw = kind != "flat"
        self.index = index if index is not None else self._new_index()
        if self.is_hnsw:
            self.index.hnsw.efSearch = ef_search
        seqs = slot_seq if slot_seq is not None else np.empty(0, dtype=np.int64)
        if len(seqs) != self.index.ntotal:
            raise HeadwiseError(f"index: expected {self.index.ntotal} slot numbers, got {len(seqs)}")
        self._seq = _Growable(seqs)
        self._id = _Growable(np.full(len(seqs), -1, dtype=np.int64))
        self._live = _Growable(np.zeros(len(seqs), dtype=bool), dtype=bool)
        self._n_live = 0
        self._params: dict[int, faiss.SearchParameters] | None = None
        #: Bumped by every change of the slots (add, tombstone, compact, reconcile), so that a
        #: filter's matching slots cached for one version are never used with another.
        self.version = 0
        self._bitmap: np.ndarray | None = None  # kept alive while faiss holds a pointer into it
        self._selector: faiss.IDSelector | None = None
        self._params_guard = threading.Lock()
        self._workspace = threading.local()  # one per thread (concurrent searches): see reconstruct(reuse=True)
        self._stored_view: np.ndarray | None = None  # see _stored()

    def _new_index(self) -> faiss.Index:
        faiss_metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            return faiss.IndexFlatL2(self.dim) if self.metric == "l2" else faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw-fp16":
            index = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_fp16, self.hnsw_m, faiss_metric)
        else:
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss_metric)
        index.hnsw.efConstruction = self.ef_construction
        return index

    # ------------------------------------------------------------------ state
    @property
    def n_slots(self) -> int:
        return len(self._seq)  # == index.ntotal (asking faiss through SWIG costs µs per search)

    @property
    def n_live(self) -> int:
        return self._n_live

    @property
    def slot_seq(self) -> np.ndarray:
        return self._seq.view

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = int(value)
        if self.is_hnsw:
            self.index.hnsw.efSearch = self._ef_search
        self._params = None

    def set_live(self, seqs: np.ndarray, ids: np.ndarray) -> None:
        """Mark the slots whose seq is in ``seqs`` (sorted) live with the matching ``ids``; the others dead."""
        slot_seq = self._seq.view
        pos = np.searchsorted(seqs, slot_seq)
        pos_c = np.minimum(pos, max(len(seqs) - 1, 0))
        live = (pos < len(seqs)) & (seqs[pos_c] == slot_seq) if len(seqs) else np.zeros(len(slot_seq), dtype=bool)
        self._live.view[:] = live
        self._id.view[:] = np.where(live, ids[pos_c] if len(ids) else -1, -1)
        self._n_live = int(live.sum())
        self._params = None
        self.version += 1

    # ------------------------------------------------------------------ writes
    def add(self, seqs: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Append ``vectors`` (n, d) float32 (already normalised for cosine) as live slots."""
        if len(vectors) == 0:
            return
        self._stored_view = None  # faiss may move its storage
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self._seq.extend(seqs)
        self._id.extend(ids)
        self._live.extend(np.ones(len(seqs), dtype=bool))
        self._n_live += len(seqs)
        self._params = None
        self.version += 1

    def remove_seqs(self, seqs: np.ndarray) -> None:
        """Tombstone the slots of ``seqs`` (unknown seqs are ignored)."""
        hit = np.isin(self._seq.view, seqs) & self._live.view
        self._live.view[hit] = False
        self._id.view[hit] = -1
        self._n_live -= int(hit.sum())
        self._params = None
        self.version += 1

    def compact(self) -> None:
        """Rebuild the index from the live slots only (drops tombstones; rebuilds the HNSW graph)."""
        live_slots = np.flatnonzero(self._live.view)
        vectors = self.reconstruct(live_slots)
        seqs, ids = self._seq.view[live_slots].copy(), self._id.view[live_slots].copy()
        self.index = self._new_index()
        self._stored_view = None  # it points into the old index's storage (add() skips an empty batch)
        if self.is_hnsw:
            self.index.hnsw.efSearch = self._ef_search
        self._seq, self._id = _Growable(), _Growable()
        self._live = _Growable(dtype=bool)
        self._n_live = 0
        self.version += 1  # add() skips an empty batch
        self.add(seqs, ids, vectors)

    # ------------------------------------------------------------------ reads
    def reconstruct(self, slots: np.ndarray, *, reuse: bool = False) -> np.ndarray:
        """Stored vectors ``slots.shape + (d,)`` float32 of ``slots`` (any shape, each in [0, n_slots)).

        Gathered from a view of faiss's storage (:meth:`_stored`), one vectorised gather
        instead of faiss's ``reconstruct_batch`` (a virtual call and copy per vector): with
        numpy for up to ``_NUMPY_MAX_ROWS`` rows (one query's candidates), with torch on both
        cores for more (a batch's (n, K) candidates); "hnsw-fp16" widens its half-precision
        codes, block by block in torch.

        ``reuse``: write into a workspace that this index keeps per thread (up to ``WORKSPACE_BYTES``)
        and overwrites on the thread's next ``reuse`` call, instead of a new array: a fresh array
        of tens of MB costs page faults on every batch. The caller must be done with it by then.
        """
        slots = np.asarray(slots, dtype=np.int64)
        shape = (*slots.shape, self.dim)
        if slots.size == 0:
            return np.empty(shape, dtype=np.float32)
        if slots.min() < 0 or slots.max() >= self.n_slots:
            raise HeadwiseError(f"index: expected slots in [0, {self.n_slots}), got {slots.min()}..{slots.max()}")
        size = slots.size * self.dim
        if reuse and size * 4 <= WORKSPACE_BYTES:
            mine = getattr(self._workspace, "array", None)
            if mine is None or mine.size < size:
                mine = self._workspace.array = np.empty(size, dtype=np.float32)
            out = mine[:size].reshape(shape)
        else:
            out = np.empty(shape, dtype=np.float32)
        stored = self._stored()
        flat_slots = slots.reshape(-1)
        flat_out = out.reshape(-1, self.dim)
        if len(flat_slots) <= _NUMPY_MAX_ROWS:  # one query's candidates: numpy costs a few µs where torch costs tens
            if self.kind == "hnsw-fp16":  # numpy widens half precision one scalar at a time, torch's copy with F16C
                torch.from_numpy(flat_out).copy_(torch.from_numpy(stored[flat_slots]))
            else:
                flat_out[...] = stored[flat_slots]
            return out
        rows, stored_t, out_t = torch.from_numpy(flat_slots), torch.from_numpy(stored), torch.from_numpy(flat_out)
        if self.kind == "hnsw-fp16":  # small half-precision temporaries
            for lo in range(0, len(rows), _WIDEN_BLOCK):
                out_t[lo : lo + _WIDEN_BLOCK].copy_(stored_t.index_select(0, rows[lo : lo + _WIDEN_BLOCK]))
        else:
            torch.index_select(stored_t, 0, rows, out=out_t)
        return out

    def _stored(self) -> np.ndarray:
        """A view (n_slots, d) of the vectors faiss stores: float32, or float16 for "hnsw-fp16".

        Kept between calls (making it costs several swig calls, a tenth of a small gather) and
        dropped where the storage can move: :meth:`add` (faiss reallocates) and :meth:`compact`
        (a new index). The length check also catches a caller that added through ``self.index``.
        """
        if self._stored_view is None or len(self._stored_view) != self.n_slots:
            if self.kind == "hnsw-fp16":  # the codes are the vectors in IEEE half precision
                sq = faiss.downcast_index(self.index.storage)
                codes = faiss.rev_swig_ptr(sq.codes.data(), self.n_slots * sq.code_size)
                self._stored_view = codes.view(np.float16).reshape(self.n_slots, self.dim)
            else:
                flat = self.index if self.kind == "flat" else faiss.downcast_index(self.index.storage)
                xb = faiss.rev_swig_ptr(flat.get_xb(), self.n_slots * self.dim)
                self._stored_view = xb.reshape(self.n_slots, self.dim)
        return self._stored_view

    def _search_params(self, ef: int | None) -> faiss.SearchParameters | None:
        """faiss parameters for a search with ``ef`` (None: the index's ef_search), cached per ef."""
        ef = self._ef_search if ef is None or not self.is_hnsw else ef
        tombstones = self._n_live != self.n_slots
        if not tombstones and ef == self._ef_search:
            return None  # no filter, and HNSW uses index.hnsw.efSearch
        # Concurrent searches (shared lock) build this together: one builds, the others wait, so
        # none sees a params dict without its selector (it would return deleted slots).
        with self._params_guard:
            if self._params is None:
                if tombstones:
                    self._bitmap = np.packbits(self._live.view, bitorder="little")
                    self._selector = faiss.IDSelectorBitmap(self.n_slots, faiss.swig_ptr(self._bitmap))
                else:
                    self._bitmap = self._selector = None
                self._params = {}
            params = self._params.get(ef)
            if params is None:
                # A params object replaces index.hnsw.efSearch, so it carries the ef; it holds a raw
                # pointer to the selector, which self._selector keeps alive.
                extra = {"sel": self._selector} if self._selector is not None else {}
                if self.is_hnsw:
                    params = faiss.SearchParametersHNSW(efSearch=ef, **extra)
                else:
                    params = faiss.SearchParameters(**extra)
                self._params[ef] = params
            return params

    def search(
        self, queries: np.ndarray, k: int, *, ef: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k of ``queries`` (n, d): scores (n, k) float32, ids (n, k) int64, slots (n, k) int64.

        ``ef``: the HNSW search breadth for this call (None: ``ef_search``; faiss uses at least k).
        """
        n = len(queries)
        if self._n_live == 0 or n == 0:
            return (
                np.full((n, k), -np.inf, dtype=np.float32),
                np.full((n, k), -1, dtype=np.int64),
                np.full((n, k), -1, dtype=np.int64),
            )
        D, slots = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=self._search_params(ef))
        return self._with_ids(-D if self.metric == "l2" else D, slots)

    def _with_ids(self, scores: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, ids, slots) (n, k) of a result, with score -inf and id -1 where the slot is -1."""
        if slots.min() >= 0:  # the common case: k results in every row
            return scores, self._id.view[slots], slots
        missing = slots < 0
        scores[missing] = -np.inf
        ids = np.where(missing, -1, self._id.view[np.where(missing, 0, slots)])
        return scores, ids, slots

    def merge(
        self,
        queries: np.ndarray,
        found: tuple[np.ndarray, np.ndarray, np.ndarray],
        extra_slots: np.ndarray,
        extra_vectors: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The top-k of a search's result ``found`` and further live slots, scored against ``queries``.

        An approximate search can miss a neighbour that another search already found. Here
        ``extra_slots`` (n, m) are such slots with their stored vectors ``extra_vectors`` (n, m, d)
        (from :meth:`reconstruct`, so scored like the index scores them, up to rounding of the sum);
        a slot found twice counts once. ``found``: (scores, ids, slots) (n, k) from :meth:`search`.
        Returns (scores, ids, slots) (n, k), best first, -inf / -1 padded.
        """
        scores, _, slots = found
        return self._with_ids(*merge_top(self.metric, queries, scores, slots, extra_slots, extra_vectors, k))

    def memory_bytes(self) -> int:
        """Bytes faiss holds for this index: vector codes, plus the HNSW graph (neighbours, levels, offsets)."""
        index = self.index
        if self.kind == "flat":
            return int(index.ntotal * index.code_size)
        hnsw = index.hnsw
        graph = hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8
        storage = faiss.downcast_index(index.storage)
        return int(storage.ntotal * storage.code_size + graph)

    # ------------------------------------------------------------------ files
    def serialize(self) -> tuple[bytes, bytes]:
        """(faiss index bytes, slot seq bytes as .npy) for the store's checksummed files."""
        import io

        buf = io.BytesIO()
        np.save(buf, self._seq.view, allow_pickle=False)
        return faiss.serialize_index(self.index).tobytes(), buf.getvalue()

    @classmethod
    def deserialize(
        cls, index_bytes: bytes, seq_bytes: bytes, dim: int, metric: str, kind: str, **hnsw: int
    ) -> SlotIndex:
        """Inverse of :meth:`serialize`, checking that the index has the store's type, dim and metric."""
        import io

        index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
        expected = {
            "flat": faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP,
            "hnsw": faiss.IndexHNSWFlat,
            "hnsw-fp16": faiss.IndexHNSWSQ,
        }[kind]
        faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        ok = isinstance(index, expected) and index.d == dim and index.metric_type == faiss_metric
        if ok and kind == "hnsw-fp16":  # a scalar quantizer other than half precision is foreign
            sq = faiss.downcast_index(index.storage)
            ok = isinstance(sq, faiss.IndexScalarQuantizer) and sq.sq.qtype == faiss.ScalarQuantizer.QT_fp16
        if not ok:
            raise HeadwiseError(
                f"index file: expected {expected.__name__} ({kind}) of dim {dim} ({metric}), "
                f"got {type(index).__name__} of dim {index.d} (metric {index.metric_type})"
            )
        seqs = np.load(io.BytesIO(seq_bytes), allow_pickle=False)
        if seqs.dtype != np.int64 or seqs.ndim != 1:
            raise HeadwiseError(f"slot file: expected a 1-d int64 array, got {seqs.dtype} {seqs.shape}")
        return cls(dim, metric, kind, index=index, slot_seq=seqs, **hnsw)
