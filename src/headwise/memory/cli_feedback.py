"""``headwise memory feedback-sim``: the simulated feedback loop of :mod:`headwise.memory.feedback_loop` on real data.

Example (the committed run, see docs/memory-eval.md)::

    headwise memory feedback-sim --dir runs/wordnet --out benchmarks/results/memory_feedback
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from headwise.cliutil import out_file
from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import write_atomic
from headwise.memory.cli import _command, _fail, _load, console, memory_app


@memory_app.command("feedback-sim")
def feedback_sim(
    ctx: typer.Context,
    dir: Annotated[Path, typer.Option(help="working directory made by 'build'")],
    out: Annotated[Path, typer.Option(help="write OUT.md, OUT.json and OUT.png")],
    batches: Annotated[str, typer.Option(help="cumulative feedback counts at which the enhancer is refitted")] = (
        "100,250,500,1000,2000,4000"
    ),
    method: Annotated[str, typer.Option(help="linear or multi-head (fit_enhancer's recipe)")] = "linear",
    docs: Annotated[int, typer.Option(help="documents in the store (every needed one, then random ones)")] = 20000,
    test_queries: Annotated[int, typer.Option(help="held-out test queries searched after each refit")] = 1000,
    steps: Annotated[int, typer.Option(help="maximum optimizer steps per refit (early stopping)")] = 300,
    batch_size: Annotated[int, typer.Option()] = 256,
    lr: Annotated[float, typer.Option()] = 2e-3,
    eval_every: Annotated[int, typer.Option()] = 50,
    seed: Annotated[int, typer.Option(help="seed of the sample and of training")] = 0,
    queries: Annotated[
        list[Path] | None, typer.Option(help="a transfer query file (JSONL) searched after each refit too; repeatable")
    ] = None,
) -> None:
    """W1 training queries arrive as record_feedback pairs in batches; after each, refit and search the test queries."""
    import numpy as np

    from headwise.memory import VectorMemory
    from headwise.memory.datasets import embed
    from headwise.memory.feedback_loop import simulate_feedback
    from headwise.memory.fit import FitConfig
    from headwise.memory.sweep import QuerySet, make_slice
    from headwise.memory.transfer import read_query_file

    try:
        out_file(out.with_suffix(".md"))
        counts = [int(b) for b in batches.split(",") if b.strip()]
        if method not in ("linear", "multi-head"):
            raise bad_argument("--method", "linear or multi-head", repr(method))
        manifest, ds, all_docs, all_queries = _load(dir)
        if not counts:
            raise bad_argument("--batches", "comma-separated counts", repr(batches))
        transfer = []
        for path in queries or []:
            qf = read_query_file(path, ds.doc_ids)
            transfer.append(QuerySet(qf.name, embed(qf.queries, description=f"{qf.name}: queries"), qf.relevant))
        data = make_slice(all_docs, all_queries, ds.relevant, ds.split, transfer, n_docs=docs, n_train=counts[-1],
                          n_val=1, n_test=test_queries, seed=seed)  # fmt: skip
        # Feedback arrives in a random order (make_slice sorts its sample).
        order = np.random.default_rng(seed).permutation(counts[-1])
        feedback_q = data.queries[order]
        feedback_rel = [sorted(data.relevant[i]) for i in order]
        memory = VectorMemory(all_docs.shape[1])
        memory.add(data.docs)  # ids 0..N-1: the slice rows
        fit = FitConfig(method=method, steps=steps, multi_head_steps=steps, lr=lr, batch_size=batch_size,
                        eval_every=eval_every, seed=seed)  # fmt: skip
        test = data.eval_sets[0]
        cols = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*cols, console=console) as bar:
            task = bar.add_task("feedback loop", total=len(counts))

            def step(n: int) -> None:
                bar.update(task, advance=1, description=f"refitted at {n} pairs")

            others = {qs.name: (qs.queries, qs.relevant) for qs in data.eval_sets[1:]}
            rows = simulate_feedback(memory, feedback_q, feedback_rel, test.queries, test.relevant, counts, fit,
                                     other_sets=others, progress=step)  # fmt: skip
    except HeadwiseError as exc:
        _fail(exc)
    result = {"rows": rows, "method": method, "dataset": manifest["name"], "documents": len(data.docs),
              "test_queries": len(test.relevant), "command": _command(ctx),
              "machine": {"cpus": os.cpu_count(), "load": os.getloadavg()}}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), json.dumps(result, indent=2))
    write_atomic(out.with_suffix(".md"), feedback_markdown(result))
    feedback_figure(result, out.with_suffix(".png"))
    console.print(feedback_markdown(result))


def feedback_markdown(result: dict[str, Any]) -> str:
    """The loop as Markdown: recall@10 and NDCG@10 after each refit, and the change over plain search."""
    base = result["rows"][0]
    lines = [
        f"# Simulated feedback loop ({result['dataset']}, method {result['method']})",
        "",
        f"A store of {result['documents']:,} documents; {result['dataset']} training queries arrive as "
        "`record_feedback` pairs; after each batch `fit_enhancer` refits on every pair recorded so far and "
        f"{result['test_queries']:,} held-out test queries (and any transfer sets, level and change) are "
        "searched with `memory.search`. Row 0: plain search.",
        "",
    ]
    others = list(base.get("other", {}))
    head = ["feedback pairs", "recall@10", "change", "NDCG@10", "change"]
    head += [f"{name} {m}" for name in others for m in ("recall@10", "NDCG@10")] + ["best val R@10", "refit s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        d_rec, d_ndcg = r["recall@10"] - base["recall@10"], r["ndcg@10"] - base["ndcg@10"]
        cells = [
            f"{r['feedback']:,}",
            f"{r['recall@10']:.4f}",
            f"{d_rec:+.4f}",
            f"{r['ndcg@10']:.4f}",
            f"{d_ndcg:+.4f}",
        ]
        for name in others:  # the level, and its change over plain search
            for m in ("recall@10", "ndcg@10"):
                now, was = r["other"][name][m], base["other"][name][m]
                cells.append(f"{now:.4f} ({now - was:+.4f})")
        cells.append(f"{r['best_val_recall@10']:.4f}" if "best_val_recall@10" in r else "-")
        cells.append(f"{r['seconds']:.0f}" if "seconds" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def feedback_figure(result: dict[str, Any], path: Path) -> None:
    """Recall@10 and NDCG@10 against the number of feedback pairs (log scale), plain search dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = result["rows"][1:]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, metric in enumerate(("recall@10", "ndcg@10")):
        ax.plot([r["feedback"] for r in rows], [r[metric] for r in rows], marker="o", color=f"C{i}", label=metric)
        ax.axhline(result["rows"][0][metric], color=f"C{i}", ls="--", lw=0.8)
    for i, name in enumerate(result["rows"][0].get("other", {}), start=2):  # transfer sets: recall@10
        ax.plot([r["feedback"] for r in rows], [r["other"][name]["recall@10"] for r in rows], marker="s",
                color=f"C{i}", label=f"{name} recall@10")  # fmt: skip
        ax.axhline(result["rows"][0]["other"][name]["recall@10"], color=f"C{i}", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("feedback pairs recorded")
    ax.set_ylabel("test metric (dashed: no enhancer)")
    ax.set_title(f"Feedback loop on {result['dataset']} ({result['method']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
