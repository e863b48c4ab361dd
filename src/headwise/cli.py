"""The ``headwise`` command line: demo, analyze, memory, serve, bench, docs.

Every command fails the same way: one line ``error: ...`` on stderr and exit status 2, with
its arguments checked before the work starts (headwise.cliutil; docs/cli.md lists them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from headwise.analysis.cli import analyze
from headwise.bench.corpus import bench_corpus
from headwise.cliutil import (
    OneLineErrors,
    argv_command,
    fail,
    in_dir,
    in_file,
    int_in,
    out_dir,
    out_file,
    read_text,
    reports_errors,
)
from headwise.errors import bad_argument
from headwise.memory.cli import bench as memory_bench
from headwise.memory.cli import memory_app
from headwise.report.cli import demo as report_demo
from headwise.report.common import MAX_SEED
from headwise.server.cli import serve

# OneLineErrors: click's usage errors and any HeadwiseError that escapes a command, in every
# subcommand (memory's too), become one line on stderr with exit status 2.
app = typer.Typer(help="headwise: multi-head attention, head by head.", no_args_is_help=True, cls=OneLineErrors)
bench_app = typer.Typer(help="Benchmarks that run headwise and its competitors side by side.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.command("demo")(report_demo)
app.command("analyze")(analyze)
app.add_typer(memory_app, name="memory")
app.command("serve")(serve)
console = Console()

DEFAULT_SEQS = [512, 1024, 2048, 4096, 8192, 16384]
COMPARE_OPTION = typer.Option(
    None, "--compare", help="An earlier result JSON: print a regression table, exit 1 on a slowdown."
)
THRESHOLD_OPTION = typer.Option(0.10, help="Relative slowdown that counts as a regression with --compare.")

# Bounds of the benchmark options, checked before anything runs. MAX_SEQ: every length times
# dense SDPA, 4*8*L^2*64 flops a call: 8.8 TFLOP, about 40 s on the reference machine, at
# 65,536. MAX_REPEAT: more timed runs than anyone waits for. MAX_EMBED: the module's four
# E x E projections take 1 GiB at 8,192. MAX_STEPS: the training batches are drawn up front,
# steps x 32 x 129 int64 = 330 MB at 10,000. WORDNET_EXAMPLES: the synsets of WordNet 3.0 with
# an example sentence, all the timing suite can have.
MAX_SEQ = 65_536
MAX_REPEAT = 1_000
MAX_EMBED = 8_192
MAX_STEPS = 10_000
WORDNET_EXAMPLES = 32_884


def _check_seqs(seqs: list[int]) -> list[int]:
    for L in seqs:
        int_in("--seq", L, 1, MAX_SEQ)
    return sorted(set(seqs))


def _check_compare(compare: Path | None, threshold: float, name: str = "--compare") -> None:
    """--threshold, and the --compare file read and checked now, not after the benchmark."""
    from headwise.bench.compare import load_records

    if not threshold >= 0:  # NaN too
        raise bad_argument("--threshold", "a relative slowdown >= 0", threshold)
    if compare is not None:
        load_records(in_file(compare, name), name)


@bench_app.command("kernels")
@reports_errors
def bench_kernels(
    seq: list[int] = typer.Option(DEFAULT_SEQS, "--seq", help="Sequence lengths L (repeat the option)."),
    repeat: int = typer.Option(5, help="Timed runs per implementation (median reported)."),
    memory: bool = typer.Option(True, help="Measure peak memory in fresh subprocesses."),
    report: Path = typer.Option(Path("benchmarks/results"), help="Directory for kernels.md and kernels.json."),
    compare: Path | None = COMPARE_OPTION,
    threshold: float = THRESHOLD_OPTION,
) -> None:
    """attend() vs torch SDPA, FlexAttention and eager math: times, ratios, memory, goals."""
    from headwise.bench.report import goals, run_kernels, write_report

    seqs = _check_seqs(seq)
    int_in("--repeat", repeat, 1, MAX_REPEAT)
    out_dir(report, "--report")
    _check_compare(compare, threshold)
    with console.status("benchmarking") as status:
        result = run_kernels(seqs, repeat, memory, progress=lambda s: status.update(f"benchmarking {s}"))
    result["command"] = argv_command()
    md, js = write_report(result, report)
    table = Table(title="goals")
    for col in ("goal", "measured", "met"):
        table.add_column(col)
    for goal, evidence, ok in goals(result):
        table.add_row(goal, evidence, "yes" if ok else "[red]NO[/red]")
    console.print(table)
    console.print(f"wrote {md} and {js}")
    _maybe_compare(compare, js, threshold)


@bench_app.command("tune")
@reports_errors
def bench_tune(
    seq: list[int] = typer.Option([1024, 4096], "--seq", help="Sequence lengths L (repeat the option)."),
    rounds: int = typer.Option(5, help="Timed calls per backend after one warm-up (median recorded)."),
    report: Path | None = typer.Option(None, help="Also write DIR/tuning.md."),
) -> None:
    """Tune auto for the kernel benchmark's forward problems: the winners go to the tuning file."""
    from headwise.bench.tune import to_markdown, tune_cases
    from headwise.kernels.tuning import tuning_file

    seqs = _check_seqs(seq)
    int_in("--rounds", rounds, 1, MAX_REPEAT)
    if report is not None:
        out_dir(report, "--report")
    with console.status("tuning") as status:
        rows = tune_cases(seqs, rounds, progress=status.update)
    markdown = to_markdown(rows, argv_command(), str(tuning_file()))
    console.print(markdown)
    if report is not None:
        from headwise.fileio import write_atomic

        write_atomic(report / "tuning.md", markdown)


@bench_app.command("modules")
@reports_errors
def bench_modules(
    repeat: int = typer.Option(5, help="Timed runs per implementation (median reported)."),
    memory: bool = typer.Option(True, help="Measure peak memory in fresh subprocesses."),
    report: Path = typer.Option(Path("benchmarks/results"), help="Directory for modules.md and modules.json."),
    compare: Path | None = COMPARE_OPTION,
    threshold: float = THRESHOLD_OPTION,
) -> None:
    """MultiHeadAttention vs torch nn.MultiheadAttention; GQA 8/2 vs MHA 8/8."""
    from headwise.bench.harness import machine_info, wait_for_quiet
    from headwise.bench.modules import run_module_memory, run_modules, to_markdown
    from headwise.fileio import write_atomic

    int_in("--repeat", repeat, 1, MAX_REPEAT)
    out_dir(report, "--report")
    _check_compare(compare, threshold)
    wait_for_quiet()
    info = machine_info()
    with console.status("benchmarking modules"):
        result = run_modules(repeat)
    if memory:
        with console.status("measuring module memory in subprocesses"):
            result["memory"] = run_module_memory()
    command = argv_command()
    report.mkdir(parents=True, exist_ok=True)
    write_atomic(report / "modules.md", to_markdown(result, command, info))
    write_atomic(report / "modules.json", json.dumps({"command": command, "machine": info, **result}, indent=1))
    console.print((report / "modules.md").read_text())
    _maybe_compare(compare, report / "modules.json", threshold)


@bench_app.command("train")
@reports_errors
def bench_train(
    steps: int = typer.Option(300, help=f"Training steps per variant, 1 to {MAX_STEPS}."),
    seed: int = typer.Option(0, help=f"Random seed in [0, {MAX_SEED}] (same for every variant)."),
    report: Path = typer.Option(Path("benchmarks/results"), help="Directory for train.md and train.json."),
) -> None:
    """Train a tiny character LM on the stdlib source with each attention; compare losses."""
    from dataclasses import asdict

    from headwise.bench.train import TrainConfig, to_markdown, train_all
    from headwise.fileio import write_atomic

    int_in("--steps", steps, 1, MAX_STEPS)
    int_in("--seed", seed, 0, MAX_SEED)
    out_dir(report, "--report")
    cfg = TrainConfig(steps=steps, seed=seed)
    with console.status("training") as status:
        results = train_all(cfg, progress=lambda s: status.update(s))
    command = argv_command()
    report.mkdir(parents=True, exist_ok=True)
    write_atomic(report / "train.md", to_markdown(results, cfg, command))
    payload = {"command": command, "config": asdict(cfg), "results": results}
    write_atomic(report / "train.json", json.dumps(payload, indent=1))
    console.print((report / "train.md").read_text())


@bench_app.command("components")
@reports_errors
def bench_components(
    seq: list[int] = typer.Option([128, 1024, 4096], "--seq", help="Sequence lengths L (repeat the option)."),
    repeat: int = typer.Option(3, help="Profiled forwards per row (averaged)."),
    embed: int = typer.Option(512, help=f"Model width E, 1 to {MAX_EMBED}, a multiple of --heads."),
    heads: int = typer.Option(8, help="Number of heads, 1 to E."),
    report: Path = typer.Option(Path("benchmarks/results"), help="Directory for components.md and .json."),
) -> None:
    """Profiler breakdown of a MultiHeadAttention forward: projections, QK^T, mask, softmax, AV."""
    from headwise.bench.components import run_components, to_markdown
    from headwise.bench.harness import machine_info, wait_for_quiet
    from headwise.fileio import write_atomic

    seqs = _check_seqs(seq)
    int_in("--repeat", repeat, 1, MAX_REPEAT)
    int_in("--embed", embed, 1, MAX_EMBED)
    int_in("--heads", heads, 1, embed)
    if embed % heads:
        raise bad_argument("--embed", f"a multiple of --heads ({heads})", embed)
    out_dir(report, "--report")
    wait_for_quiet()
    info = machine_info()
    with console.status("profiling"):
        rows = run_components(seqs, repeat, embed, heads)
    command = argv_command()
    report.mkdir(parents=True, exist_ok=True)
    write_atomic(report / "components.md", to_markdown(rows, command, info, embed, heads, True))
    payload = {"command": command, "machine": info, "rows": rows}
    write_atomic(report / "components.json", json.dumps(payload, indent=1))
    typer.echo((report / "components.md").read_text())


@bench_app.command("analysis")
@reports_errors
def bench_analysis(
    suite: str = typer.Argument(..., help="timing (full MiniLM analysis, capture overhead), memory or pruning."),
    n_texts: int = typer.Option(256, help=f"Real WordNet sentences for the timing suite, 1 to {WORDNET_EXAMPLES}."),
    repeat: int = typer.Option(5, help="Timed runs (median reported)."),
    length: int = typer.Option(4096, help=f"Tokens of the long input of the memory suite, 1 to {MAX_SEQ}."),
    report: Path = typer.Option(Path("benchmarks/results"), help="Directory for the result files."),
) -> None:
    """Head-analysis suites: 72-head analysis time and capture overhead, streaming-stats memory, pruning."""
    from headwise.bench.analysis import main

    if suite not in ("timing", "memory", "pruning"):
        raise bad_argument("suite", "timing, memory or pruning", repr(suite))
    int_in("--n-texts", n_texts, 1, WORDNET_EXAMPLES)
    int_in("--repeat", repeat, 1, MAX_REPEAT)
    int_in("--length", length, 1, MAX_SEQ)
    out_dir(report, "--report")
    main([suite, "--out", str(report), "--n-texts", str(n_texts), "--repeat", str(repeat), "--length", str(length)])


bench_app.command("memory")(memory_bench)
bench_app.command("corpus")(bench_corpus)


@bench_app.command("serve")
@reports_errors
def bench_serve(
    n: int = typer.Option(100_000, help="Vectors in the served store."),
    dim: int = typer.Option(384, help="Their dimension (random normal vectors unless --vectors)."),
    index: str = typer.Option("hnsw", help="flat, hnsw or hnsw-fp16."),
    k: int = typer.Option(10, help="Results per query."),
    batch: int = typer.Option(256, help="Queries per batched request."),
    seconds: float = typer.Option(3.0, help="Seconds per configuration and round."),
    repeats: int = typer.Option(3, help="Rounds (median and min..max reported)."),
    vectors: Path | None = typer.Option(None, help="A (N, d) .npy of real vectors to serve instead of random ones."),
    report: Path = typer.Option(Path("benchmarks/results"), help="Directory for NAME.md and NAME.json."),
    name: str = typer.Option("serve", help="Base name of the result files."),
) -> None:
    """Search over HTTP (headwise serve, JSON and binary, 1 and 8 clients) against in-process search."""
    from headwise.bench.serve import run, to_markdown

    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        fail(f"bench serve: expected the server extra (pip install 'headwise[server]'), got {exc}")
    int_in("--n", n, 1, 10_000_000)
    int_in("--dim", dim, 1, 4096)
    int_in("--k", k, 1, 16_384)
    int_in("--batch", batch, 1, 16_384)
    int_in("--repeats", repeats, 1, MAX_REPEAT)
    if index not in ("flat", "hnsw", "hnsw-fp16"):
        raise bad_argument("--index", "flat, hnsw or hnsw-fp16", repr(index))
    if not 0.05 <= seconds <= 600:
        raise bad_argument("--seconds", "a number in [0.05, 600]", seconds)
    if vectors is not None:
        in_file(vectors, "--vectors")
    out_dir(report, "--report")
    if not name or "/" in name or name.startswith("."):
        raise bad_argument("--name", "a plain file name", repr(name))
    command = argv_command()
    with console.status("bench serve") as status:
        result = run(n=n, dim=dim, index=index, k=k, batch=batch, seconds=seconds, repeats=repeats, vectors=vectors,
                     command=command, progress=status.update)  # fmt: skip
    markdown = to_markdown(result)
    from headwise.fileio import write_atomic

    write_atomic(report / f"{name}.md", markdown)
    write_atomic(report / f"{name}.json", json.dumps(result, indent=2))
    console.print(markdown)


@bench_app.command("all")
@reports_errors
def bench_all(
    repeat: int = typer.Option(5, help="Timed runs per figure (median reported)."),
    memory_dir: Path | None = typer.Option(
        None, "--memory-dir", help="A 'headwise memory build' + 'train' directory: adds the vector-memory suite."
    ),
    report: Path = typer.Option(Path("benchmarks/results"), help="Directory for every result file."),
) -> None:
    """Every suite in turn: kernels, modules, components, analysis timing (and memory with --memory-dir)."""
    import subprocess

    from headwise.memory.cli import MANIFEST

    # Everything checked now: the memory suite runs last, after an hour of the others.
    int_in("--repeat", repeat, 1, MAX_REPEAT)
    out_dir(report, "--report")
    if memory_dir is not None:
        in_file(in_dir(memory_dir, "--memory-dir") / MANIFEST, "--memory-dir")
    bench_kernels(DEFAULT_SEQS, repeat, True, report, None, 0.10)
    bench_modules(repeat, True, report, None, 0.10)
    bench_components([128, 1024, 4096], 3, 512, 8, report)
    bench_analysis("timing", 256, repeat, 4096, report)
    if memory_dir is not None:
        # A subprocess: the memory command records its own command line from its context.
        cmd = [sys.executable, "-m", "headwise.cli", "memory", "bench", "--dir", str(memory_dir)]
        done = subprocess.run([*cmd, "--out", str(report / "memory_latency")])
        if done.returncode:  # its own one-line error is already on stderr
            raise typer.Exit(done.returncode)


@bench_app.command("compare")
@reports_errors
def bench_compare(
    old: Path = typer.Argument(..., help="Earlier result JSON (benchmarks/results/*.json)."),
    new: Path = typer.Argument(..., help="Newer result JSON of the same suite."),
    threshold: float = THRESHOLD_OPTION,
) -> None:
    """Regression table of two result files; exits 1 when a case got slower than the threshold."""
    _check_compare(old, threshold, "OLD")
    _check_compare(new, threshold, "NEW")
    _maybe_compare(old, new, threshold)


def _maybe_compare(old: Path | None, new: Path, threshold: float) -> None:
    """Print the regression table of ``new`` against ``old`` (if given); exit 1 on a regression."""
    if old is None:
        return
    from headwise.bench.compare import compare, load_records, to_markdown

    rows = compare(load_records(old), load_records(new), threshold)
    if not rows:
        fail(f"--compare: expected results with cases in common, got none in {old} and {new}: nothing compared")
    typer.echo(to_markdown(rows, str(old), str(new)))
    if any(r.regressed for r in rows):
        raise typer.Exit(1)


@app.command()
@reports_errors
def docs(out: Path = typer.Option(Path("docs/attend.md"), help="File to (re)write.")) -> None:
    """Regenerate the backend table in docs/attend.md from the registry."""
    from headwise.docs import render_attend_doc
    from headwise.fileio import write_atomic

    out_file(out)
    text = render_attend_doc(read_text(out, "--out") if out.exists() else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, text)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    app()
