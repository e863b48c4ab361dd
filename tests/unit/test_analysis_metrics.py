"""Head metrics on hand-built weights with known answers; cache filters; rollout; gates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from headwise import attend, causal
from headwise.analysis import AttentionCache
from headwise.analysis import metrics as M
from headwise.analysis.importance import HeadGates, ablation_importance, gradient_importance, prune_iteratively
from headwise.analysis.rollout import rollout
from headwise.errors import HeadwiseError
from headwise.modules import MultiHeadAttention


def test_uniform_and_one_hot_rows():
    S = 7
    uniform = torch.full((3, 5, S), 1 / S, dtype=torch.float64)
    one_hot = torch.zeros(3, 5, S, dtype=torch.float64)
    one_hot[..., 2] = 1
    assert torch.allclose(M.entropy(uniform), torch.full((3, 5), math.log(S), dtype=torch.float64))
    assert torch.allclose(M.normalized_entropy(uniform), torch.ones(3, 5, dtype=torch.float64))
    assert torch.allclose(M.gini(uniform), torch.zeros(3, 5, dtype=torch.float64), atol=1e-12)
    assert torch.equal(M.entropy(one_hot), torch.zeros(3, 5, dtype=torch.float64))
    assert torch.allclose(M.gini(one_hot), torch.full((3, 5), (S - 1) / S, dtype=torch.float64))
    assert torch.allclose(M.sparsity(one_hot), torch.full((3, 5), (S - 1) / S, dtype=torch.float64))
    assert torch.equal(M.max_weight(one_hot), torch.ones(3, 5, dtype=torch.float64))
    # Clark smoothing: a one-hot row gets a small positive entropy, below that of uniform.
    smoothed = M.entropy(one_hot, smooth=True)
    assert bool((smoothed > 0).all()) and bool((smoothed < 0.01).all())


def test_entropy_matches_streaming_stats_of_attend():
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    res = attend(q, k, v, mask=causal, need_weights=True, need_stats=True, backend="reference")
    assert torch.allclose(M.entropy(res.weights), res.stats.entropy, atol=1e-10)
    assert torch.allclose(M.max_weight(res.weights), res.stats.max_weight)


def test_padding_aware_metrics_equal_unpadded():
    w = torch.softmax(torch.randn(2, 4, 5, dtype=torch.float64), -1)
    padded = nn.functional.pad(w, (0, 3))
    assert torch.allclose(M.gini(padded, key_counts=5), M.gini(w))
    assert torch.allclose(M.sparsity(padded, 0.1, key_counts=5), M.sparsity(w, 0.1))
    assert torch.allclose(M.normalized_entropy(padded, key_counts=5), M.normalized_entropy(w))


def test_distance_and_attention_to():
    eye = torch.eye(4)
    prev = torch.zeros(4, 4)
    prev[0, 0] = 1
    prev[torch.arange(1, 4), torch.arange(0, 3)] = 1
    assert torch.equal(M.mean_distance(eye), torch.zeros(4))
    assert torch.equal(M.mean_distance(prev), torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert torch.equal(M.attention_to(prev, [0]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(M.attention_to(prev, [0, -1, 3]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    with pytest.raises(HeadwiseError, match="positions"):
        M.attention_to(prev, [4])


def test_js_and_cosine_matrices():
    a = torch.softmax(torch.randn(6, 6), -1)
    b = torch.eye(6)
    heads = torch.stack([a, a, b])
    js = M.js_matrix(heads)
    cos = M.cosine_matrix(heads)
    assert js[0, 1] == 0 and torch.equal(torch.diagonal(js), torch.zeros(3))
    assert torch.allclose(cos[0, 1], torch.tensor(1.0))
    assert torch.equal(js, js.T) and bool((js[0, 2] > 0.1) & (js[0, 2] <= 6 * math.log(2) + 1e-6))
    # Disjoint supports: JS is ln 2 per row, the maximum.
    c = torch.roll(torch.eye(6), 1, dims=1)
    assert torch.allclose(M.js_matrix(torch.stack([b, c]))[0, 1], torch.tensor(6 * math.log(2)))
    assert torch.allclose(M.js_matrix(torch.stack([b, c]), reduction="mean")[0, 1], torch.tensor(math.log(2)))
    summary = M.diversity_summary(js, cos, ["x", "y", "z"])
    assert summary["most_similar"][:2] == ("x", "y")


def test_pattern_classifier():
    L = 8
    vertical = torch.zeros(L, L)
    vertical[:, 0] = 1
    diag = torch.eye(L)
    mixed = 0.5 * vertical + 0.5 * torch.roll(torch.eye(L), -1, dims=1)
    seg = torch.tensor([0] * 8 + [1] * 8)  # blocks wider than the +-1 band
    block = (seg.view(16, 1) == seg.view(1, 16)).float() / 8
    assert M.classify_pattern(vertical, special=[0, L - 1]) == "vertical"
    assert M.classify_pattern(diag) == "diagonal"
    assert M.classify_pattern(mixed, special=[0]) == "vertical+diagonal"
    assert M.classify_pattern(block, segments=seg) == "block"
    assert M.classify_pattern(block) == "heterogeneous"  # one segment: block is not decidable


def test_cache_filters_and_modes():
    w = torch.softmax(torch.randn(2, 4, 3, 3), -1)
    cache = AttentionCache(layers=[1], heads=[0, 3])
    cache.store(0, weights=w)
    cache.store(1, weights=w)
    assert cache.keys() == [(1, 0), (1, 3)]
    assert torch.equal(cache.layer_weights(1), w[:, [0, 3]])
    assert cache.nbytes() == 2 * 2 * 9 * 4
    stats = attend(torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8), need_stats=True).stats
    sc = AttentionCache(heads=[2], mode="stats")
    sc.store(0, stats=stats)
    assert sc.keys() == [(0, 2)] and torch.equal(sc[0, 2].entropy, stats.entropy[:, 2])
    with pytest.raises(HeadwiseError, match="mode"):
        AttentionCache(mode="all")
    with pytest.raises(HeadwiseError, match="key"):
        cache[0, 0]


def test_rollout_identity_and_chain():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    assert torch.allclose(rollout([eye] * 4), torch.eye(5).expand(2, 5, 5))
    w1 = torch.softmax(torch.randn(1, 2, 5, 5, dtype=torch.float64), -1)
    w2 = torch.softmax(torch.randn(1, 2, 5, 5, dtype=torch.float64), -1)
    a1 = 0.5 * w1.mean(1) + 0.5 * torch.eye(5, dtype=torch.float64)
    a2 = 0.5 * w2.mean(1) + 0.5 * torch.eye(5, dtype=torch.float64)
    r = rollout([w1, w2])
    assert torch.allclose(r, a2 @ a1) and torch.allclose(r.sum(-1), torch.ones(1, 5, dtype=torch.float64))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = MultiHeadAttention(16, 4, mask=causal)
        self.b = MultiHeadAttention(16, 4)

    def forward(self, x):
        return self.b(x + self.a(x).out).out


def test_gating_equals_head_gates_and_pruning():
    torch.manual_seed(0)
    model = TwoLayers().double().eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    g = torch.ones(2, 4, dtype=torch.float64)
    g[0, 1] = g[1, 3] = 0
    with HeadGates(model, g):
        gated = model(x)
    model.a.head_gates.data[1] = 0
    model.b.head_gates.data[3] = 0
    assert torch.allclose(gated, model(x), atol=1e-12)
    model.a.prune_heads([1])
    model.b.prune_heads([3])
    assert torch.allclose(gated, model(x), atol=1e-12)


def test_gradient_importance_equals_finite_differences():
    torch.manual_seed(1)
    model = TwoLayers().double().eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    target = torch.randn(2, 6, 16, dtype=torch.float64)

    def loss_fn(m, batch):
        return ((m(batch) - target) ** 2).mean()

    imp = gradient_importance(model, [x], loss_fn)
    eps = 1e-6
    fd = torch.zeros(2, 4, dtype=torch.float64)
    for lay in range(2):
        for h in range(4):
            vals = []
            for sign in (1, -1):
                g = torch.ones(2, 4, dtype=torch.float64)
                g[lay, h] += sign * eps
                with torch.no_grad(), HeadGates(model, g):
                    vals.append(float(loss_fn(model, x)))
            fd[lay, h] = abs(vals[0] - vals[1]) / (2 * eps)
    assert torch.allclose(imp.raw, fd, rtol=1e-6, atol=1e-10)
    assert torch.allclose(imp.normalized.norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_ablation_importance_zero_and_mean():
    torch.manual_seed(2)
    model = TwoLayers().double().eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    base = model(x).detach()

    def metric():
        return float(((model(x) - base) ** 2).sum())

    zero = ablation_importance(model, metric, "zero")
    assert zero.shape == (2, 4) and bool((zero > 0).all())  # removing any head moves the output
    from headwise.analysis.importance import head_means

    means = head_means(model, lambda: model(x))
    mean = ablation_importance(model, metric, "mean", means=means)
    assert bool((mean > 0).all()) and not torch.allclose(mean, zero)
    with pytest.raises(HeadwiseError, match="means"):
        ablation_importance(model, metric, "mean")


def test_prune_iteratively_removes_least_important_and_stops_at_tolerance():
    score = torch.arange(20, dtype=torch.float64).view(2, 10)

    def evaluate(g):
        return float((g * score).sum() / score.sum())

    curve = prune_iteratively(2, 10, lambda g: score, evaluate, step=0.1, tolerance=0.2)
    first = curve.points[1]
    assert first["heads_kept"] == 18 and sorted(first["pruned"]) == [(0, 0), (0, 1)]
    assert curve.points[-1]["metric"] < 1 - 0.2 <= curve.points[-2]["metric"]
    assert "tolerance" in curve.stopped_because
