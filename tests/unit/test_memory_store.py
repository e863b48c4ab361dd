"""VectorMemory: search against numpy brute force, padding, delete, persistence, errors, cache, metrics, enhancer."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headwise.errors import HeadwiseError
from headwise.memory import MetricsCollector, ResultCache, VectorMemory
from headwise.memory.layout import DATABASE, MANIFEST

DIM = 16


def brute_force(stored: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """Exact top-k with numpy: scores (higher is better) and ids, -inf / -1 padded."""
    if metric == "cosine":
        stored = stored / np.linalg.norm(stored, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    if metric == "l2":
        sims = -((queries[:, None, :].astype(np.float64) - stored[None, :, :]) ** 2).sum(-1)
    else:
        sims = queries.astype(np.float64) @ stored.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    n, m = len(queries), min(k, len(stored))
    out_s = np.full((n, k), -np.inf)
    out_i = np.full((n, k), -1, dtype=np.int64)
    out_s[:, :m] = np.take_along_axis(sims, order, axis=1)
    out_i[:, :m] = ids[order]
    return out_s, out_i


def rand(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


# ---------------------------------------------------------------------- search results
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_flat_search_equals_numpy_brute_force(metric):
    x, q = rand(300, 1), rand(20, 2)
    mem = VectorMemory(DIM, metric=metric)
    ids = mem.add(x, ids=np.arange(1000, 1300))
    scores, found = mem.search(q, k=10)
    ref_s, ref_i = brute_force(x, ids, q, 10, metric)
    np.testing.assert_array_equal(found, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-4)
    assert scores.dtype == np.float32 and found.dtype == np.int64


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    metric=st.sampled_from(["cosine", "ip", "l2"]),
    n=st.integers(0, 40),
    k=st.integers(1, 50),
    deleted=st.sets(st.integers(0, 39), max_size=20),
    seed=st.integers(0, 10_000),
)
def test_property_flat_matches_brute_force_after_deletes(metric, n, k, deleted, seed):
    x = rand(n, seed)
    mem = VectorMemory(DIM, metric=metric)
    ids = mem.add(x)
    removed = mem.delete(sorted(deleted))
    keep = ~np.isin(ids, sorted(deleted))
    assert removed == n - keep.sum() and len(mem) == keep.sum()
    q = rand(3, seed + 1)
    scores, found = mem.search(q, k)
    ref_s, ref_i = brute_force(x[keep], ids[keep], q, k, metric)
    np.testing.assert_array_equal(found, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", ["flat", "hnsw", "hnsw-fp16"])
def test_fewer_than_k_pads_with_minus_one_and_minus_inf(index):
    mem = VectorMemory(DIM, index=index)
    scores, ids = mem.search(rand(2), k=3)  # empty store
    assert (ids == -1).all() and np.isneginf(scores).all()
    mem.add(rand(2))
    scores, ids = mem.search(rand(1, 5), k=5)
    assert sorted(ids[0, :2].tolist()) == [0, 1] and (ids[0, 2:] == -1).all()
    assert np.isfinite(scores[0, :2]).all() and np.isneginf(scores[0, 2:]).all()


@pytest.mark.parametrize("index", ["flat", "hnsw", "hnsw-fp16"])
def test_deleted_ids_never_returned(index):
    x = rand(400, 3)
    mem = VectorMemory(DIM, index=index, metric="l2")
    ids = mem.add(x)
    gone = ids[::3]
    assert mem.delete(gone) == len(gone)
    assert mem.delete(gone) == 0  # deleting again deletes nothing
    assert len(mem) == 400 - len(gone)
    # Each deleted vector queried exactly: its own id would be the top hit if it were still there.
    _, found = mem.search(x[gone], k=10)
    assert not np.isin(found, gone).any()
    assert (found[:, 0] >= 0).all()
    # A deleted id can be reused; the new vector is what is found.
    mem.add(x[:1] + 5.0, ids=[int(gone[0])])
    _, found = mem.search(x[:1] + 5.0, k=1)
    assert found[0, 0] == gone[0]


def test_mass_delete_compacts_and_search_stays_exact():
    x = rand(200, 4)
    mem = VectorMemory(DIM, index="hnsw", metric="l2", ef_search=200)
    ids = mem.add(x)
    mem.delete(ids[:150])  # > 25% tombstones: rebuilt in memory
    assert mem._index.n_slots == 50
    _, found = mem.search(x[150:], k=1)
    np.testing.assert_array_equal(found[:, 0], ids[150:])


def test_records_vectors_and_ids():
    mem = VectorMemory(DIM, metric="ip")
    x = rand(3)
    mem.add(x, ids=[5, 9, 7], metadata=[{"a": 1}, None, [1, "b"]], texts=["five", None, "seven"])
    recs = mem.get([9, 4, 7])
    assert recs[1] is None
    assert (recs[0].id, recs[0].metadata, recs[0].text) == (9, None, None)
    assert (recs[2].metadata, recs[2].text) == ([1, "b"], "seven")
    np.testing.assert_array_equal(mem.vectors([7, 5]), x[[2, 0]])
    assert mem.ids().tolist() == [5, 7, 9]
    assert mem.add(rand(1)).tolist() == [10]  # auto ids continue above the largest id used


def test_cosine_stores_normalised_vectors():
    mem = VectorMemory(DIM)
    mem.add(rand(5) * 7.0)
    np.testing.assert_allclose(np.linalg.norm(mem.vectors(range(5)), axis=1), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------- bad input, store unchanged
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.add(rand(2)[:, :5]), "shape"),
        (lambda m: m.add(np.full((1, DIM), np.nan)), "NaN or Inf"),
        (lambda m: m.add(np.full((1, DIM), np.inf)), "NaN or Inf"),
        (lambda m: m.add(np.zeros((1, DIM))), "non-zero"),
        (lambda m: m.add(rand(2), ids=[50, 50]), "duplicates within the call"),
        (lambda m: m.add(rand(2), ids=[50, 1]), "already stored"),
        (lambda m: m.add(rand(2), ids=[50]), "one per vector"),
        (lambda m: m.add(rand(1), ids=[-1]), ">= 0"),
        (lambda m: m.add(rand(1), ids=[1.5]), "ints"),
        (lambda m: m.add(rand(1), metadata=[{"x": object()}]), "metadata"),
        (lambda m: m.add(rand(2), metadata=[{}]), "metadata"),
        (lambda m: m.add(rand(1), texts=[3]), "texts"),
        (lambda m: m.search(rand(1), k=0), r"k: expected an int in \[1, 16384\]"),
        (lambda m: m.search(rand(1), k=-3), "k"),
        (lambda m: m.search(rand(1)[:, :3], k=1), "queries"),
        (lambda m: m.search(rand(1), k=1, enhance=True), "enhance"),
        (lambda m: m.search_batch(rand(1)[0], k=1), "2-d"),
        (lambda m: m.add_texts(["a"]), "encoder"),
        (lambda m: m.vectors([0, 99]), "absent"),
        (lambda m: m.set_enhancer(object()), "enhancer"),
        (lambda m: m.save(), "in-memory"),
    ],
)
def test_bad_input_raises_and_leaves_store_unchanged(call, match):
    mem = VectorMemory(DIM)
    mem.add(rand(3, 7))
    before = mem.search(rand(2, 8), k=3)
    with pytest.raises(HeadwiseError, match=match):
        call(mem)
    assert len(mem) == 3 and mem.ids().tolist() == [0, 1, 2]
    after = mem.search(rand(2, 8), k=3)
    np.testing.assert_array_equal(before[1], after[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metric": "dot"}, "metric"),
        ({"index": "ivf"}, "index"),
        ({"hnsw_m": 1}, "hnsw_m"),
        ({"ef_search": 0}, "ef_search"),
        ({"cache_size": -1}, "cache_size"),
        ({"cache_ttl": 0}, "cache_ttl"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(HeadwiseError, match=match):
        VectorMemory(DIM, **kwargs)
    with pytest.raises(HeadwiseError, match="dim"):
        VectorMemory(0)


# ---------------------------------------------------------------------- persistence
@pytest.mark.parametrize("index", ["flat", "hnsw", "hnsw-fp16"])
def test_round_trip_and_writes_after_save_survive(tmp_path, index):
    path = tmp_path / "mem"
    x, q = rand(120, 11), rand(5, 12)
    mem = VectorMemory(DIM, index=index, path=path, metric="ip", ef_search=80)
    mem.add(x[:100], metadata=[{"i": i} for i in range(100)], texts=[f"t{i}" for i in range(100)])
    mem.save()
    mem.add(x[100:], ids=np.arange(500, 520))  # after the save: only in SQLite
    mem.delete([0, 1, 2])
    expected = mem.search(q, k=7)
    mem.close()

    again = VectorMemory.open(path)
    assert (again.dim, again.metric, again.index_kind, again.ef_search) == (DIM, "ip", index, 80)
    assert len(again) == 117
    np.testing.assert_array_equal(again.search(q, k=7)[1], expected[1])
    assert again.get([0])[0] is None and again.get([42])[0].metadata == {"i": 42}
    assert again.get([42])[0].text == "t42"
    np.testing.assert_array_equal(again.vectors([505]), x[105:106])
    again.save()  # replaces the index files; flat drops its 3 tombstones, HNSW keeps them (< 10%)
    names = sorted(p.name for p in path.iterdir() if p.name.startswith(("index-", "slots-")))
    assert len(names) == 2
    again.close()
    third = VectorMemory.open(path)
    assert len(third) == 117 and third._index.n_slots == (117 if index == "flat" else 120)
    np.testing.assert_array_equal(third.search(q, k=7)[1], expected[1])


def test_open_without_a_saved_index_rebuilds_from_sqlite(tmp_path):
    mem = VectorMemory(DIM, path=tmp_path / "m")
    mem.add(rand(10))
    mem.close()
    assert json.loads((tmp_path / "m" / MANIFEST).read_text())["index"] is None
    again = VectorMemory.open(tmp_path / "m")
    assert len(again) == 10 and again.search(rand(1), k=10)[1].min() == 0


def test_leftovers_of_an_interrupted_save_are_removed(tmp_path):
    path = tmp_path / "m"
    mem = VectorMemory(DIM, path=path)
    mem.add(rand(10))
    mem.save()
    mem.close()
    # What a save killed before its manifest replace leaves behind: temp files and new index files.
    (path / ".index-abc.faiss.tmp").write_bytes(b"partial")
    (path / "index-ffff.faiss").write_bytes(b"complete but never named by the manifest")
    (path / "slots-ffff.npy").write_bytes(b"x")
    again = VectorMemory.open(path)
    assert len(again) == 10
    assert sorted(p.name for p in path.iterdir() if "ffff" in p.name or p.name.endswith(".tmp")) == []


def test_create_refuses_a_non_empty_directory_and_accepts_an_empty_one(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("hello")
    with pytest.raises(HeadwiseError, match="new or empty directory"):
        VectorMemory(DIM, path=tmp_path / "full")
    (tmp_path / "empty").mkdir()
    VectorMemory(DIM, path=tmp_path / "empty").close()
    assert (tmp_path / "empty" / MANIFEST).exists()


def _saved_store(tmp_path: Path) -> Path:
    path = tmp_path / "m"
    mem = VectorMemory(DIM, path=path)
    mem.add(rand(50))
    mem.save()
    mem.close()
    return path


def test_open_refuses_damaged_or_foreign_stores(tmp_path):
    with pytest.raises(HeadwiseError, match="directory"):
        VectorMemory.open(tmp_path / "nothing")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"\0" * 100)
    with pytest.raises(HeadwiseError, match=MANIFEST):
        VectorMemory.open(foreign)

    path = _saved_store(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(HeadwiseError, match="version 1, got 99"):
        VectorMemory.open(path)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(HeadwiseError, match="JSON"):
        VectorMemory.open(path)
    (path / MANIFEST).write_text(json.dumps({**manifest, "format": "chroma"}))
    with pytest.raises(HeadwiseError, match="format"):
        VectorMemory.open(path)
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert len(VectorMemory.open(path)) == 50


def test_open_refuses_a_garbage_index_unless_asked_to_rebuild(tmp_path):
    path = _saved_store(tmp_path)
    index_file = path / json.loads((path / MANIFEST).read_text())["index"]["file"]
    data = bytearray(index_file.read_bytes())
    data[100:200] = b"\xff" * 100
    index_file.write_bytes(bytes(data))
    with pytest.raises(HeadwiseError, match="checksum"):
        VectorMemory.open(path)
    mem = VectorMemory.open(path, rebuild_index=True)
    assert len(mem) == 50 and mem.search(mem.vectors([7]), k=1)[1][0, 0] == 7


def test_open_refuses_a_truncated_or_foreign_database(tmp_path):
    path = _saved_store(tmp_path)
    db = path / DATABASE
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    with pytest.raises(HeadwiseError, match="database"):
        VectorMemory.open(path)

    other = _saved_store(tmp_path / "b")
    (other / DATABASE).unlink()
    sqlite3.connect(other / DATABASE).execute("CREATE TABLE t(x)").connection.close()
    with pytest.raises(HeadwiseError, match="application_id"):
        VectorMemory.open(other)
    (other / DATABASE).write_bytes(b"this is not a database file" * 200)
    with pytest.raises(HeadwiseError, match="database"):
        VectorMemory.open(other)


# ---------------------------------------------------------------------- cache and metrics
def test_result_cache_hits_and_is_invalidated_on_add_and_delete():
    mem = VectorMemory(DIM, metric="l2", cache_size=8)
    x = rand(20)
    mem.add(x)
    q = x[:1] + 0.01
    first = mem.search(q, k=3)
    second = mem.search(q, k=3)
    assert mem.cache.hits == 1
    np.testing.assert_array_equal(first[1], second[1])
    mem.add(q, ids=[99])  # now the best match: a stale cache would miss it
    assert mem.search(q, k=3)[1][0, 0] == 99
    mem.delete([99])
    assert mem.search(q, k=3)[1][0, 0] != 99
    assert mem.cache.hits == 1 and mem.cache.invalidations == 2


def test_result_cache_lru_and_ttl():
    now = [0.0]
    cache = ResultCache(max_size=2, ttl=10.0, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now least recently used
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    now[0] = 10.5
    assert cache.get("a") is None and cache.stats()["expired"] == 1
    assert ResultCache(0).get("a") is None


def test_search_batch_uses_the_cache_per_row():
    mem = VectorMemory(DIM, cache_size=100)
    mem.add(rand(30))
    q = rand(4, 9)
    mem.search(q[:2], k=2)
    scores, ids = mem.search_batch(q, k=2)
    assert mem.cache.hits == 2 and mem.cache.misses == 4
    ref = VectorMemory(DIM)
    ref.add(mem.vectors(range(30)))
    np.testing.assert_array_equal(ids, ref.search(q, k=2)[1])


def test_metrics_count_calls_and_items():
    mem = VectorMemory(DIM)
    mem.add(rand(10))
    mem.search(rand(1), k=2)
    mem.search_batch(rand(5), k=2)
    s = mem.metrics.summary()
    assert (s["add"]["items"], s["search"]["count"], s["search_batch"]["items"]) == (10, 1, 5)
    assert s["search"]["p50_us"] > 0 and s["search_batch"]["throughput_per_s"] > 0
    assert set(json.loads(mem.metrics.to_json())) == {"add", "search", "search_batch"}
    assert mem.metrics.to_markdown().count("\n") == 4  # header, rule, three rows
    m = MetricsCollector()
    for ms in range(1, 101):
        m.record("op", ms / 1000)
    assert m.summary()["op"]["p99_us"] == pytest.approx(99_010.0)


# ---------------------------------------------------------------------- enhancer
class MeanOfCandidates:
    """A real (untrained) refinement: the query moves to the mean of itself and its candidates."""

    def __init__(self, candidates: int) -> None:
        self.candidates = candidates
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []

    def refine(self, queries, cand_vectors, cand_scores):
        self.calls.append((queries.shape, cand_vectors.shape, cand_scores.shape))
        return (queries + cand_vectors.sum(1)) / (1 + cand_vectors.shape[1])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_enhanced_search_is_a_second_search_with_refined_queries(metric):
    x, q = rand(200, 21), rand(6, 22)
    mem = VectorMemory(DIM, metric=metric)
    ids = mem.add(x)
    enh = MeanOfCandidates(candidates=5)
    mem.set_enhancer(enh)
    scores, found = mem.search_batch(q, k=4)
    assert enh.calls == [((6, DIM), (6, 5, DIM), (6, 5))]  # one batched call
    # Independent recomputation with numpy: top-5, mean, normalise (cosine), top-4.
    stored = mem.vectors(ids)
    qq = q / np.linalg.norm(q, axis=1, keepdims=True) if metric == "cosine" else q
    _, top5 = brute_force(stored, ids, qq, 5, "ip" if metric == "cosine" else "l2")
    refined = (qq + stored[top5].sum(1)) / 6
    ref_s, ref_i = brute_force(stored, ids, refined, 4, metric)
    np.testing.assert_array_equal(found, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-4)
    # enhance=False is the plain search; enhance=None uses the enhancer when set.
    np.testing.assert_array_equal(mem.search(q, k=4, enhance=False)[1], brute_force(stored, ids, q, 4, metric)[1])
    np.testing.assert_array_equal(mem.search(q, k=4)[1], found)
    assert "refine" in mem.metrics.summary()
    # refine_queries exposes the second pass's queries.
    refined_by_store = mem.refine_queries(q)
    expected = refined / np.linalg.norm(refined, axis=1, keepdims=True) if metric == "cosine" else refined
    np.testing.assert_allclose(refined_by_store, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mem.search(refined_by_store, k=4, enhance=False)[1], found)


def test_candidate_ef_sets_the_first_pass_beam_only(monkeypatch):
    mem = VectorMemory(DIM, index="hnsw", ef_search=40)
    mem.add(rand(300, 31))
    mem.set_enhancer(MeanOfCandidates(candidates=5))
    calls = []
    real = mem._index.search
    monkeypatch.setattr(mem._index, "search", lambda q, k, ef=None: calls.append((k, ef)) or real(q, k, ef=ef))
    mem.search(rand(2, 32), k=3)
    assert calls == [(5, None), (3, None)]  # both passes at ef_search
    mem.candidate_ef = 8
    calls.clear()
    mem.search(rand(2, 33), k=3)
    assert calls == [(5, 8), (3, None)]
    assert mem._index._search_params(8).efSearch == 8  # faiss gets the narrower beam
    for bad in (0, -1, 2.5, True):
        with pytest.raises(HeadwiseError, match="candidate_ef"):
            mem.candidate_ef = bad
    mem.candidate_ef = None
    assert mem.candidate_ef is None


class AdaptedFirstPass(MeanOfCandidates):
    """Searches its first pass with the query turned around, and records what it was asked."""

    def first_pass_queries(self, queries):
        self.calls.append(("first", queries.shape))
        return -queries


def test_first_pass_uses_first_pass_queries_and_candidate_free_enhancers_skip_it(monkeypatch):
    mem = VectorMemory(DIM)
    mem.add(rand(100, 41))
    q = rand(3, 42)
    enh = AdaptedFirstPass(candidates=4)
    mem.set_enhancer(enh)
    passes = []
    real = mem._index.search
    monkeypatch.setattr(mem._index, "search", lambda x, k, ef=None: passes.append(x.copy()) or real(x, k, ef=ef))
    mem.search(q, k=3)
    assert enh.calls[0] == ("first", (3, DIM)) and len(passes) == 2
    np.testing.assert_allclose(passes[0], -q / np.linalg.norm(q, axis=1, keepdims=True), rtol=1e-6)

    class QueryOnly:
        candidates, uses_candidates = 1, False

        def refine(self, queries, cand_vectors=None, cand_scores=None):
            assert cand_vectors is None and cand_scores is None
            return 2 * queries

    mem.set_enhancer(QueryOnly())
    passes.clear()
    mem.search(q, k=3)
    assert len(passes) == 1  # no first pass: the refine needs no candidates


def test_refine_queries_needs_an_enhancer():
    mem = VectorMemory(DIM)
    mem.add(rand(10))
    with pytest.raises(HeadwiseError, match="enhance"):
        mem.refine_queries(rand(1))


def test_enhancer_with_more_candidates_than_records_and_bad_output():
    mem = VectorMemory(DIM)
    mem.add(rand(3))
    enh = MeanOfCandidates(candidates=50)
    mem.set_enhancer(enh)
    _, found = mem.search(rand(1, 3), k=5)
    assert enh.calls[-1][1] == (1, 3, DIM) and sorted(found[0, :3].tolist()) == [0, 1, 2]

    class Broken:
        candidates = 2

        def refine(self, queries, cand_vectors, cand_scores):
            return queries[:, :3]

    mem.set_enhancer(Broken())
    with pytest.raises(HeadwiseError, match="refine"):
        mem.search(rand(1), k=1)


# ---------------------------------------------------------------------- text in, text out
class CharCountEncoder:
    """A deterministic toy encoder (letter counts) to test the text plumbing without a model."""

    dim = 26

    def encode(self, texts):
        out = np.zeros((len(texts), 26), dtype=np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out + 1e-3


def test_add_texts_and_search_text(tmp_path):
    mem = VectorMemory(26, path=tmp_path / "m", encoder=CharCountEncoder())
    mem.add_texts(["aaaa", "bbbb", "abab"], metadata=[{"n": 0}, {"n": 1}, {"n": 2}])
    hits = mem.search_text("aaab", k=2)
    assert [h.id for h in hits] == [0, 2] and hits[0].text == "aaaa" and hits[1].metadata == {"n": 2}
    assert hits[0].score > hits[1].score
    mem.close()
    with pytest.raises(HeadwiseError, match="encoder"):
        VectorMemory.open(tmp_path / "m", encoder=type("E", (), {"dim": 3, "encode": lambda s, t: t})())
    assert VectorMemory.open(tmp_path / "m", encoder=CharCountEncoder()).search_text("bbbb", k=1)[0].id == 1


def test_footprint_counts_index_and_sqlite(tmp_path):
    mem = VectorMemory(DIM, path=tmp_path / "m", metric="l2")
    mem.add(rand(100))
    mem.save()
    fp = mem.footprint()
    assert fp["index_bytes"] == 100 * DIM * 4  # flat: the float32 codes, nothing else
    assert fp["sqlite_bytes"] >= 100 * DIM * 4  # SQLite holds the vectors too (the source of truth)
    assert fp["bytes_per_vector"] == (fp["index_bytes"] + fp["sqlite_bytes"]) / 100
    hnsw = VectorMemory(DIM, index="hnsw", hnsw_m=8)
    hnsw.add(rand(100))
    assert hnsw.footprint()["index_bytes"] > 100 * DIM * 4  # plus the graph


@pytest.mark.parametrize("kind", ["flat", "hnsw", "hnsw-fp16"])
def test_slot_index_reconstruct_gathers_the_stored_vectors(kind):
    from headwise.memory.index import SlotIndex

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((50, 8)).astype(np.float32)
    if kind == "hnsw-fp16":  # what is stored: the vectors rounded to half precision
        vecs = vecs.astype(np.float16).astype(np.float32)
    index = SlotIndex(8, "ip", kind)
    index.add(np.arange(50), np.arange(50), vecs)
    slots = rng.integers(0, 50, (4, 3))
    np.testing.assert_array_equal(index.reconstruct(slots), vecs[slots])  # (n, K, d), gathered by numpy
    many = rng.integers(0, 50, (30, 20))  # 600 rows: more than _NUMPY_MAX_ROWS, gathered by torch
    np.testing.assert_array_equal(index.reconstruct(many), vecs[many])
    np.testing.assert_array_equal(index.reconstruct(many, reuse=True), vecs[many])
    index.add(np.arange(50, 60), np.arange(50, 60), vecs[:10])  # faiss may move its storage: a fresh view
    np.testing.assert_array_equal(index.reconstruct(np.array([55, 0])), vecs[[5, 0]])
    index.remove_seqs(np.arange(0, 60, 2))
    index.compact()  # a new faiss index: slot i now holds the old slot 2 i + 1
    np.testing.assert_array_equal(index.reconstruct(np.array([0, 29])), vecs[[1, 9]])
    assert index.reconstruct(np.empty(0, dtype=np.int64)).shape == (0, 8)
    with pytest.raises(HeadwiseError, match="slots"):
        index.reconstruct(np.array([0, 30]))
    with pytest.raises(HeadwiseError, match="slots"):
        index.reconstruct(np.array([-1]))


def test_fp16_index_scores_are_the_half_precision_vectors_and_foreign_files_are_refused():
    import faiss

    from headwise.memory.index import SlotIndex

    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((300, 16)).astype(np.float32)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    index = SlotIndex(16, "ip", "hnsw-fp16", ef_search=300)
    index.add(np.arange(300), np.arange(300), vecs)
    scores, ids, _ = index.search(q, 5)
    half = vecs.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ half.T, ids, axis=1), rtol=1e-5, atol=1e-5)
    assert (ids == np.argsort(-(q @ half.T), axis=1)[:, :5]).mean() > 0.9  # the graph finds the top 5
    full = SlotIndex(16, "ip", "hnsw")
    full.add(np.arange(300), np.arange(300), vecs)
    assert index.memory_bytes() < full.memory_bytes()  # 2 bytes a component instead of 4
    blob, seqs = index.serialize()
    again = SlotIndex.deserialize(blob, seqs, 16, "ip", "hnsw-fp16", ef_search=300)
    again.set_live(np.arange(300), np.arange(300))  # the store does this from SQLite
    np.testing.assert_array_equal(again.search(q, 5)[1], ids)
    with pytest.raises(HeadwiseError, match="IndexHNSWFlat"):  # an fp16 file where float32 is expected
        SlotIndex.deserialize(blob, seqs, 16, "ip", "hnsw")
    sq8 = faiss.IndexHNSWSQ(16, faiss.ScalarQuantizer.QT_8bit, 8, faiss.METRIC_INNER_PRODUCT)
    sq8.train(vecs)
    sq8.add(vecs)
    with pytest.raises(HeadwiseError, match="hnsw-fp16"):  # another quantizer is a foreign file
        SlotIndex.deserialize(faiss.serialize_index(sq8).tobytes(), seqs, 16, "ip", "hnsw-fp16")
