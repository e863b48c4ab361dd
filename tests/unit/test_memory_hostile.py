"""#19: the store never touches what is not its own, huge k and ids at the edges get clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from headwise import HeadwiseError
from headwise.memory import VectorMemory
from headwise.memory.checks import MAX_K


def _saved(tmp_path, index="flat"):
    mem = VectorMemory(4, path=tmp_path / "s", index=index)
    mem.add(np.eye(4, dtype=np.float32))
    mem.save()
    mem.close()
    return tmp_path / "s"


@pytest.mark.parametrize("key", ["file", "slots_file"])
@pytest.mark.parametrize("name_of", [lambda v: str(v), lambda v: "../victim", lambda v: "index-0123/../../victim"])
def test_manifest_paths_outside_the_store_are_refused_and_never_deleted(tmp_path, key, name_of):
    store = _saved(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["index"][key] = name_of(victim)
    (store / "manifest.json").write_text(json.dumps(manifest))
    for kwargs in ({}, {"rebuild_index": True}):
        with pytest.raises(HeadwiseError, match=f"manifest.json: expected index.{key} to be a file name"):
            VectorMemory.open(store, **kwargs)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize(
    "index,match",
    [
        ([1, 2], "expected 'index' to be an object or null, got list"),
        ("x", "got str"),
        ({"file": "index-0123456789abcdef.faiss", "slots_file": "slots-0123456789abcdef.npy"}, "index.sha256"),
    ],
)
def test_malformed_index_entries_get_a_headwise_error(tmp_path, index, match):
    store = _saved(tmp_path)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["index"] = index
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HeadwiseError, match=match):
        VectorMemory.open(store)


@pytest.mark.parametrize("index", ["flat", "hnsw", "hnsw-fp16"])
def test_huge_k_is_refused_and_large_k_scales_with_the_store(index):
    mem = VectorMemory(4, index=index)
    mem.add(np.eye(4, dtype=np.float32))
    for k in (2**31, MAX_K + 1, 3e8, 0, True, 2.0):
        with pytest.raises(HeadwiseError, match=r"^k: expected an int in \[1, 16384\]"):
            mem.search(np.ones(4), k=k)
        with pytest.raises(HeadwiseError, match="^k: "):
            mem.search_batch(np.ones((2, 4)), k=k)
    scores, ids = mem.search(np.ones(4), k=MAX_K)  # padded like faiss, computed with k = 4
    assert ids.shape == (1, MAX_K) and sorted(ids[0, :4].tolist()) == [0, 1, 2, 3]
    assert (ids[0, 4:] == -1).all() and np.isneginf(scores[0, 4:]).all()
    empty = VectorMemory(4, index=index)
    assert empty.search(np.ones(4), k=3)[1].tolist() == [[-1, -1, -1]]


def test_enhancer_candidates_are_bounded():
    from headwise.memory.enhancer import QueryEnhancer

    with pytest.raises(HeadwiseError, match="candidates"):
        QueryEnhancer(8, heads=2, candidates=2**31)


def test_ids_at_the_edges():
    mem = VectorMemory(2)
    for bad in (np.array([2**63], dtype=np.uint64), np.array([2**64 - 1], dtype=np.uint64), [2**63 - 1]):
        with pytest.raises(HeadwiseError, match=r"ids: expected ids in \[0, 2\*\*63 - 1\)"):
            mem.add(np.ones((1, 2)), ids=bad)
    assert len(mem) == 0
    top = mem.add(np.ones((1, 2)), ids=[2**63 - 2])  # the largest id: fetchable and deletable
    assert mem.get(top)[0] is not None and mem.delete(top) == 1
    with pytest.raises(HeadwiseError, match="free automatic ids"):
        mem.add(np.ones((1, 2)))  # next_id is now 2**63 - 1: no automatic id is left
    assert mem.add(np.ones((1, 2)), ids=[5]).tolist() == [5]  # explicit ids still work
    with pytest.raises(HeadwiseError, match=r"ids: expected ids in \[0"):
        mem.get(np.array([2**63], dtype=np.uint64))


def test_normalisation_at_the_edges():
    mem = VectorMemory(4)
    ids = mem.add(np.array([[1e38, 1e38, 0, 0], [1e-30, 0, 0, 0], [0, 3e-41, 0, 0]], dtype=np.float32))
    v = mem.vectors(ids)
    np.testing.assert_allclose(v, [[2**-0.5, 2**-0.5, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], rtol=1e-6)
    with pytest.raises(HeadwiseError, match="zero rows"):
        mem.add(np.zeros((1, 4)))
    assert mem.search(np.array([1e-35, 0, 0, 0]), k=1)[1].tolist() == [[ids[1]]]
