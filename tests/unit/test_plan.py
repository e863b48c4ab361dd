"""headwise.plan: the same decision as attend, run many times; explain(), errors, no global side effects."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise import HeadwiseError, attend, causal, plan, sliding_window


def _qkv(B=1, Hq=4, Hkv=2, L=32, S=32, E=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, L, E, generator=g), torch.randn(B, Hkv, S, E, generator=g),
            torch.randn(B, Hkv, S, E, generator=g))  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mask": causal},
        {"mask": sliding_window(8), "need_stats": True},
        {"need_weights": True},
        {"mask": causal, "score": headwise.alibi(headwise.alibi_slopes(4))},
        {"need_weights": "mean"},
    ],  # fmt: skip
)
def test_a_plan_runs_what_attend_runs(kwargs):
    q, k, v = _qkv()
    p = plan(q.shape, k.shape, **kwargs)
    want = attend(q, k, v, **kwargs)
    got = p(q, k, v)
    assert p.backend == got.backend == want.backend
    assert torch.equal(got.out, want.out)
    assert p(q, k, v).out.data_ptr() != got.out.data_ptr()  # a plan runs anew each call


def test_explain_names_the_choice_the_contenders_and_the_refusals():
    p = plan((1, 4, 32, 16), (1, 2, 32, 16), need_weights=True)
    text = p.explain()
    assert text.startswith(f"backend {p.backend}, chosen by auto")
    assert "<- runs" in text and "refuses:" in text and "tiled" in text
    assert "extra memory" in text and p.memory_bytes > 0
    named = plan((1, 4, 32, 16), (1, 2, 32, 16), backend="tiled")
    assert named.backend == "tiled" and named.decision is None and "named by the caller" in named.explain()


def test_plans_are_immutable_and_check_their_inputs():
    q, k, v = _qkv()
    p = plan(q.shape, k.shape, mask=causal)
    with pytest.raises(AttributeError):
        p.backend = "eager"  # type: ignore[misc]
    with pytest.raises(HeadwiseError, match="q: expected the planned"):
        p(q[:, :, :16], k, v)
    with pytest.raises(HeadwiseError, match="k: expected the planned"):
        p(q, k.double(), v)
    with pytest.raises(HeadwiseError, match="q_shape: expected a 4-tuple"):
        plan((1, 4, 32), (1, 2, 32, 16))
    with pytest.raises(HeadwiseError, match="k: expected a number of heads dividing"):
        plan((1, 4, 32, 16), (1, 3, 32, 16))
    with pytest.raises(HeadwiseError, match="'sdpa' cannot serve"):
        plan((1, 4, 32, 16), (1, 2, 32, 16), need_stats=True, backend="sdpa")


def test_a_plan_for_training_picks_a_backend_with_a_backward():
    q, k, v = _qkv(L=64, S=64)
    p = plan(q.shape, k.shape, mask=sliding_window(16), requires_grad=True)
    qg = q.clone().requires_grad_()
    out = p(qg, k, v).out
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_the_memory_estimate_follows_the_backend():
    big = ((1, 8, 4096, 64), (1, 8, 4096, 64))
    eager = plan(*big, backend="eager").memory_bytes
    tiled = plan(*big, backend="tiled").memory_bytes
    assert eager >= 2 * 4 * 8 * 4096 * 4096 and tiled < eager / 10


@pytest.mark.slow
def test_flex_leaves_the_dynamo_configuration_as_it_was():
    import torch._dynamo.config as dynamo_config

    before = dynamo_config.get_config_copy()
    q = torch.randn(1, 2, 128, 16)
    assert attend(q, q, q, mask=sliding_window(32), backend="flex").backend == "flex"
    after = dynamo_config.get_config_copy()
    assert {k: (before[k], after[k]) for k in before if before[k] != after[k]} == {}


def test_every_process_wide_cache_is_named_bounded_and_clearable():
    headwise.clear_caches()
    q = torch.randn(1, 2, 64, 16)
    attend(q, q, q, mask=sliding_window(8), backend="tiled")
    attend(q, q, q, mask=sliding_window(8))
    info = headwise.cache_info()
    assert {"attend.decisions", "tiled.block_plans", "sdpa.dense_masks", "flex.block_masks"} <= set(info)
    assert sum(v["entries"] for v in info.values()) >= 1, info  # the calls cached what they derived
    assert all(v["entries"] <= v["max_entries"] for v in info.values())
    headwise.clear_caches()
    assert all(v["entries"] == 0 for v in headwise.cache_info().values())
    assert torch.equal(attend(q, q, q, mask=sliding_window(8), backend="tiled").out,
                       attend(q, q, q, mask=sliding_window(8), backend="tiled").out)  # fmt: skip
