"""The enhancer's serving path (no grad: folded read-out) equals its training path."""

from __future__ import annotations

import torch

from headwise.memory.enhancer import QueryEnhancer


def test_no_grad_readout_equals_the_training_readout():
    enh = QueryEnhancer(32, heads=4, candidates=5).double().eval()
    with torch.no_grad():
        for p in enh.parameters():
            p.normal_(std=0.2)
    q = torch.nn.functional.normalize(torch.randn(6, 32, dtype=torch.float64), dim=-1)
    cand = torch.nn.functional.normalize(torch.randn(6, 5, 32, dtype=torch.float64), dim=-1)
    scores = torch.rand(6, 5, dtype=torch.float64)
    with torch.enable_grad():
        train_path = enh(q, cand, scores)
    with torch.no_grad():
        serve_path = enh(q, cand, scores)
    assert torch.allclose(serve_path, train_path, atol=1e-12, rtol=0)
    assert not torch.allclose(serve_path, q)  # the weights do something
