"""Every fast backend against the float64 reference (the oracle rule of conftest.py).

The grid is a covering set, not a cartesian product: every mask with every backend at
float32, every score with every backend, every dtype with a few masks, every GQA ratio,
and awkward sizes (E = 59, L = 97, S = 1025, L != S both ways). Where a backend cannot
serve a case, the test asserts its refusal instead of skipping.
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import FLOORS, assert_close_to_gold, check_against_gold, make_inputs, max_abs_diff, run_attend
from headwise import (
    HeadwiseError,
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
from headwise.kernels.tiled import make_plan, tiled_attention
from headwise.masks import EMPTY, FULL, PARTIAL, classify_blocks

# ---------------------------------------------------------------------------------------
# Masks: factories of (B, Hq, L, S) so that sizes fit every shape in the grid.


def _fn_mask(b, h, q, kv):
    """A plain function mask that depends on batch, head and both positions."""
    return ((kv + 2 * h + b) % 3 != 0) & (kv <= q + 1)


MASKS = {
    "none": lambda B, H, L, S: None,
    "causal": lambda B, H, L, S: causal,
    "sliding_window": lambda B, H, L, S: sliding_window(7),
    "local": lambda B, H, L, S: local(3, 2),
    "chunked": lambda B, H, L, S: chunked(5),
    # batch element 0 has no keys at all: every one of its rows must give 0, never NaN
    "padding": lambda B, H, L, S: padding([0] + [S - 3 * i for i in range(1, B)]),
    "per_head_windows": lambda B, H, L, S: per_head_windows([[1, None, 2, 5, 3, None, 8, 13][i % 8] for i in range(H)]),
    "and_masks": lambda B, H, L, S: and_masks(causal, padding([S // 2 + i for i in range(B)]), chunked(9)),
    "or_masks": lambda B, H, L, S: or_masks(sliding_window(3), lambda b, h, q, kv: kv == 0),
    "function": lambda B, H, L, S: _fn_mask,
    # dense tensor (B, 1, L, S) with a whole row masked in every batch element
    "tensor": lambda B, H, L, S: _tensor_mask(B, L, S),
}


def _tensor_mask(B: int, L: int, S: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    t = torch.rand(B, 1, L, S, generator=g) < 0.6
    t[:, :, L // 2] = False
    return t


# ---------------------------------------------------------------------------------------
# Scores: factories of the parameter dtype, returning (score, learnable parameters).


def _alibi(param_dtype, H):
    slopes = alibi_slopes(H).to(param_dtype).requires_grad_()
    return alibi(slopes), [slopes]


def _poincare(param_dtype, H):
    c = torch.tensor(0.7, dtype=param_dtype, requires_grad=True)
    return poincare(c), [c]


def _chain(param_dtype, H):
    sc, params = _alibi(param_dtype, H)
    return [temperature(0.8), sc, softcap(5.0)], params


def _temperature_alibi(param_dtype, H):
    sc, params = _alibi(param_dtype, H)
    return [temperature(1.5), sc], params


def _fn_score(s, b, h, q, kv):
    return s + 0.1 * torch.cos(q - kv + h)


SCORES = {
    "none": None,
    "alibi": _alibi,
    "softcap": lambda dt, H: (softcap(2.0), []),
    "temperature": lambda dt, H: (temperature(0.5), []),
    "poincare": _poincare,
    "chain": _chain,
    "function": lambda dt, H: (_fn_score, []),
    "temperature_alibi": _temperature_alibi,
}
# What SDPA can serve: temperature, alibi, temperature before alibi (folded into the scale).
SDPA_SCORES = {"none", "alibi", "temperature", "temperature_alibi"}

# (B, Hq, Hkv, L, S, E, Ev)
SMALL = (2, 8, 2, 37, 53, 16, 16)  # L < S: cross attention, bottom-right aligned
TALL = (2, 8, 1, 45, 29, 12, 20)  # L > S, MQA, Ev != E


def _request(shape, dtype=torch.float32, mask=None, score=None, **kw):
    B, Hq, Hkv, L, S, E, Ev = shape
    q, k, v, _ = make_inputs(B, Hq, Hkv, L, S, E, Ev, dtype)
    args = dict(scale=None, dropout_p=0.0, need_weights=False, need_stats=False) | kw
    return make_request(q, k, v, mask, score, **args)


# ---------------------------------------------------------------------------------------
# Every mask x {tiled, tiled with small blocks, sdpa, eager, auto} at float32.

# "tiled:16x8" is the tiled kernel with explicit 16 x 8 blocks (see conftest.run_attend): on
# these sizes the planner picks a single block, so this is what exercises block boundaries,
# the online rescaling, EMPTY / FULL blocks and ragged last blocks for every case.
TILED_SMALL = "tiled:16x8"
# The same blocks merged into forward tiles of up to 24 keys: partial ranges inside a tile,
# online rescaling between tiles.
TILED_MERGED = "tiled:16x8x24"
# Merged tiles with every query block on the running-maximum path, which moderate inputs
# skip (their logits are provably bounded: exp needs no shift; see kernels/tiled.py).
TILED_ONLINE = "tiled:16x8x24-online"


def _extras(backend):
    """What each backend is asked for on top of out (and lse where it gives one)."""
    return {"need_stats": backend.startswith("tiled") or backend == "eager", "need_weights": backend == "eager"}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", ["tiled", TILED_SMALL, TILED_MERGED, TILED_ONLINE, "sdpa", "eager", "auto"])
def test_every_mask_float32(backend, mask_name):
    B, Hq, Hkv, L, S, E, Ev = SMALL
    mask = MASKS[mask_name](B, Hq, L, S)
    run = check_against_gold(backend, mask, None, torch.float32, SMALL, **_extras(backend))
    if backend != "auto":
        assert run.res.backend == backend.split(":")[0]
    else:
        req = _request(SMALL, mask=mask)
        assert explain(req)[run.res.backend] == [], "auto ran a backend that refuses the call"


# ---------------------------------------------------------------------------------------
# Every score x every backend, on a causal and a padding mask with L > S (MQA).


@pytest.mark.parametrize("mask_name", ["causal", "padding"])
@pytest.mark.parametrize("score_name", list(SCORES))
@pytest.mark.parametrize("backend", ["tiled", TILED_SMALL, TILED_MERGED, "sdpa", "eager", "auto"])
def test_every_score(backend, score_name, mask_name):
    B, Hq, Hkv, L, S, E, Ev = TALL
    mask = MASKS[mask_name](B, Hq, L, S)
    factory = SCORES[score_name]
    if backend == "sdpa" and score_name not in SDPA_SCORES:
        score = factory(torch.float32, Hq)[0]
        req = _request(TALL, mask=mask, score=score)
        assert any("supports only temperature and alibi" in r for r in explain(req)["sdpa"])
        q, k, v, _ = make_inputs(*TALL, torch.float32)
        with pytest.raises(HeadwiseError, match="backend: 'sdpa' cannot serve"):
            attend(q, k, v, mask=mask, score=score, backend="sdpa")
        return
    check_against_gold(backend, mask, factory, torch.float32, TALL, **_extras(backend))


# ---------------------------------------------------------------------------------------
# Every dtype with a few masks.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mask_name", ["none", "causal", "sliding_window", "padding", "per_head_windows"])
@pytest.mark.parametrize("backend", ["tiled", TILED_SMALL, TILED_ONLINE, "sdpa", "eager"])
def test_dtypes(backend, mask_name, dtype):
    shape = (2, 4, 4, 24, 24, 16, 16)  # L == S: causal goes through SDPA's native is_causal
    mask = MASKS[mask_name](2, 4, 24, 24)
    check_against_gold(backend, mask, None, dtype, shape, **_extras(backend))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", [TILED_SMALL, "sdpa", "eager"])
def test_dtypes_with_alibi(backend, dtype):
    check_against_gold(backend, sliding_window(5), _alibi, dtype, SMALL, **_extras(backend))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", [TILED_SMALL, "eager"])
def test_dtypes_softcap_chain_and_poincare(backend, dtype):
    check_against_gold(backend, causal, SCORES["chain"], dtype, TALL, **_extras(backend))
    check_against_gold(backend, local(4, 4), _poincare, dtype, TALL, **_extras(backend))


# ---------------------------------------------------------------------------------------
# The eager backend without autograd: a separate, in-place path that runs query chunk by
# query chunk. Chunks of 5 rows (instead of ~4 MB) put several chunk boundaries, and a
# ragged last chunk, inside these small problems.


@pytest.fixture(params=["rows", "slabs"])
def eager_chunks_of_5_rows(monkeypatch, request):
    """Work units of 5 query rows of one slab, or of 3 whole slabs (see eager._units)."""
    import headwise.kernels.eager as eager

    B, Hq, Hkv, L, S, E, Ev = SMALL
    G = Hq // Hkv
    unit = 4 * G * S * 5 if request.param == "rows" else 4 * G * L * S * 3
    monkeypatch.setattr(eager, "_CHUNK_BYTES", unit)


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_eager_without_grad_every_mask(eager_chunks_of_5_rows, mask_name):
    B, Hq, Hkv, L, S, E, Ev = SMALL
    mask = MASKS[mask_name](B, Hq, L, S)
    run = check_against_gold("eager", mask, None, torch.float32, SMALL, grads=False, **_extras("eager"))
    assert run.res.backend == "eager"


@pytest.mark.parametrize("logit_scale", [1.0, 12.0], ids=["bounded", "unbounded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_eager_without_grad_no_mask(dtype, logit_scale):
    """No mask, no score, no grad: moderate and large logits (the in-place fused softmax)."""
    B, Hq, Hkv, L, S, E, Ev = SMALL
    q, k, v, _ = make_inputs(*SMALL, torch.float64)
    kw = dict(need_weights=True, need_stats=True)
    gold = attend(q * logit_scale, k, v, backend="reference", **kw)
    ref = attend((q * logit_scale).to(dtype), k.to(dtype), v.to(dtype), backend="reference", **kw)
    got = attend((q * logit_scale).to(dtype), k.to(dtype), v.to(dtype), backend="eager", **kw)
    floor = FLOORS[dtype]
    for name in ("out", "weights", "lse"):
        assert_close_to_gold(getattr(got, name), getattr(ref, name), getattr(gold, name), floor, name)
    for name in ("entropy", "max_weight"):
        assert_close_to_gold(getattr(got.stats, name), getattr(ref.stats, name), getattr(gold.stats, name), floor, name)
    mean = attend((q * logit_scale).to(dtype), k.to(dtype), v.to(dtype), backend="eager", need_weights="mean")
    assert_close_to_gold(mean.weights, ref.weights.mean(1), gold.weights.mean(1), floor, "mean weights")


@pytest.mark.parametrize("score_name", list(SCORES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_eager_without_grad_scores_and_dtypes(eager_chunks_of_5_rows, score_name, dtype):
    B, Hq, Hkv, L, S, E, Ev = SMALL
    mask = MASKS["and_masks"](B, Hq, L, S)
    check_against_gold("eager", mask, SCORES[score_name], dtype, SMALL, grads=False, **_extras("eager"))


# ---------------------------------------------------------------------------------------
# Every GQA ratio.


@pytest.mark.parametrize("hkv", [8, 2, 1], ids=lambda h: f"8/{h}")
@pytest.mark.parametrize("mask_name", ["causal", "per_head_windows", "tensor"])
@pytest.mark.parametrize("backend", [TILED_SMALL, TILED_ONLINE, "sdpa", "eager"])
def test_gqa_ratios(backend, mask_name, hkv):
    shape = (2, 8, hkv, 33, 40, 8, 8)
    mask = MASKS[mask_name](2, 8, 33, 40)
    check_against_gold(backend, mask, _alibi, torch.float32, shape, **_extras(backend))


# ---------------------------------------------------------------------------------------
# Awkward sizes: E = 59, L = 97, S = 1025, L > S, single-query decoding.

AWKWARD = {
    "E59_L97_S1025": (1, 8, 2, 97, 1025, 59, 59),
    "L97_S64_Ev24": (2, 4, 1, 97, 64, 59, 24),
    "decode_L1_S1025": (2, 8, 8, 1, 1025, 16, 16),
}


@pytest.mark.parametrize("shape_name", list(AWKWARD))
@pytest.mark.parametrize(
    "mask_name,score_name", [("causal", "none"), ("sliding_window", "alibi"), ("padding", "temperature")]
)
@pytest.mark.parametrize("backend", ["tiled", "sdpa", "eager"])
def test_awkward_sizes(backend, mask_name, score_name, shape_name):
    shape = AWKWARD[shape_name]
    B, Hq, Hkv, L, S, E, Ev = shape
    mask = MASKS[mask_name](B, Hq, L, S)
    factory = SCORES[score_name]
    check_against_gold(backend, mask, factory, torch.float32, shape, **_extras(backend))


def test_awkward_sizes_tiled_multiple_blocks_and_stats():
    """S = 1025 with explicit 64 x 128 blocks: many blocks, a 1-key last block, skipped blocks."""
    shape = (1, 4, 2, 97, 1025, 59, 59)
    B, Hq, Hkv, L, S, E, Ev = shape
    mask = and_masks(sliding_window(300), padding([1000]))
    q, k, v, _ = make_inputs(*shape, torch.float32)
    req = make_request(q, k, v, mask, softcap(3.0), None, 0.0, False, True)
    plan = make_plan(req, 64, 128)
    assert any(not row or row[0][0] > 0 for row in plan.visits), "expected skipped (EMPTY) key blocks"
    got = tiled_attention(req, 64, 128)
    ref = attend(q, k, v, mask=mask, score=softcap(3.0), need_stats=True, backend="reference")
    gold = attend(
        q.double(), k.double(), v.double(), mask=mask, score=softcap(3.0), need_stats=True, backend="reference"
    )
    for name in ("out", "lse"):
        assert_close_to_gold(getattr(got, name), getattr(ref, name), getattr(gold, name), FLOORS[torch.float32], name)
    assert_close_to_gold(got.stats.entropy, ref.stats.entropy, gold.stats.entropy, 1e-5, "entropy")


# ---------------------------------------------------------------------------------------
# Refusals: the backend says why instead of computing something else.


@pytest.mark.parametrize(
    "backend,kwargs,needle",
    [
        ("sdpa", {"need_stats": True}, "need_stats"),
        ("sdpa", {"need_weights": True}, "need_weights"),
        ("sdpa", {"score": softcap(2.0)}, "softcap"),
        ("sdpa", {"score": poincare()}, "poincare"),
        ("sdpa", {"score": [alibi(alibi_slopes(4)), temperature(2.0)]}, "temperature"),
        ("tiled", {"need_weights": True}, "need_weights"),
        ("tiled", {"dropout_p": 0.1}, "dropout"),
        ("flex", {"need_stats": True}, "statistics"),
        ("flex", {"dropout_p": 0.1}, "dropout"),
        ("flex", {"score": poincare()}, "poincare"),
    ],
)
def test_backend_refusals(backend, kwargs, needle):
    q, k, v, _ = make_inputs(1, 4, 2, 8, 8, 16, 16, torch.float32)
    kwargs = dict(kwargs)
    score = kwargs.pop("score", None)
    req = make_request(
        q,
        k,
        v,
        None,
        score,
        None,
        kwargs.get("dropout_p", 0.0),
        kwargs.get("need_weights", False),
        kwargs.get("need_stats", False),
    )
    reasons = explain(req)
    assert any(needle in r for r in reasons[backend]), reasons[backend]
    assert reasons["reference"] == []
    with pytest.raises(HeadwiseError, match=f"backend: '{backend}' cannot serve this call: .*{needle}"):
        attend(q, k, v, score=score, backend=backend, **kwargs)


def test_flex_refuses_grad_on_cpu_float64_and_odd_dims():
    q, k, v, _ = make_inputs(1, 4, 2, 8, 8, 16, 16, torch.float32)
    q.requires_grad_()
    with pytest.raises(HeadwiseError, match="no backward on CPU"):
        attend(q, k, v, backend="flex")
    with torch.no_grad():  # without autograd the same call is served: the refusal is about grad only
        assert explain(make_request(q, k, v, None, None, None, 0.0, False, False))["flex"] == []
    q64, k64, v64, _ = make_inputs(1, 4, 2, 8, 8, 16, 16, torch.float64)
    with pytest.raises(HeadwiseError, match="float32/bfloat16/float16"):
        attend(q64, k64, v64, backend="flex")
    q, k, v, _ = make_inputs(1, 4, 2, 8, 8, 59, 24, torch.float32)
    with pytest.raises(HeadwiseError, match=r"E = 59.*Ev = 24"):
        attend(q, k, v, backend="flex")


def test_need_weights_is_served_only_by_materialising_backends():
    q, k, v, _ = make_inputs(2, 4, 2, 9, 13, 8, 8, torch.float32)
    req = make_request(q, k, v, causal, None, None, 0.0, True, False)
    served = sorted(name for name, reasons in explain(req).items() if not reasons)
    assert served == ["eager", "reference"]


# ---------------------------------------------------------------------------------------
# torch.autograd.gradcheck on tiny float64 inputs, tiled with 4 x 4 blocks.


def _gradcheck_tiled(shape, mask, score_builder, expect_kinds):
    B, Hq, Hkv, L, S, E, Ev = shape
    q, k, v, _ = make_inputs(B, Hq, Hkv, L, S, E, Ev, torch.float64, seed=3)
    q, k, v = (t.mul(0.7).requires_grad_() for t in (q, k, v))
    _, params = score_builder() if score_builder else (None, [])

    def f(q, k, v, *ps):
        score = score_builder(*ps)[0] if score_builder else None  # rebuilt on the perturbed params
        req = make_request(q, k, v, mask, score, None, 0.0, False, False)
        return tiled_attention(req, 4, 4).out

    if mask is not None:
        kinds = set(classify_blocks(make_request(q, k, v, mask, None, None, 0.0, False, False).mask,
                                    B, Hq, L, S, 4, 4, "cpu").flatten().tolist())  # fmt: skip
        assert expect_kinds <= kinds, f"blocks {kinds} do not exercise {expect_kinds}"
    assert torch.autograd.gradcheck(f, (q, k, v, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def _alibi_builder(slopes=None):
    slopes = alibi_slopes(4).double().requires_grad_() if slopes is None else slopes
    return alibi(slopes), [slopes]


def _poincare_builder(c=None):
    c = torch.tensor(0.8, dtype=torch.float64, requires_grad=True) if c is None else c
    return poincare(c), [c]


def _chain_builder(slopes=None):
    sc, ps = _alibi_builder(slopes)
    return [temperature(0.7), sc, softcap(1.5)], ps


GRADCHECK_CASES = {
    "causal": (causal, None, {EMPTY, PARTIAL, FULL}),
    "sliding_window": (sliding_window(3), None, {EMPTY, PARTIAL}),
    "padding_empty_batch": (padding([0, 7]), None, {EMPTY, PARTIAL}),
    "per_head_windows_alibi": (per_head_windows([1, 3, None, 2]), _alibi_builder, {EMPTY, PARTIAL}),
    "local_poincare": (local(2, 1), _poincare_builder, {EMPTY, PARTIAL}),
    "and_chain": (and_masks(causal, padding([9, 5])), _chain_builder, {PARTIAL, FULL}),
    "function_softcap": (_fn_mask, lambda: (softcap(1.0), []), {PARTIAL}),
    "none_poincare": (None, _poincare_builder, set()),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_tiled_small_blocks(case):
    mask, builder, kinds = GRADCHECK_CASES[case]
    B = 2 if "padding" in case or "and" in case else 1  # padding lengths are per batch element
    shape = (B, 4, 2, 9, 10, 3, 2)  # 3 x 3 blocks of 4 x 4, the last ones ragged (1 row, 2 keys)
    _gradcheck_tiled(shape, mask, builder, kinds)


def test_tiled_explicit_blocks_match_gold_for_many_block_sizes():
    """Block sizes that divide nothing, equal 1, or exceed L and S all give the same answer."""
    shape = (2, 4, 2, 19, 23, 8, 8)
    q, k, v, _ = make_inputs(*shape, torch.float32)
    mask = and_masks(sliding_window(6), padding([0, 20]))
    gold = attend(q.double(), k.double(), v.double(), mask=mask, need_stats=True, backend="reference")
    ref = attend(q, k, v, mask=mask, need_stats=True, backend="reference")
    for bq, bk in [(1, 1), (3, 5), (4, 4), (7, 2), (19, 23), (64, 64)]:
        res = tiled_attention(make_request(q, k, v, mask, None, None, 0.0, False, True), bq, bk)
        assert_close_to_gold(res.out, ref.out, gold.out, 1e-5, f"out bq={bq} bk={bk}")
        assert torch.equal(torch.isneginf(res.lse), torch.isneginf(gold.lse))
        assert_close_to_gold(res.stats.entropy, ref.stats.entropy, gold.stats.entropy, 1e-5, "entropy")


# ---------------------------------------------------------------------------------------
# Known weaknesses, written as the tests they fail.


def _score_param_grads(make_score, backend):
    """Gradient of <out, dout> w.r.t. the learnable tensor a score function uses."""
    q, k, v, dout = make_inputs(1, 2, 2, 8, 8, 4, 4, torch.float64)
    q.requires_grad_()
    score, bias = make_score()
    (attend(q, k, v, score=score, backend=backend).out * dout).sum().backward()
    return bias.grad


def _closure_score():
    bias = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def score(s, b, h, qi, ki):
        return s + bias[h] * ki.to(s.dtype)

    return score, bias


_GLOBAL_BIAS = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)


def _global_score_fn(s, b, h, qi, ki):
    return s + _GLOBAL_BIAS[h] * ki.to(s.dtype)


def _global_score():
    _GLOBAL_BIAS.grad = None
    return _global_score_fn, _GLOBAL_BIAS


class _BiasScore(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))

    def forward(self, s, b, h, qi, ki):
        return s + self.bias[h] * ki.to(s.dtype)


def _module_score():
    m = _BiasScore()
    return m, m.bias


def test_function_score_closure_gradient_tiled():
    """A learnable tensor a score function closes over gets the reference's gradient from tiled."""
    want = _score_param_grads(_closure_score, "reference")
    got = _score_param_grads(_closure_score, "tiled")
    assert want is not None and float(want.abs().max()) > 0.1
    assert got is not None, "tiled gave no gradient to the captured tensor"
    assert max_abs_diff(got, want) < 1e-10


def _rel_bias(s, b, h, qi, ki, bias):
    return s + bias[h] * ki.to(s.dtype)


def _partial_score():
    bias = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    return functools.partial(_rel_bias, bias=bias), bias


def _kwonly_default_score():
    bias = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def score(s, b, h, qi, ki, *, bias=bias):
        return s + bias[h] * ki.to(s.dtype)

    return score, bias


@pytest.mark.parametrize(
    "make_score",
    [_global_score, _module_score, _partial_score, _kwonly_default_score],
    ids=["global_tensor", "nn_module", "functools_partial", "kwonly_default"],
)
def test_score_callable_gradient_tiled(make_score):
    want = _score_param_grads(make_score, "reference")
    assert want is not None and float(want.abs().max()) > 0.1
    got = _score_param_grads(make_score, "tiled")
    assert got is not None, "tiled gave no gradient to the score's learnable tensor"
    assert max_abs_diff(got, want) < 1e-10


def _closure_and_kwonly_score():
    bias = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def score(s, b, h, qi, ki, *, factor=2.0):
        return s + factor * bias[h] * ki.to(s.dtype)

    return score, bias


def test_score_function_with_kwonly_default_backward_tiled():
    want = _score_param_grads(_closure_and_kwonly_score, "reference")
    got = _score_param_grads(_closure_and_kwonly_score, "tiled")
    assert max_abs_diff(got, want) < 1e-10


def test_tiled_entropy_with_large_logits():
    q, k, v = _sharp_rows()
    gold, ref = _sharp_rows_gold_and_ref(q, k, v)
    plain = attend(q, k, v, need_stats=True, backend="tiled").stats
    assert_close_to_gold(plain.entropy, ref.entropy, gold.entropy, 1e-5, "entropy")


def _sharp_rows():
    q, k, v, _ = make_inputs(1, 2, 2, 64, 300, 64, 64, torch.float32)
    return q * 30, k * 30, v


def _sharp_rows_gold_and_ref(q, k, v):
    gold = attend(q.double(), k.double(), v.double(), need_stats=True, backend="reference").stats
    ref = attend(q, k, v, need_stats=True, backend="reference").stats
    return gold, ref


def test_tiled_entropy_with_large_logits_through_score_path():
    """The same sharp logits through the generic score path (temperature 1) meet the rule."""
    q, k, v = _sharp_rows()
    gold, ref = _sharp_rows_gold_and_ref(q, k, v)
    via_score = attend(q, k, v, need_stats=True, backend="tiled", score=temperature(1.0)).stats
    assert_close_to_gold(via_score.entropy, ref.entropy, gold.entropy, 1e-5, "entropy via score path")
    assert_close_to_gold(via_score.max_weight, ref.max_weight, gold.max_weight, 1e-5, "max_weight")


# ---------------------------------------------------------------------------------------
# FlexAttention: compiled (seconds per shape), forward only on CPU.


def _flex_or_skip():
    from headwise.kernels.flex import flex_available

    if not flex_available():
        pytest.skip("this torch has no FlexAttention")


@pytest.mark.slow
@pytest.mark.parametrize(
    "mask_name,score_name,shape",
    [
        ("causal", "alibi", (1, 8, 2, 64, 128, 16, 16)),  # L < S, GQA, bottom-right causal + alibi
        ("and_masks", "chain", (2, 8, 8, 32, 32, 32, 16)),  # combined mask, score chain, Ev != E
        ("padding", "softcap", (2, 8, 1, 48, 48, 16, 16)),  # an empty batch element, MQA
    ],
)
def test_flex_against_gold(mask_name, score_name, shape):
    _flex_or_skip()
    B, Hq, Hkv, L, S, E, Ev = shape
    mask = MASKS[mask_name](B, Hq, L, S)
    run = check_against_gold("flex", mask, SCORES[score_name], torch.float32, shape, grads=False)
    assert run.res.backend == "flex"
    assert run.res.lse is None


def test_run_attend_detects_wrong_output():
    """The oracle helper itself must fail on a wrong candidate (guards against a vacuous rule)."""
    shape = (1, 2, 2, 6, 6, 4, 4)
    q, k, v, dout = make_inputs(*shape, torch.float32)
    ref = run_attend(q, k, v, dout, torch.float32, "reference", causal, None, False, False)
    gold = run_attend(q, k, v, dout, torch.float64, "reference", causal, None, False, False)
    wrong = run_attend(q, k, v, dout, torch.float32, "reference", None, None, False, False)
    with pytest.raises(AssertionError):
        assert_close_to_gold(wrong.res.out, ref.res.out, gold.res.out, 1e-5, "out")
    with pytest.raises(AssertionError):
        assert_close_to_gold(ref.res.out + 2e-5, ref.res.out, gold.res.out, 1e-5, "out")


# ---------------------------------------------------------------------------------------
# need_weights="mean": the head average without keeping per-head weights.


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", ["eager", "reference", "auto"])
@pytest.mark.parametrize("shape", [SMALL, TALL], ids=["gqa8/2", "mqa8/1"])
def test_mean_weights_are_the_head_average(backend, grad, shape):
    B, Hq, Hkv, L, S, E, Ev = shape
    q = torch.randn(B, Hq, L, E, requires_grad=grad)
    k, v = torch.randn(B, Hkv, S, E), torch.randn(B, Hkv, S, Ev)
    with torch.set_grad_enabled(grad):
        heads = attend(q, k, v, mask=causal, need_weights=True, backend=backend)
        mean = attend(q, k, v, mask=causal, need_weights="mean", backend=backend)
    assert mean.weights.shape == (B, L, S)
    torch.testing.assert_close(mean.weights, heads.weights.mean(dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(mean.out, heads.out, atol=1e-6, rtol=0)
    rows = mean.weights.sum(-1)  # 1, or 0 where causal leaves a row no key (L > S)
    assert bool((((rows - 1).abs() < 1e-5) | (rows == 0)).all())


def test_mean_weights_are_refused_by_fused_backends_and_bad_values_rejected():
    q = k = v = torch.randn(1, 2, 8, 4)
    for backend in ("sdpa", "tiled"):
        with pytest.raises(HeadwiseError, match="need_weights"):
            attend(q, k, v, need_weights="mean", backend=backend)
    with pytest.raises(HeadwiseError, match="need_weights: expected a bool or \"mean\", got 'avg'"):
        attend(q, k, v, need_weights="avg")


# ---------------------------------------------------------------------------------------
# Eager under autograd without score or dropout: a hand-written backward (eager._WeightsFunction)
# that also takes the gradient of the returned weights.


@pytest.mark.parametrize("need_weights", [True, "mean"])
@pytest.mark.parametrize("mask_name", ["none", "causal", "padding_empty_rows", "window"])
@pytest.mark.parametrize("hkv", [4, 2, 1], ids=lambda h: f"4/{h}")
def test_eager_weights_backward_equals_the_reference_and_gradcheck(hkv, mask_name, need_weights):
    from headwise import padding, sliding_window

    mask = {"none": None, "causal": causal, "padding_empty_rows": padding([0, 7]), "window": sliding_window(3)}[
        mask_name
    ]
    g = torch.Generator().manual_seed(hkv)
    q = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, hkv, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, hkv, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def loss(backend):
        r = attend(q, k, v, mask=mask, need_weights=need_weights, backend=backend)
        return r.out.sin().sum() + 3 * r.weights.square().sum(), r

    got, res = loss("eager")
    assert type(res.out.grad_fn).__name__ == "_WeightsFunctionBackward"
    want, ref = loss("reference")
    torch.testing.assert_close(res.lse, ref.lse, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(want, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    fn = lambda q, k, v: attend(q, k, v, mask=mask, need_weights=need_weights, backend="eager")  # noqa: E731
    assert torch.autograd.gradcheck(lambda q, k, v: (fn(q, k, v).out, fn(q, k, v).weights), (q, k, v))
