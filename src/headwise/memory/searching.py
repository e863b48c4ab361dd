"""The two-pass search of :class:`~headwise.memory.store.VectorMemory`, a mixin: cache, passes, refine.

Kept apart from the store's bookkeeping (open, save, locking, writes) so that each stays short;
the store module docstring describes the enhanced search these methods run.

A metadata filter (:mod:`headwise.memory.filters`) restricts both passes of an enhanced search
to the matching records: the final result must match, and the first pass's candidates are
merged into it on HNSW (``merge_candidates``), so they must match too; the enhancer then
attends over neighbours that can be returned. A filter is evaluated by SQLite once per
distinct filter until the records change (:class:`~headwise.memory.filtered.FilterMatches`),
and the result cache keys carry its canonical JSON.

Shapes: queries (n, d); candidates (n, K) slots and (n, K, d) vectors; results (n, k).

Example:
    >>> import numpy as np
    >>> from headwise.memory import VectorMemory
    >>> mem = VectorMemory(2)
    >>> _ = mem.add(np.eye(2, dtype=np.float32))
    >>> mem._search_rows(np.array([[1.0, 0.0]], dtype=np.float32), 3, False)[1].tolist()
    [[0, 1, -1]]
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from headwise.memory.checks import check_k, check_positive_int
from headwise.memory.filtered import FilterMatches, MatchSet, search_filtered
from headwise.memory.filters import CompiledFilter, compile_filter, matching_seqs
from headwise.memory.passes import refine_checked, second_pass_inputs, use_enhancer


class SearchPasses:
    """The search methods of VectorMemory (they use its index, enhancer, cache, metrics and lock)."""

    _index: Any
    _lock: Any
    _search_guard: Any
    _candidate_ef: int | None
    enhancer: Any
    cache: Any
    metrics: Any
    _db: Any
    metric: str
    dim: int
    merge_candidates: bool
    _filter_matches: FilterMatches
    _exact_filter_max: int | None = None

    def _check_vectors(self, vectors: Any, name: str) -> np.ndarray:
        raise NotImplementedError

    @property
    def exact_filter_max(self) -> int | None:
        """Most matching records for which a filtered HNSW search runs exactly (None: the measured rule).

        See :func:`headwise.memory.filtered.exact_limit`; 0 sends every filtered search through
        the graph (widened beam, exact fallback for short rows). Not saved; ignored by "flat".
        """
        return self._exact_filter_max

    @exact_filter_max.setter
    def exact_filter_max(self, value: int | None) -> None:
        if value is not None:
            check_positive_int("exact_filter_max", value, minimum=0)
        with self._lock:
            self._exact_filter_max = None if value is None else int(value)
            self.cache.clear()

    def _contents_changed(self) -> None:
        """Forget what depends on the records: cached results and filter matches."""
        self.cache.clear()
        self._filter_matches.clear()

    def _match(self, flt: CompiledFilter | None) -> MatchSet | None:
        """The records ``flt`` matches, bound to the current index (None: no filter). Under the lock.

        ``_search_guard``: concurrent searches share the filter LRU, the SQLite connection and
        the binding of a MatchSet (its faiss selector points into its bitmap).
        """
        if flt is None:
            return None
        with self._search_guard:
            match = self._filter_matches.get(flt.key)
            if match is None:
                match = MatchSet(matching_seqs(self._db, flt))
                self._filter_matches.put(flt.key, match)
            return match.bind(self._index)

    def _find(
        self, q: np.ndarray, k: int, match: MatchSet | None, ef: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One index search, restricted to ``match`` when there is a filter: (scores, ids, slots) (n, k)."""
        if match is None:
            return self._index.search(q, k, ef=ef)
        return search_filtered(self._index, q, k, match, ef=ef, exact_max=self._exact_filter_max)

    def _search(
        self, queries: Any, k: int, enhance: bool | None, op: str, where: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        k = check_k(k)
        flt = None if where is None else compile_filter(where)
        # Shared: searches run side by side (faiss searches are const); writes wait for them.
        # What searches share besides the index (result cache, filter matches and SQLite,
        # metrics, the index's gather workspace) is guarded where it is touched.
        with self._lock.shared():
            use = self._use_enhancer(enhance)
            q = self._check_vectors(queries, "queries")
            n = len(q)
            if not self.cache.max_size:  # no cache: no per-row bookkeeping
                scores, ids = self._search_rows(q, k, use, self._match(flt))
            else:
                scores = np.full((n, k), -np.inf, dtype=np.float32)
                ids = np.full((n, k), -1, dtype=np.int64)
                fkey = None if flt is None else flt.key
                keys = [(row.tobytes(), k, use, fkey) for row in q]
                todo = []
                for i in range(n):
                    hit = self.cache.get(keys[i])
                    if hit is None:
                        todo.append(i)
                    else:
                        scores[i], ids[i] = hit
                if todo:
                    rows = np.asarray(todo)
                    s, i_ = self._search_rows(q[rows], k, use, self._match(flt))  # SQLite only on a miss
                    scores[rows], ids[rows] = s, i_
                    for j, r in enumerate(todo):
                        self.cache.put(keys[r], (s[j].copy(), i_[j].copy()))
            self.metrics.record(op, time.perf_counter() - start, n)
            return scores, ids

    def _search_rows(
        self, q: np.ndarray, k: int, use_enhancer: bool, match: MatchSet | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids (n, k) of checked queries, by the enhanced two-pass search or one pass.

        ``match``: the records a filter matched (both passes stay inside them), None for all.
        """
        # faiss works with at most the live (or matching) count (its heaps and HNSW beams grow
        # with k); the result is padded to k (bounded by MAX_K) like faiss's own.
        k_eff = max(1, min(k, self._index.n_live if match is None else match.count))
        if k_eff < k:
            scores, ids = self._search_rows(q, k_eff, use_enhancer, match)
            pad = ((0, 0), (0, k - k_eff))
            return np.pad(scores, pad, constant_values=-np.inf), np.pad(ids, pad, constant_values=-1)
        if not use_enhancer:
            return self._find(q, k, match)[:2]
        refined, first = self._second_pass_inputs(q, match)
        with self.metrics.timer("second_pass", len(q)):
            found = self._find(refined, k, match)
        if first is not None and self._index.is_hnsw and self.merge_candidates:
            with self.metrics.timer("merge", len(q)):
                found = self._index.merge(refined, found, *first, k)
        return found[:2]

    def _use_enhancer(self, enhance: bool | None) -> bool:
        return use_enhancer(self.enhancer, enhance)

    def _second_pass_inputs(
        self, q: np.ndarray, match: MatchSet | None = None
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """The second pass's queries (q refined by the enhancer from its first-pass top-K), and that
        top-K as (slots (n, K), vectors (n, K, d)), or None when the enhancer takes no candidates.
        ``match``: a filter's records, the only candidates (None: every record).

        The steps are :func:`headwise.memory.passes.second_pass_inputs`, shared with the other
        stores: rows with fewer than K candidates (HNSW may return fewer) repeat their last
        one, so the enhancer never sees padding; rows with none keep their query and have slots -1.
        """

        def first_pass(queries: np.ndarray, big_k: int) -> tuple[np.ndarray, np.ndarray, None]:
            s1, _, slots = self._find(queries, big_k, match, ef=self._candidate_ef)
            return s1, slots, None  # the vectors are gathered by slot (after padding)

        available = self._index.n_live if match is None else match.count
        return second_pass_inputs(self.enhancer, q, available, first_pass, self._gather, self._refine, self.metrics)

    def _gather(self, slots: np.ndarray) -> np.ndarray:
        """The stored vectors (n, K, d) of candidate slots (n, K)."""
        with self.metrics.timer("candidates", len(slots)):
            return self._index.reconstruct(slots, reuse=True)  # used until this search returns

    def _refine(self, q: np.ndarray, vectors: np.ndarray | None, scores: np.ndarray | None) -> np.ndarray:
        """The enhancer's refined queries (n, d) from candidate vectors (n, K, d) and scores (n, K), checked.

        ``vectors`` None: the enhancer ignores candidates and is called with the queries alone
        (see :func:`headwise.memory.passes.refine_checked`).
        """
        return refine_checked(self.enhancer, q, vectors, scores, dim=self.dim, metric=self.metric, metrics=self.metrics)
