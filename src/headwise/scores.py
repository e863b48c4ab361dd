"""Score modifications: how a query-key pair becomes a logit.

The default logit is ``scale * q . k``. A :class:`Score` can change that in three places,
each applied by every backend in the same order:

1. ``prepare(q, k)``: a per-vector transform before anything else (Poincaré: map to the ball);
2. ``similarity(q, k)``: replaces the dot product (Poincaré: negative distance);
3. ``modify(s, b, h, q, kv)``: an elementwise change of the scaled logit, with index tensors
   (``q`` are query positions aligned to the keys, as in :mod:`headwise.masks`).

Several scores compose in order: ``attend(..., score=[alibi(slopes), softcap(30.0)])``.

Example::

    >>> import torch
    >>> from headwise import attend
    >>> from headwise.scores import alibi, alibi_slopes
    >>> q = k = v = torch.randn(1, 4, 8, 16)
    >>> attend(q, k, v, score=alibi(alibi_slopes(4))).out.shape
    torch.Size([1, 4, 8, 16])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from headwise.captured import captured_tensors, rebind
from headwise.errors import bad_argument

ScoreFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


class Score:
    """Base class: the identity score (plain scaled dot product)."""

    #: True when ``similarity`` is overridden (the logit is no longer linear in k).
    replaces_similarity: bool = False

    def prepare(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return q, k

    def similarity(self, q: Tensor, k: Tensor) -> Tensor:
        """(..., n, E) x (..., m, E) -> (..., n, m)."""
        return q @ k.transpose(-1, -2)

    def modify(self, s: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return s

    def default_scale(self, head_dim: int) -> float:
        return 1.0 / math.sqrt(head_dim)

    def parameters(self) -> tuple[Tensor, ...]:
        """Tensors that need grad and that the logits depend on besides q and k."""
        return ()

    def with_parameters(self, params: tuple[Tensor, ...]) -> Score:
        """A copy using ``params`` in place of :meth:`parameters` (same order).

        The tiled kernel's backward recomputes logits from detached copies of the
        parameters, so that each gets its own partial derivative even when one was
        computed from another outside the kernel.
        """
        return self

    def validate(self, H: int) -> None:
        """Raise :class:`HeadwiseError` if the score cannot serve ``H`` query heads."""


class ScoreChain(Score):
    """Several scores applied in order; at most one may replace the similarity."""

    def __init__(self, scores: Sequence[Score]):
        self.scores = tuple(scores)
        replacing = [s for s in self.scores if s.replaces_similarity]
        if len(replacing) > 1:
            raise bad_argument("score", "at most one score that replaces the dot product", replacing)
        self._sim = replacing[0] if replacing else None
        self.replaces_similarity = self._sim is not None

    def prepare(self, q, k):
        for s in self.scores:
            q, k = s.prepare(q, k)
        return q, k

    def similarity(self, q, k):
        return self._sim.similarity(q, k) if self._sim else q @ k.transpose(-1, -2)

    def modify(self, s, b, h, q, kv):
        for sc in self.scores:
            s = sc.modify(s, b, h, q, kv)
        return s

    def default_scale(self, head_dim):
        return self._sim.default_scale(head_dim) if self._sim else 1.0 / math.sqrt(head_dim)

    def parameters(self):
        return tuple(p for s in self.scores for p in s.parameters())

    def with_parameters(self, params):
        parts, i = [], 0
        for sc in self.scores:
            n = len(sc.parameters())
            parts.append(sc.with_parameters(tuple(params[i : i + n])))
            i += n
        return ScoreChain(parts)

    def validate(self, H):
        for s in self.scores:
            s.validate(H)

    def __repr__(self) -> str:
        return " -> ".join(map(repr, self.scores))


class _FunctionScore(Score):
    def __init__(self, fn: ScoreFn):
        self.fn = fn

    def modify(self, s, b, h, q, kv):
        return self.fn(s, b, h, q, kv)

    def parameters(self):
        # The tiled kernel's backward must know every learnable tensor the function reads
        # (see headwise.captured for where they are looked for).
        return captured_tensors(self.fn)

    def with_parameters(self, params):
        if not params:
            return self
        return _FunctionScore(rebind(self.fn, {id(old): new for old, new in zip(self.parameters(), params)}))

    def __repr__(self) -> str:
        return getattr(self.fn, "__name__", "score_fn")


def as_score(score: Score | ScoreFn | Sequence[Score | ScoreFn] | None) -> Score | None:
    """Normalise ``attend``'s ``score`` argument: None, a Score, a function or a list."""
    if score is None or isinstance(score, Score):
        return score
    if callable(score):
        return _FunctionScore(score)
    if isinstance(score, Sequence) and not isinstance(score, (str, bytes)):
        items = [as_score(s) for s in score]
        return ScoreChain([s for s in items if s is not None]) if items else None
    raise bad_argument(
        "score", "a Score, a function (s, b, h, q_idx, kv_idx) -> s, or a list of them", type(score).__name__
    )


def _positive(name: str, value: float | Tensor) -> float | Tensor:
    v = value.detach() if isinstance(value, Tensor) else value
    try:
        ok = bool(torch.all(torch.as_tensor(v) > 0)) and bool(
            torch.all(torch.isfinite(torch.as_tensor(v, dtype=torch.float64)))
        )
    except (TypeError, RuntimeError):
        ok = False
    if not ok:
        raise bad_argument(name, "a finite number > 0", value)
    return value


class _Alibi(Score):
    def __init__(self, slopes: Tensor):
        self.slopes = slopes

    def modify(self, s, b, h, q, kv):
        slopes = self.slopes.to(device=s.device, dtype=s.dtype)
        return s - slopes[h] * (q - kv).abs()

    def parameters(self):
        return (self.slopes,) if self.slopes.requires_grad else ()

    def with_parameters(self, params):
        return _Alibi(params[0]) if params else self

    def validate(self, H):
        if self.slopes.numel() != H:
            raise bad_argument("slopes", f"one slope per query head ({H})", f"{self.slopes.numel()} slopes")

    def __repr__(self) -> str:
        return f"alibi({self.slopes.numel()} heads)"


def alibi_slopes(num_heads: int) -> Tensor:
    """The geometric slopes of Press et al. (2022): 2^(-8/n), 2^(-16/n), ... (n = heads)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise bad_argument("num_heads", "an integer >= 1", repr(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-4 * (2 * i + 1) / closest) for i in range(num_heads - closest)]
    return torch.tensor(base + extra)


def alibi(slopes: Tensor | Sequence[float]) -> Score:
    """ALiBi: subtract ``slopes[h] * |q_pos - kv_pos|`` from the logit of head ``h``.

    Under a causal mask this is the original ``slope * (kv - q)``; without one it is the
    symmetric form. ``slopes`` may be a learnable tensor.
    """
    t = slopes if isinstance(slopes, Tensor) else torch.tensor(list(slopes), dtype=torch.float32)
    if t.dim() != 1 or not t.dtype.is_floating_point:
        raise bad_argument("slopes", "a 1-d float tensor (one slope per head)", f"{t.dtype} {tuple(t.shape)}")
    return _Alibi(t)


class _Softcap(Score):
    def __init__(self, cap: float):
        self.cap = cap

    def modify(self, s, b, h, q, kv):
        return self.cap * torch.tanh(s / self.cap)

    def __repr__(self) -> str:
        return f"softcap({self.cap})"


def softcap(cap: float) -> Score:
    """Soft capping (Gemma 2): ``cap * tanh(s / cap)`` keeps logits in (-cap, cap)."""
    return _Softcap(float(_positive("cap", cap)))


class _Temperature(Score):
    def __init__(self, t: float):
        self.t = t

    def modify(self, s, b, h, q, kv):
        return s / self.t

    def __repr__(self) -> str:
        return f"temperature({self.t})"


def temperature(t: float) -> Score:
    """Divide logits by ``t``: t > 1 flattens the attention, t < 1 sharpens it."""
    return _Temperature(float(_positive("t", t)))


class Poincare(Score):
    """Negative Poincaré-ball distance as the logit (hyperbolic attention).

    q and k (tangent vectors at the origin) are clipped to tangent norm ``clip / sqrt(c)``
    and mapped into the ball of curvature -c by the exponential map at the origin,
    ``x = tanh(sqrt(c) |u|) u / (sqrt(c) |u|)``; the logit is ``-scale * d_c(x, y)`` with::

        d_c(x, y) = arcosh(1 + 2c |x - y|^2 / ((1 - c|x|^2)(1 - c|y|^2))) / sqrt(c)

    ``|x - y|^2`` is expanded as ``|x|^2 + |y|^2 - 2 x.y`` so blocks cost one matmul.
    Clipping keeps ``tanh`` away from 1, where float32 would put points on the boundary
    (infinite distance); ``eps`` bounds denominators and (squared) keeps the arcosh
    argument off its singular point.
    The default scale is 1 (distances are already O(1)).
    """

    replaces_similarity = True

    def __init__(self, curvature: float | Tensor = 1.0, clip: float = 4.0, eps: float = 1e-6):
        self.curvature = _positive("curvature", curvature)
        self.clip = float(_positive("clip", clip))
        self.eps = float(_positive("eps", eps))

    def _c(self, like: Tensor) -> Tensor:
        c = self.curvature
        if isinstance(c, Tensor):
            return c.to(device=like.device, dtype=like.dtype)
        return torch.tensor(c, dtype=like.dtype, device=like.device)

    def to_ball(self, u: Tensor) -> Tensor:
        return expmap0(u, self._c(u), self.clip, self.eps)

    def prepare(self, q, k):
        return self.to_ball(q), self.to_ball(k)

    def similarity(self, q, k):
        c = self._c(q)
        qq = (q * q).sum(-1, keepdim=True)
        kk = (k * k).sum(-1).unsqueeze(-2)
        diff = (qq + kk - 2 * (q @ k.transpose(-1, -2))).clamp_min(0)
        denom = ((1 - c * qq) * (1 - c * kk)).clamp_min(self.eps)
        # arcosh(1 + z) = log(1 + z + sqrt(z (z + 2))), stable for small z. Its slope is
        # infinite at z = 0 (q == k); eps^2 keeps it finite yet far below any real distance.
        z = (2 * c * diff / denom).clamp_min(self.eps**2)
        return -torch.log1p(z + torch.sqrt(z * (z + 2))) / c.sqrt()

    def default_scale(self, head_dim):
        return 1.0

    def parameters(self):
        c = self.curvature
        return (c,) if isinstance(c, Tensor) and c.requires_grad else ()

    def with_parameters(self, params):
        return Poincare(params[0], self.clip, self.eps) if params else self

    def __repr__(self) -> str:
        c = self.curvature
        return f"poincare(c={float(c.detach()) if isinstance(c, Tensor) else c:g})"


def expmap0(u: Tensor, c: Tensor | float, clip: float = 4.0, eps: float = 1e-6) -> Tensor:
    """Exponential map at the origin of the ball of curvature -c, clipping sqrt(c)|u| at ``clip``."""
    sc = torch.as_tensor(c, dtype=u.dtype, device=u.device).sqrt()
    norm = u.norm(dim=-1, keepdim=True).clamp_min(eps)
    r = (sc * norm).clamp(max=clip)
    return torch.tanh(r) * u / (sc * norm)


def logmap0(x: Tensor, c: Tensor | float, eps: float = 1e-6) -> Tensor:
    """Logarithmic map at the origin: a point of the ball back to a tangent vector."""
    sc = torch.as_tensor(c, dtype=x.dtype, device=x.device).sqrt()
    norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    r = (sc * norm).clamp(max=1 - 1e-7)
    return torch.atanh(r) * x / (sc * norm)


def poincare(curvature: float | Tensor = 1.0, clip: float = 4.0, eps: float = 1e-6) -> Poincare:
    """Hyperbolic scores: see :class:`Poincare`."""
    return Poincare(curvature, clip, eps)
