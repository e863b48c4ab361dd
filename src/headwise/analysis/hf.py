"""The transformers adapter: headwise as an attention implementation, capture, head sites.

Everything specific to a model family lives here. :func:`register` adds "headwise" to
transformers' ``AttentionInterface`` (and to ``AttentionMaskInterface``, which hands us the
boolean mask of "sdpa", or None when there is nothing to mask), so that::

    model = AutoModel.from_pretrained(path, attn_implementation="headwise")

runs :func:`headwise.attend` in every self-attention layer. Inside ``with capture(cache):``
each layer stores its weights or streaming stats in the :class:`AttentionCache`; outside,
the implementation only attends (auto backend, no weights). Masks are converted to
headwise masks: no mask + a causal module -> ``causal`` (bottom-right aligned, right for a
KV cache too), a right-padding mask -> ``padding(lengths)`` (with ``causal`` when causal),
anything else stays a bool tensor. An additive float mask made of 0 and large negative
values (what "eager" builds) is read as keep / drop; other additive biases are refused.

Shapes: transformers passes query (B, H, L, D), key/value (B, Hkv, S, D) and expects
attn_output (B, L, H, D) and weights (B, H, L, S) or None back.

Example::

    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from headwise.analysis import AttentionCache, capture, register
    >>> _ = register()
    >>> cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    ...                  vocab_size=100, attn_implementation="headwise")
    >>> model = BertModel(cfg).eval()
    >>> cache = AttentionCache(layers=[1])
    >>> with capture(cache), torch.no_grad():
    ...     _ = model(torch.tensor([[1, 5, 7, 2]]))
    >>> cache.keys()[:2], cache[1, 0].shape
    ([(1, 0), (1, 1)], torch.Size([1, 4, 4]))
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from headwise.analysis.cache import AttentionCache
from headwise.attend import attend
from headwise.caches import on_clear
from headwise.errors import HeadwiseError, bad_argument
from headwise.masks import Mask, and_masks, causal, padding

IMPLEMENTATION = "headwise"
_ACTIVE: ContextVar[AttentionCache | None] = ContextVar("headwise_attention_cache", default=None)
# transformers builds one mask per forward and hands the same tensor to every layer: the
# last conversion is kept (by weak reference, so a freed tensor can never be mistaken for a
# new one at the same address) and reused while the tensor is unchanged (same _version).
# One tuple (weakref to the tensor, its _version, (is_causal, L, S), result), swapped whole so
# that threads never see a half-updated entry.
_LAST_MASK: list[tuple | None] = [None]
on_clear("transformers.last_mask", lambda: _LAST_MASK.__setitem__(0, None))


def register(name: str = IMPLEMENTATION) -> str:
    """Register the headwise attention (and its mask builder) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, headwise_attention_forward)
    # sdpa's builder gives a bool mask (True = keep) or None when nothing is masked, which is
    # what attend() takes; without an entry transformers would fail to build any mask.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


@contextlib.contextmanager
def capture(cache: AttentionCache) -> Iterator[AttentionCache]:
    """Fill ``cache`` from every headwise attention layer run inside the block."""
    if not isinstance(cache, AttentionCache):
        raise bad_argument("cache", "an AttentionCache", type(cache).__name__)
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def convert_mask(attention_mask: Tensor | None, is_causal: bool, L: int, S: int) -> Mask | Tensor | None:
    """A transformers attention mask (bool or additive float, (B|1, 1|H, L, S)) as a headwise mask.

    Recognised structure is turned into the masks the tiled kernel can skip blocks with.

    Example::

        >>> import torch
        >>> keep = torch.arange(5).view(1, 1, 1, 5) < torch.tensor([5, 3]).view(2, 1, 1, 1)
        >>> convert_mask(keep.expand(2, 1, 5, 5), False, 5, 5)
        padding([5, 3])
        >>> convert_mask(None, True, 5, 5)
        causal
    """
    if attention_mask is None:
        return causal if is_causal and L > 1 else None
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 4:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise bad_argument("attention_mask", "a 4-d (B, 1, L, S) mask tensor or None", got)
    keep = attention_mask
    if keep.dtype != torch.bool:
        # "eager" masks are 0 where kept and the dtype's minimum where dropped.
        keep = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        if bool((attention_mask[keep] != 0).any()):
            raise HeadwiseError(
                "attention_mask: expected a bool mask or an additive mask of 0 / -inf, got other additive biases"
            )
    if keep.shape[-2:] != (L, S):
        raise bad_argument("attention_mask", f"last dims (L, S) = ({L}, {S})", tuple(keep.shape[-2:]))
    base = causal if is_causal and L > 1 else None
    if base is None and bool(keep.all()):
        return None  # nothing is masked

    def matches(m: Mask) -> bool:
        return torch.equal(m.dense(keep.shape[0], 1, L, S, keep.device).expand_as(keep), keep)

    if base is not None and matches(base):
        return base
    # The last query row sees every real key of a right-padded sequence (causal or not).
    pad = padding(keep[:, 0, -1, :].sum(dim=-1))
    candidate = pad if base is None else and_masks(base, pad)
    if matches(candidate):
        return candidate
    return keep


def _converted(attention_mask: Tensor | None, is_causal: bool, L: int, S: int) -> Mask | Tensor | None:
    """:func:`convert_mask`, reused across the layers of one forward."""
    if attention_mask is None:
        return convert_mask(None, is_causal, L, S)
    entry = _LAST_MASK[0]
    if entry is not None:
        ref, version, args, result = entry
        if ref() is attention_mask and version == attention_mask._version and args == (is_causal, L, S):
            return result
    result = convert_mask(attention_mask, is_causal, L, S)
    _LAST_MASK[0] = (weakref.ref(attention_mask), attention_mask._version, (is_causal, L, S), result)
    return result


def _layer_of(module: nn.Module) -> int:
    layer = getattr(module, "layer_idx", None)
    if isinstance(layer, int):
        return layer
    raise HeadwiseError(f"module: expected an attention module with an integer layer_idx, got {type(module).__name__}")


def headwise_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers attention function running :func:`headwise.attend` (see the module docstring)."""
    L, S = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", False) if is_causal is None else bool(is_causal)
    mask = _converted(attention_mask, is_causal, L, S)
    cache = _ACTIVE.get()
    keep = cache is not None and cache.wants_layer(_layer_of(module))
    need_weights = bool(kwargs.get("output_attentions")) or (keep and cache.mode == "weights")
    res = attend(
        query,
        key,
        value,
        mask=mask,
        scale=scaling,
        dropout_p=dropout if module.training else 0.0,
        need_weights=need_weights,
        need_stats=keep and cache.mode == "stats",
        check_finite=False,  # eager lets non-finite values through; so do we (and save a pass)
    )
    if keep:
        cache.store(_layer_of(module), weights=res.weights, stats=res.stats)
    return res.out.transpose(1, 2), res.weights


# -- where each layer's heads are merged: the input of the attention output projection ----


@dataclass(frozen=True)
class HeadSite:
    """One attention layer seen from its output projection, whose input is (..., H * d)."""

    layer: int
    projection: nn.Module
    num_heads: int
    head_dim: int


def head_sites(model: nn.Module) -> list[HeadSite]:
    """The output projections of every self-attention layer, in layer order.

    Knows headwise :class:`~headwise.modules.MultiHeadAttention` (``out_proj``), BERT-style
    encoders (``attention.self`` + ``attention.output.dense``), GPT-2 (``attn.c_proj``) and
    Llama-style layers (``o_proj``).
    """
    from headwise.modules import MultiHeadAttention

    sites: list[HeadSite] = []
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        if isinstance(mod, MultiHeadAttention):
            sites.append(HeadSite(len(sites), mod.out_proj, mod.num_heads, mod.head_dim))
        elif name.endswith("attention.self") and hasattr(mod, "num_attention_heads"):
            proj = modules.get(name[: -len("self")] + "output.dense")
            if proj is None:
                raise HeadwiseError(f"model: expected {name[:-4]}output.dense next to {name}, got none")
            sites.append(HeadSite(_layer_of(mod), proj, mod.num_attention_heads, mod.attention_head_size))
        elif hasattr(mod, "c_proj") and hasattr(mod, "num_heads") and hasattr(mod, "head_dim"):
            sites.append(HeadSite(_layer_of(mod), mod.c_proj, mod.num_heads, mod.head_dim))
        elif hasattr(mod, "o_proj") and hasattr(mod, "head_dim") and hasattr(mod, "layer_idx"):
            heads = mod.config.num_attention_heads
            sites.append(HeadSite(_layer_of(mod), mod.o_proj, heads, mod.head_dim))
    if not sites:
        raise bad_argument("model", "a model with attention layers headwise knows", type(model).__name__)
    sites.sort(key=lambda s: s.layer)
    if [s.layer for s in sites] != list(range(len(sites))):
        raise HeadwiseError(f"model: expected layers 0..n-1, got {[s.layer for s in sites]}")
    return sites


def run_cached(model: nn.Module, batch: dict[str, Tensor], cache: AttentionCache) -> Any:
    """One forward of a transformers model under :func:`capture`; sets ``cache.token_mask``."""
    if model.config._attn_implementation != IMPLEMENTATION:
        raise bad_argument(
            "model", f'a model loaded with attn_implementation="{IMPLEMENTATION}"', model.config._attn_implementation
        )
    with capture(cache):
        out = model(**batch)
    mask = batch.get("attention_mask")
    cache.token_mask = mask.bool() if mask is not None else None
    return out
