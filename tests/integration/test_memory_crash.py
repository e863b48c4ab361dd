"""Crash safety: a writer process is SIGKILLed at random points; the store must open with every acknowledged write.

The writer reports each operation twice over a pipe: "begin" before calling the store and
"ack" after the call returned. After the kill the test opens the store and checks:

- it opens (no exception), whatever the writer was doing (add, delete, upsert, update_metadata, save);
- every acknowledged add and upsert is present with its exact vector, metadata and text, every
  acknowledged update_metadata with its metadata, and every acknowledged delete is absent;
- the one operation that was in flight is all or nothing (no half-written batch);
- the faiss index agrees with SQLite (same count; search finds each record, never a deleted one;
  ``verify()`` passes: every checksum, SQLite's integrity check, the index vectors).

Kills land in adds, deletes, upserts, metadata updates, saves (which compact) and verify() runs, on all three
index kinds.

The writer is forked from a forkserver that has already imported headwise, so a trial
costs milliseconds of start-up instead of the ~2 s of importing torch.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from pathlib import Path

import numpy as np
import pytest

# The writer lives in a module without pytest so that the forkserver preloads it once.
from test_memory_crash_writer import (  # tests/integration is on sys.path
    DIM,
    metadata_for,
    text_for,
    vectors_for,
    writer,
)

from headwise.memory import VectorMemory

TRIALS_PER_INDEX = 30  # x 3 index kinds = 90 kill trials


def run_trial(ctx, path: Path, trial: int, kill_after: float) -> list[tuple]:
    """Start a writer, let it run ``kill_after`` seconds, SIGKILL it; return the messages it got out."""
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=writer, args=(str(path), trial, sender), daemon=True)
    proc.start()
    sender.close()
    messages: list[tuple] = []
    assert receiver.poll(60), "writer did not start"
    assert receiver.recv() == ("ready",)
    deadline = time.monotonic() + kill_after
    # Drain while it runs so that it never blocks on a full pipe (the kill must land anywhere).
    while time.monotonic() < deadline:
        if receiver.poll(max(0.0, deadline - time.monotonic())):
            messages.append(receiver.recv())
    proc.kill()
    proc.join(10)
    while True:
        try:
            if not receiver.poll(1):
                break
            messages.append(receiver.recv())
        except (EOFError, OSError):  # the kill may cut the last message short: it was never delivered
            break
    receiver.close()
    return messages


def apply(live: dict[int, tuple[int, int]], op: str, ids: list[int], version: int) -> None:
    """The model's state after an operation on ``ids`` (see the writer's versions)."""
    for i in ids:
        if op == "add":
            live[i] = (0, 0)
        elif op == "delete":
            live.pop(i, None)
        elif op == "upsert":
            live[i] = (version, version)
        elif op == "update":
            live[i] = (live[i][0], version)


@pytest.mark.slow
@pytest.mark.parametrize("index", ["flat", "hnsw", "hnsw-fp16"])
def test_sigkill_at_random_points_loses_no_acknowledged_write(tmp_path, index):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["headwise.memory", "test_memory_crash_writer"])
    path = tmp_path / "store"
    VectorMemory(DIM, metric="l2", index=index, path=path, hnsw_m=8, ef_construction=40).close()
    live: dict[int, tuple[int, int]] = {}  # id -> (version of vector and text, version of metadata)
    rnd = random.Random(index)
    kinds_in_flight: list[str] = []
    for trial in range(TRIALS_PER_INDEX):
        offset = {"flat": 0, "hnsw": 1000, "hnsw-fp16": 2000}[index]
        messages = run_trial(ctx, path, trial + offset, rnd.uniform(0.01, 0.25))
        in_flight = None
        for tag, op, ids, version in messages:
            if tag == "begin":
                in_flight = (op, ids, version)
                continue
            in_flight = None
            apply(live, op, ids, version)

        mem = VectorMemory.open(path)  # must not raise, whatever the writer was doing
        stored = set(mem.ids().tolist())
        if in_flight is not None:
            op, ids, version = in_flight
            kinds_in_flight.append(op)
            present = [i in stored for i in ids]
            if op == "add":
                assert all(present) or not any(present), f"trial {trial}: half-written add {ids} {present}"
                apply(live, op, ids if all(present) else [], version)
            elif op == "delete":
                assert all(present) or not any(present), f"trial {trial}: half-done delete {ids} {present}"
                apply(live, op, ids if not any(present) else [], version)
            elif op in ("upsert", "update"):  # every record new, or every record as before
                new = [r is not None and (r.metadata or {}).get("v") == version for r in mem.get(ids)]
                assert all(new) or not any(new), f"trial {trial}: half-done {op} {ids} {new}"
                apply(live, op, ids if all(new) else [], version)
        assert stored == set(live), (
            f"trial {trial}: lost {sorted(set(live) - stored)[:5]}, unexpected {sorted(stored - set(live))[:5]}"
        )
        assert len(mem) == len(live)
        assert mem.verify().ok  # checksums, SQLite pages and the index agree after every kill
        if live:
            ids = np.array(sorted(live))
            vec_versions = [live[int(i)][0] for i in ids]
            np.testing.assert_array_equal(mem.vectors(ids), vectors_for(ids, vec_versions))
            records = mem.get(ids)
            assert all(
                r.metadata == metadata_for(i, live[int(i)][1]) and r.text == text_for(i, live[int(i)][0])
                for r, i in zip(records, ids)
            )
            sample = ids[:: max(1, len(ids) // 25)]
            sample_versions = [live[int(i)][0] for i in sample]
            _, found = mem.search(vectors_for(sample, sample_versions), k=5)
            assert set(found[found >= 0].tolist()) <= set(live), "search returned a record that is not stored"
            if index == "flat":  # exact search finds each record itself at distance 0
                np.testing.assert_array_equal(found[:, 0], sample)
        mem.close()
    # The kills must have landed inside operations, not only between them.
    assert len(kinds_in_flight) >= TRIALS_PER_INDEX // 3, kinds_in_flight
    # Which write a kill lands in depends on the machine's timing (as the store grows, saves and
    # verifies take more of the loop): require a save and at least one kind of record write.
    assert "save" in kinds_in_flight, kinds_in_flight
    assert {"add", "delete", "upsert", "update"} & set(kinds_in_flight), kinds_in_flight
