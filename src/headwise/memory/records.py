"""What a :class:`~headwise.memory.store.VectorMemory` hands back: records, search hits, feedback pairs.

Shapes: a vector or query is (d,) float32.

Example:
    >>> import numpy as np
    >>> Record(3, np.zeros(2, dtype=np.float32), {"tag": "x"}, "three").metadata
    {'tag': 'x'}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Record:
    """A stored record: id, vector (d,) float32, metadata (JSON value or None), text or None."""

    id: int
    vector: np.ndarray
    metadata: Any
    text: str | None


@dataclass(frozen=True)
class Hit:
    """One result of :meth:`VectorMemory.search_text`."""

    id: int
    score: float
    text: str | None
    metadata: Any


@dataclass(frozen=True)
class Feedback:
    """One recorded pair: its id, the query vector (d,) float32, its text or None, {id: grade}, Unix time."""

    id: int
    query: np.ndarray
    text: str | None
    relevant: dict[int, float]
    created: float
