"""Retrieval-head metrics: how each head of an enhancer's read-out spreads over its K candidates.

The multi-head enhancer's adapted query attends to its K first-pass candidates with H heads.
Per head, over the queries given: the mean entropy (nats) and normalised entropy of that
attention, its Gini coefficient, its sparsity (share of weights below 1/(4K)), its largest
weight and the mean rank of the candidate it weights most; across heads, the mean
Jensen-Shannon distance and cosine between their maps (head diversity). The definitions are
those of :mod:`headwise.analysis.metrics`, used for the heads of transformers too.

Shapes: queries (n, d), cand_vectors (n, K, d), cand_scores (n, K); weights (H, n, K).

Example:
    >>> import torch
    >>> from headwise.memory.enhancer import QueryEnhancer
    >>> enh = QueryEnhancer(16, heads=4, candidates=6).eval()
    >>> q = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    >>> c = torch.nn.functional.normalize(torch.randn(5, 6, 16), dim=-1)
    >>> m = retrieval_head_metrics(enh, q, c, torch.rand(5, 6))
    >>> len(m["heads"]), sorted(m["heads"][0])[:3], 0 <= m["diversity"]["mean_js"] <= 0.7
    (4, ['entropy', 'gini', 'max_weight'], True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from headwise.analysis import metrics as hm
from headwise.errors import bad_argument


def candidate_attention(enhancer: Any, queries: Any, cand_vectors: Any, cand_scores: Any) -> Tensor:
    """The read-out's attention weights (H, n, K) over the candidates (a gated enhancer: its inner's)."""
    from headwise.memory.enhancer import QueryEnhancer, _as_tensor
    from headwise.memory.gate import GatedEnhancer

    inner = enhancer.inner if isinstance(enhancer, GatedEnhancer) else enhancer
    if not isinstance(inner, QueryEnhancer) or inner.mechanism != "multi-head":
        raise bad_argument("enhancer", "a multi-head QueryEnhancer (or one gated)", type(inner).__name__)
    q, c, s = (x if isinstance(x, Tensor) else _as_tensor(x) for x in (queries, cand_vectors, cand_scores))
    K = inner.candidates
    c, s = c[:, :K], s[:, :K]
    was = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            qa = q + inner.adapter(q)
            tok = inner.tokens(c, s)
            w = inner.attn(qa.unsqueeze(1), tok, tok, need_weights=True).weights  # (n, H, 1, K)
    finally:
        inner.train(was)
    return w[:, :, 0].transpose(0, 1).double()


def retrieval_head_metrics(enhancer: Any, queries: Any, cand_vectors: Any, cand_scores: Any) -> dict[str, Any]:
    """Per-head means of the metrics of the module docstring, and the diversity across heads."""
    w = candidate_attention(enhancer, queries, cand_vectors, cand_scores)  # (H, n, K)
    H, n, K = w.shape
    rank_of_top = w.argmax(dim=-1).double() + 1
    heads = []
    for h in range(H):
        wh = w[h]
        heads.append({
            "entropy": float(hm.entropy(wh).mean()),
            "normalized_entropy": float(hm.normalized_entropy(wh).mean()),
            "gini": float(hm.gini(wh).mean()),
            "sparsity": float(hm.sparsity(wh, threshold=1 / (4 * K)).mean()),
            "max_weight": float(hm.max_weight(wh).mean()),
            "top_rank": float(rank_of_top[h].mean()),
        })  # fmt: skip
    maps = w.unsqueeze(2)  # (H, n, 1, K): one "row" per query
    diversity = hm.diversity_summary(hm.js_matrix(maps, reduction="mean"), hm.cosine_matrix(maps)) if H > 1 else {}
    return {"queries": n, "candidates": K, "heads": heads, "diversity": diversity}
