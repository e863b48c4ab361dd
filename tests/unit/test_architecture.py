"""EnhancerConfig: layers, feed-forward blocks and mechanism options, their paths, footprint and checks."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from headwise import HeadwiseError
from headwise.memory.architecture import EnhancerConfig, footprint
from headwise.memory.enhancer import QueryEnhancer, load_enhancer
from headwise.memory.train import make_model


def _inputs(n=4, K=6, d=32, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    cand = F.normalize(torch.randn(n, K, d, generator=g, dtype=dtype), dim=-1)
    scores = torch.rand(n, K, generator=g, dtype=dtype).sort(dim=1, descending=True).values
    return q, cand, scores


def _scramble(model, seed=1):
    """Random weights everywhere (the zero-initialised mix included), so every layer reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_the_report_architecture_is_written_literally():
    cfg = EnhancerConfig(heads=8, hidden=256, dropout=0.1, layers=3)
    enh = cfg.build(384, seed=0)
    assert (enh.heads, enh.hidden, enh.layers, enh.dropout) == (8, 256, 3, 0.1)
    assert len(enh.attention_layers()) == 3 and len(enh.ffn) == 3
    d, h = 384, 256
    mha = sum(p.numel() for p in enh.attn.parameters())
    ffn = 2 * d + d * h + h + h * d + d  # LayerNorm, up, down
    base = 2 * (d * d + d) + 32 * d + (2 * d + d)  # adapter, mix, rank embedding, score features
    fp = footprint(enh)
    assert fp["parameters"] == base + 3 * mha + 3 * ffn
    assert fp["bytes"] == 4 * fp["parameters"] and fp["bytes_per_vector_at_100k"] == fp["bytes"] / 100_000


def test_one_layer_without_feed_forward_keeps_the_saved_layout():
    # Weights saved before layers existed name layer 1 "attn" and have no other attention keys.
    keys = set(EnhancerConfig(heads=4, candidates=6).build(32).state_dict())
    assert not any(k.startswith(("more_attn", "ffn")) for k in keys) and "attn.out_proj.weight" in keys


@pytest.mark.parametrize("mechanism", ["multi-head", "hyperbolic", "moe"])
@pytest.mark.parametrize("layers,hidden", [(1, 0), (2, 0), (3, 16)])
def test_untrained_is_identity_and_every_layer_learns(mechanism, layers, hidden):
    enh = EnhancerConfig(mechanism=mechanism, heads=4, candidates=6, layers=layers, hidden=hidden).build(32, seed=0)
    q, cand, scores = (x.float() for x in _inputs())
    assert torch.allclose(enh(q, cand, scores), q, atol=1e-6)  # the read-out enters through a zero projection
    _scramble(enh).train()
    enh(q, cand, scores).square().sum().backward()
    for layer in enh.attention_layers():
        grads = [p.grad for p in layer.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    for block in enh.ffn:
        assert block.up.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layers,hidden", [(2, 0), (3, 16)])
def test_serving_path_matches_training_path(layers, hidden):
    """Without autograd, each cross-attention layer runs folded; it must equal the autograd forward (float64)."""
    enh = _scramble(EnhancerConfig(heads=4, candidates=6, layers=layers, hidden=hidden).build(32).double()).eval()
    q, cand, scores = _inputs()
    with torch.no_grad():
        served = enh(q, cand, scores)
    trained = enh(q, cand, scores).detach()
    torch.testing.assert_close(served, trained, rtol=1e-12, atol=1e-12)
    assert enh.serving_plan() is None  # the numpy plan folds one layer without a feed-forward block only
    out = enh.float().refine(q.float().numpy(), cand.float().numpy(), scores.float().numpy())
    torch.testing.assert_close(torch.from_numpy(out), served.float(), rtol=1e-5, atol=1e-5)


def test_dropout_reaches_the_feed_forward_blocks():
    enh = _scramble(EnhancerConfig(heads=4, candidates=6, hidden=16, dropout=0.5).build(32)).train()
    q, cand, scores = (x.float() for x in _inputs())
    torch.manual_seed(0)
    a = enh(q, cand, scores)
    torch.manual_seed(1)
    assert not torch.allclose(a, enh(q, cand, scores))
    enh.eval()
    assert torch.equal(enh(q, cand, scores), enh(q, cand, scores))


def test_config_round_trips_through_save(tmp_path):
    cfg = EnhancerConfig(mechanism="moe", heads=8, hidden=16, layers=2, candidates=6, experts=2, experts_per_token=2,
                         capacity_factor=2.0, aux_weight=0.05)  # fmt: skip
    enh = _scramble(cfg.build(32, seed=0)).eval()
    enh.save(tmp_path)
    back = load_enhancer(tmp_path)
    assert back.config() == enh.config() and back.options["experts"] == 2 and back.aux_weight == 0.05
    q, cand, scores = (x.float() for x in _inputs())
    with torch.no_grad():
        torch.testing.assert_close(back(q, cand, scores), enh(q, cand, scores))
    hyp = make_model("hyperbolic", 32, heads=4, candidates=6, curvature=0.5, clip=2.0)
    assert hyp.attn.clip == 2.0 and hyp.config()["curvature"] == 0.5
    enh.train()(q, cand, scores)
    assert float(enh.aux_loss.detach()) > 0  # summed over both MoE layers


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"layers": 0}, "layers"),
        ({"layers": 2.5}, "layers"),
        ({"hidden": -1}, "hidden"),
        ({"experts": 3, "mechanism": "moe"}, "experts"),
        ({"experts": 2, "experts_per_token": 3, "mechanism": "moe"}, "experts_per_token"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"curvature": float("nan")}, "curvature"),
        ({"clip": -1.0}, "clip"),
        ({"aux_weight": -0.1}, "aux_weight"),
        ({"mechanism": "flash", "layers": 2}, "layers, hidden"),
    ],
)
def test_bad_options_name_the_argument(kwargs, name):
    with pytest.raises(HeadwiseError, match=f"^{name}"):
        QueryEnhancer(32, heads=4, **kwargs)


def test_make_model_refuses_unknown_options():
    with pytest.raises(HeadwiseError, match="options"):
        make_model("multi-head", 32, heads=4, depth=3)
