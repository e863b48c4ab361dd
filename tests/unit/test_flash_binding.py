"""A "flash" enhancer bound to a store follows its records (#20 item 6), and the bench times it."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from headwise import HeadwiseError
from headwise.memory import VectorMemory
from headwise.memory.binding import StoreBinding, store_state
from headwise.memory.checks import normalise_rows
from headwise.memory.enhancer import QueryEnhancer


def _flash(dim: int = 16) -> QueryEnhancer:
    enh = QueryEnhancer(dim, mechanism="flash", heads=4).eval()
    torch.nn.init.normal_(enh.mix.weight, std=0.5)  # a read-out that moves the query (untrained: identity)
    return enh


def _reference(enh: QueryEnhancer, mem: VectorMemory, q: np.ndarray) -> np.ndarray:
    """The refined queries of a copy of ``enh`` bound to the store's vectors as an array, now."""
    ref = QueryEnhancer(enh.dim, mechanism="flash", heads=enh.heads).eval()
    ref.load_state_dict(enh.state_dict())
    ref.bind(mem.vectors(mem.ids()))
    return normalise_rows(ref.refine(q), "ref")


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_a_flash_enhancer_bound_to_a_store_follows_adds_and_deletes(index):
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((400, 16)).astype(np.float32)
    q = normalise_rows(rng.standard_normal((5, 16)).astype(np.float32), "q")
    mem = VectorMemory(16, index=index)
    mem.add(docs[:100])
    enh = _flash().bind(mem)
    mem.set_enhancer(enh)
    before = mem.refine_queries(q)
    np.testing.assert_allclose(before, _reference(enh, mem, q), atol=1e-6)
    mem.add(docs[100:])  # the read-out now attends over 400 vectors, not the 100 it first read
    after_add = mem.refine_queries(q)
    np.testing.assert_allclose(after_add, _reference(enh, mem, q), atol=1e-6)
    assert np.abs(after_add - before).max() > 1e-3
    mem.delete(np.arange(0, 400, 2))  # past the compaction threshold too
    np.testing.assert_allclose(mem.refine_queries(q), _reference(enh, mem, q), atol=1e-6)
    # a search runs the same read-out as refine_queries
    assert mem.search(q, 5)[1].shape == (5, 5)


def test_the_state_changes_with_every_change_of_the_records():
    mem = VectorMemory(2, metric="l2")
    states = [store_state(mem)]
    mem.add(np.ones((3, 2), dtype=np.float32))
    states.append(store_state(mem))
    mem.delete([2])
    states.append(store_state(mem))
    mem.add(np.ones((1, 2), dtype=np.float32))  # the same count again
    states.append(store_state(mem))
    mem.delete([3])
    mem._index.compact()
    assert len(set(states)) == len(states)
    assert store_state(mem) != states[1]  # 2 records again, not the first 3
    assert store_state(mem) == store_state(mem)


def test_binding_holds_the_store_weakly_and_says_when_it_is_gone():
    mem = VectorMemory(4)
    mem.add(np.eye(4, dtype=np.float32))
    binding = StoreBinding(mem)
    assert binding.vectors().shape == (4, 4)
    del mem
    gc.collect()
    with pytest.raises(HeadwiseError, match="flash: expected the VectorMemory it was bound to"):
        binding.vectors()


def test_unbound_flash_and_wrong_dims_are_clear_errors():
    mem = VectorMemory(8)
    mem.add(np.eye(8, dtype=np.float32))
    enh = QueryEnhancer(8, mechanism="flash", heads=2)
    with pytest.raises(HeadwiseError, match=r"flash: expected a memory bound with bind\(vectors\) or bind\(store\)"):
        enh.refine(np.ones((1, 8), dtype=np.float32))
    enh.attach(mem)  # what a store's set_enhancer may call: the flash enhancer follows it
    mem.set_enhancer(enh)
    assert mem.search(np.ones(8, dtype=np.float32), 2)[1].shape == (1, 2)
    with pytest.raises(HeadwiseError, match="memory: expected a store of dim 8"):
        enh.bind(VectorMemory(4))
    QueryEnhancer(8, heads=2).attach(mem)  # other mechanisms ignore attach


def test_load_saved_enhancer_binds_flash_to_its_store(tmp_path):
    from headwise.memory.fit import load_saved_enhancer, save_enhancer

    rng = np.random.default_rng(1)
    with VectorMemory(16, path=tmp_path / "mem") as mem:
        mem.add(rng.standard_normal((50, 16)).astype(np.float32))
        save_enhancer(mem, _flash())
    with VectorMemory.open(tmp_path / "mem", read_only=True) as mem:
        load_saved_enhancer(mem)
        assert mem.search(rng.standard_normal((2, 16)).astype(np.float32), 3, enhance=True)[1].shape == (2, 3)


def test_bench_times_the_flash_mechanism():
    from headwise.bench.memory import mechanism_latency

    docs = normalise_rows(np.random.default_rng(2).standard_normal((260, 32)).astype(np.float32), "docs")
    rows = mechanism_latency(docs, docs[:8], sizes=(100, 250), mechanisms=("flash",), single=3, batch=6)
    assert [(r["stored"], r["method"]) for r in rows] == [(100, "none"), (100, "flash"), (250, "none"), (250, "flash")]
    assert all(r["p50_us"] > 0 for r in rows)


def test_a_gate_forwards_attach_and_compact_is_public(tmp_path):
    from headwise.memory.gate import GatedEnhancer

    mem = VectorMemory(8, path=tmp_path / "s")
    ids = mem.add(np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    inner = QueryEnhancer(8, heads=2, mechanism="flash")
    calls = []
    inner.attach = lambda store: calls.append(store)  # the gate must hand the store to its inner enhancer
    mem.set_enhancer(GatedEnhancer(inner))
    assert calls == [mem]
    mem.delete(ids[:5])
    assert mem.compact() == (20, 15) and mem._index.n_slots == 15
    reader = VectorMemory.open(tmp_path / "s", read_only=True)
    with pytest.raises(HeadwiseError, match="read_only"):
        reader.compact()
    reader.close()
