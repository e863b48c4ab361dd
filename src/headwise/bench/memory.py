"""Vector-memory benchmarks: per-query latency and throughput of retrieval methods, and the
"flash" whole-memory read-out against the top-K attention route at 10k-1M stored vectors.

Timings follow the harness rules: every method runs on the same queries in one process,
interleaved, after a warm-up; latency is the p50 / p95 of single-query calls, throughput the
queries per second of one batched call. Numbers depend on machine load: the committed quality
metrics do not, these do (re-run on a quiet machine).

Shapes: docs (N, d), queries (Q, d) float32 unit vectors.

Example:
    >>> import numpy as np
    >>> from headwise.memory.evaluate import knn_retriever
    >>> rng = np.random.default_rng(0)
    >>> docs = rng.standard_normal((500, 16)).astype(np.float32)
    >>> t = measure_latency(docs, docs[:40], {"knn": knn_retriever(docs)}, single=20, batch=40)
    >>> sorted(t["knn"])
    ['batch_qps', 'batch_qps_range', 'bytes_per_vector', 'p50_us', 'p95_us', 'single_qps']
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from rich.table import Table

from headwise.bench.harness import Timing, machine_info
from headwise.errors import bad_argument

Retriever = Callable[[np.ndarray, int], np.ndarray]


def measure_latency(
    docs: np.ndarray,
    queries: np.ndarray,
    retrievers: dict[str, Retriever],
    *,
    single: int = 200,
    batch: int = 1000,
    k: int = 10,
) -> dict[str, dict[str, float]]:
    """{method: p50_us, p95_us, single_qps, batch_qps, bytes_per_vector} over the same queries.

    ``bytes_per_vector`` is the exact (flat) index's float32 storage per document; the enhancers
    add a fixed number of parameters, not bytes per vector.
    """
    if single < 1 or batch < 1 or len(queries) == 0:
        raise bad_argument("single, batch, queries", "positive counts and at least one query", (single, batch))
    qs = np.ascontiguousarray(queries[:single], dtype=np.float32)
    qb = np.ascontiguousarray(queries[:batch], dtype=np.float32)
    timings = {name: Timing() for name in retrievers}
    for retrieve in retrievers.values():  # warm-up: faiss threads, torch kernels, caches
        retrieve(qs[:2], k)
    for i in range(len(qs)):  # interleaved: load bursts hit every method alike
        for name, retrieve in retrievers.items():
            t0 = time.perf_counter()
            retrieve(qs[i : i + 1], k)
            timings[name].times.append(time.perf_counter() - t0)
    batch_times = _batched_seconds({name: (lambda r=r: r(qb, k)) for name, r in retrievers.items()})
    return {name: _latency_row(timings[name], len(qb), batch_times[name], docs.shape[1]) for name in retrievers}


BATCH_ROUNDS = 3


def _batched_seconds(calls: dict[str, Any], rounds: int = BATCH_ROUNDS) -> dict[str, list[float]]:
    """Seconds of each batched call over ``rounds`` rounds, methods interleaved within a round.

    One untimed call each first: the first call at a new batch size faults in its (n, K, d)
    temporaries (tens of MB), a one-off cost that a serving loop pays once.
    """
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return times


def _latency_row(single: Timing, batch: int, batch_seconds: list[float], dim: int) -> dict[str, float]:
    """Per-query latency (µs) of the one-by-one calls, and throughput single and batched (median, range)."""
    return {
        "p50_us": 1e6 * single.median,
        "p95_us": 1e6 * single.p95,
        "single_qps": 1.0 / single.mean,
        "batch_qps": batch / statistics.median(batch_seconds),
        "batch_qps_range": [batch / max(batch_seconds), batch / min(batch_seconds)],
        "bytes_per_vector": float(dim * 4),  # float32 vectors; the index adds its own (footprint)
    }


def latency_table(timing: dict[str, dict[str, float]], title: str = "latency (k=10, exact flat index)") -> Table:
    """A rich table of :func:`measure_latency` results."""
    table = Table(title=title)
    for col in ("method", "p50 µs", "p95 µs", "single q/s", "batched q/s", "bytes/vector"):
        table.add_column(col, justify="right")
    for name, t in timing.items():
        table.add_row(
            name, f"{t['p50_us']:.0f}", f"{t['p95_us']:.0f}", f"{t['single_qps']:.0f}", f"{t['batch_qps']:.0f}",
            f"{t['bytes_per_vector']:.0f}",
        )  # fmt: skip
    return table


def grow_memory(docs: np.ndarray, size: int, *, noise: float = 0.15, seed: int = 0) -> np.ndarray:
    """``size`` unit vectors: the real ``docs`` first, then perturbed copies of them as distractors.

    Beyond the real corpus there is no more real text here; perturbed copies keep the
    neighbourhood structure of real embeddings (isotropic noise vectors would have none).
    """
    if size <= len(docs):
        return np.ascontiguousarray(docs[:size])
    rng = np.random.default_rng(seed)
    extra = docs[rng.integers(0, len(docs), size - len(docs))]
    extra = extra + noise * rng.standard_normal(extra.shape).astype(np.float32) / np.sqrt(docs.shape[1])
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    return np.concatenate([docs, extra.astype(np.float32)])


def flash_vs_topk(
    docs: np.ndarray,
    queries: np.ndarray,
    relevant: Sequence[dict[int, int]],
    topk: Any,
    flash: Any,
    *,
    sizes: Sequence[int] = (10_000, 100_000, 1_000_000),
    batch: int = 256,
    repeat: int = 3,
) -> list[dict[str, Any]]:
    """Quality (recall@10 of the second pass) and batched latency of the two routes per memory size.

    Only queries whose relevant documents lie inside the memory are scored at each size.
    """
    from headwise.memory.evaluate import enhanced_retriever, knn_retriever, per_query_metrics

    rows = []
    for n in sizes:
        mem = grow_memory(docs, n)
        keep = [i for i, r in enumerate(relevant) if max(r) < n][:batch]
        if not keep:
            continue
        q, rel = np.ascontiguousarray(queries[keep]), [relevant[i] for i in keep]
        flash.bind(mem)
        routes = {
            "knn": knn_retriever(mem),
            "top-K": enhanced_retriever(mem, topk),
            "flash": enhanced_retriever(mem, flash),
        }
        row: dict[str, Any] = {"memory": n, "queries": len(keep)}
        timings = {name: Timing() for name in routes}
        with torch.inference_mode():
            for name, r in routes.items():
                row[f"{name} recall@10"] = float(per_query_metrics(r(q, 100), rel)["recall@10"].mean())
            for _ in range(repeat):
                for name, r in routes.items():
                    t0 = time.perf_counter()
                    r(q, 10)
                    timings[name].times.append(time.perf_counter() - t0)
        for name, t in timings.items():
            row[f"{name} ms/query"] = 1e3 * t.median / len(keep)
        rows.append(row)
    return rows


def flash_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="flash (whole-memory read-out, tiled attend) vs top-K attention route")
    cols = ["memory", "queries"] + [f"{r} {m}" for m in ("recall@10", "ms/query") for r in ("knn", "top-K", "flash")]
    for c in cols:
        table.add_column(c, justify="right")
    for row in rows:
        table.add_row(*(f"{row[c]:,}" if isinstance(row[c], int) else f"{row[c]:.4f}" for c in cols))
    return table


def store_latency(
    docs: np.ndarray,
    queries: np.ndarray,
    enhancers: dict[str, Any],
    *,
    index: str = "hnsw",
    ef_search: int = 64,
    hnsw_m: int = 32,
    ef_construction: int = 200,
    candidate_ef: int | None = None,
    single: int = 200,
    batch: int = 1000,
    k: int = 10,
) -> dict[str, dict[str, float]]:
    """Latency of :class:`~headwise.memory.store.VectorMemory` searches with each enhancer (None = plain).

    One store holds ``docs``; methods take turns per query (interleaved). Two recalls per method
    on the batched queries: ``recall_vs_exact``, the store's top-k against exact search for the
    queries it answers (an enhanced search answers the refined queries of its second pass; on
    HNSW its result also holds the first pass's candidates, see ``merge_candidates``), and
    ``agreement_vs_exact``, the whole search against the same method on an exact (flat) store,
    where the first pass is exact too. ``batch_stage_us``: the batched call's time per query in
    each stage (:data:`STAGES`, from the store's metrics); ``single_stage_us``: the median time
    of each stage over the one-by-one calls (each method records into its own collector).
    """
    from headwise.memory.evaluate import exact_search
    from headwise.memory.metrics import MetricsCollector
    from headwise.memory.store import VectorMemory

    mem = VectorMemory(
        docs.shape[1], metric="ip", index=index, ef_search=ef_search, hnsw_m=hnsw_m, ef_construction=ef_construction
    )
    mem.add(docs)
    mem.candidate_ef = candidate_ef
    exact_mem = VectorMemory(docs.shape[1], metric="ip", index="flat")
    exact_mem.add(docs)
    for enh in enhancers.values():  # a flash read-out attends over the store it serves (both hold docs)
        if getattr(enh, "mechanism", None) == "flash":
            enh.bind(mem)
    qs = np.ascontiguousarray(queries[:single], dtype=np.float32)
    qb = np.ascontiguousarray(queries[:batch], dtype=np.float32)
    timings = {name: Timing() for name in enhancers}
    single_metrics = {name: MetricsCollector() for name in enhancers}  # each method's own stage times
    with torch.inference_mode():
        for enh in enhancers.values():  # warm-up
            mem.set_enhancer(enh)
            mem.search(qs[:2], k)
        for i in range(len(qs)):
            for name, enh in enhancers.items():
                mem.set_enhancer(enh)
                mem.metrics = single_metrics[name]
                t0 = time.perf_counter()
                mem.search(qs[i : i + 1], k)
                timings[name].times.append(time.perf_counter() - t0)
        mem.metrics = MetricsCollector()

        stage_calls: dict[str, list[dict[str, float]]] = {name: [] for name in enhancers}

        def batched(name: str, enh: Any) -> Callable[[], Any]:
            def call() -> Any:
                mem.set_enhancer(enh)
                mem.metrics.reset()
                result = mem.search_batch(qb, k)
                stage_calls[name].append(_stage_seconds(mem.metrics.summary()))
                return result

            return call

        batch_times = _batched_seconds({name: batched(name, enh) for name, enh in enhancers.items()})
        out: dict[str, dict[str, float]] = {}
        for name, enh in enhancers.items():
            mem.set_enhancer(enh)
            found = mem.search_batch(qb, k)[1]
            out[name] = _latency_row(timings[name], len(qb), batch_times[name], docs.shape[1])
            single_summary = single_metrics[name].summary()
            out[name]["single_stage_us"] = {s: single_summary[s]["p50_us"] for s in STAGES if s in single_summary}
            timed = stage_calls[name][1:]  # the first call is the untimed warm-up
            out[name]["batch_stage_us"] = {
                stage: 1e6 * statistics.median(c[stage] for c in timed) / len(qb) for stage in timed[0]
            }
            sent = qb if enh is None else mem.refine_queries(qb)
            out[name]["recall_vs_exact"] = _overlap(found, exact_search(docs, sent, k)[1])
            exact_mem.set_enhancer(enh)
            out[name]["agreement_vs_exact"] = _overlap(found, exact_mem.search_batch(qb, k)[1])
    stored_bytes = mem.footprint()["bytes_per_vector"]  # index + SQLite, measured
    for row in out.values():
        row["bytes_per_vector"] = stored_bytes
    return out


STAGES = ("first_pass", "candidates", "refine", "second_pass", "merge")


def _stage_seconds(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """Seconds of one search call spent in each stage of an enhanced search (from the store's metrics).

    ``other``: the call's time outside the stages (argument checks, the cache, the
    enhancer's plan lookup, the result assembly).
    """
    total = summary["search_batch"]["total_ms"] / 1e3
    stages = {s: summary[s]["total_ms"] / 1e3 for s in STAGES if s in summary}
    return {**stages, "other": total - sum(stages.values()), "total": total}


def _overlap(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row of ``exact`` (n, k) ids found in the same row of ``found``."""
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), exact.tolist())]))


def bench_info() -> dict[str, Any]:
    """Machine description for a result file."""
    return machine_info()


def mechanism_latency(
    docs: np.ndarray,
    queries: np.ndarray,
    *,
    sizes: Sequence[int] = (1000, 10000, 100000),
    mechanisms: Sequence[str] = ("multi-head", "hyperbolic", "moe"),
    index: str = "hnsw",
    single: int = 100,
    batch: int = 500,
    k: int = 10,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per-query latency of each enhancer mechanism through VectorMemory at each store size.

    One row per (size, method): the first ``size`` documents in one store, plain search
    ("none") and each mechanism's two-pass search, interleaved; ``bytes_per_vector`` is the
    store's measured footprint (index + SQLite) per vector. The enhancers are seeded,
    untrained instances: a forward costs the same whatever its weights hold, and quality is
    measured separately (``headwise memory eval``).
    """
    from headwise.memory.enhancer import QueryEnhancer

    torch.manual_seed(seed)
    dim = docs.shape[1]
    enhancers = {"none": None, **{m: QueryEnhancer(dim, mechanism=m).eval() for m in mechanisms}}
    rows = []
    for n in sizes:
        if n > len(docs):
            raise bad_argument("sizes", f"store sizes <= {len(docs)} documents", n)
        t = store_latency(docs[:n], queries, enhancers, index=index, single=single, batch=batch, k=k)
        rows += [{"stored": n, "method": name, **r} for name, r in t.items()]
    return rows


def markdown_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a Markdown section: ``### title``, the table, a blank line.

    >>> markdown_table("t", ["a", "b"], [["1", "2"]])
    ['### t', '', '| a | b |', '|---|---|', '| 1 | 2 |', '']
    """
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]
