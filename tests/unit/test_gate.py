"""The do-no-harm gate (memory.gate): pseudo-queries, the gated enhancer, its training and saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from headwise import HeadwiseError
from headwise.memory.enhancer import LinearAdapter, QueryEnhancer, load_enhancer
from headwise.memory.gate import GateConfig, GateData, GatedEnhancer, pseudo_queries, train_gate


def test_pseudo_queries_are_spans_of_their_documents():
    docs = ["dog, domestic dog: a member of the genus Canis kept as a pet", "tiny", "cat: a small feline mammal"]
    pairs = pseudo_queries(docs, 5, seed=1, exclude=[2])
    assert [d for _, d in pairs] == [0]  # doc 1 is too short, doc 2 excluded: only one usable document
    text, _ = pairs[0]
    gloss = docs[0].split(": ", 1)[1]
    assert text in gloss and "domestic" not in text and len(text.split()) >= 4
    assert pseudo_queries(docs, 5, seed=1, exclude=[2]) == pairs  # seeded
    with pytest.raises(HeadwiseError, match="n"):
        pseudo_queries(docs, 0)


def _trained_linear(dim: int, seed: int) -> tuple[LinearAdapter, torch.Tensor]:
    """A linear adapter whose map is a fixed rotation R: refine(q) = R q."""
    g = torch.Generator().manual_seed(seed)
    R = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0].float()
    ad = LinearAdapter(dim)
    with torch.no_grad():
        ad.linear.weight.copy_(R - torch.eye(dim))
    return ad.eval(), R


def test_gate_mixes_between_raw_and_inner():
    ad, R = _trained_linear(8, 0)
    gated = GatedEnhancer(ad, hidden=4, initial_gate=0.25)
    q = F.normalize(torch.randn(5, 8), dim=-1)
    r = ad(q)
    want = F.normalize(0.75 * q + 0.25 * r, dim=-1)
    cands, scores = F.normalize(torch.randn(5, 8, 8), dim=-1), torch.rand(5, 8)
    assert gated.candidates == 8 and gated.uses_candidates  # the gate reads first-pass scores
    assert torch.allclose(gated(q, cands, scores), want, atol=1e-6)
    assert np.allclose(gated.refine(q.numpy(), cands.numpy(), scores.numpy()), want.numpy(), atol=1e-6)
    assert np.allclose(gated.refine_unchecked(q.numpy(), cands.numpy(), scores.numpy()), want.numpy(), atol=1e-6)
    with pytest.raises(HeadwiseError, match="initial_gate"):
        GatedEnhancer(ad, initial_gate=1.0)
    with pytest.raises(HeadwiseError, match="inner"):
        GatedEnhancer(torch.nn.Linear(8, 8))


def test_gated_attention_enhancer_round_trip(tmp_path):
    enh = QueryEnhancer(16, heads=4, candidates=5).eval()
    with torch.no_grad():
        enh.mix.weight.normal_(std=0.3)
    gated = GatedEnhancer(enh, hidden=8)
    with torch.no_grad():
        gated.gate_out.weight.normal_()
    q = F.normalize(torch.randn(4, 16), dim=-1)
    cands = F.normalize(torch.randn(4, 5, 16), dim=-1)
    scores = torch.rand(4, 5).sort(dim=1, descending=True).values
    want = gated(q, cands, scores)
    got = gated.refine(q.numpy(), cands.numpy(), scores.numpy())  # the inner's folded serving plan, then the gate
    assert np.allclose(got, want.detach().numpy(), atol=1e-5)
    gated.save(tmp_path / "g")
    back = load_enhancer(tmp_path / "g")
    assert isinstance(back, GatedEnhancer) and isinstance(back.inner, QueryEnhancer)
    assert np.allclose(back.refine(q.numpy(), cands.numpy(), scores.numpy()), got, atol=1e-6)
    assert back.first_pass_queries(q.numpy()).shape == (4, 16)


def test_training_closes_the_gate_where_the_inner_move_hurts():
    """Style 0 needs the inner map (q = R^T d), style 1 is already right (q = d + noise): g learns which."""
    dim, n_docs = 8, 1000
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((n_docs, dim)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    ad, R = _trained_linear(dim, 1)
    targets = rng.integers(0, n_docs, size=1200)
    style = np.repeat([0, 1], 600)
    noise = 0.05 * rng.standard_normal((1200, dim)).astype(np.float32)
    moved = docs[targets] @ R.numpy()  # (R^T d)^T: the inner map sends it back to d
    q = np.where(style[:, None] == 0, moved, docs[targets]) + noise
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gated = GatedEnhancer(ad, hidden=16)
    data = GateData.build(gated, docs, q.astype(np.float32), [{int(t): 1} for t in targets], style)
    train_idx = np.concatenate([np.arange(0, 500), np.arange(600, 1100)])
    val_idx = np.concatenate([np.arange(500, 600), np.arange(1100, 1200)])
    cfg = GateConfig(steps=300, batch_size=64, lr=1e-2, eval_every=25, patience=10)
    records = train_gate(gated, data, docs, train_idx, val_idx, cfg)
    assert records[0]["step"] == 0 and records[-1]["step"] <= 300
    # g = 0.5 everywhere finds a quarter of the targets; g = 0 or g = 1 half of them.
    best = max(r["objective"] for r in records)
    assert best > records[0]["objective"] + 0.2
    with torch.no_grad():
        g = gated.gate(data.q, data.r, data.scores).squeeze(1).numpy()
    assert g[style == 0].mean() > 0.7 and g[style == 1].mean() < 0.3


def test_a_store_serves_a_gated_enhancer():
    """VectorMemory with a gated enhancer: its first pass, refine_unchecked and second pass agree with the pipeline."""
    from headwise.memory import VectorMemory
    from headwise.memory.evaluate import exact_search

    rng = np.random.default_rng(3)
    docs = rng.standard_normal((300, 16)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    enh = QueryEnhancer(16, heads=4, candidates=12).eval()
    with torch.no_grad():
        enh.mix.weight.normal_(std=0.3)
    gated = GatedEnhancer(enh, hidden=8).eval()
    with torch.no_grad():
        gated.gate_out.weight.normal_()
    mem = VectorMemory(16)
    mem.add(docs)
    mem.set_enhancer(gated)
    q = docs[:5] + 0.1 * rng.standard_normal((5, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, ids = mem.search(q, 5)
    s, first = exact_search(docs, gated.first_pass_queries(q), gated.candidates)
    refined = gated.refine(q, docs[first], s)
    want = exact_search(docs, refined / np.linalg.norm(refined, axis=1, keepdims=True), 5)[1]
    assert np.array_equal(ids, want)


def test_a_closed_gate_sends_the_query_to_the_fallback(tmp_path):
    ad, _ = _trained_linear(8, 0)
    fallback, _ = _trained_linear(8, 5)
    gated = GatedEnhancer(ad, hidden=4, initial_gate=0.25, fallback=fallback)
    q = F.normalize(torch.randn(5, 8), dim=-1)
    cands, scores = F.normalize(torch.randn(5, 8, 8), dim=-1), torch.rand(5, 8)
    want = F.normalize(0.75 * fallback(q) + 0.25 * ad(q), dim=-1)
    assert torch.allclose(gated(q, cands, scores), want, atol=1e-6)
    gated.save(tmp_path / "g")
    back = load_enhancer(tmp_path / "g")
    assert isinstance(back.fallback, LinearAdapter)
    assert np.allclose(back.refine(q.numpy(), cands.numpy(), scores.numpy()), want.numpy(), atol=1e-6)
    with pytest.raises(HeadwiseError, match="fallback"):
        GatedEnhancer(ad, fallback=LinearAdapter(4))
