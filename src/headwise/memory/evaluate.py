"""Retrieval metrics with bootstrap confidence intervals, exact search, and the evaluation table.

Metrics are computed per query from a ranking ``ids`` (Q, k) int64 (``-1`` = no result) and the
graded relevance of each query (``{doc index: grade > 0}``):

- recall@k = |relevant in the top k| / |relevant|;
- MRR@10 = 1 / rank of the first relevant document in the top 10 (0 if none);
- NDCG@10 = DCG / ideal DCG with linear gains, DCG = sum_i grade_i / log2(i + 1), i = 1..10.

The mean over queries gets a percentile bootstrap 95% CI (queries resampled with a fixed seed);
two methods on the same queries are compared with a *paired* bootstrap of their difference.
Search for metrics is always exact (faiss ``IndexFlatIP`` on unit vectors), so approximate
search error never blurs a comparison.

Shapes: docs (N, d), queries (Q, d), ids (Q, k).

Example:
    >>> import numpy as np
    >>> ids = np.array([[3, 1, 2], [0, 4, -1]])
    >>> m = per_query_metrics(ids, [{1: 1}, {9: 2}])
    >>> float(m["recall@1"][0]), float(m["mrr@10"][0]), float(m["recall@10"][1])
    (0.0, 0.5, 0.0)
    >>> round(float(m["ndcg@10"][0]), 4)   # 1 / log2(3)
    0.6309
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from headwise.errors import bad_argument

METRICS = ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10")
_DISCOUNT = 1.0 / np.log2(np.arange(2, 12))  # positions 1..10


def per_query_metrics(ids: np.ndarray, relevant: Sequence[dict[int, int]]) -> dict[str, np.ndarray]:
    """Each metric of :data:`METRICS` per query, as float64 arrays of length Q."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] != len(relevant):
        raise bad_argument("ids", f"a (Q, k) array with Q = len(relevant) = {len(relevant)}", ids.shape)
    Q, k = ids.shape
    grades = np.zeros((Q, k))
    n_rel = np.empty(Q)
    ideal = np.empty(Q)
    for i, rel in enumerate(relevant):
        if not rel:
            raise bad_argument(f"relevant[{i}]", "at least one relevant document", rel)
        row = ids[i]
        grades[i] = [rel.get(int(d), 0) if d >= 0 else 0 for d in row]
        n_rel[i] = len(rel)
        best = sorted(rel.values(), reverse=True)[:10]
        ideal[i] = float(np.dot(best, _DISCOUNT[: len(best)]))
    hit = grades > 0
    out: dict[str, np.ndarray] = {}
    for cut in (1, 10, 100):
        out[f"recall@{cut}"] = hit[:, :cut].sum(1) / n_rel
    top10 = hit[:, :10]
    first = np.where(top10.any(1), top10.argmax(1) + 1, 0)
    out["mrr@10"] = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    g10 = grades[:, :10]
    out["ndcg@10"] = (g10 * _DISCOUNT[: g10.shape[1]]).sum(1) / ideal
    return out


def bootstrap_ci(values: np.ndarray, *, samples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap 95% CI over queries."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise bad_argument("values", "a non-empty 1-d array", v.shape)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(samples, v.size))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(v.mean()), float(lo), float(hi)


def summarize(per_query: dict[str, np.ndarray], *, samples: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """{metric: [mean, low, high]} for every metric."""
    return {m: list(bootstrap_ci(v, samples=samples, seed=seed)) for m, v in per_query.items()}


def flat_index(docs: np.ndarray) -> Any:
    """A faiss ``IndexFlatIP`` holding ``docs`` (N, d): exact inner-product search."""
    import faiss

    docs = np.ascontiguousarray(docs, dtype=np.float32)
    if docs.ndim != 2 or docs.shape[0] == 0:
        raise bad_argument("docs", "a non-empty (N, d) array", docs.shape)
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(docs)
    return index


def exact_search(docs: np.ndarray | Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (scores (Q, k) float32, ids (Q, k) int64) of ``docs``, an array or a flat index."""
    index = flat_index(docs) if isinstance(docs, np.ndarray) else docs
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise bad_argument("docs, queries", "(N, d) and (Q, d) arrays of one d", f"d={index.d}, {queries.shape}")
    if k < 1:
        raise bad_argument("k", "an integer >= 1", k)
    scores, ids = index.search(queries, k)
    return scores, ids.astype(np.int64)


#: A retriever maps query embeddings (Q, d) to a ranking (Q, k) of document indices.
Retriever = Callable[[np.ndarray, int], np.ndarray]


def knn_retriever(docs: np.ndarray) -> Retriever:
    """Plain exact cosine kNN over ``docs`` (unit vectors)."""
    index = flat_index(docs)
    return lambda q, k: exact_search(index, q, k)[1]


def enhanced_retriever(docs: np.ndarray, enhancer: Any, *, batch: int = 1024) -> Retriever:
    """First pass of ``enhancer.candidates`` neighbours (of ``first_pass_queries`` when the
    enhancer has them), ``refine``, then a second exact pass; as :class:`VectorMemory` does."""
    index = flat_index(docs)

    def run(q: np.ndarray, k: int) -> np.ndarray:
        out = []
        for s in range(0, len(q), batch):
            qb = q[s : s + batch]
            if getattr(enhancer, "uses_candidates", True):
                first = enhancer.first_pass_queries(qb) if hasattr(enhancer, "first_pass_queries") else qb
                scores, ids = exact_search(index, first, enhancer.candidates)
                refined = enhancer.refine(qb, docs[ids], scores)
            else:
                refined = enhancer.refine(qb)
            out.append(exact_search(index, refined, k)[1])
        return np.concatenate(out)

    return run


@dataclass
class MethodResult:
    """One row of the table: metric -> [mean, low, high], plus per-query values for paired tests."""

    name: str
    metrics: dict[str, list[float]]
    per_query: dict[str, np.ndarray]


def evaluate_methods(
    docs: np.ndarray,
    queries: np.ndarray,
    relevant: Sequence[dict[int, int]],
    methods: dict[str, Retriever],
    *,
    samples: int = 1000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[MethodResult]:
    """Rank ``queries`` with every method (top 100, exact) and summarise the metrics with CIs."""
    results = []
    for name, retrieve in methods.items():
        if progress:
            progress(name)
        per_q = per_query_metrics(retrieve(queries, 100), relevant)
        results.append(MethodResult(name, summarize(per_q, samples=samples, seed=seed), per_q))
    return results


def paired_difference(
    a: MethodResult, b: MethodResult, metric: str, *, samples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high) of metric(a) - metric(b) over the same queries, paired bootstrap 95% CI."""
    return bootstrap_ci(a.per_query[metric] - b.per_query[metric], samples=samples, seed=seed)


def results_markdown(title: str, results: list[MethodResult], command: str, notes: Sequence[str] = ()) -> str:
    """A Markdown table: one row per method, ``mean [low, high]`` per metric, then the command."""
    lines = [f"## {title}", "", "| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for r in results:
        cells = [f"{r.metrics[m][0]:.3f} [{r.metrics[m][1]:.3f}, {r.metrics[m][2]:.3f}]" for m in METRICS]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    lines += ["", *[f"- {n}" for n in notes], "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def results_json(results: list[MethodResult], **extra: Any) -> str:
    """JSON with every method's metrics (mean, CI low, CI high) and the extra fields given."""
    return json.dumps({**extra, "methods": {r.name: r.metrics for r in results}}, indent=2, default=float)
