"""Properties that must hold for every shape, mask, score and block size (hypothesis).

Inputs are float64 so that equalities can be checked to ~1e-10; sizes are tiny so that
many examples run in a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headwise import (
    alibi,
    alibi_slopes,
    and_masks,
    attend,
    causal,
    chunked,
    local,
    or_masks,
    padding,
    per_head_windows,
    poincare,
    sliding_window,
    softcap,
    temperature,
)
from headwise.attend import make_request
from headwise.kernels.registry import explain
from headwise.kernels.tiled import tiled_attention
from headwise.masks import EMPTY, FULL, PARTIAL, as_mask, classify_blocks

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-10


# ---------------------------------------------------------------------------------------
# Strategies


@st.composite
def shapes(draw, max_len=12, gqa=True):
    """(B, Hq, Hkv, L, S, E, Ev) with Hq a multiple of Hkv."""
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.integers(1, 3)) if gqa else 1
    L = draw(st.integers(1, max_len))
    S = draw(st.integers(1, max_len))
    E = draw(st.integers(1, 5))
    Ev = draw(st.integers(1, 4))
    return B, Hkv * G, Hkv, L, S, E, Ev


def _hash_mask(seed: int, density: float):
    """A plain function mask: a pseudo-random but deterministic function of (b, h, q, kv)."""
    threshold = int(density * 97)

    def mask(b, h, q, kv):
        return (b * 31 + h * 17 + q * 13 + kv * 7 + seed) % 97 < threshold

    return mask


def _tensor(seed: int, B: int, H: int, L: int, S: int, density: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, L, S, generator=g) < density


@st.composite
def simple_masks(draw, B, H, L, S):
    """(mask, has_exact_labels): a built-in or a mask without bounds (function, tensor)."""
    kind = draw(
        st.sampled_from(
            ["causal", "sliding_window", "local", "chunked", "padding", "per_head_windows", "function", "tensor"]
        )
    )
    if kind == "causal":
        return causal
    if kind == "sliding_window":
        return sliding_window(draw(st.integers(1, S + 2)))
    if kind == "local":
        return local(draw(st.integers(0, 5)), draw(st.integers(0, 5)))
    if kind == "chunked":
        return chunked(draw(st.integers(1, 6)))
    if kind == "padding":
        return padding(draw(st.lists(st.integers(0, S), min_size=B, max_size=B)))
    if kind == "per_head_windows":
        return per_head_windows(draw(st.lists(st.one_of(st.none(), st.integers(1, 6)), min_size=H, max_size=H)))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    seed = draw(st.integers(0, 1000))
    if kind == "function":
        return _hash_mask(seed, density)
    return _tensor(seed, draw(st.sampled_from([1, B])), draw(st.sampled_from([1, H])), L, S, density)


@st.composite
def masks(draw, B, H, L, S, allow_none=True):
    """Any mask: none, a simple one, or and/or combinations of two or three."""
    form = draw(st.sampled_from(["none", "simple", "simple", "and", "or"] if allow_none else ["simple", "and", "or"]))
    if form == "none":
        return None
    if form == "simple":
        return draw(simple_masks(B, H, L, S))
    parts = draw(st.lists(simple_masks(B, H, L, S), min_size=2, max_size=3))
    return and_masks(*parts) if form == "and" else or_masks(*parts)


def _score(name: str, H: int):
    return {
        "none": None,
        "alibi": alibi(alibi_slopes(H).double()),
        "softcap": softcap(1.5),
        "temperature": temperature(0.6),
        "poincare": poincare(0.8),
        "chain": [temperature(0.9), alibi(alibi_slopes(H).double()), softcap(2.0)],
    }[name]


SCORE_NAMES = ["none", "alibi", "softcap", "temperature", "poincare", "chain"]
# Scores that do not depend on positions: permuting keys leaves the logits' multiset unchanged.
POSITION_FREE_SCORES = ["none", "softcap", "temperature", "poincare"]


def _inputs(shape, seed, dtype=torch.float64):
    B, Hq, Hkv, L, S, E, Ev = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, S, E, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _allowed(mask, B, H, L, S):
    if mask is None:
        return torch.ones(B, H, L, S, dtype=torch.bool)
    req_mask = make_request(
        torch.zeros(B, H, L, 1), torch.zeros(B, 1, S, 1), torch.zeros(B, 1, S, 1), mask, None, None, 0.0, False, False
    ).mask
    return req_mask.dense(B, H, L, S).expand(B, H, L, S)


def _serves(backend, q, k, v, mask, score, **kw):
    args = dict(scale=None, dropout_p=0.0, need_weights=False, need_stats=False) | kw
    return explain(make_request(q, k, v, mask, score, **args))[backend] == []


# ---------------------------------------------------------------------------------------
# Weights


@SETTINGS
@given(data=st.data(), shape=shapes(), score_name=st.sampled_from(SCORE_NAMES), seed=st.integers(0, 10_000))
def test_weight_rows_sum_to_one_or_zero(data, shape, score_name, seed):
    B, Hq, Hkv, L, S, E, Ev = shape
    mask = data.draw(masks(B, Hq, L, S))
    q, k, v = _inputs(shape, seed)
    res = attend(q, k, v, mask=mask, score=_score(score_name, Hq), need_weights=True, need_stats=True)
    w = res.weights
    allowed = _allowed(mask, B, Hq, L, S)
    assert (w >= 0).all()
    assert (w[~allowed] == 0).all(), "weight on a masked key"
    rows = w.sum(-1)
    has = allowed.any(-1)
    assert torch.allclose(rows[has], torch.ones_like(rows[has]), atol=TOL, rtol=0)
    assert (rows[~has] == 0).all()
    assert torch.equal(torch.isneginf(res.lse), ~has)


# ---------------------------------------------------------------------------------------
# Permutation invariance


@SETTINGS
@given(
    shape=shapes(),
    score_name=st.sampled_from(POSITION_FREE_SCORES),
    backend=st.sampled_from(["reference", "eager", "tiled", "sdpa"]),
    masked=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_permuting_keys_and_values_together_leaves_output_unchanged(shape, score_name, backend, masked, seed):
    B, Hq, Hkv, L, S, E, Ev = shape
    q, k, v = _inputs(shape, seed)
    score = _score(score_name, Hq)
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(seed))
    # A dense mask is permuted with its keys; positional masks would not be invariant.
    mask = _tensor(seed, B, Hq, L, S, 0.6) if masked else None
    mask_p = mask[..., perm] if masked else None
    if not _serves(backend, q, k, v, mask, score):
        return
    out = attend(q, k, v, mask=mask, score=score, backend=backend).out
    out_p = attend(q, k[:, :, perm], v[:, :, perm], mask=mask_p, score=score, backend=backend).out
    assert torch.allclose(out, out_p, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------
# Multi-head and grouped-query attention


def _per_head_formula(q, k, v, allowed, scale):
    """Plain multi-head attention, one (b, h) at a time, straight from the definition."""
    B, H, L, _ = q.shape
    out = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                keys = allowed[b, h, i].nonzero().flatten()
                if len(keys) == 0:
                    continue
                logits = torch.stack([scale * torch.dot(q[b, h, i], k[b, h, j]) for j in keys])
                p = torch.exp(logits - logits.max())
                out[b, h, i] = (p / p.sum()) @ v[b, h, keys]
    return out


@SETTINGS
@given(
    data=st.data(),
    shape=shapes(max_len=8, gqa=False),
    backend=st.sampled_from(["reference", "eager", "tiled", "sdpa"]),
    seed=st.integers(0, 10_000),
)
def test_hkv_equal_hq_is_plain_multi_head(data, shape, backend, seed):
    B, Hq, Hkv, L, S, E, Ev = shape
    mask = data.draw(masks(B, Hq, L, S))
    q, k, v = _inputs(shape, seed)
    got = attend(q, k, v, mask=mask, backend=backend).out
    want = _per_head_formula(q, k, v, _allowed(mask, B, Hq, L, S), 1 / math.sqrt(E))
    assert torch.allclose(got, want, atol=TOL, rtol=0)


@SETTINGS
@given(
    data=st.data(),
    shape=shapes(),
    score_name=st.sampled_from(SCORE_NAMES),
    backend=st.sampled_from(["reference", "eager", "tiled", "sdpa"]),
    seed=st.integers(0, 10_000),
)
def test_gqa_equals_explicitly_repeated_kv(data, shape, score_name, backend, seed):
    B, Hq, Hkv, L, S, E, Ev = shape
    G = Hq // Hkv
    mask = data.draw(masks(B, Hq, L, S))
    score = _score(score_name, Hq)
    q, k, v = _inputs(shape, seed)
    if not _serves(backend, q, k, v, mask, score):
        return
    k.requires_grad_()
    v.requires_grad_()
    kr, vr = (t.detach().repeat_interleave(G, dim=1).requires_grad_() for t in (k, v))
    out = attend(q, k, v, mask=mask, score=score, backend=backend).out
    out_r = attend(q, kr, vr, mask=mask, score=score, backend=backend).out
    assert torch.allclose(out, out_r, atol=TOL, rtol=0)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    (out * dout).sum().backward()
    (out_r * dout).sum().backward()
    # A shared key/value head receives the sum of its query heads' gradients.
    for shared, repeated in ((k, kr), (v, vr)):
        summed = repeated.grad.view(B, Hkv, G, *repeated.shape[2:]).sum(2)
        assert torch.allclose(shared.grad, summed, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------
# Mask algebra


def _full(b, h, q, kv):
    return (q - q) + (kv - kv) == 0


def _nothing(b, h, q, kv):
    return (q - q) + (kv - kv) != 0


@SETTINGS
@given(data=st.data(), shape=shapes(), seed=st.integers(0, 10_000))
def test_and_with_full_and_or_with_nothing_are_identities(data, shape, seed):
    B, Hq, Hkv, L, S, E, Ev = shape
    m = data.draw(masks(B, Hq, L, S, allow_none=False))
    dense = _allowed(m, B, Hq, L, S)
    for same in (and_masks(m, _full), and_masks(_full, m), or_masks(m, _nothing), as_mask(m) & as_mask(_full)):
        assert torch.equal(_allowed(same, B, Hq, L, S), dense)
    q, k, v = _inputs(shape, seed)
    a = attend(q, k, v, mask=m, backend="tiled", need_stats=True)
    b = attend(q, k, v, mask=and_masks(m, _full), backend="tiled", need_stats=True)
    assert torch.allclose(a.out, b.out, atol=TOL, rtol=0)
    assert torch.allclose(a.stats.entropy, b.stats.entropy, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------
# Tiled == reference for any block size


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    shape=shapes(),
    score_name=st.sampled_from(SCORE_NAMES),
    seed=st.integers(0, 10_000),
    # 1: moderate logits (bounded path, no shift); 8: past its limit (online maximum)
    logit_scale=st.sampled_from([1.0, 8.0]),
)
def test_tiled_equals_reference_for_random_block_sizes(data, shape, score_name, seed, logit_scale):
    B, Hq, Hkv, L, S, E, Ev = shape
    mask = data.draw(masks(B, Hq, L, S))
    block_q = data.draw(st.integers(1, L + 2))
    block_k = data.draw(st.integers(1, S + 2))
    q, k, v = _inputs(shape, seed)
    q, k, v = (t.requires_grad_() for t in (q * logit_scale, k, v))
    score = _score(score_name, Hq)
    got = tiled_attention(make_request(q, k, v, mask, score, None, 0.0, False, True), block_q, block_k)
    want = attend(q, k, v, mask=mask, score=score, need_stats=True, backend="reference")
    assert torch.allclose(got.out, want.out, atol=TOL, rtol=0)
    assert torch.equal(torch.isneginf(got.lse), torch.isneginf(want.lse))
    fin = torch.isfinite(want.lse)
    assert torch.allclose(got.lse[fin], want.lse[fin], atol=TOL, rtol=0)
    for field in ("entropy", "max_weight"):
        assert torch.allclose(getattr(got.stats, field), getattr(want.stats, field), atol=TOL, rtol=0), field
    dout = torch.randn(got.out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    g_got = torch.autograd.grad((got.out * dout).sum(), (q, k, v))
    g_want = torch.autograd.grad((want.out * dout).sum(), (q, k, v))
    for name, a, b in zip("qkv", g_got, g_want):
        assert torch.allclose(a, b, atol=TOL, rtol=0), f"grad {name}"


# ---------------------------------------------------------------------------------------
# Rows with nothing to attend to


@SETTINGS
@given(
    data=st.data(),
    shape=shapes(),
    backend=st.sampled_from(["reference", "eager", "tiled", "sdpa", "auto"]),
    grad=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    score_name=st.sampled_from(["none", "alibi", "temperature"]),
    seed=st.integers(0, 10_000),
)
def test_fully_masked_rows_give_zeros_and_no_nan(data, shape, backend, grad, dtype, score_name, seed):
    B, Hq, Hkv, L, S, E, Ev = shape
    base = data.draw(masks(B, Hq, L, S))
    # Knock out whole rows on top of any mask (at least one).
    rows_off = _tensor(seed, B, 1, L, 1, 0.5)
    rows_off.view(-1)[0] = True
    mask = and_masks(base, ~rows_off.expand(B, 1, L, S)) if base is not None else ~rows_off.expand(B, 1, L, S)
    score = _score(score_name, Hq)
    q, k, v = (t.requires_grad_(grad) for t in _inputs(shape, seed, dtype))
    need_stats = backend in ("reference", "eager", "tiled")
    res = attend(q, k, v, mask=mask, score=score, backend=backend, need_stats=need_stats)
    empty = ~_allowed(mask, B, Hq, L, S).any(-1)  # (B, Hq, L)
    assert empty.any()
    assert torch.isfinite(res.out).all()
    assert (res.out[empty] == 0).all()
    if res.lse is not None:
        assert torch.isneginf(res.lse[empty]).all()
        assert torch.isfinite(res.lse[~empty]).all()
    if need_stats:
        assert (res.stats.entropy[empty] == 0).all()
        assert (res.stats.max_weight[empty] == 0).all()
        assert torch.isfinite(res.stats.entropy).all()
    if backend in ("reference", "eager"):
        w = attend(q, k, v, mask=mask, score=score, need_weights=True, backend=backend).weights
        assert (w[empty] == 0).all()
    if not grad:
        return
    (res.out.double().square().sum() + res.out.double().sum()).backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(t.grad).all(), f"non-finite grad {name}"
    assert (q.grad[empty] == 0).all(), "an empty row's query got a gradient"


# ---------------------------------------------------------------------------------------
# Statistics


@SETTINGS
@given(
    data=st.data(),
    shape=shapes(),
    score_name=st.sampled_from(SCORE_NAMES),
    backend=st.sampled_from(["reference", "eager", "tiled"]),
    seed=st.integers(0, 10_000),
)
def test_entropy_between_zero_and_log_allowed_keys(data, shape, score_name, backend, seed):
    B, Hq, Hkv, L, S, E, Ev = shape
    mask = data.draw(masks(B, Hq, L, S))
    q, k, v = _inputs(shape, seed)
    stats = attend(q, k, v, mask=mask, score=_score(score_name, Hq), need_stats=True, backend=backend).stats
    n_allowed = _allowed(mask, B, Hq, L, S).sum(-1).double()
    assert (stats.entropy >= 0).all()
    assert (stats.entropy <= torch.log(n_allowed.clamp_min(1)) + TOL).all()
    assert (stats.entropy <= math.log(S) + TOL).all()
    has = n_allowed > 0
    assert (stats.max_weight[has] >= 1 / n_allowed[has] - TOL).all()
    assert (stats.max_weight <= 1 + TOL).all()


@SETTINGS
@given(data=st.data(), shape=shapes(), score_name=st.sampled_from(SCORE_NAMES), seed=st.integers(0, 10_000))
def test_tiled_stats_equal_entropy_of_reference_weights(data, shape, score_name, seed):
    B, Hq, Hkv, L, S, E, Ev = shape
    mask = data.draw(masks(B, Hq, L, S))
    q, k, v = _inputs(shape, seed)
    score = _score(score_name, Hq)
    w = attend(q, k, v, mask=mask, score=score, need_weights=True, backend="reference").weights
    stats = attend(q, k, v, mask=mask, score=score, need_stats=True, backend="tiled").stats
    entropy = -torch.where(w > 0, w * torch.log(w), 0.0).sum(-1)
    assert torch.allclose(stats.entropy, entropy, atol=TOL, rtol=0)
    assert torch.allclose(stats.max_weight, w.amax(-1), atol=TOL, rtol=0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    shape=shapes(max_len=9),
    score_name=st.sampled_from(["none", "alibi", "softcap", "poincare"]),
    backend=st.sampled_from(["eager", "tiled"]),
    blocks=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    seed=st.integers(0, 10_000),
)
def test_statistics_gradients_are_finite_and_equal_the_reference(data, shape, score_name, backend, blocks, seed):
    """#19 item 6: entropy and max weight are differentiable on every backend that returns
    them, with the reference's gradients (autograd of -sum w log w and amax w), finite on
    masked keys and empty rows; the tiled kernel runs with small random blocks."""
    B, Hq, Hkv, L, S, E, Ev = shape
    mask = data.draw(masks(B, Hq, L, S))
    score = _score(score_name, Hq)
    q, k, v = (t.requires_grad_() for t in _inputs(shape, seed))
    g = torch.Generator().manual_seed(seed + 1)
    c_ent, c_max = torch.randn(2, B, Hq, L, generator=g, dtype=torch.float64)
    c_out = torch.randn(B, Hq, L, Ev, generator=g, dtype=torch.float64)

    def grads(name):
        if name == "tiled":
            res = tiled_attention(make_request(q, k, v, mask, score, None, 0.0, False, True), *blocks)
        else:
            res = attend(q, k, v, mask=mask, score=score, need_stats=True, backend=name)
        st_ = res.stats
        loss = (st_.entropy * c_ent).sum() + (st_.max_weight * c_max).sum() + (res.out * c_out).sum()
        return torch.autograd.grad(loss, (q, k, v))

    got, want = grads(backend), grads("reference")
    empty = ~_allowed(mask, B, Hq, L, S).any(-1)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"non-finite grad {name}"
        assert torch.allclose(a, b, atol=1e-9, rtol=0), f"grad {name}: {float((a - b).abs().max()):.3e}"
    assert (got[0][empty] == 0).all(), "an empty row's query got a gradient"


# ---------------------------------------------------------------------------------------
# Block classification


def _brute_force_labels(dense, L, S, bq, bk):
    nq, nk = -(-L // bq), -(-S // bk)
    out = torch.empty(nq, nk, dtype=torch.int8)
    for i in range(nq):
        for j in range(nk):
            block = dense[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            out[i, j] = FULL if block.all() else PARTIAL if block.any() else EMPTY
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), shape=shapes(max_len=20), bq=st.integers(1, 8), bk=st.integers(1, 8))
def test_classify_blocks_agrees_with_brute_force(data, shape, bq, bk):
    B, H, _, L, S, _, _ = shape
    mask = data.draw(masks(B, H, L, S, allow_none=False))
    m = _allowed(mask, B, H, L, S).contiguous()
    req_mask = make_request(
        torch.zeros(B, H, L, 1), torch.zeros(B, 1, S, 1), torch.zeros(B, 1, S, 1), mask, None, None, 0.0, False, False
    ).mask
    got = classify_blocks(req_mask, B, H, L, S, bq, bk, "cpu")
    want = _brute_force_labels(m, L, S, bq, bk)
    assert got.shape == want.shape and got.dtype == torch.int8
    # Always sound: EMPTY blocks are skipped and FULL blocks are not masked, so neither may lie.
    assert ((got == EMPTY) <= (want == EMPTY)).all(), f"EMPTY label on a block with keys\n{got}\n{want}"
    assert ((got == FULL) <= (want == FULL)).all(), f"FULL label on a block with masked keys\n{got}\n{want}"
    b, h, qi = torch.arange(B).view(B, 1, 1), torch.arange(H).view(1, H, 1), torch.arange(L).view(1, 1, L)
    has_bounds = req_mask.bounds(b, h, qi + (S - L), S) is not None
    simple_builtin = req_mask.exact_bounds and not hasattr(req_mask, "masks")
    if not has_bounds or simple_builtin:
        # Masks evaluated densely, and single built-ins (their rows' key ranges are contiguous
        # and so is their union over a block): the labels are exact.
        assert torch.equal(got, want), f"{mask!r}\n{got}\n{want}"
    elif req_mask.exact_bounds:
        assert torch.equal(got == FULL, want == FULL), f"{mask!r}: FULL labels not exact\n{got}\n{want}"


@pytest.mark.parametrize("bq,bk", [(1, 1), (3, 2), (4, 4), (16, 16)])
def test_classify_blocks_sliding_window_visits_only_the_band(bq, bk):
    """A window of w makes O(L * w) work: blocks far from the diagonal are EMPTY."""
    L = S = 64
    got = classify_blocks(sliding_window(4), 1, 1, L, S, bq, bk, "cpu")
    want = _brute_force_labels(sliding_window(4).dense(1, 1, L, S), L, S, bq, bk)
    assert torch.equal(got, want)
    assert (got != EMPTY).sum() <= (L // bq + 1) * (4 // bk + 2)
