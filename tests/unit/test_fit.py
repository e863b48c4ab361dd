"""fit_enhancer: an enhancer trained on a VectorMemory's own contents, saved next to it."""

from __future__ import annotations

import numpy as np
import pytest

from headwise import HeadwiseError
from headwise.memory import VectorMemory
from headwise.memory.architecture import EnhancerConfig
from headwise.memory.enhancer import QueryEnhancer
from headwise.memory.fit import FitConfig, fit_enhancer, load_saved_enhancer, save_enhancer


def _memory_and_queries(tmp_path=None, n=3000, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    mem = VectorMemory(dim, path=tmp_path)
    docs = rng.standard_normal((n, dim)).astype(np.float32)
    ids = mem.add(docs, ids=np.arange(1000, 1000 + n))
    # queries: a fixed linear distortion of their document, which a linear adapter can undo
    A = np.eye(dim, dtype=np.float32) + 1.5 * rng.standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim)
    queries = mem.vectors(ids[:200]) @ A
    return mem, ids, queries


def test_fit_improves_recall_and_round_trips(tmp_path):
    mem, ids, queries = _memory_and_queries(tmp_path)
    relevant = [[int(i)] for i in ids[:200]]
    cfg = FitConfig(method="multi-head", steps=60, multi_head_steps=20, batch_size=32, eval_every=20,
                    enhancer=EnhancerConfig(candidates=8, heads=4), lr=1e-2)  # fmt: skip
    enh, hist = fit_enhancer(mem, queries, relevant, cfg, progress=False)
    assert isinstance(enh, QueryEnhancer) and set(hist) == {"linear", "multi-head"}
    assert hist["linear"].best_recall > hist["linear"].records[0]["val_recall@10"]
    mem.set_enhancer(enh)
    _, found = mem.search(queries, 10)
    _, raw = mem.search(queries, 10, enhance=False)
    hit = lambda res: np.mean([r in row for r, row in zip(ids[:200], res)])  # noqa: E731
    assert hit(found) > hit(raw)
    mem.save()
    where = save_enhancer(mem, enh)
    assert (where / "enhancer.safetensors").is_file()
    mem.close()
    back = VectorMemory.open(tmp_path)
    load_saved_enhancer(back)
    assert np.array_equal(back.search(queries, 10)[1], found)


def test_fit_refuses_bad_input():
    mem, ids, queries = _memory_and_queries()
    with pytest.raises(HeadwiseError, match="one entry per query"):
        fit_enhancer(mem, queries, [[int(ids[0])]], progress=False)
    with pytest.raises(HeadwiseError, match="ids stored in the memory"):
        fit_enhancer(mem, queries[:2], [[1], [2]], progress=False)
    with pytest.raises(HeadwiseError, match="grade > 0"):
        fit_enhancer(mem, queries[:2], [{int(ids[0]): 0}, [int(ids[1])]], progress=False)
    with pytest.raises(HeadwiseError, match="config.method"):
        fit_enhancer(mem, queries, [[int(i)] for i in ids[:200]], FitConfig(method="flash"), progress=False)
    with pytest.raises(HeadwiseError, match="queries"):
        fit_enhancer(mem, queries[:, :3], [[int(i)] for i in ids[:200]], progress=False)
    with pytest.raises(HeadwiseError, match="directory"):
        save_enhancer(mem, object())
    with pytest.raises(HeadwiseError, match="encoder"):
        fit_enhancer(mem, ["a text", "another"], [[int(ids[0])], [int(ids[1])]], progress=False)
