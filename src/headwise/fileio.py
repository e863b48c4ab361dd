"""Atomic, durable file writes: the one way headwise writes a file.

A reader (or a process that starts after a crash) sees the old file or the new one, never
a partial one: the data goes to a temporary file in the same directory, is flushed and
fsynced, and replaces the target with ``os.replace``; the directory is fsynced so the
rename itself survives power loss. Temporary names start with ``.`` and end with ``.tmp``,
so leftovers of a crash are recognisable.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> write_atomic(d / "sub" / "a.json", '{"x": 1}')
    >>> (d / "sub" / "a.json").read_text(), [p.name for p in (d / "sub").iterdir()]
    ('{"x": 1}', ['a.json'])
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path``, creating missing parent directories."""
    with atomic_writer(path) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


@contextmanager
def atomic_writer(path: Path | str) -> Iterator[IO[bytes]]:
    """A binary handle whose content replaces ``path`` (parents created) only when the block completes.

    For writers that stream (a Parquet or JSONL export): the same temporary file, fsync,
    rename and directory fsync as :func:`write_atomic`; an exception leaves ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path | str) -> None:
    """fsync a directory, so that a rename or a new file in it survives power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
