"""Feedback: (query, useful results) pairs that a store records as it is used, to train its enhancer on.

An agent that searches a :class:`~headwise.memory.store.VectorMemory` and learns which results
helped calls ``memory.record_feedback(query, relevant_ids)``; every such pair is one row of
the store's SQLite database, committed before the call returns (like ``add``).
``memory.feedback()`` reads them back and ``headwise memory train --from-feedback DIR`` (or
:func:`headwise.memory.fit.fit_enhancer` on ``feedback_training_set(memory)``) trains an
enhancer on them.

Layout: one table, created by the first recorded pair (a store without feedback has none, so
stores written before feedback existed open and work unchanged)::

    feedback(id INTEGER PRIMARY KEY AUTOINCREMENT, vector BLOB, text TEXT, relevant TEXT, created REAL)

``vector`` is the query as float32 (normalised for metric "cosine"), ``text`` the query text
when one was given, ``relevant`` a JSON object {stored id: grade > 0}, ``created`` Unix time.

Shapes: a query (d,); ``feedback_training_set`` returns queries (n, d) float32 and n dicts.

Example:
    >>> import numpy as np
    >>> from headwise.memory import VectorMemory
    >>> mem = VectorMemory(2)
    >>> ids = mem.add(np.eye(2, dtype=np.float32))
    >>> mem.record_feedback([0.9, 0.1], [0]), mem.record_feedback([0.1, 0.9], {1: 2.0})
    (1, 2)
    >>> [f.relevant for f in mem.feedback()]
    [{0: 1.0}, {1: 2.0}]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from headwise.errors import HeadwiseError, bad_argument
from headwise.memory.records import Feedback
from headwise.memory.storage import Storage, _sql_errors, write_transaction

_TABLE = (
    "CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, vector BLOB NOT NULL, "
    "text TEXT, relevant TEXT NOT NULL, created REAL NOT NULL)"
)


def check_relevant(relevant: Any, existing: Callable[[np.ndarray], np.ndarray]) -> dict[int, float]:
    """{id: grade} from a list of ids (grade 1) or a dict {id: grade > 0}; ``existing(ids)`` must return them all."""
    if isinstance(relevant, str | bytes) or not hasattr(relevant, "__iter__"):
        raise bad_argument("relevant_ids", "a list of stored ids or a dict {id: grade > 0}", repr(relevant))
    pairs = list(relevant.items()) if isinstance(relevant, dict) else [(i, 1.0) for i in relevant]
    out: dict[int, float] = {}
    for doc, grade in pairs:
        if isinstance(doc, bool) or not isinstance(doc, int | np.integer) or not 0 <= doc < 2**63 - 1:
            raise bad_argument("relevant_ids", "integer ids in [0, 2**63 - 1)", repr(doc))
        if isinstance(grade, bool) or not isinstance(grade, int | float) or not 0 < grade < float("inf"):
            raise bad_argument(f"relevant_ids[{doc}]", "a finite grade > 0", repr(grade))
        out[int(doc)] = float(grade)
    if not out:
        raise bad_argument("relevant_ids", "at least one id", repr(relevant))
    missing = sorted(set(out) - set(existing(np.fromiter(out, dtype=np.int64, count=len(out))).tolist()))
    if missing:
        raise bad_argument("relevant_ids", "ids stored in the memory", f"not stored: {missing[:10]}")
    return out


@_sql_errors
def insert_feedback(db: Storage, vector: np.ndarray, text: str | None, relevant: dict[int, float]) -> int:
    """Insert one pair in its own transaction (the table is created in it if needed); returns its id."""
    with write_transaction(db.conn) as conn:
        conn.execute(_TABLE)
        cur = conn.execute(
            "INSERT INTO feedback(vector, text, relevant, created) VALUES (?, ?, ?, ?)",
            (np.ascontiguousarray(vector, dtype=np.float32).tobytes(), text, json.dumps(relevant), time.time()),
        )
    return int(cur.lastrowid)


@_sql_errors
def read_feedback(db: Storage, dim: int) -> list[Feedback]:
    """Every recorded pair, oldest first (an empty list when none was ever recorded)."""
    conn = db.conn
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'feedback'").fetchone()
    if not exists:
        return []
    out = []
    for fid, blob, text, rel, created in conn.execute("SELECT id, vector, text, relevant, created FROM feedback"):
        vector = np.frombuffer(blob, dtype=np.float32)
        if vector.shape != (dim,):
            raise HeadwiseError(f"database {db._where}: expected feedback {fid} to hold a ({dim},) vector, "
                                f"got {vector.shape}")  # fmt: skip
        out.append(Feedback(int(fid), vector.copy(), text, {int(k): float(v) for k, v in json.loads(rel).items()},
                            float(created)))  # fmt: skip
    return out


def feedback_training_set(memory: Any) -> tuple[np.ndarray, list[dict[int, float]]]:
    """(queries (n, d) float32, relevance dicts) of every pair recorded in ``memory`` whose ids are still stored.

    A pair whose relevant ids were all deleted since is skipped; deleted ids are dropped from the others.
    """
    stored = set(memory.ids().tolist())
    queries, relevant = [], []
    for entry in memory.feedback():
        rel = {i: g for i, g in entry.relevant.items() if i in stored}
        if rel:
            queries.append(entry.query)
            relevant.append(rel)
    if not queries:
        return np.empty((0, memory.dim), dtype=np.float32), []
    return np.stack(queries), relevant
