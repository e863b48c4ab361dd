"""Opt-in tuning: measured backend choices in a file per machine and torch version.

``auto`` never measures on its own (:mod:`headwise.kernels.registry`): its choice is a pure
function of the problem and the cost model. :func:`tune` times the backends that can serve a
problem (each once to warm up or compile, then ``rounds`` interleaved timed calls, median) and
records the fastest in the tuning file, which ``auto`` reads from then on: like Triton's
autotune cache, a user sees what was tuned (:func:`tuned`) and can delete it
(:func:`clear_tuning`).

The file is JSON, ``{"version": 1, "machine": ..., "torch": ..., "entries": {problem key:
{"backend", "median_ms": {backend: ms}, "rounds"}}}``, at ``$HEADWISE_TUNING_FILE`` or
``~/.cache/headwise/tuning/<machine>-torch<version>.json``. A problem key names the shapes,
dtype, device type, the mask's *structure* (``Mask.cache_key()``; a function mask has none
and cannot be tuned), the score kinds and the flags: equal keys mean the same problem in
every process.

Example:
    >>> import os, tempfile, torch
    >>> os.environ["HEADWISE_TUNING_FILE"] = os.path.join(tempfile.mkdtemp(), "tuning.json")
    >>> from headwise import causal
    >>> q = torch.randn(1, 2, 64, 16)
    >>> result = tune(q, q, q, mask=causal, rounds=2, backends=("eager", "tiled"))
    >>> result["backend"] in ("eager", "tiled"), sorted(result["median_ms"])
    (True, ['eager', 'tiled'])
    >>> len(tuned()) == 1 and clear_tuning()
    True
    >>> del os.environ["HEADWISE_TUNING_FILE"]
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from headwise.caches import on_clear
from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import write_atomic
from headwise.kernels.base import Request

TUNING_VERSION = 1
#: The environment variable naming the tuning file (else a file per machine and torch version).
TUNING_ENV = "HEADWISE_TUNING_FILE"
_LOADED: dict[str, Any] = {"path": None, "mtime": None, "entries": {}}
on_clear("tuning.loaded_file", lambda: _LOADED.update(path=None, mtime=None, entries={}))


@functools.lru_cache(maxsize=1)  # the machine does not change under a process; auto asks on every call
def machine_id() -> str:
    """CPU model and core count (and the GPU's name), hashed: what a tuned choice depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
    text = f"{cpu}|{os.cpu_count()}|{gpu}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tuning_file() -> Path:
    """Where tuned choices are kept: ``$HEADWISE_TUNING_FILE`` or a file per machine and torch version."""
    env = os.environ.get(TUNING_ENV)
    if env:
        return Path(env)
    version = torch.__version__.split("+")[0]
    return Path.home() / ".cache" / "headwise" / "tuning" / f"{machine_id()}-torch{version}.json"


def problem_key(req: Request) -> str | None:
    """A string that names ``req``'s problem in every process, or None (a function mask: no structure)."""
    mask_key = req.mask.cache_key() if req.mask is not None else ("none",)
    if mask_key is None or (isinstance(mask_key, tuple) and mask_key and mask_key[0] == "id"):
        return None
    score = () if req.score is None else tuple(type(s).__name__ for s in getattr(req.score, "scores", (req.score,)))
    parts = (req.shape, str(req.q.dtype), req.q.device.type, mask_key, score, req.dropout_p > 0,
             req.need_weights, req.need_stats, req.needs_grad)  # fmt: skip
    return repr(parts)


def _entries() -> dict[str, Any]:
    """The tuning file's entries, re-read when the file changed (another process tuned)."""
    path = tuning_file()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = None
    if _LOADED["path"] != path or _LOADED["mtime"] != mtime:
        entries: dict[str, Any] = {}
        if mtime is not None:
            try:
                data = json.loads(path.read_text())
                if isinstance(data, dict) and data.get("version") == TUNING_VERSION:
                    entries = dict(data.get("entries", {}))
            except (OSError, ValueError):
                entries = {}  # an unreadable tuning file is ignored: auto falls back to its cost model
        _LOADED.update(path=path, mtime=mtime, entries=entries)
    return _LOADED["entries"]


def tuned_backend(req: Request) -> str | None:
    """The backend tuned for ``req``'s problem, or None."""
    key = problem_key(req)
    entry = _entries().get(key) if key is not None else None
    return entry.get("backend") if isinstance(entry, dict) else None


def tuned() -> dict[str, Any]:
    """Every tuned problem key and its entry."""
    return dict(_entries())


def clear_tuning() -> bool:
    """Delete the tuning file (auto goes back to its cost model); True if there was one."""
    path = tuning_file()
    existed = path.exists()
    path.unlink(missing_ok=True)
    _LOADED.update(path=None, mtime=None, entries={})
    from headwise.kernels.registry import clear_choice_cache

    clear_choice_cache()
    return existed


def _time_backends(req: Request, names: Sequence[str], rounds: int) -> dict[str, float]:
    from headwise.kernels.registry import get_backend

    cuda = req.q.device.type == "cuda"
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up: a first call may compile (flex) or build a plan (tiled)
        get_backend(n).run(req)
    for r in range(rounds):
        order = list(names[r % len(names) :]) + list(names[: r % len(names)])  # no fixed neighbour
        for n in order:
            if cuda:
                torch.cuda.synchronize(req.q.device)
            t0 = time.perf_counter()
            get_backend(n).run(req)
            if cuda:
                torch.cuda.synchronize(req.q.device)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def tune_request(req: Request, *, rounds: int = 5, backends: Sequence[str] | None = None) -> dict[str, Any]:
    """Time the backends that serve ``req`` and record the fastest; see :func:`tune`."""
    from headwise.kernels.registry import backend_names, clear_choice_cache, get_backend

    if not isinstance(rounds, int) or isinstance(rounds, bool) or not 1 <= rounds <= 1000:
        raise bad_argument("rounds", "an integer in [1, 1000]", repr(rounds))
    key = problem_key(req)
    if key is None:
        raise bad_argument("mask", "a structured mask (causal, sliding_window, ...) to tune", "a function mask")
    if req.needs_grad:
        raise bad_argument("q, k, v", "tensors without requires_grad (tune times the forward)", "requires_grad")
    names = [n for n in (backends or backend_names()) if n != "reference"]
    serving = [n for n in names if not get_backend(n).refusals(req)]
    if not serving:
        raise HeadwiseError(f"tune: none of {names} can serve this call")
    with torch.no_grad():
        medians = _time_backends(req, serving, rounds)
    best = min(medians, key=medians.__getitem__)
    entry = {"backend": best, "median_ms": {n: round(1e3 * t, 4) for n, t in medians.items()}, "rounds": rounds}
    path = tuning_file()
    entries = dict(_entries())
    entries[key] = entry
    data = {"version": TUNING_VERSION, "machine": machine_id(), "torch": torch.__version__, "entries": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True))
    _LOADED.update(path=None)  # re-read on the next lookup
    clear_choice_cache()
    return {"key": key, **entry, "file": str(path)}


def tune(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Any = None,
    score: Any = None,
    scale: float | None = None,
    need_weights: bool | str = False,
    need_stats: bool = False,
    rounds: int = 5,
    backends: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Time every backend that serves this ``attend`` problem and record the fastest for ``auto``.

    The arguments are ``attend``'s (q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), a
    structured mask, scores, flags); ``backends`` restricts the contenders (default: all but
    the reference). Each contender runs once to warm up (FlexAttention compiles here, not in
    your loop), then ``rounds`` times interleaved. Returns ``{"key", "backend", "median_ms",
    "rounds", "file"}``; the choice is written to :func:`tuning_file`.
    """
    from headwise.attend import make_request

    req = make_request(q, k, v, mask, score, scale, 0.0, need_weights, need_stats)
    return tune_request(req, rounds=rounds, backends=backends)
