"""The architecture sweep: one factor of :class:`EnhancerConfig` at a time, several seeds, measured.

The RuVector report tells an "optimisation journey" over heads, hidden width, layers and
dropout without a command behind it. :func:`run_sweep` measures that journey for real: each
row is the default enhancer with one factor changed, trained ``seeds`` times on a slice of a
working directory and evaluated on its in-distribution test queries and on transfer query
sets, with the end-to-end search latency (every row's seed-0 model, timed in turns query by
query once all are trained) and the parameter memory of the trained model.

The slice (:func:`make_slice`) keeps the run inside a small machine's budget: a sample of the
training, validation and test queries, every document relevant to a sampled or transfer query,
and random other documents up to ``docs`` (the in-distribution and transfer figures are
therefore against a smaller corpus than the full-corpus tables; the sweep compares rows with
each other and with cosine kNN on the same slice, not with those tables).

Shapes: slice documents (N, d); each query set (Q, d) with Q relevance dicts over slice rows.

Example:
    >>> rows = sweep_rows({"heads": (4, 8), "layers": (1, 2)})
    >>> [(factor, value) for factor, value, _ in rows]
    [('default', None), ('heads', 4), ('layers', 2)]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from headwise.errors import bad_argument
from headwise.memory.architecture import EnhancerConfig, footprint

#: The factors and values of the issue's sweep (one at a time around the default).
FACTORS: dict[str, tuple[Any, ...]] = {
    "heads": (1, 4, 8, 16),
    "hidden": (0, 128, 256, 512),
    "layers": (1, 2, 3),
    "dropout": (0.0, 0.1, 0.2),
}


def sweep_rows(
    factors: dict[str, Sequence[Any]], base: EnhancerConfig | None = None
) -> list[tuple[str, Any, EnhancerConfig]]:
    """(factor, value, config): the default first, then each factor's values that differ from it."""
    base = base or EnhancerConfig()
    rows: list[tuple[str, Any, EnhancerConfig]] = [("default", None, base)]
    for factor, values in factors.items():
        if not hasattr(base, factor):
            raise bad_argument("factors", "fields of EnhancerConfig", repr(factor))
        rows += [(factor, v, replace(base, **{factor: v})) for v in values if v != getattr(base, factor)]
    return rows


@dataclass
class QuerySet:
    """Query embeddings (Q, d) and relevance {slice row: grade} per query."""

    name: str
    queries: np.ndarray
    relevant: list[dict[int, int]]


@dataclass
class SweepSlice:
    """The slice: documents, training / validation queries, and the evaluation sets (in-distribution first)."""

    docs: np.ndarray
    queries: np.ndarray  # training then validation queries
    relevant: list[dict[int, int]]
    train_idx: np.ndarray
    val_idx: np.ndarray
    eval_sets: list[QuerySet]
    full_docs: int


def make_slice(
    docs: np.ndarray,
    queries: np.ndarray,
    relevant: Sequence[dict[int, int]],
    split: dict[str, np.ndarray],
    transfer: Sequence[QuerySet],
    *,
    n_docs: int,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
) -> SweepSlice:
    """Sample queries of each split, keep every document they (and the transfer sets) need, fill to ``n_docs``."""
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        if not 1 <= n <= len(split[name]):
            raise bad_argument(f"{name} queries", f"between 1 and {len(split[name])}", n)
    picks = {name: np.sort(rng.choice(split[name], n, replace=False))
             for name, n in (("train", n_train), ("validation", n_val), ("test", n_test))}  # fmt: skip
    needed = set()
    for rows in picks.values():
        for q in rows:
            needed |= set(relevant[q])
    for qs in transfer:
        for rel in qs.relevant:
            needed |= set(rel)
    rest = np.setdiff1d(np.arange(len(docs)), np.fromiter(needed, dtype=np.int64))
    fill = rng.choice(rest, max(0, n_docs - len(needed)), replace=False) if n_docs > len(needed) else []
    keep = np.sort(np.concatenate([np.fromiter(needed, dtype=np.int64), np.asarray(fill, dtype=np.int64)]))
    row_of = {int(d): i for i, d in enumerate(keep)}

    def remap(rel: dict[int, int]) -> dict[int, int]:
        return {row_of[d]: g for d, g in rel.items()}

    fit_rows = np.concatenate([picks["train"], picks["validation"]])
    test = QuerySet("test", queries[picks["test"]], [remap(relevant[q]) for q in picks["test"]])
    sets = [test] + [QuerySet(qs.name, qs.queries, [remap(r) for r in qs.relevant]) for qs in transfer]
    return SweepSlice(
        docs=np.ascontiguousarray(docs[keep]),
        queries=np.ascontiguousarray(queries[fit_rows]),
        relevant=[remap(relevant[q]) for q in fit_rows],
        train_idx=np.arange(n_train),
        val_idx=np.arange(n_train, n_train + n_val),
        eval_sets=sets,
        full_docs=len(docs),
    )


def evaluate_model(data: SweepSlice, model: Any) -> dict[str, dict[str, float]]:
    """{set name: {"recall@10", "ndcg@10"}} of a model (None: cosine kNN) on the slice's evaluation sets."""
    from headwise.memory.evaluate import enhanced_retriever, knn_retriever, per_query_metrics

    retrieve = knn_retriever(data.docs) if model is None else enhanced_retriever(data.docs, model)
    out = {}
    for qs in data.eval_sets:
        per_q = per_query_metrics(retrieve(qs.queries, 10), qs.relevant)
        out[qs.name] = {"recall@10": float(per_q["recall@10"].mean()), "ndcg@10": float(per_q["ndcg@10"].mean())}
    return out


def interleaved_latency_us(data: SweepSlice, models: list[Any], queries: int = 200) -> list[dict[str, float]]:
    """Median and p90 µs of one search (first pass, refine, second pass; exact flat index) per model.

    The models take turns query by query, so a burst of load elsewhere on the machine slows
    every model alike instead of one row of the table.
    """
    from headwise.memory.evaluate import enhanced_retriever

    runs = [enhanced_retriever(data.docs, m) for m in models]
    q = data.eval_sets[0].queries[:queries]
    for run in runs:
        run(q[:5], 10)  # warm-up: first calls allocate
    times = np.zeros((len(runs), len(q)))
    for j, row in enumerate(q):
        for i, run in enumerate(runs):
            t0 = time.perf_counter()
            run(row[None], 10)
            times[i, j] = time.perf_counter() - t0
    return [{"median": float(np.median(t) * 1e6), "p90": float(np.quantile(t, 0.9) * 1e6)} for t in times]


def train_row(
    data: SweepSlice, config: EnhancerConfig, seed: int, train_config: Any, adapter: Any, cache: dict
) -> dict[str, Any]:
    """Train one (config, seed) and measure it: metrics per set, best validation recall, latency, footprint."""
    from headwise.memory.train import TrainData, train

    key = (config.candidates, config.first_pass)
    if key not in cache:  # the candidates depend on K and on the first pass only
        fq = None
        if config.first_pass != "raw":  # the adapted query: an untrained enhancer holding the adapter
            probe = config.build(data.docs.shape[1])
            if adapter is not None:
                probe.adopt_adapter(adapter)
            fq = probe.first_pass_queries(data.queries)
        cache[key] = TrainData.build(data.docs, data.queries, data.relevant, data.train_idx, data.val_idx,
                                     k=config.candidates, first_queries=fq)  # fmt: skip
    model = config.build(data.docs.shape[1], seed=seed)
    if adapter is not None:  # the documented recipe: start from the linear adapter and train it further
        model.adopt_adapter(adapter, freeze=False)
    t0 = time.perf_counter()
    hist = train(model, cache[key], replace(train_config, seed=seed))
    seconds = time.perf_counter() - t0
    return {
        "seed": seed,
        "metrics": evaluate_model(data, model),
        "best_val_recall@10": hist.best_recall,
        "best_step": hist.best_step,
        "train_seconds": seconds,
        "model": model,  # timed with the other rows' models at the end (run_sweep), then dropped
        **footprint(model),
    }


def run_sweep(
    data: SweepSlice,
    rows: list[tuple[str, Any, EnhancerConfig]],
    seeds: Sequence[int],
    train_config: Any,
    *,
    adapter: Any = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every row x seed trained and measured, plus the baselines (cosine kNN, the adapter alone)."""
    baselines = {"knn": evaluate_model(data, None)}
    if adapter is not None:
        baselines["linear adapter"] = evaluate_model(data, adapter)
    cache: dict = {}
    out = []
    for factor, value, config in rows:
        runs = []
        for seed in seeds:
            runs.append(train_row(data, config, seed, train_config, adapter, cache))
            if progress:
                progress(f"{factor}={value} seed {seed}")
        out.append({"factor": factor, "value": value, "config": config.kwargs(), "runs": runs})
    if progress:
        progress("latency (rows interleaved)")
    timing = interleaved_latency_us(data, [row["runs"][0]["model"] for row in out])
    for row, t in zip(out, timing):
        for run in row["runs"]:
            run.pop("model")
        row["latency_us"] = t
        row["summary"] = summarise_runs(row["runs"]) | {"latency_us": t["median"], "latency_p90_us": t["p90"]}
    return {"baselines": baselines, "rows": out}


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds of every metric, CV% of each, mean training time, footprint."""
    summary: dict[str, Any] = {}
    for name in runs[0]["metrics"]:
        for metric in ("recall@10", "ndcg@10"):
            vals = np.array([r["metrics"][name][metric] for r in runs])
            std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            summary[f"{name} {metric}"] = {"mean": float(vals.mean()), "std": std,
                                           "cv%": 100 * std / vals.mean() if vals.mean() else 0.0}  # fmt: skip
    summary["train_seconds"] = float(np.mean([r["train_seconds"] for r in runs]))
    for key in ("parameters", "bytes", "bytes_per_vector_at_100k"):
        summary[key] = runs[0][key]
    return summary
