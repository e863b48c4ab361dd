"""The report's experiments: the numbers behave as the theory says, and bad input is refused."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.errors import HeadwiseError
from headwise.report.basics import attention_patterns, causal_checks, sqrt_dk_scaling
from headwise.report.common import Section, Table, rounded
from headwise.report.cost import analytic_flops, counted_flops
from headwise.report.heads import pairwise_diversity, single_head_equivalence
from headwise.report.html import render_page
from headwise.report.summary import markdown_tables


def test_scaled_entropy_bounded_unscaled_collapses():
    s = sqrt_dk_scaling(quick=True)
    rows, log_s = s.data["rows"], s.data["log_keys"]
    scaled = [r["entropy_scaled"] for r in rows]
    unscaled = [r["entropy_unscaled"] for r in rows]
    assert max(scaled) - min(scaled) < 0.2 and min(scaled) > log_s - 1.0
    assert all(a > b for a, b in zip(unscaled, unscaled[1:])), unscaled
    assert unscaled[-1] < 0.5 < rows[-1]["max_weight_unscaled"]
    assert set(s.data["row_dk256"]) == {"scaled", "unscaled"}
    assert f"{rows[-1]['entropy_unscaled']:.3f}" in s.finding


def test_masked_weights_are_zero_and_rows_sum_to_one():
    s = attention_patterns(length=12)
    for p in s.data["patterns"]:
        assert p["max_weight_outside_mask"] == 0.0, p
        assert p["max_row_sum_error"] < 1e-12, p
    shares = {p["mask"]: p["attended_share"] for p in s.data["patterns"]}
    assert shares["full"] == 1.0 and shares["causal"] == pytest.approx((12 * 13 / 2) / 144)


def test_causal_checks_pass_on_actual_numbers():
    s = causal_checks(quick=True)
    assert all(s.data["passed"].values()), s.data
    for c in s.data["weights"]:
        assert c["max_future_weight"] == 0.0 and c["future_weights_nonzero"] == 0
    for c in s.data["outputs"]:
        assert c["max_change_past_outputs"] == 0.0 and c["max_change_future_outputs"] > 0.1
    assert "FAIL" not in s.finding


@pytest.mark.parametrize("L", [16, 40])
def test_flop_formulas_equal_flop_counter(L):
    E, H = 32, 4
    a, c = analytic_flops(L, E, H), counted_flops(L, E, H)
    for name in ("qkv_projection", "qk", "av", "output_projection"):
        assert c[name] == a[name], name
    assert c["forward"] == a["qkv_projection"] + a["qk"] + a["av"] + a["output_projection"]


def test_flop_crossover_at_twice_the_width():
    below, at = analytic_flops(127, 64, 1), analytic_flops(128, 64, 1)
    proj = lambda f: f["qkv_projection"] + f["output_projection"]  # noqa: E731
    assert below["qk"] + below["av"] < proj(below) and at["qk"] + at["av"] == proj(at)
    with pytest.raises(HeadwiseError, match="L: expected an int >= 1"):
        analytic_flops(0, 8, 1)


def test_single_head_equivalence_passes_in_float64():
    s = single_head_equivalence(quick=True)
    assert s.data["passed"]
    assert max(r["forward_max_diff"] for r in s.data["rows"]) <= 1e-12
    assert {r["implementation"] for r in s.data["rows"]} >= {"headwise reference", "torch nn.MultiheadAttention"}


def test_pairwise_diversity_known_answers():
    same = torch.softmax(torch.randn(1, 5, 5), -1).expand(4, 5, 5)
    d = pairwise_diversity(same)
    assert d["pairs"] == 6 and d["cosine"] == pytest.approx(1.0) and d["js"] == pytest.approx(0.0, abs=1e-12)
    eye = torch.eye(4)
    disjoint = torch.stack([eye, eye.roll(1, dims=1)])  # every row: one-hot on different keys
    d = pairwise_diversity(disjoint)
    assert d["cosine"] == pytest.approx(0.0) and d["js"] == pytest.approx(math.log(2))
    assert pairwise_diversity(eye[None])["pairs"] == 0
    with pytest.raises(HeadwiseError, match="w: expected"):
        pairwise_diversity(eye)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sqrt_dk_scaling(quick="yes"), "quick: expected a bool"),
        (lambda: attention_patterns(seed=-1), r"seed: expected an int in \[0, 4294967295\], got -1"),
        (lambda: attention_patterns(seed=2**64), r"seed: expected an int in \[0, 4294967295\]"),  # torch's limit
        (lambda: rounded(object()), "obj: expected JSON-like data"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(HeadwiseError, match=match):
        call()


def test_markdown_tables_and_page_escape():
    md = "# Memory\n\nRecall on WordNet\n\n| method | recall@10 |\n|---|---:|\n| plain | 0.540 |\n| attention | 0.6 |\n"
    (t,) = markdown_tables(md)
    assert t.caption == "Recall on WordNet" and t.header == ["method", "recall@10"] and len(t.rows) == 2
    sec = Section("k", 1, "T & <b>", "x < y", data={"v": 1})
    sec.tables.append(Table("cap", ["a"], [["<i>"]]))
    page = render_page([sec], {"command": "headwise demo --quick", "seed": 0})
    assert "T &amp; &lt;b&gt;" in page and "&lt;i&gt;" in page and "<i>" not in page
    assert 'href="#k"' in page and "headwise demo --quick" in page and "torch" in page
