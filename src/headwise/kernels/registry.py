"""The backend registry: who can serve a request, and which one ``auto`` picks.

Each backend declares what it supports through :meth:`Backend.refusals` (a list of
reasons, empty when it can serve) and estimates its run time with :meth:`Backend.cost`.
``auto`` runs the cheapest backend that does not refuse; an explicitly named backend that
refuses raises :class:`HeadwiseError` with its reasons. Nothing is activated on import
except the built-in backends.
"""

from __future__ import annotations

import logging

from headwise.errors import HeadwiseError
from headwise.kernels.base import Backend, MaskCache, Request
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


def choose(req: Request, backend: str = "auto") -> Backend:
    """The backend that will run ``req``: the named one, or the cheapest that serves it."""
    if backend != "auto":
        chosen = get_backend(backend)
        reasons = chosen.refusals(req)
        if reasons:
            raise HeadwiseError(f"backend: {backend!r} cannot serve this call: " + "; ".join(reasons))
        return chosen
    key = _choice_key(req)
    cached = _CHOICES.get(key)
    if cached is not None:
        return _BACKENDS[cached]
    B, Hq, _, L, S, _, _ = req.shape
    candidates = []
    for name, b in _BACKENDS.items():
        if b.refusals(req):
            continue
        if name == "flex" and B * Hq * L * S < AUTO_FLEX_MIN_ELEMENTS:
            continue
        candidates.append((b.cost(req), name, b))
    if not candidates:  # the reference serves everything; only a custom registry gets here
        raise HeadwiseError("backend: no registered backend can serve this call: " + str(explain(req)))
    cost, name, chosen = min(candidates, key=lambda c: c[0])
    log.debug("auto chose %s (estimated %.3g s) among %s", name, cost, [c[1] for c in candidates])
    _CHOICES.put(key, name, req.mask)
    return chosen


_CHOICES = MaskCache(256)


def clear_choice_cache() -> None:
    """Forget auto's cached choices (after changing a backend's cost model, say)."""
    _CHOICES.clear()


def _score_signature(score) -> tuple:
    """Backends accept or refuse scores by kind, so the kinds are what the choice needs."""
    if score is None:
        return ()
    return tuple(type(s).__name__ for s in getattr(score, "scores", (score,)))


def _choice_key(req: Request) -> tuple | None:
    """What the choice depends on; None when it must be made afresh (uncacheable mask).

    Asking every backend for refusals and costs takes ~0.2 ms: a tenth of a small call.
    """
    mask_key = req.mask.cache_key() if req.mask is not None else ("none",)
    if mask_key is None:
        return None
    return (
        req.shape,
        req.q.dtype,
        str(req.q.device),
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
