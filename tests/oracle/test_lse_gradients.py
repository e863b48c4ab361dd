"""Gradients of the log-sum-exp on every backend that returns it (#19, item 6).

``lse`` used to be marked non-differentiable by the tiled kernel and by eager's hand-written
autograd path (no score, dropout or statistics): a loss that used it got no gradient from
it, silently. ``d lse / d s_ij = p_ij``, so every backend can give it; rows with nothing to
attend to have lse = -inf, a constant, and take a gradient of exactly 0 whatever their
cotangent. ``sdpa`` and ``flex`` return no lse at all (None), so there is nothing to drop.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FLOORS, GRADIENT_MASKS, assert_close_to_gold, make_inputs
from headwise import and_masks, attend, causal, padding, softcap
from headwise.attend import make_request
from headwise.kernels import tiled as tiled_kernel
from headwise.kernels.tiled import tiled_attention

MASKS = GRADIENT_MASKS
# Every code path that returns lse under autograd:
# - "eager": the hand-written _WeightsFunction (no score, dropout or stats; the case that
#   dropped the gradient); "eager+weights" the same with the weights returned too;
# - "eager+stats", "eager+softcap": eager's autograd path (lse = max s - log(max w));
# - "tiled": the planner's blocks; "tiled:4x4" 4 x 4 blocks; "-online" the running-maximum
#   path; "+softcap" the generic backward (autograd on each recomputed tile); "+stats" beside
#   the statistics' closed-form gradients.
BACKENDS = [
    "reference",
    "reference+softcap",
    "eager",
    "eager+weights",
    "eager+stats",
    "eager+softcap",
    "tiled",
    "tiled+stats",
    "tiled:4x4",
    "tiled:4x4-online",
    "tiled:4x4+softcap",
    "tiled:4x4+stats",
    "auto+stats",
]


def _attend(backend: str, q, k, v, mask):
    """attend() on a variant of BACKENDS (the suffixes pick a score, weights or statistics)."""
    name, *extras = backend.split("+")
    score = softcap(2.0) if "softcap" in extras else None
    need_stats, need_weights = "stats" in extras, "weights" in extras
    if not name.startswith("tiled:"):
        return attend(q, k, v, mask=mask, score=score, need_stats=need_stats, need_weights=need_weights, backend=name)
    req = make_request(q, k, v, mask, score, None, 0.0, False, need_stats)
    with pytest.MonkeyPatch.context() as patch:
        if name.endswith("-online"):
            patch.setattr(tiled_kernel, "_BOUNDED_LOGIT_LIMIT", {})
        return tiled_attention(req, 4, 4)


def _reference_for(backend: str) -> str:
    return "reference+softcap" if "softcap" in backend else "reference"


def _leaves(shape, dtype, seed=3, scale=0.7):
    q, k, v, _ = make_inputs(*shape, dtype, seed=seed)
    return tuple((t * scale).requires_grad_() for t in (q, k, v))


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with its -inf rows at 0: gradcheck's finite differences of -inf are NaN."""
    return torch.where(torch.isneginf(lse), 0.0, lse)


SHAPE = (2, 4, 2, 9, 10, 3, 2)  # GQA 4/2, L < S, ragged 4 x 4 blocks


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_of_lse(backend, mask_name):
    """gradcheck of (lse, out) together in float64, masked keys and empty rows included."""
    mask = MASKS[mask_name]
    q, k, v = _leaves(SHAPE, torch.float64)
    lse = _attend(backend, q, k, v, mask).lse
    # gradcheck skips outputs that do not require grad: it would pass on an lse that has none.
    assert lse is not None and lse.requires_grad, f"{backend}: lse carries no gradient"

    def f(q, k, v):
        r = _attend(backend, q, k, v, mask)
        return _finite(r.lse), r.out

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient_equals_the_reference_with_any_cotangent_on_empty_rows(backend):
    """A cotangent of inf or NaN on the empty rows (the gradient of lse**2 there is -inf)
    still gives finite gradients, equal to the float64 reference's: those rows contribute 0."""
    mask = MASKS["empty_rows"]
    q, k, v = _leaves(SHAPE, torch.float64)
    g = torch.Generator().manual_seed(11)
    cot = torch.randn(SHAPE[0], SHAPE[1], SHAPE[3], generator=g, dtype=torch.float64)
    # Queries sit at key positions i + S - L: the empty rows are 0, 4, 8 here.
    empty = torch.isneginf(_attend("reference", q, k, v, mask).lse.detach())
    assert empty.any() and not empty.all()
    cot = torch.where(empty, float("inf"), cot)
    cot[..., 4] = float("nan")
    grads = {}
    for name in (backend, _reference_for(backend)):
        lse = _attend(name, q, k, v, mask).lse
        assert torch.equal(torch.isneginf(lse), empty)
        grads[name] = torch.autograd.grad(lse, (q, k), cot)
    for t, a, b in zip("qk", grads[backend], grads[_reference_for(backend)]):
        assert torch.isfinite(a).all(), f"{backend}: non-finite grad {t}"
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"{backend}: grad {t}")
    assert float(grads[backend][0].abs().max()) > 0  # not vacuously zero


@pytest.mark.parametrize("backend", ["reference", "eager", "eager+weights", "tiled", "tiled:4x4"])
def test_lse_alone_or_beside_the_output(backend):
    """A loss of lse alone has a gradient, and lse added to the output's loss changes it
    (it was silently dropped on eager's weights path and on tiled)."""
    q, k, v = _leaves(SHAPE, torch.float64)
    r = _attend(backend, q, k, v, causal)
    (gq,) = torch.autograd.grad(r.lse.sum(), q, retain_graph=True)
    assert float(gq.abs().max()) > 0
    (with_lse,) = torch.autograd.grad(r.out.sum() + r.lse.sum(), q, retain_graph=True)
    (out_only,) = torch.autograd.grad(r.out.sum(), q)
    assert not torch.equal(with_lse, out_only)


@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_lse_gradient_ignores_dropout(backend):
    """lse does not depend on dropout: its gradient under dropout_p > 0 is the reference's without."""
    q, k, v = _leaves(SHAPE, torch.float64)
    r = attend(q, k, v, mask=causal, dropout_p=0.5, backend=backend)
    got = torch.autograd.grad(r.lse.sum(), (q, k))
    want = torch.autograd.grad(attend(q, k, v, mask=causal, backend="reference").lse.sum(), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["eager", "eager+stats", "tiled", "tiled:4x4", "tiled:4x4-online"])
def test_lse_gradients_follow_the_oracle_rule(backend, dtype):
    """error(candidate) <= 2 * error(reference at dtype) + floor for a loss of out and lse."""
    shape = (2, 8, 2, 13, 21, 8, 4)
    mask = and_masks(causal, padding([0, 17]))
    g = torch.Generator().manual_seed(5)
    cot = torch.randn(2, 8, 13, generator=g, dtype=torch.float64)
    dout = torch.randn(2, 8, 13, 4, generator=g, dtype=torch.float64)

    def grads(backend, dt):
        q, k, v = _leaves(shape, dt, scale=1.0)
        r = _attend(backend, q, k, v, mask)
        loss = (r.out.double() * dout).sum() + (_finite(r.lse.double()) * cot).sum()
        return torch.autograd.grad(loss, (q, k, v))

    cand, ref, gold = grads(backend, dtype), grads("reference", dtype), grads("reference", torch.float64)
    for name, c, r, g in zip("qkv", cand, ref, gold):
        scale = max(1.0, float(g.abs().max()))
        assert_close_to_gold(c, r, g, FLOORS[dtype] * scale, f"grad {name}")


def test_sdpa_returns_no_lse_to_drop():
    """sdpa (and flex, which refuses autograd on CPU) return lse None: nothing can be dropped."""
    q, k, v = _leaves(SHAPE, torch.float64)
    assert attend(q, k, v, mask=causal, backend="sdpa").lse is None
