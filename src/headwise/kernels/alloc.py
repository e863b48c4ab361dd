"""Large CPU result tensors on transparent huge pages.

A fresh tensor is page-faulted in on first touch, one 4 KiB page (a trap and a zeroing) at a
time. For the L x S weights of ``need_weights`` (134 MB for (4, 8, 1024, 1024) float32) that
costs several times a fill of memory that is already mapped; with 2 MiB pages there are
512x fewer faults. torch's CPU allocator asks for huge pages only when the process starts
with ``THP_MEM_ALLOC_ENABLE=1``; :func:`empty_large`
asks for them for one tensor: an anonymous ``mmap`` with ``madvise(MADV_HUGEPAGE)``,
wrapped by ``torch.frombuffer`` (the tensor owns the mapping; it is unmapped when the
tensor's storage is freed).

Where the OS has no transparent huge pages ("never", not Linux, not a CPU tensor, below
:data:`HUGE_MIN_BYTES`), or ``HEADWISE_HUGE_PAGES=0`` is set, it is ``torch.empty``. The
trade: a lower median and mean first-touch cost, but on a virtual machine an occasional
allocation can stall while the host backs 2 MiB pages (a latency-sensitive service that
materialises weights may prefer ``HEADWISE_HUGE_PAGES=0``). The memory is zero-filled either way by the
kernel, but callers must not rely on it: the contract is ``torch.empty``'s.

Example:
    >>> import torch
    >>> w = empty_large((4, 1024, 1024), torch.float32, torch.device("cpu"))
    >>> w.shape, w.dtype, w.is_contiguous()
    (torch.Size([4, 1024, 1024]), torch.float32, True)
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import sys
from functools import lru_cache

import torch
from torch import Tensor

# Below this a tensor has few pages to fault in and the mmap call is not worth it.
HUGE_MIN_BYTES = 4 << 20


@lru_cache(maxsize=1)
def huge_pages_available() -> bool:
    """True on Linux when transparent huge pages are "always" or "madvise" (not "never"),
    unless ``HEADWISE_HUGE_PAGES=0`` (read once per process)."""
    if os.environ.get("HEADWISE_HUGE_PAGES", "1") == "0":
        return False
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def empty_large(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor, on transparent huge pages when large and on CPU."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if device.type != "cpu" or nbytes < HUGE_MIN_BYTES or not huge_pages_available():
        return torch.empty(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # the advice is only a hint: 4 KiB pages still work
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=dtype, count=math.prod(shape)).view(shape)
