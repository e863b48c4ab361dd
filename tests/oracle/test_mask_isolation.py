"""Masked-out keys never influence an output (issue 24), on every backend and every mask.

The property: pick a set R of query rows and perturb every key and value that no row of R
may attend (per batch element and key/value head). Then the rows of R keep **bitwise**
the same output, lse, weights, statistics and dq. And keys that no query at all may
attend get dk and dv of exactly zero. Rounding is no excuse: a causal model trained on a
kernel that leaks sees the future, and padding would change real outputs.

The grid covers every backend with every built-in mask (causal with L < S, L == S and
L > S), float32 and float64, awkward sizes and GQA; a hypothesis test then draws shapes,
blocks, rows and masks for the tiled kernel, whose blocks and schemes (unshifted rows,
running maximum, merged tiles) are where a leak can hide.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_backends import MASKS, TILED_MERGED, TILED_ONLINE, TILED_SMALL

from conftest import run_attend
from headwise import causal, chunked, local, padding, per_head_windows, sliding_window
from headwise.kernels.flex import flex_available
from headwise.masks import as_mask

# (B, Hq, Hkv, L, S, E, Ev): L < S (cross, bottom-right causal), L == S, L > S with MQA.
SHAPES = {
    "L<S": (2, 4, 2, 23, 41, 12, 10),
    "L=S": (2, 4, 2, 33, 33, 9, 12),
    "L>S": (2, 4, 1, 45, 29, 12, 20),
}
BACKENDS = ["reference", "eager", "eager-nograd", "sdpa", "tiled", TILED_SMALL, TILED_MERGED, TILED_ONLINE]


def _allowed(mask, B: int, Hq: int, L: int, S: int) -> torch.Tensor:
    """The dense (B, Hq, L, S) bool mask (True = attend)."""
    if mask is None:
        return torch.ones(B, Hq, L, S, dtype=torch.bool)
    return as_mask(mask).dense(B, Hq, L, S).expand(B, Hq, L, S)


def _excluded_keys(allowed: torch.Tensor, rows: torch.Tensor, Hkv: int) -> torch.Tensor:
    """(B, Hkv, S): keys that none of ``rows`` may attend, in any query head of the group."""
    B, Hq, L, S = allowed.shape
    seen = allowed[:, :, rows].any(dim=2).view(B, Hkv, Hq // Hkv, S).any(dim=2)
    return ~seen


def _perturbed(t: torch.Tensor, where: torch.Tensor, seed: int, size: float = 3.0) -> torch.Tensor:
    """``t`` with its rows at ``where`` (B, Hkv, S) replaced by fresh values of std ``size``.

    Keys get a size that takes their logits past the tiled kernel's unshifted-row bound
    (30 in float32, 300 in float64), so that any decision a kernel takes from all the keys
    (such as whether a row's logits are bounded) changes.
    """
    g = torch.Generator().manual_seed(seed)
    fresh = (torch.randn(t.shape, generator=g, dtype=torch.float64) * size).to(t.dtype)
    return torch.where(where[..., None], fresh, t)


_KEY_SIZE = {torch.float32: 10.0, torch.float64: 150.0}


def _inputs(shape, dtype, seed=0):
    B, Hq, Hkv, L, S, E, Ev = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (
        torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
        for s in ((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev), (B, Hq, L, Ev))
    )
    return q, k, v, dout


def _run(backend: str, q, k, v, dout, mask, dtype):
    """Out, lse, weights, stats and grads of one call, with whatever the backend can give."""
    grads = backend not in ("eager-nograd", "flex")
    name = "eager" if backend == "eager-nograd" else backend
    kw = {}
    if name in ("reference", "eager"):
        kw["need_weights"] = True
    stats = name in ("reference", "eager") or name.startswith("tiled")
    return run_attend(q, k, v, dout, dtype, name, mask, None, stats, grads, **kw)


def _same(a: torch.Tensor | None, b: torch.Tensor | None, what: str) -> None:
    if a is None and b is None:
        return
    assert a is not None and b is not None, f"{what}: given by one run only"
    assert torch.equal(a, b), f"{what}: changed by up to {(a.double() - b.double()).abs().max().item():.3e}"


def check_isolation(backend: str, mask, shape, dtype, rows: torch.Tensor, seed: int = 0, query_scale: float = 0.0):
    """The property of the module docstring, for one backend, mask, shape and row set.

    ``query_scale`` > 0 stretches each query row by a random factor in [1, 1 + query_scale]:
    some rows then pass the tiled kernel's unshifted-row bound and some do not.
    """
    B, Hq, Hkv, L, S, E, Ev = shape
    q, k, v, dout = _inputs(shape, dtype, seed)
    if query_scale:
        g = torch.Generator().manual_seed(seed)
        q = q * (1 + query_scale * torch.rand(B, Hq, L, 1, generator=g, dtype=torch.float64).to(dtype))
    allowed = _allowed(mask, B, Hq, L, S)
    hidden = _excluded_keys(allowed, rows, Hkv)
    k2, v2 = _perturbed(k, hidden, seed + 1, size=_KEY_SIZE[dtype]), _perturbed(v, hidden, seed + 2)
    a = _run(backend, q, k, v, dout, mask, dtype)
    b = _run(backend, q, k2, v2, dout, mask, dtype)
    pick = (slice(None), slice(None), rows)
    _same(a.res.out[pick], b.res.out[pick], "out")
    if a.res.lse is not None:
        _same(a.res.lse[pick], b.res.lse[pick], "lse")
    if a.res.weights is not None:
        _same(a.res.weights[pick], b.res.weights[pick], "weights")
    if a.res.stats is not None:
        _same(a.res.stats.entropy[pick], b.res.stats.entropy[pick], "entropy")
        _same(a.res.stats.max_weight[pick], b.res.stats.max_weight[pick], "max weight")
    if a.grads:
        _same(a.grads["q"][pick], b.grads["q"][pick], "dq")
        nobody = _excluded_keys(allowed, torch.arange(L), Hkv)
        for name in ("k", "v"):
            g = a.grads[name][nobody]
            assert torch.equal(g, torch.zeros_like(g)), f"d{name} of keys no query attends is not exactly 0"


def _row_sets(L: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(L)
    return {"first half": torch.arange(L // 2 + 1), "two rows": torch.randperm(L, generator=g)[:2]}


def _cases():
    for mask_name in MASKS:
        shapes = list(SHAPES) if mask_name in ("causal", "none") else ["L<S", "L>S"]
        for shape_name in shapes:
            yield mask_name, shape_name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_name,shape_name", list(_cases()))
def test_masked_keys_never_leak(mask_name, shape_name, backend, dtype):
    shape = SHAPES[shape_name]
    B, Hq, Hkv, L, S, E, Ev = shape
    mask = MASKS[mask_name](B, Hq, L, S)
    for rows in _row_sets(L).values():
        check_isolation(backend, mask, shape, dtype, rows)


@pytest.mark.slow
@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
@pytest.mark.parametrize("mask_name", ["causal", "sliding_window", "padding", "per_head_windows"])
def test_masked_keys_never_leak_flex(mask_name):
    """FlexAttention compiles per mask (seconds on CPU) and has no CPU backward: forward, a few masks."""
    shape = (2, 4, 2, 40, 56, 16, 16)  # its compiled kernel needs power-of-two head dims
    B, Hq, Hkv, L, S, E, Ev = shape
    mask = MASKS[mask_name](B, Hq, L, S)
    check_isolation("flex", mask, shape, torch.float32, _row_sets(L)["first half"])


# ---------------------------------------------------------------------------------------
# Random shapes, blocks, rows and masks on the tiled kernel.

_MASK_MAKERS = {
    "causal": lambda L, S, H, d: causal,
    "sliding_window": lambda L, S, H, d: sliding_window(1 + d % 9),
    "local": lambda L, S, H, d: local(d % 5, d % 3),
    "chunked": lambda L, S, H, d: chunked(1 + d % 7),
    "padding": lambda L, S, H, d: padding([S, max(0, S - 1 - d % S)]),
    "per_head_windows": lambda L, S, H, d: per_head_windows([[None, 1 + d % 4, 3, 8][i % 4] for i in range(H)]),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(1, 70),
    S=st.integers(1, 70),
    groups=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
    blocks=st.sampled_from(["tiled", "tiled:8x8", "tiled:16x8x24", "tiled:8x16-online", "tiled:4x4x12"]),
    mask_name=st.sampled_from(list(_MASK_MAKERS)),
    detail=st.integers(0, 100),
    scale=st.sampled_from([1.0, 12.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    data=st.data(),
)
def test_tiled_masked_keys_never_leak_random(L, S, groups, blocks, mask_name, detail, scale, dtype, data):
    Hq, Hkv = groups
    shape = (2, Hq, Hkv, L, S, 8, 8)
    mask = _MASK_MAKERS[mask_name](L, S, Hq, detail)
    rows = torch.tensor(sorted(data.draw(st.sets(st.integers(0, L - 1), min_size=1, max_size=L))))
    # scale 12 pushes some rows past the unshifted scheme's bound: blocks then mix both schemes
    check_isolation(blocks, mask, shape, dtype, rows, seed=detail)
    if scale != 1.0:
        check_isolation(blocks, mask, shape, dtype, rows, seed=detail, query_scale=scale)


@pytest.mark.parametrize("mask_name", ["none", "causal", "sliding_window", "local", "chunked", "padding",
                                       "per_head_windows", "and_masks"])  # fmt: skip
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_row_reach_by_ranges_equals_piece_by_piece(mask_name, shape_name):
    """The sparse-table range maximum (exact-bound masks) equals the tile-by-tile one."""
    from headwise.attend import make_request
    from headwise.kernels import tiled, unshifted

    B, Hq, Hkv, L, S, E, Ev = SHAPES[shape_name]
    q, k, v, _ = _inputs(SHAPES[shape_name], torch.float32)
    mask = MASKS[mask_name](B, Hq, L, S)
    req = make_request(q, k, v, mask, None, None, 0.0, False, False)
    plan = tiled.make_plan(req, 8, 8, 24)
    k_norm = torch.linalg.vector_norm(k, dim=-1)
    by_ranges = unshifted._reach_by_ranges(plan, k_norm)
    assert by_ranges is not None, "an exact-bound mask must take the range path"
    blocks = tiled._Blocks(plan, q.device)
    for iq, spans in enumerate(plan.spans):
        qs = iq * plan.block_q
        n = min(plan.block_q, L - qs)
        want = unshifted._reach_by_pieces(blocks, k_norm, spans, qs, n)
        got = by_ranges[..., qs : qs + n] if by_ranges.shape[-1] > 1 else by_ranges
        assert torch.equal(got.expand_as(want), want), f"query block {iq}"
