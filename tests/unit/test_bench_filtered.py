"""The filtered-search benchmark functions on tiny stores (the timings themselves are never asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from headwise.bench.filtered import filter_crossover, filtered_latency, filtered_markdown, main, parse_selectivities
from headwise.errors import HeadwiseError


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_filtered_latency_reports_each_kind_and_selectivity():
    docs = unit(3000, 16, 0)
    rows = filtered_latency(docs, unit(30, 16, 1), kinds=("flat", "hnsw"), single=5, batch=30, hnsw_m=8)
    assert [(r["index"], r["selectivity"], r["matching"]) for r in rows] == [
        (kind, s, m) for kind in ("flat", "hnsw") for s, m in ((0.5, 1500), (0.05, 150), (0.005, 15))
    ]
    assert [r["path"] for r in rows] == ["exact"] * 3 + ["exact"] * 3  # 1,500 <= the exact limit (2,000)
    assert all(r["recall_vs_exact"] >= 0.95 and r["p50_us"] > 0 and r["batch_qps"] > 0 for r in rows)
    lines = filtered_markdown(rows, "t")
    assert lines[0] == "### t" and "| hnsw | 50.0% | 1,500 | exact |" in "\n".join(lines)


def test_selectivities_are_checked():
    assert parse_selectivities("") == []
    for bad in ("0", "1.5", "a", "0.5,-1"):
        with pytest.raises(HeadwiseError, match="--filtered: expected comma-separated fractions"):
            parse_selectivities(bad)


def test_crossover_rows_and_the_command_line(tmp_path):
    docs = unit(2000, 16, 2)
    rows = filter_crossover(docs, unit(6, 16, 3), [50, 400], single=4, hnsw_m=8, ef_construction=40)
    assert [r["matching"] for r in rows] == [50, 400]
    assert all(r["graph_recall"] >= 0.95 and r["exact_us"] > 0 and r["graph_us"] > 0 for r in rows)
    np.save(tmp_path / "docs.npy", docs)
    np.save(tmp_path / "queries.npy", unit(10, 16, 4))
    out = tmp_path / "cross"
    main(["--dir", str(tmp_path), "--sizes", "1000", "--counts", "100,600", "--single", "3", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["matching"] for r in data["sizes"]["1000"]] == [100]  # counts above n / 2 are skipped
    assert data["command"].startswith("python -m headwise.bench.filtered --dir")
    assert "exact µs" in out.with_suffix(".md").read_text()
