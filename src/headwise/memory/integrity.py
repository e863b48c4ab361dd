"""Record checksums and ``verify()``: silent corruption of a store is found, never served.

Every record carries a 64-bit BLAKE2b checksum over its vector bytes, metadata (JSON text)
and text, written in the same transaction as the record (schema version 2; a version-1 store
gets its checksums when a writer opens it). Each read of a record checks it, and a mismatch
is a :class:`HeadwiseError` naming the database and the id. :func:`verify_store` scans
everything: SQLite's own ``integrity_check``, every record's checksum, and the faiss index
against SQLite (the same live records, the same vectors: bit for bit for "flat" and "hnsw",
within half precision for "hnsw-fp16").

Shapes: a vector is (d,) float32 bytes.

Example:
    >>> import numpy as np
    >>> v = np.ones(2, dtype=np.float32).tobytes()
    >>> a, b = record_checksum(v, None, "t"), record_checksum(v, "t", None)
    >>> a == record_checksum(v, None, "t"), a == b
    (True, False)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from headwise.errors import HeadwiseError


def _field(value: str | None) -> bytes:
    # A marker byte separates None from "" and keeps field boundaries unambiguous.
    return b"\x00" if value is None else b"\x01" + value.encode("utf-8") + b"\x00"


def record_checksum(vector: bytes, metadata: str | None, text: str | None) -> int:
    """Signed 64-bit checksum (SQLite INTEGER) of one record's stored bytes."""
    h = hashlib.blake2b(digest_size=8)
    h.update(len(vector).to_bytes(8, "little"))
    h.update(vector)
    h.update(_field(metadata))
    h.update(_field(text))
    return int.from_bytes(h.digest(), "little", signed=True)


def check_row(where: str, rid: int, vector: bytes, metadata: str | None, text: str | None, checksum: Any) -> None:
    """Raise a HeadwiseError when a record's bytes do not match its checksum (None: a version-1 record)."""
    if checksum is not None and record_checksum(vector, metadata, text) != checksum:
        raise HeadwiseError(
            f"database {where}: expected record {rid} to match its checksum, got corrupted bytes "
            "(run verify() or `headwise memory verify` for a full report)"
        )


@dataclass
class VerifyReport:
    """What :func:`verify_store` found; ``ok`` when nothing is wrong."""

    records: int = 0
    unchecked: int = 0  # records without a checksum (a version-1 store opened read-only)
    corrupt: list[int] = field(default_factory=list)  # ids whose bytes do not match their checksum
    sqlite: list[str] = field(default_factory=list)  # PRAGMA integrity_check problems
    index_missing: list[int] = field(default_factory=list)  # ids in SQLite but not live in the index
    index_extra: list[int] = field(default_factory=list)  # ids live in the index but not in SQLite
    index_differs: list[int] = field(default_factory=list)  # ids whose index vector is not the stored one

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.sqlite or self.index_missing or self.index_extra or self.index_differs)


def verify_store(storage: Any, index: Any, batch: int = 4096) -> VerifyReport:
    """Scan ``storage`` (a Storage) and ``index`` (a SlotIndex) completely; see the module docstring."""
    report = VerifyReport(sqlite=storage.integrity_problems())
    if report.sqlite:
        return report  # the pages themselves are damaged: record reads would be meaningless
    stored: dict[int, tuple[int, bytes]] = {}  # seq -> (id, vector bytes)
    for seq, rid, vector, metadata, text, checksum in storage.scan_rows(batch):
        report.records += 1
        if checksum is None:
            report.unchecked += 1
        elif record_checksum(vector, metadata, text) != checksum:
            report.corrupt.append(int(rid))
        stored[int(seq)] = (int(rid), vector)
    live_slots = np.flatnonzero(index._live.view)
    slot_seqs = index.slot_seq[live_slots]
    seen = set()
    for lo in range(0, len(live_slots), batch):
        slots, seqs = live_slots[lo : lo + batch], slot_seqs[lo : lo + batch]
        vectors = index.reconstruct(slots)
        for slot, seq, vec in zip(slots.tolist(), seqs.tolist(), vectors):
            seen.add(seq)
            if seq not in stored:
                report.index_extra.append(int(index._id.view[slot]))
                continue
            rid, blob = stored[seq]
            want = np.frombuffer(blob, dtype=np.float32)
            if index.kind == "hnsw-fp16":  # stored in half precision: equal to about 3 digits
                same = np.allclose(vec, want, rtol=1e-3, atol=1e-3)
            else:
                same = np.array_equal(vec, want)
            if not same:
                report.index_differs.append(rid)
    report.index_missing = sorted(rid for seq, (rid, _) in stored.items() if seq not in seen)
    return report
