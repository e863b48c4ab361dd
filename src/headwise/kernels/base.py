"""What every backend receives and returns, and the interface it implements.

Shape legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0, G = Hq / Hkv
query heads share one key/value head), L queries, S keys, E query/key dim, Ev value dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headwise.masks import Mask
from headwise.scores import Score


@dataclass(frozen=True)
class AttentionStats:
    """Per query row statistics of the attention distribution, each (B, Hq, L).

    ``entropy`` in nats; ``max_weight`` the largest weight of the row. A row that can
    attend to nothing has entropy 0 and max weight 0. Both are differentiable on every
    backend that returns them, with finite gradients (0 for an empty row); the gradient of
    ``max_weight`` at a tie is shared equally by the tied keys, as ``torch.amax``'s is.
    """

    entropy: Tensor
    max_weight: Tensor


def row_entropy(weights: Tensor) -> Tensor:
    """``-sum w log w`` over the last dim, with ``0 log 0 = 0`` and a finite gradient there.

    ``xlogy(w, w)`` has the right value, but autograd differentiates it with respect to both
    arguments and the second gives ``w / w = 0 / 0 = NaN`` at every masked key. Taking the
    log of 1 where ``w = 0`` keeps the value (``0 * 0``) and makes that gradient 0, the limit
    of the entropy's gradient with respect to the logits: ``-w (log w + H) -> 0`` as
    ``w -> 0``. A NaN weight still gives a NaN entropy.
    """
    safe = torch.where(weights > 0, weights, 1.0)
    return -(weights * torch.log(safe)).sum(dim=-1)


def lse_cotangent(dlse: Tensor, lse: Tensor) -> Tensor:
    """The incoming gradient of ``lse``, with 0 on rows that attend to nothing (lse = -inf).

    ``d lse / d s_j = p_j``, so a backward adds ``dlse * p`` to dS. An empty row has p = 0
    everywhere and its lse is constant (-inf whatever q, k and v are): its gradient is 0.
    Its cotangent may be anything, though (``lse ** 2`` gives -inf there), and 0 * inf would
    be NaN; the reference's ``logsumexp`` gets 0 there too (its masked keys take no gradient).
    """
    return torch.where(torch.isneginf(lse), 0.0, dlse)


@dataclass(frozen=True)
class AttentionOutput:
    """Result of :func:`headwise.attend`.

    out (B, Hq, L, Ev); weights (B, Hq, L, S), (B, L, S) for need_weights="mean", or None;
    stats or None; lse (B, Hq, L): the log-sum-exp of each row's logits (-inf for a row
    with nothing to attend to), or None when the backend does not produce it (sdpa, flex);
    differentiable wherever it is returned (0 gradient on an empty row); backend: the name
    of the backend that ran.
    """

    out: Tensor
    weights: Tensor | None
    stats: AttentionStats | None
    lse: Tensor | None
    backend: str


@dataclass
class Request:
    """A validated attention call, as every backend sees it."""

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Mask | None
    score: Score | None
    scale: float
    dropout_p: float
    need_weights: bool | str  # True: per head; "mean": averaged over the heads
    need_stats: bool

    @property
    def shape(self) -> tuple[int, int, int, int, int, int, int]:
        """(B, Hq, Hkv, L, S, E, Ev)."""
        B, Hq, L, E = self.q.shape
        return B, Hq, self.k.shape[1], L, self.k.shape[2], E, self.v.shape[3]

    @property
    def needs_grad(self) -> bool:
        """True when autograd will need a backward through this call."""
        if not torch.is_grad_enabled():
            return False
        params = self.score.parameters() if self.score is not None else ()
        return any(t.requires_grad for t in (self.q, self.k, self.v, *params))


class Backend:
    """A way to compute attention. Subclasses declare what they support.

    ``refusals`` lists every reason the backend cannot serve a request (empty: it can);
    ``cost`` estimates the run time in arbitrary but shared units, so that ``auto`` can
    pick the cheapest backend that serves the request; ``memory_bytes`` estimates what it
    allocates beyond its inputs and output (``AttentionPlan.memory_bytes``).
    """

    name: str = "?"
    #: One line for the backend table in the docs.
    summary: str = ""
    #: Capabilities for the docs table: feature -> "yes" / "no" / a short note.
    capabilities: dict[str, str] = {}

    def refusals(self, req: Request) -> list[str]:
        raise NotImplementedError

    def cost(self, req: Request) -> float:
        raise NotImplementedError

    def memory_bytes(self, req: Request) -> int:
        """Estimated bytes this backend allocates for ``req`` beyond q, k, v and the output."""
        return 0

    def run(self, req: Request) -> AttentionOutput:
        raise NotImplementedError


def attention_flops(req: Request, density: float = 1.0) -> float:
    """Multiply-adds of QK^T and AV over the attended fraction ``density`` of L x S."""
    B, Hq, _, L, S, E, Ev = req.shape
    return 2.0 * B * Hq * L * S * (E + Ev) * density


# Largest |logit| for which softmax may take exp(s) with no row shift: e^30 leaves float32
# room for sums of 1e24 terms, and e^-30 is still a normal float with full relative
# precision (float64: e^+-300). Used by the tiled and eager kernels.
BOUNDED_LOGIT_LIMIT = {torch.float32: 30.0, torch.float64: 300.0}
