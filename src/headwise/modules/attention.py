"""``MultiHeadAttention``: projections around :func:`headwise.attend`.

Shape legend (batch_first=True): query (N, L, E), key (N, S, kdim), value (N, S, vdim),
output (N, L, E); weights and per-row stats are per head: (N, H, L, S) and (N, H, L).
With batch_first=False the sequence dimension comes first, as in torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from headwise.attend import attend
from headwise.errors import HeadwiseError, bad_argument
from headwise.kernels.base import AttentionStats
from headwise.masks import Mask, MaskFn, _PerHeadWindows, and_masks, as_mask, padding
from headwise.profiling import ATTENTION_CORE, OUTPUT_PROJECTION, QKV_PROJECTION, scope
from headwise.scores import Score, ScoreFn, _Alibi


class MHAOutput(NamedTuple):
    """out (N, L, E) (or (L, N, E)); weights (N, H, L, S), (N, L, S) when averaged, or None;
    stats or None; backend."""

    out: Tensor
    weights: Tensor | None
    stats: AttentionStats | None
    backend: str


class MultiHeadAttention(nn.Module):
    """Multi-head attention with GQA/MQA, composable masks and scores, and head gates.

    Self attention uses one fused input projection (one matmul, split after); cross
    attention projects query, key and value separately (with slices of the same weight
    when ``kdim == vdim == embed_dim``, as torch does). ``head_gates`` (H,) multiplies each
    head's output before the output projection: ones by default and not trained unless
    you call ``mha.head_gates.requires_grad_(True)``; it is the hook for ablation and
    gradient head importance (Michel et al. 2019).

    Example::

        >>> import torch
        >>> from headwise.modules import MultiHeadAttention
        >>> from headwise import causal
        >>> mha = MultiHeadAttention(64, 8, num_kv_heads=2, mask=causal)
        >>> x = torch.randn(3, 10, 64)
        >>> res = mha(x, need_stats=True)
        >>> res.out.shape, res.stats.entropy.shape
        (torch.Size([3, 10, 64]), torch.Size([3, 8, 10]))
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        mask: Mask | MaskFn | None = None,
        score: Score | ScoreFn | list | None = None,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad_argument(name, "an integer >= 1", repr(value))
        if embed_dim % num_heads:
            raise bad_argument("embed_dim", f"a multiple of num_heads ({num_heads})", embed_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
            raise bad_argument("num_kv_heads", "an integer >= 1", repr(num_kv_heads))
        if num_heads % num_kv_heads:
            raise bad_argument("num_kv_heads", f"a divisor of num_heads ({num_heads})", num_kv_heads)
        if not 0.0 <= dropout < 1.0:
            raise bad_argument("dropout", "a number in [0, 1)", dropout)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.mask = as_mask(mask) if mask is not None else None
        self.score = score
        fk = {"device": device, "dtype": dtype}
        q_out, kv_out = num_heads * self.head_dim, num_kv_heads * self.head_dim
        self.fused = self.kdim == embed_dim and self.vdim == embed_dim
        if self.fused:
            self.in_proj_weight = nn.Parameter(torch.empty(q_out + 2 * kv_out, embed_dim, **fk))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(q_out, embed_dim, **fk))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_out, self.kdim, **fk))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_out, self.vdim, **fk))
        self.in_proj_bias = nn.Parameter(torch.zeros(q_out + 2 * kv_out, **fk)) if bias else None
        self.out_proj = nn.Linear(q_out, embed_dim, bias=bias, **fk)
        self.head_gates = nn.Parameter(torch.ones(num_heads, **fk), requires_grad=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projections and zero biases, as torch's MultiheadAttention."""
        if self.fused:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    # -- projections -------------------------------------------------------------------

    def _splits(self) -> tuple[int, int, int]:
        kv = self.num_kv_heads * self.head_dim
        return self.num_heads * self.head_dim, kv, kv

    def _weights(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.fused:
            return self.in_proj_weight.split(self._splits())
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _biases(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if self.in_proj_bias is None:
            return None, None, None
        return self.in_proj_bias.split(self._splits())

    def project(self, query: Tensor, key: Tensor | None, value: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(N, L, E) inputs -> q (N, H, L, d), k and v (N, Hkv, S, d)."""
        if key is None and value is None and self.fused:
            bias = self.in_proj_bias
            q, k, v = nn.functional.linear(query, self.in_proj_weight, bias).split(self._splits(), dim=-1)
        else:
            key = query if key is None else key
            value = key if value is None else value
            (wq, wk, wv), (bq, bk, bv) = self._weights(), self._biases()
            q = nn.functional.linear(query, wq, bq)
            k = nn.functional.linear(key, wk, bk)
            v = nn.functional.linear(value, wv, bv)
        split = "n l (h d) -> n h l d"
        return (
            rearrange(q, split, h=self.num_heads),
            rearrange(k, split, h=self.num_kv_heads),
            rearrange(v, split, h=self.num_kv_heads),
        )

    # -- forward ---------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        mask: Mask | MaskFn | Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        average_attn_weights: bool = False,
        need_stats: bool = False,
        backend: str = "auto",
    ) -> MHAOutput:
        """Attend from ``query`` to ``key``/``value`` (self attention when both are None).

        ``mask`` is combined (AND) with the module's mask. ``key_padding_mask`` (N, S)
        follows torch: True marks a padding key that must be ignored; it must be a
        right-padding mask (True only after the last real key of each row).
        ``need_weights`` returns per-head weights (N, H, L, S); with ``average_attn_weights``
        their mean over the heads (N, L, S), as torch returns by default, reduced chunk by
        chunk without keeping the per-head weights.
        """
        query, key, value = self._check_inputs(query, key, value)
        N, S = query.shape[0], (key if key is not None else query).shape[1]
        with scope(QKV_PROJECTION):
            q, k, v = self.project(query, key, value)
        masks = [m for m in (self.mask, mask) if m is not None]
        if key_padding_mask is not None:
            masks.append(self._padding(key_padding_mask, N, S))
        combined = None if not masks else masks[0] if len(masks) == 1 else and_masks(*masks)
        with scope(ATTENTION_CORE):
            res = attend(
                q,
                k,
                v,
                mask=combined,
                score=self.score,
                dropout_p=self.dropout if self.training else 0.0,
                need_weights="mean" if need_weights and average_attn_weights else need_weights,
                need_stats=need_stats,
                backend=backend,
            )
        with scope(OUTPUT_PROJECTION):
            heads = res.out * self.head_gates.view(1, -1, 1, 1).to(res.out.dtype)
            out = self.out_proj(rearrange(heads, "n h l d -> n l (h d)"))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return MHAOutput(out, res.weights, res.stats, res.backend)

    def folded_cross_attention(self, query: Tensor, tokens: Tensor) -> Tensor:
        """``forward(query[:, None], tokens, tokens).out[:, 0]`` without projecting the tokens.

        For one query per row over S tokens (keys = values), the key projection moves onto
        the query, ``q_h . (W_k,h t + b_k,h) = (W_k,h^T q_h) . t + const``, and the value
        projection after the weighted sum, ``sum_j a_j (W_v,h t_j + b_v,h) = W_v,h (sum_j a_j t_j)
        + b_v,h``: the S tokens are never projected, which costs H*E per token instead of
        2*H*d*E. The attention itself is :func:`~headwise.attend` (MQA over the raw tokens).
        Needs no mask, no score, dropout off, and tokens of width embed_dim.

        Shapes: query (N, E), tokens (N, S, E) -> (N, E).

        Example:
            >>> import torch
            >>> mha = MultiHeadAttention(16, 4).eval()
            >>> q, t = torch.randn(3, 16), torch.randn(3, 5, 16)
            >>> ref = mha(q[:, None], t, t).out[:, 0]
            >>> bool(torch.allclose(mha.folded_cross_attention(q, t), ref, atol=1e-5))
            True
        """
        if self.mask is not None or self.score is not None or (self.training and self.dropout > 0):
            raise bad_argument("folded_cross_attention", "a module without mask, score or active dropout", self)
        if query.dim() != 2 or tokens.dim() != 3 or tokens.shape[0] != query.shape[0]:
            raise bad_argument("query, tokens", "(N, E) and (N, S, E)", (tuple(query.shape), tuple(tokens.shape)))
        if query.shape[-1] != self.embed_dim or tokens.shape[-1] != self.kdim or self.kdim != self.vdim:
            raise bad_argument("tokens", f"last dim {self.embed_dim} (kdim == vdim)", tokens.shape[-1])
        N, H, d, E = query.shape[0], self.num_heads, self.head_dim, tokens.shape[-1]
        G = H // self.num_kv_heads
        (wq, wk, wv), (bq, _, bv) = self._weights(), self._biases()
        q = nn.functional.linear(query, wq, bq).view(N, H, d)
        # Query head h reads kv head h // G: expand the (Hkv, d, E) weights to (H, d, E), a view.
        wk_h = wk.view(self.num_kv_heads, 1, d, E).expand(-1, G, -1, -1).reshape(H, d, E)
        wv_h = wv.view(self.num_kv_heads, 1, d, E).expand(-1, G, -1, -1).reshape(H, d, E)
        # Batched over heads, (H, N, .) @ (H, ., .): plain bmm, cheaper to dispatch than einsum.
        u = torch.matmul(q.transpose(0, 1), wk_h).transpose(0, 1)  # W_k,h^T q_h; b_k: a row constant
        t = tokens.unsqueeze(1)
        mean = attend(u.unsqueeze(2), t, t, scale=d**-0.5).out[:, :, 0]  # (N, H, E)
        o = torch.matmul(mean.transpose(0, 1), wv_h.transpose(1, 2)).transpose(0, 1)
        if bv is not None:
            o = o + bv.view(self.num_kv_heads, 1, d).expand(-1, G, -1).reshape(H, d)
        o = o * self.head_gates.view(1, H, 1).to(o.dtype)
        return self.out_proj(o.reshape(N, H * d))

    def _check_inputs(self, query, key, value):
        if not isinstance(query, Tensor) or query.dim() != 3:
            got = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
            raise bad_argument("query", "a 3-d tensor (N, L, E)" if self.batch_first else "(L, N, E)", got)
        if not self.batch_first:
            query = query.transpose(0, 1)
            key = key.transpose(0, 1) if key is not None else None
            value = value.transpose(0, 1) if value is not None else None
        if query.shape[-1] != self.embed_dim:
            raise bad_argument("query", f"last dim embed_dim = {self.embed_dim}", query.shape[-1])
        if value is not None and key is None:
            raise bad_argument("key", "a tensor when value is given", None)
        if key is not None:
            if key.dim() != 3 or key.shape[0] != query.shape[0] or key.shape[-1] != self.kdim:
                raise bad_argument("key", f"(N, S, kdim) = ({query.shape[0]}, S, {self.kdim})", tuple(key.shape))
            if value is not None and (
                value.dim() != 3 or value.shape[:2] != key.shape[:2] or value.shape[-1] != self.vdim
            ):
                want = f"({key.shape[0]}, {key.shape[1]}, {self.vdim}) to match key"
                raise bad_argument("value", want, tuple(value.shape))
            if value is None and self.vdim != self.kdim:
                raise bad_argument("value", f"a tensor (vdim {self.vdim} != kdim {self.kdim})", None)
        return query, key, value

    @staticmethod
    def _padding(key_padding_mask: Tensor, N: int, S: int) -> Mask:
        kpm = key_padding_mask
        if not isinstance(kpm, Tensor) or kpm.dtype != torch.bool or kpm.shape != (N, S):
            got = f"{kpm.dtype} {tuple(kpm.shape)}" if isinstance(kpm, Tensor) else type(kpm).__name__
            raise bad_argument("key_padding_mask", f"a bool tensor of shape (N, S) = ({N}, {S})", got)
        lengths = (~kpm).sum(dim=1)
        # Right padding only: keys [0, length) real, the rest padding. Anything else would
        # silently attend to the wrong keys through the length-based mask.
        expected = torch.arange(S, device=kpm.device).view(1, S) >= lengths.view(N, 1)
        if not torch.equal(expected, kpm):
            raise bad_argument("key_padding_mask", "right padding (True only after the real keys)", "gaps")
        return padding(lengths)

    # -- heads -----------------------------------------------------------------------

    def prune_heads(self, heads: Iterable[int]) -> None:
        """Remove query heads for good, shrinking the projections.

        The remaining heads give exactly the output they gave before with the pruned heads
        gated to zero. With GQA a key/value head goes only when all its query heads go.
        Masks or scores indexed by head (per-head windows, ALiBi) cannot follow the
        renumbering and are refused.
        """
        drop = sorted(set(int(h) for h in heads))
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if any(h < 0 or h >= H for h in drop):
            raise bad_argument("heads", f"head indices in [0, {H})", drop)
        if len(drop) >= H:
            raise bad_argument("heads", "to leave at least one head", f"all {H} heads")
        if not drop:
            return
        G = H // Hkv
        groups = {h // G for h in drop}
        if Hkv != H and any(sum(1 for h in drop if h // G == g) != G for g in groups):
            raise HeadwiseError(f"heads: with GQA ({H}/{Hkv}) prune whole groups of {G} query heads, got {drop}")
        if isinstance(self.mask, _PerHeadWindows) or isinstance(self.score, _Alibi):
            raise HeadwiseError("heads: cannot prune a module whose mask or score is indexed by head")
        keep_q = [h for h in range(H) if h not in drop]
        keep_kv = keep_q if Hkv == H else [g for g in range(Hkv) if g not in groups]
        rows = lambda hs: torch.cat([torch.arange(h * d, (h + 1) * d) for h in hs])  # noqa: E731
        q_rows, kv_rows = rows(keep_q), rows(keep_kv)
        with torch.no_grad():
            wq, wk, wv = (w.detach() for w in self._weights())
            new = (wq[q_rows], wk[kv_rows], wv[kv_rows])
            if self.fused:
                self.in_proj_weight = nn.Parameter(torch.cat(new))
            else:
                self.q_proj_weight, self.k_proj_weight, self.v_proj_weight = (nn.Parameter(w) for w in new)
            if self.in_proj_bias is not None:
                bq, bk, bv = (b.detach() for b in self._biases())
                self.in_proj_bias = nn.Parameter(torch.cat((bq[q_rows], bk[kv_rows], bv[kv_rows])))
            out = nn.Linear(len(keep_q) * d, self.embed_dim, bias=self.out_proj.bias is not None)
            out = out.to(device=self.out_proj.weight.device, dtype=self.out_proj.weight.dtype)
            out.weight.copy_(self.out_proj.weight[:, q_rows])
            if self.out_proj.bias is not None:
                out.bias.copy_(self.out_proj.bias)
            self.out_proj = out
            gates = self.head_gates.detach()[keep_q]
            self.head_gates = nn.Parameter(gates, requires_grad=self.head_gates.requires_grad)
        self.num_heads, self.num_kv_heads = len(keep_q), len(keep_kv)

    # -- torch interop ---------------------------------------------------------------

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiHeadAttention:
        """Copy the weights of a ``torch.nn.MultiheadAttention`` (same outputs, float64 1e-10)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise bad_argument("mha", "a torch.nn.MultiheadAttention", type(mha).__name__)
        if mha.bias_k is not None or mha.add_zero_attn:
            raise HeadwiseError("mha: add_bias_kv and add_zero_attn have no headwise equivalent")
        w = mha.out_proj.weight
        ours = cls(
            mha.embed_dim,
            mha.num_heads,
            kdim=mha.kdim,
            vdim=mha.vdim,
            bias=mha.in_proj_bias is not None,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
            device=w.device,
            dtype=w.dtype,
        )
        _copy_projections(mha, ours, fused=mha._qkv_same_embed_dim)
        return ours

    def to_torch(self) -> nn.MultiheadAttention:
        """A ``torch.nn.MultiheadAttention`` with these weights (plain multi-head only)."""
        if self.num_kv_heads != self.num_heads:
            raise HeadwiseError(f"to_torch: torch has no GQA (num_kv_heads {self.num_kv_heads} != {self.num_heads})")
        if self.mask is not None or self.score is not None:
            raise HeadwiseError("to_torch: the module's mask and score have no torch equivalent")
        if not torch.all(self.head_gates == 1):
            raise HeadwiseError("to_torch: head gates other than 1 have no torch equivalent")
        w = self.out_proj.weight
        t = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.in_proj_bias is not None,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=w.device,
            dtype=w.dtype,
        )
        _copy_projections(self, t, fused=self.fused)
        return t

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"kdim={self.kdim}, vdim={self.vdim}, mask={self.mask!r}, score={self.score!r}"
        )


def _copy_projections(src: nn.Module, dst: nn.Module, fused: bool) -> None:
    """Copy projection weights between torch's MultiheadAttention and ours (same names)."""
    names = ["in_proj_weight"] if fused else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    with torch.no_grad():
        for name in names:
            getattr(dst, name).copy_(getattr(src, name))
        if src.in_proj_bias is not None:
            dst.in_proj_bias.copy_(src.in_proj_bias)
            dst.out_proj.bias.copy_(src.out_proj.bias)
        dst.out_proj.weight.copy_(src.out_proj.weight)
