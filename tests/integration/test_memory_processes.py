"""#19: processes share a store safely: one writer at a time (an OS lock), readers on snapshots that refresh.

Worker processes are started with "spawn" (a fresh interpreter: no forked faiss/torch threads).
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback

import numpy as np
import pytest

from headwise import HeadwiseError
from headwise.memory import VectorMemory

DIM = 8


def vector(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


def _writer_adds(path: str, n: int, hold: float, timeout: float, out) -> None:
    try:
        mem = VectorMemory.open(path, lock_timeout=timeout)
        ids = [int(mem.add(vector(1000 + i))[0]) for i in range(n)]
        time.sleep(hold)
        mem.close()
        out.put(("ok", ids))
    except HeadwiseError as exc:
        out.put(("error", str(exc)))
    except BaseException:
        out.put(("crash", traceback.format_exc()))


@pytest.mark.slow
def test_a_second_writer_waits_or_gets_the_locked_error(tmp_path):
    path = tmp_path / "s"
    VectorMemory(DIM, path=path).close()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    first = ctx.Process(target=_writer_adds, args=(str(path), 100, 3.0, 0.0, out))
    first.start()
    deadline = time.monotonic() + 60
    while not (path / "writer.lock").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)  # the first writer holds the lock once its pid is in the file
    with pytest.raises(HeadwiseError, match=r"locked by another writer \(pid \d+\)"):
        VectorMemory.open(path, lock_timeout=0)
    reader = VectorMemory.open(path, read_only=True)  # readers never wait
    second = ctx.Process(target=_writer_adds, args=(str(path), 100, 0.0, 60.0, out))
    second.start()
    results = [out.get(timeout=120), out.get(timeout=120)]
    first.join(30)
    second.join(30)
    assert [r[0] for r in results] == ["ok", "ok"], results
    ids = sorted(results[0][1] + results[1][1])
    assert ids == list(range(200))  # no lost write, no "duplicate ids" from a race on next_id
    with VectorMemory.open(path) as mem:
        assert sorted(mem.ids().tolist()) == ids
    reader.refresh()
    assert len(reader) == 200
    reader.close()


def _step_writer(path: str, seconds: float, gen, out) -> None:
    """Step s adds id s - 1 and, from s = 6 on, deletes the even id s - 6; saves every 20 steps."""
    try:
        mem = VectorMemory.open(path)
        s, stop = 0, time.monotonic() + seconds
        while time.monotonic() < stop:
            s += 1
            mem.add(vector(s - 1)[None], ids=[s - 1])
            if s >= 6 and (s - 6) % 2 == 0:
                assert mem.delete([s - 6]) == 1
            if s % 20 == 0:
                mem.save()
            gen.value = s  # everything up to step s is committed
        mem.close()
        out.put(("writer", "ok", s))
    except BaseException:
        out.put(("writer", "crash", traceback.format_exc()))


def _reader(path: str, seconds: float, gen, out) -> None:
    """Open, then repeatedly: read the writer's step g, refresh, and check the snapshot against g."""
    checks, stop = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < stop:
            mem = VectorMemory.open(path, read_only=True)
            for _ in range(5):
                g = gen.value
                mem.refresh()
                present = set(mem.ids().tolist())
                must = {j for j in range(g) if j % 2 == 1 or j + 6 > g}  # added by g, not deleted by g ...
                must = {j for j in must if j % 2 == 1}  # ... and never deleted later (odd ids)
                gone = {j for j in range(g) if j % 2 == 0 and j + 6 <= g}
                assert must <= present, sorted(must - present)[:5]
                assert not (gone & present), sorted(gone & present)[:5]
                sample = sorted(present)[-8:]
                if sample:  # search and get answer from the same snapshot
                    _, found = mem.search(np.stack([vector(j) for j in sample]), k=1)
                    assert found[:, 0].tolist() == sample
                    assert all(r is not None for r in mem.get(sample))
                checks += 1
            mem.close()
        out.put(("reader", "ok", checks))
    except BaseException:
        out.put(("reader", "crash", traceback.format_exc()))


@pytest.mark.slow
def test_one_writer_and_three_readers_never_err_and_readers_see_committed_writes(tmp_path):
    path = tmp_path / "s"
    VectorMemory(DIM, path=path).close()
    ctx = mp.get_context("spawn")
    out, gen = ctx.Queue(), ctx.Value("q", 0)
    procs = [ctx.Process(target=_step_writer, args=(str(path), 6.0, gen, out))]
    procs += [ctx.Process(target=_reader, args=(str(path), 5.0, gen, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    crashes = [r for r in results if r[1] != "ok"]
    assert not crashes, crashes[0][2]
    writer = next(r for r in results if r[0] == "writer")
    readers = [r for r in results if r[0] == "reader"]
    assert writer[2] > 20 and all(r[2] > 0 for r in readers)
    with VectorMemory.open(path) as mem:  # the writer's last state, reopened
        s = writer[2]
        assert len(mem) == s - len([j for j in range(s) if j % 2 == 0 and j + 6 <= s])


def test_read_only_stores_refuse_writes(tmp_path):
    path = tmp_path / "s"
    with VectorMemory(DIM, path=path) as mem:
        mem.add(vector(0)[None])
    reader = VectorMemory.open(path, read_only=True)
    for op in (lambda: reader.add(vector(1)[None]), lambda: reader.delete([0]), reader.save,
               lambda: reader.record_feedback(vector(0), [0])):  # fmt: skip
        with pytest.raises(HeadwiseError, match="read_only=True"):
            op()
    writer = VectorMemory.open(path, lock_timeout=0)  # a reader holds no lock
    writer.delete([0])
    assert reader.get([0])[0] is not None and reader.search(vector(0), k=1)[1][0, 0] == 0  # its snapshot
    reader.refresh()
    assert reader.get([0]) == [None] and reader.search(vector(0), k=1)[1][0, 0] == -1
    writer.close()
    writer.close()  # idempotent
    VectorMemory.open(path, lock_timeout=0).close()  # the lock was released
    reader.close()
