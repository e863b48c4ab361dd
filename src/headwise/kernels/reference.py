"""The readable reference: the oracle every other backend is tested against.

It builds the whole (B, Hq, L, S) matrix of logits, so it costs O(L * S) memory, and it
is written to be read, not to be fast. It works in any floating dtype; tests run it in
float64. Half-precision inputs compute the softmax in float32 (as transformers' eager
attention does) and cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.kernels.base import AttentionOutput, AttentionStats, Backend, Request, attention_flops, row_entropy
from headwise.masks import grid_indices


def reference_attention(req: Request) -> AttentionOutput:
    """softmax(mask(modify(scale * similarity(q, k)))) @ v, materialised."""
    q, k, v = req.q, req.k, req.v
    B, Hq, Hkv, L, S, E, Ev = req.shape
    # GQA / MQA: query head h uses key/value head h // G. Copying is fine here: readability first.
    G = Hq // Hkv
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    b, h, qi, ki = grid_indices(B, Hq, L, S, q.device)

    if req.score is not None:
        q, k = req.score.prepare(q, k)
        s = req.score.similarity(q, k) * req.scale
        s = req.score.modify(s, b, h, qi + (S - L), ki)
    else:
        s = (q @ k.transpose(-1, -2)) * req.scale

    compute_dtype = torch.float32 if s.dtype in (torch.float16, torch.bfloat16) else s.dtype
    s = s.to(compute_dtype)
    has_keys = torch.ones(B, Hq, L, 1, dtype=torch.bool, device=q.device)
    if req.mask is not None:
        allowed = req.mask.evaluate(b, h, qi, ki, L, S).expand(B, Hq, L, S)
        s = s.masked_fill(~allowed, float("-inf"))
        has_keys = allowed.any(dim=-1, keepdim=True)

    lse = torch.logsumexp(s, dim=-1)  # -inf for rows with nothing to attend to
    # exp(s - lse) is NaN on empty rows (-inf - -inf); those rows get weight 0. A NaN that
    # comes from q or k is not an empty row: it stays NaN.
    weights = torch.where(has_keys, torch.exp(s - torch.where(has_keys, lse.unsqueeze(-1), 0.0)), 0.0)

    stats = None
    if req.need_stats:
        entropy = row_entropy(weights)  # not xlogy: its gradient is NaN at w = 0
        stats = AttentionStats(entropy=entropy, max_weight=weights.amax(-1))

    p = weights.to(v.dtype)
    if req.dropout_p > 0:
        p = F.dropout(p, req.dropout_p, training=True)
    out = p @ v
    return AttentionOutput(
        out=out,
        weights=_returned_weights(weights, req),
        stats=stats,
        lse=lse,
        backend="reference",
    )


def _returned_weights(weights: Tensor, req: Request) -> Tensor | None:
    """(B, Hq, L, S) per head, (B, L, S) averaged over heads for need_weights="mean", or None."""
    if not req.need_weights:
        return None
    return (weights.mean(dim=1) if req.need_weights == "mean" else weights).to(req.q.dtype)


class ReferenceBackend(Backend):
    name = "reference"
    summary = "readable eager oracle; materialises the L x S weights (O(L*S) memory)"
    capabilities = {
        "masks": "all (evaluated densely)",
        "scores": "all",
        "GQA/MQA": "yes (copies k, v)",
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
        return 8 * B * Hq * L * S * 3  # float64 scores, weights and a copy

    def cost(self, req: Request) -> float:
        # The oracle is never the fastest way: it copies k and v and makes many L x S passes,
        # so auto prefers the eager backend for the same requests.
        B, Hq, _, L, S, _, _ = req.shape
        return (attention_flops(req) / 150e9 + 12 * 1.6e-9 * B * Hq * L * S) * (3.0 if req.needs_grad else 1.0)

    def run(self, req: Request) -> AttentionOutput:
        return reference_attention(req)
