"""``headwise memory train``: train query enhancers on a working directory, or on a store's recorded feedback.

Examples (see docs/memory-eval.md and docs/memory.md)::

    headwise memory train --dir runs/wordnet --method linear,multi-head
    headwise memory train --dir runs/wordnet --method multi-head --heads 8 --hidden 256 --dropout 0.1 --layers 3
    headwise memory train --from-feedback my-store --method multi-head     # writes my-store/enhancer
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import write_atomic
from headwise.memory.cli import _command, _fail, _load, _methods, _pseudo_training_set, console, memory_app

# The architecture options of EnhancerConfig, shared by train and sweep.
Heads = Annotated[int, typer.Option(help="attention heads per layer")]
Hidden = Annotated[int, typer.Option(help="feed-forward width after each attention layer (0: no feed-forward block)")]
Layers = Annotated[int, typer.Option(help="attention layers (cross attention to the candidates)")]
Dropout = Annotated[float, typer.Option(help="dropout on the candidate tokens and in the feed-forward blocks")]
Candidates = Annotated[int, typer.Option(help="K first-pass candidates of the attention stage")]
Experts = Annotated[int | None, typer.Option(help="MoE: experts (default: 4 when they divide --heads, else 1)")]
ExpertsPerToken = Annotated[int, typer.Option(help="MoE: experts each token is routed to (top-k)")]
CapacityFactor = Annotated[float, typer.Option(help="MoE: tokens an expert takes, relative to an even share")]
AuxWeight = Annotated[float, typer.Option(help="MoE: weight of the load-balancing loss in training")]
Curvature = Annotated[float, typer.Option(help="hyperbolic: initial (learned) curvature")]
Clip = Annotated[float, typer.Option(help="hyperbolic: tangent-space clip")]


def footprint_note(name: str, model: Any) -> str:
    """ "NAME: P parameters, B bytes (b per stored vector at 100k vectors)" for a table caption."""
    from headwise.memory.architecture import footprint

    fp = footprint(model)
    return (f"{name}: {fp['parameters']:,} parameters, {fp['bytes']:,} bytes "
            f"({fp['bytes_per_vector_at_100k']:.1f} per stored vector at 100k)")  # fmt: skip


@memory_app.command()
def train(
    ctx: typer.Context,
    dir: Annotated[Path | None, typer.Option(help="working directory made by 'build'")] = None,
    method: Annotated[str, typer.Option(help="comma-separated: linear, multi-head, hyperbolic, moe, flash")] = (
        "linear,multi-head"
    ),
    steps: Annotated[int, typer.Option(help="maximum optimizer steps (early stopping on validation)")] = 1500,
    batch_size: Annotated[int, typer.Option()] = 256,
    lr: Annotated[float, typer.Option()] = 1e-3,
    temperature: Annotated[float, typer.Option()] = 0.05,
    hard_weight: Annotated[float, typer.Option(help="weight of the mined hard-negative InfoNCE term")] = 0.5,
    candidates: Candidates = 32,
    heads: Heads = 8,
    hidden: Hidden = 0,
    layers: Layers = 1,
    eval_every: Annotated[int, typer.Option()] = 100,
    patience: Annotated[int, typer.Option()] = 4,
    seed: Annotated[int, typer.Option()] = 0,
    adapter_from: Annotated[
        str | None,
        typer.Option(
            help="a trained linear model in DIR/models (e.g. linear): the attention enhancers start from its "
            "adapter, frozen, and take their first-pass candidates from the adapted query"
        ),
    ] = None,
    first_pass: Annotated[
        str, typer.Option(help="with --adapter-from: candidates from the 'adapted' (default) or the 'raw' query")
    ] = "adapted",
    train_adapter: Annotated[
        bool, typer.Option(help="with --adapter-from: keep training the copied adapter instead of freezing it")
    ] = False,
    dropout: Dropout = 0.0,
    experts: Experts = None,
    experts_per_token: ExpertsPerToken = 1,
    capacity_factor: CapacityFactor = 1.25,
    aux_weight: AuxWeight = 0.01,
    curvature: Curvature = 1.0,
    clip: Clip = 4.0,
    self_supervised: Annotated[
        int,
        typer.Option(
            help="train on N pseudo-queries cut from the corpus (a span of a document as its query) instead of "
            "the labelled queries, validating on N/10 more; 0: off"
        ),
    ] = 0,
    pseudo_style: Annotated[
        str,
        typer.Option(
            help="pseudo-queries of --self-supervised / --pseudo-mix: span (a span of a document as its query), "
            "lemma (a title word of the document inside a span of another document), mixed"
        ),
    ] = "span",
    pseudo_mix: Annotated[
        int,
        typer.Option(
            help="add N corpus pseudo-queries to the labelled training queries (and N/10 to validation), never "
            "drawn from the targets of validation or test queries: a mixture of query styles; 0: off"
        ),
    ] = 0,
    name: Annotated[str | None, typer.Option(help="model folder to write (default: the method's name)")] = None,
    from_feedback: Annotated[
        Path | None,
        typer.Option(
            help="instead of --dir: a VectorMemory directory; train on the (query, relevant ids) pairs recorded with "
            "record_feedback and save the enhancer next to the store (method linear or multi-head)"
        ),
    ] = None,
) -> None:
    """Train enhancers with InfoNCE over the whole corpus plus kNN-mined hard negatives; save the best."""
    from headwise.memory.enhancer import LinearAdapter, load_enhancer
    from headwise.memory.train import TrainConfig, TrainData, make_model
    from headwise.memory.train import train as run_training

    arch = {"heads": heads, "hidden": hidden, "layers": layers, "dropout": dropout, "candidates": candidates,
            "experts": experts, "experts_per_token": experts_per_token, "capacity_factor": capacity_factor,
            "aux_weight": aux_weight, "curvature": curvature, "clip": clip}  # fmt: skip
    try:
        for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--eval-every", eval_every),
                            ("--patience", patience), ("--candidates", candidates)):  # fmt: skip
            if value < 1:  # checked before anything is loaded or mined
                raise bad_argument(flag, "an integer >= 1", value)
        if not (lr > 0 and temperature > 0):
            raise bad_argument("--lr/--temperature", "numbers > 0", (lr, temperature))
        names = [m for m in _methods(method) if m != "knn"]
        if name is not None and len(names) != 1:
            raise bad_argument("--name", "one --method with it", names)
        if (dir is None) == (from_feedback is None):
            raise bad_argument(
                "--dir/--from-feedback", "exactly one of them", f"dir={dir}, from_feedback={from_feedback}"
            )
        if from_feedback is not None:
            from headwise.memory.fit import FitConfig

            if names not in (["linear"], ["multi-head"], ["linear", "multi-head"]) or adapter_from:
                raise bad_argument("--from-feedback", "one --method, linear or multi-head, and no --adapter-from",
                                   f"method={method}")  # fmt: skip
            fit = FitConfig(method=names[-1],  # "linear,multi-head" is what multi-head runs
                            steps=steps, multi_head_steps=steps, lr=lr, batch_size=batch_size,
                            enhancer=_enhancer_config(arch), eval_every=eval_every, patience=patience,
                            seed=seed)  # fmt: skip
            return _train_from_feedback(ctx, from_feedback, fit)
        assert dir is not None
        manifest, ds, docs, queries = _load(dir)
        relevant, train_idx, val_idx = ds.relevant, ds.split["train"], ds.split["validation"]
        if self_supervised < 0:
            raise bad_argument("--self-supervised", "an integer >= 0", self_supervised)
        if pseudo_mix < 0 or (pseudo_mix and self_supervised):
            raise bad_argument("--pseudo-mix", "an integer >= 0, without --self-supervised", pseudo_mix)
        if self_supervised:
            queries, relevant, train_idx, val_idx = _pseudo_training_set(ds, self_supervised, seed, style=pseudo_style)
        if pseudo_mix:
            queries, relevant, train_idx, val_idx = _mixed_training_set(ds, queries, pseudo_mix, seed, pseudo_style)
        cfg = TrainConfig(
            steps=steps, batch_size=batch_size, lr=lr, temperature=temperature, hard_weight=hard_weight,
            eval_every=eval_every, patience=patience, seed=seed,
        )  # fmt: skip
        adapter = None
        if first_pass not in ("raw", "adapted"):
            raise bad_argument("--first-pass", "'raw' or 'adapted'", repr(first_pass))
        if adapter_from is None and (first_pass != "adapted" or train_adapter):
            raise bad_argument("--first-pass, --train-adapter", "--adapter-from as well", "no --adapter-from")
        if adapter_from is not None:
            if adapter_from in names:
                raise bad_argument("--adapter-from", "a model trained before this command", repr(adapter_from))
            found = dir / "models" / adapter_from
            adapter = load_enhancer(found) if (found / "enhancer.json").is_file() else None
            if not isinstance(adapter, LinearAdapter):
                got = type(adapter).__name__ if adapter is not None else f"no model in {found}"
                raise bad_argument("--adapter-from", "the name of a trained linear adapter in DIR/models", got)
        datasets: dict[str, TrainData] = {}

        def data_for(model: Any) -> TrainData:
            first = getattr(model, "first_pass", "raw")
            if first not in datasets:
                fq = model.first_pass_queries(queries) if first != "raw" else None
                with console.status(f"mining {first} first-pass candidates and hard negatives (exact kNN)"):
                    datasets[first] = TrainData.build(
                        docs, queries, relevant, train_idx, val_idx, k=candidates,
                        hard_negatives=cfg.hard_negatives, first_queries=fq,
                    )  # fmt: skip
            return datasets[first]
    except HeadwiseError as exc:
        _fail(exc)
    what = "corpus pseudo-queries" if self_supervised else "labelled and pseudo-queries" if pseudo_mix else "queries"
    table = Table(title=f"trained on {manifest['name']}: {len(train_idx):,} {what}")
    if adapter is not None:
        how = "trained further" if train_adapter else "frozen"
        table.caption = f"* on top of {adapter_from!r}'s adapter ({how}), candidates from the {first_pass} query"
    notes = [table.caption] if table.caption else []
    for col in ("method", "val R@10 before", "best val R@10", "best step", "steps run", "seconds"):
        table.add_column(col, justify="right")
    for method_name in names:
        attention = method_name != "linear" and adapter is not None
        try:
            model = make_model(method_name, docs.shape[1], seed=seed, first_pass=first_pass if attention else "raw",
                               **arch)  # fmt: skip
        except HeadwiseError as exc:
            _fail(exc)
        if attention:
            model.adopt_adapter(adapter, freeze=not train_adapter)
        try:
            data = data_for(model)
        except HeadwiseError as exc:
            _fail(exc)
        t0 = time.perf_counter()
        cols = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        with Progress(*cols, console=console, transient=True) as bar:
            task = bar.add_task(f"training {method_name}", total=steps, info="")

            def report(step: int, entry: dict, bar: Progress = bar, task: int = task) -> None:
                bar.update(task, completed=step, info=f"val R@10 {entry['val_recall@10']:.4f}")

            hist = run_training(model, data, cfg, progress=report)
        where = dir / "models" / (name or method_name)
        model.save(where)
        from headwise.memory.architecture import footprint

        history = {"records": hist.records, "best_step": hist.best_step, "config": hist.config,
                   "seconds": time.perf_counter() - t0, "footprint": footprint(model),
                   "command": _command(ctx)}  # fmt: skip
        write_atomic(where / "history.json", json.dumps(history, indent=2))
        table.add_row(
            (name or method_name) + ("*" if attention else ""), f"{hist.records[0]['val_recall@10']:.4f}",
            f"{hist.best_recall:.4f}", str(hist.best_step),
            str(hist.records[-1]["step"]), f"{history['seconds']:.0f}",
        )  # fmt: skip
        notes.append(footprint_note(name or method_name, model))
    table.caption = "\n".join(notes)
    console.print(table)


def _enhancer_config(arch: dict[str, Any]) -> Any:
    from headwise.memory.architecture import EnhancerConfig

    return EnhancerConfig(**arch)


def _train_from_feedback(ctx: typer.Context, store: Path, fit: Any) -> None:
    """Train on the feedback recorded in the store at ``store``; save the enhancer next to it."""
    from headwise.memory import VectorMemory
    from headwise.memory.feedback import feedback_training_set
    from headwise.memory.fit import ENHANCER_DIR, fit_enhancer, save_enhancer

    try:
        memory = VectorMemory.open(store)
    except HeadwiseError as exc:
        _fail(exc)
    with memory:
        queries, relevant = feedback_training_set(memory)
        if len(queries) < 2:
            _fail(bad_argument("--from-feedback", "a store with at least 2 recorded feedback pairs", len(queries)))
        t0 = time.perf_counter()
        try:
            enhancer, history = fit_enhancer(memory, queries, relevant, fit)
        except HeadwiseError as exc:
            _fail(exc)
        where = save_enhancer(memory, enhancer)
    seconds = time.perf_counter() - t0
    record = {
        stage: {"records": h.records, "best_step": h.best_step, "config": h.config} for stage, h in history.items()
    }
    summary = {"stages": record, "feedback_pairs": len(queries), "seconds": seconds, "command": _command(ctx)}
    write_atomic(where / "history.json", json.dumps(summary, indent=2))
    table = Table(title=f"trained on {len(queries):,} feedback pairs of {store} -> {store / ENHANCER_DIR}")
    for col in ("stage", "val R@10 before", "best val R@10", "best step"):
        table.add_column(col, justify="right")
    for stage, h in history.items():
        table.add_row(stage, f"{h.records[0]['val_recall@10']:.4f}", f"{h.best_recall:.4f}", str(h.best_step))
    table.caption = (f"{footprint_note(fit.method, enhancer)}\n{seconds:.0f} s; load it with "
                     "headwise.memory.fit.load_saved_enhancer(memory)")  # fmt: skip
    console.print(table)


def _mixed_training_set(ds: Any, queries: Any, n: int, seed: int, style: str) -> tuple[Any, list, Any, Any]:
    """Labelled train + ``n`` pseudo-queries, labelled validation + n // 10 pseudo-queries (queries, relevance,
    train indices, validation indices); no pseudo-query targets a validation or test query's document."""
    import numpy as np

    held = sorted({d for part in ("validation", "test") for i in ds.split[part] for d in ds.relevant[i]})
    emb, rel, p_tr, p_va = _pseudo_training_set(ds, n, seed, exclude=held, option="--pseudo-mix", style=style)
    tr, va = ds.split["train"], ds.split["validation"]
    all_q = np.concatenate([queries[tr], emb[p_tr], queries[va], emb[p_va]])
    relevant = [ds.relevant[i] for i in tr] + [rel[i] for i in p_tr] + [ds.relevant[i] for i in va]
    relevant += [rel[i] for i in p_va]
    n_train = len(tr) + len(p_tr)
    return all_q, relevant, np.arange(n_train), np.arange(n_train, len(all_q))
