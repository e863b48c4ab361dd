"""Timing and memory measurement shared by every benchmark suite.

Fairness on a small, possibly shared machine: all implementations of one case run
interleaved (A B C, B C A, C A B, ...) in one process after a warm-up, so a burst of load hits them
alike; each figure is the median of ``repeat`` runs with its p95, standard deviation and
coefficient of variation (CV). Peak memory is measured for real, in a fresh subprocess
(``ru_maxrss`` growth on CPU, ``max_memory_allocated`` on CUDA), never estimated.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Seconds of repeated runs of one implementation on one case."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def mean(self) -> float:
        return statistics.mean(self.times)

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile (``p`` in 0..100) of the run times."""
        s = sorted(self.times)
        return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]

    @property
    def p95(self) -> float:
        return self.percentile(95)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def std(self) -> float:
        return statistics.stdev(self.times) if len(self.times) > 1 else 0.0

    @property
    def cv(self) -> float:
        """Coefficient of variation in percent."""
        return 100.0 * self.std / statistics.mean(self.times) if self.times else 0.0

    def record(self, items: float | None = None) -> dict[str, float | list[float]]:
        """JSON-ready figures in milliseconds; ``items`` per call (queries, tokens) adds throughput per second."""
        rec: dict[str, float | list[float]] = {
            "mean_ms": self.mean * 1e3,
            "median_ms": self.median * 1e3,
            "p95_ms": self.p95 * 1e3,
            "p99_ms": self.p99 * 1e3,
            "std_ms": self.std * 1e3,
            "cv_pct": self.cv,
            "times_ms": [t * 1e3 for t in self.times],
        }
        if items is not None:
            rec["throughput_per_s"] = items / self.median
        return rec


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeat: int,
    warmup: int = 1,
    device: str = "cpu",
    min_seconds: float = 0.0,
    max_rounds: int | None = None,
) -> dict[str, Timing]:
    """Run every function ``warmup`` times, then rounds of one call each, in rotating order.

    At least ``repeat`` rounds; more (up to ``max_rounds``, default 5 x repeat) until the
    rounds took ``min_seconds`` in all, so fast cases get enough samples for a stable median.
    The i-th time of every function comes from the same round: ratios of paired times
    (:func:`paired_ratio`) cancel a drift of the machine's speed between rounds.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    out = {name: Timing() for name in fns}
    max_rounds = max(repeat, max_rounds if max_rounds is not None else 5 * repeat)
    start, rounds = time.perf_counter(), 0
    names = list(fns)
    while rounds < repeat or (rounds < max_rounds and time.perf_counter() - start < min_seconds):
        # Each round starts one function later, so no function always runs right after the
        # same neighbour (whose caches, allocations and clock it would inherit).
        shift = rounds % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out[name].times.append(time.perf_counter() - t0)
        rounds += 1
    return out


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i], for times taken in the same interleaved rounds."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio: expected two equally long non-empty lists, got {len(a)} and {len(b)}")
    return statistics.median(x / y for x, y in zip(a, b))


def machine_info() -> dict[str, object]:
    """Versions, CPU, threads and load: recorded with every result file."""
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "load_average": os.getloadavg(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def wait_for_quiet(max_load: float = 0.6, timeout: float = 120.0) -> float:
    """Wait (up to ``timeout`` s) until the 1-minute load average is below ``max_load``."""
    t0 = time.time()
    while os.getloadavg()[0] > max_load and time.time() - t0 < timeout:
        time.sleep(5)
    return os.getloadavg()[0]


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> int:
    """Reset the resident-set high-water mark to the current RSS; return that RSS in bytes.

    Linux resets VmHWM when "5" is written to /proc/self/clear_refs; elsewhere the mark
    cannot be reset and the process-lifetime maximum (``ru_maxrss``) is the baseline.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        kib = _status_kib("VmRSS")
        if kib is not None:
            return kib * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """High-water resident set size of this process in bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_in_subprocess(module: str, spec: dict, timeout: float = 600.0) -> dict:
    """Run ``python -m module '<json spec>'`` in a fresh process and parse its JSON line."""
    proc = subprocess.run(
        [sys.executable, "-m", module, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
