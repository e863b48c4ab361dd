"""An enhanced HNSW search merges its first-pass candidates into the second pass's top-k."""

from __future__ import annotations

import numpy as np
import pytest

from headwise.errors import HeadwiseError
from headwise.memory import VectorMemory
from headwise.memory.index import SlotIndex

DIM = 16


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def scores_of(stored: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    """Higher-is-better scores (n, N) in float64."""
    if metric == "l2":
        return -((q[:, None, :].astype(np.float64) - stored[None]) ** 2).sum(-1)
    return q.astype(np.float64) @ stored.T.astype(np.float64)


@pytest.mark.parametrize("kind", ["hnsw", "hnsw-fp16", "flat"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_merge_is_the_top_k_of_the_union_scored_like_the_index(kind, metric):
    stored, q = unit(300, 1), unit(7, 2)
    idx = SlotIndex(DIM, metric, kind)
    idx.add(np.arange(300), 1000 + np.arange(300), stored)
    k, m = 5, 9
    rng = np.random.default_rng(3)
    found = idx.search(q, k)
    # Extra slots overlap the result in some rows, and the last row repeats its last slot
    # (the store's padding of a short candidate list).
    extra = np.stack([rng.choice(300, m, replace=False) for _ in q])
    extra[0, :3] = found[2][0, :3]
    extra[-1, -3:] = extra[-1, -4]
    merged_s, merged_ids, merged_slots = idx.merge(q, found, extra, idx.reconstruct(extra), k)
    vectors = idx.reconstruct(np.arange(300))  # what the index scores (fp16: the rounded vectors)
    sims = scores_of(vectors, q, metric)
    for i in range(len(q)):
        union = sorted(set(found[2][i]) | set(extra[i]), key=lambda s: -sims[i, s])[:k]
        assert sorted(merged_slots[i]) == sorted(union)
        np.testing.assert_allclose(merged_s[i], sims[i, merged_slots[i]], rtol=1e-3, atol=1e-3)
        assert np.all(np.diff(merged_s[i]) <= 0)  # best first
    np.testing.assert_array_equal(merged_ids, 1000 + merged_slots)
    # One query at a time (the single-row path) gives the same rows.
    extra_vectors = idx.reconstruct(extra)
    for i in range(len(q)):
        one = idx.merge(q[i : i + 1], tuple(a[i : i + 1] for a in found), extra[i : i + 1], extra_vectors[i : i + 1], k)
        np.testing.assert_array_equal(one[2], merged_slots[i : i + 1])
        np.testing.assert_array_equal(one[1], merged_ids[i : i + 1])
        np.testing.assert_allclose(one[0], merged_s[i : i + 1], rtol=1e-6, atol=1e-6)


def test_merge_pads_when_the_union_is_short_and_skips_rows_without_candidates():
    idx = SlotIndex(DIM, "ip", "hnsw")
    idx.add(np.arange(3), np.array([7, 8, 9]), unit(3, 4))
    q = unit(2, 5)
    found = idx.search(q, 5)  # 3 results, 2 padding
    extra = np.array([[0, 0], [-1, -1]])  # row 1: no candidates (slots -1)
    vectors = idx.reconstruct(np.maximum(extra, 0))
    s, ids, slots = idx.merge(q, found, extra, vectors, 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all() and (slots[:, 3:] == -1).all()
    assert sorted(ids[0, :3]) == sorted(ids[1, :3]) == [7, 8, 9]
    for i in range(2):  # the single-row path pads the same way
        one = idx.merge(q[i : i + 1], tuple(a[i : i + 1] for a in found), extra[i : i + 1], vectors[i : i + 1], 5)
        np.testing.assert_array_equal(one[2], slots[i : i + 1])
        np.testing.assert_array_equal(one[1], ids[i : i + 1])
        np.testing.assert_array_equal(one[0], s[i : i + 1])


class MeanOfCandidates:
    """A stand-in enhancer: the refined query is the mean of the query and its candidates."""

    def __init__(self, candidates: int) -> None:
        self.candidates = candidates

    def refine(self, queries, cand_vectors, cand_scores):
        return (queries + cand_vectors.sum(1)) / (1 + cand_vectors.shape[1])


def test_an_enhanced_hnsw_search_returns_the_best_of_both_passes():
    docs, q = unit(2000, 6), unit(40, 7)
    mem = VectorMemory(DIM, metric="ip", index="hnsw", hnsw_m=4, ef_construction=8, ef_search=1)
    ids = mem.add(docs)
    mem.set_enhancer(MeanOfCandidates(candidates=20))
    k = 10
    merged_s, merged = mem.search_batch(q, k)
    refined = mem.refine_queries(q)
    mem.merge_candidates = False
    second_s, second = mem.search_batch(q, k)
    # Unmerged, the result is the plain search of the refined queries (the documented identity).
    np.testing.assert_array_equal(second, mem.search_batch(refined, k, enhance=False)[1])
    # Merged: the top-k of the second pass's result and the first pass's 20 candidates.
    first = mem.search_batch(q, 20, enhance=False)[1]
    sims = scores_of(docs, refined, "ip")
    slot_of = {int(i): s for s, i in enumerate(ids)}
    exact = np.argsort(-sims, axis=1)[:, :k]
    gained = 0
    for r in range(len(q)):
        union = {slot_of[int(i)] for i in (*second[r], *first[r]) if i >= 0}
        best = sorted(union, key=lambda s: -sims[r, s])[:k]
        got = {slot_of[int(i)] for i in merged[r] if i >= 0}  # this tiny graph may find fewer than k
        assert sorted(got) == sorted(best)
        # Never worse than the second pass alone, per query.
        hit_merged = len(got & set(exact[r]))
        hit_second = len({slot_of[int(i)] for i in second[r] if i >= 0} & set(exact[r]))
        assert hit_merged >= hit_second
        gained += hit_merged - hit_second
        assert merged_s[r, 0] >= second_s[r, 0] - 1e-6
    assert gained > 0  # this tiny graph at ef 1 does miss neighbours that the first pass holds


def test_merge_candidates_takes_a_bool_and_flat_search_never_merges():
    mem = VectorMemory(DIM, metric="ip")
    mem.add(unit(200, 8))
    mem.set_enhancer(MeanOfCandidates(candidates=5))
    mem.search(unit(3, 9), k=4)
    assert "merge" not in mem.metrics.summary()
    for bad in (1, "yes", None):
        with pytest.raises(HeadwiseError, match="merge_candidates"):
            mem.merge_candidates = bad
    hnsw = VectorMemory(DIM, metric="ip", index="hnsw")
    hnsw.add(unit(200, 8))
    hnsw.set_enhancer(MeanOfCandidates(candidates=5))
    hnsw.search(unit(3, 9), k=4)
    assert hnsw.metrics.summary()["merge"]["count"] == 1


@pytest.mark.parametrize("kind", ["flat", "hnsw", "hnsw-fp16"])
def test_reconstruct_into_the_workspace_equals_a_fresh_gather_and_is_overwritten(kind):
    idx = SlotIndex(DIM, "ip", kind)
    idx.add(np.arange(50), np.arange(50), unit(50, 10))
    a, b = np.array([[3, 1], [4, 1]]), np.array([[5, 9], [2, 6]])
    fresh_a = idx.reconstruct(a)
    got_a = idx.reconstruct(a, reuse=True)
    np.testing.assert_array_equal(got_a, fresh_a)
    got_b = idx.reconstruct(b, reuse=True)
    np.testing.assert_array_equal(got_b, idx.reconstruct(b))
    assert np.shares_memory(got_a, got_b)  # one workspace: the first result is gone
    np.testing.assert_array_equal(got_a, got_b)
    assert not np.shares_memory(fresh_a, idx.reconstruct(a))  # without reuse: a new array each time


def test_refined_queries_never_alias_the_candidate_workspace():
    class FirstCandidate:
        candidates = 3

        def refine(self, queries, cand_vectors, cand_scores):
            return cand_vectors[:, 0]  # a view into the store's workspace

    mem = VectorMemory(DIM, metric="ip", index="hnsw")
    mem.add(unit(100, 11))
    mem.set_enhancer(FirstCandidate())
    r1 = mem.refine_queries(unit(4, 12))
    kept = r1.copy()
    mem.refine_queries(unit(4, 13))  # overwrites the workspace
    np.testing.assert_array_equal(r1, kept)
