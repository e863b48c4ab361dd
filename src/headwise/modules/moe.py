"""``MoEAttention``: a router sends each query token to a few attention experts.

Each expert is a :class:`~headwise.modules.MultiHeadAttention` with its own heads and
projections. A linear router scores the experts for every token; the token goes to its
top ``experts_per_token`` experts and its output is their outputs weighted by the router
probabilities (renormalised over the chosen experts when more than one is chosen; the raw
top-1 probability otherwise, as in the Switch Transformer). Keys and values are always the
whole sequence: routing decides which expert *asks*, not what it may read.

Capacity: an expert takes at most ``C = ceil(capacity_factor * L * experts_per_token /
num_experts)`` tokens per sequence. Tokens claim places in order of choice rank (every
token's first choice before any second choice), then of position. A token that finds its
expert full gets nothing from that expert: with no expert left its attention output is 0,
so in a residual block ``x + moe(x)`` it passes through unchanged. ``last_dropped`` counts
such token-expert assignments after each forward.

Load balancing: after each forward ``aux_loss`` holds the Switch Transformer loss
``num_experts * sum_e f_e * P_e`` (f_e: share of tokens whose first choice is e, P_e: mean
router probability of e); it is 1 for a perfectly uniform router. In training, router
inputs are multiplied by noise uniform in [1 - jitter, 1 + jitter].

Shape legend: x (N, L, E) -> (N, L, E).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from headwise.errors import bad_argument
from headwise.masks import Mask, MaskFn, as_mask
from headwise.modules.attention import MultiHeadAttention


class _RoutedQueries(Mask):
    """A self-attention mask seen from routed queries: row i is the token at ``pos[b, i]``."""

    def __init__(self, inner: Mask | None, pos: Tensor, valid: Tensor):
        self.inner, self.pos, self.valid = inner, pos, valid

    def evaluate(self, b, h, q_idx, kv_idx, L, S):
        rows = self.valid[b, q_idx]
        if self.inner is None:
            return rows & (kv_idx >= 0)
        # Positions are in key coordinates already: evaluate as if L == S (no alignment shift).
        return rows & self.inner.evaluate(b, h, self.pos[b, q_idx], kv_idx, S, S)

    def cache_key(self):
        return None  # routing changes with every batch


class MoEAttention(nn.Module):
    """Mixture of attention experts with top-k routing, capacity and a balancing loss.

    Example::

        >>> import torch
        >>> from headwise.modules import MoEAttention
        >>> moe = MoEAttention(32, num_experts=4, heads_per_expert=2, experts_per_token=1)
        >>> y = moe(torch.randn(2, 16, 32))
        >>> y.shape, float(moe.aux_loss.detach()) >= 0
        (torch.Size([2, 16, 32]), True)
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        num_experts: int = 4,
        heads_per_expert: int = 2,
        experts_per_token: int = 1,
        capacity_factor: float = 1.25,
        jitter: float = 0.0,
        mask: Mask | MaskFn | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("experts_per_token", experts_per_token)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad_argument(name, "an integer >= 1", repr(value))
        if experts_per_token > num_experts:
            raise bad_argument("experts_per_token", f"at most num_experts ({num_experts})", experts_per_token)
        if not isinstance(capacity_factor, (int, float)) or not math.isfinite(capacity_factor) or capacity_factor <= 0:
            raise bad_argument("capacity_factor", "a finite number > 0", repr(capacity_factor))
        if not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
            raise bad_argument("jitter", "a number in [0, 1)", repr(jitter))
        fk = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_experts, self.k = embed_dim, num_experts, experts_per_token
        self.capacity_factor, self.jitter = float(capacity_factor), float(jitter)
        self.mask = as_mask(mask) if mask is not None else None
        self.router = nn.Linear(embed_dim, num_experts, bias=False, **fk)
        self.experts = nn.ModuleList(
            MultiHeadAttention(embed_dim, heads_per_expert, bias=bias, **fk) for _ in range(num_experts)
        )
        self.aux_loss: Tensor = torch.zeros(())
        self.last_dropped: int = 0

    def capacity(self, L: int) -> int:
        return math.ceil(self.capacity_factor * L * self.k / self.num_experts)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router probabilities (N, L, Ne), chosen experts (N, L, k) and their gates (N, L, k)."""
        inp = x
        if self.training and self.jitter > 0:
            inp = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        probs = torch.softmax(self.router(inp).float(), dim=-1).to(x.dtype)
        gates, chosen = probs.topk(self.k, dim=-1)
        if self.k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return probs, chosen, gates

    def forward(self, x: Tensor, *, mask: Mask | MaskFn | None = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise bad_argument("x", f"a tensor (N, L, {self.embed_dim})", got)
        N, L, _ = x.shape
        probs, chosen, gates = self.route(x)
        first = nn.functional.one_hot(chosen[..., 0], self.num_experts).to(probs.dtype)
        self.aux_loss = self.num_experts * (first.mean(dim=(0, 1)) * probs.mean(dim=(0, 1))).sum()

        masks = [m for m in (self.mask, as_mask(mask) if mask is not None else None) if m is not None]
        inner = masks[0] if len(masks) == 1 else (masks[0] & masks[1]) if masks else None
        C = min(self.capacity(L), L * self.k)
        y = torch.zeros_like(x)
        dropped = 0
        # Places are claimed rank by rank, then by position: flatten (rank, position).
        chosen_rm = chosen.permute(0, 2, 1).reshape(N, self.k * L)
        gates_rm = gates.permute(0, 2, 1).reshape(N, self.k * L)
        token_of_slot = torch.arange(L, device=x.device).repeat(self.k)
        for e, expert in enumerate(self.experts):
            hit = chosen_rm == e  # (N, k*L)
            order = torch.cumsum(hit.long(), dim=1) - 1
            keep = hit & (order < C)
            dropped += int((hit & ~keep).sum())
            n_e = int(keep.sum(dim=1).max()) if keep.any() else 0
            if n_e == 0:
                continue
            # Gather the kept tokens of each sequence into n_e rows (padding rows are invalid).
            slot = torch.where(keep, order, n_e)  # invalid slots go to a dump row
            pos = torch.zeros(N, n_e + 1, dtype=torch.long, device=x.device)
            gate = torch.zeros(N, n_e + 1, dtype=x.dtype, device=x.device)
            pos.scatter_(1, slot, token_of_slot.expand(N, -1).clone())
            gate.scatter_(1, slot, gates_rm)
            valid = torch.zeros(N, n_e + 1, dtype=torch.bool, device=x.device).scatter_(1, slot, keep)
            pos, gate, valid = pos[:, :n_e], gate[:, :n_e], valid[:, :n_e]
            queries = x.gather(1, pos.unsqueeze(-1).expand(N, n_e, self.embed_dim))
            out = expert(queries, x, x, mask=_RoutedQueries(inner, pos, valid)).out
            contrib = out * (gate * valid).unsqueeze(-1)
            y = y.index_put((torch.arange(N, device=x.device).view(N, 1), pos), contrib, accumulate=True)
        self.last_dropped = dropped
        return y
