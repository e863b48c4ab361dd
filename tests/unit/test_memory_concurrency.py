"""Searches of one store run side by side; writes exclude them. SharedLock, and the store under threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from headwise.memory import VectorMemory
from headwise.memory.enhancer import QueryEnhancer
from headwise.memory.locking import SharedLock

DIM = 16


def test_shared_holders_overlap_and_a_writer_excludes_them() -> None:
    lock = SharedLock()
    both_inside = threading.Barrier(2, timeout=10)  # breaks (raises) unless two readers are inside at once

    def reader() -> None:
        with lock.shared():
            both_inside.wait()

    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(reader) for _ in range(2)]:
            f.result()
    order: list[str] = []
    writer_in, release = threading.Event(), threading.Event()

    def writer() -> None:
        with lock:
            writer_in.set()
            release.wait(10)
            order.append("writer out")

    def late_reader() -> None:
        with lock.shared():
            order.append("reader in")

    w = threading.Thread(target=writer)
    w.start()
    assert writer_in.wait(10)
    r = threading.Thread(target=late_reader)
    r.start()
    r.join(0.2)
    assert order == []  # the reader waits for the writer
    release.set()
    w.join(10)
    r.join(10)
    assert order == ["writer out", "reader in"]


def test_shared_lock_is_reentrant_and_refuses_an_upgrade() -> None:
    lock = SharedLock()
    with lock, lock, lock.shared(), lock:  # the writer may nest anything
        assert lock.readers == 0
    with lock.shared(), lock.shared():
        assert lock.readers == 1
        with pytest.raises(RuntimeError, match="holds it shared"):
            lock.__enter__()
    assert lock.readers == 0
    with lock:  # nothing left held
        pass


def _store(kind: str, cache: int) -> VectorMemory:
    rng = np.random.default_rng(0)
    mem = VectorMemory(DIM, metric="cosine", index=kind, cache_size=cache)
    mem.add(rng.standard_normal((3000, DIM)).astype(np.float32), metadata=[{"g": i % 4} for i in range(3000)])
    return mem


def test_two_searches_run_inside_the_index_at_once() -> None:
    mem = _store("flat", 0)
    both_inside = threading.Barrier(2, timeout=10)
    search = mem._index.search

    def meeting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - wraps SlotIndex.search
        both_inside.wait()  # a store that serialised its searches would break this barrier
        return search(*args, **kwargs)

    mem._index.search = meeting
    q = np.random.default_rng(1).standard_normal((2, DIM)).astype(np.float32)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda row: mem.search(row, 5), q))
    mem._index.search = search
    for row, (_, ids) in zip(q, results):
        np.testing.assert_array_equal(ids, mem.search(row, 5)[1])


@pytest.mark.parametrize(("kind", "cache"), [("flat", 0), ("hnsw", 64), ("hnsw-fp16", 0)])
def test_concurrent_searches_equal_serial_ones(kind: str, cache: int) -> None:
    """Eight threads, plain, filtered and enhanced searches (single and batched) mixed: the
    results equal the same calls made one after another."""
    mem = _store(kind, cache)
    torch.manual_seed(0)
    enhancer = QueryEnhancer(DIM, candidates=16).eval()
    mem.set_enhancer(enhancer)
    q = np.random.default_rng(2).standard_normal((64, DIM)).astype(np.float32)
    calls = []
    for i in range(64):
        flt = {"g": i % 4} if i % 3 == 0 else None
        enhance = bool(i % 2)
        calls.append((q[i] if i % 4 else q[i : i + 8], 7, enhance, flt))
    want = [mem.search(x, k, enhance=e, filter=f) for x, k, e, f in calls]
    mem.cache.clear()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda c: mem.search(c[0], c[1], enhance=c[2], filter=c[3]), calls * 3))
    for i, (scores, ids) in enumerate(got):
        np.testing.assert_array_equal(ids, want[i % 64][1])
        np.testing.assert_allclose(scores, want[i % 64][0], rtol=1e-5, atol=1e-6)


def test_writes_between_concurrent_searches_never_break_them() -> None:
    mem = _store("hnsw", 32)
    stop = threading.Event()
    errors: list[BaseException] = []
    q = np.random.default_rng(3).standard_normal((32, DIM)).astype(np.float32)

    def searcher(t: int) -> None:
        try:
            while not stop.is_set():
                scores, ids = mem.search(q[t::6], 10, filter={"g": t % 4} if t % 2 else None)
                assert (ids >= 0).all() and np.isfinite(scores).all()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(4)
    for i in range(80):  # every write resets what searches build lazily (faiss params, filter matches)
        ids = mem.add(rng.standard_normal((20, DIM)).astype(np.float32), metadata=[{"g": i % 4}] * 20)
        mem.delete(ids[:10])
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert len(mem) == 3000 + 80 * 10


def test_search_parameters_are_never_seen_half_built(monkeypatch) -> None:
    """After a delete, the first searches build the faiss parameters that hide deleted slots; a
    second search arriving while the first builds must wait for the selector, never run without it."""
    import time

    import headwise.memory.index as index_module

    mem = _store("hnsw", 0)
    mem.delete(list(range(0, 3000, 7)))
    slot_index = mem._index
    real = index_module.faiss.IDSelectorBitmap

    def slow_selector(*args):  # widens the window in which the parameters are being built
        time.sleep(0.3)
        return real(*args)

    monkeypatch.setattr(index_module.faiss, "IDSelectorBitmap", slow_selector)
    slot_index._params = None  # as a write leaves it
    got = {}
    first = threading.Thread(target=lambda: got.setdefault("first", slot_index._search_params(40)))
    first.start()
    time.sleep(0.1)  # the first thread is inside the build
    got["second"] = slot_index._search_params(40)
    first.join(10)
    assert got["second"].sel is not None and got["first"].sel is not None
