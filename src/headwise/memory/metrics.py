"""Latency and throughput of a memory's operations, exportable as JSON and Markdown.

Each operation name ("add", "search", "search_batch", "refine", ...) keeps the number of
calls, the number of items (vectors or queries) they handled, the busy time, and the
latencies of the last ``window`` calls for percentiles. Latencies are per call, in
microseconds; throughput is items per second of busy time (time spent inside the calls),
so idle gaps between calls do not lower it.

Example:
    >>> m = MetricsCollector()
    >>> m.record("search", 0.002, items=1)
    >>> m.record("search", 0.004, items=1)
    >>> s = m.summary()["search"]
    >>> s["count"], s["mean_us"], s["p50_us"], s["throughput_per_s"]
    (2, 3000.0, 3000.0, 333.3)
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass
class _Op:
    latencies_s: deque[float]
    calls: int = 0
    items: int = 0
    busy_s: float = 0.0


class _Timer:
    """The context manager of :meth:`MetricsCollector.timer`.

    A class rather than ``contextlib.contextmanager``: a served query passes through several
    timed stages, and a generator-based manager costs a few µs each.
    """

    __slots__ = ("_metrics", "_op", "_items", "_start")

    def __init__(self, metrics: MetricsCollector, op: str, items: int) -> None:
        self._metrics, self._op, self._items = metrics, op, items

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._metrics.record(self._op, time.perf_counter() - self._start, self._items)


class MetricsCollector:
    """Per-operation counters and latency samples (see the module docstring)."""

    def __init__(self, window: int = 100_000) -> None:
        self.window = window
        self._ops: dict[str, _Op] = {}
        self._guard = threading.Lock()  # concurrent searches record side by side

    def record(self, op: str, seconds: float, items: int = 1) -> None:
        """One call of ``op`` that took ``seconds`` and handled ``items`` vectors or queries."""
        with self._guard:
            entry = self._ops.get(op)
            if entry is None:
                entry = self._ops[op] = _Op(deque(maxlen=self.window))
            entry.latencies_s.append(seconds)
            entry.calls += 1
            entry.items += items
            entry.busy_s += seconds

    def timer(self, op: str, items: int = 1) -> _Timer:
        """Record the time spent in the ``with`` block (also when it raises: failed calls cost time too)."""
        return _Timer(self, op, items)

    def reset(self) -> None:
        with self._guard:
            self._ops.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per operation: count, items, mean/min/max/p50/p95/p99 latency (us), throughput (items/s)."""
        out: dict[str, dict[str, float]] = {}
        with self._guard:
            ops = [
                (name, op.calls, op.items, op.busy_s, list(op.latencies_s)) for name, op in sorted(self._ops.items())
            ]
        for name, calls, items, busy_s, latencies in ops:
            lat = np.asarray(latencies, dtype=np.float64) * 1e6
            p50, p95, p99 = np.percentile(lat, [50, 95, 99])
            out[name] = {
                "count": calls,
                "items": items,
                "total_ms": round(busy_s * 1e3, 3),
                "mean_us": round(float(lat.mean()), 1),
                "min_us": round(float(lat.min()), 1),
                "max_us": round(float(lat.max()), 1),
                "p50_us": round(float(p50), 1),
                "p95_us": round(float(p95), 1),
                "p99_us": round(float(p99), 1),
                "throughput_per_s": round(items / busy_s, 1) if busy_s > 0 else 0.0,
            }
        return out

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2)

    def to_markdown(self) -> str:
        """A Markdown table, one row per operation."""
        cols = ["count", "items", "mean_us", "p50_us", "p95_us", "p99_us", "throughput_per_s"]
        lines = ["| operation | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, s in self.summary().items():
            lines.append(f"| {name} | " + " | ".join(f"{s[c]:g}" for c in cols) + " |")
        return "\n".join(lines)
