"""SQLite storage of a vector memory: the source of truth for ids, vectors, metadata and texts.

One table holds every live record; a vector is a float32 BLOB written in the same
transaction as its id, metadata (JSON text) and text, so a record is either fully present
or absent. ``seq`` is a counter that is never reused: the faiss index labels its rows by
``seq``, which lets a stale index file be reconciled with the database (see store.py).

Layout (schema version 2)::

    config(key TEXT PRIMARY KEY, value TEXT)          dim, metric, index, hnsw_*, next_id, next_seq
    records(id INTEGER PRIMARY KEY, seq INTEGER UNIQUE, vector BLOB, metadata TEXT, text TEXT, checksum INTEGER)

``checksum`` covers the vector, metadata and text (:mod:`headwise.memory.integrity`) and is
checked on every read of a record. A version-1 database (no checksums) is upgraded in one
transaction when a writer opens it. Every SQLite error surfaces as a HeadwiseError naming the file.

The file carries ``PRAGMA application_id`` so that a database of another program is refused.
Journal mode is WAL with ``synchronous=FULL``: a commit has reached the disk when it returns.

Shapes: n records of dimension d -> vectors (n, d) float32, ids (n,) int64.

Example:
    >>> import numpy as np
    >>> db = Storage.create(None, {"dim": "2", "metric": "l2"})
    >>> db.insert(np.array([7]), np.array([[1.0, 2.0]], dtype=np.float32), [None], ["seven"])  # -> seq numbers
    array([0])
    >>> db.count(), db.fetch_vectors(np.array([7]), 2).tolist(), db.fetch_records(np.array([7, 8]))[1]
    (1, [[1.0, 2.0]], None)
"""

from __future__ import annotations

import functools
import inspect
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from headwise.errors import HeadwiseError
from headwise.memory.integrity import check_row, record_checksum

#: "hwME": marks a SQLite file as a headwise memory (PRAGMA application_id).
APPLICATION_ID = 0x68774D45
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE records (
    id INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    vector BLOB NOT NULL,
    metadata TEXT,
    text TEXT,
    checksum INTEGER
);
"""


def _sql_errors(method: Callable) -> Callable:
    """Surface any SQLite error of a Storage method as a HeadwiseError naming the database file."""

    @functools.wraps(method)
    def run(self: Storage, *args: Any, **kwargs: Any) -> Any:
        try:
            result = method(self, *args, **kwargs)
            if inspect.isgenerator(result):
                return _checked_generator(self, result)
            return result
        except sqlite3.Error as exc:
            raise HeadwiseError(f"database {self._where}: expected a readable, writable SQLite file, got "
                                f"{type(exc).__name__}: {exc}") from exc  # fmt: skip

    return run


def _checked_generator(storage: Storage, gen: Any) -> Any:
    try:
        yield from gen
    except sqlite3.Error as exc:
        raise HeadwiseError(f"database {storage._where}: {type(exc).__name__}: {exc}") from exc


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: one atomic write, rolled back on any exception (re-raised).

    IMMEDIATE takes SQLite's write lock at the start, so a transaction never fails half-way
    for want of it; every write of the store goes through here.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _connect(target: str) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), so a
    # multi-row insert is one atomic commit and nothing is committed behind our back.
    conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
    if target != ":memory:":
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged write survives power loss too.
        conn.execute("PRAGMA synchronous=FULL")
    return conn


class Storage:
    """Records of one memory in a SQLite database (a file, or in memory when ``path`` is None)."""

    def __init__(self, conn: sqlite3.Connection, path: Path | None) -> None:
        self.conn = conn
        self.path = path
        # A schema-1 database opened read-only has no checksum column: its records read unchecked.
        self._checksum = "checksum"

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: Path | None, config: dict[str, str]) -> Storage:
        """A new database with the schema and ``config`` (all in one transaction)."""
        conn = _connect(":memory:" if path is None else str(path))
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        with write_transaction(conn):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            rows = {"next_id": "0", "next_seq": "0", **config}
            conn.executemany("INSERT INTO config(key, value) VALUES (?, ?)", sorted(rows.items()))
        return cls(conn, path)

    @classmethod
    def open(cls, path: Path, *, read_only: bool = False) -> Storage:
        """Open an existing database, refusing files of other programs and damaged files.

        ``read_only``: a connection that cannot write (SQLite ``mode=ro``); see :meth:`begin_snapshot`.
        """
        if not path.is_file():
            raise HeadwiseError(f"database: expected a file at {path}, got none")
        mode = "ro" if read_only else "rw"
        try:
            conn = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, isolation_level=None, check_same_thread=False)
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise HeadwiseError(f"database {path}: expected a headwise memory SQLite file, got {exc}") from exc
        if app_id != APPLICATION_ID:
            conn.close()
            raise HeadwiseError(
                f"database {path}: expected application_id {APPLICATION_ID:#x} (a headwise memory), got {app_id:#x}"
            )
        if version not in (1, SCHEMA_VERSION):
            conn.close()
            raise HeadwiseError(f"database {path}: expected schema version 1 or {SCHEMA_VERSION}, got {version}")
        try:
            if not read_only:  # setting the journal mode is a write; a reader finds WAL already set
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            # quick_check reads every page: a truncated or overwritten file is caught here,
            # not at the first query that happens to touch the damaged page.
            problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise HeadwiseError(f"database {path}: expected an intact SQLite file, got {exc}") from exc
        if problems != ["ok"]:
            conn.close()
            raise HeadwiseError(f"database {path}: expected an intact SQLite file, got {'; '.join(problems[:3])}")
        storage = cls(conn, path)
        if version == 1 and not read_only:
            storage._add_checksums()
        elif version == 1:
            storage._checksum = "NULL"
        return storage

    @_sql_errors
    def _add_checksums(self) -> None:
        """Upgrade schema 1 to 2: a checksum column filled for every record, in one transaction."""
        with write_transaction(self.conn) as conn:
            conn.execute("ALTER TABLE records ADD COLUMN checksum INTEGER")
            rows = conn.execute("SELECT id, vector, metadata, text FROM records").fetchall()
            conn.executemany("UPDATE records SET checksum = ? WHERE id = ?",
                             [(record_checksum(v, m, t), i) for i, v, m, t in rows])  # fmt: skip
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ config
    @_sql_errors
    def config(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM config").fetchall())

    @_sql_errors
    def next_ids(self, n: int) -> np.ndarray:
        """``n`` fresh ids above every id ever used (not reserved: the insert commits them)."""
        start = int(self.config()["next_id"])
        if start + n > 2**63 - 1:  # ids live in [0, 2**63 - 1): see checks.MAX_ID
            raise HeadwiseError(
                f"ids: expected {n} free automatic ids, got {2**63 - 1 - start} left below 2**63 - 1 "
                "(pass explicit ids that are not stored yet)"
            )
        return np.arange(start, start + n, dtype=np.int64)

    # ------------------------------------------------------------------ writes
    @_sql_errors
    def insert(
        self,
        ids: np.ndarray,
        vectors: np.ndarray,
        metadata: Sequence[str | None],
        texts: Sequence[str | None],
    ) -> np.ndarray:
        """Insert validated records in one transaction; returns their ``seq`` numbers (n,) int64.

        ``metadata`` is already JSON text. Raises HeadwiseError (nothing written) when an id exists.
        """
        try:
            with write_transaction(self.conn) as conn:
                return write_rows(conn, ids, vectors, metadata, texts)
        except sqlite3.IntegrityError as exc:  # rolled back by write_transaction
            raise HeadwiseError(f"ids: expected ids not yet in the memory, got a duplicate ({exc})") from exc

    @_sql_errors
    def delete(self, ids: np.ndarray) -> np.ndarray:
        """Delete the records of ``ids`` (absent ids are ignored) in one transaction; returns their seqs."""
        with write_transaction(self.conn) as conn:
            arg = json.dumps([int(i) for i in ids])
            seqs = [
                r[0]
                for r in conn.execute("SELECT seq FROM records WHERE id IN (SELECT value FROM json_each(?))", (arg,))
            ]
            conn.execute("DELETE FROM records WHERE id IN (SELECT value FROM json_each(?))", (arg,))
        return np.asarray(seqs, dtype=np.int64)

    @_sql_errors
    def checkpoint(self) -> None:
        """Copy the WAL into the main file as far as readers allow (keeps the -wal file small).

        PASSIVE: a reader holding a snapshot is never waited for (TRUNCATE would block the
        writer on the busy timeout); SQLite rewinds the WAL once no reader needs it.
        """
        if self.path is not None:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @_sql_errors
    def begin_snapshot(self) -> None:
        """Start a read transaction: every read until :meth:`end_snapshot` sees one committed state (WAL)."""
        self.conn.execute("BEGIN")
        self.conn.execute("SELECT COUNT(*) FROM config").fetchone()  # a read pins the snapshot

    @_sql_errors
    def end_snapshot(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ reads
    @_sql_errors
    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    @_sql_errors
    def existing(self, ids: np.ndarray) -> np.ndarray:
        """The subset of ``ids`` that are stored, (m,) int64."""
        arg = json.dumps([int(i) for i in ids])
        rows = self.conn.execute("SELECT id FROM records WHERE id IN (SELECT value FROM json_each(?))", (arg,))
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    @_sql_errors
    def seq_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(seq, id) of every record, ordered by seq; reads the seq index only, not the vectors."""
        rows = self.conn.execute("SELECT seq, id FROM records ORDER BY seq").fetchall()
        arr = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        return arr[:, 0].copy(), arr[:, 1].copy()

    @_sql_errors
    def vectors_by_seq(self, seqs: np.ndarray | None, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seq (m,), id (m,), vectors (m, dim)) ordered by seq, for ``seqs`` or for every record (checked)."""
        columns = f"seq, id, vector, metadata, text, {self._checksum}"
        if seqs is None:
            rows = self.conn.execute(f"SELECT {columns} FROM records ORDER BY seq").fetchall()
        else:
            arg = json.dumps([int(s) for s in seqs])
            rows = self.conn.execute(
                f"SELECT {columns} FROM records WHERE seq IN (SELECT value FROM json_each(?)) ORDER BY seq", (arg,)
            ).fetchall()
        for r in rows:
            check_row(self._where, r[1], *r[2:])
        return _unpack(rows, dim)

    @_sql_errors
    def scan_rows(self, batch: int = 4096):
        """Every record as (seq, id, vector, metadata, text, checksum), by seq, ``batch`` rows per query."""
        last = -1
        while True:
            rows = self.conn.execute(
                f"SELECT seq, id, vector, metadata, text, {self._checksum} FROM records WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (last, batch),
            ).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    @_sql_errors
    def integrity_problems(self) -> list[str]:
        """SQLite's full ``integrity_check`` (every page and index): [] when the file is sound."""
        problems = [r[0] for r in self.conn.execute("PRAGMA integrity_check").fetchall()]
        return [] if problems == ["ok"] else problems

    @_sql_errors
    def fetch_vectors(self, ids: np.ndarray, dim: int) -> np.ndarray:
        """Vectors (n, d) of ``ids`` in their order; HeadwiseError naming the ids that are absent."""
        found = self._by_id(ids, "vector")
        missing = [int(i) for i in ids if int(i) not in found]
        if missing:
            raise HeadwiseError(f"ids: expected stored ids, got {len(missing)} absent: {missing[:10]}")
        if not len(ids):
            return np.empty((0, dim), dtype=np.float32)
        return np.stack([np.frombuffer(found[int(i)][0], dtype=np.float32) for i in ids])

    @_sql_errors
    def fetch_records(self, ids: np.ndarray) -> list[tuple[np.ndarray, Any, str | None] | None]:
        """(vector, metadata, text) per id, None where absent."""
        found = self._by_id(ids, "vector, metadata, text")
        out: list[tuple[np.ndarray, Any, str | None] | None] = []
        for i in ids:
            row = found.get(int(i))
            if row is None:
                out.append(None)
            else:
                meta = json.loads(row[1]) if row[1] is not None else None
                out.append((np.frombuffer(row[0], dtype=np.float32).copy(), meta, row[2]))
        return out

    @_sql_errors
    def fetch_text_meta(self, ids: np.ndarray) -> dict[int, tuple[Any, str | None]]:
        found = self._by_id(ids, "metadata, text")
        return {i: (json.loads(m) if m is not None else None, t) for i, (m, t) in found.items()}

    def _by_id(self, ids: np.ndarray, columns: str) -> dict[int, tuple[Any, ...]]:
        """id -> the requested ``columns`` of ``ids`` (a subset of "vector, metadata, text"), each row checked."""
        arg = json.dumps(sorted({int(i) for i in ids}))
        rows = self.conn.execute(
            f"SELECT id, vector, metadata, text, {self._checksum} FROM records "
            "WHERE id IN (SELECT value FROM json_each(?))",
            (arg,),
        ).fetchall()
        pick = [("vector", "metadata", "text").index(c.strip()) + 1 for c in columns.split(",")]
        out = {}
        for r in rows:
            check_row(self._where, *r)
            out[r[0]] = tuple(r[p] for p in pick)
        return out

    @property
    def _where(self) -> str:
        return str(self.path) if self.path is not None else ":memory:"

    @_sql_errors
    def size_bytes(self) -> int:
        """Bytes of the database: the files on disk (main + WAL), or the pages of an in-memory one."""
        if self.path is None:
            pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
            return int(pages * self.conn.execute("PRAGMA page_size").fetchone()[0])
        total = 0
        for suffix in ("", "-wal"):
            f = Path(str(self.path) + suffix)
            if f.exists():
                total += f.stat().st_size
        return total


def write_rows(
    conn: sqlite3.Connection,
    ids: np.ndarray,
    vectors: np.ndarray,
    metadata: Sequence[str | None],
    texts: Sequence[str | None],
) -> np.ndarray:
    """Insert records with fresh seqs and checksums, inside the caller's transaction; returns the seqs (n,) int64."""
    n = len(ids)
    cfg = dict(conn.execute("SELECT key, value FROM config WHERE key IN ('next_id', 'next_seq')").fetchall())
    seq0 = int(cfg["next_seq"])
    seqs = np.arange(seq0, seq0 + n, dtype=np.int64)
    blobs = [vectors[j].tobytes() for j in range(n)]
    rows = (
        (int(i), int(s), blobs[j], metadata[j], texts[j], record_checksum(blobs[j], metadata[j], texts[j]))
        for j, (i, s) in enumerate(zip(ids, seqs))
    )
    conn.executemany("INSERT INTO records(id, seq, vector, metadata, text, checksum) VALUES (?, ?, ?, ?, ?, ?)", rows)
    next_id = max(int(cfg["next_id"]), int(ids.max()) + 1) if n else int(cfg["next_id"])
    conn.executemany(
        "UPDATE config SET value = ? WHERE key = ?", [(str(next_id), "next_id"), (str(seq0 + n), "next_seq")]
    )
    return seqs


def _unpack(rows: list[tuple[Any, ...]], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seqs = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    ids = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
    vecs = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
    return seqs, ids, vecs.copy()
