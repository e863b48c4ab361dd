"""``attend``: one entry point for every attention variant, with automatic backend choice."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from headwise.errors import HeadwiseError, bad_argument
from headwise.kernels.base import AttentionOutput, Request
from headwise.kernels.budget import guard_weights
from headwise.kernels.registry import run
from headwise.masks import Mask, MaskFn, as_mask
from headwise.scores import Score, ScoreFn, as_score


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | MaskFn | Tensor | None = None,
    score: Score | ScoreFn | Sequence[Score | ScoreFn] | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool | Literal["mean"] = False,
    need_stats: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
) -> AttentionOutput:
    """Multi-head attention ``softmax(scale * q k^T + modifications, masked) @ v``.

    Shape legend::

        q   (B, Hq, L, E)      B batch, Hq query heads, L queries, E query/key dim
        k   (B, Hkv, S, E)     Hkv key/value heads with Hq % Hkv == 0, S keys
        v   (B, Hkv, S, Ev)    Ev value dim
        out (B, Hq, L, Ev)     weights (B, Hq, L, S), lse and stats (B, Hq, L)

    Hkv < Hq is grouped-query attention (query head h reads key/value head h // (Hq/Hkv)),
    Hkv == 1 is multi-query attention; neither copies k or v (except in the reference).
    S != L is cross attention; positional masks then align queries to the end of the keys.

    Args:
        mask: a :class:`~headwise.masks.Mask` (``causal``, ``sliding_window(w)``, ...), a
            function ``(b, h, q_idx, kv_idx) -> bool`` or a bool tensor broadcastable to
            (B, Hq, L, S); True means "may attend". A row with nothing to attend to gives
            output 0, weights 0, entropy 0 and lse -inf, never NaN.
        score: a :class:`~headwise.scores.Score` (``alibi``, ``softcap``, ``temperature``,
            ``poincare``), a function ``(s, b, h, q_idx, kv_idx) -> s``, or a list of them.
        scale: multiplies the similarity; default ``1/sqrt(E)`` (1 for ``poincare``).
        dropout_p: dropout on the attention weights, applied whenever > 0 (pass 0 in
            eval mode). Returned weights are those before dropout.
        need_weights: True also returns the (B, Hq, L, S) weights (materialises them);
            "mean" returns their average over the heads, (B, L, S), reduced chunk by chunk
            so the per-head weights never exist at once (torch's ``average_attn_weights``).
            Weights that would not fit in the memory available raise :class:`HeadwiseError`
            before anything is allocated (see :mod:`headwise.kernels.budget`).
        need_stats: also return per-row entropy and max weight, computed while streaming.
        backend: "auto" (deterministic: the backend tuned for this problem by
            :func:`headwise.tune`, else the one the cost model estimates fastest; the same call
            always runs the same backend, see :mod:`headwise.kernels.registry` and
            :func:`headwise.plan` for ``explain()``), "reference", "eager", "tiled", "sdpa"
            or "flex". ``AttentionOutput.backend`` says which ran.
        check_finite: True raises :class:`HeadwiseError` naming q, k or v if it holds NaN
            or Inf (one reduction per tensor and a host sync, which on CUDA stalls the
            stream: a debugging aid, off by default). False lets non-finite values through
            as torch does (backends differ: SDPA zeroes a NaN row).

    Example::

        >>> import torch
        >>> from headwise import attend, sliding_window
        >>> q = torch.randn(2, 8, 128, 64)
        >>> k = v = torch.randn(2, 2, 128, 64)          # GQA: 8 query heads, 2 kv heads
        >>> res = attend(q, k, v, mask=sliding_window(16), need_stats=True)
        >>> res.out.shape, res.stats.entropy.shape, res.backend
        (torch.Size([2, 8, 128, 64]), torch.Size([2, 8, 128]), 'tiled')
    """
    req = make_request(q, k, v, mask, score, scale, dropout_p, need_weights, need_stats)
    if not isinstance(backend, str):
        raise bad_argument("backend", "a backend name (str)", type(backend).__name__)
    if check_finite:
        _check_finite(q, k, v)
    return run(req, backend)


def _check_finite(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise if q, k or v holds a NaN or Inf.

    One sum of the three sums is a single reduction pass per tensor and one host sync
    (about 20x cheaper than ``isfinite(t).all()``, which writes a bool tensor); NaN and Inf
    always make it non-finite. Only then is the exact test run, which names the tensor and
    tells a true NaN/Inf from a sum that merely overflowed. Checking
    the output instead would not do: SDPA's CPU kernel turns a NaN row into zeros.
    """
    with torch.no_grad():
        if bool(torch.isfinite(q.sum() + k.sum() + v.sum())):
            return
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise bad_argument(name, "finite values (check_finite=True)", "NaN or Inf entries")


def make_request(q, k, v, mask, score, scale, dropout_p, need_weights, need_stats) -> Request:
    """Validate ``attend``'s arguments and bundle them (shared with benchmarks and tests)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise bad_argument(name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 4:
            want = "(B, Hq, L, E)" if name == "q" else "(B, Hkv, S, E)" if name == "k" else "(B, Hkv, S, Ev)"
            raise bad_argument(name, f"a 4-d tensor {want}", f"shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise bad_argument(name, "a floating-point tensor", t.dtype)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise bad_argument("k, v", f"the dtype of q ({q.dtype})", f"k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise bad_argument("k, v", f"the device of q ({q.device})", f"k on {k.device}, v on {v.device}")
    B, Hq, L, E = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise bad_argument("k, v", f"batch size {B} (as q)", f"k {k.shape[0]}, v {v.shape[0]}")
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[3] != E:
        raise bad_argument("k", f"last dim E = {E} (as q)", k.shape[3])
    if v.shape[1] != Hkv or v.shape[2] != S:
        raise bad_argument("v", f"(B, Hkv, S) = {(B, Hkv, S)} as k", tuple(v.shape[:3]))
    if Hkv == 0 or Hq % Hkv != 0:
        raise bad_argument("k", f"a number of heads dividing Hq = {Hq}", Hkv)
    if min(L, S, E, v.shape[3], B, Hq) == 0:
        raise bad_argument(
            "q, k, v", "non-empty dimensions", f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise bad_argument("dropout_p", "a number in [0, 1)", repr(dropout_p))
    if not isinstance(need_weights, bool) and need_weights != "mean":
        raise bad_argument("need_weights", 'a bool or "mean"', repr(need_weights))
    if not isinstance(need_stats, bool):
        raise bad_argument("need_stats", "a bool", repr(need_stats))

    mask_obj = as_mask(mask) if mask is not None else None
    if mask_obj is not None:
        mask_obj.validate(B, Hq, L, S, q.device)
    score_obj = as_score(score)
    if score_obj is not None:
        score_obj.validate(Hq)
    if scale is None:
        scale = score_obj.default_scale(E) if score_obj is not None else 1.0 / math.sqrt(E)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise bad_argument("scale", "a finite number > 0", repr(scale))
    req = Request(q, k, v, mask_obj, score_obj, float(scale), float(dropout_p), need_weights, need_stats)
    if need_weights:
        # Every backend that serves need_weights holds the L x S weights at once: refuse what
        # cannot fit with a message instead of a bare ENOMEM or the OOM killer (kernels/budget.py).
        guard_weights((B, Hq, L, S), q.dtype, q.device, need_weights, req.needs_grad)
    return req


__all__ = ["attend", "make_request", "AttentionOutput", "HeadwiseError"]
