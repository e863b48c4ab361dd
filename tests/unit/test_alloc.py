"""Large result tensors on huge pages, and the eager kernel's in-place row softmax."""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

from headwise.kernels.alloc import HUGE_MIN_BYTES, empty_large, huge_pages_available
from headwise.kernels.eager import _softmax_rows_

CPU = torch.device("cpu")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.bool], ids=str)
def test_empty_large_is_a_writable_contiguous_tensor_of_that_shape(dtype):
    shape = (3, 1024, 1024)
    t = empty_large(shape, dtype, CPU)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device == CPU
    t.fill_(1)
    assert bool(t.all()) and t.sum().item() == 3 * 1024 * 1024


def test_empty_large_below_the_threshold_is_torch_empty():
    small = empty_large((4, 4), torch.float32, CPU)
    assert small.shape == (4, 4) and small.numel() * 4 < HUGE_MIN_BYTES
    assert small.untyped_storage().resizable()  # torch's own allocation; frombuffer storage is not


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and /sys")
def test_huge_pages_follow_the_kernel_setting_and_are_released_with_the_tensor():
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        offered = "[never]" not in f.read()
    assert huge_pages_available() == (offered and os.environ.get("HEADWISE_HUGE_PAGES", "1") != "0")
    gc.collect()
    before = _rss_mib()
    t = empty_large((64, 1024, 1024), torch.float32, CPU)  # 256 MiB
    t.fill_(2.0)
    view = t[1]
    del t
    gc.collect()
    assert _rss_mib() - before > 200  # a view keeps the mapping alive
    assert view.sum().item() == 2.0 * 1024 * 1024
    del view
    gc.collect()
    assert _rss_mib() - before < 50  # unmapped with the last tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("width", [1, 7, 1025, 70001])
def test_in_place_row_softmax_equals_torch_softmax(dtype, width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(5, width, generator=g, dtype=dtype) * 4
    x[1, : width // 2] = float("-inf")  # masked entries give exact zeros
    expected = torch.softmax(x, dim=-1)
    y = x.clone()
    out = _softmax_rows_(y)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
