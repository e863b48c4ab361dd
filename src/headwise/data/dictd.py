"""Read dictionaries in the dictd format (Debian packages ``dict-foldoc``, ``dict-devil``, ...).

A dictd database is two files under ``/usr/share/dictd``: ``NAME.index``, one line per entry
``headword <TAB> offset <TAB> length`` (numbers in dictd's base 64, most significant digit
first), and ``NAME.dict.dz``, the entries' text compressed with dictzip (a gzip file, so
Python's gzip reads it whole). Entries whose headword starts with ``00-database-`` are the
database's own metadata and are skipped.

Example:
    >>> decode_number("B7"), decode_number("CXm")
    (123, 9702)
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

from headwise.errors import HeadwiseError

DICTD_DIR = Path(os.environ.get("HEADWISE_DICTD_DIR", "/usr/share/dictd"))
_DIGITS = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


@dataclass(frozen=True)
class Entry:
    """One dictionary entry: its headword as indexed and its raw text (headword line included)."""

    headword: str
    text: str


def decode_number(digits: str) -> int:
    """A dictd index number (base 64, alphabet A-Z a-z 0-9 + /) as an int."""
    n = 0
    for c in digits:
        if c not in _DIGITS:
            raise HeadwiseError(f"dictd index: expected base-64 digits, got {digits!r}")
        n = n * 64 + _DIGITS[c]
    return n


def dictd_available(name: str, directory: Path | str | None = None) -> bool:
    d = Path(directory) if directory is not None else DICTD_DIR
    return (d / f"{name}.index").is_file() and (d / f"{name}.dict.dz").is_file()


def read_dictd(name: str, directory: Path | str | None = None) -> list[Entry]:
    """Every entry of the dictd database ``name`` in index order (one per index line).

    A headword indexed several times (FOLDOC lists each alternative spelling) gives one
    entry per line, each with the text it points to.
    """
    d = Path(directory) if directory is not None else DICTD_DIR
    if not dictd_available(name, d):
        raise HeadwiseError(
            f"dictd database {name!r}: expected {d}/{name}.index and {name}.dict.dz "
            f"(Debian package dict-{name}), got none"
        )
    data = gzip.decompress((d / f"{name}.dict.dz").read_bytes())
    entries = []
    for number, line in enumerate((d / f"{name}.index").read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 3:
            raise HeadwiseError(f"{name}.index line {number}: expected headword, offset, length; got {line!r}")
        headword, offset, length = parts[0], decode_number(parts[1]), decode_number(parts[2])
        if headword.startswith("00-database-") or headword.startswith("00database"):
            continue
        if offset + length > len(data):
            raise HeadwiseError(f"{name}.index line {number}: entry ends at {offset + length}, past {len(data)}")
        entries.append(Entry(headword, data[offset : offset + length].decode("utf-8", errors="replace")))
    return entries
