"""The enhancer's architecture as one value: :class:`EnhancerConfig`, and its parameter footprint.

The RuVector report describes its attention stage as "8 heads, 256 hidden, 0.1 dropout,
3 layers"; here that is written literally, ``EnhancerConfig(heads=8, hidden=256, dropout=0.1,
layers=3)``, and built into a :class:`~headwise.memory.enhancer.QueryEnhancer` whose every
parameter is counted. ``headwise memory train`` and ``headwise memory sweep`` take the same
options (``--heads --hidden --layers --dropout --candidates --mechanism`` and the mechanism's
own: ``--experts --experts-per-token --capacity-factor --aux-weight --curvature --clip``).

Shapes: an enhancer for d-dimensional embeddings maps queries (n, d) with candidates (n, K, d).

Example:
    >>> cfg = EnhancerConfig(heads=8, hidden=256, dropout=0.1, layers=3)
    >>> enh = cfg.build(384, seed=0)
    >>> fp = footprint(enh)
    >>> fp["parameters"] == sum(p.numel() for p in enh.parameters()), fp["layers"]
    (True, 3)
    >>> round(fp["bytes_per_vector_at_100k"], 2) == round(fp["bytes"] / 100_000, 2)
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from headwise.memory.enhancer import QueryEnhancer

#: The store size at which ``footprint`` reports bytes per stored vector (the report tabulates 100k).
FOOTPRINT_VECTORS = 100_000


@dataclass(frozen=True)
class EnhancerConfig:
    """Every architectural choice of a :class:`~headwise.memory.enhancer.QueryEnhancer`.

    Defaults are the measured WordNet enhancer (docs/memory-eval.md): 8 heads, one
    cross-attention layer, no feed-forward block, 32 candidates, no dropout. The values are
    checked when the enhancer is built (a HeadwiseError names the bad one).
    """

    mechanism: str = "multi-head"  # multi-head, hyperbolic, moe or flash
    heads: int = 8
    hidden: int = 0  # feed-forward width after each attention layer; 0: no feed-forward block
    layers: int = 1
    dropout: float = 0.0
    candidates: int = 32
    first_pass: str = "raw"  # what the first search pass uses: "raw" or "adapted" (the adapter's query)
    experts: int | None = None  # MoE: experts (None: 4 when they divide heads, else 1)
    experts_per_token: int = 1  # MoE top-k routing
    capacity_factor: float = 1.25  # MoE: tokens an expert takes, relative to an even share
    aux_weight: float = 0.01  # MoE: weight of the load-balancing loss in training
    curvature: float = 1.0  # hyperbolic: initial (learned) curvature
    clip: float = 4.0  # hyperbolic: tangent-space clip

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``QueryEnhancer(dim, **kwargs)``."""
        return asdict(self)

    def build(self, dim: int, *, seed: int | None = None) -> QueryEnhancer:
        """An untrained enhancer for ``dim``-dimensional embeddings (weights drawn from ``seed``)."""
        if seed is not None:
            torch.manual_seed(seed)
        return QueryEnhancer(dim, **self.kwargs())


def footprint(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter count, bytes (at the parameters' dtype), bytes per stored vector at 100k vectors, layers."""
    params = list(model.parameters())
    size = sum(p.numel() * p.element_size() for p in params)
    return {
        "parameters": sum(p.numel() for p in params),
        "bytes": size,
        "bytes_per_vector_at_100k": size / FOOTPRINT_VECTORS,
        "layers": len(model.attention_layers()) if isinstance(model, QueryEnhancer) else 0,
    }
