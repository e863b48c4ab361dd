"""``headwise memory sweep``: the architecture sweep of :mod:`headwise.memory.sweep`, as a table and a figure.

Example (the committed run, see docs/memory-eval.md)::

    headwise memory sweep --dir runs/wordnet \\
        --queries data/transfer/wordnet-foldoc.jsonl.gz --queries data/transfer/wordnet-devil.jsonl.gz \\
        --out benchmarks/results/memory_sweep
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from headwise.cliutil import out_file
from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import write_atomic
from headwise.memory.cli import _command, _fail, _load, console, memory_app
from headwise.memory.cli_train import Candidates, Dropout, Heads, Hidden, Layers

DEFAULT_FACTORS = "heads=1,4,8,16;hidden=0,128,256,512;layers=1,2,3;dropout=0,0.1,0.2"


def parse_factors(spec: str) -> dict[str, tuple[Any, ...]]:
    """ "heads=1,4;dropout=0,0.1" -> {"heads": (1, 4), "dropout": (0.0, 0.1)} (dropout float, the rest int)."""
    out: dict[str, tuple[Any, ...]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, values = part.partition("=")
        if name not in ("heads", "hidden", "layers", "dropout", "candidates") or not values:
            raise bad_argument("--factors", "NAME=v1,v2;... with NAME in heads, hidden, layers, dropout, candidates",
                               repr(part))  # fmt: skip
        cast = float if name == "dropout" else int
        try:
            out[name] = tuple(cast(v) for v in values.split(","))
        except ValueError as exc:
            raise bad_argument("--factors", f"{cast.__name__} values for {name}", repr(values)) from exc
    if not out:
        raise bad_argument("--factors", "at least one factor", repr(spec))
    return out


@memory_app.command("sweep")
def sweep(
    ctx: typer.Context,
    dir: Annotated[Path, typer.Option(help="working directory made by 'build' (and 'train' for --adapter-from)")],
    out: Annotated[Path, typer.Option(help="write OUT.md, OUT.json and OUT.png")],
    queries: Annotated[
        list[Path] | None, typer.Option(help="a transfer query file (JSONL) evaluated too; repeatable")
    ] = None,
    factors: Annotated[str, typer.Option(help="NAME=v1,v2;... varied one at a time around the default")] = (
        DEFAULT_FACTORS
    ),
    seeds: Annotated[str, typer.Option(help="comma-separated training seeds per row")] = "0,1,2",
    adapter_from: Annotated[
        str | None, typer.Option(help="a trained linear model in DIR/models every row starts from ('' for none)")
    ] = "linear",
    docs: Annotated[int, typer.Option(help="documents in the slice (every needed one, then random ones)")] = 20000,
    train_queries: Annotated[int, typer.Option(help="training queries sampled from the train split")] = 4000,
    validation_queries: Annotated[int, typer.Option(help="validation queries (early stopping)")] = 500,
    test_queries: Annotated[int, typer.Option(help="test queries (in-distribution figures)")] = 1000,
    steps: Annotated[int, typer.Option(help="maximum optimizer steps per run")] = 200,
    batch_size: Annotated[int, typer.Option()] = 256,
    lr: Annotated[float, typer.Option()] = 2e-3,
    eval_every: Annotated[int, typer.Option()] = 50,
    patience: Annotated[int, typer.Option()] = 3,
    heads: Heads = 8,
    hidden: Hidden = 0,
    layers: Layers = 1,
    dropout: Dropout = 0.0,
    candidates: Candidates = 32,
    slice_seed: Annotated[int, typer.Option(help="seed of the query and document sample")] = 0,
) -> None:
    """Train the default enhancer with one factor changed at a time, 3 seeds each; table, CV% and figure."""
    from headwise.memory.architecture import EnhancerConfig
    from headwise.memory.datasets import embed
    from headwise.memory.enhancer import LinearAdapter, load_enhancer
    from headwise.memory.sweep import QuerySet, make_slice, run_sweep, sweep_rows
    from headwise.memory.train import TrainConfig
    from headwise.memory.transfer import read_query_file

    try:
        out_file(out.with_suffix(".md"))
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        if not seed_list:
            raise bad_argument("--seeds", "at least one integer", repr(seeds))
        base = EnhancerConfig(heads=heads, hidden=hidden, layers=layers, dropout=dropout, candidates=candidates)
        rows = sweep_rows(parse_factors(factors), base)
        manifest, ds, all_docs, all_queries = _load(dir)
        for _, _, cfg in rows:
            cfg.build(all_docs.shape[1])  # every row's options are checked before hours of training
        adapter = None
        if adapter_from:
            adapter = load_enhancer(dir / "models" / adapter_from)
            if not isinstance(adapter, LinearAdapter):
                raise bad_argument("--adapter-from", "a trained linear adapter in DIR/models", type(adapter).__name__)
        transfer = []
        for path in queries or []:
            qf = read_query_file(path, ds.doc_ids)
            transfer.append(QuerySet(qf.name, embed(qf.queries, description=f"{qf.name}: queries"), qf.relevant))
        data = make_slice(all_docs, all_queries, ds.relevant, ds.split, transfer, n_docs=docs, n_train=train_queries,
                          n_val=validation_queries, n_test=test_queries, seed=slice_seed)  # fmt: skip
        data.eval_sets[0].name = f"{manifest['name']} test"
        tc = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, patience=patience)
    except HeadwiseError as exc:
        _fail(exc)
    cols = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*cols, console=console) as bar:
        task = bar.add_task("sweep", total=len(rows) * len(seed_list) + 1)

        def step(what: str) -> None:
            bar.update(task, description=f"sweep: done {what}", advance=1)

        result = run_sweep(data, rows, seed_list, tc, adapter=adapter, progress=step)
    result.update({
        "command": _command(ctx), "slice": {"documents": len(data.docs), "of": data.full_docs,
        "train": train_queries, "validation": validation_queries,
        "sets": {s.name: len(s.relevant) for s in data.eval_sets}},
        "seeds": seed_list, "machine": {"cpus": os.cpu_count(), "load": os.getloadavg()},
    })  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), json.dumps(result, indent=2, default=float))
    write_atomic(out.with_suffix(".md"), sweep_markdown(result))
    sweep_figure(result, out.with_suffix(".png"))
    console.print(sweep_markdown(result))
    console.print(f"wrote {out.with_suffix('.md')}, .json and .png")


def sweep_markdown(result: dict[str, Any]) -> str:
    """The sweep as Markdown: one row per (factor, value), mean ± std over seeds, CV%, latency, memory."""
    sets = list(result["slice"]["sets"])
    head = ["factor", "value"] + [f"{s} {m}" for s in sets for m in ("R@10", "NDCG@10")]
    head += [f"CV% R@10 ({sets[0]})", "search µs p50 / p90", "parameters", "bytes/vector @100k", "train s"]
    lines = [
        "# Enhancer architecture sweep (one factor at a time around the default)",
        "",
        f"Slice: {result['slice']['documents']:,} of {result['slice']['of']:,} documents (every document a sampled "
        f"or transfer query needs, then random ones), {result['slice']['train']:,} training and "
        f"{result['slice']['validation']:,} validation queries; evaluation sets: "
        + ", ".join(f"{k} ({v:,} queries)" for k, v in result["slice"]["sets"].items())
        + f". Seeds {result['seeds']} per row: mean ± sample std. Figures are against the slice, comparable "
        "with each other and with the baselines below, not with the full-corpus tables. Search latency: "
        "one query's first pass, refinement and second pass on the exact flat index of the slice, the "
        "seed-0 model of every row timed in turns query by query (200 queries) after all were trained.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, metrics in result["baselines"].items():
        cells = [name, "-"] + [f"{metrics[s][m]:.4f}" for s in sets for m in ("recall@10", "ndcg@10")]
        lines.append("| " + " | ".join(cells + ["-", "-", "-", "-", "-"]) + " |")
    for row in result["rows"]:
        s = row["summary"]
        cells = [row["factor"], "-" if row["value"] is None else str(row["value"])]
        cells += [f"{s[f'{n} {m}']['mean']:.4f} ± {s[f'{n} {m}']['std']:.4f}" for n in sets
                  for m in ("recall@10", "ndcg@10")]  # fmt: skip
        cells += [f"{s[f'{sets[0]} recall@10']['cv%']:.2f}", f"{s['latency_us']:.0f} / {s['latency_p90_us']:.0f}",
                  f"{s['parameters']:,}",
                  f"{s['bytes_per_vector_at_100k']:.1f}", f"{s['train_seconds']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    lines += ["", f"Machine: {m['cpus']} CPUs, load {m['load'][0]:.2f} at the end of the run.", "",
              f"Command: `{result['command']}`", ""]  # fmt: skip
    return "\n".join(lines)


def sweep_figure(result: dict[str, Any], path: Path) -> None:
    """One panel per factor: recall@10 of each evaluation set against the factor's value, ± std, kNN dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    sets = list(result["slice"]["sets"])
    default = next(r for r in result["rows"] if r["factor"] == "default")
    factors = list(dict.fromkeys(r["factor"] for r in result["rows"] if r["factor"] != "default"))
    fig, axes = plt.subplots(1, max(1, len(factors)), figsize=(4 * max(1, len(factors)), 3.6), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        points = [(default["config"][factor], default)] + [(r["value"], r) for r in result["rows"]
                                                            if r["factor"] == factor]  # fmt: skip
        points.sort(key=lambda p: p[0])
        for i, name in enumerate(sets):
            stats = [p[1]["summary"][f"{name} recall@10"] for p in points]
            xs = np.arange(len(points))
            ax.errorbar(xs, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o", capsize=3,
                        color=f"C{i}", label=name)  # fmt: skip
            ax.axhline(result["baselines"]["knn"][name]["recall@10"], color=f"C{i}", ls="--", lw=0.8)
        ax.set_xticks(np.arange(len(points)), [str(p[0]) for p in points])
        ax.set_xlabel(factor)
        ax.set_ylabel("recall@10 (dashed: cosine kNN)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Enhancer sweep: one factor at a time, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
