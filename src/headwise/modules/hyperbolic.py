"""``HyperbolicAttention``: attention scored by distance in the Poincaré ball.

Queries and keys are projected, mapped into the ball of curvature -c and compared by the
negative Poincaré distance (:class:`headwise.scores.Poincare`): nearby points in a
hierarchy attend to each other, and the ball has room for trees that flat space lacks.

Values are aggregated in one of two ways (``aggregation``):

- ``"tangent"`` (default): map the values into the ball, take the weighted mean in the
  tangent space at the origin (log map, mean, exp map) and map back for the output
  projection. The mean in the tangent space is exactly what :func:`headwise.attend`
  computes, so every backend (the tiled kernel included, with its streaming statistics and
  O(L) memory) serves it; it is the default because of that and because it is stable.
- ``"einstein"``: the Einstein midpoint, the hyperbolic barycentre: values go to the Klein
  model, each weight is multiplied by the Lorentz factor gamma = 1 / sqrt(1 - c|x|^2) and
  renormalised, and the midpoint returns to the ball. Multiplying weights by gamma is adding
  log(gamma) to the logits, so this too is one ``attend`` call with a per-key score term.

As c -> 0 the ball flattens: the exp map becomes the identity and the distance tends to
2|q - k|, so the module tends to Euclidean distance attention (tested).

Shape legend: x (N, L, E) -> (N, L, E); H heads of dim d = E / H.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from headwise.attend import attend
from headwise.errors import bad_argument
from headwise.masks import Mask, MaskFn, as_mask
from headwise.scores import Poincare, expmap0, logmap0


class HyperbolicAttention(nn.Module):
    """Multi-head attention with negative Poincaré-distance scores.

    Args:
        embed_dim, num_heads: as in :class:`~headwise.modules.MultiHeadAttention`.
        curvature: c > 0 of the ball (radius 1/sqrt(c)).
        learn_curvature: learn c (as log c, so it stays positive).
        aggregation: "tangent" or "einstein" (see the module docstring).
        clip: largest sqrt(c)*|u| of a tangent vector before the exp map (keeps points off
            the boundary, where float32 distances blow up).
        mask: an optional :class:`~headwise.masks.Mask`.

    Example::

        >>> import torch
        >>> from headwise.modules import HyperbolicAttention
        >>> att = HyperbolicAttention(32, 4, curvature=1.0, learn_curvature=True)
        >>> att(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        curvature: float = 1.0,
        learn_curvature: bool = False,
        aggregation: str = "tangent",
        clip: float = 4.0,
        mask: Mask | MaskFn | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise bad_argument("num_heads", "an integer >= 1", repr(num_heads))
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim % num_heads:
            raise bad_argument("embed_dim", f"a positive multiple of num_heads ({num_heads})", repr(embed_dim))
        if not isinstance(curvature, (int, float)) or not math.isfinite(curvature) or curvature <= 0:
            raise bad_argument("curvature", "a finite number > 0", repr(curvature))
        if aggregation not in ("tangent", "einstein"):
            raise bad_argument("aggregation", "'tangent' or 'einstein'", repr(aggregation))
        fk = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.aggregation, self.clip = aggregation, float(clip)
        self.mask = as_mask(mask) if mask is not None else None
        log_c = torch.tensor(math.log(curvature), **fk)
        self.log_curvature = nn.Parameter(log_c, requires_grad=learn_curvature)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        # Scores are -distance (O(1) per unit of distance): a learnable inverse temperature.
        self.log_beta = nn.Parameter(torch.zeros((), **fk))

    @property
    def curvature(self) -> Tensor:
        return self.log_curvature.exp()

    def forward(self, x: Tensor, *, mask: Mask | MaskFn | None = None, need_stats: bool = False, backend: str = "auto"):
        """x (N, L, E) -> (N, L, E). With need_stats, returns (out, stats)."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise bad_argument("x", f"a tensor (N, L, {self.embed_dim})", got)
        q, k, v = rearrange(self.qkv(x), "n l (three h d) -> three n h l d", three=3, h=self.num_heads)
        c = self.curvature
        geometry = Poincare(c, clip=self.clip)
        vb = geometry.to_ball(v)  # values as points of the ball
        masks = [m for m in (self.mask, mask) if m is not None]
        combined = masks[0] if len(masks) == 1 else (masks[0] & masks[1]) if masks else None
        beta = self.log_beta.exp()

        def inverse_temperature(s, b, h, qi, kv):
            return s * beta

        if self.aggregation == "tangent":
            values, score = logmap0(vb, c), [geometry, inverse_temperature]
        else:
            klein = 2 * vb / (1 + c * (vb * vb).sum(-1, keepdim=True))
            # log of the Lorentz factor gamma = 1 / sqrt(1 - c|k|^2) of each value: (N, H, S).
            log_gamma = -0.5 * torch.log((1 - c * (klein * klein).sum(-1)).clamp_min(1e-12))

            def lorentz(s, b, h, qi, kv):
                return s + log_gamma[b, h, kv]

            values, score = klein, [geometry, inverse_temperature, lorentz]
        res = attend(q, k, values, mask=combined, score=score, scale=1.0, need_stats=need_stats, backend=backend)
        out = res.out
        if self.aggregation == "tangent":
            ball = expmap0(out, c, self.clip)  # the tangent-space mean, as a point of the ball
            tangent = logmap0(ball, c)
        else:
            # Klein -> Poincaré: p = k / (1 + sqrt(1 - c|k|^2)); then back to the tangent space.
            kk = (out * out).sum(-1, keepdim=True)
            ball = out / (1 + torch.sqrt((1 - c * kk).clamp_min(1e-12)))
            tangent = logmap0(ball, c)
        y = self.out_proj(rearrange(tangent, "n h l d -> n l (h d)"))
        return (y, res.stats) if need_stats else y
