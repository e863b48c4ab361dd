"""Per-head attention metrics: plain tensors in, plain tensors out.

Shape legend: ``w`` (..., L, S) attention weights whose rows sum to 1 (a row of zeros, a
query with nothing to attend to, gives 0 for every per-row metric); per-row metrics
return (..., L). Head x head matrices take (H, ..., L, S) and return (H, H).

Definitions:

- entropy: ``-sum_k a_k ln a_k`` in nats per row; ``smooth=True`` first mixes in the
  uniform distribution as Clark et al. (2019) do: ``a' = (1 - 1e-4) a + 1e-4 / S``.
- normalised entropy: entropy / ln S (0 one-hot, 1 uniform).
- Gini coefficient of each row's weights (0 uniform, (S-1)/S one-hot).
- sparsity: the share of a row's weights below ``threshold`` (0.01).
- max weight: each row's largest weight ("confidence", Voita et al. 2019).
- mean distance: ``sum_k a_k |i - k|`` with query i aligned to the end of the keys.
- attention to positions: the mass each row puts on the given key columns ([CLS], [SEP]).
- JS matrix: ``sum over query rows of JS(head_i row, head_j row)`` in nats (Clark et al.).
- cosine matrix: cosine similarity of the flattened maps of two heads.

Example::

    >>> import torch, math
    >>> from headwise.analysis.metrics import entropy, gini, js_matrix
    >>> uniform = torch.full((3, 4), 0.25)
    >>> round(float(entropy(uniform)[0]), 4) == round(math.log(4), 4), float(gini(uniform)[0])
    (True, 0.0)
    >>> float(js_matrix(torch.stack([uniform, uniform])).max())
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from headwise.errors import bad_argument

CLARK_EPS = 1e-4


def _check_weights(w: Tensor, name: str = "w", min_dim: int = 2) -> None:
    if not isinstance(w, Tensor) or w.dim() < min_dim or not w.dtype.is_floating_point:
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise bad_argument(name, f"a floating-point tensor with at least {min_dim} dims (..., L, S)", got)


def _xlogx(p: Tensor) -> Tensor:
    return torch.xlogy(p, p)  # 0 ln 0 = 0, the limit


def entropy(w: Tensor, smooth: bool = False, eps: float = CLARK_EPS) -> Tensor:
    """Row entropy in nats (..., L); ``smooth`` applies Clark et al.'s ``(1-eps) a + eps / S``."""
    _check_weights(w)
    if smooth:
        empty = w.sum(-1, keepdim=True) == 0
        w = torch.where(empty, w, (1 - eps) * w + eps / w.shape[-1])
    return 0.0 - _xlogx(w).sum(-1)  # 0.0 - 0.0 is +0.0, where negation would give -0.0


def normalized_entropy(w: Tensor, smooth: bool = False, key_counts: Tensor | None = None) -> Tensor:
    """Entropy divided by ln n (n = S or ``key_counts``): 0 for one-hot rows, 1 for uniform (..., L)."""
    log_n = _counts(w, key_counts).log()
    return torch.where(log_n > 0, entropy(w, smooth) / log_n.clamp_min(1e-30), torch.zeros_like(log_n))


def _counts(w: Tensor, key_counts: Tensor | None) -> Tensor:
    """Number of real keys per row, broadcast to (..., L): S unless ``key_counts`` is given."""
    if key_counts is None:
        return torch.full(w.shape[:-1], w.shape[-1], dtype=w.dtype, device=w.device)
    return torch.as_tensor(key_counts, dtype=w.dtype, device=w.device).expand(w.shape[:-1])


def gini(w: Tensor, key_counts: Tensor | None = None) -> Tensor:
    """Gini coefficient of each row (..., L): 0 uniform, (n-1)/n one-hot, 0 for an empty row.

    ``key_counts`` (broadcastable to (..., L)): rows are zero-padded beyond their first n
    real keys; the padding zeros are left out (they sort first, so ranks shift by S - n).
    """
    _check_weights(w)
    S = w.shape[-1]
    n = _counts(w, key_counts)
    x, _ = torch.sort(w, dim=-1)
    rank = torch.arange(1, S + 1, dtype=w.dtype, device=w.device)
    total = x.sum(-1)
    num = (2 * rank * x).sum(-1) - (2 * S - n + 1) * total
    return torch.where(total > 0, num / (n * total.clamp_min(torch.finfo(w.dtype).tiny)), torch.zeros_like(total))


def sparsity(w: Tensor, threshold: float = 0.01, key_counts: Tensor | None = None) -> Tensor:
    """Share of each row's (first ``key_counts``) weights below ``threshold`` (..., L)."""
    _check_weights(w)
    if not 0 < threshold <= 1:
        raise bad_argument("threshold", "a number in (0, 1]", threshold)
    if key_counts is None:
        return (w < threshold).to(w.dtype).mean(-1)
    n = _counts(w, key_counts)
    real = torch.arange(w.shape[-1], device=w.device) < n.unsqueeze(-1)
    return ((w < threshold) & real).to(w.dtype).sum(-1) / n.clamp_min(1)


def max_weight(w: Tensor) -> Tensor:
    """Largest weight of each row (..., L)."""
    _check_weights(w)
    return w.amax(-1)


def mean_distance(w: Tensor) -> Tensor:
    """Expected |query - key| distance of each row (..., L); queries align to the last keys."""
    _check_weights(w)
    L, S = w.shape[-2:]
    q = torch.arange(L, device=w.device, dtype=w.dtype).view(L, 1) + (S - L)
    k = torch.arange(S, device=w.device, dtype=w.dtype).view(1, S)
    return (w * (q - k).abs()).sum(-1)


def attention_to(w: Tensor, positions: Sequence[int] | Tensor) -> Tensor:
    """Mass each row puts on the key columns ``positions`` (..., L)."""
    _check_weights(w)
    idx = torch.as_tensor(positions, dtype=torch.long, device=w.device).flatten()
    S = w.shape[-1]
    if idx.numel() == 0 or bool(((idx < -S) | (idx >= S)).any()):
        raise bad_argument("positions", f"key positions in [-{S}, {S})", idx.tolist())
    return w.index_select(-1, torch.unique(idx % S)).sum(-1)


def _check_heads(w: Tensor) -> None:
    _check_weights(w, "weights", 3)


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence of the rows of p and q, in nats (..., L), in [0, ln 2].

    JS = (sum p ln p + sum q ln q) / 2 - sum m ln m with m = (p + q) / 2 (``xlogy`` gives
    0 ln 0 = 0 in one fused pass).
    """
    m = 0.5 * (p + q)
    return 0.5 * (torch.xlogy(p, p).sum(-1) + torch.xlogy(q, q).sum(-1)) - torch.xlogy(m, m).sum(-1)


def js_matrix(weights: Tensor, reduction: str = "sum") -> Tensor:
    """(H, H) Jensen-Shannon distance between heads, summed over query rows (Clark et al.).

    ``weights`` (H, ..., L, S): every head's maps on the same inputs; ``reduction="mean"``
    averages over rows instead (comparable across sentence lengths). Costs H^2/2 passes
    over the rows: the per-head terms ``sum p ln p`` are computed once.
    """
    _check_heads(weights)
    if reduction not in ("sum", "mean"):
        raise bad_argument("reduction", "'sum' or 'mean'", repr(reduction))
    H = weights.shape[0]
    rows = weights.reshape(H, -1, weights.shape[-1])
    neg_ent = torch.xlogy(rows, rows).sum(-1)  # (H, R)
    out = torch.zeros(H, H, dtype=weights.dtype, device=weights.device)
    for i in range(H):  # head i against heads i..H-1: (H - i, R, S) at a time, never (H, H, R, S)
        m = 0.5 * (rows[i : i + 1] + rows[i:])
        d = (0.5 * (neg_ent[i : i + 1] + neg_ent[i:]) - torch.xlogy(m, m).sum(-1)).clamp_min(0)
        out[i, i:] = d.sum(-1) if reduction == "sum" else d.mean(-1)
    out = torch.triu(out, 1)
    return out + out.T  # symmetric, with an exact zero diagonal


def cosine_matrix(weights: Tensor) -> Tensor:
    """(H, H) cosine similarity of the flattened attention maps of each pair of heads."""
    _check_heads(weights)
    flat = torch.nn.functional.normalize(weights.reshape(weights.shape[0], -1), dim=-1)
    return flat @ flat.T


def diversity_summary(js: Tensor, cos: Tensor, names: Sequence[str] | None = None) -> dict[str, object]:
    """Mean off-diagonal JS and cosine, and the most similar / most different pair of heads."""
    H = js.shape[0]
    if js.shape != (H, H) or cos.shape != (H, H) or H < 2:
        raise bad_argument("js, cos", "two (H, H) matrices with H >= 2", f"{tuple(js.shape)}, {tuple(cos.shape)}")
    names = list(names) if names is not None else [str(i) for i in range(H)]
    off = ~torch.eye(H, dtype=torch.bool, device=js.device)
    js_off = js.masked_fill(~off, float("inf"))
    i, j = divmod(int(js_off.argmin()), H)
    a, b = divmod(int(js.masked_fill(~off, -float("inf")).argmax()), H)
    return {
        "mean_js": float(js[off].mean()),
        "mean_cosine": float(cos[off].mean()),
        "most_similar": (names[i], names[j], float(js[i, j])),
        "most_different": (names[a], names[b], float(js[a, b])),
    }


# -- Kovaleva et al. (2019) pattern types, rule based -------------------------------------

#: Thresholds of :func:`classify_pattern` (mean mass per query row).
VERTICAL = 0.5  # mass on the special-token columns ([CLS], [SEP]) for "vertical"
DIAGONAL = 0.5  # mass on keys i-1, i, i+1 for "diagonal"
MIXED_EACH = 0.2  # both at least this much ...
MIXED_SUM = 0.6  # ... and together at least this much for "vertical+diagonal"
BLOCK = 0.8  # mass inside the query's own segment (with 2+ segments) for "block"

PATTERNS = ("vertical", "diagonal", "vertical+diagonal", "block", "heterogeneous")


def pattern_masses(w: Tensor, special: Sequence[int] = (), segments: Tensor | None = None) -> dict[str, float]:
    """Mean row masses used by :func:`classify_pattern` for one head's map ``w`` (L, S), L == S.

    ``vertical``: on the ``special`` columns ([CLS], [SEP]; 0 when none are given, since a
    vertical pattern is attention to special tokens); ``diagonal``: on keys i-1, i, i+1
    outside the special columns; ``block``: inside the query's segment (``segments`` (S,)
    ids, two or more of them), else NaN.
    """
    _check_weights(w)
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise bad_argument("w", "one head's square map (L, L)", tuple(w.shape))
    L = w.shape[0]
    idx = torch.arange(L, device=w.device)
    is_special = torch.zeros(L, dtype=torch.bool, device=w.device)
    if len(special):
        is_special[torch.as_tensor(list(special), device=w.device) % L] = True
    vertical = float(w[:, is_special].sum(-1).mean())
    near = (idx.view(L, 1) - idx.view(1, L)).abs() <= 1
    diagonal = float((w * (near & ~is_special.view(1, L))).sum(-1).mean())
    block = float("nan")
    if segments is not None:
        seg = torch.as_tensor(segments, device=w.device)
        if seg.shape != (L,):
            raise bad_argument("segments", f"one segment id per position ({L},)", tuple(seg.shape))
        if seg.unique().numel() > 1:
            block = float((w * (seg.view(L, 1) == seg.view(1, L))).sum(-1).mean())
    return {"vertical": vertical, "diagonal": diagonal, "block": block}


def classify_pattern(w: Tensor, special: Sequence[int] = (), segments: Tensor | None = None) -> str:
    """Kovaleva et al.'s pattern type of one head's map (L, L), by the documented thresholds.

    In order: vertical+diagonal when both masses are >= MIXED_EACH (0.2) and sum to >=
    MIXED_SUM (0.6); vertical when the special-column mass >= VERTICAL (0.5); diagonal when
    the +-1 band mass >= DIAGONAL (0.5); block when, with two or more segments, the mass
    inside the query's own segment >= BLOCK (0.8); heterogeneous otherwise.

    Example::

        >>> import torch
        >>> classify_pattern(torch.eye(6)), classify_pattern(torch.full((6, 6), 1 / 6))
        ('diagonal', 'heterogeneous')
        >>> to_cls = torch.zeros(6, 6); to_cls[:, 0] = 1
        >>> classify_pattern(to_cls, special=[0])
        'vertical'
    """
    m = pattern_masses(w, special, segments)
    return classify_masses(m["vertical"], m["diagonal"], m["block"])


def classify_masses(vertical: float, diagonal: float, block: float = float("nan")) -> str:
    """The pattern type from the masses of :func:`pattern_masses` (thresholds above)."""
    if vertical >= MIXED_EACH and diagonal >= MIXED_EACH and vertical + diagonal >= MIXED_SUM:
        return "vertical+diagonal"
    if vertical >= VERTICAL:
        return "vertical"
    if diagonal >= DIAGONAL:
        return "diagonal"
    if not math.isnan(block) and block >= BLOCK:
        return "block"
    return "heterogeneous"
