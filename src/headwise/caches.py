"""Every process-wide cache of headwise in one place: bounded, named, inspectable, clearable.

What headwise derives once and reuses (auto's decisions, the tiled kernel's block plans, SDPA's
dense masks, FlexAttention's block masks, the transformers integration's last converted mask)
lives in a :class:`BoundedCache` registered here by name. ``headwise.clear_caches()`` empties
them all; ``headwise.cache_info()`` says what each holds. Per-object caches (a store's result
cache, an enhancer's serving plan) belong to their object and go with it.

Keys are structural: a mask's ``cache_key()`` names its structure (``("causal",)``,
``("local", left, right)``...). A function or tensor mask has no structure to name; its key is
its identity, and the cache keeps the mask alive beside the value, so that identity is never
reused by another object while the entry exists.

Example:
    >>> cache = BoundedCache("example.squares", 2)
    >>> cache.put(("causal",), 1); cache.put(("local", 4, 0), 2); cache.put(("chunked", 8), 3)
    >>> cache.get(("causal",)) is None, cache.get(("chunked", 8))   # the oldest went first
    (True, 3)
    >>> cache_info()["example.squares"]
    {'entries': 2, 'max_entries': 2}
    >>> clear_caches(); cache_info()["example.squares"]["entries"]
    0
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from headwise.errors import bad_argument

_CACHES: dict[str, BoundedCache] = {}
_CLEAR_HOOKS: dict[str, Callable[[], None]] = {}


class BoundedCache:
    """A thread-safe LRU of at most ``size`` entries, registered under ``name``.

    A key of None (something that cannot be named) is never stored. ``put(key, value, keep)``
    keeps ``keep`` (the mask a value was derived from) alive with the value.
    """

    def __init__(self, name: str, size: int) -> None:
        if not isinstance(size, int) or size < 1:
            raise bad_argument("size", "an int >= 1", repr(size))
        self.name, self.size = name, size
        self._items: OrderedDict[Hashable, tuple[Any, object]] = OrderedDict()
        self._guard = threading.Lock()
        _CACHES[name] = self

    def get(self, key: Hashable | None) -> Any:
        if key is None:
            return None
        with self._guard:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable | None, value: Any, keep: object = None) -> None:
        if key is None:
            return
        with self._guard:
            self._items[key] = (value, keep)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._guard:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def on_clear(name: str, hook: Callable[[], None]) -> None:
    """Register ``hook`` to run on :func:`clear_caches` (a cache that is not a BoundedCache)."""
    _CLEAR_HOOKS[name] = hook


def clear_caches() -> None:
    """Empty every process-wide cache of headwise (they refill on the next call)."""
    for cache in list(_CACHES.values()):
        cache.clear()
    for hook in list(_CLEAR_HOOKS.values()):
        hook()


def cache_info() -> dict[str, dict[str, int]]:
    """Entries and bound of every registered cache, by name."""
    return {name: {"entries": len(c), "max_entries": c.size} for name, c in sorted(_CACHES.items())}
