"""The backend registry: who can serve a request, and which one ``auto`` picks.

Each backend declares what it supports through :meth:`Backend.refusals` (a list of
reasons, empty when it can serve) and estimates its run time with :meth:`Backend.cost`.
An explicitly named backend that refuses raises :class:`HeadwiseError` with its reasons.
Nothing is activated on import except the built-in backends.

``auto`` runs the backend with the lowest estimate. The estimates are fitted on one machine
and can be off by 2x on another (FlexAttention against the tiled kernel differs between
CPU vendors), so a problem that recurs is *measured*: from its third call on (the same
shapes, dtype, device, mask and score kinds), a forward-only call without dropout runs each
serving backend whose estimate is within ``AUTO_EXPLORE_MARGIN`` of the lowest, four times
each in turn, timing every call, and then settles on the fastest by the median of its last
three times (its first call may compile or build a plan: it does not count, and one lucky
or unlucky run does not decide). A close race (runner-up within ``AUTO_EXPLORE_CLOSE`` of the
best) goes on to ``AUTO_EXPLORE_MAX_ROUNDS`` calls each before settling. Every exploring call does
the real work and returns its exact result; ``AttentionOutput.backend`` names the backend
that ran. Calls under autograd keep the estimate (their backward runs after ``attend``
returns, out of its sight). ``set_auto_exploration(False)`` keeps auto on estimates alone.

Example:
    >>> import torch
    >>> from headwise.attend import make_request
    >>> q = k = v = torch.randn(1, 2, 16, 8)
    >>> req = make_request(q, k, v, None, None, None, 0.0, True, False)
    >>> run(req).backend                  # weights: only eager and the reference serve them
    'eager'
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

from headwise.errors import HeadwiseError
from headwise.kernels.base import AttentionOutput, Backend, MaskCache, Request
from headwise.kernels.eager import EagerBackend
from headwise.kernels.flex import FlexBackend
from headwise.kernels.reference import ReferenceBackend
from headwise.kernels.sdpa import SdpaBackend
from headwise.kernels.tiled import TiledBackend

log = logging.getLogger("headwise.attend")

_BACKENDS: dict[str, Backend] = {}
# FlexAttention compiles for seconds on every new shape or mask: auto considers it only
# when the work is large enough for that to pay off over a few calls.
AUTO_FLEX_MIN_ELEMENTS = 1 << 22


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    if not isinstance(backend, Backend):
        raise HeadwiseError(f"backend: expected a headwise Backend instance, got {type(backend).__name__}")
    _BACKENDS[backend.name] = backend
    clear_choice_cache()


def backend_names() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise HeadwiseError(f"backend: expected one of {['auto', *_BACKENDS]}, got {name!r}") from None


def explain(req: Request) -> dict[str, list[str]]:
    """For every backend, the reasons it refuses ``req`` (empty list: it can serve it)."""
    return {name: b.refusals(req) for name, b in _BACKENDS.items()}


# Backends estimated within this factor of the cheapest are measured (see the module docstring).
AUTO_EXPLORE_MARGIN = 3.0
AUTO_EXPLORE_AFTER = 3  # the call of a recurring problem from which auto measures
AUTO_EXPLORE_ROUNDS = 4  # timed calls per contender: the first is dropped, the median of the rest counts
AUTO_EXPLORE_CLOSE = 1.25  # when the runner-up's median is within this factor of the best...
AUTO_EXPLORE_MAX_ROUNDS = 8  # ...each contender is timed up to this many times before settling
AUTO_MAX_CONTENDERS = 3
_EXPLORE = True


def set_auto_exploration(enabled: bool) -> None:
    """Turn auto's measuring of recurring problems on (the default) or off (estimates only)."""
    global _EXPLORE
    _EXPLORE = bool(enabled)
    clear_choice_cache()


@dataclass
class _AutoState:
    """auto's choice for one problem: the estimate's pick, and measurements once it recurs."""

    estimated: str
    contenders: tuple[str, ...]  # measured from the AUTO_EXPLORE_AFTER-th call; () never
    calls: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)
    settled: str | None = None

    def current(self) -> str:
        return self.settled or self.estimated

    def next(self) -> tuple[str, bool]:
        """The backend for the next call, and whether that call is timed."""
        self.calls += 1
        if self.settled is not None or not self.contenders or self.calls < AUTO_EXPLORE_AFTER:
            return self.current(), False
        return min(self.contenders, key=lambda n: len(self.times.get(n, []))), True

    def record(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)
        rounds = min(len(self.times.get(n, [])) for n in self.contenders)
        if rounds < AUTO_EXPLORE_ROUNDS or any(len(self.times.get(n, [])) > rounds for n in self.contenders):
            return
        # The first call of a backend may compile (flex) or build a plan (tiled): dropped.
        typical = {n: statistics.median(self.times[n][1:]) for n in self.contenders}
        best, runner_up = sorted(typical.values())[:2]
        # On a shared machine a kernel's times vary by 15-25%: a close race gets more samples
        # so that one noisy round does not decide it.
        if runner_up < AUTO_EXPLORE_CLOSE * best and rounds < AUTO_EXPLORE_MAX_ROUNDS:
            return
        self.settled = min(self.contenders, key=typical.__getitem__)
        measured = {n: f"{1e3 * t:.3g} ms" for n, t in typical.items()}
        log.debug("auto settled on %s (estimate: %s), measured %s", self.settled, self.estimated, measured)


def _new_state(req: Request) -> _AutoState:
    B, Hq, _, L, S, _, _ = req.shape
    ranked = sorted((b.cost(req), name) for name, b in _BACKENDS.items() if not b.refusals(req))
    if not ranked:  # the reference serves everything; only a custom registry gets here
        raise HeadwiseError("backend: no registered backend can serve this call: " + str(explain(req)))
    # FlexAttention compiles for seconds per new shape: a first call takes it only when large.
    first = [(c, n) for c, n in ranked if n != "flex" or B * Hq * L * S >= AUTO_FLEX_MIN_ELEMENTS] or ranked
    estimated = first[0][1]
    contenders: tuple[str, ...] = ()
    if _EXPLORE and not req.needs_grad and req.dropout_p == 0:
        close = [n for c, n in ranked if c <= AUTO_EXPLORE_MARGIN * ranked[0][0] and n != "reference"]
        contenders = tuple(close[:AUTO_MAX_CONTENDERS]) if len(close) > 1 else ()
    log.debug("auto estimated %s among %s; will measure %s", estimated, [n for _, n in ranked], contenders)
    return _AutoState(estimated, contenders)


def _state(req: Request) -> _AutoState:
    key = _choice_key(req)
    state = _CHOICES.get(key)
    if state is None:
        state = _new_state(req)
        _CHOICES.put(key, state, req.mask)  # an uncacheable mask (key None) is estimated afresh
    return state


def choose(req: Request, backend: str = "auto") -> Backend:
    """The backend the next call of ``req`` would run: the named one, or auto's current choice."""
    if backend != "auto":
        chosen = get_backend(backend)
        reasons = chosen.refusals(req)
        if reasons:
            raise HeadwiseError(f"backend: {backend!r} cannot serve this call: " + "; ".join(reasons))
        return chosen
    return _BACKENDS[_state(req).current()]


def run(req: Request, backend: str = "auto") -> AttentionOutput:
    """Run ``req`` on the named backend, or on auto's choice (measuring a recurring problem)."""
    if backend != "auto":
        return choose(req, backend).run(req)
    state = _state(req)
    name, timed = state.next()
    chosen = _BACKENDS[name]
    if not timed:
        return chosen.run(req)
    cuda = req.q.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(req.q.device)
    t0 = time.perf_counter()
    out = chosen.run(req)
    if cuda:
        torch.cuda.synchronize(req.q.device)
    state.record(name, time.perf_counter() - t0)
    return out


def settled_choice(req: Request) -> str | None:
    """The backend auto settled on for ``req`` after measuring it, or None (not yet, or never)."""
    state = _CHOICES.get(_choice_key(req))
    return None if state is None else state.settled


def auto_pending(req: Request) -> bool:
    """True while auto still has calls of ``req`` to measure (benchmarks warm up until False)."""
    state = _state(req)
    return bool(state.contenders) and state.settled is None


_CHOICES = MaskCache(256)


def clear_choice_cache() -> None:
    """Forget auto's choices and measurements (after changing a backend's cost model, say)."""
    _CHOICES.clear()


def _score_signature(score) -> tuple:
    """Backends accept or refuse scores by kind, so the kinds are what the choice needs."""
    if score is None:
        return ()
    return tuple(type(s).__name__ for s in getattr(score, "scores", (score,)))


def _choice_key(req: Request) -> tuple | None:
    """What the choice depends on; None when it must be made afresh (uncacheable mask).
    Device and dtype are part of it, so CPU and CUDA calls are measured apart.

    Asking every backend for refusals and costs takes ~0.2 ms: a tenth of a small call.
    """
    mask_key = req.mask.cache_key() if req.mask is not None else ("none",)
    if mask_key is None:
        return None
    return (
        req.shape,
        req.q.dtype,
        req.q.device,
        mask_key,
        _score_signature(req.score),
        req.dropout_p > 0,
        req.need_weights,
        req.need_stats,
        req.needs_grad,
        tuple(_BACKENDS),
    )


def backend_table() -> str:
    """A Markdown table of what each registered backend supports (used in docs/attend.md)."""
    features = list(next(iter(_BACKENDS.values())).capabilities)
    lines = ["| backend | " + " | ".join(features) + " |", "|---" * (len(features) + 1) + "|"]
    for name, b in _BACKENDS.items():
        lines.append(f"| `{name}` | " + " | ".join(b.capabilities.get(f, "?") for f in features) + " |")
    lines.append("")
    lines.extend(f"- `{name}`: {b.summary}" for name, b in _BACKENDS.items())
    return "\n".join(lines)


for _b in (ReferenceBackend(), EagerBackend(), TiledBackend(), SdpaBackend(), FlexBackend()):
    register_backend(_b)
