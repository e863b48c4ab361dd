"""The headwise report (``headwise demo``): attention experiments, figures and one HTML page.

Each experiment is a function ``f(*, quick=False, seed=0) -> Section`` whose section holds
the numbers (``data``, deterministic for a seed; ``measured``, machine-dependent), matplotlib
figures, tables and a finding computed from the numbers. ``Section.save(out)`` writes
``figures/*.png`` and ``data/*.json``.
"""

from headwise.report.basics import attention_patterns, causal_checks, sqrt_dk_scaling
from headwise.report.common import Section, Table
from headwise.report.cost import flops_breakdown, memory_scaling
from headwise.report.heads import head_diversity, per_head_heatmaps, single_head_equivalence

__all__ = [
    "Section",
    "Table",
    "sqrt_dk_scaling",
    "attention_patterns",
    "per_head_heatmaps",
    "head_diversity",
    "causal_checks",
    "memory_scaling",
    "flops_breakdown",
    "single_head_equivalence",
]
