"""Peak extra memory of attend() calls, measured in a fresh process (report section 6).

``python -m headwise.report.memprobe '{"backend": "reference", "lengths": [1024, 4096]}'``
prints one JSON line with a record per length, shortest first: ``peak_extra_bytes`` is the
growth of the resident-set high-water mark over the RSS just before the call (inputs
already allocated, a warm-up call at L=256 first), torch.no_grad, float32, B=1, H=1, d=64.
Run it with ``MALLOC_MMAP_THRESHOLD_=65536`` (as :func:`measure` does) so that glibc maps
and unmaps every large buffer: each length then starts from the same resident set. A
length whose peak a*L^2 (a from the previous length) would exceed ``budget_bytes`` is
skipped and reported with its prediction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from headwise.attend import attend
from headwise.bench.harness import peak_rss_bytes, reset_peak_rss


def probe(spec: dict) -> list[dict]:
    """Measure one call per length; ``spec``: backend, lengths, optional budget_bytes, H, d."""
    backend, H, d = spec["backend"], int(spec.get("H", 1)), int(spec.get("d", 64))
    budget = float(spec.get("budget_bytes", float("inf")))
    g = torch.Generator().manual_seed(0)
    records: list[dict] = []
    with torch.no_grad():
        attend(*(torch.randn(1, H, 256, d, generator=g) for _ in range(3)), backend=backend)
        for L in sorted(int(x) for x in spec["lengths"]):
            if records and backend == "reference":
                last = records[-1]
                predicted = last["peak_extra_bytes"] * (L / last["L"]) ** 2
                if predicted > budget:
                    records.append({"L": L, "skipped": True, "predicted_bytes": predicted})
                    break
            q, k, v = (torch.randn(1, H, L, d, generator=g) for _ in range(3))
            before = reset_peak_rss()
            out = attend(q, k, v, backend=backend).out
            peak = peak_rss_bytes() - before
            records.append({"L": L, "peak_extra_bytes": peak, "output_bytes": out.numel() * out.element_size()})
            del q, k, v, out
    return records


def measure(spec: dict, timeout: float = 600.0) -> list[dict]:
    """Run :func:`probe` in a fresh Python process with a fixed mmap threshold."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, "-m", "headwise.report.memprobe", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise RuntimeError(f"memory probe {spec} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
