"""Per-mechanism latency of the vector memory: one row per (store size, method), real footprints."""

from __future__ import annotations

import numpy as np
import pytest

from headwise import HeadwiseError
from headwise.bench.memory import mechanism_latency


def _unit_vectors(n: int, d: int) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_every_mechanism_is_timed_at_every_store_size():
    docs = _unit_vectors(600, 32)
    rows = mechanism_latency(docs, docs[:12], sizes=(200, 600), mechanisms=("multi-head", "moe"), single=6, batch=12)
    assert [(r["stored"], r["method"]) for r in rows] == [
        (n, m) for n in (200, 600) for m in ("none", "multi-head", "moe")
    ]
    for r in rows:
        assert r["p95_us"] >= r["p50_us"] > 0 and r["batch_qps"] > 0
        # Measured from the store (index + SQLite), so above the raw float32 vector.
        assert r["bytes_per_vector"] > 32 * 4


def test_store_sizes_beyond_the_corpus_are_rejected():
    docs = _unit_vectors(50, 8)
    with pytest.raises(HeadwiseError, match="sizes"):
        mechanism_latency(docs, docs[:4], sizes=(100,), mechanisms=("multi-head",), single=2, batch=4)
