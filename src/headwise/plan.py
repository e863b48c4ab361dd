"""Attention plans: the backend choice for one problem, made once, inspectable, then run many times.

``headwise.plan(q_shape, k_shape, ...)`` validates a problem (shapes, mask, scores, flags),
lets ``auto`` choose its backend (deterministically: the tuning file, else the cost model; see
:mod:`headwise.kernels.registry`) and returns an immutable :class:`AttentionPlan`.
``plan(q, k, v)`` runs it on tensors of the planned shapes, dtype and device; ``plan.backend``,
``plan.explain()`` (why this backend, what the others refused or were estimated to cost,
whether it compiles) and ``plan.memory_bytes`` can be read before anything runs. ``attend()``
makes the same decision through the same cache, so ``attend(q, k, v, ...)`` and
``plan(q.shape, k.shape, ...)(q, k, v)`` run the same backend.

Shape legend: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), out (B, Hq, L, Ev).

Example:
    >>> import torch
    >>> from headwise import causal, plan
    >>> p = plan((2, 8, 256, 64), (2, 2, 256, 64), mask=causal, need_stats=True)
    >>> p.backend
    'tiled'
    >>> q, k = torch.randn(2, 8, 256, 64), torch.randn(2, 2, 256, 64)
    >>> p(q, k, k).stats.entropy.shape
    torch.Size([2, 8, 256])
    >>> print(p.explain().splitlines()[0])
    backend tiled, chosen by auto: the lowest cost estimate among the backends that serve the call
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from headwise.errors import bad_argument
from headwise.kernels.base import AttentionOutput, Request
from headwise.kernels.registry import Decision, decide, get_backend
from headwise.masks import Mask, MaskFn
from headwise.scores import Score, ScoreFn


def _shape(value: Any, name: str) -> tuple[int, int, int, int]:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, tuple) or len(value) != 4 or not all(isinstance(d, int) and d > 0 for d in value):
        raise bad_argument(name, "a 4-tuple of positive ints (B, H, L, E)", repr(value))
    return value


def _stand_in(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, grad: bool) -> Tensor:
    # One element broadcast to the shape (stride 0): the backends' checks see the real shape,
    # dtype and device without the memory.
    t = torch.zeros(1, dtype=dtype, device=device).expand(*shape)
    return t.detach().requires_grad_() if grad else t


@dataclass(frozen=True)
class AttentionPlan:
    """One attention problem with its backend chosen: call it with (q, k, v) of the planned shapes."""

    q_shape: tuple[int, int, int, int]
    k_shape: tuple[int, int, int, int]
    v_shape: tuple[int, int, int, int]
    dtype: torch.dtype
    device: torch.device
    mask: Mask | None
    score: Score | None
    scale: float
    dropout_p: float
    need_weights: bool | str
    need_stats: bool
    requires_grad: bool
    backend: str
    decision: Decision | None  # None: the backend was named, not chosen
    memory_bytes: int

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> AttentionOutput:
        """Run the plan: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) as planned -> AttentionOutput."""
        for name, t, want in (("q", q, self.q_shape), ("k", k, self.k_shape), ("v", v, self.v_shape)):
            if not isinstance(t, Tensor):
                raise bad_argument(name, "a torch.Tensor", type(t).__name__)
            if tuple(t.shape) != want or t.dtype != self.dtype or t.device != self.device:
                raise bad_argument(name, f"the planned {want} {self.dtype} on {self.device}",
                                   f"{tuple(t.shape)} {t.dtype} on {t.device}")  # fmt: skip
        req = Request(q, k, v, self.mask, self.score, self.scale, self.dropout_p, self.need_weights, self.need_stats)
        if req.needs_grad and not self.requires_grad:
            chosen = get_backend(self.backend)
            reasons = chosen.refusals(req)
            if reasons:
                raise bad_argument("q, k, v", f"no requires_grad (planned so; {self.backend}: {reasons[0]})",
                                   "tensors that require grad")  # fmt: skip
        return get_backend(self.backend).run(req)

    def explain(self) -> str:
        """Why this backend, what the others refused or were estimated to cost, compiles, memory."""
        if self.decision is None:
            lines = [f"backend {self.backend}, named by the caller"]
        else:
            lines = [f"backend {self.backend}, chosen by auto: {self.decision.why}"]
            for name, cost in self.decision.ranking:
                mark = "  <- runs" if name == self.backend else ""
                lines.append(f"  {name:<10} serves, estimated {1e3 * cost:.3g} ms{mark}")
            for name, reasons in self.decision.refused:
                lines.append(f"  {name:<10} refuses: {'; '.join(reasons)}")
        if self.backend == "flex":
            lines.append("compiles: FlexAttention compiles on the first call of this problem (seconds), then reuses it")
        lines.append(f"extra memory: about {self.memory_bytes / 2**20:.3g} MiB beyond q, k, v and the output")
        return "\n".join(lines)


def plan(
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    v_shape: Sequence[int] | None = None,
    *,
    mask: Mask | MaskFn | Tensor | None = None,
    score: Score | ScoreFn | Sequence[Score | ScoreFn] | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool | Literal["mean"] = False,
    need_stats: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    requires_grad: bool = False,
    backend: str = "auto",
) -> AttentionPlan:
    """An :class:`AttentionPlan` for ``attend``'s problem of these shapes (``v_shape`` default: ``k_shape``).

    The arguments mean what they mean for :func:`headwise.attend`; ``requires_grad`` says that
    the call will be differentiated (some backends have no backward). Bad input raises
    :class:`~headwise.errors.HeadwiseError` here, before anything runs.
    """
    from headwise.attend import make_request

    qs, ks = _shape(tuple(q_shape), "q_shape"), _shape(tuple(k_shape), "k_shape")
    vs = ks if v_shape is None else _shape(tuple(v_shape), "v_shape")
    if not isinstance(dtype, torch.dtype):
        raise bad_argument("dtype", "a torch.dtype", repr(dtype))
    dev = torch.device(device)
    if not isinstance(backend, str):
        raise bad_argument("backend", "a backend name (str)", type(backend).__name__)
    q, k, v = (_stand_in(s, dtype, dev, requires_grad) for s in (qs, ks, vs))
    with torch.set_grad_enabled(requires_grad):
        req = make_request(q, k, v, mask, score, scale, dropout_p, need_weights, need_stats)
        if backend == "auto":
            decision: Decision | None = decide(req)
            name = decision.backend
        else:
            from headwise.kernels.registry import choose

            decision, name = None, choose(req, backend).name
        memory = get_backend(name).memory_bytes(req)
    return AttentionPlan(qs, ks, vs, dtype, dev, req.mask, req.score, req.scale, req.dropout_p, req.need_weights,
                         req.need_stats, requires_grad, name, decision, memory)  # fmt: skip
