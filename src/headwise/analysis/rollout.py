"""Attention rollout (Abnar & Zuidema 2020): how much each input token reaches each position.

Per layer l the heads are averaged and the residual connection added, ``A_l = 0.5 W_l +
0.5 I`` (rows renormalised, which changes nothing when the rows of W sum to 1), and the
layers are chained: ``R_0 = A_0``, ``R_l = A_l R_{l-1}``.

Shape legend: per layer (B, H, L, L) weights, or a cache of them; result (B, L, L): row i
is how much output position i of the last layer draws on each input token.

Example::

    >>> import torch
    >>> from headwise.analysis.rollout import rollout
    >>> eye = torch.eye(4).expand(1, 2, 4, 4)
    >>> torch.equal(rollout([eye, eye, eye]), torch.eye(4).unsqueeze(0))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from headwise.analysis.cache import AttentionCache
from headwise.errors import bad_argument


def rollout(attentions: Sequence[Tensor] | AttentionCache, residual: float = 0.5) -> Tensor:
    """Rollout over the layers in order (see the module docstring); ``residual`` is the weight of I."""
    if isinstance(attentions, AttentionCache):
        layers = [attentions.layer_weights(lay) for lay in attentions.layer_indices()]
    else:
        layers = list(attentions)
    if not layers:
        raise bad_argument("attentions", "at least one layer of (B, H, L, L) weights", "none")
    if not 0 <= residual <= 1:
        raise bad_argument("residual", "a weight in [0, 1]", residual)
    result: Tensor | None = None
    for i, w in enumerate(layers):
        if w.dim() != 4 or w.shape[-1] != w.shape[-2]:
            raise bad_argument(f"attentions[{i}]", "self-attention weights (B, H, L, L)", tuple(w.shape))
        L = w.shape[-1]
        a = (1 - residual) * w.mean(1) + residual * torch.eye(L, dtype=w.dtype, device=w.device)
        a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        if result is not None and result.shape[-1] != L:
            raise bad_argument(f"attentions[{i}]", f"L = {result.shape[-1]} as the layer before", L)
        result = a if result is None else a @ result
    assert result is not None
    return result
