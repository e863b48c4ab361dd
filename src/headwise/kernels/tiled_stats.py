"""Gradients of the tiled kernel's log-sum-exp and streamed statistics (entropy, max weight).

The log-sum-exp costs nothing: ``d lse / d s_j = p_j``, so its cotangent joins the row term
of ``dS = P * (dP - delta)`` as ``delta = rowsum(dO * O) - dlse`` (:func:`row_delta`).

The forward streams each row's entropy ``H`` and largest weight ``M`` without ever holding
the L x S weights. The backward (FlashAttention-2 recomputation, kernels/tiled.py) rebuilds
every visited tile's probabilities ``p = exp(s - lse)`` anyway, so the statistics'
gradients with respect to the logits join the same ``dS`` there, in closed form::

    dH/ds_j = -p_j (log p_j + H)          log p_j = s_j - lse
    dM/ds_j = M ([j in T] / |T| - p_j)     T: the keys that reach the row's largest logit

Masked keys have ``p = 0`` and an empty row has ``M = 0``, so both get exactly 0, never NaN
(the readable reference differentiates ``-sum w log w`` and ``amax(w)`` with autograd and
gets the same numbers). The second formula shares a tie equally between the tied keys, as
``torch.amax`` does. ``T`` must be known before a row's first tile is processed, so a query
block whose ``M`` has a gradient costs one extra pass of ``QK^T`` over its visited tiles
(row maximum and tie count); the backward recomputes the very same tiles with the very same
calls, so the comparison ``s == max`` finds exactly those keys. Nothing here runs when the
loss does not use the statistics.

Shape legend: a query block's rows are (B, Hkv, G*n), as in the tiled kernel; the saved
statistics and their incoming gradients are (B, Hq, L).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from headwise.kernels.base import lse_cotangent

if TYPE_CHECKING:  # tiled imports this module: the types only
    from headwise.kernels.tiled import TiledPlan, _Blocks


def row_delta(dout: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None) -> Tensor:
    """``rowsum(dO * O) - dlse``, (B, Hq, L): the row term the backward subtracts from dP.

    ``dS_j = p_j (dP_j - rowsum(dO * O)) + dlse p_j``: the output's softmax gradient and the
    lse's share the factor p_j, so the lse needs no pass of its own. Empty rows take no lse
    gradient (see :func:`headwise.kernels.base.lse_cotangent`).
    """
    delta = (dout * out).sum(dim=-1)
    return delta if dlse is None else delta - lse_cotangent(dlse, lse)


class StatsGrad:
    """The statistics' saved values and incoming gradients (either gradient may be None)."""

    def __init__(
        self, plan: TiledPlan, entropy: Tensor, d_entropy: Tensor | None, max_w: Tensor, d_max_w: Tensor | None
    ):
        B, Hkv, G, L = plan.B, plan.Hkv, plan.G, plan.L

        def split(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(B, Hkv, G, L)

        self.plan = plan
        self.entropy, self.d_entropy = split(entropy), split(d_entropy)
        self.max_w, self.d_max_w = split(max_w), split(d_max_w)

    def block(self, blocks: _Blocks, qb: Tensor, k: Tensor, qs: int, n: int, visits: list) -> _BlockStatsGrad:
        """What one query block (rows qs..qs+n-1, all heads) needs; runs the tie pass if M has a gradient."""
        p = self.plan

        def rows(t: Tensor) -> Tensor:
            return t[..., qs : qs + n].reshape(p.B, p.Hkv, p.G * n, 1)

        entropy_part = None
        if self.d_entropy is not None:
            entropy_part = (rows(self.entropy), rows(self.d_entropy))
        max_part = None
        if self.d_max_w is not None:
            top, count = _row_max_and_ties(blocks, qb, k, qs, visits)
            # The tie share M / |T| and the coefficient of -p, each times dM.
            coef = rows(self.d_max_w) * rows(self.max_w)
            max_part = (top, coef / count, coef)
        return _BlockStatsGrad(entropy_part, max_part)


class _BlockStatsGrad:
    """Adds the statistics' terms to one tile's dS (see the module docstring)."""

    def __init__(self, entropy_part: tuple[Tensor, Tensor] | None, max_part: tuple[Tensor, Tensor, Tensor] | None):
        self.entropy_part, self.max_part = entropy_part, max_part
        self.hit: Tensor | None = None

    def see(self, s: Tensor) -> None:
        """Mark the keys of this tile that hold their row's largest logit (s: the tile's logits)."""
        if self.max_part is not None:
            self.hit = s == self.max_part[0]

    def add(self, ds: Tensor, p: Tensor, t: Tensor) -> None:
        """ds += dH * dH/ds + dM * dM/ds for the tile seen last; ``t = s - lse`` (overwritten)."""
        if self.entropy_part is not None:
            h, dh = self.entropy_part
            # -dH p (t + H); masked keys: p = 0 and t clamped finite by the kernel, so exactly 0.
            ds.sub_(t.add_(h).mul_(p).mul_(dh))
        if self.max_part is not None:
            _, share, coef = self.max_part
            ds.sub_(p * coef).add_(self.hit * share)


def _row_max_and_ties(blocks: _Blocks, qb: Tensor, k: Tensor, qs: int, visits: list) -> tuple[Tensor, Tensor]:
    """Largest logit of every row of a query block and how many keys reach it, (B, Hkv, G*n, 1).

    The tiles are computed exactly as the backward computes them (same calls, same shapes),
    so that ``s == top`` there is an exact test. A row with no allowed key has top -inf and
    counts every visited key; its M is 0, so that count multiplies nothing.
    """
    plan = blocks.plan
    top = count = None
    with torch.no_grad():
        for jk, partial in visits:
            ks = jk * plan.block_k
            ke = min(plan.S, ks + plan.block_k)
            s, _ = blocks.logits(qb, k[:, :, ks:ke], qs, ks, ((0, ke - ks),) if partial else (), inplace=True)
            tile_top = s.amax(dim=-1, keepdim=True)
            tile_count = (s == tile_top).sum(dim=-1, keepdim=True)
            if top is None:
                top, count = tile_top, tile_count
                continue
            count = torch.where(tile_top > top, tile_count, torch.where(tile_top == top, count + tile_count, count))
            top = torch.maximum(top, tile_top)
    return top, count.to(top.dtype)
