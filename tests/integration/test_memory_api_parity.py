"""One test suite, two backends: the embedded :class:`VectorMemory` and :class:`RemoteMemory` over
``headwise serve``. Every test runs against both and asserts the same results and the same errors,
so code can switch between embedded and remote by one line.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from tests.conftest import require_extra

from headwise.errors import HeadwiseError
from headwise.memory import VectorMemory

DIM = 8


def _data(n: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


@pytest.fixture(params=["embedded", "remote"])
def memory(request: pytest.FixtureRequest) -> Iterator:
    """A cosine flat store holding 60 vectors with metadata {"g": i % 3}, embedded or behind HTTP."""
    mem = VectorMemory(DIM, metric="cosine", index="flat")
    mem.add(_data(), metadata=[{"g": i % 3} for i in range(60)])
    if request.param == "embedded":
        yield mem
        return
    require_extra("fastapi", "server")
    from tests.server_utils import KEY, serving

    from headwise.memory import RemoteMemory

    with serving(mem) as url, RemoteMemory(url, api_key=KEY) as remote:
        remote.backing_store = mem  # for the assertions only: what the server holds
        yield remote


def _reference() -> VectorMemory:
    mem = VectorMemory(DIM, metric="cosine", index="flat")
    mem.add(_data(), metadata=[{"g": i % 3} for i in range(60)])
    return mem


def test_search_single_batch_filter_and_padding(memory) -> None:  # noqa: ANN001 - either backend
    ref = _reference()
    q = _data(5, seed=1)
    for call in (
        lambda m: m.search(q, 7),
        lambda m: m.search(q[0], 7),
        lambda m: m.search_batch(q, 3),
        lambda m: m.search(q, 100),  # more than stored: padded with -inf / -1
        lambda m: m.search(q, 4, filter={"g": 2}),
        lambda m: m.search(q, 30, filter={"g": {"$in": [0, 1]}}),
    ):
        (ws, wi), (gs, gi) = call(ref), call(memory)
        assert gs.dtype == np.float32 and gi.dtype == np.int64 and gi.shape == wi.shape
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gs, ws)
    assert memory.search(q, 100)[1][0, -1] == -1


def test_add_get_vectors_delete(memory) -> None:  # noqa: ANN001
    x = _data(3, seed=2)
    assert memory.add(x, ids=[100, 101, 102], metadata=[{"a": 1}, None, {"a": 3}], texts=["x", None, "z"]).tolist() == [
        100,
        101,
        102,
    ]
    assert memory.add(x[:1]).tolist() == [103]  # the next free id
    recs = memory.get([100, 101, 999])
    assert recs[2] is None and recs[0].metadata == {"a": 1} and recs[0].text == "x" and recs[1].text is None
    got = memory.vectors([100, 102])
    assert got.shape == (2, DIM) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)  # cosine stores unit vectors
    np.testing.assert_array_equal(got[0], recs[0].vector)
    assert memory.delete([100, 101, 999]) == 2
    assert len(memory) == 62
    assert memory.get([100])[0] is None


def test_upsert_and_update_metadata(memory) -> None:  # noqa: ANN001
    x = _data(2, seed=3)
    assert memory.upsert(x, [5, 200], metadata=[{"new": True}, {"new": True}]).tolist() == [5, 200]
    assert len(memory) == 61  # 5 replaced, 200 inserted
    np.testing.assert_allclose(memory.vectors([5])[0], x[0] / np.linalg.norm(x[0]), rtol=1e-6)
    memory.update_metadata([5, 7], [{"tag": "a"}, {"tag": "b"}], merge=True)
    assert memory.get([5])[0].metadata == {"new": True, "tag": "a"}
    assert memory.get([7])[0].metadata == {"g": 1, "tag": "b"}
    memory.update_metadata([7], [None])
    assert memory.get([7])[0].metadata is None
    with pytest.raises(HeadwiseError, match="ids"):
        memory.update_metadata([123456], [{}])  # absent: refused, nothing written
    with pytest.raises(HeadwiseError, match="ids"):
        memory.upsert(x, None)


def test_record_feedback(memory) -> None:  # noqa: ANN001
    first = memory.record_feedback(_data(1, seed=4)[0], [3, 4])
    second = memory.record_feedback(_data(1, seed=5)[0], {3: 2})
    assert second == first + 1
    store = getattr(memory, "backing_store", memory)
    assert [f.relevant for f in store.feedback()] == [{3: 1, 4: 1}, {3: 2}]
    with pytest.raises(HeadwiseError, match="relevant"):
        memory.record_feedback(_data(1, seed=6)[0], [424242])


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda m: m.search(_data(1)[0], 0), "k: expected"),
        (lambda m: m.search(_data(1)[0], 16_385), "k: expected"),
        (lambda m: m.search(np.ones(DIM + 1, dtype=np.float32), 3), "queries"),
        (lambda m: m.search(np.full(DIM, np.nan, dtype=np.float32), 3), "finite|NaN"),
        (lambda m: m.add(_data(1), ids=[0]), "already stored|duplicate"),
        (lambda m: m.add(_data(2), ids=[900, 900]), "duplicate|unique|repeated"),
        (lambda m: m.add(np.zeros((1, DIM), dtype=np.float32)), "zero"),
        (lambda m: m.search(_data(1)[0], 3, filter={"g": {"$regex": "x"}}), "filter"),
    ],
)
def test_the_same_errors(memory, call, words: str) -> None:  # noqa: ANN001
    n = len(memory)
    with pytest.raises(HeadwiseError, match=words):
        call(memory)
    assert len(memory) == n  # nothing written
