"""Upsert, metadata updates and field indexes of :class:`~headwise.memory.store.VectorMemory`, a mixin.

- ``upsert(vectors, ids, metadata=None, texts=None)``: each id is inserted, or its record
  replaced (vector, metadata and text), all in **one** SQLite transaction: a crash leaves
  every record old or every record new. A replaced record gets a new ``seq``, so the index
  adds its new vector and tombstones the old slot, as a delete and an add would.
- ``update_metadata(ids, metadata, *, merge=False)``: only the metadata (and the checksum)
  change, in one transaction; the index is untouched. ``merge=True`` updates the keys of
  an existing object instead of replacing it (a shallow ``{**old, **new}``).
- ``index_field(name)``: a SQLite expression index for filters on a metadata field
  (:func:`~headwise.memory.filters.create_field_index`).

All three are refused on a read-only store; the first two clear the result cache and the
filters' matches. Each written record gets its checksum in the same transaction, and a
record is re-checksummed only after its stored bytes passed their old checksum, so an
update never launders a corrupted record.

Shapes: n records of dimension d -> vectors (n, d), ids (n,) int64.

Example:
    >>> import numpy as np
    >>> from headwise.memory import VectorMemory
    >>> mem = VectorMemory(2, metric="l2")
    >>> _ = mem.add(np.eye(2, dtype=np.float32), metadata=[{"v": 1}, {"v": 1}])
    >>> mem.upsert([[5.0, 5.0], [0.0, 3.0]], ids=[1, 7], metadata=[{"v": 2}, None]).tolist()
    [1, 7]
    >>> mem.update_metadata([0], [{"tag": "x"}], merge=True)
    >>> [r.metadata for r in mem.get([0, 1, 7])], len(mem), mem.verify().ok
    ([{'v': 1, 'tag': 'x'}, {'v': 2}, None], 3, True)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from headwise.errors import HeadwiseError, bad_argument
from headwise.memory.checks import as_ids, check_metadata, check_texts, ids_for_rows
from headwise.memory.filters import create_field_index, field_indexes
from headwise.memory.integrity import check_row, record_checksum
from headwise.memory.storage import Storage, _sql_errors, write_rows, write_transaction


class RecordUpdates:
    """The update methods of VectorMemory (they use its storage, index, lock, caches and metrics)."""

    # Provided by VectorMemory and SearchPasses (declared here, not stubbed: a stub would shadow them).
    _db: Storage
    _index: Any
    _lock: Any
    metrics: Any
    _require_writer: Callable[[str], None]
    _check_vectors: Callable[[Any, str], np.ndarray]
    _contents_changed: Callable[[], None]
    _compact_if_needed: Callable[[], None]

    def upsert(
        self,
        vectors: Any,
        ids: Any,
        metadata: Sequence[Any] | None = None,
        texts: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """Insert or replace the records of ``ids`` (n,) with ``vectors`` (n, d), ``metadata`` and ``texts``.

        One transaction (all old or all new after a crash); returns the ids (n,) int64. ``ids``
        are required and unique within the call; ``metadata`` / ``texts`` as in ``add`` (None:
        no metadata / text, also for a replaced record). HeadwiseError, nothing written, on bad input.
        """
        self._require_writer("upsert")
        with self._lock:
            start = time.perf_counter()
            x = self._check_vectors(vectors, "vectors")
            n = len(x)
            if ids is None:
                raise bad_argument("ids", f"{n} ids (upsert needs ids; add() picks new ones)", None)
            id_arr = ids_for_rows(ids, n)
            meta = check_metadata(metadata, n)
            txt = check_texts(texts, n)
            if n:
                new_seqs, old_seqs = upsert_rows(self._db, id_arr, x, meta, txt)
                self._index.remove_seqs(old_seqs)
                self._index.add(new_seqs, id_arr, x)
                self._contents_changed()
                self._compact_if_needed()
            self.metrics.record("upsert", time.perf_counter() - start, n)
            return id_arr

    def update_metadata(self, ids: Any, metadata: Sequence[Any], *, merge: bool = False) -> None:
        """Set the metadata of stored ``ids`` (n,) to ``metadata`` (n JSON values), in one transaction.

        ``merge=True``: each new value must be a dict and updates the keys of the stored dict
        (a record without metadata starts from {}). Vectors, texts and the index are unchanged.
        HeadwiseError, nothing written, when an id is absent or repeated, or on bad metadata.
        """
        self._require_writer("update_metadata")
        id_arr = as_ids(ids, "ids")
        n = len(id_arr)
        meta = check_metadata(metadata, n)
        if not isinstance(merge, bool):
            raise bad_argument("merge", "a bool", repr(merge))
        if merge:
            bad = [i for i, m in enumerate(metadata) if not isinstance(m, dict)]
            if bad:
                raise bad_argument(f"metadata[{bad[0]}]", "a dict (merge=True updates keys)", repr(metadata[bad[0]]))
        uniq, counts = np.unique(id_arr, return_counts=True)
        if (counts > 1).any():
            raise bad_argument("ids", "unique ids", f"duplicates within the call: {uniq[counts > 1][:10].tolist()}")
        with self._lock:
            if n:
                update_metadata_rows(self._db, id_arr, meta, merge)
                self._contents_changed()

    def index_field(self, name: str) -> bool:
        """Index metadata field ``name`` (e.g. "lang" or "source.kind") for filters; False if already indexed.

        The index lives in the store's SQLite file (readers use it too) and costs every later
        write of a record one index entry.
        """
        self._require_writer("index_field")
        with self._lock:
            return create_field_index(self._db, name)

    def indexed_fields(self) -> list[str]:
        """The metadata fields indexed with :meth:`index_field`, sorted."""
        with self._lock:
            return field_indexes(self._db)


def _select_by_ids(conn: Any, columns: str, ids: np.ndarray) -> list[tuple[Any, ...]]:
    arg = json.dumps([int(i) for i in ids])
    sql = f"SELECT {columns} FROM records WHERE id IN (SELECT value FROM json_each(?))"
    return conn.execute(sql, (arg,)).fetchall()


@_sql_errors
def upsert_rows(
    db: Storage, ids: np.ndarray, vectors: np.ndarray, metadata: Sequence[str | None], texts: Sequence[str | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Replace or insert validated records in one transaction: (new seqs (n,), replaced seqs (m,)) int64."""
    with write_transaction(db.conn) as conn:
        old = np.asarray([r[0] for r in _select_by_ids(conn, "seq", ids)], dtype=np.int64)
        if len(old):
            conn.execute("DELETE FROM records WHERE id IN (SELECT value FROM json_each(?))",
                         (json.dumps([int(i) for i in ids]),))  # fmt: skip
        seqs = write_rows(conn, ids, vectors, metadata, texts)
    return seqs, old


@_sql_errors
def update_metadata_rows(db: Storage, ids: np.ndarray, metadata: Sequence[str | None], merge: bool) -> None:
    """Write new metadata (JSON text) and checksums for stored ``ids`` in one transaction.

    Each stored row is checked against its old checksum first: a corrupted record is refused
    (HeadwiseError naming it), not given a fresh checksum over its damaged bytes.
    """
    with write_transaction(db.conn) as conn:
        rows = {r[0]: r for r in _select_by_ids(conn, "id, vector, metadata, text, checksum", ids)}
        missing = [int(i) for i in ids if int(i) not in rows]
        if missing:
            raise HeadwiseError(f"ids: expected stored ids, got {len(missing)} absent: {missing[:10]}")
        updates = []
        for rid, new in zip(ids.tolist(), metadata):
            _, vector, old, text, checksum = rows[rid]
            check_row(db._where, rid, vector, old, text, checksum)
            if merge:
                base = json.loads(old) if old is not None else {}
                if not isinstance(base, dict):
                    raise bad_argument(f"metadata of id {rid}", "a stored dict to merge into (or none)",
                                       type(base).__name__)  # fmt: skip
                new = json.dumps({**base, **json.loads(new)}, allow_nan=False)
            updates.append((new, record_checksum(vector, new, text), rid))
        conn.executemany("UPDATE records SET metadata = ?, checksum = ? WHERE id = ?", updates)
