"""What a "flash" enhancer attends over when it is bound to a store: the store's live vectors, kept current.

The flash read-out (:class:`~headwise.memory.enhancer.QueryEnhancer` with ``mechanism="flash"``)
attends over every stored vector. Bound to an array it reads that array; bound to a
:class:`~headwise.memory.store.VectorMemory` it must read what the store holds *now*, so a
:class:`StoreBinding` fetches the live vectors again whenever the store's records changed
since it last read them (after ``add``, ``delete``, a compaction, a reader's ``refresh``).

Change detection costs O(1) per search: the index's change counter (``version``) where it
has one, else three numbers of the store's index: its slot count S, its live count L and the
``seq`` of its last slot. ``seq`` numbers are never reused and grow with every insert (an
upsert gives the new vector a new one), slots are appended in that order, and a compaction
keeps the order. So if the live records changed, the triple changed: an added record that survives
puts a larger ``seq`` in the last slot; otherwise the records now are a subset of those read
(only deletions, and additions that were deleted again), and equal counts L mean the same set
(an unchanged S as well rules out a compaction that happens to restore the counts).

Fetching is one gather of the live rows from the index's own storage (no SQLite read, no
checksum pass), O(N d): about the cost of one flash read-out, which reads all N vectors
anyway. For ``"hnsw-fp16"`` these are the half-precision vectors the index holds, widened.

Example:
    >>> import numpy as np
    >>> from headwise.memory import VectorMemory
    >>> mem = VectorMemory(2, metric="ip")
    >>> _ = mem.add(np.eye(2, dtype=np.float32))
    >>> binding = StoreBinding(mem)
    >>> binding.vectors().tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    >>> _ = mem.add(np.array([[2.0, 2.0]], dtype=np.float32)); _ = mem.delete([0])
    >>> binding.vectors().tolist()
    [[0.0, 1.0], [2.0, 2.0]]
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from headwise.errors import HeadwiseError


def is_store(obj: Any) -> bool:
    """Whether ``obj`` is a vector store (``search`` / ``ids`` / ``vectors``) rather than an array."""
    return all(callable(getattr(obj, name, None)) for name in ("search", "ids", "vectors"))


def store_state(memory: Any) -> tuple[int, ...]:
    """A value that changes whenever the live records of ``memory`` change (see the module docstring).

    Stores without a headwise index (a remote store) fall back to their ids, O(N).
    """
    index = getattr(memory, "_index", None)
    if index is None or not hasattr(index, "slot_seq"):
        ids = np.asarray(memory.ids(), dtype=np.int64)
        return (len(ids), int(ids.sum()), int(ids.max()) if len(ids) else -1)
    version = getattr(index, "version", None)
    if isinstance(version, int):  # an index that counts its changes says so exactly
        return (id(index), version)
    seq = index.slot_seq
    return (id(index), index.n_slots, index.n_live, int(seq[-1]) if len(seq) else -1)


def live_vectors(memory: Any) -> np.ndarray:
    """The (N, d) float32 vectors of every live record of ``memory``, in slot order."""
    index = getattr(memory, "_index", None)
    live = getattr(getattr(index, "_live", None), "view", None)
    if live is None:  # not a headwise index: through the public API (SQLite for VectorMemory)
        return np.asarray(memory.vectors(memory.ids()), dtype=np.float32)
    return index.reconstruct(np.flatnonzero(live))  # a fresh array, not the search workspace


class StoreBinding:
    """The live vectors of a store, fetched again whenever its records change.

    Holds the store weakly: an enhancer set on a store must not keep it (and its open
    database and writer lock) alive after the user dropped it.
    """

    def __init__(self, memory: Any) -> None:
        self._ref = weakref.ref(memory)
        self._state: tuple[int, ...] | None = None
        self._vectors: np.ndarray | None = None
        self._guard = threading.Lock()

    def follows(self, memory: Any) -> bool:
        """Whether this binding reads ``memory``."""
        return self._ref() is memory

    def store(self) -> Any:
        """The bound store; a HeadwiseError when it no longer exists."""
        memory = self._ref()
        if memory is None:
            raise HeadwiseError("flash: expected the VectorMemory it was bound to, got one that no longer exists")
        return memory

    def vectors(self) -> np.ndarray:
        """The store's live vectors (N, d) float32 as of now (cached while the store is unchanged)."""
        memory = self.store()
        lock = getattr(memory, "_lock", None)
        if lock is None:
            return self._refresh(memory)
        # Shared like the search that calls refine (re-entrant); the guard: concurrent searches.
        with lock.shared() if hasattr(lock, "shared") else lock, self._guard:
            return self._refresh(memory)

    def _refresh(self, memory: Any) -> np.ndarray:
        state = store_state(memory)
        if state != self._state or self._vectors is None:
            self._vectors = live_vectors(memory)
            self._state = state
        return self._vectors
