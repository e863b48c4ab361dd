"""``headwise memory`` build / train / eval / search on a real WordNet slice, through typer's runner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.conftest import require_data
from typer.testing import CliRunner

from headwise.data.wordnet import wordnet_available
from headwise.memory.cli import memory_app

runner = CliRunner()


def invoke(*args: str):
    res = runner.invoke(memory_app, list(args), catch_exceptions=False, terminal_width=200)
    return res


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    require_data(wordnet_available(), "WordNet (wordnet-base)")
    d = tmp_path_factory.mktemp("wn")
    res = invoke("build", "--dataset", "wordnet", "--limit", "100", "--out", str(d))
    assert res.exit_code == 0, res.output
    return d


def test_build_writes_manifest(workdir):
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["documents"] == 400 and manifest["name"] == "wordnet-100"
    assert sum(manifest["split"].values()) == manifest["queries"]


def test_train_eval_search(workdir, tmp_path):
    res = invoke("train", "--dir", str(workdir), "--method", "linear,multi-head", "--steps", "20",
                 "--eval-every", "10", "--batch-size", "32", "--candidates", "8")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "best val R@10" in res.output
    hist = json.loads((workdir / "models" / "multi-head" / "history.json").read_text())
    assert [r["step"] for r in hist["records"]][0] == 0 and hist["config"]["steps"] == 20
    out = tmp_path / "memory_wn"
    res = invoke("eval", "--dir", str(workdir), "--method", "knn,linear,multi-head", "--out", str(out),
                 "--samples", "100", "--latency", "3", "--head-metrics")  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.with_suffix(".json").read_text())
    heads = data["sets"]["wordnet-100 test"]["head_metrics"]
    assert list(heads) == ["multi-head"] and len(heads["multi-head"]["heads"]) == 8  # linear has no heads
    h0 = heads["multi-head"]["heads"][0]
    assert 0 <= h0["normalized_entropy"] <= 1 and 1 <= h0["top_rank"] <= 8 and 1 / 8 <= h0["max_weight"] <= 1
    assert "Retrieval heads" in out.with_suffix(".md").read_text()
    assert set(data["methods"]) == {"knn", "linear", "multi-head"}
    lo, mean, hi = (data["methods"]["knn"]["recall@10"][i] for i in (1, 0, 2))
    assert 0 < lo <= mean <= hi <= 1
    assert "multi-head - linear recall@10" in data["comparisons"]
    assert set(data["latency"]["knn"]) >= {"p50_us", "batch_qps"}
    assert data["command"].startswith(f"headwise memory eval --dir {workdir} --method knn,linear,multi-head")
    assert f"Command: `{data['command']}`" in out.with_suffix(".md").read_text()
    # The attention stage on top of the trained linear adapter (frozen; its top-K as candidates).
    res = invoke("train", "--dir", str(workdir), "--method", "multi-head", "--steps", "10", "--eval-every", "5",
                 "--batch-size", "32", "--candidates", "8", "--adapter-from", "linear")  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = json.loads((workdir / "models" / "multi-head" / "enhancer.json").read_text())
    assert cfg["first_pass"] == "adapted"
    hist = json.loads((workdir / "models" / "multi-head" / "history.json").read_text())
    linear = json.loads((workdir / "models" / "linear" / "history.json").read_text())
    # Untrained, the read-out adds nothing: step 0 is the linear adapter's best validation recall.
    assert hist["records"][0]["val_recall@10"] == pytest.approx(max(r["val_recall@10"] for r in linear["records"]))
    assert hist["records"][-1]["step"] >= 5
    bad = invoke("train", "--dir", str(workdir), "--method", "multi-head", "--adapter-from", "knn", "--steps", "1")
    assert bad.exit_code == 2 and "adapter-from" in bad.output
    bad = invoke("train", "--dir", str(workdir), "--method", "multi-head", "--first-pass", "raw", "--steps", "1")
    assert bad.exit_code == 2 and "--adapter-from" in bad.output
    # The adapter copied in and trained further, candidates from the raw query; then the ablation.
    res = invoke("train", "--dir", str(workdir), "--method", "multi-head", "--steps", "10", "--eval-every", "5",
                 "--batch-size", "32", "--candidates", "8", "--adapter-from", "linear", "--first-pass", "raw",
                 "--train-adapter", "--dropout", "0.1")  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = json.loads((workdir / "models" / "multi-head" / "enhancer.json").read_text())
    assert cfg["first_pass"] == "raw" and cfg["dropout"] == 0.1
    hist = json.loads((workdir / "models" / "multi-head" / "history.json").read_text())
    assert "--train-adapter" in hist["command"] and "True" not in hist["command"]
    out = tmp_path / "memory_ablate"
    res = invoke("eval", "--dir", str(workdir), "--method", "linear,multi-head", "--out", str(out),
                 "--samples", "50", "--latency", "0", "--ablate")  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["methods"]) == {"linear", "multi-head", "multi-head (adapter only)"}
    assert "multi-head - multi-head (adapter only) recall@10" in data["comparisons"]
    assert " --ablate" in data["command"] and "--queries" not in data["command"]
    res = invoke("search", "--dir", str(workdir), "--method", "multi-head", "--k", "3", "a living thing")
    assert res.exit_code == 0, res.output
    assert "knn" in res.output and "multi-head" in res.output
    bench = tmp_path / "memory_bench"
    res = invoke("bench", "--dir", str(workdir), "--queries", "3", "--batch", "20", "--sizes", "200,800",
                 "--size", "100,100000", "--mechanism", "multi-head,flash", "--hnsw-m", "16", "--candidate-ef", "8",
                 "--out", str(bench))  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(bench.with_suffix(".json").read_text())
    assert set(data["latency"]) == {"flat", "hnsw", "hnsw-fp16"}
    for method in ("knn", "linear", "multi-head"):  # an exact store agrees with itself
        assert data["latency"]["flat"][method]["recall_vs_exact"] == 1.0
        assert data["latency"]["flat"][method]["agreement_vs_exact"] == 1.0
        assert 0 < data["latency"]["hnsw"][method]["recall_vs_exact"] <= 1
        assert 0 < data["latency"]["hnsw-fp16"][method]["recall_vs_exact"] <= 1
    assert "M=16, ef_search=64, first pass ef 8" in bench.with_suffix(".md").read_text()
    # Filtered latency at the default selectivities on each index kind (#20 item 1).
    assert [(r["index"], r["selectivity"]) for r in data["filtered"]] == [
        (kind, s) for kind in ("flat", "hnsw", "hnsw-fp16") for s in (0.5, 0.05, 0.005)
    ]
    assert "Filtered search by selectivity" in bench.with_suffix(".md").read_text()
    rows = data["flash_vs_topk"]["rows"]
    assert [r["memory"] for r in rows] == [200, 800]
    # The untrained flash read-out is the identity: its second pass is exactly kNN.
    assert all(r["flash recall@10"] == r["knn recall@10"] for r in rows)
    # Per-mechanism latency: sizes beyond the corpus are skipped, not faked.
    # flash included: its read-out is bound to the store it is timed on (#20)
    mechs = [(r["stored"], r["method"]) for r in data["mechanisms"]]
    assert mechs == [(100, "none"), (100, "multi-head"), (100, "flash")]
    assert "skipping store sizes [100000]" in res.output
    assert "Each enhancer mechanism by store size" in bench.with_suffix(".md").read_text()


def test_errors_are_clean(tmp_path):
    res = invoke("train", "--dir", str(tmp_path))
    assert res.exit_code == 2 and "manifest.json" in res.output
    res = invoke("build", "--dataset", "nonsense", "--out", str(tmp_path))
    assert res.exit_code == 2 and "dataset" in res.output


def test_eval_on_query_files(workdir, tmp_path):
    """--queries evaluates other query sets against the same corpus, with a summary across sets."""
    from headwise.memory.datasets import load_dataset
    from headwise.memory.transfer import write_query_file

    ds = load_dataset("wordnet", limit=100)
    rows = [{"query": ds.documents[i].split(": ", 1)[1], "relevant": [ds.doc_ids[i]]} for i in range(0, 40, 4)]
    qfile = tmp_path / "glosses.jsonl"
    write_query_file(qfile, rows)
    out = tmp_path / "transfer"
    res = invoke("eval", "--dir", str(workdir), "--method", "knn", "--queries", str(qfile), "--out", str(out),
                 "--samples", "50", "--latency", "0")  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.with_suffix(".json").read_text())
    assert list(data["sets"]) == ["wordnet-100 test", "glosses"]
    assert data["sets"]["glosses"]["queries"] == 10
    # A gloss finds its own document among 400: recall@10 is (nearly) perfect.
    assert data["sets"]["glosses"]["results"]["knn"]["recall@10"][0] >= 0.9
    md = out.with_suffix(".md").read_text()
    assert "## Summary: recall@10 and NDCG@10 per query set" in md and "glosses recall@10" in md
    assert f"--queries {qfile}" in data["command"]
    res = invoke("eval", "--dir", str(workdir), "--method", "knn", "--split", "none", "--queries", str(qfile),
                 "--samples", "20", "--latency", "0")  # fmt: skip
    assert res.exit_code == 0 and "glosses: 10 queries" in res.output
    (tmp_path / "bad.jsonl").write_text('{"query": "x", "relevant": ["n99999999"]}\n')
    res = invoke("eval", "--dir", str(workdir), "--method", "knn", "--queries", str(tmp_path / "bad.jsonl"))
    assert res.exit_code == 2 and "bad.jsonl line 1" in res.output
    res = invoke("eval", "--dir", str(workdir), "--method", "knn", "--split", "none")
    assert res.exit_code == 2 and "at least one query file" in res.output


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "manifest.json").write_text("{not json"), "a JSON manifest"),
        (lambda d: (d / "manifest.json").write_text("[]"), "the keys source"),
        (
            lambda d: (d / "manifest.json").write_text(
                '{"source": {"x": 1}, "fingerprint": "", "documents": 1, "queries": 1, "name": "x"}'
            ),
            "source: expected",
        ),  # fmt: skip
        (lambda d: (d / "docs.npy").unlink(), "docs.npy: expected the embeddings"),
        (lambda d: np.save(d / "docs.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True), "no pickle"),
        (lambda d: np.save(d / "docs.npy", np.zeros((3, 384), dtype=np.float32)), "float32 array"),
        (lambda d: np.save(d / "queries.npy", np.zeros((5, 12), dtype=np.float32)), "queries.npy: expected"),
    ],
)
def test_damaged_working_directories_get_one_line_errors(workdir, tmp_path, damage, message):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(workdir, d)
    damage(d)
    res = invoke("search", "--dir", str(d), "a dog")
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.output


def test_search_k_bounds(workdir):
    res = invoke("search", "--dir", str(workdir), "--method", "knn", "--k", "2147483648", "a dog")
    assert res.exit_code == 2 and "k: expected an int in [1, 16384]" in res.stderr
    res = invoke("search", "--dir", str(workdir), "--method", "knn", "--k", "16384", "a dog")
    assert res.exit_code == 0 and res.output.count("│") > 0  # only the corpus's documents, no padding rows
