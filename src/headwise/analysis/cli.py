"""``headwise analyze``: per-head metrics of a real encoder on a text or a corpus.

Wire it into a typer app with ``app.command("analyze")(analyze)``. It prints a rich table of
per-head metrics and where each layer's [CLS] row attends, and writes ``analysis.json`` and
PNG figures (per-head heatmaps, head x head diversity, entropy per layer, importance) to
``--out``. ``--file`` reads one text per non-empty line, with a progress bar.
``--engine ray`` runs the batches on Ray Data workers (headwise.engines.ray_data) and writes
the same ``analysis.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from headwise.cliutil import int_in, one_line, out_dir, read_text, reports_errors
from headwise.engines import ADDRESS_HELP, ENGINE_HELP, WORKERS_HELP, make_engine
from headwise.errors import HeadwiseError, bad_argument

# No encoder has this many layers or heads: the bound of the syntax check made before the
# model is loaded, so that "0-2147483648" is refused instead of expanded into a huge list.
_MAX_INDEX = 1 << 16


def parse_indices(spec: str | None, name: str, top: int | None) -> list[int] | None:
    """ "0,2,4-5" -> [0, 2, 4, 5] (each in [0, top)); None or "" -> None (all).

    ``top=None`` checks the syntax alone (before the model, which knows the range, is
    loaded), with indices below 65536. Ranges are checked before they are expanded.

    Example::

        >>> parse_indices("0,2,4-5", "layers", 6)
        [0, 2, 4, 5]
    """
    if spec is None or not spec.strip():
        return None
    ranges: list[tuple[int, int]] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            ranges.append((int(lo), int(hi) if hi else int(lo)))
    except ValueError:
        raise HeadwiseError(f"{name}: expected indices like '0,2,4-5', got {spec!r}") from None
    limit = _MAX_INDEX if top is None else top
    if any(lo < 0 or hi < lo or hi >= limit for lo, hi in ranges):
        raise HeadwiseError(f"{name}: expected indices (or ascending ranges) in [0, {limit}), got {spec!r}")
    return sorted({i for lo, hi in ranges for i in range(lo, hi + 1)})


# The widest batch the analysis takes: a batch holds the captured weights of every layer
# until it is reduced, up to 6 x 12 x 128^2 floats (4.7 MB) per MiniLM text: ~5 GB at 1024.
MAX_BATCH_SIZE = 1024


@reports_errors
def analyze(
    model: str = typer.Option("minilm", help="'minilm' (bundled all-MiniLM-L6-v2) or a local model directory."),
    text: str | None = typer.Option(None, help="One text to analyse."),
    file: Path | None = typer.Option(None, help="A corpus: one text per non-empty line (UTF-8)."),
    layers: str | None = typer.Option(None, help="Layers to keep, e.g. '0,2,4-5' (default all)."),
    heads: str | None = typer.Option(None, help="Heads to keep in every layer (default all)."),
    stats_only: bool = typer.Option(False, help="Streaming entropy / max weight only: no L x S weights kept."),
    importance: bool = typer.Option(True, help="Gradient head importance (needs 2+ texts)."),
    out: Path | None = typer.Option(None, help="Directory for analysis.json and PNG figures."),
    batch_size: int = typer.Option(32, help=f"Texts per forward pass, 1 to {MAX_BATCH_SIZE}."),
    engine: str = typer.Option("local", help=ENGINE_HELP),
    ray_address: str | None = typer.Option(None, help=ADDRESS_HELP),
    workers: int | None = typer.Option(None, help=WORKERS_HELP),
) -> None:
    """Per-head attention metrics, [CLS] targets, diversity and importance of a transformers encoder."""
    # Every bad input fails in one line on stderr with exit status 2 (headwise.cliutil), and
    # is checked before the model is loaded: the texts, --batch-size, the syntax of --layers
    # and --heads, --model and --out (the analysis may take minutes: an --out that cannot be
    # written must not surface only after it).
    console = Console()
    texts = _texts(text, file)
    int_in("--batch-size", batch_size, 1, MAX_BATCH_SIZE)
    # Syntax first (no model needed); the ranges once the model's config is known.
    parse_indices(layers, "--layers", None)
    parse_indices(heads, "--heads", None)
    if model != "minilm" and not (Path(model) / "config.json").is_file():
        raise bad_argument("--model", "'minilm' or a transformers model directory (with config.json)", repr(model))
    if out is not None:
        out_dir(out)
    runner = make_engine(engine, ray_address, workers)
    if runner is None:
        tok, net = _load_model(model)
        cfg = net.config
    else:
        from headwise.engines.ray_data import model_config

        cfg = model_config(model)  # the workers load the weights
    lay_sel = parse_indices(layers, "--layers", cfg.num_hidden_layers)
    head_sel = parse_indices(heads, "--heads", cfg.num_attention_heads)
    options = {"layers": lay_sel, "heads": head_sel, "stats_only": stats_only, "importance": importance,
               "batch_size": batch_size}  # fmt: skip
    with Progress(console=console, transient=True, disable=len(texts) <= batch_size) as bar:
        task = bar.add_task("analysing" if runner is None else "analysing (ray)", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if runner is None:
            from headwise.analysis.corpus import analyze_texts

            res = analyze_texts(texts, tok, net, progress=progress, **options)
        else:
            with runner:  # shuts Ray down if this command started it
                res = runner.analyze(texts, model=model, progress=progress, **options)
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


def _load_model(model: str) -> tuple[Any, Any]:
    """(tokenizer, model) with headwise's attention, or a HeadwiseError naming --model."""
    from headwise.analysis import register
    from headwise.pretrained import load_minilm

    register()
    try:
        return load_minilm("headwise", path=None if model == "minilm" else model)
    except HeadwiseError:  # already says what is wrong (the bundled model is not installed)
        raise
    except (OSError, ValueError, KeyError) as exc:  # transformers' ways of saying "not a model"
        raise bad_argument("--model", "a loadable transformers encoder", f"{model!r} ({one_line(exc)[:200]})") from None


def _texts(text: str | None, file: Path | None) -> list[str]:
    """The texts to analyse: --text, or the non-empty lines of the UTF-8 --file."""
    if (text is None) == (file is None):
        given = "both" if text is not None else "neither"
        raise bad_argument("--text/--file", "exactly one of them", given)
    if text is not None:
        if not text.strip():
            raise bad_argument("--text", "a non-empty text", repr(text))
        return [text]
    texts = [line.strip() for line in read_text(file, "--file").splitlines() if line.strip()]
    if not texts:
        raise bad_argument("--file", "at least one non-empty line", f"none in {file}")
    return texts


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
