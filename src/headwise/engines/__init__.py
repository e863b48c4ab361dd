"""Where the corpus jobs run: in this process (``local``) or on Ray Data workers (``ray``).

``headwise memory build`` (embedding) and ``headwise analyze --file`` (per-head analysis) take
``--engine local|ray``, ``--ray-address`` and ``--workers``. Both engines call the same
per-batch code (:mod:`headwise.engines.batches`), so their outputs agree; the Ray engine
(:mod:`headwise.engines.ray_data`, extra ``headwise[ray]``) only moves batches to workers.
Nothing here imports ray: :func:`check_engine` looks for it without importing it.

Example:
    >>> check_engine("local", None, None)
    'local'
    >>> check_engine("spark", None, None)
    Traceback (most recent call last):
    ...
    headwise.errors.HeadwiseError: --engine: expected one of ('local', 'ray'), got 'spark'
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from headwise.errors import bad_argument

if TYPE_CHECKING:  # pragma: no cover - typing only
    from headwise.engines.ray_data import RayEngine

ENGINES = ("local", "ray")
MAX_WORKERS = 1024
ENGINE_HELP = "Where the batches run: 'local' (this process) or 'ray' (Ray Data workers; needs the ray extra)."
ADDRESS_HELP = (
    "With --engine ray: a cluster (host:port, ray://host:port, auto); default $RAY_ADDRESS, else a local Ray."
)
WORKERS_HELP = (
    f"With --engine ray: actors, each loading the model once (1 to {MAX_WORKERS}; default: the cluster's CPUs)."
)
RAY_MISSING = "the extra headwise[ray] (pip install 'headwise[ray]')"


def ray_installed() -> bool:
    """Whether ``import ray.data`` can work (checked without importing ray)."""
    try:
        return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None
    except (ImportError, ValueError):
        return False


def check_engine(engine: str, ray_address: str | None, workers: int | None) -> str:
    """``engine`` if it and the Ray options fit together, else a HeadwiseError naming the option.

    The Ray options are refused with ``--engine local`` (they would be silently ignored), and
    ``--engine ray`` without ray installed names the extra to install.
    """
    if engine not in ENGINES:
        raise bad_argument("--engine", f"one of {ENGINES}", repr(engine))
    if engine == "local":
        for name, value in (("--ray-address", ray_address), ("--workers", workers)):
            if value is not None:
                raise bad_argument(name, "--engine ray as well", f"{name} {value} with --engine local")
        return engine
    if workers is not None and (isinstance(workers, bool) or not 1 <= workers <= MAX_WORKERS):
        raise bad_argument("--workers", f"an integer in [1, {MAX_WORKERS}]", workers)
    if not ray_installed():
        raise bad_argument("--engine ray", RAY_MISSING, "no module named 'ray.data'")
    return engine


def make_engine(engine: str, ray_address: str | None, workers: int | None) -> RayEngine | None:
    """None for ``local``; for ``ray`` a :class:`~headwise.engines.ray_data.RayEngine`, checked but not started.

    The address (``--ray-address``, else ``$RAY_ADDRESS``) is checked now (a TCP connection to
    its head node), so that an unreachable cluster fails before the work, not in Ray's retries.
    """
    if check_engine(engine, ray_address, workers) == "local":
        return None
    from headwise.engines.ray_data import RayEngine

    return RayEngine(address=ray_address, workers=workers)


__all__ = ["ENGINES", "check_engine", "make_engine", "ray_installed"]
