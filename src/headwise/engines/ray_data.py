"""The Ray engine: the corpus jobs as Ray Data pipelines with an actor pool (extra ``headwise[ray]``).

- :meth:`RayEngine.embed`: texts, sorted by length as the in-process engine sorts them, become
  a dataset of ``{"index", "text"}`` rows in blocks of 256; ``map_batches`` runs
  :class:`~headwise.engines.batches.EmbedBatch` in a pool of ``workers`` actors, each of which
  loads MiniLM once; the driver puts each returned row back at its index.
- :meth:`RayEngine.analyze`: the analysis batches of
  :func:`~headwise.analysis.corpus.plan_analysis` become one row each; the actors run
  :class:`~headwise.engines.batches.AnalyzeBatch` and return each batch's partial sums, which
  the driver adds up in batch order (:func:`~headwise.analysis.corpus.combine`), exactly as the
  in-process loop does.

Ray is found in this order: a Ray already initialised in this process (used, left running);
``address`` (``--ray-address``) or ``$RAY_ADDRESS`` (a cluster: its head node must answer on
TCP before ``ray.init`` is tried, since Ray itself retries an unreachable address for minutes);
else a local Ray with ``num_cpus`` = the CPUs this process may use, no dashboard, a bounded
object store and a temporary directory, shut down and removed by :meth:`RayEngine.close`.

Shapes: N texts -> embeddings (N, 384) float32, L2-normalised.

Example (checking an address needs no Ray)::

    >>> RayEngine(address="no-port-here")
    Traceback (most recent call last):
    ...
    headwise.errors.HeadwiseError: --ray-address: expected host:port, ray://host:port or 'auto', got 'no-port-here'
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from headwise.engines import RAY_MISSING, ray_installed
from headwise.errors import HeadwiseError, bad_argument

OBJECT_STORE_BYTES = 256_000_000  # a local Ray's shared memory; Ray Data streams (and spills) beyond it
BLOCK_TEXTS = 256  # texts per Ray block when embedding: a multiple of the 128-text forward batches
CONNECT_TIMEOUT_S = 5.0
_QUIET_LOGGERS = {"ray": logging.WARNING, "ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}


def _import_ray() -> Any:
    if not ray_installed():
        raise bad_argument("--engine ray", RAY_MISSING, "no module named 'ray.data'")
    import ray
    import ray.data  # noqa: F401

    return ray


def check_address(address: str | None) -> str | None:
    """``address`` if it names a reachable Ray head node (or is ``auto`` / None), else a HeadwiseError.

    Reachable means a TCP connection to its host and port succeeds within 5 seconds.
    """
    if address is None or address.strip() == "":
        return None
    address = address.strip()
    if address == "auto":
        return address
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise bad_argument("--ray-address", "host:port, ray://host:port or 'auto'", repr(address))
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise bad_argument("--ray-address", "a reachable Ray cluster (its head node's host:port)",
                           f"{address!r} ({exc.strerror or exc})") from None  # fmt: skip
    return address


def local_cpus() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class RayEngine:
    """Runs the corpus jobs on Ray Data workers; a context manager (see the module docstring).

    Args:
        address: a Ray cluster (``host:port``, ``ray://host:port``, ``auto``); None reads
            ``$RAY_ADDRESS``, and without it a local Ray is started on first use.
        workers: actors in the pool (each loads MiniLM once, on one CPU); None: the
            cluster's CPUs, at most one per block of work.
        num_cpus: CPUs of a local Ray (default: those this process may use).
    """

    def __init__(self, address: str | None = None, workers: int | None = None, *, num_cpus: int | None = None) -> None:
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise bad_argument("workers", "a positive integer or None", workers)
        self.address = check_address(address if address is not None else os.environ.get("RAY_ADDRESS"))
        self.workers = workers
        self.num_cpus = num_cpus or local_cpus()
        self.started = False  # whether this engine called ray.init (and so shuts Ray down)
        self._temp_dir: str | None = None
        self._levels: dict[str, int] = {}

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Connect to or start Ray (once); a Ray already running in this process is reused."""
        ray = _import_ray()
        if not ray.is_initialized():
            if self.address is not None:
                try:
                    ray.init(address=self.address, logging_level=logging.WARNING)
                except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
                    raise bad_argument("--ray-address", "a Ray cluster that accepts this driver",
                                       f"{self.address!r} ({_first_line(exc)})") from None  # fmt: skip
            else:
                self._temp_dir = tempfile.mkdtemp(prefix="headwise-ray-")
                self._start_local(ray)
            self.started = True
        for name, level in _QUIET_LOGGERS.items():
            logger = logging.getLogger(name)
            self._levels.setdefault(name, logger.level)
            logger.setLevel(max(level, logger.getEffectiveLevel()))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # headwise draws its own bar from the returned batches

    def _start_local(self, ray: Any) -> None:
        """A local Ray; started twice at most: Ray gives its raylet a fixed 30 s to register, which a
        loaded 2-core machine can miss ("The current node timed out during startup")."""
        for attempt in (1, 2):
            try:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                         _temp_dir=self._temp_dir, logging_level=logging.ERROR)  # fmt: skip
                return
            except Exception as exc:  # Ray raises a bare Exception for this
                if attempt == 2 or "timed out during startup" not in str(exc):
                    raise
                ray.shutdown()

    def close(self) -> None:
        """Shut Ray down if this engine started it, and remove its temporary directory."""
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._levels = {}
        if self.started:
            import ray

            ray.shutdown()
            self.started = False
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pool_size(self, blocks: int) -> int:
        """Actors for ``blocks`` blocks of work: ``workers``, else the cluster's CPUs; never more than blocks."""
        import ray

        want = self.workers if self.workers is not None else int(ray.cluster_resources().get("CPU", 1))
        return max(1, min(want, blocks))

    # -- jobs -----------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], *, progress: bool = True, description: str = "encoding (ray)") -> np.ndarray:
        """MiniLM embeddings (N, 384) float32 of ``texts``, in their order (no cache: see memory.datasets.embed)."""
        from headwise.engines.batches import EmbedBatch
        from headwise.memory.datasets import ENCODE_BATCH
        from headwise.pretrained import MINILM_DIM, length_order

        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise bad_argument("texts", "a sequence of str", type(texts).__name__)
        out = np.full((len(texts), MINILM_DIM), np.nan, dtype=np.float32)
        if not texts:
            return out
        self.start()
        import ray

        order = length_order(texts)  # as encode() sorts: the same texts share a forward batch
        blocks = -(-len(texts) // BLOCK_TEXTS)
        ds = ray.data.from_items([{"index": i, "text": texts[i]} for i in order], override_num_blocks=blocks)
        ds = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"batch_size": ENCODE_BATCH}, batch_size=BLOCK_TEXTS,
                            compute=ray.data.ActorPoolStrategy(size=self.pool_size(blocks)), num_cpus=1)  # fmt: skip
        seen = 0
        for batch in self._results(ds, len(texts), progress, description):
            out[batch["index"]] = batch["embedding"]
            seen += len(batch["index"])
        if seen != len(texts) or np.isnan(out).any():
            raise HeadwiseError(f"ray engine: expected {len(texts)} embeddings back from the workers, got {seen}")
        return out

    def analyze(
        self,
        texts: Sequence[str],
        *,
        model: str = "minilm",
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        stats_only: bool = False,
        importance: bool = True,
        batch_size: int = 32,
        max_length: int = 128,
        progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        """:func:`headwise.analysis.corpus.analyze_texts` with its batches on the workers: the same CorpusAnalysis.

        ``model``: ``"minilm"`` or a transformers model directory every worker can read.
        """
        from headwise.analysis.corpus import BatchPartial, combine, plan_analysis
        from headwise.engines.batches import AnalyzeBatch

        config = model_config(model)
        plan, batches = plan_analysis(texts, config, layers=layers, heads=heads, stats_only=stats_only,
                                      importance=importance, batch_size=batch_size, max_length=max_length)  # fmt: skip
        self.start()
        import ray

        rows = [{"batch": i, "texts": [texts[j] for j in idx]} for i, idx in enumerate(batches)]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(AnalyzeBatch, fn_constructor_kwargs={"plan": plan.to_dict(), "model": model},
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=self.pool_size(len(rows))),
                            num_cpus=1)  # fmt: skip
        partials: dict[int, BatchPartial] = {}
        for batch in self._results(ds, len(rows), False, ""):
            for i, data in zip(batch["batch"], batch["partial"], strict=True):
                partials[int(i)] = BatchPartial.from_bytes(bytes(data))
            if progress is not None:
                progress(len(partials), len(rows))
        if sorted(partials) != list(range(len(rows))):
            raise HeadwiseError(f"ray engine: expected {len(rows)} analysed batches back, got {len(partials)}")
        return combine(plan, [partials[i] for i in range(len(rows))])

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _results(ds: Any, total: int, progress: bool, description: str) -> Iterator[dict[str, np.ndarray]]:
        """The output batches of ``ds`` as they arrive (a bar counts their rows); Ray's errors become one line."""
        import ray
        from rich.progress import Progress

        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task(description, total=total)
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    bar.update(task, advance=len(next(iter(batch.values()))))
                    yield batch
            except ray.exceptions.RayError as exc:
                raise HeadwiseError(f"ray engine: expected the batches to run on the workers, got "
                                    f"{type(exc).__name__}: {_first_line(exc, last=True)}") from None  # fmt: skip


def model_config(model: str) -> Any:
    """The transformers config of ``"minilm"`` or of a local model directory (no weights loaded)."""
    from pathlib import Path

    from transformers import AutoConfig

    from headwise.pretrained import minilm_path

    where = minilm_path() if model == "minilm" else Path(model)
    try:
        return AutoConfig.from_pretrained(where)
    except (OSError, ValueError, KeyError) as exc:
        raise bad_argument("--model", "a transformers model directory", f"{model!r} ({_first_line(exc)})") from None


def _first_line(exc: BaseException, *, last: bool = False) -> str:
    """One line of an exception's message (``last``: the final line, where Ray puts the worker's error)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Ray colours actor names
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1 if last else 0] if lines else type(exc).__name__)[:300]


__all__ = ["RayEngine", "check_address", "local_cpus", "model_config"]
