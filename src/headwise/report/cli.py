"""``headwise demo``: run the nine experiments, write ``<out>/index.html``, print a summary.

Example (what ``make demo`` runs; ``--quick`` uses small sizes, for CI)::

    headwise demo --out report/
    headwise demo --out /tmp/report --quick --seed 1
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from pathlib import Path

import typer

from headwise.cliutil import int_in, out_dir, reports_errors
from headwise.errors import bad_argument
from headwise.report.common import MAX_SEED, Section, check_flag, check_seed


def _experiments() -> list[tuple[str, Callable[[Path, bool, int], Section]]]:
    from headwise.report.basics import attention_patterns, causal_checks, sqrt_dk_scaling
    from headwise.report.cost import flops_breakdown, memory_scaling
    from headwise.report.heads import head_diversity, per_head_heatmaps, single_head_equivalence
    from headwise.report.summary import analysis_summary

    return [
        ("scaling", lambda out, q, s: sqrt_dk_scaling(quick=q, seed=s)),
        ("patterns", lambda out, q, s: attention_patterns(quick=q, seed=s)),
        ("heads", lambda out, q, s: per_head_heatmaps(quick=q, seed=s)),
        ("diversity", lambda out, q, s: head_diversity(quick=q, seed=s)),
        ("causal", lambda out, q, s: causal_checks(quick=q, seed=s)),
        ("memory", lambda out, q, s: memory_scaling(quick=q, seed=s)),
        ("flops", lambda out, q, s: flops_breakdown(quick=q, seed=s)),
        ("equivalence", lambda out, q, s: single_head_equivalence(quick=q, seed=s)),
        ("analysis", lambda out, q, s: analysis_summary(out, quick=q, seed=s)),
    ]


def command_line(out: Path, quick: bool, seed: int) -> str:
    """The ``headwise demo`` command that reproduces a report."""
    return f"headwise demo --out {out}" + (" --quick" if quick else "") + (f" --seed {seed}" if seed else "")


SECTION_KEYS = ("scaling", "patterns", "heads", "diversity", "causal", "memory", "flops", "equivalence", "analysis")


def build_report(
    out: Path = Path("report"),
    quick: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    only: Collection[str] | None = None,
) -> tuple[list[Section], Path, float]:
    """Run the experiments (all, or the section keys in ``only``), write the page.

    Returns (sections, path of index.html, seconds). Keys: see :data:`SECTION_KEYS`.
    """
    if only is not None and (isinstance(only, str) or not set(only) <= set(SECTION_KEYS)):
        raise bad_argument("only", f"section keys among {SECTION_KEYS}", repr(only))
    import torch

    from headwise.bench.harness import machine_info
    from headwise.report.html import versions, write_page

    check_flag("quick", quick)
    check_seed(seed)
    out = out_dir(Path(out), "out")  # before the experiments: the page is written last
    t0 = time.perf_counter()
    sections = []
    for label, run in _experiments():
        if only is not None and label not in only:
            continue
        if progress is not None:
            progress(label)
        torch.manual_seed(seed)
        sections.append(run(out, quick, seed))
    seconds = time.perf_counter() - t0
    info = machine_info()
    meta = {
        "command": command_line(out, quick, seed),
        "seed": seed,
        "seconds": seconds,
        "versions": versions(),
        "machine": f"{info['cpu']}, {info['threads']} torch threads, {info['device']}",
    }
    return sections, write_page(sections, meta, out), seconds


@reports_errors
def demo(
    out: Path = typer.Option(Path("report"), help="Directory for index.html, figures/ and data/."),
    quick: bool = typer.Option(False, help="Small sizes (for CI, under a minute)."),
    seed: int = typer.Option(0, help=f"Random seed in [0, {MAX_SEED}]: the same seed gives the same numbers."),
) -> None:
    """Run the attention experiments and write an HTML report with figures and JSON."""
    # A bad --seed or an --out that cannot be a directory fails in one line (exit status 2)
    # before the first experiment, not after the last.
    from rich.console import Console
    from rich.table import Table

    int_in("--seed", seed, 0, MAX_SEED)
    out_dir(out)

    console = Console()
    with console.status("report") as status:
        sections, index, seconds = build_report(out, quick, seed, lambda s: status.update(f"running: {s}"))
    table = Table(title=f"headwise report ({seconds:.0f} s)", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("section")
    table.add_column("finding", overflow="fold")
    for s in sections:
        first = s.finding.split(". ")[0]
        table.add_row(str(s.number), s.title, first[:160] + ("..." if len(first) > 160 else ""))
    console.print(table)
    console.print(f"wrote [bold]{index}[/bold] ({len(sections)} sections, figures in {out / 'figures'})")
