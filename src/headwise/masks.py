"""Attention masks as composable functions, with block classification.

A mask says which keys a query may attend to. It is a function of index tensors
``(b, h, q_idx, kv_idx) -> bool tensor`` (True = attend) that broadcasts like any
elementwise torch expression, so one definition serves the readable reference (which
evaluates it on the whole L x S grid), the tiled kernel (one block at a time) and
FlexAttention. Anything else it returns (a float or int tensor, a Python bool, a tensor of
another shape) is refused with :class:`HeadwiseError` before any backend runs.

Query positions are aligned bottom-right: when there are L queries and S keys, query
``i`` sits at key position ``i + S - L`` (as in FlashAttention and KV-cache decoding).
With L == S nothing changes. ``causal`` with L=2, S=5::

    keys ->  0 1 2 3 4
    q 0      x x x x .
    q 1      x x x x x

Besides the function, a mask may know, for every query row, the inclusive range of keys
it can reach (``bounds``). With it, :func:`classify_blocks` labels each (query block, key
block) pair as EMPTY (skipped), FULL (no element mask needed) or PARTIAL without looking
at single elements, so a sliding window costs O(L * w), not O(L * S).

Example::

    >>> import torch
    >>> from headwise.masks import causal, sliding_window, and_masks, padding
    >>> m = and_masks(sliding_window(2), padding(torch.tensor([3])))
    >>> m.dense(1, 1, 4, 4)[0, 0].int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 0]], dtype=torch.int32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from headwise.errors import HeadwiseError, bad_argument

MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

EMPTY, PARTIAL, FULL = 0, 1, 2
# Bounds use "far away" integers instead of infinities so that they stay int64.
_FAR = 1 << 40


class Mask:
    """Base class of all masks. Subclasses implement :meth:`__call__`.

    ``__call__(b, h, q, kv)`` receives query *positions* (already aligned to the keys);
    :meth:`evaluate` receives raw query indices and the sequence lengths.
    """

    #: True when the mask equals ``lo <= kv <= hi`` for the bounds it returns.
    exact_bounds: bool = False

    def __call__(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        raise NotImplementedError

    def evaluate(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor, L: int, S: int) -> Tensor:
        """Mask for raw query indices ``q_idx`` (0..L-1) and key indices (0..S-1)."""
        return self(b, h, q_idx + (S - L), kv_idx)

    def bounds(self, b: Tensor, h: Tensor, q: Tensor, S: int) -> tuple[Tensor, Tensor] | None:
        """Inclusive key range ``[lo, hi]`` reachable from each query position, or None.

        ``b`` (B,1,1), ``h`` (1,H,1), ``q`` (1,1,n) positions; the result broadcasts to
        (B, H, n). It may be wider than the mask unless :attr:`exact_bounds` is True.
        """
        return None

    def validate(self, B: int, H: int, L: int, S: int, device: torch.device) -> None:
        """Raise :class:`HeadwiseError` if the mask cannot serve this problem size."""

    def cache_key(self) -> object:
        """A hashable key (equal keys mean equal masks) for caching block plans, or None.

        Masks are assumed immutable: a function mask whose behaviour changes between calls
        (through state it closes over) must be wrapped anew.
        """
        return ("id", id(self))

    def dense(self, B: int, H: int, L: int, S: int, device: torch.device | str = "cpu") -> Tensor:
        """The full (B|1, H|1, L, S) boolean mask (O(L*S) memory: for tests and SDPA)."""
        b, h, qi, ki = grid_indices(B, H, L, S, device)
        return self.evaluate(b, h, qi, ki, L, S)

    def __and__(self, other: Mask) -> Mask:
        return and_masks(self, other)

    def __or__(self, other: Mask) -> Mask:
        return or_masks(self, other)


def grid_indices(B: int, H: int, L: int, S: int, device: torch.device | str) -> tuple[Tensor, ...]:
    """Index tensors b (B,1,1,1), h (1,H,1,1), q (1,1,L,1), kv (1,1,1,S) for a full grid."""
    ar = torch.arange
    return (
        ar(B, device=device).view(B, 1, 1, 1),
        ar(H, device=device).view(1, H, 1, 1),
        ar(L, device=device).view(1, 1, L, 1),
        ar(S, device=device).view(1, 1, 1, S),
    )


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_argument(name, f"an integer >= {minimum}", repr(value))
    return value


class _Causal(Mask):
    exact_bounds = True

    def __call__(self, b, h, q, kv):
        return kv <= q

    def bounds(self, b, h, q, S):
        return torch.full_like(q, -_FAR), q

    def cache_key(self):
        return ("causal",)

    def __repr__(self) -> str:
        return "causal"


#: Each query attends to itself and every earlier key (bottom-right aligned)::
#:
#:     x . . .
#:     x x . .
#:     x x x .
#:     x x x x
causal: Mask = _Causal()


class _Local(Mask):
    exact_bounds = True

    def __init__(self, left: int, right: int, name: str):
        self.left, self.right, self.name = left, right, name

    def __call__(self, b, h, q, kv):
        return (kv >= q - self.left) & (kv <= q + self.right)

    def bounds(self, b, h, q, S):
        return q - self.left, q + self.right

    def cache_key(self):
        return ("local", self.left, self.right)

    def __repr__(self) -> str:
        return self.name


def sliding_window(window: int) -> Mask:
    """Causal sliding window: each query sees itself and the ``window - 1`` keys before it.

    ``sliding_window(2)`` on 4 x 4::

        x . . .
        x x . .
        . x x .
        . . x x
    """
    window = _positive_int("window", window)
    return _Local(window - 1, 0, f"sliding_window({window})")


def local(left: int, right: int) -> Mask:
    """Bidirectional band: query at position p sees keys ``p - left .. p + right``.

    ``local(1, 1)`` on 4 x 4::

        x x . .
        x x x .
        . x x x
        . . x x
    """
    left = _positive_int("left", left, 0)
    right = _positive_int("right", right, 0)
    return _Local(left, right, f"local({left}, {right})")


class _Chunked(Mask):
    exact_bounds = True

    def __init__(self, size: int):
        self.size = size

    def __call__(self, b, h, q, kv):
        return torch.div(q, self.size, rounding_mode="floor") == torch.div(kv, self.size, rounding_mode="floor")

    def bounds(self, b, h, q, S):
        lo = torch.div(q, self.size, rounding_mode="floor") * self.size
        return lo, lo + self.size - 1

    def cache_key(self):
        return ("chunked", self.size)

    def __repr__(self) -> str:
        return f"chunked({self.size})"


def chunked(size: int) -> Mask:
    """Queries attend within their own chunk of ``size`` positions (bidirectional).

    Combine with :data:`causal` for chunked causal attention. ``chunked(2)`` on 4 x 4::

        x x . .
        x x . .
        . . x x
        . . x x
    """
    return _Chunked(_positive_int("size", size))


class _Padding(Mask):
    exact_bounds = True

    def __init__(self, key_lengths: Tensor):
        self.key_lengths = key_lengths

    def _lengths(self, device: torch.device) -> Tensor:
        if self.key_lengths.device != device:
            self.key_lengths = self.key_lengths.to(device)
        return self.key_lengths

    def __call__(self, b, h, q, kv):
        return kv < self._lengths(kv.device)[b]

    def bounds(self, b, h, q, S):
        hi = self._lengths(q.device)[b] - 1
        return torch.zeros_like(hi), hi

    def validate(self, B, H, L, S, device):
        n = self.key_lengths
        if n.shape != (B,):
            raise bad_argument("key_lengths", f"shape ({B},) (one length per batch element)", tuple(n.shape))
        lo, hi = int(n.min()), int(n.max())
        if lo < 0 or hi > S:
            raise bad_argument("key_lengths", f"values in [0, {S}] (S = number of keys)", f"range [{lo}, {hi}]")

    def cache_key(self):
        return ("padding", tuple(self.key_lengths.tolist()))

    def __repr__(self) -> str:
        return f"padding({self.key_lengths.tolist()})"


def padding(key_lengths: Tensor | Sequence[int]) -> Mask:
    """Padding: batch element ``b`` attends only to its first ``key_lengths[b]`` keys.

    ``padding([3])`` on 4 x 4::

        x x x .
        x x x .
        x x x .
        x x x .
    """
    lengths = torch.as_tensor(key_lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.dim() != 1:
        raise bad_argument(
            "key_lengths", "a 1-d integer tensor or list", f"{lengths.dtype} of shape {tuple(lengths.shape)}"
        )
    return _Padding(lengths.long())


class _PerHeadWindows(Mask):
    exact_bounds = True

    def __init__(self, windows: Tensor, shown: list):
        self.windows, self.shown = windows, shown

    def _w(self, device: torch.device) -> Tensor:
        if self.windows.device != device:
            self.windows = self.windows.to(device)
        return self.windows

    def __call__(self, b, h, q, kv):
        return (kv <= q) & (kv > q - self._w(q.device)[h])

    def bounds(self, b, h, q, S):
        return q - self._w(q.device)[h] + 1, q.expand(-1, h.shape[1], -1)

    def validate(self, B, H, L, S, device):
        if self.windows.numel() != H:
            raise bad_argument("windows", f"one window per query head ({H})", f"{self.windows.numel()} windows")

    def cache_key(self):
        return ("per_head_windows", tuple(self.windows.tolist()))

    def __repr__(self) -> str:
        return f"per_head_windows({self.shown})"


def per_head_windows(windows: Sequence[int | None]) -> Mask:
    """Multi-scale attention: head ``h`` uses a causal sliding window of ``windows[h]``.

    ``None`` means no limit (plain causal). ``per_head_windows([1, None])``, heads 0 and 1::

        head 0      head 1
        x . . .     x . . .
        . x . .     x x . .
        . . x .     x x x .
        . . . x     x x x x
    """
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence) or len(windows) == 0:
        raise bad_argument("windows", "a non-empty list of window sizes (int >= 1 or None)", repr(windows))
    values = [_FAR if w is None else _positive_int(f"windows[{i}]", w) for i, w in enumerate(windows)]
    return _PerHeadWindows(torch.tensor(values, dtype=torch.long), list(windows))


class _Combined(Mask):
    def __init__(self, masks: tuple[Mask, ...], conjunction: bool):
        self.masks, self.conjunction = masks, conjunction
        self.exact_bounds = conjunction and all(m.exact_bounds for m in masks)

    def __call__(self, b, h, q, kv):
        raise HeadwiseError("combined masks are evaluated through evaluate(), which aligns each part")

    def evaluate(self, b, h, q_idx, kv_idx, L, S):
        out = None
        for m in self.masks:
            r = m.evaluate(b, h, q_idx, kv_idx, L, S)
            out = r if out is None else (out & r if self.conjunction else out | r)
        return out

    def bounds(self, b, h, q, S):
        parts = [m.bounds(b, h, q, S) for m in self.masks]
        known = [p for p in parts if p is not None]
        if self.conjunction:
            if not known:
                return None
            lo, hi = known[0]
            for plo, phi in known[1:]:
                lo, hi = torch.maximum(lo, plo), torch.minimum(hi, phi)
            return lo, hi
        if len(known) < len(parts):
            return None
        lo, hi = known[0]
        for plo, phi in known[1:]:
            lo, hi = torch.minimum(lo, plo), torch.maximum(hi, phi)
        return lo, hi

    def validate(self, B, H, L, S, device):
        for m in self.masks:
            m.validate(B, H, L, S, device)

    def cache_key(self):
        keys = tuple(m.cache_key() for m in self.masks)
        return None if None in keys else ("and" if self.conjunction else "or", keys)

    def __repr__(self) -> str:
        name = "and_masks" if self.conjunction else "or_masks"
        return f"{name}({', '.join(map(repr, self.masks))})"


def and_masks(*masks: Mask | MaskFn | Tensor) -> Mask:
    """A key is allowed when every mask allows it (intersection)."""
    if not masks:
        raise bad_argument("masks", "at least one mask", "none")
    return _Combined(tuple(as_mask(m) for m in masks), conjunction=True)


def or_masks(*masks: Mask | MaskFn | Tensor) -> Mask:
    """A key is allowed when any mask allows it (union)."""
    if not masks:
        raise bad_argument("masks", "at least one mask", "none")
    return _Combined(tuple(as_mask(m) for m in masks), conjunction=False)


class _FunctionMask(Mask):
    def __init__(self, fn: MaskFn):
        self.fn = fn

    def __call__(self, b, h, q, kv):
        return self.fn(b, h, q, kv)

    def validate(self, B, H, L, S, device):
        # Every backend reads the function's result differently (SDPA takes a float tensor
        # for an additive bias, the tiled kernel ORs it with padding, ...), so it is checked
        # here, before any backend runs: once per call, or once per problem size for a mask
        # object that is reused (masks are immutable, see cache_key). One evaluation on a
        # corner of the grid (every batch element and head, the last 2 queries, the first 2
        # keys) shows the dtype and whether the result broadcasts like its index arguments,
        # without a pass over L x S.
        key = (B, H, L, S, str(device))
        if getattr(self, "_checked", None) == key:
            return
        n, m = min(L, 2), min(S, 2)
        b, h, qi, ki = grid_indices(B, H, n, m, device)
        check_mask_output(self.evaluate(b, h, qi + (L - n), ki, L, S), (B, H, n, m), (B, H, L, S), device, self)
        self._checked = key

    def __repr__(self) -> str:
        return getattr(self.fn, "__name__", "mask_fn")


def check_mask_output(
    result: object, grid: tuple[int, ...], full: tuple[int, ...], device: torch.device | str, mask: object
) -> None:
    """Raise :class:`HeadwiseError` unless ``result``, a mask function's output on index
    tensors whose broadcast shape is ``grid`` (a corner of the ``full`` (B, H, L, S) grid),
    is a bool tensor on ``device`` that broadcasts to ``grid``.

    A float tensor is refused, not cast: SDPA would read it as an additive bias (0 and 1
    added to the logits), which silently removes the mask.
    """
    want = (
        f"the mask function {mask!r} to return a torch.bool tensor (True = attend) that broadcasts"
        f" like its index arguments (B, H, L, S) = {full}"
    )
    if not isinstance(result, Tensor):
        shown = repr(result) if result is None or isinstance(result, (bool, int, float)) else type(result).__name__
        raise bad_argument("mask", want, f"{shown}, not a tensor")
    if result.dtype != torch.bool:
        raise bad_argument("mask", want, f"a {result.dtype} tensor")
    shape = tuple(result.shape)
    if len(shape) > len(grid) or any(n not in (1, g) for n, g in zip(reversed(shape), reversed(grid))):
        raise bad_argument("mask", want, f"shape {shape} on index arguments that broadcast to {grid}")
    if result.device != torch.device(device):
        raise bad_argument("mask", want + f" on {device} (the device of q)", f"a tensor on {result.device}")


class _TensorMask(Mask):
    """A dense boolean tensor broadcastable to (B, H, L, S), indexed by raw query index."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    def __call__(self, b, h, q, kv):
        raise HeadwiseError("a tensor mask is indexed by raw query index: use evaluate()")

    def evaluate(self, b, h, q_idx, kv_idx, L, S):
        t = self.tensor
        if t.device != q_idx.device:
            t = t.to(q_idx.device)
        # Broadcast dimensions of size 1 index at 0.
        idx = [i if t.shape[d] > 1 else torch.zeros_like(i) for d, i in enumerate((b, h, q_idx, kv_idx))]
        return t[idx[0], idx[1], idx[2], idx[3]]

    def validate(self, B, H, L, S, device):
        t, want = self.tensor, (B, H, L, S)
        if t.dim() != 4 or any(n not in (1, w) for n, w in zip(t.shape, want)):
            raise bad_argument("mask", f"a bool tensor broadcastable to (B, H, L, S) = {want}", tuple(t.shape))

    def cache_key(self):
        return None  # a tensor can change in place: never reuse a plan made from it

    def __repr__(self) -> str:
        return f"tensor_mask{tuple(self.tensor.shape)}"


def as_mask(mask: Mask | MaskFn | Tensor) -> Mask:
    """Wrap a function ``(b, h, q_idx, kv_idx) -> bool`` or a bool tensor into a :class:`Mask`."""
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise bad_argument("mask", "a torch.bool tensor (True = attend)", mask.dtype)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        return _TensorMask(mask)
    if callable(mask):
        return _FunctionMask(mask)
    raise bad_argument(
        "mask", "a Mask, a function (b, h, q_idx, kv_idx) -> bool, or a bool tensor", type(mask).__name__
    )


def classify_blocks(
    mask: Mask, B: int, H: int, L: int, S: int, block_q: int, block_k: int, device: torch.device | str
) -> Tensor:
    """Label every (query block, key block) pair EMPTY, PARTIAL or FULL for all (b, h).

    Returns an int8 tensor (ceil(L / block_q), ceil(S / block_k)). FULL means every
    (b, h, row, key) in the block attends; EMPTY means none does. With bounds this costs
    O(B * H * L + nq * nk): a query block reaches the hull of its rows' key ranges (exact
    for contiguous masks, conservative otherwise: a block may be PARTIAL yet empty, never
    the reverse). Without bounds the mask is evaluated one query block at a time (O(L * S)
    work, O(block_q * S) memory) and the labels are exact.
    """
    nq, nk = -(-L // block_q), -(-S // block_k)
    ks = torch.arange(nk, device=device) * block_k
    ke = torch.clamp(ks + block_k - 1, max=S - 1)
    bidx = torch.arange(B, device=device).view(B, 1, 1)
    hidx = torch.arange(H, device=device).view(1, H, 1)
    q = (torch.arange(L, device=device) + (S - L)).view(1, 1, L)
    found = mask.bounds(bidx, hidx, q, S)
    if found is not None:
        # Bounds broadcast over (B, H, L) but are usually (1, 1, L): reduce without expanding.
        lo, hi, _ = torch.broadcast_tensors(found[0].clamp(min=0), found[1].clamp(max=S - 1), q)
        lo, hi = lo.reshape(-1, L), hi.reshape(-1, L)
        pad = nq * block_q - L
        nonempty = lo <= hi
        # Hull of the rows of each query block (empty rows excluded): a superset of its keys.
        lo_hull = torch.nn.functional.pad(torch.where(nonempty, lo, _FAR), (0, pad), value=_FAR)
        hi_hull = torch.nn.functional.pad(torch.where(nonempty, hi, -_FAR), (0, pad), value=-_FAR)
        min_lo = lo_hull.view(-1, nq, block_q).amin(dim=2).amin(dim=0)
        max_hi = hi_hull.view(-1, nq, block_q).amax(dim=2).amax(dim=0)
        hit = (min_lo.view(nq, 1) <= ke) & (max_hi.view(nq, 1) >= ks)
        if not mask.exact_bounds:
            return torch.where(hit, PARTIAL, EMPTY).to(torch.int8)
        # FULL needs every row to cover the key block; padding rows (beyond L) never spoil it.
        max_lo = torch.nn.functional.pad(lo, (0, pad), value=-_FAR).view(-1, nq, block_q).amax(dim=2).amax(dim=0)
        min_hi = torch.nn.functional.pad(hi, (0, pad), value=_FAR).view(-1, nq, block_q).amin(dim=2).amin(dim=0)
        full = (max_lo.view(nq, 1) <= ks) & (min_hi.view(nq, 1) >= ke)
        return torch.where(full, FULL, torch.where(hit, PARTIAL, EMPTY)).to(torch.int8)
    out = torch.empty(nq, nk, dtype=torch.int8, device=device)
    b4, h4 = bidx.view(B, 1, 1, 1), hidx.view(1, H, 1, 1)
    kv = torch.arange(S, device=device).view(1, 1, 1, S)
    for i in range(nq):
        rows = torch.arange(i * block_q, min(L, (i + 1) * block_q), device=device).view(1, 1, -1, 1)
        m = mask.evaluate(b4, h4, rows, kv, L, S).expand(B, H, rows.shape[2], S)
        m = torch.nn.functional.pad(m, (0, nk * block_k - S), value=False).view(B, H, -1, nk, block_k)
        any_ = m.any(dim=4).any(dim=2).any(dim=1).any(dim=0)
        pad_cols = torch.arange(nk * block_k, device=device).view(nk, block_k) >= S
        all_ = (m | pad_cols).all(dim=4).all(dim=2).all(dim=1).all(dim=0)
        out[i] = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY))
    return out
