"""The backend registry: who can serve a request, and which one ``auto`` picks.

Each backend declares what it supports through :meth:`Backend.refusals` (a list of
reasons, empty when it can serve) and estimates its run time with :meth:`Backend.cost`.
An explicitly named backend that refuses raises :class:`HeadwiseError` with its reasons.
Nothing is activated on import except the built-in backends.

``auto`` is deterministic: its choice is a pure function of the problem (shapes, dtype,
device, mask structure, score kinds, flags) and of what this machine was *tuned* for. In
order: the backend recorded for this problem by :func:`headwise.tune` (the tuning file, see
:mod:`headwise.kernels.tuning`) if it still serves the call; else the serving backend with
the lowest cost estimate, where FlexAttention, which compiles for seconds per new shape or
mask, is considered only for work of at least ``AUTO_FLEX_MIN_ELEMENTS`` scores. The same
call picks the same backend on every call, so repeated calls give bitwise identical results;
nothing is timed behind the user's back. :func:`decide` says why (``plan.explain()``).

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
import os
from dataclasses import dataclass

from headwise.caches import BoundedCache
from headwise.errors import HeadwiseError
from headwise.kernels.base import AttentionOutput, Backend, Request
from headwise.kernels.eager import EagerBackend
from headwise.kernels.flex import FlexBackend
from headwise.kernels.reference import ReferenceBackend
from headwise.kernels.sdpa import SdpaBackend
from headwise.kernels.tiled import TiledBackend
from headwise.kernels.tuning import TUNING_ENV, tuned_backend

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


@dataclass(frozen=True)
class Decision:
    """auto's choice for one problem and its reasons: ``ranking`` is (backend, estimated cost)
    of every serving backend, cheapest first; ``refused`` the others with their reasons."""

    backend: str
    why: str
    ranking: tuple[tuple[str, float], ...]
    refused: tuple[tuple[str, tuple[str, ...]], ...]


def _decide(req: Request) -> Decision:
    B, Hq, _, L, S, _, _ = req.shape
    refusals = {name: b.refusals(req) for name, b in _BACKENDS.items()}
    ranked = sorted((b.cost(req), name) for name, b in _BACKENDS.items() if not refusals[name])
    refused = tuple((n, tuple(r)) for n, r in refusals.items() if r)
    if not ranked:  # the reference serves everything; only a custom registry gets here
        raise HeadwiseError("backend: no registered backend can serve this call: " + str(explain(req)))
    ranking = tuple((n, c) for c, n in ranked)
    tuned = tuned_backend(req)
    if tuned is not None and tuned in _BACKENDS and not refusals[tuned]:
        return Decision(tuned, "tuned on this machine (headwise.tune; the tuning file)", ranking, refused)
    # FlexAttention compiles for seconds per new shape: auto takes it only for large work.
    small = B * Hq * L * S < AUTO_FLEX_MIN_ELEMENTS
    first = [(c, n) for c, n in ranked if n != "flex" or not small] or ranked
    why = "the lowest cost estimate among the backends that serve the call"
    if small and ranked[0][1] == "flex" and first[0][1] != "flex":
        why += f" (flex skipped: below {AUTO_FLEX_MIN_ELEMENTS:,} scores its compile does not pay off)"
    return Decision(first[0][1], why, ranking, refused)


def decide(req: Request) -> Decision:
    """auto's :class:`Decision` for ``req`` (cached per problem: it is a pure function of it)."""
    key = _choice_key(req)
    decision = _CHOICES.get(key)
    if decision is None:
        decision = _decide(req)
        _CHOICES.put(key, decision, req.mask)  # an uncacheable mask (key None) is decided afresh
        log.debug("auto chose %s for %s: %s", decision.backend, req.shape, decision.why)
    return decision


def choose(req: Request, backend: str = "auto") -> Backend:
    """The backend a call of ``req`` runs: the named one, or auto's choice."""
    if backend != "auto":
        chosen = get_backend(backend)
        reasons = chosen.refusals(req)
        if reasons:
            raise HeadwiseError(f"backend: {backend!r} cannot serve this call: " + "; ".join(reasons))
        return chosen
    return _BACKENDS[decide(req).backend]


def run(req: Request, backend: str = "auto") -> AttentionOutput:
    """Run ``req`` on the named backend, or on auto's choice."""
    return choose(req, backend).run(req)


_CHOICES = BoundedCache("attend.decisions", 256)


def clear_choice_cache() -> None:
    """Forget auto's cached decisions (after changing a backend's cost model or the tuning file)."""
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
        _tuning_stamp(),
    )


def _tuning_stamp() -> object:
    """Which tuning file auto reads: ``$HEADWISE_TUNING_FILE``, else the default, fixed per process
    (the environment variable, not the path: this runs on every call)."""
    return os.environ.get(TUNING_ENV)


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
