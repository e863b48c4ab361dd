"""The writer process of test_memory_crash.py (no tests here: a module without pytest, cheap to import).

It adds, deletes, upserts, updates metadata, saves (compacting) and verifies in a loop until it is killed, and
reports each operation over a pipe twice: ("begin", op, ids, version) before calling the store and ("ack", op, ids,
version) after the call returned, so the checker knows which writes were acknowledged and which one was in flight.

A record's contents are a function of its id and two version numbers (0 for an add; an upsert
sets both, an update of the metadata the second), so the checker can tell old from new.
"""

from __future__ import annotations

import numpy as np

from headwise.memory import VectorMemory

DIM = 16


def vectors_for(ids, versions=None) -> np.ndarray:
    """The vector of a record is a function of its id (and version), so the checker knows what must be stored."""
    versions = [0] * len(ids) if versions is None else versions
    seeds = [int(i) if v == 0 else [int(i), int(v)] for i, v in zip(ids, versions)]
    return np.stack([np.random.default_rng(s).standard_normal(DIM) for s in seeds]).astype(np.float32)


def metadata_for(i: int, version: int) -> dict:
    return {"id": int(i)} if version == 0 else {"id": int(i), "v": int(version)}


def text_for(i: int, version: int) -> str:
    return f"text {i}" if version == 0 else f"text {i} v{version}"


def writer(path: str, trial: int, conn) -> None:
    """Adds, deletes, upserts, updates and saves in a loop until killed; reports begin/ack of each operation."""
    rng = np.random.default_rng(trial)
    mem = VectorMemory.open(path)
    conn.send(("ready",))
    next_id = trial * 1_000_000
    version = trial * 1_000_000  # unique across trials: an upsert or update is told apart from every earlier one
    while True:
        r = rng.random()
        version += 1
        stored = mem.ids()
        some = rng.choice(stored, size=min(len(stored), int(rng.integers(1, 5))), replace=False).tolist()
        if r < 0.4 or (r < 0.8 and not some):
            ids = list(range(next_id, next_id + int(rng.integers(1, 9))))
            next_id += len(ids)
            conn.send(("begin", "add", ids, 0))
            mem.add(vectors_for(ids), ids=ids, metadata=[metadata_for(i, 0) for i in ids],
                    texts=[text_for(i, 0) for i in ids])  # fmt: skip
            conn.send(("ack", "add", ids, 0))
        elif r < 0.6:
            conn.send(("begin", "delete", some, 0))
            mem.delete(some)
            conn.send(("ack", "delete", some, 0))
        elif r < 0.72:  # replaces stored records and inserts a new one, in one transaction
            ids = [*some, next_id]
            next_id += 1
            conn.send(("begin", "upsert", ids, version))
            metadata, texts = [metadata_for(i, version) for i in ids], [text_for(i, version) for i in ids]
            mem.upsert(vectors_for(ids, [version] * len(ids)), ids=ids, metadata=metadata, texts=texts)
            conn.send(("ack", "upsert", ids, version))
        elif r < 0.8:
            conn.send(("begin", "update", some, version))
            mem.update_metadata(some, [metadata_for(i, version) for i in some])
            conn.send(("ack", "update", some, version))
        elif r < 0.92:  # flat compacts every tombstone on save, HNSW past 10%
            conn.send(("begin", "save", [], 0))
            mem.save()
            conn.send(("ack", "save", [], 0))
        else:
            conn.send(("begin", "verify", [], 0))
            assert mem.verify().ok
            conn.send(("ack", "verify", [], 0))
