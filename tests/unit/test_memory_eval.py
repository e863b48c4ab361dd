"""Retrieval metrics on hand-built rankings with known answers, bootstrap CIs, exact search, reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.errors import HeadwiseError
from headwise.fileio import write_atomic
from headwise.memory.evaluate import (
    METRICS,
    MethodResult,
    bootstrap_ci,
    exact_search,
    paired_difference,
    per_query_metrics,
    results_json,
    results_markdown,
    summarize,
)


def test_known_answers_single_relevant():
    ids = np.array([[5, 7, 9] + [-1] * 97, [1, 2, 3] + list(range(10, 107)), [0] + list(range(200, 299))])
    m = per_query_metrics(ids, [{7: 1}, {50: 1}, {300: 1}])
    # query 0: relevant at rank 2; query 1: rank 41 (beyond 10, within 100); query 2: absent.
    assert m["recall@1"].tolist() == [0.0, 0.0, 0.0]
    assert m["recall@10"].tolist() == [1.0, 0.0, 0.0]
    assert m["recall@100"].tolist() == [1.0, 1.0, 0.0]
    assert m["mrr@10"].tolist() == [0.5, 0.0, 0.0]
    assert m["ndcg@10"][0] == pytest.approx(1 / math.log2(3))
    assert m["ndcg@10"][1:].tolist() == [0.0, 0.0]


def test_known_answers_graded():
    # relevant: doc 1 grade 2, doc 2 grade 1, doc 3 grade 1 (not retrieved).
    rel = [{1: 2, 2: 1, 3: 1}]
    m = per_query_metrics(np.array([[2, 9, 1]]), rel)
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10"][0] == pytest.approx(dcg / idcg)
    assert m["recall@1"][0] == pytest.approx(1 / 3)
    assert m["recall@10"][0] == pytest.approx(2 / 3)
    assert m["mrr@10"][0] == 1.0
    perfect = per_query_metrics(np.array([[1, 2, 3]]), rel)
    assert perfect["ndcg@10"][0] == pytest.approx(1.0)


rankings = st.integers(1, 30).flatmap(
    lambda n: st.tuples(
        st.permutations(list(range(n))),
        st.dictionaries(st.integers(0, n + 5), st.integers(1, 3), min_size=1, max_size=6),
    )
)


@settings(max_examples=60, deadline=None)
@given(rankings)
def test_metric_properties(case):
    order, rel = case
    m = per_query_metrics(np.array([order]), [rel])
    for name in METRICS:
        assert 0.0 <= m[name][0] <= 1.0 + 1e-12, name
    assert m["recall@1"][0] <= m["recall@10"][0] <= m["recall@100"][0]
    # The ideal ranking (relevant by grade, then the rest) reaches NDCG 1 and puts a hit first.
    ideal = sorted(rel, key=lambda d: -rel[d]) + [d for d in order if d not in rel]
    best = per_query_metrics(np.array([ideal]), [rel])
    assert best["ndcg@10"][0] == pytest.approx(1.0)
    assert best["mrr@10"][0] == 1.0
    assert m["ndcg@10"][0] <= best["ndcg@10"][0] + 1e-12


def test_bootstrap_ci_contains_mean_and_is_seeded():
    v = np.random.default_rng(1).random(500)
    mean, lo, hi = bootstrap_ci(v, seed=3)
    assert lo < mean < hi
    assert bootstrap_ci(v, seed=3) == (mean, lo, hi)
    const = bootstrap_ci(np.full(50, 0.25))
    assert const == pytest.approx((0.25, 0.25, 0.25))
    with pytest.raises(HeadwiseError, match="values"):
        bootstrap_ci(np.array([]))


def test_paired_difference_sign():
    pq_a = {"recall@10": np.array([1.0, 1.0, 0.0, 1.0] * 50)}
    pq_b = {"recall@10": np.array([0.0, 1.0, 0.0, 0.0] * 50)}
    a, b = MethodResult("a", summarize(pq_a), pq_a), MethodResult("b", summarize(pq_b), pq_b)
    mean, lo, hi = paired_difference(a, b, "recall@10")
    assert mean == pytest.approx(0.5) and lo > 0


def test_exact_search_matches_numpy():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((200, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    scores, ids = exact_search(docs, q, 5)
    expect = np.argsort(-(q @ docs.T), axis=1)[:, :5]
    assert ids.dtype == np.int64 and np.array_equal(ids, expect)
    assert np.allclose(scores, np.take_along_axis(q @ docs.T, expect, 1), atol=1e-5)
    with pytest.raises(HeadwiseError, match="k: expected"):
        exact_search(docs, q, 0)
    with pytest.raises(HeadwiseError, match="docs, queries"):
        exact_search(docs, q[:, :8], 3)


def test_bad_inputs_name_the_argument():
    with pytest.raises(HeadwiseError, match="ids"):
        per_query_metrics(np.zeros((2, 3), dtype=np.int64), [{0: 1}])
    with pytest.raises(HeadwiseError, match=r"relevant\[0\]"):
        per_query_metrics(np.zeros((1, 3), dtype=np.int64), [{}])


def test_reports_written_atomically(tmp_path):
    pq = {m: np.linspace(0, 1, 20) for m in METRICS}
    res = [MethodResult("knn", summarize(pq), pq)]
    md = results_markdown("WordNet", res, "headwise memory eval", ["note"])
    assert "| knn | 0.500 [" in md and "Command: `headwise memory eval`" in md
    path = tmp_path / "out" / "r.json"
    write_atomic(path, results_json(res, command="x"))
    data = json.loads(path.read_text())
    assert data["command"] == "x" and data["methods"]["knn"]["recall@10"][0] == pytest.approx(0.5)
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
