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

from headwise.kernels.base import AttentionOutput, AttentionStats, Backend, Request, attention_flops
from headwise.profiling import AV, MASK_SCORE, QK, SOFTMAX, scope

_SECONDS_PER_FLOP = 1 / 150e9
_SECONDS_PER_ELEMENT = 1.6e-9  # per logit, for the elementwise passes over L x S


_CHUNK_BYTES = 4 << 20  # logits of one query chunk: about what the caches hold


def _logits(req: Request, q: Tensor, k: Tensor, q0: int, n: int, inplace: bool) -> Tensor:
    """Masked, modified logits of queries q0 .. q0+n-1 as (B, Hkv, G*n, S), float32 or wider."""
    B, Hq, Hkv, L, S, E, Ev = req.shape
    G = Hq // Hkv
    rows = q[:, :, q0 : q0 + n].reshape(B, Hkv, G * n, q.shape[-1])
    with scope(QK):
        if req.score is not None and req.score.replaces_similarity:
            s = req.score.similarity(rows, k) * req.scale
        else:
            # Scaling the n*E queries is cheaper than scaling the n*S logits.
            s = torch.matmul(rows * req.scale, k.transpose(-1, -2))
        if s.dtype in (torch.float16, torch.bfloat16):
            s = s.float()
    if req.score is None and req.mask is None:
        return s
    with scope(MASK_SCORE):
        return _mask_and_modify(req, s, q0, n, inplace).reshape(B, Hkv, G * n, S)


def _mask_and_modify(req: Request, s: Tensor, q0: int, n: int, inplace: bool) -> Tensor:
    B, Hq, Hkv, L, S, E, Ev = req.shape
    G = Hq // Hkv
    dev = s.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1, 1)
    h = torch.arange(Hq, device=dev).view(1, Hkv, G, 1, 1)
    qi = torch.arange(q0, q0 + n, device=dev).view(1, 1, 1, n, 1)
    ki = torch.arange(S, device=dev).view(1, 1, 1, 1, S)
    s5 = s.view(B, Hkv, G, n, S)
    if req.score is not None:
        s5 = req.score.modify(s5, b, h, qi + (S - L), ki).expand(B, Hkv, G, n, S)
    if req.mask is not None:
        allowed = req.mask.evaluate(b, h, qi, ki, L, S)
        s5 = s5.masked_fill_(~allowed, float("-inf")) if inplace else s5.masked_fill(~allowed, float("-inf"))
    return s5


def _chunk_rows(B: int, Hq: int, L: int, S: int) -> int:
    """Query rows per chunk: their float32 logits for all heads fill about _CHUNK_BYTES."""
    return max(1, min(L, _CHUNK_BYTES // (4 * B * Hq * S)))


def eager_attention(req: Request) -> AttentionOutput:
    """Materialising attention; without autograd it runs query chunk by query chunk."""
    q, k, v = req.q, req.k, req.v
    B, Hq, _, L, S, _, _ = req.shape
    if req.needs_grad or _chunk_rows(B, Hq, L, S) < L:
        # Head-split projections arrive as permuted views: one copy now, not one per chunk.
        # A single chunk reads them once anyway, and matmul takes the strided views as they are.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if req.score is not None:
        q, k = req.score.prepare(q, k)
    if req.needs_grad:
        return _eager_autograd(req, q, k, v)
    return _eager_chunked(req, q, k, v)


def _eager_autograd(req: Request, q: Tensor, k: Tensor, v: Tensor) -> AttentionOutput:
    B, Hq, Hkv, L, S, E, Ev = req.shape
    s = _logits(req, q, k, 0, L, inplace=False)
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
        entropy = -torch.special.xlogy(weights, weights).sum(dim=-1)
        stats = AttentionStats(entropy=entropy.view(B, Hq, L), max_weight=w_max.view(B, Hq, L))
    w_in = weights.to(v.dtype)
    if req.dropout_p > 0:
        w_in = F.dropout(w_in, req.dropout_p, training=True)
    with scope(AV):
        out = torch.matmul(w_in, v).view(B, Hq, L, Ev)
    w_out = None
    if req.need_weights:
        w_out = weights.view(B, Hq, L, S)
        w_out = (w_out.mean(dim=1) if req.need_weights == "mean" else w_out).to(req.q.dtype)
    return AttentionOutput(out=out, weights=w_out, stats=stats, lse=lse.view(B, Hq, L), backend="eager")


def _eager_chunked(req: Request, q: Tensor, k: Tensor, v: Tensor) -> AttentionOutput:
    """No autograd: each query chunk's logits stay in cache while they become weights, so
    the L x S weights are written once (and not at all when they are not asked for).

    Head-averaged weights (``need_weights="mean"``) are reduced chunk by chunk into (B, L, S).
    Per-head weights are copied chunk by chunk into the result: writing the logits straight
    into their strided rows of the (B, Hq, L, S) result was measured 1.7x slower (a matmul
    into a strided output is slower than into a contiguous buffer plus a copy).
    """
    B, Hq, Hkv, L, S, E, Ev = req.shape
    G = Hq // Hkv
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    n = _chunk_rows(B, Hq, L, S)
    out = q.new_empty(B, Hkv, G, L, Ev)
    lse = q.new_empty(B, Hkv, G, L, dtype=acc)
    per_head = req.need_weights is True
    weights = q.new_empty(B, Hkv, G, L, S) if per_head else None
    mean_w = q.new_empty(B, L, S) if req.need_weights == "mean" else None
    entropy = q.new_empty(B, Hkv, G, L, dtype=acc) if req.need_stats else None
    max_w = q.new_empty(B, Hkv, G, L, dtype=acc) if req.need_stats else None
    for q0 in range(0, L, n):
        c = min(n, L - q0)
        rows = (slice(None), slice(None), slice(None), slice(q0, q0 + c))
        p5 = _logits(req, q, k, q0, c, inplace=True).view(B, Hkv, G, c, S)
        with scope(SOFTMAX):
            m = p5.amax(dim=-1, keepdim=True)
            m_safe = torch.where(m == float("-inf"), 0.0, m)  # rows with nothing to attend to
            p5.sub_(m_safe).exp_()
            denom = p5.sum(dim=-1, keepdim=True)
            has = denom != 0  # 0: nothing to attend to; NaN (from NaN inputs) stays NaN
            denom_safe = torch.where(has, denom, 1.0)
            p5.div_(denom_safe)
        lse[rows] = torch.where(has, m_safe + torch.log(denom_safe), float("-inf")).view(B, Hkv, G, c)
        if req.need_stats:
            entropy[rows] = -torch.special.xlogy(p5, p5).sum(dim=-1).view(B, Hkv, G, c)
            max_w[rows] = torch.where(has, 1.0 / denom_safe, 0.0).view(B, Hkv, G, c)
        if per_head:
            weights[rows] = p5
        if mean_w is not None:
            torch.mean(p5.flatten(1, 2), dim=1, out=mean_w[:, q0 : q0 + c])
        w_in = p5 if p5.dtype == v.dtype else p5.to(v.dtype)
        if req.dropout_p > 0:
            w_in = F.dropout(w_in, req.dropout_p, training=True)
        with scope(AV):  # the group folds into the rows: v is read once per group, never copied
            out[rows] = torch.matmul(w_in.reshape(B, Hkv, G * c, S), v).view(B, Hkv, G, c, Ev)
    stats = AttentionStats(entropy.view(B, Hq, L), max_w.view(B, Hq, L)) if req.need_stats else None
    w_out = weights.view(B, Hq, L, S) if weights is not None else mean_w
    return AttentionOutput(
        out=out.view(B, Hq, L, Ev), weights=w_out, stats=stats, lse=lse.view(B, Hq, L), backend="eager"
    )


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

    def cost(self, req: Request) -> float:
        B, Hq, _, L, S, _, _ = req.shape
        passes = 5 + (2 if req.mask is not None else 0) + (3 if req.score is not None else 0)
        t = attention_flops(req) * _SECONDS_PER_FLOP + passes * _SECONDS_PER_ELEMENT * B * Hq * L * S
        return t * (3.0 if req.needs_grad else 1.0)

    def run(self, req: Request) -> AttentionOutput:
        return eager_attention(req)
