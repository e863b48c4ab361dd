r"""A memory check before the L x S weights of ``need_weights`` are materialised.

``need_weights=True`` returns the (B, Hq, L, S) weights, and every backend that serves it
(eager, reference) holds them in memory at once: at L = S = 2**20 that is 4 TiB per head in
float32, and the allocation used to end in a bare ``OSError: [Errno 12] Cannot allocate
memory`` from mmap (alloc.py) or in the OOM killer. ``attend`` now estimates the bytes first
(:func:`weights_bytes`, a lower bound: the weights themselves and the float32 copy autograd
keeps of half-precision ones, not the backends' working memory) and refuses with a
:class:`HeadwiseError` naming the size and the streaming alternative (``need_stats``) when
they exceed the memory available (:func:`available_bytes`).

:func:`check_weights_fit` is the pure decision (bytes needed, bytes available), so tests
drive it with small made-up figures instead of huge allocations.

Example:
    >>> import torch
    >>> weights_bytes((1, 8, 1 << 20, 1 << 20), torch.float32, True, False) / 2**40
    32.0
    >>> from headwise.errors import HeadwiseError
    >>> try:
    ...     check_weights_fit(1 << 30, 1 << 29, (1, 8, 4096, 8192), torch.float32, "cpu", True)
    ... except HeadwiseError as e:
    ...     print(*str(e).split("; ")[0].split(", got "), sep="\n")
    need_weights: expected (B, Hq, L, S) weights that fit in the memory available on cpu (512.0 MiB)
    (1, 8, 4096, 8192) float32 weights: 1.0 GiB
"""

from __future__ import annotations

import torch

from headwise.errors import bad_argument

# Below this the weights fit anywhere torch runs: the check (a read of /proc/meminfo, ~20 us)
# is skipped.
CHECK_FROM_BYTES = 64 << 20
_HALF = (torch.float16, torch.bfloat16)


def weights_bytes(
    shape: tuple[int, int, int, int], dtype: torch.dtype, need_weights: bool | str, needs_grad: bool
) -> int:
    """Bytes the materialised weights of a (B, Hq, L, S) problem take at the least.

    Per head (``need_weights=True``): the (B, Hq, L, S) result in ``dtype``, plus, under
    autograd, the float32 weights that half-precision inputs are computed and kept in.
    ``"mean"``: the (B, L, S) average in the accumulation dtype (float32 for halves); under
    autograd every head's weights are kept for the backward as well.
    """
    if not need_weights:
        return 0
    B, Hq, L, S = shape
    item = torch.empty((), dtype=dtype).element_size()
    work = 4 if dtype in _HALF else item
    per_head = B * Hq * L * S
    if need_weights == "mean":
        return B * L * S * work + (per_head * work if needs_grad else 0)
    return per_head * item + (per_head * work if needs_grad and work != item else 0)


def available_bytes(device: torch.device | str) -> int | None:
    """Memory a new allocation on ``device`` can take now, or None where it cannot be told.

    CPU: ``MemAvailable`` of /proc/meminfo, lowered to the room left under a cgroup limit
    (containers; v2 ``memory.max``, v1 ``memory.limit_in_bytes``). CUDA: the driver's free
    memory plus what torch's caching allocator holds reserved but unused.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    known = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup, or None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit = _read_int(limit_file)
        if limit is not None and limit < 1 << 60:  # v1 writes "no limit" as ~2**63
            return max(0, limit - (_read_int(usage_file) or 0))
    return None


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_weights_fit(
    nbytes: int,
    available: int | None,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device | str,
    need_weights: bool | str,
) -> None:
    """Raise :class:`HeadwiseError` when ``nbytes`` of weights exceed ``available`` (None: unknown, pass).

    ``shape`` is the problem's (B, Hq, L, S); the message names it, the size and what to ask
    for instead.
    """
    if available is None or nbytes <= available:
        return
    dtype_name = str(dtype).removeprefix("torch.")
    hint = "need_stats=True streams each row's entropy and max weight without them"
    if need_weights == "mean":
        what, got = "a (B, L, S) head average that fits", f"the head average of (B, Hq, L, S) = {tuple(shape)}"
    else:
        what, got = "(B, Hq, L, S) weights that fit", f"{tuple(shape)} {dtype_name} weights"
        if shape[1] > 1:
            hint += f', need_weights="mean" averages the heads into 1/{shape[1]} of the size'
    raise bad_argument(
        "need_weights",
        f"{what} in the memory available on {device} ({format_bytes(available)})",
        f"{got}: {format_bytes(nbytes)}; {hint}",
    )


def guard_weights(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    need_weights: bool | str,
    needs_grad: bool,
) -> None:
    """Refuse a ``need_weights`` request whose weights cannot fit (see the module docstring)."""
    nbytes = weights_bytes(shape, dtype, need_weights, needs_grad)
    if nbytes < CHECK_FROM_BYTES:
        return
    check_weights_fit(nbytes, available_bytes(device), shape, dtype, device, need_weights)


__all__ = ["weights_bytes", "available_bytes", "check_weights_fit", "guard_weights", "format_bytes"]
