"""Folded plans of trained enhancers: the same refined queries in about twenty array operations.

The torch enhancers are written for training (autograd, dropout, any batch). A served
query is one row, where the fixed cost of ~40 small torch operations outweighs their
arithmetic. In eval mode the enhancer's affine maps compose, so
:meth:`~headwise.memory.enhancer.QueryEnhancer.refine` runs a plan of precomputed
matrices instead:

- :class:`LinearPlan` (linear adapter): ``normalize(q (I + W)^T + b)``, one product.
- :class:`MultiHeadPlan` (``mechanism="multi-head"``): the adapter and the query projection
  share one (d, 2d) product; the key projection (and the 1/sqrt(d_h) scale) is applied to
  the query, ``u_h = W_k,h^T q_h`` (the key bias adds a constant per row, which softmax
  ignores); the tokens are attended unprojected; the value projection is applied after the
  weighted sum; the head gates, output projection and mixing layer are one (d, d) matrix with
  one bias. Same formula as :meth:`~headwise.modules.MultiHeadAttention.folded_cross_attention`,
  checked against the torch forward in the tests (float64: 1e-12).

A batch of at least ``TORCH_MIN_BATCH`` queries runs the multi-head plan with torch instead,
on views of the same arrays, in blocks (``MultiHeadPlan._refine_blocks``): numpy multiplies the
stacked per-query products one after another on one thread, torch's bmm uses every core.

Plans are built in float64 from the module's parameters and stored in float32 (or float64
for exact comparisons). They are a snapshot: the enhancer rebuilds its plan when any
parameter changes (see ``QueryEnhancer.serving_plan``).

Shape legend: q (n, d) queries, cand (n, K, d) candidate vectors, scores (n, K) their
first-pass scores, H heads of width d_h = d / H; refined queries (n, d).

Example:
    >>> import numpy as np, torch
    >>> from headwise.memory.enhancer import QueryEnhancer
    >>> enh = QueryEnhancer(32, heads=4, candidates=5).eval()
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((3, 32)).astype(np.float32)
    >>> cand, s = rng.standard_normal((3, 5, 32)).astype(np.float32), rng.random((3, 5)).astype(np.float32)
    >>> plan = MultiHeadPlan.from_enhancer(enh)
    >>> with torch.no_grad():
    ...     ref = enh(torch.from_numpy(q), torch.from_numpy(cand), torch.from_numpy(s)).numpy()
    >>> bool(np.allclose(plan.refine(q, cand, s), ref, atol=1e-5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from headwise.errors import bad_argument


def _np(t: torch.Tensor | None, dtype: type) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu", torch.float64).numpy().astype(dtype)


def _normalize(x: np.ndarray) -> np.ndarray:
    # F.normalize: x / max(|x|, 1e-12), so a zero row stays zero instead of NaN.
    norm = np.sqrt(np.einsum("nd,nd->n", x, x))[:, None]
    return x / np.maximum(norm, 1e-12)


@dataclass(frozen=True)
class LinearPlan:
    """``normalize(q @ matrix + bias)`` with matrix = (I + W)^T: the linear adapter, folded."""

    matrix: np.ndarray  # (d, d)
    bias: np.ndarray  # (d,)

    @classmethod
    def from_adapter(cls, adapter: Any, dtype: type = np.float32) -> LinearPlan:
        w = adapter.linear.weight.detach().to("cpu", torch.float64)
        eye = torch.eye(w.shape[0], dtype=torch.float64)
        return cls(_np((eye + w).T.contiguous(), dtype), _np(adapter.linear.bias, dtype))

    def refine(self, q: np.ndarray, cand: Any = None, scores: Any = None) -> np.ndarray:
        """q (n, d) -> refined (n, d); the candidates are not used."""
        return _normalize(q @ self.matrix + self.bias)


@dataclass(frozen=True)
class MultiHeadPlan:
    """The multi-head enhancer as matrices (see the module docstring for the algebra)."""

    heads: int
    in_matrix: np.ndarray  # (d, 2d): [adapter (I + A)^T | query projection composed with it]
    in_bias: np.ndarray  # (2d,)
    key_fold: np.ndarray  # (H, d_h, d): scale * W_k,h, applied to the query
    value_t: np.ndarray  # (H, d, d_h): W_v,h^T, applied after the weighted sum
    value_bias: np.ndarray  # (H, 1, d_h)
    out_matrix: np.ndarray  # (d, d): (mix.W @ out_proj.W @ diag(gates))^T
    out_bias: np.ndarray  # (d,)
    token_extra: np.ndarray  # (K + 1, d): rank embedding + score-feature bias per rank; last row
    # score_feat.W[:, 0] - W[:, 1], which multiplies each candidate's score
    value_top: np.ndarray  # (H, 1, d_h): score_feat.W[:, 1] @ value_t_h; times the row's top score
    # The batched path (_refine_blocks) carries the token terms through the head maps first:
    key_extra: np.ndarray  # (H, d_h, K + 1): key_fold_h @ token_extra^T, so u . t_j = q_h . key_extra_h
    value_extra: np.ndarray  # (H, K + 1, d_h): token_extra @ value_t_h

    @classmethod
    def from_enhancer(cls, enh: Any, dtype: type = np.float32) -> MultiHeadPlan:
        """Fold a ``QueryEnhancer(mechanism="multi-head")`` (its current parameters)."""
        if getattr(enh, "mechanism", None) != "multi-head":
            raise bad_argument("enh", "a QueryEnhancer with mechanism 'multi-head'", getattr(enh, "mechanism", enh))
        f64 = {"device": "cpu", "dtype": torch.float64}
        with torch.no_grad():
            mha = enh.attn
            d, H, dh = enh.dim, mha.num_heads, mha.head_dim
            G = H // mha.num_kv_heads
            (wq, wk, wv), (bq, _, bv) = mha._weights(), mha._biases()
            wq, wk, wv = (w.to(**f64) for w in (wq, wk, wv))
            bq = torch.zeros(len(wq), **f64) if bq is None else bq.to(**f64)
            bv = torch.zeros(len(wv), **f64) if bv is None else bv.to(**f64)
            adapt = torch.eye(d, **f64) + enh.adapter.weight.to(**f64)  # qa = adapt q + a
            a = enh.adapter.bias.to(**f64)
            in_matrix = torch.cat([adapt, wq @ adapt]).T  # q -> [qa | q-projection of qa]
            in_bias = torch.cat([a, wq @ a + bq])
            # Query head h reads kv head h // G.
            key_fold = wk.view(-1, dh, d).repeat_interleave(G, dim=0) * dh**-0.5
            value_t = wv.view(-1, dh, d).repeat_interleave(G, dim=0).transpose(1, 2)
            value_bias = bv.view(-1, 1, dh).repeat_interleave(G, dim=0)
            gates = mha.head_gates.to(**f64).repeat_interleave(dh)
            mix_w, mix_b = enh.mix.weight.to(**f64), enh.mix.bias.to(**f64)
            out_w = mha.out_proj.weight.to(**f64) * gates  # scales input column block h by gate h
            out_b = mha.out_proj.bias
            out_b = torch.zeros(d, **f64) if out_b is None else out_b.to(**f64)
            sf_w, sf_b = enh.score_feat.weight.to(**f64), enh.score_feat.bias.to(**f64)
            token_extra = torch.cat([enh.rank.to(**f64) + sf_b, (sf_w[:, 0] - sf_w[:, 1])[None]])
            return cls(
                heads=H,
                in_matrix=_np(in_matrix, dtype),
                in_bias=_np(in_bias, dtype),
                key_fold=_np(key_fold, dtype),
                value_t=_np(value_t, dtype),
                value_bias=_np(value_bias, dtype),
                out_matrix=_np((mix_w @ out_w).T, dtype),
                out_bias=_np(mix_w @ out_b + mix_b, dtype),
                token_extra=_np(token_extra, dtype),
                key_extra=_np(key_fold @ token_extra.T, dtype),
                value_extra=_np(token_extra @ value_t, dtype),
                value_top=_np((sf_w[:, 1] @ value_t)[:, None], dtype),
            )

    # The last adapted queries, (q, q + A q + a): a store's first pass asks for them and its
    # refine() right after needs them again. Reused only for equal q (compared by value).
    _last: dict = field(default_factory=dict, compare=False, repr=False)

    def adapted(self, q: np.ndarray) -> np.ndarray:
        """normalize(q + A q + a) (n, d): the adapter alone, the first half of ``in_matrix``."""
        d = q.shape[1]
        qa = q @ self.in_matrix[:, :d] + self.in_bias[:d]  # a column slice: BLAS reads it in place
        self._last["adapted"] = (q.copy(), qa)
        return _normalize(qa)

    def _projections(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(q + A q + a, the query projection of it), (n, d) each; the first from adapted() if it saw q."""
        d = q.shape[1]
        last = self._last.get("adapted")
        if last is not None and last[0].shape == q.shape and np.array_equal(last[0], q):
            return last[1], q @ self.in_matrix[:, d:] + self.in_bias[d:]
        proj = q @ self.in_matrix + self.in_bias  # (n, 2d)
        return proj[:, :d], proj[:, d:]

    def refine(self, q: np.ndarray, cand: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """q (n, d), cand (n, K, d), scores (n, K) -> refined queries (n, d), L2-normalised.

        Batches of at least ``TORCH_MIN_BATCH`` queries run the same algebra with torch, in
        blocks of ``TORCH_BLOCK`` queries (:meth:`_refine_blocks`).
        """
        n, K, d = cand.shape
        max_k = len(self.token_extra) - 1
        if max_k < K:
            raise bad_argument("cand_vectors", f"at most K={max_k} candidates", K)
        # Token j = cand_j + t_j + s_j w + s_top w', with t_j = rank_j + score-feature bias.
        if n >= TORCH_MIN_BATCH:
            return self._refine_blocks(q, cand, scores)
        H = self.heads
        qa, qp = self._projections(q)
        qh = qp.reshape(n, H, -1).transpose(1, 0, 2)  # (H, n, d_h)
        u = np.matmul(qh, self.key_fold).transpose(1, 0, 2)  # (n, H, d): W_k,h^T q_h, scaled
        # The tokens without their top-score term s_top w', which is the same for every j: softmax
        # ignores it in the logits, and the weights sum to 1, so it enters the read-out once
        # (value_top). Building (n, K, d) tokens costs fewer array operations than meeting each
        # term alone, and a served query is bound by the number of operations.
        tokens = cand + self.token_extra[:K]
        tokens += scores[:, :, None] * self.token_extra[-1]
        logits = np.matmul(u, tokens.transpose(0, 2, 1))  # (n, H, K)
        logits -= logits.max(axis=-1, keepdims=True)
        p = np.exp(logits, out=logits)
        p /= p.sum(axis=-1, keepdims=True)
        o = np.matmul(np.matmul(p, tokens).transpose(1, 0, 2), self.value_t)  # (H, n, d_h)
        o += self.value_bias
        o += scores[None, :, :1] * self.value_top
        read = o.transpose(1, 0, 2).reshape(n, -1) @ self.out_matrix
        read += qa
        read += self.out_bias
        return _normalize(read)

    @torch.inference_mode()
    def _refine_blocks(self, q: np.ndarray, cand: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """:meth:`refine` for a batch, with torch on views of the same arrays, block by block.

        numpy multiplies the n stacked (H, d) x (d, K) products one after another on one
        thread; torch's bmm spreads them over the cores. The rank and score terms of the tokens
        go through the head maps first (``key_extra``, ``value_extra``, ``value_top``), so they
        cost (K + 1) x d_h products per head instead of (K + 1) x d. A block of
        ``TORCH_BLOCK`` queries keeps its temporaries small enough for the allocator to reuse.
        """
        n, K, d = cand.shape
        H = self.heads
        rows = slice(None) if len(self.token_extra) - 1 == K else [*range(K), -1]
        t = {name: torch.from_numpy(getattr(self, name)) for name in _TORCH_FIELDS}
        key_extra = torch.from_numpy(np.ascontiguousarray(self.key_extra[:, :, rows]))  # (H, d_h, K + 1)
        value_extra = torch.from_numpy(np.ascontiguousarray(self.value_extra[:, rows]))  # (H, K + 1, d_h)
        dtype = self.in_matrix.dtype  # torch does not mix float32 and float64 operands
        q_all, c_all, s_all = (torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)) for a in (q, cand, scores))
        out = torch.empty((n, d), dtype=q_all.dtype)
        for lo in range(0, n, TORCH_BLOCK):
            qb, cb, sb = q_all[lo : lo + TORCH_BLOCK], c_all[lo : lo + TORCH_BLOCK], s_all[lo : lo + TORCH_BLOCK]
            m = len(qb)
            proj = torch.addmm(t["in_bias"], qb, t["in_matrix"])  # (m, 2d): [qa | query projection]
            qh = proj[:, d:].reshape(m, H, -1).transpose(0, 1)  # (H, m, d_h)
            u = torch.bmm(qh, t["key_fold"]).transpose(0, 1)  # (m, H, d): W_k,h^T q_h, scaled
            ue = torch.bmm(qh, key_extra).transpose(0, 1)  # (m, H, K + 1): u . t_j and u . w
            logits = torch.bmm(u, cb.transpose(1, 2))  # (m, H, K)
            logits += ue[..., :K]
            logits.addcmul_(ue[..., K:], sb[:, None, :])
            p = torch.softmax(logits, dim=-1)
            pe = torch.cat([p, torch.bmm(p, sb[:, :, None])], dim=-1)  # [p | p . s]
            o = torch.bmm(torch.bmm(p, cb).transpose(0, 1), t["value_t"])  # (H, m, d_h)
            o += torch.bmm(pe.transpose(0, 1), value_extra)
            o += t["value_bias"] + sb[:, 0].view(1, m, 1) * t["value_top"]
            read = torch.addmm(t["out_bias"], o.transpose(0, 1).reshape(m, -1), t["out_matrix"])
            out[lo : lo + m] = torch.nn.functional.normalize(proj[:, :d] + read, dim=1)
        return out.numpy()


#: Batches from this many queries refine with torch (:meth:`MultiHeadPlan._refine_blocks`);
#: below it numpy's lower cost per operation wins (a served single query is ~20 operations).
TORCH_MIN_BATCH = 32
#: Queries per block of the torch path.
TORCH_BLOCK = 256
_TORCH_FIELDS = ("in_matrix", "in_bias", "key_fold", "value_t", "value_bias", "out_matrix", "out_bias", "value_top")
