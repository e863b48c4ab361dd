"""What every report experiment returns: a :class:`Section` with numbers, figures and a finding.

An experiment is a plain function ``f(*, quick=False, seed=0, ...) -> Section``. The section
holds the numbers behind its figures (``data``: deterministic for a seed; ``measured``:
machine-dependent measurements such as peak memory), matplotlib figures (Agg, no pyplot
state), tables, and a finding written from the numbers. :meth:`Section.save` writes
``figures/<name>.png`` and ``data/<key>.json`` under a report directory, atomically.

Example:
    >>> from headwise.report.common import Section, new_figure, row_entropy
    >>> import torch
    >>> round(float(row_entropy(torch.full((1, 4), 0.25))[0]), 4)  # log 4
    1.3863
    >>> fig, ax = new_figure(1, 1)
    >>> s = Section("demo", 0, "A title", "A finding.", data={"x": 1 / 3})
    >>> s.add_figure("demo", fig, "A caption.")
    >>> rounded({"x": 1 / 3, "y": [float("nan")]})
    {'x': 0.3333333333, 'y': [None]}
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from headwise.errors import bad_argument
from headwise.fileio import write_atomic

#: Significant digits kept in the JSON files (enough to compare runs, readable to people).
DIGITS = 10


@dataclass
class Table:
    """A small table for the page: ``header`` names, ``rows`` of already formatted cells."""

    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class FigureSpec:
    """A figure of a section: file stem, matplotlib figure (None once saved) and caption."""

    name: str
    caption: str
    fig: Any = None
    path: str = ""  # relative to the report directory, set by Section.save
    png: bytes = b""


@dataclass
class Section:
    """One experiment of the report (see the module docstring)."""

    key: str
    number: int
    title: str
    finding: str
    data: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    figures: list[FigureSpec] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (label, relative path)

    def add_figure(self, name: str, fig: Any, caption: str) -> None:
        self.figures.append(FigureSpec(name=name, caption=caption, fig=fig))

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "number": self.number,
            "title": self.title,
            "finding": self.finding,
            "data": rounded(self.data),
            "measured": rounded(self.measured),
            "figures": [{"name": f.name, "path": f.path, "caption": f.caption} for f in self.figures],
        }

    def save(self, out: Path) -> Path:
        """Write every figure as ``figures/<name>.png`` and the numbers as ``data/<key>.json``."""
        out = Path(out)
        for spec in self.figures:
            if spec.fig is not None:  # figures of other commands arrive as files (path and png set)
                buf = io.BytesIO()
                spec.fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
                spec.png, spec.fig = buf.getvalue(), None
                spec.path = f"figures/{spec.name}.png"
                write_atomic(out / spec.path, spec.png)
        path = out / "data" / f"{self.key}.json"
        write_atomic(path, json.dumps(self.to_json(), indent=1).encode())
        return path


def rounded(obj: Any, digits: int = DIGITS) -> Any:
    """``obj`` with floats rounded to ``digits`` significant digits, NaN/inf as None (valid JSON)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    if isinstance(obj, Tensor):
        return rounded(obj.tolist(), digits)
    if hasattr(obj, "item"):  # numpy scalars
        return rounded(obj.item(), digits)
    raise bad_argument("obj", "JSON-like data (dict, list, str, int, float, tensor)", type(obj).__name__)


def new_figure(rows: int = 1, cols: int = 1, width: float = 6.4, height: float = 4.0, **kwargs: Any):
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot global state) and its axes array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    return fig, axes


def row_entropy(weights: Tensor) -> Tensor:
    """Shannon entropy in nats of each row of ``weights`` (..., S) -> (...); 0 log 0 = 0."""
    return -torch.special.xlogy(weights, weights).sum(-1)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise bad_argument(name, "a bool", repr(value))
    return value


# Seeds are 32-bit: torch takes up to 2**64 - 1 but numpy's legacy seeding 2**32 - 1, and a
# larger one used to surface as torch's RuntimeError only once an experiment had started.
MAX_SEED = 2**32 - 1


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise bad_argument("seed", f"an int in [0, {MAX_SEED}]", repr(seed))
    return seed


def fmt(x: float, digits: int = 3) -> str:
    """A number for prose: fixed point for ordinary sizes, scientific for tiny or huge ones."""
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    if abs(x) < 10 ** (-digits) or abs(x) >= 1e6:
        return f"{x:.{max(1, digits - 1)}e}"
    return f"{x:.{digits}f}"
