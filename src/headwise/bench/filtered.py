"""Filtered-search benchmarks of :class:`~headwise.memory.store.VectorMemory`: latency and recall by selectivity,
and the crossover between the exact and the graph path of a filtered HNSW search.

Each stored vector gets ``{"bucket": b}`` with b a random permutation of 0..n-1, so the
filter ``{"bucket": {"$lt": m}}`` matches exactly m records spread at random over the corpus
(no correlation with the vectors). Recall is against exact filtered search (numpy over the
matching records). Timings follow the harness rules: the same queries, methods interleaved,
after a warm-up; single-query p50 / p95, batched queries per second.

``python -m headwise.bench.filtered --dir runs/wordnet --out benchmarks/results/memory_filter_crossover``
measures the crossover that :func:`headwise.memory.filtered.exact_limit` encodes.

Shapes: docs (N, d), queries (Q, d) float32.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> docs = rng.standard_normal((400, 8)).astype(np.float32)
    >>> rows = filtered_latency(docs, docs[:6], kinds=("flat",), single=4, batch=6)
    >>> [(r["selectivity"], r["matching"], r["recall_vs_exact"]) for r in rows]
    [(0.5, 200, 1.0), (0.05, 20, 1.0), (0.005, 2, 1.0)]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from headwise.bench.harness import Timing, machine_info
from headwise.errors import bad_argument

SELECTIVITIES = (0.5, 0.05, 0.005)


def bucket_store(docs: np.ndarray, kind: str, *, seed: int = 0, **options: Any) -> tuple[Any, np.ndarray]:
    """A VectorMemory ("ip") over ``docs`` whose records carry ``{"bucket": b}``; returns (store, buckets (N,))."""
    from headwise.memory.store import VectorMemory

    buckets = np.random.default_rng(seed).permutation(len(docs))
    mem = VectorMemory(docs.shape[1], metric="ip", index=kind, **options)
    mem.add(docs, metadata=[{"bucket": int(b)} for b in buckets])
    return mem, buckets


def exact_filtered(docs: np.ndarray, queries: np.ndarray, keep: np.ndarray, k: int, block: int = 64) -> np.ndarray:
    """Ids (Q, min(k, m)) of the exact inner-product top-k among the rows ``keep`` (m,) of ``docs``.

    Float64 scores, ``block`` queries at a time (a (Q, m) matrix of a 1,000-query batch over
    half of a 100k corpus would take 400 MB).
    """
    kept = docs[keep].astype(np.float64)
    out = []
    for lo in range(0, len(queries), block):
        scores = queries[lo : lo + block].astype(np.float64) @ kept.T
        out.append(keep[np.argsort(-scores, axis=1, kind="stable")[:, :k]])
    return np.concatenate(out) if out else np.empty((0, min(k, len(keep))), dtype=np.int64)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), exact.tolist())]))


def _timed(mem: Any, qs: np.ndarray, k: int, where: dict, timing: Timing) -> None:
    for i in range(len(qs)):
        t0 = time.perf_counter()
        mem.search(qs[i : i + 1], k, filter=where)
        timing.times.append(time.perf_counter() - t0)


def parse_selectivities(text: str, name: str = "--filtered") -> list[float]:
    """Comma-separated fractions in (0, 1] ('' gives none); a HeadwiseError naming ``name`` otherwise.

    >>> parse_selectivities("0.5, 0.05,0.005")
    [0.5, 0.05, 0.005]
    """
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = [-1.0]
    if not all(0 < v <= 1 for v in values):
        raise bad_argument(name, "comma-separated fractions in (0, 1], such as 0.5,0.05,0.005", repr(text))
    return values


def filtered_latency(
    docs: np.ndarray,
    queries: np.ndarray,
    *,
    kinds: Sequence[str] = ("flat", "hnsw"),
    selectivities: Sequence[float] = SELECTIVITIES,
    single: int = 200,
    batch: int = 1000,
    k: int = 10,
    **options: Any,
) -> list[dict[str, Any]]:
    """One row per (index kind, selectivity): matching count, the path taken, p50/p95 µs, batched q/s, recall.

    ``options``: VectorMemory arguments (``ef_search``, ``hnsw_m``, ``ef_construction``).
    The filter's matches are computed by SQLite once (the store caches them per filter), so
    the timings are those of the search itself; ``filter_ms`` is that first evaluation.
    """
    from headwise.memory.filtered import exact_limit

    if not all(0 < s <= 1 for s in selectivities):
        raise bad_argument("selectivities", "fractions in (0, 1]", list(selectivities))
    qs = np.ascontiguousarray(queries[:single], dtype=np.float32)
    qb = np.ascontiguousarray(queries[:batch], dtype=np.float32)
    rows = []
    for kind in kinds:
        mem, buckets = bucket_store(docs, kind, **options)  # flat ignores the HNSW options
        for s in selectivities:
            m = max(1, round(s * len(docs)))
            where = {"bucket": {"$lt": m}}
            t0 = time.perf_counter()
            mem.search(qs[:1], k, filter=where)  # evaluates the filter (SQLite) and warms up
            filter_ms = 1e3 * (time.perf_counter() - t0)
            timing = Timing()
            _timed(mem, qs, k, where, timing)
            batch_s = []
            for _ in range(3):
                t0 = time.perf_counter()
                found = mem.search_batch(qb, k, filter=where)[1]
                batch_s.append(time.perf_counter() - t0)
            exact = exact_filtered(docs, qb, np.flatnonzero(buckets < m), k)  # "ip" stores docs as given
            graph = kind != "flat" and m > exact_limit(mem._index, mem.ef_search)
            rows.append({
                "index": kind, "selectivity": s, "matching": m, "path": "graph" if graph else "exact",
                "p50_us": 1e6 * timing.median, "p95_us": 1e6 * timing.p95,
                "batch_qps": len(qb) / statistics.median(batch_s),
                "recall_vs_exact": _recall(found[:, : min(k, m)], exact), "filter_ms": filter_ms,
            })  # fmt: skip
    return rows


def filtered_table(rows: list[dict[str, Any]], title: str = "filtered search (k=10)") -> Table:
    """A rich table of :func:`filtered_latency` rows."""
    table = Table(title=title)
    for col in ("index", "selectivity", "matching", "path", "p50 µs", "p95 µs", "batched q/s", "recall vs exact"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*_cells(r))
    return table


def _cells(r: dict[str, Any]) -> list[str]:
    return [
        r["index"], f"{r['selectivity']:.1%}", f"{r['matching']:,}", r["path"], f"{r['p50_us']:.0f}",
        f"{r['p95_us']:.0f}", f"{r['batch_qps']:.0f}", f"{r['recall_vs_exact']:.3f}",
    ]  # fmt: skip


def filtered_markdown(rows: list[dict[str, Any]], title: str) -> list[str]:
    """Markdown lines of :func:`filtered_latency` rows (a section of ``headwise memory bench``'s report)."""
    from headwise.bench.memory import markdown_table

    cols = ["index", "selectivity", "matching", "path", "p50 µs", "p95 µs", "batched q/s", "recall@k vs exact filtered"]
    return markdown_table(title, cols, [_cells(r) for r in rows])


def filter_crossover(
    docs: np.ndarray,
    queries: np.ndarray,
    counts: Sequence[int],
    *,
    kind: str = "hnsw",
    single: int = 60,
    k: int = 10,
    ef_search: int = 64,
    hnsw_m: int = 32,
    ef_construction: int = 200,
) -> list[dict[str, Any]]:
    """Single-query latency of the exact and the graph path of a filtered HNSW search, m records matching.

    One row per m in ``counts``: ``exact_us`` and ``graph_us`` (medians, interleaved per
    query), the graph path's recall@k against exact filtered search, and ``m / sqrt(ef * M * n)``,
    the scale that :func:`headwise.memory.filtered.exact_limit` uses.
    """
    mem, buckets = bucket_store(docs, kind, ef_search=ef_search, hnsw_m=hnsw_m, ef_construction=ef_construction)
    qs = np.ascontiguousarray(queries[:single], dtype=np.float32)
    scale = math.sqrt(ef_search * hnsw_m * len(docs))
    rows = []
    for m in counts:
        where = {"bucket": {"$lt": int(m)}}
        timings = {"exact": Timing(), "graph": Timing()}
        limits = {"exact": len(docs), "graph": 0}
        for limit in limits.values():  # warm-up, and the filter's matches cached
            mem.exact_filter_max = limit
            mem.search(qs[:2], k, filter=where)
        found = None
        for i in range(len(qs)):
            for path, limit in limits.items():
                mem.exact_filter_max = limit
                t0 = time.perf_counter()
                ids = mem.search(qs[i : i + 1], k, filter=where)[1]
                timings[path].times.append(time.perf_counter() - t0)
                if path == "graph":
                    found = ids if found is None else np.concatenate([found, ids])
        exact = exact_filtered(docs, qs, np.flatnonzero(buckets < m), k)
        rows.append({
            "matching": int(m), "selectivity": m / len(docs), "m_over_sqrt_ef_M_n": m / scale,
            "exact_us": 1e6 * timings["exact"].median, "graph_us": 1e6 * timings["graph"].median,
            "graph_recall": _recall(found[:, : min(k, m)], exact),
        })  # fmt: skip
    mem.exact_filter_max = None
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Measure the exact / graph crossover on a working directory's document embeddings (docs.npy)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="working directory made by 'headwise memory build'")
    parser.add_argument("--sizes", default="20000,117659", help="store sizes (the first N documents)")
    parser.add_argument("--counts", default="250,500,1000,2000,4000,8000,16000,32000", help="matching records m")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    parser.add_argument("--single", type=int, default=60, help="queries timed one by one")
    args = parser.parse_args(argv)
    docs = np.load(args.dir / "docs.npy", allow_pickle=False)
    queries = np.load(args.dir / "queries.npy", allow_pickle=False)
    queries = queries[np.random.default_rng(1).permutation(len(queries))[: args.single]]
    words = sys.argv[1:] if argv is None else list(argv)
    result: dict[str, Any] = {"command": " ".join(["python -m headwise.bench.filtered", *words]),
                              "machine": machine_info(), "sizes": {}}  # fmt: skip
    lines = []
    for n in (int(x) for x in args.sizes.split(",")):
        counts = [c for c in (int(x) for x in args.counts.split(",")) if c <= n // 2]
        rows = filter_crossover(docs[:n], queries, counts, single=args.single)
        result["sizes"][n] = rows
        from headwise.bench.memory import markdown_table

        cells = [
            [f"{r['matching']:,}", f"{r['selectivity']:.2%}", f"{r['m_over_sqrt_ef_M_n']:.2f}",
             f"{r['exact_us']:.0f}", f"{r['graph_us']:.0f}", f"{r['graph_recall']:.3f}"]
            for r in rows
        ]  # fmt: skip
        cols = ["matching m", "selectivity", "m / sqrt(ef M n)", "exact µs", "graph µs", "graph recall@10"]
        lines += markdown_table(f"{n:,} vectors ({args.dir.name}, d={docs.shape[1]}, M=32, ef_search=64)", cols, cells)
        print("\n".join(lines[-len(cells) - 4 :]), flush=True)
    if args.out is not None:
        lines += [f"Command: `{result['command']}`", ""]
        args.out.with_suffix(".md").write_text("## Filtered HNSW search: exact vs graph path\n\n" + "\n".join(lines))
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
