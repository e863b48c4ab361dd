"""Measure the peak extra memory of one benchmark implementation in a fresh process.

``python -m headwise.bench.memprobe '{"variant": "window128", "L": 16384, "backward": true,
"impl": "headwise tiled"}'`` prints one JSON line with ``peak_extra_bytes``: the growth of
the resident-set high-water mark over the RSS just before the call (CPU), or of
``max_memory_allocated`` (CUDA), during one call after the inputs exist. ``workspace_bytes``
subtracts what the call must return anyway (the output, and dq, dk, dv with backward).
"""

from __future__ import annotations

import json
import sys

import torch

from headwise.bench.harness import peak_rss_bytes, reset_peak_rss
from headwise.bench.kernels import Case, build, make_inputs


def _peak_of(fn, device: str) -> int:
    """Growth of the memory high-water mark during one call of ``fn``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = reset_peak_rss()
    fn()
    return peak_rss_bytes() - before


def module_probe(spec: dict) -> dict:
    """Peak extra memory of one module forward of :mod:`headwise.bench.modules`."""
    from headwise.bench.modules import gqa_fns, module_fns

    if "weights" in spec:
        fns = module_fns(str(spec["weights"]), int(spec.get("L", 1024)))
    else:
        fns = gqa_fns(int(spec.get("L", 4096)))
    fn = fns[spec["impl"]]
    fn()  # warm-up at full size: large blocks are returned to the OS when freed, thread pools are not
    return {"peak_extra_bytes": _peak_of(fn, "cpu")}


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("suite") == "modules":
        print(json.dumps(module_probe(spec)))
        return
    device = spec.get("device", "cpu")
    case = Case(spec["variant"], int(spec["L"]), bool(spec.get("backward", False)))
    # Warm up on a tiny case first: thread pools, kernel JITs and the autograd engine
    # allocate once per process, and that is not the memory of the measured call.
    tiny = Case(case.variant, min(case.L, 256), case.backward)
    warm = build(spec["impl"], tiny, *make_inputs(tiny, device), device)
    if isinstance(warm, str):
        print(json.dumps({"skipped": warm}))
        return
    warm()
    q, k, v = make_inputs(case, device)
    fn = build(spec["impl"], case, q, k, v, device)
    if isinstance(fn, str):  # e.g. skipped at this length only
        print(json.dumps({"skipped": fn}))
        return
    peak = _peak_of(fn, device)
    # What the call must hand back anyway: the output and, with backward, dq, dk, dv.
    returned = q.numel() // case.d * case.d * q.element_size()
    if case.backward:
        returned += sum(t.numel() * t.element_size() for t in (q, k, v))
    print(
        json.dumps({"peak_extra_bytes": peak, "returned_bytes": returned, "workspace_bytes": max(0, peak - returned)})
    )


if __name__ == "__main__":
    main(sys.argv[1])
