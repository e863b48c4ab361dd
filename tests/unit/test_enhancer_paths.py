"""The enhancer's serving paths equal its training path: the no-grad folded read-out, and the
numpy plans that ``refine`` runs in eval mode (headwise.memory.serving)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headwise.errors import HeadwiseError
from headwise.memory import serving
from headwise.memory.enhancer import LinearAdapter, QueryEnhancer
from headwise.memory.serving import LinearPlan, MultiHeadPlan


def _random_enhancer(dtype=torch.float64, **kw) -> QueryEnhancer:
    enh = QueryEnhancer(32, heads=4, candidates=5, **kw).to(dtype).eval()
    with torch.no_grad():
        for p in enh.parameters():
            p.normal_(std=0.2)
    return enh


def _inputs(n=6, K=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, 32, generator=g, dtype=dtype), dim=-1)
    cand = torch.nn.functional.normalize(torch.randn(n, K, 32, generator=g, dtype=dtype), dim=-1)
    return q, cand, torch.rand(n, K, generator=g, dtype=dtype)


def test_no_grad_readout_equals_the_training_readout():
    enh = _random_enhancer()
    q, cand, scores = _inputs()
    with torch.enable_grad():
        train_path = enh(q, cand, scores)
    with torch.no_grad():
        serve_path = enh(q, cand, scores)
    assert torch.allclose(serve_path, train_path, atol=1e-12, rtol=0)
    assert not torch.allclose(serve_path, q)  # the weights do something


# n = 6 runs the numpy plan; n = 300 the torch blocks (TORCH_BLOCK = 256: one full, one partial).
PATHS = [6, 300]


def test_the_two_plan_paths_are_the_batch_sizes_of_the_tests():
    assert PATHS[0] < serving.TORCH_MIN_BATCH <= serving.TORCH_BLOCK < PATHS[1] < 2 * serving.TORCH_BLOCK


@pytest.mark.parametrize("n", [1, *PATHS])  # 1: a served query
@pytest.mark.parametrize("K", [5, 3])  # a store may hand fewer candidates than the enhancer's K
def test_multi_head_plan_equals_forward_float64(K, n):
    enh = _random_enhancer()
    enh.attn.head_gates.data = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64)  # gates are folded too
    q, cand, scores = _inputs(n=n, K=K)
    with torch.no_grad():
        ref = enh(q, cand, scores).numpy()
    plan = MultiHeadPlan.from_enhancer(enh, np.float64)
    got = plan.refine(q.numpy(), cand.numpy(), scores.numpy())
    np.testing.assert_allclose(got, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", PATHS)
def test_multi_head_plan_handles_gqa_and_no_bias(n):
    enh = _random_enhancer()
    from headwise.modules import MultiHeadAttention

    enh.attn = MultiHeadAttention(32, 4, num_kv_heads=2, bias=False).double().eval()
    with torch.no_grad():
        for p in enh.attn.parameters():
            p.normal_(std=0.2)
    q, cand, scores = _inputs(n=n)
    with torch.no_grad():
        ref = enh(q, cand, scores).numpy()
    got = MultiHeadPlan.from_enhancer(enh, np.float64).refine(q.numpy(), cand.numpy(), scores.numpy())
    np.testing.assert_allclose(got, ref, atol=1e-12, rtol=0)


def test_linear_plan_equals_forward_float64():
    ad = LinearAdapter(32).double().eval()
    with torch.no_grad():
        ad.linear.weight.normal_(std=0.3)
        ad.linear.bias.normal_(std=0.3)
    q = _inputs()[0]
    with torch.no_grad():
        ref = ad(q).numpy()
    np.testing.assert_allclose(LinearPlan.from_adapter(ad, np.float64).refine(q.numpy()), ref, atol=1e-12, rtol=0)


def test_refine_runs_the_plan_in_eval_and_torch_in_training():
    enh = _random_enhancer(torch.float32)
    q, cand, scores = (t.numpy() for t in _inputs(dtype=torch.float32))
    assert isinstance(enh.serving_plan(), MultiHeadPlan)
    served = enh.refine(q, cand, scores)
    assert served.dtype == np.float32 and served.shape == (6, 32)
    enh.train()
    trained = enh.refine(q, cand, scores)  # the torch forward, in eval mode for the call
    assert enh.training
    np.testing.assert_allclose(served, trained, atol=2e-6, rtol=0)
    for mechanism in ("hyperbolic", "moe"):
        assert QueryEnhancer(32, heads=4, candidates=5, mechanism=mechanism).serving_plan() is None


def test_plan_is_rebuilt_when_a_parameter_changes():
    enh = _random_enhancer(torch.float32)
    q, cand, scores = (t.numpy() for t in _inputs(dtype=torch.float32))
    plan = enh.serving_plan()
    assert enh.serving_plan() is plan  # cached while nothing changes
    before = enh.refine(q, cand, scores)
    opt = torch.optim.SGD(enh.parameters(), lr=0.5)
    enh.train()
    enh(*(torch.from_numpy(a) for a in (q, cand, scores))).sum().backward()
    opt.step()
    enh.eval()
    assert enh.serving_plan() is not plan
    with torch.no_grad():
        ref = enh(*(torch.from_numpy(a) for a in (q, cand, scores))).numpy()
    after = enh.refine(q, cand, scores)
    assert not np.allclose(after, before, atol=1e-3)
    np.testing.assert_allclose(after, ref, atol=2e-6, rtol=0)
    enh.load_state_dict(_random_enhancer(torch.float32).state_dict())  # load_state_dict copies in place
    with torch.no_grad():
        ref = enh(*(torch.from_numpy(a) for a in (q, cand, scores))).numpy()
    np.testing.assert_allclose(enh.refine(q, cand, scores), ref, atol=2e-6, rtol=0)


def test_refine_rejects_bad_candidates():
    enh = _random_enhancer(torch.float32)
    q, cand, scores = (t.numpy() for t in _inputs(dtype=torch.float32))
    with pytest.raises(HeadwiseError, match="at most K=5"):
        enh.refine(q, np.concatenate([cand, cand], axis=1), np.concatenate([scores, scores], axis=1))
    with pytest.raises(HeadwiseError, match="cand_scores"):
        enh.refine(q, cand, scores[:, :4])
    bad = cand.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(HeadwiseError, match="finite"):
        enh.refine(q, bad, scores)


def test_plan_follows_a_dtype_change():
    enh = _random_enhancer(torch.float32)
    plan = enh.serving_plan()
    enh.double()  # swaps p.data: same Parameter objects, new storage
    assert enh.serving_plan() is not plan


def test_every_parameter_is_a_plan_source():
    enh = _random_enhancer(torch.float32)
    q, cand, scores = (t.numpy() for t in _inputs(dtype=torch.float32))
    for name, p in enh.named_parameters():
        plan = enh.serving_plan()
        with torch.no_grad():
            p.add_(0.05)
        assert enh.serving_plan() is not plan, name
        with torch.no_grad():
            ref = enh(*(torch.from_numpy(a) for a in (q, cand, scores))).numpy()
        np.testing.assert_allclose(enh.refine(q, cand, scores), ref, atol=2e-6, rtol=0, err_msg=name)


def test_adapted_first_pass_queries_are_the_adapter_alone_in_every_path():
    enh = _random_enhancer(first_pass="adapted")
    q, _, _ = _inputs()
    with torch.no_grad():
        ref = torch.nn.functional.normalize(q + enh.adapter(q), dim=-1).numpy()
    np.testing.assert_allclose(MultiHeadPlan.from_enhancer(enh, np.float64).adapted(q.numpy()), ref, atol=1e-12)
    np.testing.assert_allclose(enh.first_pass_queries(q.numpy()), ref, atol=1e-6)  # eval: the plan, float32
    enh.train()
    np.testing.assert_allclose(enh.first_pass_queries(q.numpy()), ref, atol=1e-6)  # training: torch
    raw = _random_enhancer()
    np.testing.assert_array_equal(raw.first_pass_queries(q.numpy()), q.numpy().astype(np.float32))
    assert enh.config()["first_pass"] == "adapted"


def test_first_pass_is_checked():
    with pytest.raises(HeadwiseError, match="first_pass"):
        QueryEnhancer(32, heads=4, first_pass="twice")
    with pytest.raises(HeadwiseError, match="first_pass"):
        QueryEnhancer(32, heads=4, mechanism="flash", first_pass="adapted")


def test_adopted_adapter_makes_the_untrained_enhancer_the_linear_adapter():
    ad = LinearAdapter(32).double().eval()
    with torch.no_grad():
        ad.linear.weight.normal_(std=0.2)
        ad.linear.bias.normal_(std=0.2)
    enh = QueryEnhancer(32, heads=4, candidates=5, first_pass="adapted").double().eval().adopt_adapter(ad)
    assert not any(p.requires_grad for p in enh.adapter.parameters())
    assert enh.attn.in_proj_weight.requires_grad and enh.mix.weight.requires_grad
    q, cand, scores = _inputs()
    with torch.no_grad():
        np.testing.assert_allclose(enh(q, cand, scores).numpy(), ad(q).numpy(), atol=1e-12)
    np.testing.assert_allclose(enh.first_pass_queries(q.numpy()), ad.refine(q.numpy()), atol=1e-6)
    with pytest.raises(HeadwiseError, match="linear"):
        enh.adopt_adapter(LinearAdapter(16))


def test_adapter_only_is_the_enhancer_with_its_read_out_off():
    enh = QueryEnhancer(32, heads=4, candidates=5).double().eval()
    with torch.no_grad():
        for p in enh.parameters():
            p.normal_(std=0.2)
    ablated = enh.adapter_only()
    assert isinstance(ablated, LinearAdapter) and not ablated.training
    q, cand, scores = _inputs()
    with torch.no_grad():
        full = enh(q, cand, scores)
        enh.mix.weight.zero_()
        enh.mix.bias.zero_()
        np.testing.assert_allclose(ablated(q).numpy(), enh(q, cand, scores).numpy(), atol=1e-12)
        assert not torch.allclose(full, ablated(q))  # the read-out did move the queries
    ablated.linear.weight.data.zero_()  # a copy: the enhancer's adapter is untouched
    assert enh.adapter.weight.abs().sum() > 0


def test_refine_reuses_the_adapted_queries_of_the_first_pass_only_for_the_same_queries():
    enh = _random_enhancer(first_pass="adapted")
    q, cand, scores = (t.numpy() for t in _inputs())
    plan = MultiHeadPlan.from_enhancer(enh, np.float64)
    fresh = MultiHeadPlan.from_enhancer(enh, np.float64).refine(q, cand, scores)
    plan.adapted(q)
    np.testing.assert_allclose(plan.refine(q, cand, scores), fresh, atol=1e-12, rtol=0)
    other = q[::-1].copy()
    plan.adapted(q)
    np.testing.assert_allclose(plan.refine(other, cand, scores), plan.refine(other, cand, scores), atol=0)
    expected = MultiHeadPlan.from_enhancer(enh, np.float64).refine(other, cand, scores)
    np.testing.assert_allclose(plan.refine(other, cand, scores), expected, atol=1e-12, rtol=0)


def test_float32_plan_blocks_match_the_float64_forward():
    enh = _random_enhancer()
    q, cand, scores = _inputs(n=300)
    with torch.no_grad():
        ref = enh(q, cand, scores).numpy()
    plan = MultiHeadPlan.from_enhancer(enh, np.float32)
    got = plan.refine(*(x.numpy().astype(np.float32) for x in (q, cand, scores)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mechanism", ["multi-head", "hyperbolic", "linear"])
def test_refine_unchecked_is_refine_on_a_stores_arrays(mechanism):
    enh = LinearAdapter(32) if mechanism == "linear" else QueryEnhancer(32, mechanism=mechanism, heads=4, candidates=5)
    with torch.no_grad():
        for p in enh.parameters():
            p.normal_(std=0.2)
    q, cand, scores = (np.ascontiguousarray(t.numpy(), dtype=np.float32) for t in _inputs(dtype=torch.float32))
    args = (q,) if not enh.uses_candidates else (q, cand, scores)
    for training in (False, True):  # eval: the plan where there is one; training: refine itself
        enh.train(training)
        np.testing.assert_array_equal(enh.refine_unchecked(*args), enh.refine(*args))
    enh.eval()
    assert not np.allclose(enh.refine_unchecked(*args), q, atol=1e-3)  # the weights act


def test_a_plan_of_inference_tensors_follows_in_place_updates():
    # Inference tensors keep no version counter, so the plan cannot be cached: it is folded per call.
    q, cand, scores = (np.ascontiguousarray(t.numpy(), dtype=np.float32) for t in _inputs(dtype=torch.float32))
    with torch.inference_mode():
        enh = QueryEnhancer(32, heads=4, candidates=5).eval()
        assert all(p.is_inference() for p in enh.parameters())
        for p in enh.parameters():
            p.normal_(std=0.2)
        before = enh.refine(q, cand, scores)
        enh.mix.weight.mul_(2.0)
        after = enh.refine(q, cand, scores)
        ref = enh(torch.from_numpy(q), torch.from_numpy(cand), torch.from_numpy(scores)).numpy()
    assert not np.allclose(before, after, atol=1e-4)
    np.testing.assert_allclose(after, ref, atol=1e-5)
