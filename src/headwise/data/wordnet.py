"""Read WordNet 3.0 from the Debian package ``wordnet-base`` (format: wndb(5)).

Each line of ``data.{noun,verb,adj,adv}`` is one synset::

    offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt [ptr...] [frames...] | gloss

The gloss holds the definition followed by quoted example sentences, separated by ``;``.
Lemmas use ``_`` for spaces and adjectives may carry a marker such as ``(a)``; both are
cleaned here. Pointers ``@`` (hypernym) and ``@i`` (instance hypernym) give the hierarchy.

Example:
    >>> from headwise.data.wordnet import parse_data_line
    >>> s = parse_data_line('00002724 29 v 01 choke 0 002 @ 00001740 v 0000 + 14058252 n 0101 01 + 02 00 '
    ...                     '| breathe with great difficulty; "She choked with emotion"  ')
    >>> s.key, s.lemmas, s.definition, s.examples, s.hypernyms
    ('v00002724', ('choke',), 'breathe with great difficulty', ('She choked with emotion',), ('v00001740',))
    >>> s.document
    'choke: breathe with great difficulty'
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from headwise.errors import HeadwiseError

WORDNET_DIR = Path(os.environ.get("HEADWISE_WORDNET_DIR", "/usr/share/wordnet"))
POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
# Adjective satellites ("s") live in data.adj; keys use the file's letter so offsets stay unique.
_POS_LETTER = {"n": "n", "v": "v", "a": "a", "s": "a", "r": "r"}
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")
_QUOTED = re.compile(r'"([^"]*)"')


@dataclass(frozen=True)
class Synset:
    """One WordNet synset.

    ``key`` is ``<pos letter><8-digit offset>`` (unique across the four files); ``hypernyms``
    holds the keys of ``@`` and ``@i`` pointers.
    """

    key: str
    pos: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]
    hypernyms: tuple[str, ...]

    @property
    def document(self) -> str:
        """The retrieval document: ``"lemma, lemma: definition"``."""
        return f"{', '.join(self.lemmas)}: {self.definition}"


def parse_data_line(line: str) -> Synset:
    """Parse one synset line of a ``data.*`` file (see the module docstring)."""
    head, sep, gloss = line.partition("|")
    if not sep:
        raise HeadwiseError(f"line: expected a WordNet synset line with '|', got {line[:60]!r}")
    fields = head.split()
    offset, ss_type = fields[0], fields[2]
    w_cnt = int(fields[3], 16)
    words = fields[4 : 4 + 2 * w_cnt : 2]
    lemmas = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in words)
    pos_at = 4 + 2 * w_cnt
    p_cnt = int(fields[pos_at])
    hypernyms = []
    for i in range(p_cnt):
        symbol, target, target_pos = fields[pos_at + 1 + 4 * i : pos_at + 4 + 4 * i]
        if symbol in ("@", "@i"):
            hypernyms.append(_POS_LETTER[target_pos] + target)
    examples = tuple(e.strip() for e in _QUOTED.findall(gloss) if e.strip())
    definition = _QUOTED.sub("", gloss).strip()
    # What remains is "definition; ; " once examples are removed: drop the empty pieces.
    definition = "; ".join(p.strip() for p in definition.split(";") if p.strip())
    return Synset(_POS_LETTER[ss_type] + offset, ss_type, lemmas, definition, examples, tuple(hypernyms))


def iter_synsets(directory: Path | str | None = None, pos: str = "nvar") -> Iterator[Synset]:
    """Yield every synset of the parts of speech in ``pos`` (letters of ``n v a r``), file order."""
    root = Path(directory) if directory is not None else WORDNET_DIR
    for letter in pos:
        if letter not in POS_FILES:
            raise HeadwiseError(f"pos: expected letters from 'nvar', got {pos!r}")
        path = root / POS_FILES[letter]
        if not path.is_file():
            raise HeadwiseError(
                f"WordNet file: expected {path} (Debian package wordnet-base: apt-get install wordnet-base), "
                "got no such file"
            )
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.startswith("  "):  # license header lines start with two spaces
                    yield parse_data_line(line)


def load_synsets(directory: Path | str | None = None) -> list[Synset]:
    """All 117,659 synsets of WordNet 3.0, nouns, verbs, adjectives and adverbs in file order."""
    return list(iter_synsets(directory))


def wordnet_available(directory: Path | str | None = None) -> bool:
    """True when the four ``data.*`` files are present."""
    root = Path(directory) if directory is not None else WORDNET_DIR
    return all((root / name).is_file() for name in POS_FILES.values())
