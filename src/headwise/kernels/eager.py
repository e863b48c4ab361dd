"""Fast eager attention that materialises the weights: the backend for ``need_weights``.

The same mathematics as the reference, written for speed instead of readability: GQA
folds the G query heads of a group into the rows of one matmul (k and v are never
repeated, and the (B, Hkv, G*L, S) logits are already laid out as (B, Hq, L, S)); the scale
is applied to the queries. Without autograd it works one query chunk at a time, so each
chunk's logits stay in cache while they become weights and the L x S weights are written
to memory once (or never, when only the output or the statistics are asked for). With
autograd it uses torch's fused softmax, and the row maxima give the log-sum-exp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.kernels.alloc import empty_large
from headwise.kernels.base import (
    AttentionOutput,
    AttentionStats,
    Backend,
    Request,
    attention_flops,
    lse_cotangent,
    row_entropy,
)
from headwise.profiling import AV, MASK_SCORE, QK, SOFTMAX, scope

_SECONDS_PER_FLOP = 1 / 150e9
_SECONDS_PER_ELEMENT = 1.6e-9  # per logit, for the elementwise passes over L x S


_CHUNK_BYTES = 4 << 20  # logits of one query chunk: about what the caches hold


def _head_indices(req: Request, bh0: int, bh1: int, dev: torch.device) -> tuple[Tensor, Tensor]:
    """Batch and query-head indices, each (1, nb, G, 1, 1)-broadcastable, of slabs bh0..bh1-1.

    A slab is one (batch, kv head) pair: G query heads that share k and v. Masks and scores
    see the indices they would see on the full (B, Hq, L, S) grid.
    """
    _, Hq, Hkv, _, _, _, _ = req.shape
    G = Hq // Hkv
    bh = torch.arange(bh0, bh1, device=dev).view(1, -1, 1, 1, 1)
    return bh // Hkv, (bh % Hkv) * G + torch.arange(G, device=dev).view(1, 1, G, 1, 1)


def _logits(
    req: Request,
    q: Tensor,
    k: Tensor,
    bh: tuple[int, int],
    q0: int,
    n: int,
    *,
    out: Tensor | None = None,
    inplace: bool = True,
) -> Tensor:
    """Masked, modified logits of slabs bh[0]..bh[1]-1, query rows q0..q0+n-1: (nb, G*n, S).

    q is (*lead, G, L, E) and k (*lead, S, E), already restricted to the slabs, with lead
    (B, Hkv) or (nb,). Float32 or wider. ``out``: a buffer the matmul fills (no score);
    ``inplace``: mask in place (never under autograd, where a score may keep its output).
    """
    _, Hq, Hkv, L, S, _, _ = req.shape
    G = Hq // Hkv
    nb = bh[1] - bh[0]
    rows = q[..., q0 : q0 + n, :].reshape(*q.shape[:-3], G * n, q.shape[-1])
    with scope(QK):
        if req.score is not None and req.score.replaces_similarity:
            s = req.score.similarity(rows, k) * req.scale
        else:
            # Scaling the n*E queries is cheaper than scaling the n*S logits.
            fits = out is not None and out.dtype == rows.dtype and out.shape[-1] == S
            buf = out.view(*rows.shape[:-1], S) if fits else None
            s = torch.matmul(rows * req.scale, k.transpose(-1, -2), out=buf)
        if s.dtype in (torch.float16, torch.bfloat16):
            s = s.float()
    s = s.view(nb, G * n, S)
    if req.score is None and req.mask is None:
        return s
    with scope(MASK_SCORE):
        dev = s.device
        b, h = _head_indices(req, *bh, dev)
        qi = torch.arange(q0, q0 + n, device=dev).view(1, 1, 1, n, 1)
        ki = torch.arange(S, device=dev).view(1, 1, 1, 1, S)
        s5 = s.view(1, nb, G, n, S)
        if req.score is not None:
            s5 = req.score.modify(s5, b, h, qi + (S - L), ki).expand(1, nb, G, n, S)
            inplace = inplace and s5.is_contiguous()  # an expanded result shares memory
        if req.mask is not None:
            allowed = req.mask.evaluate(b, h, qi, ki, L, S)
            s5 = s5.masked_fill_(~allowed, float("-inf")) if inplace else s5.masked_fill(~allowed, float("-inf"))
        return s5.reshape(nb, G * n, S)


def _units(req: Request) -> list[tuple[int, int, int, int]]:
    """Work units (bh0, bh1, q0, n) over the B*Hkv slabs and L query rows.

    Whole slabs of one batch element while a slab's logits fit _CHUNK_BYTES (all slabs at
    once when they all fit), else row chunks of one slab. Each unit's logits stay in cache
    while they become weights; a unit of whole slabs is a contiguous block of the
    (B, Hq, L, S) result, so the matmul writes the weights in place; and all rows of a head
    make one large matmul instead of thin ones across all heads.
    """
    B, Hq, Hkv, L, S, _, _ = req.shape
    G = Hq // Hkv
    slab = 4 * G * L * S
    if slab * B * Hkv <= _CHUNK_BYTES:
        return [(0, B * Hkv, 0, L)]
    if slab <= _CHUNK_BYTES:
        per = max(1, _CHUNK_BYTES // slab)
        return [(b * Hkv + h, b * Hkv + min(h + per, Hkv), 0, L) for b in range(B) for h in range(0, Hkv, per)]
    n = max(1, _CHUNK_BYTES // (4 * G * S))
    return [(i, i + 1, q0, min(n, L - q0)) for i in range(B * Hkv) for q0 in range(0, L, n)]


def eager_attention(req: Request) -> AttentionOutput:
    """Materialising attention; without autograd it runs one work unit at a time (see _units)."""
    q, k, v = req.q, req.k, req.v
    if req.score is not None:
        q, k = req.score.prepare(q, k)
    if req.needs_grad:
        plain = req.score is None and req.dropout_p == 0 and not req.need_stats
        if plain and q.dtype in (torch.float32, torch.float64):
            return _eager_weights_autograd(req, q, k, v)
        return _eager_autograd(req, q, k, v)
    return _eager_chunked(req, q, k, v)


def _eager_weights_autograd(req: Request, q: Tensor, k: Tensor, v: Tensor) -> AttentionOutput:
    out, w, lse = _WeightsFunction.apply(req, q, k, v)
    weights = None if not req.need_weights else w.mean(dim=1) if req.need_weights == "mean" else w
    return AttentionOutput(out=out, weights=weights, stats=None, lse=lse, backend="eager")


class _WeightsFunction(torch.autograd.Function):
    """Materialised attention under autograd, without a score, dropout or statistics.

    Forward: the logits are written into one buffer on huge pages (alloc.py) and turned into
    the weights in place by the fused row softmax, so one L x S tensor is allocated instead of
    two (logits, then weights) and it is the one saved for backward. Backward by hand, with
    the weights' own gradient (an output too: a loss may use them) added to the output's:
    dV = W^T dO, dW = dO V^T + dW_out, dS = W * (dW - rowsum(dW * W)) (torch's fused softmax
    backward) + W * dlse (d lse / d s = W), dQ = scale dS K, dK = scale dS^T Q. Masked entries
    and empty rows have W = 0, hence dS = 0. Outputs the loss ignores come as None (no zero
    fill, no pass). Shapes as in the module docstring; GQA folds the group into the rows.
    """

    @staticmethod
    def forward(ctx, req: Request, q: Tensor, k: Tensor, v: Tensor):
        B, Hq, Hkv, L, S, E, Ev = req.shape
        G = Hq // Hkv
        w = _logits(
            req,
            q.unflatten(1, (Hkv, G)),
            k,
            (0, B * Hkv),
            0,
            L,
            out=empty_large((B * Hkv, G * L, S), q.dtype, q.device),
        )
        _, lse = _softmax_with_lse_(w, may_be_empty=req.mask is not None)
        lse = lse.view(B, Hq, L)
        out = torch.matmul(w.view(B, Hkv, G * L, S), v).view(B, Hq, L, Ev)
        ctx.save_for_backward(q, k, v, w, lse)
        ctx.scale = req.scale
        ctx.set_materialize_grads(False)
        return out, w.view(B, Hq, L, S), lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dweights: Tensor | None, dlse: Tensor | None):
        q, k, v, w, lse = ctx.saved_tensors
        B, Hq, L, E = q.shape
        Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
        w4 = w.view(B, Hkv, -1, S)
        dw = torch.zeros_like(w4) if dout is None else torch.matmul(dout.reshape(B, Hkv, -1, Ev), v.transpose(-1, -2))
        if dweights is not None:
            dw += dweights.reshape(w4.shape)
        dv = None if dout is None else torch.matmul(w4.transpose(-1, -2), dout.reshape(B, Hkv, -1, Ev))
        ds = torch._softmax_backward_data(dw, w4, -1, w4.dtype)
        if dlse is not None:
            ds.addcmul_(w4, lse_cotangent(dlse, lse).reshape(B, Hkv, -1, 1))
        dq = torch.matmul(ds, k).mul_(ctx.scale).view(B, Hq, L, E)
        dk = torch.matmul(ds.transpose(-1, -2), q.reshape(B, Hkv, -1, E)).mul_(ctx.scale)
        return None, dq, dk, dv


def _slab_view(t: Tensor, bh0: int, bh1: int, Hkv: int, whole: bool) -> Tensor:
    """Slabs bh0..bh1-1 (one batch element) of a (B, Hkv, ...) tensor, as a view: (nb, ...),
    or (...) for a single slab so that the matmuls are plain 2-d ones; all of t when whole."""
    if whole:
        return t
    b, h0, h1 = bh0 // Hkv, bh0 % Hkv, bh0 % Hkv + (bh1 - bh0)
    return t[b, h0] if h1 - h0 == 1 else t[b, h0:h1]


def _eager_autograd(req: Request, q: Tensor, k: Tensor, v: Tensor) -> AttentionOutput:
    B, Hq, Hkv, L, S, E, Ev = req.shape
    q5, v4 = q.unflatten(1, (Hkv, Hq // Hkv)), v
    s = _logits(req, q5, k, (0, B * Hkv), 0, L, inplace=False).view(B, Hkv, -1, S)
    # torch's fused softmax makes fewer passes over L x S than max/exp/sum/div by hand. Two
    # cheap row maxima recover lse and the max weight: the softmax keeps the argmax, so
    # lse = m - log(max w), exact because max w >= 1/S never underflows.
    with scope(SOFTMAX):
        m = s.amax(dim=-1, keepdim=True)
        empty = m == float("-inf")  # rows with nothing to attend to would give NaN
        any_empty = bool(empty.any())
        if any_empty:
            s = s.masked_fill(empty, 0.0)
        weights = torch.softmax(s, dim=-1)
        w_max = weights.amax(dim=-1, keepdim=True)
        if any_empty:
            weights = weights.masked_fill(empty, 0.0)
            w_max = w_max.masked_fill(empty, 0.0)
        lse = torch.where(empty, float("-inf"), m - torch.log(torch.where(empty, 1.0, w_max)))
    stats = None
    if req.need_stats:
        entropy = row_entropy(weights)  # not xlogy: its gradient is NaN at w = 0
        stats = AttentionStats(entropy=entropy.view(B, Hq, L), max_weight=w_max.view(B, Hq, L))
    w_in = weights.to(v.dtype)
    if req.dropout_p > 0:
        w_in = F.dropout(w_in, req.dropout_p, training=True)
    with scope(AV):
        out = torch.matmul(w_in, v4).view(B, Hq, L, Ev)
    w_out = None
    if req.need_weights:
        w_out = weights.view(B, Hq, L, S)
        w_out = (w_out.mean(dim=1) if req.need_weights == "mean" else w_out).to(req.q.dtype)
    return AttentionOutput(out=out, weights=w_out, stats=stats, lse=lse.view(B, Hq, L), backend="eager")


def _eager_chunked(req: Request, q: Tensor, k: Tensor, v: Tensor) -> AttentionOutput:
    """No autograd: each work unit's logits stay in cache while they become weights, and
    the L x S weights are written once (not at all when they are not asked for). A unit of
    whole slabs computes its per-head weights right in their place in the result, and
    torch's fused row softmax turns them into weights in place (see _softmax_rows_).
    """
    B, Hq, Hkv, L, S, E, Ev = req.shape
    G = Hq // Hkv
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    units = _units(req)
    whole = len(units) == 1
    q5 = q.unflatten(1, (Hkv, G))  # a view, also of permuted head-split projections: no copy
    out = q.new_empty(B * Hkv, G, L, Ev)
    lse = q.new_empty(B * Hkv, G, L, dtype=acc)
    per_head = req.need_weights is True
    # The weights are the one large result: on huge pages they fault in ~4x faster (alloc.py).
    weights = empty_large((B * Hkv, G * L, S), q.dtype, q.device) if per_head else None
    mean_w = empty_large((B, L, S), acc, q.device) if req.need_weights == "mean" else None
    entropy = q.new_empty(B * Hkv, G, L, dtype=acc) if req.need_stats else None
    max_w = q.new_empty(B * Hkv, G, L, dtype=acc) if req.need_stats else None
    for bh0, bh1, q0, n in units:
        nb = bh1 - bh0

        def sel(t: Tensor, bh0: int = bh0, bh1: int = bh1) -> Tensor:
            return _slab_view(t, bh0, bh1, Hkv, whole)

        # Whole slabs of per-head weights are contiguous in the result: compute them there.
        dst = weights[bh0:bh1] if per_head and n == L else None
        p = _logits(req, sel(q5), sel(k), (bh0, bh1), q0, n, out=dst)
        with scope(SOFTMAX):
            top, lse_rows = _softmax_with_lse_(p, may_be_empty=req.mask is not None or req.score is not None)
        p4 = p.view(nb, G, n, S)
        rows = (slice(bh0, bh1), slice(None), slice(q0, q0 + n))
        lse[rows] = lse_rows.view(nb, G, n)
        if req.need_stats:
            entropy[rows] = -torch.special.xlogy(p4, p4).sum(dim=-1)  # no autograd on this path
            max_w[rows] = top.view(nb, G, n)
        if per_head and (dst is None or p.data_ptr() != dst.data_ptr()):  # not computed in place
            weights.view(B * Hkv, G, L, S)[rows] = p4
        if mean_w is not None:
            _add_to_mean(mean_w, p4, bh0, q0, Hkv, whole)
        w_in = p if p.dtype == v.dtype else p.to(v.dtype)
        if req.dropout_p > 0:
            w_in = F.dropout(w_in, req.dropout_p, training=True)
        with scope(AV):  # the group folds into the rows: v is read once per group, never copied
            vb = sel(v)
            out[rows] = torch.matmul(w_in.view(*vb.shape[:-2], G * n, S), vb).view(nb, G, n, Ev)
    stats = AttentionStats(entropy.view(B, Hq, L), max_w.view(B, Hq, L)) if req.need_stats else None
    w_out = weights.view(B, Hq, L, S) if weights is not None else mean_w
    w_out = w_out.to(q.dtype) if w_out is not None else None
    return AttentionOutput(
        out=out.view(B, Hq, L, Ev), weights=w_out, stats=stats, lse=lse.view(B, Hq, L), backend="eager"
    )


def _softmax_with_lse_(p: Tensor, may_be_empty: bool) -> tuple[Tensor, Tensor]:
    """Logits ``p`` (..., S) -> weights in place; returns the row max weight and lse, (..., 1).

    The softmax keeps the argmax: its weight is exp(0) / sum, so lse = m - log(max w), exact
    because max w >= 1 / S never underflows. Two row maxima are cheaper than the sum and
    division passes a hand-written exp would need. A row with nothing to attend to (only
    possible with a mask or score: ``may_be_empty``) comes out of the softmax as NaN and is
    zeroed, with lse -inf; NaN inputs stay NaN.
    """
    m = p.amax(dim=-1, keepdim=True)
    _softmax_rows_(p)
    top = p.amax(dim=-1, keepdim=True)
    empty = m == float("-inf")
    if may_be_empty and bool(empty.any()):
        p.masked_fill_(empty, 0.0)
        top = top.masked_fill(empty, 0.0)
    return top, torch.where(empty, float("-inf"), m - torch.log(top))


def _softmax_rows_(p: Tensor) -> Tensor:
    """Softmax over the last dim of float32/float64 ``p``, in place.

    On CPU torch's softmax kernel works one row at a time (max, exp and sum, scale) while
    the row sits in L1, and each element is read before it is written, so the output may
    alias the input: one pass over the unit instead of three (exp, sum, divide). Elsewhere
    the kernel's aliasing is not documented, so the result is computed aside and copied.
    """
    if p.device.type == "cpu":
        return torch.ops.aten._softmax.out(p, -1, False, out=p)
    return p.copy_(torch.softmax(p, dim=-1))


def _add_to_mean(mean_w: Tensor, p4: Tensor, bh0: int, q0: int, Hkv: int, whole: bool) -> None:
    """Add one unit's weights p4 (nb, G, n, S) / Hq into the head average (B, L, S).

    Units come batch by batch and head by head, so the unit holding a batch element's first
    kv head writes its rows (no zero fill) and later units add to them.
    """
    nb, G, n, S = p4.shape
    Hq = Hkv * G
    if whole:  # every head of every batch element: one mean over heads
        torch.mean(p4.reshape(mean_w.shape[0], Hq, n, S), dim=1, out=mean_w[:, q0 : q0 + n])
        return
    heads = p4.reshape(nb * G, n, S)
    part = heads[0] if nb * G == 1 else heads.sum(dim=0)
    rows = mean_w[bh0 // Hkv, q0 : q0 + n]
    if bh0 % Hkv == 0:
        torch.mul(part, 1.0 / Hq, out=rows)
    else:
        rows.add_(part, alpha=1.0 / Hq)


class EagerBackend(Backend):
    name = "eager"
    summary = "fast eager math with the L x S weights in memory (fused softmax, GQA without copies)"
    capabilities = {
        "masks": "all (evaluated densely)",
        "scores": "all",
        "GQA/MQA": "yes (no copy)",
        "need_weights": "yes",
        "need_stats": "yes (from the weights)",
        "lse": "yes",
        "dropout": "yes",
        "backward": "yes (autograd)",
        "devices": "any",
    }

    def refusals(self, req: Request) -> list[str]:
        return []

    def memory_bytes(self, req: Request) -> int:
        B, Hq, _, L, S, _, _ = req.shape
        return req.q.element_size() * B * Hq * L * S * 2  # the L x S scores and weights

    def cost(self, req: Request) -> float:
        B, Hq, _, L, S, _, _ = req.shape
        passes = 5 + (2 if req.mask is not None else 0) + (3 if req.score is not None else 0)
        t = attention_flops(req) * _SECONDS_PER_FLOP + passes * _SECONDS_PER_ELEMENT * B * Hq * L * S
        return t * (3.0 if req.needs_grad else 1.0)

    def run(self, req: Request) -> AttentionOutput:
        return eager_attention(req)
