"""need_weights on inputs whose weights cannot fit (#19 item 8): a HeadwiseError naming the
size and need_stats before anything is allocated, never a bare ENOMEM.

The decision is a pure function of (bytes needed, bytes available), so these tests give it
small made-up "available" figures instead of allocating anything large.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise import HeadwiseError, attend, causal
from headwise.kernels import budget
from headwise.kernels.budget import available_bytes, check_weights_fit, weights_bytes


def _huge(L: int, H: int = 1) -> torch.Tensor:
    """(1, H, L, 4) zeros without L * 4 floats of memory: a stride-0 view is a valid q, k or v."""
    return torch.zeros(1, H, 1, 4).expand(1, H, L, 4)


@pytest.mark.parametrize("need_weights", [True, "mean"])
@pytest.mark.parametrize("backend", ["auto", "eager", "reference"])
def test_the_issue_case_L_2_20_is_refused_with_a_headwise_error(backend, need_weights):
    """L = S = 2**20 is 4 TiB of float32 weights per head; it used to end in OSError ENOMEM."""
    q = _huge(1 << 20, H=2)
    with pytest.raises(HeadwiseError, match=r"^need_weights: expected") as info:
        attend(q, q, q, need_weights=need_weights, backend=backend)
    msg = str(info.value)
    assert "need_stats=True" in msg and "TiB" in msg and "1048576" in msg
    if need_weights is True:
        assert 'need_weights="mean"' in msg  # 2 heads: the average is half the size


def test_need_stats_is_the_way_out_at_the_same_size():
    """The alternative the message names really runs (on a size that stays small here)."""
    q = _huge(1 << 12)
    res = attend(q, q, q, mask=causal, need_stats=True)
    assert res.weights is None and res.stats.entropy.shape == (1, 1, 1 << 12)


def test_refused_against_a_small_made_up_available_figure(monkeypatch):
    """64 MiB of weights (L = S = 4096, one head) against 1 MiB "available": refused, and the
    message names both sizes; with enough room the same call runs."""
    q = torch.randn(1, 1, 4096, 4)
    monkeypatch.setattr(budget, "available_bytes", lambda device: 1 << 20)
    with pytest.raises(HeadwiseError, match=re.escape("available on cpu (1.0 MiB)")) as info:
        attend(q, q, q, need_weights=True)
    assert "(1, 1, 4096, 4096) float32 weights: 64.0 MiB" in str(info.value)
    monkeypatch.setattr(budget, "available_bytes", lambda device: 1 << 40)
    assert attend(q, q, q, need_weights=True).weights.shape == (1, 1, 4096, 4096)


def test_small_requests_do_not_read_the_available_memory(monkeypatch):
    """Below CHECK_FROM_BYTES the weights fit anywhere: no /proc/meminfo read per call."""

    def fail(device):
        raise AssertionError("available_bytes called for a small request")

    monkeypatch.setattr(budget, "available_bytes", fail)
    q = torch.randn(2, 4, 64, 8)
    assert attend(q, q, q, need_weights=True).weights.shape == (2, 4, 64, 64)
    assert attend(q, q, q).weights is None  # without need_weights nothing is checked either


def test_weights_bytes_counts_the_result_and_the_float32_copy_autograd_keeps():
    shape = (2, 8, 100, 300)
    n = 2 * 8 * 100 * 300
    assert weights_bytes(shape, torch.float32, False, False) == 0
    assert weights_bytes(shape, torch.float32, True, False) == 4 * n
    assert weights_bytes(shape, torch.float32, True, True) == 4 * n  # the saved weights are the result
    assert weights_bytes(shape, torch.float64, True, False) == 8 * n
    assert weights_bytes(shape, torch.bfloat16, True, False) == 2 * n
    assert weights_bytes(shape, torch.bfloat16, True, True) == 2 * n + 4 * n  # computed in float32
    assert weights_bytes(shape, torch.float32, "mean", False) == 4 * n // 8
    assert weights_bytes(shape, torch.float16, "mean", False) == 4 * n // 8  # accumulated in float32
    assert weights_bytes(shape, torch.float32, "mean", True) == 4 * n // 8 + 4 * n


def test_unknown_available_memory_passes():
    check_weights_fit(1 << 50, None, (1, 1, 1 << 25, 1 << 25), torch.float32, "meta", True)


def test_available_bytes_on_this_machine():
    n = available_bytes("cpu")
    assert n is None or n >= 0
    if n is not None and torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        assert available_bytes("cuda") > 0
    assert available_bytes("meta") is None


@settings(max_examples=200, deadline=None)
@given(
    need=st.integers(0, 1 << 50),
    available=st.integers(0, 1 << 50),
    heads=st.integers(1, 64),
    mean=st.booleans(),
)
def test_refused_exactly_when_the_weights_exceed_the_available_memory(need, available, heads, mean):
    need_weights = "mean" if mean else True
    shape = (1, heads, 1 << 20, 1 << 20)
    if need <= available:
        check_weights_fit(need, available, shape, torch.float32, "cpu", need_weights)
        return
    with pytest.raises(HeadwiseError, match=r"^need_weights: expected ") as info:
        check_weights_fit(need, available, shape, torch.float32, "cpu", need_weights)
    msg = str(info.value)
    assert budget.format_bytes(need) in msg and budget.format_bytes(available) in msg
    assert "need_stats=True" in msg
    assert ('need_weights="mean"' in msg) == (not mean and heads > 1)
