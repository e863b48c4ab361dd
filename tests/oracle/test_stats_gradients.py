"""Gradients of the statistics (entropy, max weight) on every backend that returns them (#19, item 6).

The reference and eager differentiate ``-sum w log w`` and ``amax(w)`` with autograd; the tiled
kernel adds their closed-form gradients to its recomputing backward (kernels/tiled_stats.py).
Either way: finite (masked keys and empty rows included), equal to the float64 reference,
and ``torch.autograd.gradcheck`` passes. No backend may return statistics that silently
carry no gradient.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FLOORS, GRADIENT_MASKS, assert_close_to_gold, make_inputs
from headwise import alibi, alibi_slopes, and_masks, attend, causal, padding, poincare, softcap
from headwise.attend import make_request
from headwise.kernels import tiled as tiled_kernel
from headwise.kernels.tiled import tiled_attention

MASKS = GRADIENT_MASKS
# "tiled": the planner's blocks; "tiled:4x4": 4 x 4 blocks (block edges, online rescaling);
# "-online": every row on the running-maximum path; "+softcap": the generic (autograd) backward.
BACKENDS = ["reference", "eager", "tiled", "tiled:4x4", "tiled:4x4-online", "tiled:4x4+softcap", "auto"]


def _attend(backend: str, q, k, v, mask):
    """attend(..., need_stats=True) on ``backend`` (see BACKENDS for the tiled variants);
    "reference+softcap" is the reference with the score of "tiled:4x4+softcap"."""
    score = softcap(2.0) if backend.endswith("+softcap") else None
    if not backend.startswith("tiled:"):
        return attend(q, k, v, mask=mask, score=score, need_stats=True, backend=backend.removesuffix("+softcap"))
    req = make_request(q, k, v, mask, score, None, 0.0, False, True)
    with pytest.MonkeyPatch.context() as patch:
        if backend.endswith("-online"):
            patch.setattr(tiled_kernel, "_BOUNDED_LOGIT_LIMIT", {})
        return tiled_attention(req, 4, 4)


def _leaves(shape, dtype, seed=3, scale=0.7):
    q, k, v, _ = make_inputs(*shape, dtype, seed=seed)
    return tuple((t * scale).requires_grad_() for t in (q, k, v))


SHAPE = (2, 4, 2, 9, 10, 3, 2)  # GQA 4/2, L < S, ragged 4 x 4 blocks


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_of_the_statistics(backend, mask_name):
    """gradcheck of (entropy, max weight, out) together, in float64, masked and empty rows included."""
    mask = MASKS[mask_name]
    q, k, v = _leaves(SHAPE, torch.float64)
    stats = _attend(backend, q, k, v, mask).stats
    # gradcheck skips outputs that do not require grad: it would pass on statistics that have none.
    assert stats.entropy.requires_grad and stats.max_weight.requires_grad

    def f(q, k, v):
        r = _attend(backend, q, k, v, mask)
        return r.stats.entropy, r.stats.max_weight, r.out

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "eager", "tiled", "auto"])
def test_entropy_sum_backward_is_finite_and_equals_the_reference(backend):
    """The issue's call: ``attend(q, k, v, mask=causal, need_stats=True).stats.entropy.sum().backward()``."""
    shape = (1, 2, 2, 16, 16, 8, 8)  # causal with L == S: row 0 has one key, every row some masked keys
    q, k, v = _leaves(shape, torch.float64, scale=1.0)
    _attend(backend, q, k, v, causal).stats.entropy.sum().backward()
    got = [t.grad.clone() for t in (q, k)]  # the entropy does not depend on v
    q.grad = k.grad = None
    _attend("reference", q, k, v, causal).stats.entropy.sum().backward()
    for name, a, b in zip("qk", got, (q.grad, k.grad)):
        assert torch.isfinite(a).all(), f"{backend}: non-finite grad {name}"
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"{backend}: grad {name}")
    assert float(q.grad.abs().max()) > 0  # not vacuously zero


def test_tiled_statistics_carry_a_gradient_alone_or_beside_the_output():
    """Tiled used to return statistics with no grad_fn: a stats-only loss raised torch's
    'does not require grad', and stats added to the output's loss were silently dropped."""
    q, k, v = _leaves(SHAPE, torch.float64)
    r = attend(q, k, v, mask=causal, need_stats=True, backend="tiled")
    assert r.stats.entropy.requires_grad and r.stats.max_weight.requires_grad
    (gq,) = torch.autograd.grad(r.stats.max_weight.sum(), q, retain_graph=True)
    assert float(gq.abs().max()) > 0
    (with_stats,) = torch.autograd.grad(r.out.sum() + r.stats.entropy.sum(), q, retain_graph=True)
    (out_only,) = torch.autograd.grad(r.out.sum(), q)
    assert not torch.equal(with_stats, out_only)


@pytest.mark.parametrize("backend", ["eager", "tiled", "tiled:4x4", "tiled:4x4-online", "tiled:4x4+softcap"])
def test_max_weight_gradient_shares_ties_like_amax(backend):
    """Tied largest logits (q = 0: whole rows tied; a duplicated key: pairs) share the gradient equally."""
    q, k, v = (t.detach() for t in _leaves(SHAPE, torch.float64))
    k = k.clone()
    k[:, :, 5] = k[:, :, 2]
    for q0 in (q, torch.zeros_like(q)):
        grads = {}
        reference = "reference+softcap" if backend.endswith("+softcap") else "reference"
        for name in (backend, reference):
            leaves = [t.clone().requires_grad_() for t in (q0, k, v)]
            r = _attend(name, *leaves, causal)
            w = torch.linspace(0.5, 2.0, r.stats.max_weight.numel(), dtype=torch.float64).view_as(r.stats.max_weight)
            grads[name] = torch.autograd.grad((r.stats.max_weight * w).sum(), leaves[:2])
        for a, b in zip(grads[backend], grads[reference]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["eager", "tiled", "tiled:4x4", "tiled:4x4-online"])
def test_statistics_gradients_follow_the_oracle_rule(backend, dtype):
    """error(candidate) <= 2 * error(reference at dtype) + floor for a loss of out, entropy and max weight."""
    shape = (2, 8, 2, 13, 21, 8, 4)
    mask = and_masks(causal, padding([0, 17]))
    g = torch.Generator().manual_seed(5)
    cot = [torch.randn(2, 8, 13, generator=g, dtype=torch.float64) for _ in range(2)]
    dout = torch.randn(2, 8, 13, 4, generator=g, dtype=torch.float64)

    def grads(backend, dt):
        q, k, v = _leaves(shape, dt, scale=1.0)
        r = _attend(backend, q, k, v, mask)
        loss = (r.out.double() * dout).sum() + (r.stats.entropy.double() * cot[0]).sum()
        loss = loss + (r.stats.max_weight.double() * cot[1]).sum()
        return torch.autograd.grad(loss, (q, k, v))

    cand, ref, gold = grads(backend, dtype), grads("reference", dtype), grads("reference", torch.float64)
    for name, c, r, g in zip("qkv", cand, ref, gold):
        scale = max(1.0, float(g.abs().max()))
        assert_close_to_gold(c, r, g, FLOORS[dtype] * scale, f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "eager", "tiled:4x4"])
def test_gradcheck_of_the_statistics_reaches_learnable_score_parameters(backend):
    """ALiBi slopes and the Poincare curvature get the statistics' gradients too (the tiled
    kernel's generic backward runs autograd on each recomputed tile with dS)."""
    q, k, v = _leaves(SHAPE, torch.float64)
    slopes = alibi_slopes(4).double().requires_grad_()
    curvature = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, slopes, curvature):
        outs = []
        for score in (alibi(slopes), poincare(curvature)):
            if backend == "tiled:4x4":
                r = tiled_attention(make_request(q, k, v, causal, score, None, 0.0, False, True), 4, 4)
            else:
                r = attend(q, k, v, mask=causal, score=score, need_stats=True, backend=backend)
            outs += [r.stats.entropy, r.stats.max_weight]
        return tuple(outs)

    assert torch.autograd.gradcheck(f, (q, k, v, slopes, curvature), eps=1e-6, atol=1e-6, rtol=1e-4)
