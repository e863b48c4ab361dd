"""``headwise analyze``: per-head metrics of a real encoder on a text or a corpus.

Wire it into a typer app with ``app.command("analyze")(analyze)``. It prints a rich table of
per-head metrics and where each layer's [CLS] row attends, and writes ``analysis.json`` and
PNG figures (per-head heatmaps, head x head diversity, entropy per layer, importance) to
``--out``. ``--file`` reads one text per non-empty line, with a progress bar.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from headwise.errors import HeadwiseError


def parse_indices(spec: str | None, name: str, top: int) -> list[int] | None:
    """ "0,2,4-5" -> [0, 2, 4, 5] (each in [0, top)); None or "" -> None (all).

    Example::

        >>> parse_indices("0,2,4-5", "layers", 6)
        [0, 2, 4, 5]
    """
    if spec is None or not spec.strip():
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise HeadwiseError(f"{name}: expected indices like '0,2,4-5', got {spec!r}") from None
    if not out or min(out) < 0 or max(out) >= top:
        raise HeadwiseError(f"{name}: expected indices in [0, {top}), got {spec!r}")
    return sorted(out)


def analyze(
    model: str = typer.Option("minilm", help="'minilm' (bundled all-MiniLM-L6-v2) or a local model directory."),
    text: str | None = typer.Option(None, help="One text to analyse."),
    file: Path | None = typer.Option(None, help="A corpus: one text per non-empty line."),
    layers: str | None = typer.Option(None, help="Layers to keep, e.g. '0,2,4-5' (default all)."),
    heads: str | None = typer.Option(None, help="Heads to keep in every layer (default all)."),
    stats_only: bool = typer.Option(False, help="Streaming entropy / max weight only: no L x S weights kept."),
    importance: bool = typer.Option(True, help="Gradient head importance (needs 2+ texts)."),
    out: Path | None = typer.Option(None, help="Directory for analysis.json and PNG figures."),
    batch_size: int = typer.Option(32, help="Texts per forward pass."),
) -> None:
    """Per-head attention metrics, [CLS] targets, diversity and importance of a transformers encoder."""
    from headwise.analysis import register
    from headwise.analysis.corpus import analyze_texts
    from headwise.pretrained import load_minilm

    console = Console()
    if (text is None) == (file is None):
        raise typer.BadParameter("give exactly one of --text or --file")
    if file is not None:
        if not file.is_file():
            raise typer.BadParameter(f"--file: expected a readable file, got {file}")
        texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise typer.BadParameter(f"--file: expected at least one non-empty line, got none in {file}")
    else:
        texts = [text]
    register()
    if model == "minilm":
        tok, net = load_minilm("headwise")
    elif Path(model).is_dir():
        tok, net = load_minilm("headwise", path=model)
    else:
        raise typer.BadParameter(f"--model: expected 'minilm' or a model directory, got {model!r}")
    cfg = net.config
    try:
        lay_sel = parse_indices(layers, "layers", cfg.num_hidden_layers)
        head_sel = parse_indices(heads, "heads", cfg.num_attention_heads)
    except HeadwiseError as exc:
        raise typer.BadParameter(str(exc)) from None
    with Progress(console=console, transient=True, disable=len(texts) <= batch_size) as bar:
        task = bar.add_task("analysing", total=None)
        res = analyze_texts(
            texts,
            tok,
            net,
            layers=lay_sel,
            heads=head_sel,
            stats_only=stats_only,
            importance=importance,
            batch_size=batch_size,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    console.print(_metrics_table(res, stats_only))
    if res.cls_targets:
        cls = Table(title="Where the [CLS] row attends (mean over heads and texts)")
        for col in ("layer", "[CLS]", "[SEP]", "other tokens"):
            cls.add_column(col, justify="right")
        for lay, t in res.cls_targets.items():
            cls.add_row(str(lay), f"{t['cls']:.3f}", f"{t['sep']:.3f}", f"{t['other']:.3f}")
        console.print(cls)
    if out is not None:
        from headwise.analysis.figures import write_figures

        out.mkdir(parents=True, exist_ok=True)
        data = res.to_dict()
        data["model"] = model
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".analysis.json.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, out / "analysis.json")
        written = write_figures(res, out)
        console.print(f"wrote {out / 'analysis.json'} and {len(written)} figures to {out}")


def _metrics_table(res, stats_only: bool) -> Table:
    cols = ["entropy", "normalized_entropy", "max_weight"]
    if not stats_only:
        cols = ["entropy", "entropy_smoothed", "gini", "sparsity", "max_weight", "mean_distance", "to_cls", "to_sep"]
    title = f"Per-head metrics over {res.n_texts} text(s), {res.n_tokens} tokens (means over query rows)"
    table = Table(title=title)
    table.add_column("head")
    for c in cols:
        table.add_column(c, justify="right")
    if res.patterns is not None:
        table.add_column("pattern")
    if res.importance is not None:
        table.add_column("importance", justify="right")
    for i, lay in enumerate(res.layers):
        for j, h in enumerate(res.heads):
            row = [f"L{lay}H{h}"] + [f"{float(res.metrics[c][i, j]):.3f}" for c in cols]
            if res.patterns is not None:
                row.append(res.patterns[i][j])
            if res.importance is not None:
                row.append(f"{float(res.importance.normalized[lay, h]):.3f}")
            table.add_row(*row)
    return table
