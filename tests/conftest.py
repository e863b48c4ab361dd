"""Shared fixtures and the oracle rule used throughout the suite.

The oracle rule (shared/DESIGN.md, "Rules worth keeping", 1): with ``gold`` the reference
backend run on float64 copies of the inputs and ``ref`` the reference backend run at the
test dtype, a candidate passes when

    max |candidate - gold| <= 2 * max |ref - gold| + floor

so a fast path may be at most twice as far from the truth as the readable eager code at
the same precision, plus a small absolute floor for cases where the reference happens to
be (nearly) exact.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor

from headwise import attend
from headwise.attend import make_request
from headwise.kernels import tiled as tiled_kernel
from headwise.kernels.tiled import tiled_attention

# Absolute floors of the oracle rule, per test dtype.
# - float32: 1e-5 is ~100 ulps of O(1) outputs; err(ref) alone is often 3e-7 on these sizes,
#   and a blocked kernel reorders sums over up to ~1000 keys.
# - bfloat16: 1e-2 is ~2.5 ulps (bf16 eps = 2**-8 = 3.9e-3) of O(1) values.
# - float64: ref IS gold there (err(ref) == 0), so the floor alone must absorb the
#   candidate's own float64 rounding. Outputs are off by ~1e-15, but a score parameter's
#   gradient sums ~1e4 terms of both signs (the Poincare curvature: 1.4e-12 measured on a
#   gradient of 1.3 from the eager backend), hence 1e-11 rather than 1e-12.
FLOORS: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-11}


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same RNG state (torch, numpy, random)."""
    torch.manual_seed(20251123)
    np.random.seed(20251123)
    random.seed(20251123)


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def assert_close_to_gold(candidate: Tensor, ref_same_dtype: Tensor, gold: Tensor, floor: float, what: str = "") -> None:
    """max|candidate - gold| <= 2 * max|ref_same_dtype - gold| + floor (see the module docstring)."""
    assert candidate.shape == gold.shape, f"{what}: shape {tuple(candidate.shape)} != gold {tuple(gold.shape)}"
    assert ref_same_dtype.shape == gold.shape, f"{what}: ref shape {tuple(ref_same_dtype.shape)}"
    assert not torch.isnan(candidate).any(), f"{what}: candidate has NaN"
    err = max_abs_diff(candidate, gold)
    err_ref = max_abs_diff(ref_same_dtype, gold)
    bound = 2 * err_ref + floor
    assert err <= bound, f"{what}: error {err:.3e} > 2 * ref error {err_ref:.3e} + floor {floor:.1e} = {bound:.3e}"


def assert_lse_close_to_gold(candidate: Tensor, ref_same_dtype: Tensor, gold: Tensor, floor: float) -> None:
    """-inf positions (rows with nothing to attend to) must match; finite entries follow the rule."""
    gold_inf = torch.isneginf(gold)
    assert torch.equal(torch.isneginf(candidate), gold_inf), "lse: -inf positions differ from gold"
    assert torch.equal(torch.isneginf(ref_same_dtype), gold_inf), "lse: reference -inf positions differ from gold"
    assert torch.isfinite(candidate[~gold_inf]).all(), "lse: non-finite entry where gold is finite"
    fin = ~gold_inf
    assert_close_to_gold(candidate[fin], ref_same_dtype[fin], gold[fin], floor, "lse")


# ----------------------------------------------------------------------------------------
# Running one call three ways (candidate, reference at dtype, float64 gold) with gradients.


@dataclass
class Run:
    """Result of one attend() call and the gradients of <out, cotangent>."""

    res: object  # AttentionOutput
    grads: dict[str, Tensor]


#: (parameter dtype, number of query heads) -> (score, learnable parameter tensors)
ScoreFactory = Callable[[torch.dtype, int], tuple[object, Sequence[Tensor]]]


def make_inputs(
    B: int, Hq: int, Hkv: int, L: int, S: int, E: int, Ev: int, dtype: torch.dtype, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v and an output cotangent, rounded to ``dtype`` (gold then sees the same values)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, S, E, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(B, Hq, L, Ev, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def run_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    dtype: torch.dtype,
    backend: str,
    mask=None,
    score_factory: ScoreFactory | None = None,
    need_stats: bool = False,
    grads: bool = True,
    **kwargs,
) -> Run:
    """attend() on copies of q, k, v cast to ``dtype``; grads of sum(out * dout) if asked."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    score, params = score_factory(param_dtype, q.shape[1]) if score_factory is not None else (None, ())
    leaves = {n: t.detach().to(dtype).requires_grad_(grads) for n, t in (("q", q), ("k", k), ("v", v))}
    with torch.set_grad_enabled(grads):  # without grads even learnable score params need no backward
        if backend.startswith("tiled:"):
            # "tiled:16x8": the tiled kernel with explicit (small) blocks, so that small
            # problems still cross block boundaries (the planner would pick one 64+ block).
            # "tiled:16x8x24": the same blocks merged into forward tiles of up to 24 keys.
            # "tiled:16x8-online": every query block on the running-maximum path, which
            # moderate inputs otherwise skip (their logits are bounded, so they need no shift at all).
            spec, online = backend.removeprefix("tiled:").removesuffix("-online"), backend.endswith("-online")
            block_q, block_k, *span = (int(n) for n in spec.split("x"))
            req = make_request(
                leaves["q"], leaves["k"], leaves["v"], mask, score, None, 0.0, False, need_stats, **kwargs
            )
            with pytest.MonkeyPatch.context() as patch:
                if online:
                    patch.setattr(tiled_kernel, "_BOUNDED_LOGIT_LIMIT", {})
                res = tiled_attention(req, block_q, block_k, span[0] if span else None)
        else:
            res = attend(
                leaves["q"],
                leaves["k"],
                leaves["v"],
                mask=mask,
                score=score,
                need_stats=need_stats,
                backend=backend,
                **kwargs,
            )
    out_grads: dict[str, Tensor] = {}
    if grads:
        named = list(leaves.items()) + [(f"param{i}", p) for i, p in enumerate(params)]
        (res.out.double() * dout.double()).sum().backward()
        for n, t in named:
            assert t.grad is not None, f"no gradient reached {n}"
            out_grads[n] = t.grad
    return Run(res, out_grads)


def check_against_gold(
    backend: str,
    mask,
    score_factory: ScoreFactory | None,
    dtype: torch.dtype,
    shape: tuple[int, int, int, int, int, int, int],
    *,
    need_stats: bool = False,
    need_weights: bool = False,
    grads: bool = True,
    seed: int = 0,
) -> Run:
    """The three-way oracle check of out, lse, stats and every gradient. Returns the candidate run."""
    B, Hq, Hkv, L, S, E, Ev = shape
    q, k, v, dout = make_inputs(B, Hq, Hkv, L, S, E, Ev, dtype, seed)
    floor = FLOORS[dtype]
    w = {"need_weights": True} if need_weights else {}
    cand = run_attend(q, k, v, dout, dtype, backend, mask, score_factory, need_stats, grads, **w)
    ref = run_attend(q, k, v, dout, dtype, "reference", mask, score_factory, True, grads, need_weights=True)
    gold = run_attend(q, k, v, dout, torch.float64, "reference", mask, score_factory, True, grads, need_weights=True)

    assert cand.res.out.dtype == dtype
    assert_close_to_gold(cand.res.out, ref.res.out, gold.res.out, floor, "out")
    if cand.res.lse is not None:
        assert_lse_close_to_gold(cand.res.lse, ref.res.lse, gold.res.lse, floor)
    if need_weights:
        assert cand.res.weights is not None, f"{backend} returned no weights although need_weights=True"
        assert_close_to_gold(cand.res.weights, ref.res.weights, gold.res.weights, floor, "weights")
    if need_stats:
        assert cand.res.stats is not None, f"{backend} returned no stats although need_stats=True"
        for field in ("entropy", "max_weight"):
            c, r, g = (getattr(x.res.stats, field) for x in (cand, ref, gold))
            assert_close_to_gold(c, r, g, floor, field)
    for name, g in gold.grads.items():
        # Gradients are sums over up to L * S terms (a score parameter's over B * L * S per
        # head) and reach magnitudes of 10-100, so their floor is relative to the largest
        # gold entry: "a few hundred ulps" at the dtype. (In float64 ref IS gold, so the floor
        # alone bounds the candidate; absolute 1e-12 fails on honest 1e-13-relative sums.)
        scale = max(1.0, float(g.abs().max()))
        assert_close_to_gold(cand.grads[name], ref.grads[name], g, floor * scale, f"grad {name}")
    return cand


def require_data(available: bool, what: str) -> None:
    """Skip when a Debian data package or tool is missing, or fail when CI requires it.

    ``make test`` installs them (scripts/system-deps.sh); CI sets HEADWISE_REQUIRE_DATA=1 so that
    a missing package cannot turn real-data tests into silent skips.
    """
    if available:
        return
    import os

    if os.environ.get("HEADWISE_REQUIRE_DATA"):
        pytest.fail(f"{what} is missing and HEADWISE_REQUIRE_DATA is set (run: bash scripts/system-deps.sh)")
    pytest.skip(f"{what} is missing (run: bash scripts/system-deps.sh)")


def _empty_rows(b, h, q, kv):
    """Causal, with every fourth query position (1, 5, 9, ...) attending to nothing."""
    return (kv <= q) & (q % 4 != 1)


def _gradient_masks() -> dict:
    from headwise import and_masks, causal, padding

    return {
        "none": None,
        "causal": causal,
        "empty_rows": _empty_rows,
        "padding_empty_batch": and_masks(causal, padding([0, 7])),  # batch 0: no key at all
    }


#: The masks of the gradient oracles (statistics, lse): none, causal, empty rows, an empty batch.
GRADIENT_MASKS = _gradient_masks()


def require_extra(module: str, extra: str):
    """Import ``module`` of the optional extra ``headwise[extra]``, or skip naming the extra.

    CI (HEADWISE_REQUIRE_DATA=1, ``make test`` installs every extra) fails instead of skipping,
    so a broken install cannot turn the extra's tests into silent skips.
    """
    import importlib
    import os

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("HEADWISE_REQUIRE_DATA"):
            pytest.fail(f"{module} (extra headwise[{extra}]) is missing and HEADWISE_REQUIRE_DATA is set: {exc}")
        pytest.skip(f"{module} is missing: pip install 'headwise[{extra}]'", allow_module_level=True)
