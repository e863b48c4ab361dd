"""Which rows of the tiled kernel may skip the running maximum: decided per row, from allowed keys only.

A row whose logits provably stay within +-limit (BOUNDED_LOGIT_LIMIT: 30 in float32) takes
p = exp(s) with no shift. The bound is Cauchy-Schwarz, |q_i| max_j |k_j|, with the max over
the keys that row may attend and nothing else, so that no masked key, and no other row's
key, ever decides how a row is computed (issue 24: a per-block decision from all keys let
keys after position 64 move the causal outputs of queries 0..64 by 5e-7).

Shape legend: q5 (B, Hkv, G, L, E), k (B, Hkv, S, E), key norms (B, Hkv, S).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # tiled imports this module: the types only
    from headwise.kernels.tiled import Span, TiledPlan, _Blocks

# How a query block runs: every row unshifted, none, or a mix (the mixed block's bool rows).
ALL_ROWS, NO_ROWS = "all", "none"


def _tile_pieces(width: int, partial: tuple[tuple[int, int], ...]) -> list[tuple[int, int, bool]]:
    """Cut a tile of ``width`` keys into (start, end, needs the element mask) pieces, in order.

    >>> _tile_pieces(10, ((2, 4), (6, 8)))
    [(0, 2, False), (2, 4, True), (4, 6, False), (6, 8, True), (8, 10, False)]
    """
    pieces, at = [], 0
    for a, b in partial:
        if a > at:
            pieces.append((at, a, False))
        pieces.append((a, b, True))
        at = b
    if at < width:
        pieces.append((at, width, False))
    return pieces


def unshifted_rows(plan: TiledPlan, q5: Tensor, k: Tensor, blocks: _Blocks, limit: float | None) -> list[str | Tensor]:
    """Per query block, which rows have every allowed logit within +-``limit`` (None: no row may).

    By Cauchy-Schwarz, |s_ij| <= |q_i| max_j |k_j| (q already scaled), the max taken per
    row over the keys that row may attend and nothing else. Such a row takes p = exp(s)
    with no shift (its max is 0): no max pass, no subtraction, no rescaling between tiles.
    The decision is per row, never per block, and never looks at a masked key: otherwise
    a masked key, or another row's key, would decide which scheme a row runs and move the
    rounding of its output (issue 24). Returns per query block "all", "none", or the
    (B*Hkv, G*n, 1) bool rows of a mixed block. Inputs of large norm (and NaN/Inf in an
    allowed key, whose bound is not finite) take the online-max path; so do scores, which
    change the logits after the dot product (checked here, so callers pass the dtype's limit).
    """
    nq, bq, L = len(plan.spans), plan.block_q, plan.L
    if plan.score is not None or limit is None or k.shape[2] == 0 or q5.numel() == 0:
        return [NO_ROWS] * nq
    B, Hkv, G = plan.B, plan.Hkv, plan.G
    k_norm = torch.linalg.vector_norm(k, dim=-1)  # (B, Hkv, S)
    q_norm = torch.linalg.vector_norm(q5, dim=-1)  # (B, Hkv, G, L)
    reach = _reach_by_ranges(plan, k_norm)  # (B, Hkv, G|1, L|1) or None
    if reach is None:
        pieces = [
            _reach_by_pieces(blocks, k_norm, spans, i * bq, min(bq, L - i * bq)) for i, spans in enumerate(plan.spans)
        ]
        reach = torch.cat(pieces, dim=-1)
    ok = q_norm * reach <= limit  # (B, Hkv, G, L)
    # Whole blocks at once: pad to nq * bq rows (padding counts as unshifted) and reduce.
    padded = torch.nn.functional.pad(ok, (0, nq * bq - L), value=True).view(B, Hkv, G, nq, bq)
    every = padded.all(dim=4).flatten(0, 2).all(dim=0)
    some = padded.any(dim=4).flatten(0, 2).any(dim=0)
    kinds = []
    for iq, (e, s) in enumerate(zip(every.tolist(), some.tolist())):
        if e or not s:
            kinds.append(ALL_ROWS if e else NO_ROWS)
        else:
            n = min(bq, L - iq * bq)
            kinds.append(ok[..., iq * bq : iq * bq + n].reshape(B * Hkv, G * n, 1))
    return kinds


def _reach_by_ranges(plan: TiledPlan, k_norm: Tensor) -> Tensor | None:
    """Per row, max |k_j| over the keys it may attend, when those keys are one known range.

    No mask: every key, (B, Hkv, 1, 1). A mask with exact bounds (causal, windows, chunks,
    padding and their intersections): a range maximum over a sparse table of the key norms,
    O(S log w + L) for ranges of at most w keys, (B, Hkv, G, L). Otherwise None (see
    _reach_by_pieces).
    """
    B, Hkv, G, S = plan.B, plan.Hkv, plan.G, plan.S
    if plan.mask is None:
        return k_norm.amax(dim=-1)[:, :, None, None]
    if not plan.mask.exact_bounds:
        return None
    ranges = plan.keeps.get("ranges")
    if ranges is None or ranges[0].device != k_norm.device:
        ranges = plan.keeps["ranges"] = _range_lookups(plan, k_norm.device)
    first, last, empty, levels = ranges
    # table[..., j, i] = max of k_norm[..., i : i + 2**j] (0 past the end), one level per pass.
    table = k_norm.new_zeros(B, Hkv, levels, S)
    table[:, :, 0] = k_norm
    for j in range(1, levels):
        w = 1 << (j - 1)
        torch.maximum(table[:, :, j - 1, : S - w], table[:, :, j - 1, w:], out=table[:, :, j, : S - w])
    flat = table.view(B, Hkv, 1, levels * S).expand(B, Hkv, G, levels * S)
    return torch.maximum(flat.gather(-1, first), flat.gather(-1, last)).masked_fill_(empty, 0.0)


def _range_lookups(plan: TiledPlan, device: torch.device) -> tuple[Tensor, Tensor, Tensor, int]:
    """Where each row's key range [lo, hi] reads the sparse table (two overlapping power-of-two
    windows), which rows attend nothing, and how many levels the table needs. Cached on the plan.
    """
    B, Hkv, G, L, S = plan.B, plan.Hkv, plan.G, plan.L, plan.S
    b = torch.arange(B, device=device).view(B, 1, 1)
    h = torch.arange(plan.Hq, device=device).view(1, plan.Hq, 1)
    pos = (torch.arange(L, device=device) + (S - L)).view(1, 1, L)
    lo, hi = (t.expand(B, plan.Hq, L) for t in plan.mask.bounds(b, h, pos, S))
    lo, hi = lo.clamp(min=0), hi.clamp(max=S - 1)
    empty = hi < lo
    lo, hi = lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)  # any valid index; zeroed after the read
    # floor(log2(length)) from the float exponent: exact for lengths below 2**24.
    level = (torch.frexp((hi - lo + 1).float()).exponent - 1).long()
    first = level * S + lo
    last = level * S + hi - (1 << level) + 1
    shape = (B, Hkv, G, L)
    return first.reshape(shape), last.reshape(shape), empty.reshape(shape), int(level.max()) + 1


def _reach_by_pieces(blocks: _Blocks, k_norm: Tensor, spans: list[Span], qs: int, n: int) -> Tensor:
    """Per row of one query block, max |k_j| over the keys it may attend, tile piece by piece."""
    plan = blocks.plan
    reach = k_norm.new_zeros(plan.B, plan.Hkv, plan.G, n)
    for ks, ke, partial in spans:
        for a, b, masked in _tile_pieces(ke - ks, partial):
            kn = k_norm[:, :, ks + a : ks + b]
            if masked:
                allowed = blocks.keep(qs, n, ks + a, b - a, k_norm.dtype, as_bias=False) > 0
                piece = torch.where(allowed, kn[:, :, None, None, :], 0.0).amax(dim=-1)
            else:
                piece = kn.amax(dim=-1)[:, :, None, None]
            reach = torch.maximum(reach, piece)
    return reach
