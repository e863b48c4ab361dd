"""Dropout on the attention weights: off means deterministic, on means unbiased noise.

The statistical checks draw N = 4000 independent dropout masks at once by repeating the
same inputs along the batch dimension (every batch element gets its own mask), under a
fixed seed, so they are deterministic. The tolerance is 6 standard errors computed from
the exact variance of the estimator, per element: wide enough that a correct kernel
cannot fail it for any seed with meaningful probability (< 1e-6 over all elements), narrow
enough that a missing 1 / (1 - p) rescaling (a bias of p * |out|) is caught many times over.
"""

from __future__ import annotations

import pytest
import torch

from headwise import attend, causal, padding, sliding_window, softcap
from headwise.attend import make_request
from headwise.kernels.registry import choose

P = 0.3
N = 4000


def _inputs(B=1, Hq=4, Hkv=2, L=6, S=7, E=8, Ev=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, Hq, L, E, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, E, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("backend", ["reference", "eager", "tiled", "sdpa", "auto"])
@pytest.mark.parametrize("mask", [None, causal], ids=["none", "causal"])
def test_no_dropout_is_deterministic(backend, mask):
    q, k, v = _inputs()
    a = attend(q, k, v, mask=mask, backend=backend, dropout_p=0.0).out
    b = attend(q, k, v, mask=mask, backend=backend, dropout_p=0.0).out
    assert torch.equal(a, b)
    assert torch.isfinite(a).all() and a.abs().max() > 0


MASKS = {"none": lambda B: None, "causal": lambda B: causal, "padding": lambda B: padding([5] * B)}


@pytest.mark.parametrize("backend", ["reference", "eager", "eager+grad", "sdpa"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_dropout_is_unbiased_noise(backend, mask_name):
    q, k, v = _inputs()
    mask = MASKS[mask_name](1)
    if backend.endswith("+grad"):  # eager has a separate autograd path
        backend = backend.removesuffix("+grad")
        q.requires_grad_()
    ref = attend(q, k, v, mask=mask, need_weights=True, backend="reference")
    clean, w = ref.out, ref.weights  # (1, H, L, Ev), (1, H, L, S)

    # Two calls differ, and differ from the clean output.
    a = attend(q, k, v, mask=mask, dropout_p=P, backend=backend).out.detach()
    b = attend(q, k, v, mask=mask, dropout_p=P, backend=backend).out.detach()
    assert not torch.equal(a, b)
    assert (a - clean).abs().max() > 1e-3

    # The mean over N independent masks approaches the clean output.
    G = q.shape[1] // k.shape[1]
    rep = [t.expand(N, *t.shape[1:]).contiguous() for t in (q, k, v)]
    outs = attend(*rep, mask=MASKS[mask_name](N), dropout_p=P, backend=backend).out.detach()
    mean = outs.mean(0, keepdim=True)
    clean, w = clean.detach(), w.detach()
    # Var[sum_j w_j m_j v_j / (1 - p)] = p / (1 - p) * sum_j w_j^2 v_j^2 for Bernoulli(1 - p) m_j.
    vr = v.repeat_interleave(G, dim=1)
    var = P / (1 - P) * torch.einsum("bhls,bhse->bhle", w.square(), vr.square())
    se = (var / N).sqrt()
    assert ((mean - clean).abs() <= 6 * se + 1e-12).all(), float(((mean - clean).abs() / (se + 1e-30)).max())
    # The bound is meaningful: forgetting the 1 / (1 - p) rescaling would be far outside it.
    biased = (1 - P) * clean
    assert ((biased - clean).abs() > 6 * se + 1e-12).any()
    # Single draws really are noisy at this scale (the test is not vacuous).
    assert (outs[0:1] - clean).abs().max() > 20 * se.max()


@pytest.mark.parametrize("backend", ["reference", "eager", "sdpa"])
def test_dropout_keeps_empty_rows_at_zero(backend):
    q, k, v = _inputs(B=2)
    out = attend(q, k, v, mask=padding([0, 7]), dropout_p=P, backend=backend).out
    assert (out[0] == 0).all()
    assert torch.isfinite(out).all()


def test_reference_weights_are_those_before_dropout():
    q, k, v = _inputs()
    res = attend(q, k, v, mask=causal, dropout_p=0.5, need_weights=True, backend="reference")
    clean = attend(q, k, v, mask=causal, need_weights=True, backend="reference")
    assert torch.allclose(res.weights, clean.weights, atol=1e-14, rtol=0)
    assert torch.allclose(res.weights.sum(-1), torch.ones(1, 4, 6, dtype=torch.float64))


def _request(q, k, v, dropout_p, mask=None, score=None, need_weights=False, need_stats=False):
    return make_request(q, k, v, mask, score, None, dropout_p, need_weights, need_stats)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"mask": causal}, {"need_stats": True}, {"need_weights": True}, {"score": softcap(3.0)}],
    ids=["plain", "causal", "stats", "weights", "softcap"],
)
def test_auto_with_dropout_never_picks_tiled(kwargs):
    q, k, v = _inputs(E=16, Ev=16, dtype=torch.float32)
    chosen = choose(_request(q, k, v, 0.2, **kwargs), "auto").name
    assert chosen != "tiled"
    res = attend(q, k, v, dropout_p=0.2, **kwargs)
    assert res.backend == chosen


def test_dropout_is_what_rules_tiled_out():
    """A call auto sends to tiled goes elsewhere once dropout is on, and the result is noisy."""
    q, k, v = _inputs(Hq=4, Hkv=1, L=512, S=512, E=16, Ev=16, dtype=torch.float32)
    kwargs = {"mask": sliding_window(16), "need_stats": True}
    assert choose(_request(q, k, v, 0.0, **kwargs), "auto").name == "tiled"
    res = attend(q, k, v, dropout_p=0.2, **kwargs)
    assert res.backend in ("eager", "reference")
    clean = attend(q, k, v, **kwargs)
    assert clean.backend == "tiled"
    assert not torch.allclose(res.out, clean.out, atol=1e-3)
    # Statistics describe the weights before dropout, so they agree with the clean call.
    assert torch.allclose(res.stats.entropy, clean.stats.entropy, atol=1e-4)
