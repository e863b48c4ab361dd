"""upsert and update_metadata: replace or insert in one transaction, checksums, the index, the caches,
refusals, persistence, and a failure in the middle of the transaction rolling everything back."""

from __future__ import annotations

import numpy as np
import pytest

import headwise.memory.storage as storage_module
import headwise.memory.updates as updates_module
from headwise.errors import HeadwiseError
from headwise.memory import VectorMemory

DIM = 8


def rand(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def snapshot(mem: VectorMemory) -> dict:
    ids = mem.ids()
    return {int(i): (r.vector.tobytes(), r.metadata, r.text) for i, r in zip(ids, mem.get(ids))}


@pytest.mark.parametrize("index", ["flat", "hnsw", "hnsw-fp16"])
def test_upsert_replaces_existing_and_inserts_new_records(index):
    mem = VectorMemory(DIM, metric="l2", index=index)
    x = rand(20, 0)
    mem.add(x, metadata=[{"v": 0}] * 20, texts=[f"t{i}" for i in range(20)])
    new = rand(3, 1) + 10  # far from every old vector
    ids = mem.upsert(new, ids=[3, 7, 50], metadata=[{"v": 1}, None, {"v": 1}], texts=["a", None, "c"])
    assert ids.tolist() == [3, 7, 50]
    assert len(mem) == 21 and mem.ids().tolist() == [*range(20), 50]
    records = mem.get([3, 7, 50, 4])
    np.testing.assert_array_equal(records[0].vector, new[0])
    assert [r.metadata for r in records] == [{"v": 1}, None, {"v": 1}, {"v": 0}]
    assert [r.text for r in records] == ["a", None, "c", "t4"]
    _, found = mem.search(x[[3, 7]], k=3)  # the old vectors are gone from the index
    assert not np.isin(found, [3, 7]).any()
    _, found = mem.search(new, k=1)
    assert found[:, 0].tolist() == [3, 7, 50]
    assert mem.add(rand(1, 2)).tolist() == [51]  # automatic ids continue above the upserted id
    assert mem.verify().ok


def test_upsert_of_every_record_keeps_search_exact_and_compacts():
    mem = VectorMemory(DIM, metric="l2", index="hnsw")
    mem.add(rand(40, 0))
    for round_ in range(3):
        mem.upsert(rand(40, round_ + 1), ids=np.arange(40))
        assert len(mem) == 40 and mem._index.n_slots <= 2 * 40  # tombstones compacted past 25%
    _, found = mem.search(rand(40, 3), k=1)
    assert found[:, 0].tolist() == list(range(40))
    assert mem.verify().ok


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.upsert(rand(2, 5), ids=None), "ids: expected 2 ids"),
        (lambda m: m.upsert(rand(2, 5), ids=[1, 1]), "duplicates within the call"),
        (lambda m: m.upsert(rand(2, 5), ids=[1]), "ids: expected 2 ids"),
        (lambda m: m.upsert(rand(2, 5), ids=[1, -2]), "ids"),
        (lambda m: m.upsert(np.full((1, DIM), np.nan), ids=[1]), "NaN"),
        (lambda m: m.upsert(rand(1, 5), ids=[1], metadata=[{"x": {1, 2}}]), r"metadata\[0\]"),
        (lambda m: m.upsert(rand(1, 5), ids=[1], texts=[3]), r"texts\[0\]"),
        (lambda m: m.update_metadata([1, 99], [{}, {}]), "absent: \\[99\\]"),
        (lambda m: m.update_metadata([1, 1], [{}, {}]), "duplicates within the call"),
        (lambda m: m.update_metadata([1], [{}, {}]), "metadata: expected a sequence of 1"),
        (lambda m: m.update_metadata([1], [float("nan")]), r"metadata\[0\]"),
        (lambda m: m.update_metadata([1], [[1]], merge=True), r"metadata\[0\]: expected a dict"),
        (lambda m: m.update_metadata([2], [{"a": 1}], merge=True), "metadata of id 2: expected a stored dict"),
        (lambda m: m.update_metadata([1], [{}], merge="yes"), "merge: expected a bool"),
    ],
)
def test_bad_input_raises_and_leaves_the_store_unchanged(call, match):
    mem = VectorMemory(DIM, metric="l2")
    mem.add(rand(3, 0), metadata=[{"a": 0}, {"a": 1}, [1, 2]])
    before = snapshot(mem)
    with pytest.raises(HeadwiseError, match=match):
        call(mem)
    assert snapshot(mem) == before and mem.verify().ok


def test_update_metadata_replaces_or_merges_and_leaves_the_index_alone():
    mem = VectorMemory(DIM, metric="l2", index="hnsw")
    x = rand(10, 0)
    mem.add(x, metadata=[{"a": i, "keep": True} for i in range(10)], texts=[f"t{i}" for i in range(10)])
    slots_before, version = mem._index.n_slots, mem._index.version
    q = rand(4, 9)
    before = mem.search(q, k=5)
    mem.update_metadata([0, 1], [{"b": 2}, None])
    mem.update_metadata(np.array([2, 3]), [{"a": 20, "new": [1]}, {}], merge=True)
    got = [r.metadata for r in mem.get([0, 1, 2, 3])]
    assert got == [{"b": 2}, None, {"a": 20, "keep": True, "new": [1]}, {"a": 3, "keep": True}]
    assert mem.get([0])[0].text == "t0"
    np.testing.assert_array_equal(mem.get([2])[0].vector, x[2])
    assert (mem._index.n_slots, mem._index.version) == (slots_before, version)  # no index write
    after = mem.search(q, k=5)
    np.testing.assert_array_equal(after[1], before[1])
    mem.update_metadata([1], [{"x": 1}], merge=True)  # no metadata yet: merges into {}
    assert mem.get([1])[0].metadata == {"x": 1}
    mem.update_metadata([], [])
    assert mem.verify().ok


def test_writes_are_refused_on_a_reader_and_survive_reopening(tmp_path):
    path = tmp_path / "s"
    mem = VectorMemory(DIM, metric="l2", index="hnsw", path=path)
    mem.add(rand(30, 0), metadata=[{"g": i % 3} for i in range(30)])
    mem.save()
    mem.upsert(rand(2, 1), ids=[4, 100], metadata=[{"g": 9}, {"g": 9}])  # after the save: reconciled on open
    mem.update_metadata([5], [{"g": 9}])
    expected = snapshot(mem)
    mem.close()
    reader = VectorMemory.open(path, read_only=True)
    for call in (lambda: reader.upsert(rand(1, 2), ids=[1]), lambda: reader.update_metadata([1], [{}])):
        with pytest.raises(HeadwiseError, match="read_only"):
            call()
    assert snapshot(reader) == expected and reader.verify().ok
    _, found = reader.search(rand(2, 1), k=1, filter={"g": 9})
    assert found[:, 0].tolist() == [4, 100]
    _, ids = reader.search(rand(1, 3), k=5, filter={"g": 9})
    assert sorted(ids[0][ids[0] >= 0].tolist()) == [4, 5, 100]
    reader.close()


class InjectedError(RuntimeError):
    pass


def failing_after(real, calls: int):
    """``real`` that raises InjectedError on its ``calls``-th call: a failure in the middle of a transaction."""
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            raise InjectedError("injected failure")
        return real(*args, **kwargs)

    return wrapped


def test_a_failure_in_the_middle_of_upsert_rolls_everything_back(tmp_path, monkeypatch):
    mem = VectorMemory(DIM, metric="l2", index="hnsw", path=tmp_path / "s")
    mem.add(rand(10, 0), metadata=[{"v": 0}] * 10)
    before, slots = snapshot(mem), mem._index.n_slots
    # The old rows are already deleted and one new row written when the third checksum fails.
    monkeypatch.setattr(storage_module, "record_checksum", failing_after(storage_module.record_checksum, 3))
    with pytest.raises(InjectedError):
        mem.upsert(rand(4, 1), ids=[1, 2, 3, 70], metadata=[{"v": 1}] * 4)
    monkeypatch.undo()
    assert snapshot(mem) == before and mem._index.n_slots == slots and mem.verify().ok
    assert not mem._db.conn.in_transaction
    mem.upsert(rand(4, 1), ids=[1, 2, 3, 70], metadata=[{"v": 1}] * 4)  # the store still works
    assert len(mem) == 11 and mem.verify().ok
    after = snapshot(mem)
    mem.close()
    again = VectorMemory.open(tmp_path / "s")
    assert snapshot(again) == after and again.verify().ok
    again.close()


def test_a_failure_in_the_middle_of_update_metadata_rolls_everything_back(monkeypatch):
    mem = VectorMemory(DIM, metric="l2")
    mem.add(rand(5, 0), metadata=[{"v": i} for i in range(5)])
    before = snapshot(mem)
    monkeypatch.setattr(updates_module, "record_checksum", failing_after(updates_module.record_checksum, 3))
    with pytest.raises(InjectedError):
        mem.update_metadata([0, 1, 2, 3], [{"v": 9}] * 4)
    monkeypatch.undo()
    assert snapshot(mem) == before and mem.verify().ok


def test_update_metadata_refuses_to_launder_a_corrupted_record():
    mem = VectorMemory(DIM, metric="l2")
    mem.add(rand(3, 0), metadata=[{"v": i} for i in range(3)])
    mem._db.conn.execute("UPDATE records SET text = 'tampered' WHERE id = 1")  # bytes no longer match the checksum
    with pytest.raises(HeadwiseError, match="record 1 to match its checksum"):
        mem.update_metadata([0, 1], [{"v": 7}, {"v": 7}])
    assert mem.get([0])[0].metadata == {"v": 0}  # nothing written
    assert mem.verify().corrupt == [1]


def test_upsert_and_update_invalidate_the_result_cache():
    mem = VectorMemory(DIM, metric="l2", cache_size=8)
    x = rand(5, 0)
    mem.add(x, metadata=[{"g": 0}] * 5)
    mem.search(x[0], k=1)
    mem.search(x[0], k=1, filter={"g": 0})
    assert mem.cache.stats()["size"] == 2
    mem.upsert(x[:1] + 100, ids=[0])
    assert mem.cache.stats()["size"] == 0
    assert mem.search(x[0], k=1)[1][0, 0] != 0
    mem.search(x[1], k=1, filter={"g": 0})
    mem.update_metadata([1], [{"g": 1}])
    assert mem.cache.stats()["size"] == 0
    assert mem.search(x[1], k=1, filter={"g": 0})[1][0, 0] != 1
    assert mem.metrics.summary()["upsert"]["count"] == 1
