"""torch FlexAttention (compiled) as a headwise backend.

FlexAttention turns a mask function into a block-sparse ``BlockMask`` and skips empty
blocks, like the tiled kernel, but as one compiled kernel: on CPU it is the fastest way to
run sliding-window inference (shared/DESIGN.md, anchors). It has limits the registry
states: on CPU it cannot run backward and cannot return the log-sum-exp, every new shape
or mask costs a compile of a few seconds, and head dims must be powers of two >= 16.
Compiled block masks are cached per (mask, B, H, L, S, device).
"""

from __future__ import annotations

import torch

from headwise.caches import BoundedCache
from headwise.kernels.base import AttentionOutput, Backend, Request, attention_flops

# Compiled FlexAttention on 2 CPU cores ran at about 40 GFLOP/s of visited blocks.
_SECONDS_PER_FLOP = 1 / 40e9
_SECONDS_PER_CALL = 1e-3
_BLOCK = 128
_BLOCK_MASKS = BoundedCache("flex.block_masks", 32)
_compiled = None


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


#: dynamo settings for the duration of a flex call (never left set: importing or calling headwise
#: changes no global configuration of torch). Every new shape or mask is a recompile of the same
#: function; past dynamo's default limit of 8, torch silently falls back to an unfused
#: flex_attention that materialises L x S: the limit is raised, and reaching it is an error.
DYNAMO_LIMITS = {"recompile_limit": 256, "accumulated_recompile_limit": 1024, "fail_on_recompile_limit_hit": True}


def flex_fn():
    """The compiled flex_attention, shared by every call (and by the benchmark), as a function
    that runs it under :data:`DYNAMO_LIMITS` (``torch._dynamo.config.patch``: set for the call,
    restored after it)."""
    global _compiled
    if _compiled is None:
        import torch._dynamo.config as dynamo_config
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)

        def run_compiled(*args, **kwargs):
            limits = {k: max(getattr(dynamo_config, k), v) if isinstance(v, int) and not isinstance(v, bool) else v
                      for k, v in DYNAMO_LIMITS.items()}  # fmt: skip
            with dynamo_config.patch(**limits):
                return compiled(*args, **kwargs)

        _compiled = run_compiled
    return _compiled


def _block_mask(req: Request):
    from torch.nn.attention.flex_attention import create_block_mask

    B, Hq, Hkv, L, S, E, Ev = req.shape
    mask = req.mask
    mask_key = mask.cache_key()
    key = None if mask_key is None else (mask_key, B, Hq, L, S, str(req.q.device))
    hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        return hit

    def mask_mod(b, h, q_idx, kv_idx):
        return mask.evaluate(b, h, q_idx, kv_idx, L, S)

    bm = create_block_mask(mask_mod, B, Hq, L, S, device=req.q.device, BLOCK_SIZE=_BLOCK)
    _BLOCK_MASKS.put(key, bm, mask)
    return bm


def _density(req: Request) -> float:
    """Share of 128 x 128 blocks FlexAttention visits (the tiled planner's cached plan)."""
    if req.mask is None:
        return 1.0
    from headwise.kernels.tiled import make_plan

    plan = make_plan(req, _BLOCK, _BLOCK)
    return plan.n_visits() / (len(plan.visits) * -(-plan.S // _BLOCK))


class FlexBackend(Backend):
    name = "flex"
    summary = "torch FlexAttention, compiled; block-sparse masks; forward only on CPU"
    capabilities = {
        "masks": "all (BlockMask, empty blocks skipped)",
        "scores": "all but similarity replacements (poincare)",
        "GQA/MQA": "yes (enable_gqa)",
        "need_weights": "no",
        "need_stats": "no",
        "lse": "no",
        "dropout": "no",
        "backward": "CUDA only",
        "devices": "CPU (compiled, inference), CUDA",
    }

    def refusals(self, req: Request) -> list[str]:
        B, Hq, Hkv, L, S, E, Ev = req.shape
        reasons = []
        if not flex_available():
            reasons.append("this torch has no FlexAttention")
        if req.need_weights or req.need_stats:
            reasons.append("FlexAttention returns neither weights nor per-row statistics")
        if req.dropout_p > 0:
            reasons.append("FlexAttention has no dropout (dropout_p > 0)")
        if req.score is not None and req.score.replaces_similarity:
            reasons.append(f"FlexAttention cannot replace the dot product ({req.score!r})")
        if req.q.device.type == "cpu" and req.needs_grad:
            reasons.append("FlexAttention has no backward on CPU (inputs require grad)")
        if req.q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            reasons.append(f"FlexAttention's compiled kernel needs float32/bfloat16/float16, not {req.q.dtype}")
        for name, d in (("E", E), ("Ev", Ev)):
            if d < 16 or d & (d - 1):
                reasons.append(f"FlexAttention needs head dims that are powers of two >= 16 ({name} = {d})")
        return reasons

    def memory_bytes(self, req: Request) -> int:
        B, Hq, _, L, S, _, _ = req.shape
        return 8 * B * Hq * (-(-L // _BLOCK)) * (-(-S // _BLOCK)) if req.mask is not None else 0  # the block mask

    def cost(self, req: Request) -> float:
        return attention_flops(req, _density(req)) * _SECONDS_PER_FLOP + _SECONDS_PER_CALL

    def run(self, req: Request) -> AttentionOutput:
        B, Hq, Hkv, L, S, E, Ev = req.shape
        block_mask = _block_mask(req) if req.mask is not None else None
        score_mod = None
        if req.score is not None:
            score = req.score

            def score_mod(s, b, h, q_idx, kv_idx):
                return score.modify(s, b, h, q_idx + (S - L), kv_idx)

        out = flex_fn()(
            req.q,
            req.k,
            req.v,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=req.scale,
            enable_gqa=Hq != Hkv,
        )
        return AttentionOutput(out=out, weights=None, stats=None, lse=None, backend="flex")
