"""The search methods of :class:`~headwise.memory.milvus.MilvusMemory`, a mixin: plain and enhanced search.

Kept apart from the collection's bookkeeping (connection, writes, records) as the embedded
store keeps :mod:`headwise.memory.searching` apart. A plain search is one Milvus search; an
enhanced one runs the embedded store's steps (:mod:`headwise.memory.passes`): the first pass
asks Milvus for the top-K *with their vectors* (``output_fields=["vector"]``), the enhancer
refines the queries locally, the second pass searches Milvus again, and on an approximate
index (HNSW, autoindex) the first pass's candidates, scored against the refined queries, are
merged into the result. Every search asks for ``consistency_level="Strong"``; L2 distances
are negated, so scores are "higher is better" for every metric; rows with fewer than k hits
are padded with id -1 and score -inf.

Shapes: queries (n, d); first pass: scores and ids (n, K), vectors (n, K, d); results (n, k).

Example:
    >>> from headwise.memory.milvus_search import search_params
    >>> search_params("l2", "HNSW", ef=64, limit=100)
    {'metric_type': 'L2', 'params': {'ef': 100}}
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from headwise.errors import bad_argument
from headwise.memory.checks import MAX_K, check_k, check_positive_int
from headwise.memory.milvus_collection import EF_TYPES, METRICS, STRONG, milvus_errors
from headwise.memory.passes import check_enhancer, merge_top, refine_checked, second_pass_inputs, use_enhancer
from headwise.memory.records import Hit

#: Result values (hits, times d when vectors come back) per search request.
SEARCH_VALUES = 1 << 22


def search_params(metric: str, index_type: str, *, ef: int, limit: int) -> dict[str, Any]:
    """Milvus ``search_params`` for a search of ``limit`` hits: the metric, and ``ef`` (at least limit) on HNSW."""
    params: dict[str, Any] = {"metric_type": METRICS[metric]}
    if index_type in EF_TYPES:
        params["params"] = {"ef": max(ef, limit)}
    return params


class MilvusSearch:
    """The search methods of MilvusMemory (they use its client, configuration, enhancer, metrics and lock)."""

    # Provided by MilvusMemory.
    uri: str
    collection: str
    enhancer: Any
    metrics: Any
    _lock: Any
    _config: Any
    _candidate_ef: int | None
    _merge_candidates: bool
    dim: int
    metric: str

    def _milvus(self, what: str) -> Any:
        raise NotImplementedError

    def _check_vectors(self, vectors: Any, name: str) -> np.ndarray:
        raise NotImplementedError

    def _require_encoder(self, what: str) -> Any:
        raise NotImplementedError

    def get(self, ids: Any) -> list:
        raise NotImplementedError

    def vectors(self, ids: Any) -> np.ndarray:
        raise NotImplementedError

    @property
    def candidate_ef(self) -> int | None:
        """HNSW beam width of an enhanced search's first pass (None: ``ef_search``), as in VectorMemory."""
        return self._candidate_ef

    @candidate_ef.setter
    def candidate_ef(self, value: int | None) -> None:
        if value is not None:
            check_positive_int("candidate_ef", value)
        self._candidate_ef = None if value is None else int(value)

    @property
    def merge_candidates(self) -> bool:
        """Whether an enhanced search on an approximate index merges its first-pass candidates (default True)."""
        return self._merge_candidates

    @merge_candidates.setter
    def merge_candidates(self, value: bool) -> None:
        if not isinstance(value, bool | np.bool_):
            raise bad_argument("merge_candidates", "a bool", repr(value))
        self._merge_candidates = bool(value)

    def set_enhancer(self, enhancer: Any) -> None:
        """Use ``enhancer`` (``candidates: int`` and ``refine(queries, cand_vectors, cand_scores)``) or None."""
        check_enhancer(enhancer, self)
        with self._lock:
            self.enhancer = enhancer

    def search(
        self, queries: Any, k: int, *, enhance: bool | None = None, filter: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of ``queries`` (n, d) or (d,): scores (n, k) float32 and ids (n, k) int64, -inf/-1 padded.

        ``enhance``: None uses the enhancer when one is set; True requires one; False never uses it.
        ``filter`` must be None (metadata filters are not translated to Milvus expressions).
        """
        return self._search(queries, k, enhance, filter, "search")

    def search_batch(
        self, queries: Any, k: int, *, enhance: bool | None = None, filter: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` for a 2-d batch (n, d)."""
        if np.ndim(queries) != 2:
            raise bad_argument("queries", "a 2-d array (n, d)", f"shape {np.shape(queries)}")
        return self._search(queries, k, enhance, filter, "search_batch")

    def refine_queries(self, queries: Any) -> np.ndarray:
        """The queries (n, d) that an enhanced search sends to its second pass (needs an enhancer)."""
        with self._lock:
            use_enhancer(self.enhancer, True)
            return self._second_pass_inputs(self._check_vectors(queries, "queries"))[0]

    def search_text(
        self, query: str, k: int, *, enhance: bool | None = None, filter: dict[str, Any] | None = None
    ) -> list[Hit]:
        """Encode ``query`` and return up to k hits (id, score, text, metadata), best first."""
        encoder = self._require_encoder("search_text")
        if not isinstance(query, str):
            raise bad_argument("query", "a str", type(query).__name__)
        _no_filter(filter)
        scores, ids = self.search(encoder.encode([query]), k, enhance=enhance)
        found = ids[0][ids[0] >= 0]
        records = {r.id: r for r in self.get(found) if r is not None}
        return [
            Hit(int(i), float(s), records[int(i)].text, records[int(i)].metadata)
            for i, s in zip(found, scores[0])
            if int(i) in records
        ]

    def _search(self, queries: Any, k: int, enhance: bool | None, where: Any, op: str) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        k = check_k(k)
        _no_filter(where)
        self._milvus(op)
        with self._lock:
            use = use_enhancer(self.enhancer, enhance)
            q = self._check_vectors(queries, "queries")
            if not len(q):
                scores, ids = np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
            elif use:
                refined, first = self._second_pass_inputs(q)
                with self.metrics.timer("second_pass", len(q)):
                    scores, ids, _ = self._find(refined, k)
                if first is not None and not self._config.exact and self.merge_candidates:
                    with self.metrics.timer("merge", len(q)):
                        scores, ids = merge_top(self.metric, refined, scores, ids, *first, k)
            else:
                scores, ids, _ = self._find(q, k)
            self.metrics.record(op, time.perf_counter() - start, len(q))
            return scores, ids

    def _second_pass_inputs(self, q: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """The refined queries (n, d) and the first pass's (ids (n, K), vectors (n, K, d)) or None."""

        def first_pass(queries: np.ndarray, big_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
            scores, ids, vectors = self._find(queries, big_k, ef=self._candidate_ef, vectors=True)
            # Fewer records than K: K is what any row found, as the embedded store caps K at its size.
            found = max(1, int((ids >= 0).sum(axis=1).max())) if len(ids) else big_k
            return scores[:, :found], ids[:, :found], None if vectors is None else vectors[:, :found]

        def refine(x: np.ndarray, vectors: np.ndarray | None, scores: np.ndarray | None) -> np.ndarray:
            return refine_checked(self.enhancer, x, vectors, scores, dim=self.dim, metric=self.metric,
                                  metrics=self.metrics)  # fmt: skip

        def gather(ids: np.ndarray) -> np.ndarray:  # the first pass returns vectors: only for completeness
            return self.vectors(ids.reshape(-1)).reshape(*ids.shape, self.dim)

        return second_pass_inputs(self.enhancer, q, MAX_K, first_pass, gather, refine, self.metrics)

    def _find(
        self, q: np.ndarray, limit: int, *, ef: int | None = None, vectors: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One Milvus search of ``q`` (n, d): scores (n, limit) float32 (higher is better), ids (n, limit)
        int64, -inf / -1 padded, and with ``vectors`` the hits' stored vectors (n, limit, d)."""
        n = len(q)
        scores = np.full((n, limit), -np.inf, dtype=np.float32)
        ids = np.full((n, limit), -1, dtype=np.int64)
        vecs = np.zeros((n, limit, self.dim), dtype=np.float32) if vectors else None
        params = search_params(self.metric, self._config.index_type, ef=ef or self._config.ef_search, limit=limit)
        fields = ["vector"] if vectors else []
        step = max(1, min(1024, SEARCH_VALUES // (limit * (self.dim if vectors else 1))))
        client = self._milvus("search")
        with milvus_errors("search", self.uri):
            for lo in range(0, n, step):
                result = client.search(
                    self.collection, data=q[lo : lo + step], limit=limit, search_params=params,
                    output_fields=fields, anns_field="vector", consistency_level=STRONG,
                )  # fmt: skip
                for row, hits in enumerate(result, lo):
                    m = len(hits)
                    if not m:
                        continue
                    ids[row, :m] = [h["id"] for h in hits]
                    dist = np.asarray([h["distance"] for h in hits], dtype=np.float32)
                    scores[row, :m] = -dist if self.metric == "l2" else dist
                    if vecs is not None:
                        vecs[row, :m] = [h["entity"]["vector"] for h in hits]
        return scores, ids, vecs


def _no_filter(where: Any) -> None:
    if where is not None:
        want = "None (MilvusMemory does not translate metadata filters; VectorMemory runs them)"
        raise bad_argument("filter", want, repr(where)[:80])
