"""``headwise bench kernels``: attend() against torch SDPA, FlexAttention and eager math.

Cases (B=1, H=8, d=64, float32 by default): dense, causal, sliding window 128 and 512,
GQA 8/2, need_stats, forward and forward+backward. Every implementation of a case runs
interleaved in one process; ratios are taken within one case only. Peak memory comes from
fresh subprocesses (:mod:`headwise.bench.memprobe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headwise.attend import attend
from headwise.bench.harness import Timing, time_interleaved
from headwise.kernels.flex import flex_fn
from headwise.masks import Mask, causal, sliding_window


@dataclass(frozen=True)
class Case:
    """One benchmark problem: a variant at a length, forward or forward+backward."""

    variant: str
    L: int
    backward: bool = False
    B: int = 1
    H: int = 8
    d: int = 64

    @property
    def hkv(self) -> int:
        return 2 if self.variant == "gqa8/2" else self.H

    @property
    def mask(self) -> Mask | None:
        return {"causal": causal, "window128": sliding_window(128), "window512": sliding_window(512)}.get(self.variant)

    @property
    def label(self) -> str:
        return f"{self.variant} {'fwd+bwd' if self.backward else 'fwd'}"

    def useful_flops(self) -> float:
        """4*B*H*L*S*d for the attended part of the matrix (x3.5 with backward)."""
        L, d = self.L, self.d
        if self.variant in ("window128", "window512"):
            w = 128 if self.variant == "window128" else 512
            pairs = sum(min(i + 1, w) for i in range(L)) if L <= 65536 else L * w
        elif self.variant == "causal":
            pairs = L * (L + 1) / 2
        else:
            pairs = L * L
        return 4.0 * self.B * self.H * pairs * d * (3.5 if self.backward else 1.0)


VARIANTS = ("dense", "causal", "window128", "window512", "gqa8/2", "stats")
BACKWARD_VARIANTS = ("dense", "causal", "window128")
IMPLS = ("headwise auto", "headwise tiled", "torch SDPA", "FlexAttention", "eager math")
HEADWISE = ("headwise auto", "headwise tiled")
# Eager math holds H*L*L floats several times over; beyond this it only measures swapping.
EAGER_MAX_L = 4096
DENSE_BACKWARD_MAX_L = 4096
# Compiled FlexAttention on CPU visits dense blocks at about a quarter of SDPA's speed.
FLEX_DENSE_MAX_L = 8192


def make_inputs(case: Case, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(case.B, case.H, case.L, case.d), (case.B, case.hkv, case.L, case.d), (case.B, case.hkv, case.L, case.d)]
    ts = [torch.randn(*s, generator=g, dtype=dtype).to(device) for s in shapes]
    if case.backward:
        ts = [t.requires_grad_() for t in ts]
    return ts


def _dense_mask(case: Case, device: str) -> torch.Tensor | None:
    if case.mask is None or case.variant == "causal":
        return None
    return case.mask.dense(1, 1, case.L, case.L, device)


def build(impl: str, case: Case, q, k, v, device: str = "cpu") -> Callable[[], object] | str:
    """A zero-argument callable running ``impl`` on ``case``, or a string saying why not."""
    stats = case.variant == "stats"
    scale = 1.0 / math.sqrt(case.d)
    gqa = case.hkv != case.H
    if impl in HEADWISE:
        backend = "auto" if impl == "headwise auto" else "tiled"

        def fwd():
            return attend(q, k, v, mask=case.mask, need_stats=stats, backend=backend).out

    elif stats:
        return "no per-row statistics"
    elif impl == "torch SDPA":
        dense = _dense_mask(case, device)

        def fwd():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=dense, is_causal=case.variant == "causal", scale=scale, enable_gqa=gqa
            )

    elif impl == "FlexAttention":
        if case.backward and torch.device(device).type == "cpu":
            return "no backward on CPU"
        dense_like = case.mask is None or case.variant == "causal"
        if dense_like and case.L > FLEX_DENSE_MAX_L and torch.device(device).type == "cpu":
            return f"skipped above L={FLEX_DENSE_MAX_L} (dense blocks at ~40 GFLOP/s: slower than SDPA at every L)"
        from torch.nn.attention.flex_attention import create_block_mask

        compiled = flex_fn()
        block_mask = None
        if case.mask is not None:
            m, L = case.mask, case.L

            def mask_mod(b, h, qi, ki):
                return m.evaluate(b, h, qi, ki, L, L)

            block_mask = create_block_mask(mask_mod, 1, 1, L, L, device=device)

        def fwd():
            return compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)

    elif impl == "eager math":
        if case.L > EAGER_MAX_L:
            return f"skipped above L={EAGER_MAX_L} (O(L^2) memory)"
        dense = _dense_mask(case, device)
        if case.variant == "causal":
            dense = causal.dense(1, 1, case.L, case.L, device)
        rep = case.H // case.hkv

        def fwd():
            kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
            vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
            s = (q @ kk.transpose(-1, -2)) * scale
            if dense is not None:
                s = s.masked_fill(~dense, float("-inf"))
            return torch.softmax(s, dim=-1) @ vv

    else:
        raise ValueError(impl)

    if not case.backward:

        def run():
            with torch.no_grad():
                return fwd()

        return run
    grad = torch.randn(case.B, case.H, case.L, case.d, device=device)

    def run_bwd():
        for t in (q, k, v):
            t.grad = None
        fwd().backward(grad)

    return run_bwd


def cases_for(seqs: list[int], variants=VARIANTS) -> list[Case]:
    out = []
    for L in seqs:
        out += [Case(vn, L) for vn in variants]
        for vn in BACKWARD_VARIANTS:
            if vn in variants and (vn.startswith("window") or L <= DENSE_BACKWARD_MAX_L):
                out.append(Case(vn, L, backward=True))
    return out


def run_case(case: Case, repeat: int, device: str = "cpu", impls=IMPLS) -> dict[str, Timing | str]:
    """Time every applicable implementation of ``case`` interleaved; strings explain skips."""
    q, k, v = make_inputs(case, device)
    fns, skipped = {}, {}
    for impl in impls:
        r = build(impl, case, q, k, v, device)
        (skipped.__setitem__(impl, r) if isinstance(r, str) else fns.__setitem__(impl, r))
    if "headwise auto" in fns:
        # auto is deterministic (kernels/registry.py): the tuning file of this machine if
        # `headwise.tune` recorded the problem, else the cost model; it never changes mid-run.
        stats = case.variant == "stats"
        with torch.no_grad() if not case.backward else torch.enable_grad():
            skipped["auto backend"] = attend(q, k, v, mask=case.mask, need_stats=stats).backend
    if case.variant == "stats" and "headwise tiled" in fns:
        # The same kernel without statistics, in the same rounds, gives the overhead.
        def plain():
            with torch.no_grad():
                return attend(q, k, v, backend="tiled").out

        fns["tiled, no stats"] = plain
    # Fast cases run more rounds (up to 10x repeat, ~6 s in all): their medians are the noisiest.
    timings = time_interleaved(fns, repeat=repeat, warmup=1, device=device, min_seconds=6.0, max_rounds=10 * repeat)
    return {**timings, **skipped}
