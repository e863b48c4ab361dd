"""The training check of `headwise bench train`, at a size CI can afford."""

import math

from headwise.bench.train import TrainConfig, stdlib_text, to_markdown, train_all


def test_stdlib_text_is_real_python_source():
    text = stdlib_text(20_000)
    assert len(text) == 20_000 and b"def " in text and b"import " in text


def test_every_attention_learns_and_ours_tracks_torch():
    cfg = TrainConfig(d_model=32, heads=4, layers=1, context=32, batch=8, steps=40, eval_batches=4, text_bytes=200_000)
    results = {r["attention"]: r for r in train_all(cfg, progress=lambda _: None)}
    assert len(results) == 5
    for r in results.values():
        assert math.isfinite(r["val_loss"])
        assert r["val_loss"] < r["initial_val_loss"] - 0.5, r  # every variant really learns
    ours, theirs = results["headwise MultiHeadAttention"], results["torch nn.MultiheadAttention"]
    assert ours["initial_val_loss"] == theirs["initial_val_loss"]  # identical initial weights
    assert abs(ours["val_loss"] - theirs["val_loss"]) / theirs["val_loss"] < 1e-3
    assert "relative gap" in to_markdown(list(results.values()), cfg, "test")
