"""The architecture sweep: rows, the slice, a tiny end-to-end run, its table and figure."""

from __future__ import annotations

import numpy as np
import pytest

from headwise import HeadwiseError
from headwise.memory.architecture import EnhancerConfig
from headwise.memory.cli_sweep import parse_factors, sweep_figure, sweep_markdown
from headwise.memory.sweep import FACTORS, QuerySet, make_slice, run_sweep, sweep_rows
from headwise.memory.train import TrainConfig


def test_rows_vary_one_factor_around_the_default():
    rows = sweep_rows(FACTORS)
    assert rows[0] == ("default", None, EnhancerConfig())
    assert len(rows) == 1 + 3 + 3 + 2 + 2  # the default's own value is not repeated
    for factor, value, cfg in rows[1:]:
        changed = {k for k, v in cfg.kwargs().items() if v != EnhancerConfig().kwargs()[k]}
        assert changed == {factor} and getattr(cfg, factor) == value
    with pytest.raises(HeadwiseError, match="factors"):
        sweep_rows({"depth": (1, 2)})


def test_parse_factors():
    assert parse_factors("heads=1,4;dropout=0,0.1") == {"heads": (1, 4), "dropout": (0.0, 0.1)}
    for bad in ("", "heads", "depth=1", "heads=a"):
        with pytest.raises(HeadwiseError, match="--factors"):
            parse_factors(bad)


def _problem(n_docs=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((n_docs, d)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    A = np.eye(d, dtype=np.float32) + 0.5 * rng.standard_normal((d, d)).astype(np.float32)
    targets = rng.permutation(n_docs)[:300]
    queries = docs[targets] @ A
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    relevant = [{int(t): 1} for t in targets]
    split = {"train": np.arange(200), "validation": np.arange(200, 240), "test": np.arange(240, 300)}
    return docs, queries, relevant, split


def test_slice_keeps_every_needed_document_and_remaps():
    docs, queries, relevant, split = _problem()
    extra = QuerySet("other", queries[:5], [{7: 1}, {8: 2}, {9: 1}, {10: 1}, {11: 1}])
    data = make_slice(docs, queries, relevant, split, [extra], n_docs=250, n_train=50, n_val=10, n_test=20, seed=1)
    assert len(data.docs) == 250 and len(data.queries) == 60 and [s.name for s in data.eval_sets] == ["test", "other"]
    for qs in [*data.eval_sets, QuerySet("fit", data.queries, data.relevant)]:
        for rel in qs.relevant:
            assert all(0 <= r < 250 for r in rel)
    # a remapped relevant row holds the very document it named
    row = next(iter(data.eval_sets[1].relevant[1]))
    np.testing.assert_array_equal(data.docs[row], docs[8])
    with pytest.raises(HeadwiseError, match="train queries"):
        make_slice(docs, queries, relevant, split, [], n_docs=100, n_train=500, n_val=1, n_test=1)


def test_tiny_sweep_end_to_end(tmp_path):
    docs, queries, relevant, split = _problem()
    data = make_slice(docs, queries, relevant, split, [], n_docs=400, n_train=200, n_val=40, n_test=60)
    base = EnhancerConfig(heads=4, candidates=8)
    rows = sweep_rows({"layers": (1, 2)}, base)
    tc = TrainConfig(steps=30, batch_size=32, lr=1e-2, eval_every=10, patience=3)
    result = run_sweep(data, rows, [0, 1], tc)
    assert [r["factor"] for r in result["rows"]] == ["default", "layers"]
    default, deeper = (r["summary"] for r in result["rows"])
    assert deeper["parameters"] > default["parameters"] and 0 < default["latency_us"] <= default["latency_p90_us"]
    knn = result["baselines"]["knn"]["test"]["recall@10"]
    assert default["test recall@10"]["mean"] > knn  # the problem is learnable: a linear distortion of the docs
    assert default["test recall@10"]["std"] >= 0 and len(result["rows"][0]["runs"]) == 2
    sliced = {"documents": 400, "of": 400, "train": 200, "validation": 40, "sets": {"test": 60}}
    result.update(
        {"command": "test", "seeds": [0, 1], "machine": {"cpus": 2, "load": (0.0, 0.0, 0.0)}, "slice": sliced}
    )
    text = sweep_markdown(result)
    assert "| layers | 2 |" in text and "| knn | - |" in text
    sweep_figure(result, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
