"""A simulated feedback loop: labelled queries arrive as feedback, the enhancer is retrained as they accumulate.

:func:`simulate_feedback` drives a real :class:`~headwise.memory.store.VectorMemory` through its
public API only: each arriving (query, relevant ids) pair is ``record_feedback``-ed into the
store's SQLite, and after each batch an enhancer is fitted on ``feedback_training_set(memory)``
with :func:`~headwise.memory.fit.fit_enhancer`, set on the store, and the held-out test queries
are searched with ``memory.search``. ``headwise memory feedback-sim`` runs it on WordNet W1
(training queries as feedback, test queries held out) and plots recall against feedback.

Shapes: feedback queries (F, d) with F lists of stored ids; test queries (T, d) with T dicts {id: grade}.

Example:
    >>> import numpy as np
    >>> from headwise.memory import VectorMemory
    >>> from headwise.memory.fit import FitConfig
    >>> rng = np.random.default_rng(0)
    >>> mem = VectorMemory(16)
    >>> ids = mem.add(rng.standard_normal((300, 16)).astype(np.float32))
    >>> A = np.eye(16, dtype=np.float32) + 0.4 * rng.standard_normal((16, 16)).astype(np.float32)
    >>> q = mem.vectors(ids) @ A
    >>> fit = FitConfig(method="linear", steps=40, batch_size=32, eval_every=20, lr=1e-2)
    >>> test = [{int(i): 1} for i in ids[200:]]
    >>> rows = simulate_feedback(mem, q[:200], [[int(i)] for i in ids[:200]], q[200:], test, [100, 200], fit)
    >>> [r["feedback"] for r in rows], len(mem.feedback())
    ([0, 100, 200], 200)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from headwise.errors import bad_argument


def search_metrics(memory: Any, queries: np.ndarray, relevant: Sequence[dict[int, int]]) -> dict[str, float]:
    """Mean recall@10 and NDCG@10 of ``memory.search`` (with its current enhancer, if any)."""
    from headwise.memory.evaluate import per_query_metrics

    _, ids = memory.search_batch(queries, 10)
    per_q = per_query_metrics(ids, relevant)
    return {"recall@10": float(per_q["recall@10"].mean()), "ndcg@10": float(per_q["ndcg@10"].mean())}


def simulate_feedback(
    memory: Any,
    queries: np.ndarray,
    relevant: Sequence[Sequence[int]],
    test_queries: np.ndarray,
    test_relevant: Sequence[dict[int, int]],
    batches: Sequence[int],
    fit: Any,
    *,
    other_sets: dict[str, tuple[np.ndarray, Sequence[dict[int, int]]]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Feed ``queries[:n]`` as feedback for each cumulative ``n`` in ``batches``; refit and measure after each.

    Returns one row per point: {"feedback": n, "recall@10", "ndcg@10", "best_val_recall@10", "seconds",
    "other": {name: {"recall@10", "ndcg@10"}}}, the first at n = 0 (no enhancer: plain search);
    ``other_sets`` (name -> (queries, relevance)) are query sets unlike the feedback, e.g. transfer
    sets, searched beside the test queries after each refit. The memory keeps the last enhancer.
    """
    others = other_sets or {}

    def measure() -> dict[str, Any]:
        return {**search_metrics(memory, test_queries, test_relevant),
                "other": {name: search_metrics(memory, q, rel) for name, (q, rel) in others.items()}}  # fmt: skip

    from headwise.memory.feedback import feedback_training_set
    from headwise.memory.fit import fit_enhancer

    if list(batches) != sorted(set(batches)) or not batches or batches[0] < 2 or batches[-1] > len(queries):
        raise bad_argument("batches", f"increasing counts in [2, {len(queries)}]", list(batches))
    if len(relevant) != len(queries):
        raise bad_argument("relevant", f"one list of ids per query ({len(queries)})", len(relevant))
    memory.set_enhancer(None)
    rows = [{"feedback": 0, **measure()}]
    recorded = len(memory.feedback())
    if recorded:
        raise bad_argument("memory", "a store with no recorded feedback yet", f"{recorded} pairs")
    for n in batches:
        for i in range(recorded, n):
            memory.record_feedback(queries[i], list(relevant[i]))
        recorded = n
        t0 = time.perf_counter()
        enhancer, history = fit_enhancer(memory, *feedback_training_set(memory), fit, progress=False)
        memory.set_enhancer(enhancer)
        last = history[fit.method]
        rows.append({"feedback": n, **measure(), "best_val_recall@10": last.best_recall,
                     "seconds": time.perf_counter() - t0})  # fmt: skip
        if progress:
            progress(n)
    return rows
