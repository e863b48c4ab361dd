"""Run the stateful fuzzer of the vector memory once, long, and print what it checked.

Usage: ``HEADWISE_FUZZ_EXAMPLES=1000 .venv/bin/python scripts/fuzz_memory.py``; docs/memory.md quotes
its output (benchmarks/results/memory_fuzz.txt). CI runs the same test with 25 examples.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent / "tests" / "property"

if __name__ == "__main__":
    sys.path.insert(0, str(TESTS))
    start = time.perf_counter()
    rc = pytest.main(["-q", "-x", str(TESTS / "test_memory_stateful.py")])
    import test_memory_stateful as fuzz  # the module pytest ran: its step counter

    examples = int(os.environ.get("HEADWISE_FUZZ_EXAMPLES", "25"))
    verdict = "0 divergences" if rc == 0 else "a divergence (see above)"
    print(f"exit {int(rc)}: {3 * examples:,} sequences (flat, hnsw, hnsw-fp16), {fuzz.STEPS[0]:,} checked steps, "
          f"{verdict}, {time.perf_counter() - start:.0f} s")  # fmt: skip
    sys.exit(int(rc))
