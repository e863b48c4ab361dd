"""torch's fused ``scaled_dot_product_attention`` as a headwise backend.

On CPU its flash kernel reaches about 85% of matmul peak for plain and causal attention
(shared/DESIGN.md, anchors), so ``auto`` sends those requests here. Any other mask is
handed over as a dense (B|1, H|1, L, S) boolean tensor: correct, but it costs O(L * S)
memory and computes every block, which is why ``auto`` prefers the tiled kernel for
sparse masks. ALiBi becomes a dense float bias and a temperature is folded into the scale;
other scores are refused. Rows that can attend to nothing are given one dummy key and then
zeroed, so they come out as 0 (not NaN) with zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.caches import BoundedCache
from headwise.kernels.base import AttentionOutput, Backend, Request, attention_flops
from headwise.masks import causal, grid_indices
from headwise.scores import ScoreChain, _Alibi, _Temperature

_SECONDS_PER_FLOP = 1 / 140e9
_SECONDS_PER_MASK_ELEMENT = 2.2e-9


def _score_parts(req: Request):
    """(temperature factor, alibi score or None), or None when a score is unsupported."""
    if req.score is None:
        return 1.0, None
    parts = req.score.scores if isinstance(req.score, ScoreChain) else (req.score,)
    factor, alibi_part = 1.0, None
    for part in parts:
        if isinstance(part, _Temperature):
            if alibi_part is not None:
                return None  # temperature after alibi would also scale the bias
            factor /= part.t
        elif isinstance(part, _Alibi) and alibi_part is None:
            alibi_part = part
        else:
            return None
    return factor, alibi_part


_MASKS = BoundedCache("sdpa.dense_masks", 8)
_MASK_CACHE_MAX_ELEMENTS = 1 << 26  # 64 MB of bools


def _dense_mask(req: Request) -> tuple[Tensor, Tensor | None]:
    """The (B|1, H|1, L, S) bool mask SDPA needs, and the rows that attend to nothing.

    An empty row gets one dummy key so that the softmax stays finite; it is zeroed after.
    Masks are cached like FlexAttention's block masks: building one costs a pass over L x S.
    """
    B, Hq, _, L, S, _, _ = req.shape
    mask_key = req.mask.cache_key()
    key = None if mask_key is None else (mask_key, B, Hq, L, S, str(req.q.device))
    hit = _MASKS.get(key)
    if hit is not None:
        return hit
    b, h, qi, ki = grid_indices(B, Hq, L, S, req.q.device)
    allowed = req.mask.evaluate(b, h, qi, ki, L, S)
    # A mask function may return fewer dims than its index arguments (a scalar, or (S,) from
    # kv alone): SDPA wants a 4-d (or 2-d) mask, so lift it without copying.
    allowed = allowed.view((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
    empty_rows = ~allowed.any(dim=-1, keepdim=True)
    if bool(empty_rows.any()):
        allowed = allowed | (empty_rows & (ki == 0))
    else:
        empty_rows = None
    if allowed.numel() <= _MASK_CACHE_MAX_ELEMENTS:
        _MASKS.put(key, (allowed, empty_rows), req.mask)
    return allowed, empty_rows


def _plain_causal(req: Request) -> bool:
    B, Hq, Hkv, L, S, E, Ev = req.shape
    return req.mask is causal and L == S


class SdpaBackend(Backend):
    name = "sdpa"
    summary = "torch.nn.functional.scaled_dot_product_attention (fused flash kernel on CPU)"
    capabilities = {
        "masks": "none / causal natively; others as a dense L x S bool mask",
        "scores": "temperature, alibi (dense bias)",
        "GQA/MQA": "yes (enable_gqa)",
        "need_weights": "no",
        "need_stats": "no",
        "lse": "no",
        "dropout": "yes (falls to the math kernel)",
        "backward": "yes",
        "devices": "any",
    }

    def refusals(self, req: Request) -> list[str]:
        reasons = []
        if req.need_weights:
            reasons.append("SDPA does not return attention weights (need_weights=True)")
        if req.need_stats:
            reasons.append("SDPA cannot compute per-row statistics (need_stats=True)")
        if _score_parts(req) is None:
            reasons.append(f"SDPA supports only temperature and alibi scores, not {req.score!r}")
        return reasons

    def memory_bytes(self, req: Request) -> int:
        B, Hq, _, L, S, _, _ = req.shape
        _, alibi_part = _score_parts(req) or (None, None)
        dense = req.mask is not None and not (_plain_causal(req) and alibi_part is None)  # as run() decides
        bias = req.q.element_size() * B * Hq * L * S if alibi_part is not None else 0
        return (B * Hq * L * S if dense else 0) + bias  # a bool mask (at most per batch and head), an alibi bias

    def cost(self, req: Request) -> float:
        B, Hq, Hkv, L, S, E, Ev = req.shape
        if req.mask is None:
            t = attention_flops(req) * _SECONDS_PER_FLOP
        elif _plain_causal(req):
            t = attention_flops(req, 0.5) * _SECONDS_PER_FLOP
        else:
            # Building and reading the dense mask: (1, 1, L, S) unless it varies by batch/head.
            t = attention_flops(req) * _SECONDS_PER_FLOP + _SECONDS_PER_MASK_ELEMENT * L * S
        if req.dropout_p > 0:
            t *= 8.0  # dropout forces the unfused math kernel
        if req.needs_grad:
            t *= 3.5
        return t

    def run(self, req: Request) -> AttentionOutput:
        q, k, v = req.q, req.k, req.v
        B, Hq, Hkv, L, S, E, Ev = req.shape
        factor, alibi_part = _score_parts(req)
        attn_mask, is_causal, empty_rows = None, False, None
        if req.mask is not None and not (_plain_causal(req) and alibi_part is None):
            attn_mask, empty_rows = _dense_mask(req)
        elif req.mask is not None:
            is_causal = True
        if alibi_part is not None:
            b, h, qi, ki = grid_indices(B, Hq, L, S, q.device)
            bias = alibi_part.modify(torch.zeros((), dtype=q.dtype, device=q.device), b, h, qi + (S - L), ki)
            bias = bias.expand(B if attn_mask is not None and attn_mask.shape[0] > 1 else 1, Hq, L, S)
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=req.dropout_p,
            is_causal=is_causal,
            scale=req.scale * factor,
            enable_gqa=Hq != Hkv,
        )
        if empty_rows is not None:
            out = out.masked_fill(empty_rows.expand(B, Hq, L, 1), 0.0)
        return AttentionOutput(out=out, weights=None, stats=None, lse=None, backend="sdpa")
