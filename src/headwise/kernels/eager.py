"""Fast eager attention that materialises the weights: the backend for ``need_weights``.

The same mathematics as the reference, written for speed instead of readability: GQA
folds the G query heads of a group into the rows of one matmul (k and v are never
repeated, and the (B, Hkv, G*L, S) logits are already laid out as (B, Hq, L, S)); the scale
is applied to the queries, the softmax is torch's fused one, and the row max gives the
log-sum-exp and the max weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headwise.kernels.base import AttentionOutput, AttentionStats, Backend, Request, attention_flops

_SECONDS_PER_FLOP = 1 / 150e9
_SECONDS_PER_ELEMENT = 1.6e-9  # per logit, for the elementwise passes over L x S


def eager_attention(req: Request) -> AttentionOutput:
    q, k, v = req.q, req.k, req.v
    B, Hq, Hkv, L, S, E, Ev = req.shape
    G = Hq // Hkv
    if req.score is not None:
        q, k = req.score.prepare(q, k)
    rows = q.reshape(B, Hkv, G * L, q.shape[-1])
    if req.score is not None and req.score.replaces_similarity:
        s = req.score.similarity(rows, k) * req.scale
    else:
        # Scaling the L*E queries is cheaper than scaling the L*S logits.
        s = torch.matmul(rows * req.scale, k.transpose(-1, -2))
    low_precision = s.dtype in (torch.float16, torch.bfloat16)
    if low_precision:
        s = s.float()
    grad = req.needs_grad
    if req.score is not None or req.mask is not None:
        dev = q.device
        b = torch.arange(B, device=dev).view(B, 1, 1, 1, 1)
        h = torch.arange(Hq, device=dev).view(1, Hkv, G, 1, 1)
        qi = torch.arange(L, device=dev).view(1, 1, 1, L, 1)
        ki = torch.arange(S, device=dev).view(1, 1, 1, 1, S)
        s5 = s.view(B, Hkv, G, L, S)
        if req.score is not None:
            s5 = req.score.modify(s5, b, h, qi + (S - L), ki).expand(B, Hkv, G, L, S)
        if req.mask is not None:
            allowed = req.mask.evaluate(b, h, qi, ki, L, S)
            s5 = s5.masked_fill(~allowed, float("-inf")) if grad else s5.masked_fill_(~allowed, float("-inf"))
        s = s5.reshape(B, Hkv, G * L, S)

    # torch's fused softmax makes fewer passes over L x S than max/exp/sum/div by hand. Two
    # cheap row maxima recover lse and the max weight: the softmax keeps the argmax, so
    # lse = m - log(max w), exact because max w >= 1/S never underflows.
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
    w_in = weights.to(v.dtype) if low_precision else weights
    if req.dropout_p > 0:
        w_in = F.dropout(w_in, req.dropout_p, training=True)
    out = torch.matmul(w_in, v).view(B, Hq, L, Ev)
    return AttentionOutput(
        out=out,
        weights=weights.view(B, Hq, L, S).to(req.q.dtype) if req.need_weights else None,
        stats=stats,
        lse=lse.view(B, Hq, L),
        backend="eager",
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
