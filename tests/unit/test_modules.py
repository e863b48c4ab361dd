"""MultiHeadAttention, HyperbolicAttention and MoEAttention: parity, equivalences, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from headwise import HeadwiseError, attend, causal, per_head_windows, sliding_window
from headwise.modules import HyperbolicAttention, MoEAttention, MultiHeadAttention

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def torch_pair(embed=32, heads=4, kdim=None, vdim=None, bias=True, batch_first=True):
    t = nn.MultiheadAttention(embed, heads, kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first, dtype=F64)
    t.eval()
    return t, MultiHeadAttention.from_torch(t).eval()


# -- parity with torch ---------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_self_attention_matches_torch(bias, average):
    t, m = torch_pair(bias=bias)
    x = torch.randn(2, 7, 32, dtype=F64)
    ref, ref_w = t(x, x, x, need_weights=True, average_attn_weights=average)
    res = m(x, need_weights=True, average_attn_weights=average)
    torch.testing.assert_close(res.out, ref, atol=1e-10, rtol=0)
    assert res.weights.shape == ((2, 7, 7) if average else (2, 4, 7, 7))
    torch.testing.assert_close(res.weights, ref_w, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kdim,vdim", [(None, None), (24, 40)])
def test_cross_attention_with_padding_matches_torch(kdim, vdim):
    t, m = torch_pair(kdim=kdim, vdim=vdim)
    x = torch.randn(2, 5, 32, dtype=F64)
    key = torch.randn(2, 9, kdim or 32, dtype=F64)
    value = torch.randn(2, 9, vdim or 32, dtype=F64)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    ref, ref_w = t(x, key, value, key_padding_mask=kpm, need_weights=True)
    res = m(x, key, value, key_padding_mask=kpm, need_weights=True)
    torch.testing.assert_close(res.out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(res.weights.mean(1), ref_w, atol=1e-10, rtol=0)


def test_causal_mask_matches_torch_float_mask():
    t, m = torch_pair()
    x = torch.randn(3, 8, 32, dtype=F64)
    attn_mask = torch.triu(torch.ones(8, 8, dtype=torch.bool), diagonal=1)  # torch: True = blocked
    ref, _ = t(x, x, x, attn_mask=attn_mask)
    torch.testing.assert_close(m(x, mask=causal).out, ref, atol=1e-10, rtol=0)


def test_sequence_first_layout_matches_torch():
    t, m = torch_pair(batch_first=False)
    x = torch.randn(6, 2, 32, dtype=F64)  # (L, N, E)
    ref, _ = t(x, x, x)
    torch.testing.assert_close(m(x).out, ref, atol=1e-10, rtol=0)


def test_to_torch_round_trip():
    m = MultiHeadAttention(32, 4, dtype=F64).eval()
    t = m.to_torch().eval()
    x = torch.randn(2, 5, 32, dtype=F64)
    torch.testing.assert_close(t(x, x, x)[0], m(x).out, atol=1e-10, rtol=0)


def test_to_torch_refuses_what_torch_lacks():
    with pytest.raises(HeadwiseError, match="GQA"):
        MultiHeadAttention(32, 4, num_kv_heads=2).to_torch()
    with pytest.raises(HeadwiseError, match="mask"):
        MultiHeadAttention(32, 4, mask=causal).to_torch()


# -- equivalences ----------------------------------------------------------------------


def test_single_head_equals_plain_attention_forward_and_backward():
    m = MultiHeadAttention(16, 1, dtype=F64)
    x = torch.randn(2, 6, 16, dtype=F64, requires_grad=True)
    out = m(x).out
    wq, wk, wv = m.in_proj_weight.split(16)
    bq, bk, bv = m.in_proj_bias.split(16)
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1) @ v
    plain = m.out_proj(plain)
    torch.testing.assert_close(out, plain, atol=1e-12, rtol=0)
    g1 = torch.autograd.grad(out.sum(), (x, m.in_proj_weight))
    g2 = torch.autograd.grad(plain.sum(), (x, m.in_proj_weight))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_gqa_equals_mha_with_repeated_kv_weights():
    g = MultiHeadAttention(32, 4, num_kv_heads=2, dtype=F64)
    m = MultiHeadAttention(32, 4, dtype=F64)
    wq, wk, wv = g.in_proj_weight.split([32, 16, 16])
    rep = lambda w: w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)  # noqa: E731
    with torch.no_grad():
        m.in_proj_weight.copy_(torch.cat([wq, rep(wk), rep(wv)]))
        m.out_proj.load_state_dict(g.out_proj.state_dict())
    x = torch.randn(2, 7, 32, dtype=F64)
    torch.testing.assert_close(g(x).out, m(x).out, atol=1e-12, rtol=0)


def test_per_head_windows_module_mask():
    m = MultiHeadAttention(32, 4, mask=per_head_windows([1, 2, 4, None]), dtype=F64)
    x = torch.randn(1, 9, 32, dtype=F64)
    w = m(x, need_weights=True).weights[0]
    assert torch.all(w[0] == torch.eye(9, dtype=F64))  # window 1: each token only itself
    lower = torch.ones(9, 9, dtype=torch.bool).tril()
    assert torch.all(w[3][~lower] == 0) and torch.all(w[3][lower] > 0)  # None: plain causal


def test_gate_zero_equals_pruned_head():
    m = MultiHeadAttention(32, 4, dtype=F64)
    x = torch.randn(2, 5, 32, dtype=F64)
    with torch.no_grad():
        m.head_gates[2] = 0
    gated = m(x).out
    m.prune_heads([2])
    assert m.num_heads == 3 and m.in_proj_weight.shape == (72, 32)
    torch.testing.assert_close(m(x).out, gated, atol=1e-12, rtol=0)


def test_prune_gqa_group():
    m = MultiHeadAttention(32, 4, num_kv_heads=2, dtype=F64)
    x = torch.randn(2, 5, 32, dtype=F64)
    with torch.no_grad():
        m.head_gates[2:] = 0
    gated = m(x).out
    with pytest.raises(HeadwiseError, match="whole groups"):
        m.prune_heads([2])
    m.prune_heads([2, 3])
    assert (m.num_heads, m.num_kv_heads) == (2, 1)
    torch.testing.assert_close(m(x).out, gated, atol=1e-12, rtol=0)


def test_head_gates_give_gradient_importance():
    m = MultiHeadAttention(16, 4, dtype=F64)
    m.head_gates.requires_grad_(True)
    x = torch.randn(2, 5, 16, dtype=F64)
    loss = m(x).out.pow(2).sum()
    (g,) = torch.autograd.grad(loss, m.head_gates)
    eps = 1e-6
    for h in range(4):
        with torch.no_grad():
            m.head_gates[h] += eps
            up = m(x).out.pow(2).sum()
            m.head_gates[h] -= 2 * eps
            down = m(x).out.pow(2).sum()
            m.head_gates[h] += eps
        assert abs((up - down) / (2 * eps) - g[h]) < 1e-6


def test_module_stats_come_from_tiled():
    m = MultiHeadAttention(32, 4, mask=sliding_window(3))
    res = m(torch.randn(2, 10, 32), need_stats=True, backend="tiled")
    assert res.backend == "tiled" and res.stats.entropy.shape == (2, 4, 10)
    assert float(res.stats.entropy.max()) <= math.log(3) + 1e-5


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(embed_dim=30, num_heads=4), "embed_dim"),
        (dict(embed_dim=32, num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(embed_dim=32, num_heads=0), "num_heads"),
        (dict(embed_dim=32, num_heads=4, dropout=1.5), "dropout"),
    ],
)
def test_constructor_errors(kwargs, name):
    with pytest.raises(HeadwiseError, match=name):
        MultiHeadAttention(**kwargs)


def test_forward_errors():
    m = MultiHeadAttention(32, 4, kdim=16, vdim=16)
    x = torch.randn(2, 5, 32)
    with pytest.raises(HeadwiseError, match="query"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(HeadwiseError, match="key"):
        m(x, torch.randn(2, 7, 32), torch.randn(2, 7, 16))
    with pytest.raises(HeadwiseError, match="value"):
        m(x, torch.randn(2, 7, 16), torch.randn(2, 6, 16))
    kv = torch.randn(2, 7, 16)
    with pytest.raises(HeadwiseError, match="key_padding_mask"):
        m(x, kv, kv, key_padding_mask=torch.zeros(2, 7))
    with pytest.raises(HeadwiseError, match="key_padding_mask"):
        m(x, kv, kv, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    gaps = torch.zeros(2, 7, dtype=torch.bool)
    gaps[0, 2] = True
    with pytest.raises(HeadwiseError, match="right padding"):
        m(x, kv, kv, key_padding_mask=gaps)


# -- hyperbolic --------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["tangent", "einstein"])
def test_hyperbolic_tiled_matches_reference_with_grads(aggregation):
    m = HyperbolicAttention(16, 2, learn_curvature=True, aggregation=aggregation, dtype=F64)
    x = torch.randn(2, 6, 16, dtype=F64)
    results = {}
    for backend in ("reference", "tiled"):
        m.zero_grad()
        y = m(x, backend=backend)
        y.pow(2).sum().backward()
        results[backend] = (y.detach(), [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(results["tiled"][0], results["reference"][0], atol=1e-12, rtol=0)
    for a, b in zip(results["tiled"][1], results["reference"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert m.log_curvature.grad is not None and m.log_curvature.grad.abs() > 0


def test_hyperbolic_tends_to_euclidean_distance_attention():
    m = HyperbolicAttention(16, 2, curvature=1e-8, dtype=F64)
    x = torch.randn(2, 6, 16, dtype=F64) * 0.3
    q, k, v = m.qkv(x).view(2, 6, 3, 2, 8).permute(2, 0, 3, 1, 4)
    # Flat limit: distance 2|q - k|, values unchanged, plain weighted mean.
    s = -2 * torch.cdist(q, k)
    flat = torch.softmax(s, dim=-1) @ v
    expected = m.out_proj(flat.transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)


def test_hyperbolic_is_finite_near_and_beyond_the_boundary():
    m = HyperbolicAttention(16, 2, curvature=2.0, learn_curvature=True, dtype=torch.float32)
    for scale in (1e-6, 1.0, 1e3, 1e6):
        x = torch.randn(2, 6, 16) * scale
        y = m(x)
        y.sum().backward()
        assert torch.isfinite(y).all()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        m.zero_grad()


def test_points_stay_inside_the_ball():
    from headwise.scores import expmap0

    for c in (0.1, 1.0, 5.0):
        u = torch.randn(100, 8) * torch.logspace(-3, 6, 100).unsqueeze(1)
        x = expmap0(u, c)
        assert torch.all(x.norm(dim=-1) < 1 / math.sqrt(c))


def test_hyperbolic_gradcheck():
    m = HyperbolicAttention(4, 2, learn_curvature=True, dtype=F64)
    x = torch.randn(1, 3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x, backend="tiled"), (x,))


def test_hyperbolic_errors():
    with pytest.raises(HeadwiseError, match="curvature"):
        HyperbolicAttention(16, 2, curvature=0.0)
    with pytest.raises(HeadwiseError, match="curvature"):
        HyperbolicAttention(16, 2, curvature=-1.0)
    with pytest.raises(HeadwiseError, match="aggregation"):
        HyperbolicAttention(16, 2, aggregation="mean")


# -- mixture of experts ------------------------------------------------------------------


def test_one_expert_top1_equals_mha():
    moe = MoEAttention(16, num_experts=1, heads_per_expert=4, mask=causal, dtype=F64)
    x = torch.randn(3, 11, 16, dtype=F64)
    torch.testing.assert_close(moe(x), moe.experts[0](x, mask=causal).out, atol=1e-12, rtol=0)
    assert moe.last_dropped == 0


@pytest.mark.parametrize("k,capacity_factor", [(1, 0.5), (2, 0.5), (2, 1.0)])
def test_capacity_drops_exactly_as_documented(k, capacity_factor):
    moe = MoEAttention(
        16, num_experts=4, heads_per_expert=2, experts_per_token=k, capacity_factor=capacity_factor, dtype=F64
    )
    x = torch.randn(3, 13, 16, dtype=F64)
    y = moe(x)
    _, chosen, gates = moe.route(x)
    full = [e(x).out for e in moe.experts]
    C = moe.capacity(13)
    expected, dropped = torch.zeros_like(x), 0
    for n in range(3):
        used = [0] * 4
        for r in range(k):  # every first choice claims a place before any second choice
            for pos in range(13):
                e = int(chosen[n, pos, r])
                if used[e] < C:
                    used[e] += 1
                    expected[n, pos] += gates[n, pos, r] * full[e][n, pos]
                else:
                    dropped += 1
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    assert moe.last_dropped == dropped > 0 if capacity_factor < 1 else True


def test_aux_loss_uniform_router_is_one_and_skew_is_higher():
    moe = MoEAttention(16, num_experts=4, heads_per_expert=2, dtype=F64)
    x = torch.randn(2, 8, 16, dtype=F64)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(x)
    assert abs(float(moe.aux_loss.detach()) - 1.0) < 1e-12
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 5.0 * x.mean(dim=(0, 1)).sign()
    moe(x)
    assert float(moe.aux_loss.detach()) > 1.5


def test_routing_deterministic_in_eval_and_jittered_in_training():
    moe = MoEAttention(16, num_experts=4, heads_per_expert=2, jitter=0.5, dtype=F64)
    x = torch.randn(2, 8, 16, dtype=F64)
    moe.eval()
    assert torch.equal(moe(x), moe(x))
    moe.train()
    outs = [moe.route(x)[0] for _ in range(3)]
    assert not torch.equal(outs[0], outs[1])


def test_moe_errors():
    with pytest.raises(HeadwiseError, match="experts_per_token"):
        MoEAttention(16, num_experts=2, experts_per_token=3)
    with pytest.raises(HeadwiseError, match="capacity_factor"):
        MoEAttention(16, capacity_factor=0)


def test_attend_is_the_only_softmax():
    # The modules compose attend(); a module's weights equal attend's on its projections.
    m = MultiHeadAttention(16, 2, dtype=F64)
    x = torch.randn(1, 4, 16, dtype=F64)
    q, k, v = m.project(x, None, None)
    torch.testing.assert_close(m(x, need_weights=True).weights, attend(q, k, v, need_weights=True).weights)


@pytest.mark.parametrize(("heads", "kv_heads", "bias"), [(4, 4, True), (4, 2, True), (4, 1, False)])
def test_folded_cross_attention_equals_the_projected_forward(heads, kv_heads, bias):
    """Moving the key projection onto the query and the value projection after the sum is exact."""
    mha = MultiHeadAttention(16, heads, num_kv_heads=kv_heads, bias=bias, dtype=torch.float64).eval()
    with torch.no_grad():
        mha.head_gates.copy_(torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64))
        if bias:
            mha.in_proj_bias.normal_()
    q, tokens = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 7, 16, dtype=torch.float64)
    want = mha(q[:, None], tokens, tokens).out[:, 0]
    got = mha.folded_cross_attention(q, tokens)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_folded_cross_attention_rejects_masks_and_bad_shapes():
    with pytest.raises(HeadwiseError, match="folded_cross_attention"):
        MultiHeadAttention(8, 2, mask=causal).folded_cross_attention(torch.randn(1, 8), torch.randn(1, 3, 8))
    with pytest.raises(HeadwiseError, match="query, tokens"):
        MultiHeadAttention(8, 2).folded_cross_attention(torch.randn(2, 8), torch.randn(1, 3, 8))
