"""Filtered search: the filter language against a Python reading of its documentation, flat search against
numpy, HNSW recall against exact filtered search at 50%, 5% and 0.5% selectivity, k results whenever k
records match, bad filters, readers, field indexes, the caches and the enhanced path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headwise.errors import HeadwiseError
from headwise.memory import VectorMemory
from headwise.memory.filters import compile_filter

DIM = 8

# ---------------------------------------------------------------------- a Python oracle of the documented semantics
MISSING = object()


def lookup(meta, name):
    cur = meta
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return MISSING
        cur = cur[part]
    return cur


def kind(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    return "str" if isinstance(v, str) else "other"


def equal(v, x):
    return x is not MISSING and kind(x) == kind(v) and kind(v) != "other" and x == v


def op_match(op, arg, x):
    if op == "$eq":
        return equal(arg, x)
    if op == "$ne":
        return not equal(arg, x)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if x is MISSING or kind(x) != "number":
            return False
        return {"$gt": x > arg, "$gte": x >= arg, "$lt": x < arg, "$lte": x <= arg}[op]
    if op == "$in":
        return any(equal(v, x) for v in arg)
    if op == "$nin":
        return not any(equal(v, x) for v in arg)
    if op == "$exists":
        return (x is not MISSING) == arg
    if op == "$not":
        return not field_match(arg, x)
    raise AssertionError(op)


def field_match(spec, x):
    if isinstance(spec, dict):
        return all(op_match(op, arg, x) for op, arg in spec.items())
    return equal(spec, x)


def py_match(where, meta):
    for key, spec in where.items():
        if key == "$and":
            ok = all(py_match(f, meta) for f in spec)
        elif key == "$or":
            ok = any(py_match(f, meta) for f in spec)
        elif key == "$not":
            ok = not py_match(spec, meta)
        else:
            ok = field_match(spec, lookup(meta, key))
        if not ok:
            return False
    return True


# ---------------------------------------------------------------------- strategies
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.5, -1.5, 2.0, 1e-3]),
    st.text(alphabet="ab\u00e9\U0001f600", max_size=2),
)
values = st.one_of(scalars, st.lists(scalars, max_size=2), st.fixed_dictionaries({"x": scalars}))
metadata = st.one_of(
    st.none(),
    st.integers(0, 2),
    st.lists(scalars, max_size=2),
    st.dictionaries(st.sampled_from(["a", "b", "n", "c_1"]), values, max_size=4),
)
FIELDS = ["a", "b", "n", "n.x", "c_1", "never"]
numbers = st.one_of(st.integers(-3, 3), st.sampled_from([0.5, -1.5, 2.0]))
field_ops = st.one_of(
    st.fixed_dictionaries({"$eq": scalars}),
    st.fixed_dictionaries({"$ne": scalars}),
    st.dictionaries(st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), numbers, min_size=1, max_size=2),
    st.fixed_dictionaries({"$in": st.lists(scalars, max_size=3)}),
    st.fixed_dictionaries({"$nin": st.lists(scalars, max_size=3)}),
    st.fixed_dictionaries({"$exists": st.booleans()}),
)
field_specs = st.one_of(scalars, field_ops, st.fixed_dictionaries({"$not": field_ops}))
leaf_filters = st.dictionaries(st.sampled_from(FIELDS), field_specs, max_size=2)
filters = st.recursive(
    leaf_filters,
    lambda inner: st.one_of(
        st.fixed_dictionaries({"$and": st.lists(inner, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"$or": st.lists(inner, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"$not": inner}),
    ),
    max_leaves=6,
)


def store_with(metas, index="flat", **kw):
    n = len(metas)
    mem = VectorMemory(DIM, metric="l2", index=index, **kw)
    x = np.random.default_rng(n).standard_normal((n, DIM)).astype(np.float32)
    if n:
        mem.add(x, metadata=metas)
    return mem, x


def matched_ids(mem, where):
    n = max(len(mem), 1)
    _, ids = mem.search(np.zeros(DIM, dtype=np.float32), k=n, filter=where)
    return set(ids[0][ids[0] >= 0].tolist())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metas=st.lists(metadata, max_size=25), wheres=st.lists(filters, min_size=1, max_size=6))
def test_property_sql_evaluation_matches_the_documented_semantics(metas, wheres):
    mem, _ = store_with(metas)
    for where in wheres:
        expected = {i for i, m in enumerate(metas) if py_match(where, m)}
        assert matched_ids(mem, where) == expected, (where, metas)


def test_examples_of_the_documented_semantics():
    metas = [
        {"lang": "en", "year": 2001, "tag": "a", "flag": True, "src": {"kind": "web"}},
        {"lang": "fr", "year": 1999.5, "tag": "b", "flag": 1},
        {"lang": "en", "year": "2005", "tag": None},
        {"year": 2010, "tag": ["a"]},
        None,
        "en",
    ]
    mem, _ = store_with(metas)
    cases = [
        ({"lang": "en"}, {0, 2}),
        ({"lang": {"$ne": "en"}}, {1, 3, 4, 5}),  # also the records without the field
        ({"year": {"$gte": 2000, "$lt": 2010}}, {0}),  # a string "2005" is not a number
        ({"year": {"$lt": 2000}}, {1}),
        ({"tag": {"$in": ["a", "b"]}}, {0, 1}),  # a list holding "a" is not "a"
        ({"tag": {"$nin": ["a"]}}, {1, 2, 3, 4, 5}),
        ({"tag": None}, {2}),
        ({"tag": {"$exists": True}}, {0, 1, 2, 3}),
        ({"tag": {"$exists": False}}, {4, 5}),
        ({"flag": True}, {0}),  # True is not 1
        ({"flag": 1}, {1}),
        ({"src.kind": "web"}, {0}),
        ({"$or": [{"lang": "fr"}, {"year": 2010}]}, {1, 3}),
        ({"$not": {"lang": "en"}}, {1, 3, 4, 5}),
        ({"year": {"$not": {"$gt": 2000}}}, {1, 2, 4, 5}),
        ({"$and": [{"lang": "en"}, {"year": {"$exists": True}}]}, {0, 2}),
        ({"nobody": "has this"}, set()),  # allowed: an empty result
        ({"nobody": {"$exists": False}}, set(range(6))),
        ({}, set(range(6))),
        ({"tag": {"$in": []}}, set()),
    ]
    for where, expected in cases:
        assert matched_ids(mem, where) == expected, where
        assert {i for i, m in enumerate(metas) if py_match(where, m)} == expected, where  # the oracle agrees


@pytest.mark.parametrize(
    "where, match",
    [
        ({"year": {"$gt": "2000"}}, r"filter field 'year' \$gt: expected a number"),
        ({"year": {"$lt": True}}, r"filter field 'year' \$lt: expected a number"),
        ({"year": {"$regex": "x"}}, r"filter field 'year'.*unknown operator '\$regex'"),
        ({"$nor": [{"a": 1}]}, r"filter: .*operator '\$nor'"),
        ({"tag": ["a", "b"]}, r"filter field 'tag' \$eq: expected a str, int, float, bool or None"),
        ({"tag": {"$in": "a"}}, r"filter field 'tag' \$in: expected a list"),
        ({"tag": {"$in": [["a"]]}}, r"filter field 'tag' \$in"),
        ({"tag": {"$exists": 1}}, r"filter field 'tag' \$exists: expected True or False"),
        ({"bad-name": 1}, r"filter field: expected a field name"),
        ({"a..b": 1}, r"filter field: expected a field name"),
        ({"a'); DROP TABLE records; --": 1}, r"filter field: expected a field name"),
        ({"$and": []}, r"filter \$and: expected a non-empty list"),
        ({"$or": {"a": 1}}, r"filter \$or: expected a non-empty list"),
        ({"$not": [{"a": 1}]}, r"filter \$not: expected a filter dict"),
        ({"a": {}}, r"filter field 'a': expected a value or a non-empty operator dict"),
        ({"a": float("nan")}, r"filter field 'a' \$eq: expected a finite number"),
        ({"a": 2**64}, r"filter field 'a' \$eq: expected an int in"),
        ({"a": "x\x00y"}, r"filter field 'a' \$eq: expected a str without NUL"),
        ({1: "x"}, r"filter: expected str keys"),
        (["a"], r"filter: expected a dict"),
    ],
)
def test_bad_filters_name_the_field_or_operator(where, match):
    mem, _ = store_with([{"a": 1}])
    with pytest.raises(HeadwiseError, match=match):
        mem.search(np.zeros(DIM, dtype=np.float32), k=1, filter=where)
    with pytest.raises(HeadwiseError, match=match):
        compile_filter(where)


def test_deep_and_wide_filters():
    mem, _ = store_with([{"a": i} for i in range(5)])
    wide = {"$or": [{"a": i} for i in range(3000)]}  # balanced in SQL: SQLite refuses depth > 1000
    assert matched_ids(mem, wide) == set(range(5))
    deep: dict = {"a": 1}
    for _ in range(33):
        deep = {"$not": deep}
    with pytest.raises(HeadwiseError, match="levels"):
        compile_filter(deep)
    with pytest.raises(HeadwiseError, match="at most 10000 values"):
        compile_filter({"$or": [{"a": i} for i in range(10_001)]})


# ---------------------------------------------------------------------- flat: exact pre-filtering
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_flat_filtered_search_equals_numpy_exact_filtered(metric):
    rng = np.random.default_rng(3)
    x, q = rng.standard_normal((500, DIM)).astype(np.float32), rng.standard_normal((30, DIM)).astype(np.float32)
    tags = rng.integers(0, 10, 500)
    mem = VectorMemory(DIM, metric=metric)
    mem.add(x, metadata=[{"tag": int(t)} for t in tags])
    mem.delete(np.arange(0, 500, 7))  # tombstones too
    live = np.ones(500, dtype=bool)
    live[::7] = False
    cases = [
        ({"tag": {"$lt": 5}}, tags < 5),
        ({"tag": 3}, tags == 3),
        ({"tag": {"$in": [1, 9]}}, np.isin(tags, [1, 9])),
    ]
    for where, keep in cases:
        ids = np.flatnonzero(keep & live)
        xs, qs = x[ids].astype(np.float64), q.astype(np.float64)
        if metric == "cosine":
            xs, qs = xs / np.linalg.norm(xs, axis=1, keepdims=True), qs / np.linalg.norm(qs, axis=1, keepdims=True)
        ref = -((qs[:, None] - xs[None]) ** 2).sum(-1) if metric == "l2" else qs @ xs.T
        order = np.argsort(-ref, axis=1, kind="stable")[:, :10]
        scores, found = mem.search(q, 10, filter=where)
        np.testing.assert_array_equal(found, ids[order])
        np.testing.assert_allclose(scores, np.take_along_axis(ref, order, axis=1), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- HNSW: recall and k results
N_BIG, DIM_BIG = 20_000, 32


@pytest.fixture(scope="module")
def big_hnsw():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((N_BIG, DIM_BIG)).astype(np.float32)
    buckets = rng.permutation(N_BIG)
    mem = VectorMemory(DIM_BIG, metric="l2", index="hnsw", hnsw_m=16, ef_construction=100)
    mem.add(x, metadata=[{"bucket": int(b)} for b in buckets])
    return mem, x, buckets, rng.standard_normal((40, DIM_BIG)).astype(np.float32)


@pytest.mark.parametrize("exact_max", [None, 0], ids=["measured-rule", "graph-forced"])
@pytest.mark.parametrize("selectivity", [0.5, 0.05, 0.005])
def test_hnsw_filtered_recall_against_exact_filtered(big_hnsw, selectivity, exact_max):
    mem, x, buckets, q = big_hnsw
    m = int(selectivity * N_BIG)
    keep = np.flatnonzero(buckets < m)
    dist = ((q[:, None, :].astype(np.float64) - x[keep][None]) ** 2).sum(-1)
    exact = keep[np.argsort(dist, axis=1)[:, :10]]
    mem.exact_filter_max = exact_max
    try:
        _, found = mem.search(q, 10, filter={"bucket": {"$lt": m}})
    finally:
        mem.exact_filter_max = None
    assert (found >= 0).all()  # k results in every row: at least k records match
    assert np.isin(found, keep).all()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), exact.tolist())])
    assert recall >= 0.95, (selectivity, exact_max, recall)


@pytest.mark.parametrize("index", ["hnsw", "hnsw-fp16"])
def test_hnsw_returns_k_whenever_k_match(index):
    rng = np.random.default_rng(5)
    n = 3000
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    mem = VectorMemory(DIM, metric="ip", index=index, hnsw_m=8, ef_construction=40, ef_search=16)
    mem.add(x, metadata=[{"b": int(b)} for b in rng.permutation(n)])
    mem.delete(np.arange(0, n, 5))  # tombstones the graph still walks through
    bs = np.array([r.metadata["b"] for r in mem.get(mem.ids())])
    q = rng.standard_normal((20, DIM)).astype(np.float32)
    for exact_max in (None, 0):
        mem.exact_filter_max = exact_max
        for m in (0, 3, 10, 11, 40, 600, 2900):
            matching = int((bs < m).sum())
            _, found = mem.search(q, 10, filter={"b": {"$lt": m}})
            assert ((found >= 0).sum(axis=1) == min(10, matching)).all(), (m, exact_max)
            live = found[found >= 0]
            assert len(set(live.tolist()) - set(mem.ids()[bs < m].tolist())) == 0


# ---------------------------------------------------------------------- readers, indexes, caches, enhancer
def test_a_reader_filters_its_snapshot_until_refresh(tmp_path):
    writer = VectorMemory(DIM, metric="l2", path=tmp_path / "s")
    writer.add(np.eye(DIM, dtype=np.float32), metadata=[{"lang": "en" if i % 2 else "fr"} for i in range(DIM)])
    reader = VectorMemory.open(tmp_path / "s", read_only=True)
    where = {"lang": "en"}
    assert matched_ids(reader, where) == {1, 3, 5, 7}
    writer.add(np.ones((1, DIM), dtype=np.float32), ids=[100], metadata=[{"lang": "en"}])
    writer.update_metadata([1], [{"lang": "de"}])
    assert matched_ids(writer, where) == {3, 5, 7, 100}
    assert matched_ids(reader, where) == {1, 3, 5, 7}  # the snapshot of its open
    reader.refresh()
    assert matched_ids(reader, where) == {3, 5, 7, 100}
    with pytest.raises(HeadwiseError, match="read_only"):
        reader.index_field("lang")
    reader.close()
    writer.close()


def test_index_field_serves_filters_and_persists(tmp_path):
    mem = VectorMemory(DIM, metric="l2", path=tmp_path / "s")
    metas = [{"lang": ["en", "fr"][i % 2], "year": i, "src": {"kind": f"k{i % 3}"}} for i in range(40)]
    mem.add(np.random.default_rng(0).standard_normal((40, DIM)).astype(np.float32), metadata=metas)
    wheres = [{"lang": "en"}, {"year": {"$gte": 10, "$lt": 20}}, {"src.kind": {"$in": ["k1"]}}]
    before = [matched_ids(mem, w) for w in wheres]
    assert mem.index_field("lang") and mem.index_field("year") and mem.index_field("src.kind")
    assert not mem.index_field("lang")  # already there
    assert mem.indexed_fields() == ["lang", "src.kind", "year"]
    mem._filter_matches.clear()
    assert [matched_ids(mem, w) for w in wheres] == before
    flt = compile_filter({"year": {"$gte": 10, "$lt": 20}})
    plan = mem._db.conn.execute(f"EXPLAIN QUERY PLAN SELECT seq FROM records WHERE {flt.where}", flt.params).fetchall()
    assert "USING INDEX hw_field:year" in str(plan)
    for bad in ["a-b", "1a", "a.", "x'y", ""]:
        with pytest.raises(HeadwiseError, match="field"):
            mem.index_field(bad)
    mem.add(np.ones((1, DIM), dtype=np.float32), ids=[99], metadata=[{"lang": "en"}])  # writes its index entries
    assert matched_ids(mem, {"lang": "en"}) == before[0] | {99}
    mem.close()
    again = VectorMemory.open(tmp_path / "s", read_only=True)
    assert again.indexed_fields() == ["lang", "src.kind", "year"] and again.verify().ok
    assert matched_ids(again, {"lang": "en"}) == before[0] | {99}
    again.close()


def test_the_result_cache_keys_carry_the_filter_and_writes_invalidate_it():
    mem = VectorMemory(DIM, metric="l2", cache_size=16)
    mem.add(np.eye(DIM, dtype=np.float32), metadata=[{"g": i % 2} for i in range(DIM)])
    q = np.eye(DIM, dtype=np.float32)[0]
    a = mem.search(q, 2, filter={"g": 0})[1]
    b = mem.search(q, 2, filter={"g": 1})[1]
    assert a[0, 0] == 0 and b[0, 0] != 0  # a different filter is a different entry
    mem.search(q, 2, filter={"g": 0})
    assert mem.cache.stats()["hits"] == 1
    assert mem.search(q, 2, filter={"g": {"$eq": 0}})[1].tolist() == a.tolist()  # another key, same answer
    mem.update_metadata([0], [{"g": 1}])
    assert mem.cache.stats()["size"] == 0
    assert mem.search(q, 2, filter={"g": 0})[1][0, 0] != 0
    mem.upsert(np.eye(DIM, dtype=np.float32)[:1], ids=[0], metadata=[{"g": 0}])
    assert mem.search(q, 2, filter={"g": 0})[1][0, 0] == 0


class RecordingEnhancer:
    """Refines nothing but records the candidates it was shown."""

    candidates = 4

    def __init__(self):
        self.seen = []

    def refine(self, q, cand_vectors, cand_scores):
        self.seen.append(cand_vectors.copy())
        return q


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_the_enhanced_path_filters_both_passes(index):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, DIM)).astype(np.float32)
    mem = VectorMemory(DIM, metric="ip", index=index)
    mem.add(x, metadata=[{"g": i % 3} for i in range(300)])
    enh = RecordingEnhancer()
    mem.set_enhancer(enh)
    q = rng.standard_normal((5, DIM)).astype(np.float32)
    _, found = mem.search(q, 10, filter={"g": 1})
    assert (found % 3 == 1).all()
    cands = enh.seen[-1].reshape(-1, DIM)
    member = (np.abs(cands[:, None, :] - x[None]).max(-1) == 0).argmax(axis=1)  # which stored vector each is
    assert (member % 3 == 1).all()  # the first pass saw matching records only
    _, few = mem.search(q, 10, filter={"g": 1, "$or": [{"g": 7}, {"g": 1}]})
    assert (few % 3 == 1).all()
    np.testing.assert_array_equal(mem.search(q, 10, filter={"g": 9})[1], -1)  # nothing matches
    refined = mem.refine_queries(q, filter={"g": 1})
    np.testing.assert_array_equal(refined, q)


class ToyEncoder:
    dim = DIM

    def encode(self, texts):
        return np.stack([np.random.default_rng(len(t)).standard_normal(DIM) for t in texts]).astype(np.float32)


def test_search_text_and_search_batch_take_a_filter():
    mem = VectorMemory(DIM, encoder=ToyEncoder())
    mem.add_texts(["a", "bb", "ccc", "dddd"], metadata=[{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}])
    hits = mem.search_text("bb", 4, filter={"n": {"$gte": 3}})
    assert sorted(h.id for h in hits) == [2, 3] and all(h.metadata["n"] >= 3 for h in hits)
    with pytest.raises(HeadwiseError, match=r"\$gte"):
        mem.search_text("bb", 4, filter={"n": {"$gte": "3"}})
    _, ids = mem.search_batch(ToyEncoder().encode(["a", "bb"]), 3, filter={"n": {"$in": [1, 4]}})
    assert [sorted(r[r >= 0].tolist()) for r in ids] == [[0, 3], [0, 3]]


def test_filter_matches_follow_adds_deletes_and_compaction():
    mem = VectorMemory(DIM, metric="l2", index="hnsw")
    x = np.random.default_rng(0).standard_normal((200, DIM)).astype(np.float32)
    mem.add(x, metadata=[{"g": i % 2} for i in range(200)])
    where = {"g": 0}
    assert matched_ids(mem, where) == set(range(0, 200, 2))
    mem.add(x[:1], ids=[500], metadata=[{"g": 0}])
    assert 500 in matched_ids(mem, where)
    mem.delete(np.arange(0, 120))  # past 25% of the slots: compacts, every slot moves
    assert matched_ids(mem, where) == set(range(120, 200, 2)) | {500}
    assert mem.verify().ok


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("index", ["flat", "hnsw-fp16"])
def test_the_exact_path_in_blocks_equals_one_block(monkeypatch, metric, index):
    import headwise.memory.filtered as filtered

    rng = np.random.default_rng(8)
    mem = VectorMemory(DIM, metric=metric, index=index)
    mem.add(rng.standard_normal((400, DIM)).astype(np.float32), metadata=[{"g": i % 4} for i in range(400)])
    q = rng.standard_normal((25, DIM)).astype(np.float32)  # a batch: the gathering path
    where = {"g": {"$in": [1, 2]}}
    whole = mem.search(q, 10, filter=where)
    mem._filter_matches.clear()
    monkeypatch.setattr(filtered, "EXACT_BLOCK_BYTES", 4 * DIM * 7)  # 7 rows a block, the last one short
    blocked = mem.search(q, 10, filter=where)
    np.testing.assert_array_equal(blocked[1], whole[1])
    np.testing.assert_allclose(blocked[0], whole[0], rtol=1e-6)
    wide = {"g": {"$ne": 3}}  # 300 matches: for one query, m * d > 4 n
    one = mem.search(q[:1], 10, filter=wide)  # the selector scan
    np.testing.assert_array_equal(one[1][0], mem.search(q, 10, filter=wide)[1][0])  # a batch gathers


def test_numpy_values_and_other_mappings_are_taken_as_python_values():
    from types import MappingProxyType

    mem, _ = store_with([{"a": i, "f": i % 2 == 0} for i in range(6)])
    assert matched_ids(mem, {"a": np.int64(3)}) == {3}
    assert matched_ids(mem, {"a": {"$gte": np.float32(4.0)}, "f": np.bool_(True)}) == {4}
    assert matched_ids(mem, {"a": {"$in": np.array([1, 5])}}) == {1, 5}
    assert matched_ids(mem, MappingProxyType({"a": MappingProxyType({"$lt": 2})})) == {0, 1}
    assert compile_filter({"a": np.int64(3)}).key == compile_filter({"a": 3}).key
    with pytest.raises(HeadwiseError, match="filter field 'a' \\$eq"):
        compile_filter({"a": np.array([1, 2])})
