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


def test_the_batched_call_is_split_into_the_stages_of_an_enhanced_search():
    from headwise.bench.memory import STAGES, store_latency
    from headwise.memory.enhancer import QueryEnhancer

    docs = _unit_vectors(400, 32)
    enhancers = {"knn": None, "multi-head": QueryEnhancer(32, heads=4, candidates=8).eval()}
    t = store_latency(docs, docs[:16], enhancers, index="hnsw", single=4, batch=16)
    plain, enhanced = t["knn"]["batch_stage_us"], t["multi-head"]["batch_stage_us"]
    # A plain search has no stages of its own: all of it is the one index search ("other").
    assert set(plain) == {"other", "total"} and plain["other"] == pytest.approx(plain["total"])
    assert set(enhanced) == {*STAGES, "other", "total"}
    assert all(enhanced[s] > 0 for s in STAGES)
    # Medians over the same calls: in every call the whole exceeds each part, so do the medians.
    assert all(enhanced["total"] >= enhanced[s] for s in STAGES)
