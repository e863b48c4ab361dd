"""Argument checks of :class:`~headwise.memory.store.VectorMemory`: each raises a HeadwiseError
that names the argument, the expected and the actual value, before anything is written.

Example:
    >>> as_ids([3, 1], "ids").tolist()
    [3, 1]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from headwise.errors import bad_argument


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise bad_argument(name, f"an int >= {minimum}", repr(value))


def normalise_rows(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise bad_argument(
            name, "non-zero vectors for metric 'cosine'", f"zero rows {np.flatnonzero(zero)[:10].tolist()}"
        )
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def as_ids(ids: Any, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise bad_argument(name, "a 1-d sequence of ints", f"dtype {arr.dtype}, shape {arr.shape}")
    if (arr < 0).any():
        raise bad_argument(name, "ids >= 0 (-1 marks a missing result)", f"{arr[arr < 0][:10].tolist()}")
    return arr.astype(np.int64)


def check_metadata(metadata: Sequence[Any] | None, n: int) -> list[str | None]:
    if metadata is None:
        return [None] * n
    if isinstance(metadata, dict | str) or len(metadata) != n:
        raise bad_argument("metadata", f"a sequence of {n} JSON values (one per vector)", type(metadata).__name__)
    out: list[str | None] = []
    for i, m in enumerate(metadata):
        try:
            out.append(None if m is None else json.dumps(m, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise bad_argument(f"metadata[{i}]", "a JSON-serialisable value", f"{m!r} ({exc})") from exc
    return out


def check_texts(texts: Sequence[str | None] | None, n: int) -> list[str | None]:
    if texts is None:
        return [None] * n
    if isinstance(texts, str) or len(texts) != n:
        raise bad_argument("texts", f"a sequence of {n} str or None", type(texts).__name__)
    for i, t in enumerate(texts):
        if t is not None and not isinstance(t, str):
            raise bad_argument(f"texts[{i}]", "a str or None", type(t).__name__)
    return list(texts)
