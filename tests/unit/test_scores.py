"""Scores: each formula against a direct computation, composition order, Poincaré robustness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headwise import HeadwiseError, alibi, alibi_slopes, attend, causal, poincare, softcap, temperature
from headwise.scores import ScoreChain, as_score


def _idx(H=2, L=3, S=4):
    return (
        torch.zeros(1, 1, 1, 1, dtype=torch.long),
        torch.arange(H).view(1, H, 1, 1),
        torch.arange(L).view(1, 1, L, 1) + (S - L),
        torch.arange(S).view(1, 1, 1, S),
    )


# ---------------------------------------------------------------------------------------
# ALiBi


def test_alibi_slopes_power_of_two_heads():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    assert torch.allclose(alibi_slopes(1), torch.tensor([2.0**-8]))


def test_alibi_slopes_other_head_counts_follow_press_et_al():
    # Press et al.: slopes of the closest power of two, then every other slope of twice that.
    def get_slopes(n):
        def pow2(n):
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            return [start * start**i for i in range(n)]

        if math.log2(n).is_integer():
            return pow2(n)
        closest = 2 ** math.floor(math.log2(n))
        return pow2(closest) + get_slopes(2 * closest)[0::2][: n - closest]

    for n in (3, 5, 6, 12):
        assert np.allclose(alibi_slopes(n).numpy(), get_slopes(n)), n


def test_alibi_modify_subtracts_slope_times_distance():
    b, h, q, kv = _idx()
    s = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    got = alibi([0.5, 0.25]).modify(s, b, h, q, kv)
    dist = (q - kv).abs().double()
    assert torch.equal(got[0, 0], -0.5 * dist[0, 0])
    assert torch.equal(got[0, 1], -0.25 * dist[0, 0])
    assert got[0, 0, 2, 3] == 0  # the last query sits on the last key (bottom-right)


# ---------------------------------------------------------------------------------------
# Softcap, temperature, composition


def test_softcap_is_cap_tanh_and_bounded():
    s = torch.tensor([-1e6, -30.0, -1.0, 0.0, 0.5, 30.0, 1e6], dtype=torch.float64)
    got = softcap(30.0).modify(s, None, None, None, None)
    assert torch.allclose(got, 30.0 * torch.tanh(s / 30.0))
    assert (got.abs() <= 30.0).all()
    assert torch.allclose(
        softcap(30.0).modify(torch.tensor(0.01), None, None, None, None), torch.tensor(0.01), atol=1e-8
    )


def test_temperature_divides():
    s = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(temperature(2.0).modify(s, None, None, None, None), s / 2.0)


def test_score_chain_applies_in_order():
    s = torch.tensor([3.0], dtype=torch.float64)
    a = as_score([temperature(2.0), softcap(1.0)]).modify(s, None, None, None, None)
    b = as_score([softcap(1.0), temperature(2.0)]).modify(s, None, None, None, None)
    assert torch.allclose(a, torch.tanh(s / 2.0))
    assert torch.allclose(b, torch.tanh(s) / 2.0)
    assert not torch.allclose(a, b)


def test_attend_with_alibi_and_softcap_matches_hand_formula():
    """The reference itself against softmax written out by hand (it is the oracle)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 5, 3, generator=g, dtype=torch.float64)
    slopes = torch.tensor([0.5, 0.125], dtype=torch.float64)
    res = attend(q, k, v, mask=causal, score=[alibi(slopes), softcap(2.0)], need_weights=True, backend="reference")
    want = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    for h in range(2):
        for i in range(3):
            pos = i + 2  # bottom-right: S - L = 2
            logits = []
            for j in range(pos + 1):
                s = float(q[0, h, i] @ k[0, h, j]) / 2.0 - float(slopes[h]) * abs(pos - j)
                logits.append(2.0 * math.tanh(s / 2.0))
            p = np.exp(np.array(logits) - max(logits))
            p /= p.sum()
            want[0, h, i] = torch.from_numpy(p) @ v[0, h, : pos + 1]
            assert np.allclose(res.weights[0, h, i, : pos + 1].numpy(), p, atol=1e-14)
            assert (res.weights[0, h, i, pos + 1 :] == 0).all()
    assert torch.allclose(res.out, want, atol=1e-14)


def test_function_score_and_list_of_functions():
    def plus_one(s, b, h, q, kv):
        return s + 1.0

    chain = as_score([plus_one, temperature(2.0)])
    assert isinstance(chain, ScoreChain)
    assert torch.equal(chain.modify(torch.tensor([1.0]), None, None, None, None), torch.tensor([1.0]))
    assert as_score([]) is None


# ---------------------------------------------------------------------------------------
# Poincaré


def _poincare_distance_np(x, y, c):
    """d_c(x, y) = arcosh(1 + 2c|x-y|^2 / ((1 - c|x|^2)(1 - c|y|^2))) / sqrt(c), in float64."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    num = 2 * c * np.sum((x - y) ** 2, axis=-1)
    den = (1 - c * np.sum(x * x, axis=-1)) * (1 - c * np.sum(y * y, axis=-1))
    return np.arccosh(1 + num / den) / np.sqrt(c)


def _expmap0_np(u, c, clip):
    u = np.asarray(u, dtype=np.float64)
    n = np.linalg.norm(u, axis=-1, keepdims=True)
    r = np.minimum(np.sqrt(c) * n, clip)
    return np.tanh(r) * u / (np.sqrt(c) * n)


@pytest.mark.parametrize("c", [0.3, 1.0, 2.5])
def test_poincare_similarity_is_minus_the_distance(c):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(6, 5, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64) * 0.5
    sc = poincare(c)
    x, y = sc.prepare(u, w)
    assert np.allclose(x.numpy(), _expmap0_np(u.numpy(), c, 4.0), atol=1e-13)
    want = _poincare_distance_np(x.numpy()[:, None, :], y.numpy()[None, :, :], c)
    got = sc.similarity(x, y).numpy()
    assert np.allclose(got, -want, rtol=1e-9, atol=1e-9)


def test_poincare_distance_of_a_point_to_itself_is_tiny():
    x = poincare(1.0).to_ball(torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64))
    d = -poincare(1.0).similarity(x, x)
    # A clamp keeps arcosh off its singular point (infinite slope at q == k), so d is not
    # exactly 0, but it must stay far below any distance that matters.
    assert 0 <= float(d) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("c", [0.5, 1.0, 4.0])
def test_poincare_points_stay_inside_the_ball_for_any_input(dtype, c):
    big = torch.finfo(dtype).max ** 0.5  # squared norms overflow
    u = torch.stack(
        [
            torch.zeros(4, dtype=dtype),
            torch.full((4,), 1e-30, dtype=dtype),
            torch.tensor([1.0, 0, 0, 0], dtype=dtype) / math.sqrt(c) * 0.999,  # just inside
            torch.tensor([1.0, 0, 0, 0], dtype=dtype) / math.sqrt(c) * 1.001,  # just outside
            torch.full((4,), 50.0, dtype=dtype),
            torch.full((4,), 1e4, dtype=dtype),
            torch.full((4,), big, dtype=dtype),
            torch.tensor([big, -big, 3.0, 0.0], dtype=dtype),
        ]
    )
    sc = poincare(c)
    x, _ = sc.prepare(u, u)
    assert torch.isfinite(x).all()
    norms = x.double().norm(dim=-1) * math.sqrt(c)
    assert (norms < 1).all(), norms
    # Clipping at sqrt(c)|u| = 4 keeps the conformal factor 1 - c|x|^2 well away from 0.
    assert (1 - norms.square() >= 1 - math.tanh(4.0) ** 2 - 1e-6).all()
    s = sc.similarity(x, x)
    assert torch.isfinite(s).all()
    assert (s <= 0).all()


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_poincare_attention_no_nan_for_extreme_inputs_and_grads(backend):
    q = torch.tensor([[[[0.0, 0.0], [1e6, -1e6], [1e-20, 0.0]]]], requires_grad=True)
    k = torch.tensor([[[[0.0, 0.0], [-3e5, 2.0], [5.0, 5.0], [1e-8, 1e-8]]]], requires_grad=True)
    v = torch.randn(1, 1, 4, 3, requires_grad=True)
    c = torch.tensor(1.0, requires_grad=True)
    res = attend(q, k, v, score=poincare(c), backend=backend, need_stats=True)
    assert torch.isfinite(res.out).all() and torch.isfinite(res.lse).all()
    res.out.sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v), ("c", c)):
        assert t.grad is not None and torch.isfinite(t.grad).all(), name


def test_poincare_default_scale_is_one():
    q = torch.randn(1, 1, 3, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 3, 16, dtype=torch.float64)
    v = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    a = attend(q, k, v, score=poincare(1.0), backend="reference").out
    b = attend(q, k, v, score=poincare(1.0), scale=1.0, backend="reference").out
    c = attend(q, k, v, score=poincare(1.0), scale=0.25, backend="reference").out
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: softcap(0.0), "cap"),
        (lambda: softcap(float("inf")), "cap"),
        (lambda: softcap(-1.0), "cap"),
        (lambda: temperature(0), "t"),
        (lambda: temperature(float("nan")), "t"),
        (lambda: poincare(0.0), "curvature"),
        (lambda: poincare(torch.tensor(-1.0)), "curvature"),
        (lambda: poincare(1.0, clip=0.0), "clip"),
        (lambda: poincare(1.0, eps=-1e-6), "eps"),
        (lambda: alibi(torch.ones(2, 2)), "slopes"),
        (lambda: alibi(torch.ones(3, dtype=torch.long)), "slopes"),
        (lambda: alibi_slopes(0), "num_heads"),
        (lambda: alibi_slopes(2.0), "num_heads"),
        (lambda: as_score([poincare(), poincare()]), "score"),
        (lambda: as_score(42), "score"),
    ],
)
def test_bad_score_arguments_raise_naming_the_argument(make, name):
    with pytest.raises(HeadwiseError, match=f"^{name}: expected"):
        make()
