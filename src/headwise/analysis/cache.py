"""``AttentionCache``: attention weights or streaming statistics keyed by (layer, head).

Shape legend: B batch, L queries, S keys. A cache entry for (layer, head) holds

    weights  (B, L, S)   the attention distribution of every query row (mode "weights")
    entropy  (B, L)      per-row entropy in nats      (mode "stats": no L x S tensor is kept)
    max_weight (B, L)    per-row largest weight

Filters (``layers``, ``heads``) decide what is kept *before* anything is stored, so a cache
of one head of one layer never holds the other 71 heads of MiniLM. ``token_mask`` (B, L),
when set by whoever ran the model, marks the real (non-padding) query rows; metrics use it
to average only over real tokens. A cache holds one forward pass: the next forward
overwrites the entries it produces (analyse corpora batch by batch, see
:func:`headwise.analysis.hf.run_cached`).

Example::

    >>> import torch
    >>> from headwise.analysis import AttentionCache
    >>> cache = AttentionCache(layers=[0], heads=[1, 2])
    >>> w = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)      # (B, H, L, S) of layer 0
    >>> cache.store(0, weights=w)
    >>> cache.keys(), cache[0, 2].shape
    ([(0, 1), (0, 2)], torch.Size([2, 5, 5]))
    >>> cache.store(1, weights=w)                                # layer 1 is filtered out
    >>> len(cache)
    2
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from headwise.errors import bad_argument
from headwise.kernels.base import AttentionStats

Mode = Literal["weights", "stats"]


@dataclass(frozen=True)
class HeadStats:
    """Streaming statistics of one head: ``entropy`` and ``max_weight``, each (B, L)."""

    entropy: Tensor
    max_weight: Tensor


def _index_set(name: str, values: Iterable[int] | None) -> frozenset[int] | None:
    if values is None:
        return None
    if isinstance(values, int):
        values = [values]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad_argument(name, "non-negative integers (or None for all)", repr(v))
        out.append(v)
    return frozenset(out)


class AttentionCache:
    """Per-(layer, head) attention weights or streaming stats, with layer/head filters.

    Args:
        layers: layer indices to keep (None: all).
        heads: head indices to keep in every kept layer (None: all).
        mode: "weights" keeps (B, L, S) per head; "stats" keeps per-row entropy and max
            weight (B, L) computed while streaming, without any L x S tensor.
        detach: store detached tensors (default) so a cache never keeps a graph alive.
    """

    def __init__(
        self,
        layers: Iterable[int] | None = None,
        heads: Iterable[int] | None = None,
        mode: Mode = "weights",
        detach: bool = True,
    ):
        if mode not in ("weights", "stats"):
            raise bad_argument("mode", "'weights' or 'stats'", repr(mode))
        self.layers = _index_set("layers", layers)
        self.heads = _index_set("heads", heads)
        self.mode: Mode = mode
        self.detach = detach
        self.token_mask: Tensor | None = None
        self._entries: dict[tuple[int, int], Tensor | HeadStats] = {}

    # -- filters ---------------------------------------------------------------------

    def wants_layer(self, layer: int) -> bool:
        """True when anything of ``layer`` is kept (callers skip the work otherwise)."""
        return self.layers is None or layer in self.layers

    def wanted_heads(self, num_heads: int) -> list[int]:
        """The head indices below ``num_heads`` that pass the head filter."""
        return [h for h in range(num_heads) if self.heads is None or h in self.heads]

    # -- filling ---------------------------------------------------------------------

    def store(self, layer: int, *, weights: Tensor | None = None, stats: AttentionStats | None = None) -> None:
        """Keep what the filters allow of one layer's (B, H, L, S) ``weights`` or (B, H, L) ``stats``."""
        if not self.wants_layer(layer):
            return
        if self.mode == "weights":
            if weights is None or weights.dim() != 4:
                got = None if weights is None else tuple(weights.shape)
                raise bad_argument("weights", "a (B, H, L, S) tensor (cache mode 'weights')", got)
            src = weights.detach() if self.detach else weights
            heads = self.wanted_heads(weights.shape[1])
            # A view of one head would keep every head's storage alive: copy when filtering.
            partial = len(heads) < weights.shape[1]
            for h in heads:
                self._entries[(layer, h)] = src[:, h].clone() if partial else src[:, h]
        else:
            if stats is None:
                raise bad_argument("stats", "AttentionStats (cache mode 'stats')", None)
            ent, mx = stats.entropy, stats.max_weight
            if self.detach:
                ent, mx = ent.detach(), mx.detach()
            for h in self.wanted_heads(ent.shape[1]):
                self._entries[(layer, h)] = HeadStats(ent[:, h], mx[:, h])

    def clear(self) -> None:
        """Drop every entry and the token mask."""
        self._entries.clear()
        self.token_mask = None

    # -- reading ---------------------------------------------------------------------

    def __getitem__(self, key: tuple[int, int]) -> Tensor | HeadStats:
        if key not in self._entries:
            raise bad_argument("key", f"a cached (layer, head) among {len(self)} entries", key)
        return self._entries[key]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys())

    def keys(self) -> list[tuple[int, int]]:
        """Cached (layer, head) pairs in sorted order."""
        return sorted(self._entries)

    def layer_indices(self) -> list[int]:
        return sorted({layer for layer, _ in self._entries})

    def head_indices(self, layer: int) -> list[int]:
        return sorted(h for lay, h in self._entries if lay == layer)

    def layer_weights(self, layer: int) -> Tensor:
        """The cached heads of ``layer`` stacked: (B, H_cached, L, S) (mode "weights")."""
        if self.mode != "weights":
            raise bad_argument("cache mode", "'weights' to stack attention maps", repr(self.mode))
        heads = self.head_indices(layer)
        if not heads:
            raise bad_argument("layer", f"a cached layer among {self.layer_indices()}", layer)
        return torch.stack([self._entries[(layer, h)] for h in heads], dim=1)

    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        total = 0
        for v in self._entries.values():
            for t in (v,) if isinstance(v, Tensor) else (v.entropy, v.max_weight):
                total += t.numel() * t.element_size()
        return total

    def __repr__(self) -> str:
        return f"AttentionCache(mode={self.mode!r}, entries={len(self)}, layers={self.layer_indices()})"
