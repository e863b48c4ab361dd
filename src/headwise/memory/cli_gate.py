"""``headwise memory gate``: train a do-no-harm gate around a trained enhancer (see memory.gate).

Example (see docs/memory-eval.md)::

    headwise memory gate --dir runs/wordnet --inner multi-head        # writes DIR/models/multi-head-gated
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import write_atomic
from headwise.memory.cli import _command, _fail, _load, _pseudo_training_set, console, memory_app


@memory_app.command("gate")
def gate(
    ctx: typer.Context,
    dir: Annotated[Path, typer.Option(help="working directory made by 'build' and 'train'")],
    inner: Annotated[str, typer.Option(help="the trained model in DIR/models to gate (frozen)")] = "multi-head",
    pseudo: Annotated[int, typer.Option(help="corpus pseudo-queries for training")] = 20000,
    pseudo_validation: Annotated[int, typer.Option(help="more corpus pseudo-queries for validation")] = 2000,
    steps: Annotated[int, typer.Option(help="maximum optimizer steps (early stopping on validation)")] = 400,
    batch_size: Annotated[int, typer.Option(help="queries per step, half of each style")] = 256,
    lr: Annotated[float, typer.Option()] = 3e-3,
    harm_weight: Annotated[
        float, typer.Option(help="extra weight on the loss of queries the gated move makes worse than the raw query")
    ] = 0.0,
    hidden: Annotated[int, typer.Option(help="width of the gate's hidden layer")] = 64,
    read_query: Annotated[
        bool, typer.Option(help="feed the query vector itself to the gate (else only its summary features)")
    ] = True,
    fallback: Annotated[
        str | None,
        typer.Option(help="a linear model in DIR/models where a closed gate sends the query (default: the raw query)"),
    ] = None,
    anchors: Annotated[
        int, typer.Option(help="training queries kept as familiarity anchors (not trained on; 0: none)")
    ] = 4096,
    eval_every: Annotated[int, typer.Option()] = 50,
    patience: Annotated[int, typer.Option()] = 4,
    seed: Annotated[int, typer.Option()] = 0,
    name: Annotated[str | None, typer.Option(help="model folder to write (default INNER-gated)")] = None,
) -> None:
    """Train a gate that scales the enhancer's move per query, on labelled and corpus pseudo-queries."""
    from headwise.memory.enhancer import load_enhancer
    from headwise.memory.gate import GateConfig, GateData, GatedEnhancer, train_gate

    t0 = time.perf_counter()
    try:
        if min(pseudo, pseudo_validation, steps, eval_every) < 1 or batch_size < 2:
            raise bad_argument("--pseudo/--pseudo-validation/--steps/--batch-size/--eval-every",
                               "positive integers (batch size >= 2)",
                               (pseudo, pseudo_validation, steps, batch_size, eval_every))  # fmt: skip
        manifest, ds, docs, queries = _load(dir)
        base = load_enhancer(dir / "models" / fallback) if fallback is not None else None
        gated = GatedEnhancer(load_enhancer(dir / "models" / inner), hidden=hidden, anchors=anchors,
                              read_query=read_query, fallback=base)  # fmt: skip
        if not 0 <= anchors <= len(ds.split["train"]) // 2:
            raise bad_argument("--anchors", f"0 .. half the training queries ({len(ds.split['train']) // 2})", anchors)
        held = {d for part in ("validation", "test") for i in ds.split[part] for d in ds.relevant[i]}
        n_val = pseudo_validation
        pseudo_emb, pseudo_rel, _, _ = _pseudo_training_set(ds, pseudo, seed, n_val=n_val, exclude=sorted(held),
                                                             option="--pseudo")  # fmt: skip
        if len(pseudo_rel) < n_val + 1:
            raise bad_argument("--pseudo", f"a corpus with more than {n_val} usable documents", len(pseudo_rel))
    except HeadwiseError as exc:
        _fail(exc)
    tr, va = ds.split["train"], ds.split["validation"]
    if anchors:  # anchors are held out of the gate's training: a query is never its own anchor
        held_out = np.random.default_rng(seed).permutation(len(tr))
        gated.set_anchors(queries[tr[np.sort(held_out[:anchors])]])
        tr = tr[np.sort(held_out[anchors:])]
    n_tr = len(pseudo_rel) - n_val
    all_q = np.concatenate([queries[tr], queries[va], pseudo_emb])
    relevant = [ds.relevant[i] for i in tr] + [ds.relevant[i] for i in va] + pseudo_rel
    style = np.concatenate([np.zeros(len(tr) + len(va)), np.ones(len(pseudo_rel))])
    train_idx = np.concatenate([np.arange(len(tr)), len(tr) + len(va) + np.arange(n_tr)])
    val_idx = np.concatenate([len(tr) + np.arange(len(va)), len(tr) + len(va) + n_tr + np.arange(n_val)])
    with console.status("first pass and inner enhancer over every training query"):
        data = GateData.build(gated, docs, all_q, relevant, style)
    cfg = GateConfig(steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, patience=patience, seed=seed,
                     harm_weight=harm_weight)  # fmt: skip
    cols = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*cols, console=console, transient=True) as bar:
        task = bar.add_task(f"training the gate of {inner}", total=steps, info="")

        def report(step: int, rec: dict) -> None:
            info = f"val R@10 labelled {rec['val_recall@10 labelled']:.4f}, pseudo {rec['val_recall@10 pseudo']:.4f}"
            bar.update(task, completed=step, info=info)

        records = train_gate(gated, data, docs, train_idx, val_idx, cfg, progress=report)
    where = dir / "models" / (name or f"{inner}-gated")
    gated.save(where)
    best = max(records, key=lambda r: r["objective"])
    history = {"records": records, "best_step": best["step"], "config": vars(cfg), "inner": inner, "anchors": anchors,
               "pseudo_queries": {"train": n_tr, "validation": n_val}, "seconds": time.perf_counter() - t0,
               "command": _command(ctx)}  # fmt: skip
    write_atomic(where / "history.json", json.dumps(history, indent=2))
    table = Table(title=f"gate of {inner!r} written to {where}")
    for col in ("", "val R@10 labelled", "val R@10 pseudo", "step"):
        table.add_column(col, justify="right")
    for label, rec in (("before (g = 0.5)", records[0]), ("best", best)):
        table.add_row(label, f"{rec['val_recall@10 labelled']:.4f}", f"{rec['val_recall@10 pseudo']:.4f}",
                      str(rec["step"]))  # fmt: skip
    console.print(table)
