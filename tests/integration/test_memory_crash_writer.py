"""The writer process of test_memory_crash.py (no tests here: a module without pytest, cheap to import).

It adds, deletes, saves (compacting) and verifies in a loop until it is killed, and reports each operation over a
pipe twice: ("begin", op, ids) before calling the store and ("ack", op, ids) after the call
returned, so the checker knows which writes were acknowledged and which one was in flight.
"""

from __future__ import annotations

import numpy as np

from headwise.memory import VectorMemory

DIM = 16


def vectors_for(ids) -> np.ndarray:
    """The vector of a record is a function of its id, so the checker knows what must be stored."""
    return np.stack([np.random.default_rng(int(i)).standard_normal(DIM) for i in ids]).astype(np.float32)


def writer(path: str, trial: int, conn) -> None:
    """Adds, deletes and saves in a loop until killed; reports begin/ack of each operation."""
    rng = np.random.default_rng(trial)
    mem = VectorMemory.open(path)
    conn.send(("ready",))
    next_id = trial * 1_000_000
    while True:
        r = rng.random()
        if r < 0.5:
            ids = list(range(next_id, next_id + int(rng.integers(1, 9))))
            next_id += len(ids)
            conn.send(("begin", "add", ids))
            mem.add(vectors_for(ids), ids=ids, metadata=[{"id": i} for i in ids], texts=[f"text {i}" for i in ids])
            conn.send(("ack", "add", ids))
        elif r < 0.8:
            stored = mem.ids()
            if len(stored) == 0:
                continue
            ids = rng.choice(stored, size=min(len(stored), int(rng.integers(1, 6))), replace=False).tolist()
            conn.send(("begin", "delete", ids))
            mem.delete(ids)
            conn.send(("ack", "delete", ids))
        elif r < 0.92:  # flat compacts every tombstone on save, HNSW past 10%
            conn.send(("begin", "save", []))
            mem.save()
            conn.send(("ack", "save", []))
        else:
            conn.send(("begin", "verify", []))
            assert mem.verify().ok
            conn.send(("ack", "verify", []))
