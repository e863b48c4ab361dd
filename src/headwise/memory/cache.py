"""An LRU result cache with a maximum size and a time to live, for repeated searches.

The store keys entries by (query bytes, k, enhance) and clears the cache on every add,
delete, enhancer change and ``ef_search`` change, so a hit is always what a fresh search
would return. ``max_size=0`` disables the cache.

Example:
    >>> clock = iter([0.0, 1.0, 5.0]).__next__
    >>> cache = ResultCache(max_size=2, ttl=3.0, clock=clock)
    >>> cache.put("q", "result")       # stored at t=0
    >>> cache.get("q"), cache.get("q")  # t=1: hit; t=5: expired
    ('result', None)
    >>> cache.stats()["hits"], cache.stats()["expired"]
    (1, 1)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from headwise.errors import bad_argument


class ResultCache:
    """Least-recently-used mapping with at most ``max_size`` entries, each valid ``ttl`` seconds."""

    def __init__(
        self, max_size: int = 0, ttl: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not isinstance(max_size, int) or max_size < 0:
            raise bad_argument("cache_size", "an int >= 0", max_size)
        if ttl is not None and not ttl > 0:
            raise bad_argument("cache_ttl", "None or a number of seconds > 0", ttl)
        self.max_size, self.ttl, self.clock = max_size, ttl, clock
        self._items: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._guard = threading.Lock()  # concurrent searches share the cache
        self.hits = self.misses = self.evictions = self.expired = self.invalidations = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any | None:
        """The cached value, or None on a miss or an expired entry (which is dropped)."""
        if self.max_size == 0:
            return None
        with self._guard:
            return self._get(key)

    def _get(self, key: Hashable) -> Any | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        stored_at, value = item
        if self.ttl is not None and self.clock() - stored_at > self.ttl:
            del self._items[key]
            self.expired += 1
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: Any) -> None:
        if self.max_size == 0:
            return
        with self._guard:
            self._items[key] = (self.clock(), value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_size:
                self._items.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        """Drop every entry (the store calls this whenever its contents change)."""
        with self._guard:
            if self._items:
                self.invalidations += 1
            self._items.clear()

    def stats(self) -> dict[str, float]:
        looked_up = self.hits + self.misses
        return {
            "size": len(self._items),
            "max_size": self.max_size,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / looked_up if looked_up else 0.0,
            "evictions": self.evictions,
            "expired": self.expired,
            "invalidations": self.invalidations,
        }
