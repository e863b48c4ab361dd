"""The benchmark harness: percentiles, records, regression comparison, profiler breakdown."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from headwise import HeadwiseError
from headwise.bench.compare import compare, load_records, record_key, to_markdown
from headwise.bench.components import run_components
from headwise.bench.harness import Timing, paired_ratio, time_interleaved
from headwise.bench.modules import run_modules
from headwise.bench.report import goals
from headwise.cli import app
from headwise.profiling import scope


def test_timing_record_has_the_distribution_and_throughput():
    t = Timing([0.004, 0.001, 0.002, 0.003, 0.010])
    rec = t.record(items=100)
    assert rec["median_ms"] == pytest.approx(3.0)
    assert rec["mean_ms"] == pytest.approx(4.0)
    assert rec["p95_ms"] == pytest.approx(10.0) and rec["p99_ms"] == pytest.approx(10.0)
    assert rec["throughput_per_s"] == pytest.approx(100 / 0.003)
    assert rec["times_ms"] == pytest.approx([4.0, 1.0, 2.0, 3.0, 10.0])


def test_record_identity_ignores_measurements():
    a = {"variant": "dense", "L": 512, "impl": "tiled", "median_ms": 1.0, "cv_pct": 3.0, "times_ms": [1.0]}
    b = {"variant": "dense", "L": 512, "impl": "tiled", "median_ms": 9.0}
    assert record_key(a) == record_key(b) == "L=512, impl=tiled, variant=dense"


def _result(ms: dict[str, float]) -> dict:
    return {"records": [{"impl": k, "L": 1024, "median_ms": v, "cv_pct": 1.0} for k, v in ms.items()]}


def test_compare_flags_only_slowdowns_beyond_the_threshold():
    old = _result({"a": 10.0, "b": 10.0, "c": 10.0, "gone": 1.0})
    new = _result({"a": 10.5, "b": 11.5, "c": 5.0, "new": 1.0})
    rows = {r.key: r for r in compare(old, new, threshold=0.10)}
    assert set(rows) == {"L=1024, impl=a", "L=1024, impl=b", "L=1024, impl=c"}
    assert not rows["L=1024, impl=a"].regressed
    assert rows["L=1024, impl=b"].regressed
    assert rows["L=1024, impl=c"].ratio == pytest.approx(0.5)
    md = to_markdown(list(rows.values()), "old.json", "new.json")
    assert "REGRESSED" in md and "faster" in md and "3 cases compared, 1 slower" in md


def test_compare_rejects_bad_files_and_thresholds(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HeadwiseError, match="compare file"):
        load_records(bad)
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(HeadwiseError, match="'records' list"):
        load_records(bad)
    with pytest.raises(HeadwiseError, match="threshold"):
        compare(_result({}), _result({}), threshold=-0.1)


def test_cli_compare_exits_nonzero_on_regression(tmp_path):
    old, same, slow = tmp_path / "old.json", tmp_path / "same.json", tmp_path / "slow.json"
    old.write_text(json.dumps(_result({"a": 10.0})))
    same.write_text(json.dumps(_result({"a": 10.2})))
    slow.write_text(json.dumps(_result({"a": 13.0})))
    runner = CliRunner()
    ok = runner.invoke(app, ["bench", "compare", str(old), str(same)])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["bench", "compare", str(old), str(slow)])
    assert bad.exit_code == 1 and "REGRESSED" in bad.output
    loose = runner.invoke(app, ["bench", "compare", str(old), str(slow), "--threshold", "0.5"])
    assert loose.exit_code == 0


def test_module_suite_writes_one_record_per_case_and_implementation():
    result = run_modules(repeat=2, L=16, L_gqa=16, embed=32, heads=4, batch=2)
    assert len(result["rows"]) == 8  # 3 weight modes x (inference, autograd on) + GQA prefill + GQA decode
    impls = {(r["case"], r["impl"]) for r in result["records"]}
    assert len(result["records"]) == 16 == len(impls)
    for r in result["records"]:
        assert r["median_ms"] > 0
        assert r["p99_ms"] >= r["median_ms"] and r["throughput_per_s"] > 0


def test_scope_labels_only_while_profiling():
    with torch.profiler.profile() as prof, scope("headwise::test_label"):
        torch.ones(3) + 1
    assert any(e.key == "headwise::test_label" for e in prof.key_averages())


def test_component_breakdown_covers_the_forward():
    rows = run_components(seqs=[64], repeat=1, embed=32, heads=4)
    eager = {r["component"]: r for r in rows if r["backend"] == "eager"}
    assert {"QKV projection", "QK^T", "mask / score", "softmax", "AV", "gates, concat, output projection"} <= set(eager)
    # Every labelled component ran (the causal mask makes mask / score non-zero) and the
    # shares add up to the whole forward.
    assert all(eager[c]["ms"] > 0 for c in ("QKV projection", "QK^T", "mask / score", "softmax", "AV"))
    assert sum(r["pct"] for r in eager.values()) == pytest.approx(100.0, abs=1e-6)
    auto = [r for r in rows if r["backend"] == "auto"]
    assert any(r["component"] == "attention core (fused)" and r["ms"] > 0 for r in auto)


def test_paired_ratio_is_the_median_of_round_ratios_and_cancels_drift():
    # The machine slows down 10x in round 3: the ratio of medians is 2 x 5/2.5 off, the paired one is exact.
    fast = [1.0, 1.0, 10.0, 10.0, 10.0]
    slow = [2.0, 2.0, 20.0, 20.0, 20.0]
    assert paired_ratio(slow, fast) == 2.0
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0], [1.0, 2.0])


def test_time_interleaved_runs_extra_rounds_for_fast_functions():
    calls = {"a": 0, "b": 0}
    fns = {n: (lambda n=n: calls.__setitem__(n, calls[n] + 1)) for n in calls}
    t = time_interleaved(fns, repeat=3, warmup=1, min_seconds=10.0, max_rounds=7)
    assert len(t["a"].times) == len(t["b"].times) == 7  # capped by max_rounds, rounds paired
    assert calls == {"a": 8, "b": 8}
    assert len(time_interleaved(fns, repeat=3)["a"].times) == 3


def test_time_interleaved_rotates_the_order_of_each_round():
    order: list[str] = []
    fns = {n: (lambda n=n: order.append(n)) for n in "abc"}
    time_interleaved(fns, repeat=3, warmup=0)
    assert "".join(order) == "abc" + "bca" + "cab"


def test_kernel_goals_use_paired_ratios():
    rec = [
        {"variant": "dense", "L": 4096, "backward": False, "impl": i, "median_ms": m, "times_ms": t}
        for i, m, t in [
            ("headwise tiled", 20.0, [10.0, 20.0, 40.0]),
            ("torch SDPA", 10.0, [8.0, 10.0, 20.0]),
            ("headwise auto", 10.0, [8.0, 10.0, 20.0]),
        ]
    ]
    found = {g: (e, ok) for g, e, ok in goals({"records": rec, "seqs": [4096], "memory": []})}
    assert found["tiled dense L=4096 within 1.5x of SDPA"] == ("2.00x", False)
    assert found["auto <= 1.05x the fastest competitor, every case"][1] is True


def test_bench_tune_records_every_forward_case(tmp_path, monkeypatch):
    from headwise.bench.tune import to_markdown, tune_cases
    from headwise.kernels.tuning import tuned

    monkeypatch.setenv("HEADWISE_TUNING_FILE", str(tmp_path / "tuning.json"))
    rows = tune_cases([64], 1, variants=("causal", "stats"))
    assert [(r["case"], r["L"]) for r in rows] == [("causal fwd", 64), ("stats fwd", 64)]
    assert all(r["tuned"] in r["median_ms"] for r in rows)
    assert len(tuned()) == 2
    assert "| stats fwd | 64 |" in to_markdown(rows, "headwise bench tune", str(tmp_path))
