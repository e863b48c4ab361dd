"""``headwise bench corpus``: the in-process engine against Ray Data (1 and 2 workers) on the same texts.

Two corpus jobs, each timed for every engine in interleaved rounds (harness.time_interleaved:
one warm-up each, then rounds in rotating order, so a burst of load hits every engine alike):

- ``embed``: MiniLM embeddings of N WordNet glosses (``memory build``'s work, no cache);
- ``analyze``: the full per-head analysis (weights, diversity, gradient importance) of the
  first M of them (``headwise analyze --file``'s work).

What a time includes is what one command pays: locally, loading MiniLM once and running the
batches in this process; with Ray, creating the actor pool (each worker loads MiniLM), moving
the batches to it and the results back. Starting Ray itself is timed once, apart. The outputs
of every engine are checked against the local ones (largest difference) in the same run.

Example (the markdown of a tiny, made-up result)::

    >>> t = {"median_ms": 1000.0, "p95_ms": 1100.0, "times_ms": [1000.0, 900.0, 1100.0], "cv_pct": 10.0}
    >>> r = {"command": "headwise bench corpus", "machine": {"cpu": "x", "threads": 2, "torch": "2",
    ...      "load_average": [0.1, 0.1, 0.1]}, "load_average_at_end": [0.2, 0.1, 0.1],
    ...      "ray": {"start_s": 4.0, "where": "local"}, "jobs": {"embed": {"texts": 64, "rows": [
    ...      {"engine": "local", **t, "vs_local": 1.0, "max_abs_diff": 0.0}]}}}
    >>> "| local | 1.00 | 0.90 - 1.10 |" in to_markdown(r)
    True
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import typer

from headwise.cliutil import int_in, out_dir, reports_errors

WORDNET_SYNSETS = 117_659  # glosses in WordNet 3.0: the most the embed job can have
MAX_REPEAT = 1_000
JOBS = ("embed", "analyze")


def _workers(spec: str) -> list[int]:
    """ "1,2" -> [1, 2] (each in [1, 1024]), or a HeadwiseError naming --workers."""
    from headwise.engines import MAX_WORKERS
    from headwise.errors import bad_argument

    try:
        values = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise bad_argument("--workers", "comma-separated worker counts like '1,2'", repr(spec)) from None
    if not values or any(not 1 <= w <= MAX_WORKERS for w in values):
        raise bad_argument("--workers", f"comma-separated worker counts in [1, {MAX_WORKERS}]", repr(spec))
    return values


def _max_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two embeddings or two analysis JSON trees (nan on a shape mismatch)."""
    if isinstance(a, dict):
        return max((_max_diff(a[k], b.get(k)) for k in a), default=0.0) if isinstance(b, dict) else float("nan")
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return float("nan")
        return max((_max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, np.ndarray):
        return float(np.abs(a - b).max()) if a.shape == np.shape(b) else float("nan")
    if isinstance(a, bool | str) or a is None:
        return 0.0 if a == b else float("nan")
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b))
    return float("nan")


def _numbers(analysis: dict[str, Any]) -> dict[str, Any]:
    """The per-head numbers of an analysis JSON, keyed by head: what two engines must agree on.

    The rankings of the diversity summary and the pattern names are left out: a tie between two
    heads may break either way when the float rounding differs (another number of threads).
    """
    heads = {f"L{r['layer']}H{r['head']}": {k: v for k, v in r.items() if k != "pattern"} for r in analysis["per_head"]}
    return {"per_head": heads, "cosine": analysis.get("cosine"), "js_per_row": analysis.get("js_per_row")}


def run_corpus(
    n: int,
    *,
    analyze_n: int = 256,
    workers: list[int] | None = None,
    repeat: int = 3,
    batch_size: int = 32,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time every job on every engine (see the module docstring); a JSON-ready result."""
    from headwise.analysis import register
    from headwise.analysis.corpus import analyze_texts
    from headwise.bench.analysis import wordnet_texts
    from headwise.bench.harness import machine_info, paired_ratio, time_interleaved
    from headwise.engines.ray_data import RayEngine
    from headwise.memory.datasets import embed
    from headwise.pretrained import load_minilm

    workers = workers or [1, 2]
    texts = wordnet_texts(n, "document")
    result: dict[str, Any] = {"machine": machine_info(), "repeat": repeat, "workers": workers, "jobs": {}}
    # One Ray for every pool size: the first engine starts it (and shuts it down), the others reuse it.
    engines = {w: RayEngine(workers=w) for w in workers}
    owner = engines[workers[0]]
    outputs: dict[str, Any] = {}

    def keep(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            outputs[name] = fn()

        return run

    def label(w: int) -> str:
        return f"ray, {w} worker{'s' if w > 1 else ''}"

    def local_analysis() -> dict:
        register()
        tok, net = load_minilm("headwise")
        return _numbers(analyze_texts(texts[:analyze_n], tok, net, batch_size=batch_size).to_dict())

    jobs: dict[str, tuple[int, dict[str, Callable[[], Any]]]] = {
        "embed": (len(texts), {"local": lambda: embed(texts, cache=False, progress=False)}
                  | {label(w): (lambda e=e: e.embed(texts, progress=False)) for w, e in engines.items()}),
    }  # fmt: skip
    if analyze_n > 0:
        jobs["analyze"] = (min(analyze_n, len(texts)), {"local": local_analysis} | {
            label(w): (lambda e=e: _numbers(e.analyze(texts[:analyze_n], batch_size=batch_size).to_dict()))
            for w, e in engines.items()})  # fmt: skip
    try:
        progress("starting Ray")
        t0 = time.perf_counter()
        owner.start()
        import ray

        result["ray"] = {"start_s": time.perf_counter() - t0, "where": owner.address or "local",
                         "cluster_cpus": ray.cluster_resources().get("CPU")}  # fmt: skip
        for job, (count, fns) in jobs.items():
            progress(f"{job}: {count} texts, {len(fns)} engines, {repeat} rounds after a warm-up")
            outputs.clear()
            timings = time_interleaved({k: keep(k, f) for k, f in fns.items()}, repeat=repeat, warmup=1)
            local = timings["local"].times
            rows = [
                {"engine": name, **t.record(items=count), "vs_local": paired_ratio(t.times, local),
                 "max_abs_diff": _max_diff(outputs["local"], outputs[name])}
                for name, t in timings.items()
            ]  # fmt: skip
            result["jobs"][job] = {"texts": count, "rows": rows}
    finally:
        for engine in reversed(engines.values()):  # the owner last: it shuts Ray down if it started it
            engine.close()
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown page: one table per job, the command, the machine and its load."""
    info, ray = result["machine"], result["ray"]
    lines = [
        "# Corpus jobs: in-process engine vs Ray Data",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {info['cpu']}, {info['threads']} torch threads in this process, torch {info['torch']}; "
        f"load average {info['load_average'][0]:.2f} at the start, {result['load_average_at_end'][0]:.2f} at the end. "
        f"Ray: {ray['where']}, started once in {ray['start_s']:.1f} s (not in the times below); every Ray worker is "
        "one actor with one CPU and one torch thread, loading MiniLM once per run.",
        "",
        "Seconds per run (median, min - max over the rounds), texts per second, and `vs local`: the median "
        "over rounds of this engine's time / the local time of the same round (above 1 is slower). "
        "`max diff`: largest absolute difference of the output from the local engine's "
        "(the embeddings; the per-head numbers, cosine and Jensen-Shannon matrices of the analysis), "
        "local using this process's torch threads and each Ray worker one.",
    ]
    for job, data in result["jobs"].items():
        what = "MiniLM embeddings" if job == "embed" else "per-head analysis (weights, diversity, importance)"
        lines += ["", f"## {job}: {what} of {data['texts']:,} WordNet glosses", ""]
        lines += [
            "| engine | median s | min - max s | CV% | texts/s | vs local | max diff |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data["rows"]:
            lo, hi = min(r["times_ms"]) / 1e3, max(r["times_ms"]) / 1e3
            lines.append(
                f"| {r['engine']} | {r['median_ms'] / 1e3:.2f} | {lo:.2f} - {hi:.2f} | {r['cv_pct']:.1f} "
                f"| {r.get('throughput_per_s', 0):,.0f} | {r['vs_local']:.2f} | {r['max_abs_diff']:.1e} |"
            )
    return "\n".join(lines) + "\n"


@reports_errors
def bench_corpus(
    limit: int = typer.Option(2000, help=f"WordNet glosses embedded per run, 1 to {WORDNET_SYNSETS}."),
    analyze_limit: int = typer.Option(256, help="The first N of them analysed per run (0: skip the analysis job)."),
    workers: str = typer.Option("1,2", help="Ray actor-pool sizes to time, comma-separated."),
    repeat: int = typer.Option(3, help=f"Timed rounds after one warm-up, 1 to {MAX_REPEAT} (median reported)."),
    batch_size: int = typer.Option(32, help="Texts per analysis batch (as headwise analyze --batch-size)."),
    wait: bool = typer.Option(True, help="Wait (up to 2 minutes) for a quiet machine before timing."),
    report: Path = typer.Option(Path("benchmarks/results"), help="Directory for corpus.md and corpus.json."),
) -> None:
    """Embedding and analysis in-process vs Ray Data (1 and 2 workers) on the same texts: times and ratios."""
    from rich.console import Console

    from headwise.analysis.cli import MAX_BATCH_SIZE
    from headwise.bench.harness import wait_for_quiet
    from headwise.engines import check_engine
    from headwise.fileio import write_atomic

    int_in("--limit", limit, 1, WORDNET_SYNSETS)
    int_in("--analyze-limit", analyze_limit, 0, limit)
    int_in("--repeat", repeat, 1, MAX_REPEAT)
    int_in("--batch-size", batch_size, 1, MAX_BATCH_SIZE)
    sizes = _workers(workers)
    check_engine("ray", None, sizes[0])  # the extra is installed
    out_dir(report, "--report")
    console = Console()
    if wait:
        with console.status("waiting for a quiet machine (load average < 0.6)"):
            wait_for_quiet()
    with console.status("bench corpus") as status:
        result = run_corpus(limit, analyze_n=analyze_limit, workers=sizes, repeat=repeat, batch_size=batch_size,
                            progress=status.update)  # fmt: skip
    import os

    result["load_average_at_end"] = os.getloadavg()
    from headwise.cliutil import argv_command

    result["command"] = argv_command()
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(result)
    write_atomic(report / "corpus.md", markdown)
    write_atomic(report / "corpus.json", json.dumps(result, indent=1, default=float))
    typer.echo(markdown)
    console.print(f"wrote {report / 'corpus.md'} and {report / 'corpus.json'}")


__all__ = ["bench_corpus", "run_corpus", "to_markdown"]
