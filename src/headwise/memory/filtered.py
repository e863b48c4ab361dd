"""Filtered search over a :class:`~headwise.memory.index.SlotIndex`: the top-k among the records a filter matches.

A filter (:mod:`headwise.memory.filters`) is evaluated by SQLite to the ``seq`` numbers of the
matching records; :class:`MatchSet` turns them into the index's slots, a bitmap and a faiss
``IDSelectorBitmap`` (the tombstones, which no record matches, drop out with the rest).

- **flat**, and **HNSW** with few matches (``m <= exact_max``, see :func:`exact_limit`; the
  graph would visit about ``n / m`` nodes per match it finds): exact search, one of two ways.
  The matching vectors gathered from faiss's storage (in blocks of ``EXACT_BLOCK_BYTES``) and
  scored by ``faiss.knn``, a matrix product for a batch; or, when that gather would cost more
  than scanning the bitmap (``m * d > GATHER_RATIO * n * queries``: one query, many
  matches), faiss's flat storage searched with the selector (``SearchParameters(sel=...)``),
  which skips the other slots but scores one query at a time. Either way the scores are those
  of an unfiltered search (on "hnsw-fp16", of its codes).
- **HNSW** with many matches: the graph search with the selector and a beam widened to
  ``ef / s`` (``s = m / slots``, the fraction of nodes that can enter the result): faiss
  filters only the result, its beam holds matching and other nodes alike and it stops once
  ``ef`` of them are nearer than its next candidate, so an unwidened beam finds about
  ``ef * s`` matches. A row that still comes back with fewer than ``min(k, m)`` results is
  searched exactly.

So a filtered search returns ``min(k, m)`` results in every row. Shapes: queries (n, d) ->
scores (n, k) float32, ids (n, k) int64, slots (n, k) int64, -inf / -1 padded.

Example:
    >>> import numpy as np
    >>> from headwise.memory.index import SlotIndex
    >>> idx = SlotIndex(2, "ip", "flat")
    >>> idx.add(np.arange(3), np.array([10, 11, 12]), np.array([[1, 0], [0.9, 0.1], [0, 1]], dtype=np.float32))
    >>> match = MatchSet(np.array([1, 2]))  # the seqs a filter matched
    >>> search_filtered(idx, np.array([[1.0, 0.0]], dtype=np.float32), 3, match)[1].tolist()
    [[11, 12, -1]]
"""

from __future__ import annotations

import math
from collections import OrderedDict

import faiss
import numpy as np

from headwise.memory.index import SlotIndex

#: The exact path serves a filtered HNSW search when at most ``EXACT_FACTOR * sqrt(ef * M * slots)``
#: records match (and always up to ``EXACT_MIN``); see :func:`exact_limit` and docs/memory.md.
EXACT_FACTOR = 1.0
EXACT_MIN = 2_000
#: The exact path gathers the matching vectors when ``m * d <= GATHER_RATIO * slots * queries`` (measured:
#: one query over 117k x 384 MiniLM vectors costs about 0.3 ms both ways at m = 1,000), else scans with the selector.
GATHER_RATIO = 4
#: Most bytes of matching vectors the exact path gathers at a time (21,845 rows of 384 floats).
EXACT_BLOCK_BYTES = 32 << 20
#: Widest beam of a filtered graph search, as a fraction of the slots (past it, exact is cheaper anyway).
MAX_EF_FRACTION = 0.5
#: Filters whose matching seqs the store keeps (each up to 8 bytes per record).
FILTER_CACHE_SIZE = 8


def exact_limit(index: SlotIndex, ef: int) -> int:
    """Most matching records for which a filtered HNSW search runs exactly instead of on the graph.

    The exact search costs about ``m`` vector reads; the graph search about ``ef * M / s =
    ef * M * n / m`` (n slots) since it visits ``1 / s`` nodes per node it can return.
    They cross at ``m`` of order ``sqrt(ef * M * n)``. Measured on MiniLM WordNet embeddings
    (d = 384, M = 32, ef = 64; benchmarks/results/memory_filter_crossover.md, made by
    ``python -m headwise.bench.filtered``): the single-query times cross at m = 0.9 sqrt(ef M n)
    at 20k vectors (about 5,500 matches) and 1.05 sqrt(ef M n) at 118k (about 16,500), so
    ``EXACT_FACTOR = 1``. Far from it either way the wrong path costs much more: 500 matches
    of 118k take 0.5 ms exactly and 105 ms on the graph.
    """
    return max(EXACT_MIN, int(EXACT_FACTOR * math.sqrt(ef * index.hnsw_m * max(index.n_slots, 1))))


class MatchSet:
    """The records a filter matched (``seqs``, ascending) and, per index version, their live slots."""

    def __init__(self, seqs: np.ndarray) -> None:
        self.seqs = np.asarray(seqs, dtype=np.int64)
        self.version = -1
        self.slots = np.empty(0, dtype=np.int64)
        self._bitmap: np.ndarray | None = None  # kept alive while faiss holds a pointer into it
        self._selector: faiss.IDSelector | None = None
        self._params: dict[int, faiss.SearchParameters] = {}

    @property
    def count(self) -> int:
        """Matching live records, m (valid after :meth:`bind`)."""
        return len(self.slots)

    def bind(self, index: SlotIndex) -> MatchSet:
        """Map the seqs to ``index``'s live slots (once per index version); returns self."""
        if self.version == index.version and self._bitmap is not None:
            return self
        slot_seq = index.slot_seq
        if len(slot_seq) < 2 or bool((slot_seq[1:] > slot_seq[:-1]).all()):  # the usual order: binary search
            pos = np.minimum(np.searchsorted(slot_seq, self.seqs), max(len(slot_seq) - 1, 0))
            slots = pos[slot_seq[pos] == self.seqs] if len(slot_seq) else pos[:0]
        else:
            slots = np.flatnonzero(np.isin(slot_seq, self.seqs))
        self.slots = slots[index._live.view[slots]]
        mask = np.zeros(index.n_slots, dtype=bool)
        mask[self.slots] = True
        self._bitmap = np.packbits(mask, bitorder="little")
        self._selector = faiss.IDSelectorBitmap(index.n_slots, faiss.swig_ptr(self._bitmap))
        self._params = {}
        self.version = index.version
        return self

    def params(self, ef: int | None) -> faiss.SearchParameters:
        """faiss parameters restricting a search to the matching slots: HNSW with beam ``ef``, or flat (None)."""
        params = self._params.get(ef)
        if params is None:  # the params hold a raw pointer to the selector, which self keeps alive
            if ef is not None:
                params = faiss.SearchParametersHNSW(sel=self._selector, efSearch=ef)
            else:
                params = faiss.SearchParameters(sel=self._selector)
            self._params[ef] = params
        return params


class FilterMatches:
    """An LRU of filter key -> :class:`MatchSet`, cleared by the store whenever records change.

    A filter costs a SQLite scan of the metadata (or an index lookup); repeated searches with
    the same filter reuse its matches until the next write (or a reader's ``refresh``).
    """

    def __init__(self, size: int = FILTER_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[str, MatchSet] = OrderedDict()

    def get(self, key: str) -> MatchSet | None:
        match = self._items.get(key)
        if match is not None:
            self._items.move_to_end(key)
        return match

    def put(self, key: str, match: MatchSet) -> None:
        self._items[key] = match
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.full((n, k), -np.inf, dtype=np.float32),
        np.full((n, k), -1, dtype=np.int64),
        np.full((n, k), -1, dtype=np.int64),
    )


def search_filtered(
    index: SlotIndex,
    queries: np.ndarray,
    k: int,
    match: MatchSet,
    *,
    ef: int | None = None,
    exact_max: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k of ``queries`` (n, d) among ``match``'s records: (scores, ids, slots) (n, k); see the module docstring.

    ``ef``: the HNSW beam before widening (None: ``index.ef_search``). ``exact_max``: the most
    matches searched exactly on HNSW (None: :func:`exact_limit`; 0 forces the graph, for tests).
    """
    match.bind(index)
    n, m = len(queries), match.count
    kk = min(k, m)
    if n == 0 or kk == 0:
        return _empty(n, k)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    ef = index.ef_search if ef is None else ef
    limit = exact_limit(index, ef) if exact_max is None else exact_max
    if not index.is_hnsw or m <= limit:
        found = _exact(index, q, kk, match)
    else:
        # faiss fills the result only from matching nodes but stops on its beam of any nodes:
        # widen the beam by 1 / s so that it holds about ef matching ones.
        widened = math.ceil(max(ef, kk) * index.n_slots / m)
        widened = max(ef, kk, min(widened, int(MAX_EF_FRACTION * index.n_slots)))
        scores, slots = index.index.search(q, kk, params=match.params(widened))
        scores = -scores if index.metric == "l2" else scores
        short = (slots < 0).any(axis=1)
        if short.any():  # a row the graph search left short: exact over the matching set
            rows = np.flatnonzero(short)
            scores[rows], slots[rows] = _exact(index, q[rows], kk, match)
        found = scores, slots
    scores, ids, slots = index._with_ids(*found)
    if kk < k:
        pad = ((0, 0), (0, k - kk))
        return (
            np.pad(scores, pad, constant_values=-np.inf),
            np.pad(ids, pad, constant_values=-1),
            np.pad(slots, pad, constant_values=-1),
        )
    return scores, ids, slots


def _exact(index: SlotIndex, q: np.ndarray, k: int, match: MatchSet) -> tuple[np.ndarray, np.ndarray]:
    """Exact (scores, slots) (n, k) of ``q`` over the matching slots (m >= k), scored as the index scores them."""
    if match.count * index.dim <= GATHER_RATIO * index.n_slots * len(q):
        metric = faiss.METRIC_L2 if index.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        block = max(k, EXACT_BLOCK_BYTES // (4 * index.dim))
        heap = faiss.ResultHeap(len(q), k, keep_max=index.metric != "l2") if match.count > block else None
        for lo in range(0, match.count, block):
            slots = match.slots[lo : lo + block]
            vectors = index.reconstruct(slots)  # float32 (hnsw-fp16: the half-precision codes, widened)
            dist, pos = faiss.knn(q, vectors, min(k, len(slots)), metric=metric)
            if heap is None:
                return (-dist if index.metric == "l2" else dist), slots[pos]
            heap.add_result(dist, slots[pos])  # merges block by block into each row's top-k
        heap.finalize()
        dist, slots = heap.D, heap.I
    else:  # faiss's flat storage (IndexFlat, or IndexScalarQuantizer for hnsw-fp16) skips the other slots
        storage = faiss.downcast_index(index.index.storage) if index.is_hnsw else index.index
        dist, slots = storage.search(q, k, params=match.params(None))
    return (-dist if index.metric == "l2" else dist), slots
