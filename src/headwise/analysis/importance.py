"""Head importance (ablation, gradient) and iterative pruning, through head gates.

Every attention layer merges its heads at the input of its output projection, (..., H * d).
:class:`HeadGates` puts a forward pre-hook there that computes, per layer l and head h,

    x'_h = g[l, h] * x_h + (1 - g[l, h]) * mean[l, h]        (mean = 0 unless mean-ablating)

so ``g = 1`` changes nothing, ``g[l, h] = 0`` zero-ablates (or mean-ablates) head h, and the
gradient of a loss with respect to ``g`` at 1 is Michel et al.'s ``dL/d xi_h``. The same
hook serves headwise's :class:`~headwise.modules.MultiHeadAttention` (whose ``head_gates``
act at the same place: gating a head there or here gives the same output) and transformers
models, whose ``head_mask`` is silently ignored since version 5.

Shape legend: gates (num_layers, H); head means (num_layers, H, d).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from headwise.modules import MultiHeadAttention
    >>> from headwise.analysis.importance import HeadGates
    >>> model = nn.Sequential(MultiHeadAttention(16, 4))
    >>> x = torch.randn(2, 5, 16)
    >>> g = torch.ones(1, 4); g[0, 2] = 0
    >>> with HeadGates(model, g):
    ...     gated = model(x).out
    >>> model[0].head_gates.data[2] = 0
    >>> torch.allclose(gated, model(x).out)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from headwise.analysis.hf import HeadSite, head_sites
from headwise.errors import bad_argument


class HeadGates:
    """Context manager gating every head of ``model`` (see the module docstring).

    Args:
        model: a model :func:`~headwise.analysis.hf.head_sites` knows.
        gates: (num_layers, H) values; default ones. Pass a tensor with ``requires_grad``
            to differentiate a loss with respect to the gates.
        means: (num_layers, H, d) replacement values for mean ablation, or None (zeros).
    """

    def __init__(self, model: nn.Module, gates: Tensor | None = None, means: Tensor | None = None):
        self.sites: list[HeadSite] = head_sites(model)
        n, H = len(self.sites), max(s.num_heads for s in self.sites)
        if any(s.num_heads != H for s in self.sites):
            raise bad_argument("model", "the same number of heads in every layer", [s.num_heads for s in self.sites])
        ref = next(model.parameters())
        self.gates = torch.ones(n, H, dtype=ref.dtype, device=ref.device) if gates is None else gates
        if not isinstance(self.gates, Tensor) or tuple(self.gates.shape) != (n, H):
            got = tuple(self.gates.shape) if isinstance(self.gates, Tensor) else type(self.gates).__name__
            raise bad_argument("gates", f"a (num_layers, H) = ({n}, {H}) tensor", got)
        d = self.sites[0].head_dim
        if means is not None and tuple(means.shape) != (n, H, d):
            raise bad_argument("means", f"a (num_layers, H, d) = ({n}, {H}, {d}) tensor", tuple(means.shape))
        self.means = means
        self._handles: list[Any] = []

    def _hook(self, site: HeadSite) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            heads = x.unflatten(-1, (site.num_heads, site.head_dim))
            g = self.gates[site.layer].to(x.dtype).unsqueeze(-1)
            out = heads * g
            if self.means is not None:
                out = out + (1 - g) * self.means[site.layer].to(x.dtype)
            return (out.flatten(-2), *args[1:])

        return pre_hook

    def __enter__(self) -> HeadGates:
        self._handles = [s.projection.register_forward_pre_hook(self._hook(s)) for s in self.sites]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def head_means(model: nn.Module, run: Callable[[], Any]) -> Tensor:
    """Mean output of every head over all positions of the forwards ``run()`` makes (L, H, d)."""
    sites = head_sites(model)
    sums: dict[int, Tensor] = {}
    counts: dict[int, int] = {}

    def recorder(site: HeadSite) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            heads = (
                args[0]
                .detach()
                .unflatten(-1, (site.num_heads, site.head_dim))
                .reshape(-1, site.num_heads, site.head_dim)
            )
            sums[site.layer] = sums.get(site.layer, 0) + heads.double().sum(0)
            counts[site.layer] = counts.get(site.layer, 0) + heads.shape[0]

        return pre_hook

    handles = [s.projection.register_forward_pre_hook(recorder(s)) for s in sites]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    if len(sums) != len(sites):
        raise bad_argument("run", "a callable that runs the model forward", f"{len(sums)} of {len(sites)} layers ran")
    dtype = next(model.parameters()).dtype
    return torch.stack([(sums[s.layer] / counts[s.layer]).to(dtype) for s in sites])


def ablation_importance(
    model: nn.Module,
    metric: Callable[[], float],
    mode: Literal["zero", "mean"] = "zero",
    means: Tensor | None = None,
    base_gates: Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """metric(with head (l, h) ablated) - metric(intact), for every head: (num_layers, H).

    ``metric()`` runs the model on fixed data and returns a number (a loss: positive means
    the head helped lower it; a score: negative means it helped). ``mode="mean"`` replaces
    the head by ``means`` (see :func:`head_means`). ``base_gates`` keeps already pruned heads
    pruned; they get NaN.
    """
    if mode not in ("zero", "mean"):
        raise bad_argument("mode", "'zero' or 'mean'", repr(mode))
    if mode == "mean" and means is None:
        raise bad_argument("means", "head means (num_layers, H, d) for mode='mean'", None)
    probe = HeadGates(model)
    base = probe.gates.clone() if base_gates is None else base_gates.detach().clone()
    use_means = means if mode == "mean" else None
    with torch.no_grad(), HeadGates(model, base, use_means):
        reference = float(metric())
    out = torch.full(base.shape, float("nan"), dtype=torch.float64)
    alive = [(lay, h) for lay in range(base.shape[0]) for h in range(base.shape[1]) if base[lay, h] != 0]
    for i, (lay, h) in enumerate(alive):
        g = base.clone()
        g[lay, h] = 0
        with torch.no_grad(), HeadGates(model, g, use_means):
            out[lay, h] = float(metric()) - reference
        if progress is not None:
            progress(i + 1, len(alive))
    return out


@dataclass
class Importance:
    """Gradient importance: ``raw`` E|dL/dg| and ``normalized`` (per-layer l2 norm), (num_layers, H)."""

    raw: Tensor
    normalized: Tensor


def gradient_importance(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    gates: Tensor | None = None,
) -> Importance:
    """Michel et al. (2019): I_h = E_batches |dL/d g_h| at ``gates`` (default all ones).

    ``loss_fn(model, batch)`` returns a scalar loss. Pruned heads (gate 0) keep their
    gradient (how much putting them back would change the loss) but pruning skips them.
    The per-layer normalisation divides each layer's scores by their l2 norm, as Michel et al.
    (and HF's ``run_bertology.py``) do, so that layers are comparable.
    """
    probe = HeadGates(model)
    g = (probe.gates if gates is None else gates.detach()).clone().requires_grad_(True)
    total = torch.zeros_like(g, dtype=torch.float64)
    n = 0
    with HeadGates(model, g):
        for batch in batches:
            loss = loss_fn(model, batch)
            (grad,) = torch.autograd.grad(loss, g)
            total += grad.detach().abs().double()
            n += 1
    if n == 0:
        raise bad_argument("batches", "at least one batch", "none")
    return importance_from_total(total, n)


def importance_from_total(total: Tensor, n: int) -> Importance:
    """:class:`Importance` from the sum over ``n`` batches of |dL/dg| (num_layers, H), float64.

    Summing per-batch gradients in the same order gives the same bits as
    :func:`gradient_importance` over all batches at once (the corpus engines use this).
    """
    raw = total / n
    norm = raw.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return Importance(raw, raw / norm)


@dataclass
class PruningCurve:
    """Iterative pruning: one point per step (the first is the intact model)."""

    total_heads: int
    points: list[dict[str, Any]] = field(default_factory=list)
    stopped_because: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"total_heads": self.total_heads, "points": self.points, "stopped_because": self.stopped_because}


def prune_iteratively(
    num_layers: int,
    num_heads: int,
    importance: Callable[[Tensor], Tensor],
    evaluate: Callable[[Tensor], float],
    step: float = 0.1,
    tolerance: float | None = None,
    min_heads: int = 1,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> PruningCurve:
    """Remove the ``step`` share of all heads with the lowest importance, re-evaluate, repeat.

    ``importance(gates) -> (num_layers, H)`` scores the heads given the current gates (0 =
    pruned); ``evaluate(gates) -> float`` is the metric (higher is better). Stops when the
    metric falls more than ``tolerance`` below the intact model's (that point is recorded),
    or when fewer than ``min_heads`` would remain. Each point records heads kept, the share
    pruned, the metric and the (layer, head) pairs pruned at that step.
    """
    if not 0 < step < 1:
        raise bad_argument("step", "a share in (0, 1)", step)
    total = num_layers * num_heads
    per_step = max(1, math.ceil(step * total))
    gates = torch.ones(num_layers, num_heads)
    curve = PruningCurve(total)
    base = float(evaluate(gates))
    curve.points.append({"heads_kept": total, "pruned_share": 0.0, "metric": base, "pruned": []})
    if progress is not None:
        progress(curve.points[-1])
    while True:
        kept = int(gates.sum())
        if kept - per_step < min_heads:
            curve.stopped_because = f"fewer than min_heads={min_heads} heads would remain"
            break
        scores = importance(gates.clone()).double().clone()
        scores[gates == 0] = float("inf")
        order = torch.argsort(scores.flatten(), stable=True)[:per_step]
        pruned = [(int(i) // num_heads, int(i) % num_heads) for i in order]
        for lay, h in pruned:
            gates[lay, h] = 0
        value = float(evaluate(gates))
        kept = int(gates.sum())
        curve.points.append({"heads_kept": kept, "pruned_share": 1 - kept / total, "metric": value, "pruned": pruned})
        if progress is not None:
            progress(curve.points[-1])
        if tolerance is not None and value < base - tolerance:
            curve.stopped_because = f"metric {value:.4f} fell more than tolerance {tolerance} below {base:.4f}"
            break
    return curve
