"""One writer per store directory: an exclusive OS file lock, as SQLite and LMDB do it.

A writable :class:`~headwise.memory.store.VectorMemory` holds ``flock(LOCK_EX)`` on
``DIR/writer.lock`` from ``open`` (or creation) until ``close``; a second writer, in another
process or in the same one, waits up to ``lock_timeout`` seconds and then gets a
:class:`HeadwiseError` saying who holds it. Readers (``read_only=True``) take no lock: they
read SQLite snapshots and never delete a file. The OS drops the lock when its holder dies
(even by SIGKILL), so a crashed writer never leaves a store locked.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> lock = WriterLock(d, timeout=0)
    >>> try:
    ...     WriterLock(d, timeout=0)
    ... except HeadwiseError as exc:
    ...     "locked by another writer" in str(exc)
    True
    >>> lock.release()
    >>> WriterLock(d, timeout=0).release()
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from headwise.errors import HeadwiseError

LOCK_FILE = "writer.lock"


class WriterLock:
    """The exclusive writer lock of ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path, *, timeout: float = 5.0, poll: float = 0.02) -> None:
        self.path = Path(directory) / LOCK_FILE
        # Opened without truncation: the holder's pid stays readable for the error message.
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self._holder()
                    os.close(self._fd)
                    self._fd = None
                    raise HeadwiseError(
                        f"path {directory}: expected no other writer, got a store locked by another writer "
                        f"({holder}) after waiting {timeout:g} s; open it with read_only=True to read, or "
                        "retry with a longer lock_timeout"
                    ) from None
                time.sleep(poll)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def _holder(self) -> str:
        try:
            pid = os.pread(self._fd, 32, 0).decode().strip()
        except (OSError, UnicodeDecodeError):
            pid = ""
        return f"pid {pid}" if pid.isdigit() else "pid unknown"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # still held: no pid names a writer that is gone
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class SharedLock:
    """Many readers or one writer, between the threads of one process (a store's searches and writes).

    ``with lock:`` takes it exclusively, re-entrant for the thread that holds it (writes call
    one another); ``with lock.shared():`` takes it shared (searches run side by side), also
    re-entrant, and inside the exclusive hold of the same thread. A waiting writer stops new
    readers, so a stream of searches cannot starve a write. Taking it exclusively while holding
    it shared would wait for ever: it raises RuntimeError instead.

    Example:
        >>> lock = SharedLock()
        >>> with lock.shared(), lock.shared():
        ...     lock.readers
        1
        >>> with lock, lock.shared():
        ...     lock.readers
        0
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._writer: int | None = None
        self._depth = 0  # the writer's re-entries
        self._waiting_writers = 0
        self.readers = 0  # threads holding it shared
        self._mine = threading.local()  # this thread's shared depth

    def __enter__(self) -> SharedLock:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
                return self
            if getattr(self._mine, "depth", 0):
                raise RuntimeError("SharedLock: taken exclusively by a thread that holds it shared")
            self._waiting_writers += 1
            try:
                while self._writer is not None or self.readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer, self._depth = me, 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._writer = None
                self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock shared for the ``with`` block (no-op inside this thread's own hold)."""
        me = threading.get_ident()
        depth = getattr(self._mine, "depth", 0)
        if depth or self._writer == me:
            self._mine.depth = depth + 1
            try:
                yield
            finally:
                self._mine.depth = depth
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self.readers += 1
        self._mine.depth = 1
        try:
            yield
        finally:
            self._mine.depth = 0
            with self._cond:
                self.readers -= 1
                if not self.readers:
                    self._cond.notify_all()
