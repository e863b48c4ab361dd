"""Query sets from other sources against a built corpus: transfer evaluation.

An enhancer trained on one style of query (a WordNet example sentence) is only useful if it
does no harm on queries written differently. This module reads query files in JSONL and
builds two transfer query sets for the WordNet corpus from dictionaries written
independently of WordNet (Debian packages, read with :mod:`headwise.data.dictd`):

- ``foldoc``: the Free On-line Dictionary of Computing (``dict-foldoc``): the opening of a
  technical definition;
- ``devil``: Ambrose Bierce's "The Devil's Dictionary" (1911, ``dict-devil``): the opening
  of a satirical definition.

A query is the first sentences of the entry's definition (at most ~300 characters) with the
headword itself removed, so that the query describes the concept without naming it; its
relevant documents are every WordNet synset that has the headword as a lemma (any part of
speech, case-insensitive), grade 1. Headwords with more than ``max_senses`` synsets are
left out (recall@10 could not reach 1 for them).

A query file holds one JSON object per line: ``{"query": str, "relevant": [doc id, ...] or
{doc id: grade}}``; other fields are kept but not used. Doc ids are the corpus's own ids
(``RetrievalDataset.doc_ids``: WordNet synset keys such as ``n02084071``, Debian package
names).

Example:
    >>> definition_opening("A period of twenty-four hours, mostly misspent.  This period is long.", 40)
    'A period of twenty-four hours, mostly misspent.'
    >>> without_headword("The day proper and the days after.", "day")
    'The proper and the after.'
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headwise.errors import HeadwiseError, bad_argument

TRANSFER_DIR = Path(__file__).resolve().parents[3] / "data" / "transfer"
SOURCES = ("foldoc", "devil")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


@dataclass
class QueryFile:
    """Queries read from a file, their relevance as corpus indices, and where they came from."""

    name: str
    queries: list[str]
    relevant: list[dict[int, int]]
    path: str
    splits: list[str | None] = field(default_factory=list)  # each line's "split" field, if any


def definition_opening(text: str, min_chars: int = 60, max_chars: int = 300) -> str:
    """Whole sentences from the start of ``text`` until ``min_chars`` is reached (at most ``max_chars``)."""
    text = " ".join(text.split())
    out = ""
    for sentence in _SENTENCE_END.split(text):
        if out and len(out) + 1 + len(sentence) > max_chars:
            break
        out = f"{out} {sentence}".strip()
        if len(out) >= min_chars:
            break
    return out[:max_chars].strip()


def without_headword(text: str, headword: str) -> str:
    """``text`` with the headword (and its plural with -s / -es) removed as whole words."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(headword)}(?:e?s)?(?![\w-])", re.IGNORECASE)
    text = re.sub(r"\(\s*[,;:]?\s*\)", " ", pattern.sub(" ", text))  # "(CISC)" leaves "( )"
    return " ".join(text.split()).replace(" .", ".").replace(" ,", ",").replace(",.", ".")


def _foldoc_definition(text: str) -> str:
    """The first paragraph of a FOLDOC body: tags, pronunciations, links and dates cleaned."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) < 2:
        return ""
    body = paragraphs[1]  # paragraph 0 is the headword and its alternative spellings
    # A leading sense number "1.", <category, category> tags and a /pronunciation/, in any order.
    body = re.sub(r"^(\s*(\d+\.|<[^>]*>|/[^/\n]+/,?))+\s*", "", body)
    body = re.sub(r"\{([^}]*)\}", r"\1", body)  # {link} -> link
    body = re.sub(r"\[[^\]]*\]|\(\d{4}-\d{2}-\d{2}\)", "", body)  # [source], (date)
    return " ".join(body.split())


def _devil_definition(text: str) -> str:
    """The first paragraph of a Devil's Dictionary entry, its "WORD, n." header removed (verse kept)."""
    match = re.match(r"\s*[^,\n]+,\s*(?:[a-z]+\.\s*)+", text)
    if not match:
        return ""
    first = re.split(r"\n\s*\n", text[match.end() :].strip(), maxsplit=1)[0]
    return " ".join(first.split())


_PARSERS = {"foldoc": _foldoc_definition, "devil": _devil_definition}


def build_transfer_set(
    source: str, synsets: Sequence, *, limit: int = 3000, max_senses: int = 10, seed: int = 0
) -> list[dict]:
    """Query rows for the WordNet corpus from the dictd database ``source`` (see the module docstring).

    ``synsets``: :class:`headwise.data.wordnet.Synset` objects of the corpus. At most
    ``limit`` rows, sampled with ``seed``, one per headword, sorted by headword.
    """
    from headwise.data.dictd import read_dictd

    if source not in _PARSERS:
        raise bad_argument("source", f"one of {SOURCES}", repr(source))
    lemma_keys: dict[str, list[str]] = {}
    for s in synsets:
        for lemma in dict.fromkeys(lemma.lower() for lemma in s.lemmas):
            lemma_keys.setdefault(lemma, []).append(s.key)
    rows: dict[str, dict] = {}
    for entry in read_dictd(source):
        headword = " ".join(entry.headword.lower().split())
        keys = lemma_keys.get(headword)
        if headword in rows or not keys or len(keys) > max_senses or len(headword) < 2:
            continue
        query = without_headword(definition_opening(_PARSERS[source](entry.text)), headword)
        if len(query.split()) < 4:
            continue
        rows[headword] = {"query": query, "relevant": keys, "headword": headword, "source": source}
    chosen = sorted(rows)
    if len(chosen) > limit:
        pick = np.random.default_rng(seed).choice(len(chosen), size=limit, replace=False)
        chosen = [chosen[i] for i in sorted(pick)]
    return [rows[h] for h in chosen]


def write_query_file(path: Path | str, rows: Sequence[dict]) -> str:
    """Write rows as JSONL (gzipped when the name ends in .gz, with mtime 0: identical bytes
    for identical rows) atomically. Returns the SHA-256 of the bytes written."""
    path = Path(path)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    if path.suffix == ".gz":
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
            gz.write(text)
        text = buf.getvalue()
    from headwise.fileio import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return hashlib.sha256(text).hexdigest()


def jsonl_rows(path: Path | str, what: str):
    """(line number, parsed object) of each non-blank line of a JSONL(.gz) file, or of each row of a Parquet file.

    A missing or unreadable file is a HeadwiseError naming ``what`` (the option it came
    from); a line that is not a JSON object is one naming the file and line. A ``.parquet``
    file (needs pyarrow: ``pip install 'headwise[parquet]'``) yields its rows as dicts, numbered
    from 1 like lines; a column holding JSON text (metadata, relevance) is decoded by the reader.
    """
    path = Path(path)
    if not path.is_file():
        raise bad_argument(what, "an existing JSONL, JSONL.gz or Parquet file", str(path))
    if path.suffix == ".parquet":
        yield from enumerate(_parquet_rows(path, what), 1)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    got = f"invalid JSON ({exc.msg})"
                    raise bad_argument(f"{path.name} line {number}", "a JSON object", got) from None
                if not isinstance(row, dict):
                    raise bad_argument(f"{path.name} line {number}", "a JSON object", type(row).__name__)
                yield number, row
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise bad_argument(what, "a readable UTF-8 JSONL file, optionally gzipped", f"{path}: {exc}") from None


def read_parquet(path: Path, what: str) -> Any:
    """The pyarrow Table of a Parquet file; a HeadwiseError naming ``what`` without pyarrow or on a bad file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise bad_argument(what, "pyarrow installed to read Parquet (pip install 'headwise[parquet]')",
                           str(path)) from None  # fmt: skip
    try:
        return pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise bad_argument(what, "a readable Parquet file", f"{path}: {exc}") from None


def _parquet_rows(path: Path, what: str) -> list[dict]:
    return read_parquet(path, what).to_pylist()


def json_field(value: Any) -> Any:
    """A field as given, or decoded when it is JSON text of an object or a list (Parquet columns of JSON)."""
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_query_file(path: Path | str, doc_ids: Sequence[str], *, name: str | None = None) -> QueryFile:
    """Queries and relevance (as indices into ``doc_ids``) from a JSONL(.gz) query file.

    Every line must be an object with a non-empty ``query`` string and ``relevant``: a
    non-empty list of doc ids (grade 1 each) or an object {doc id: grade > 0}; an optional
    ``split`` field is kept as given. An unknown doc id, a malformed line or an empty file
    is a :class:`HeadwiseError` naming the line.
    """
    path = Path(path)
    index = {d: i for i, d in enumerate(doc_ids)}
    queries, relevant, splits = [], [], []
    for number, row in jsonl_rows(path, "--queries"):
        where = f"{path.name} line {number}"
        queries.append(_query_text(row, where))
        relevant.append(_relevance(row, where, index))
        splits.append(row.get("split"))
    if not queries:
        raise bad_argument("--queries", "at least one query", f"none in {path}")
    return QueryFile(name or path.name.split(".")[0], queries, relevant, str(path), splits)


def _query_text(row: dict, where: str) -> str:
    text = row.get("query")
    if not isinstance(text, str) or not text.strip():
        raise bad_argument(f"{where}: query", "a non-empty string", repr(text))
    return text


def _relevance(row: dict, where: str, index: dict[str, int]) -> dict[int, int]:
    rel = json_field(row.get("relevant"))
    if isinstance(rel, list):
        rel = {str(d): 1 for d in rel}
    if not isinstance(rel, dict) or not rel:
        raise bad_argument(f"{where}: relevant", "a non-empty list of doc ids or {doc id: grade}", repr(rel))
    out = {}
    for doc, grade in rel.items():
        if str(doc) not in index:
            raise bad_argument(f"{where}: relevant", "doc ids of the corpus", repr(doc))
        if isinstance(grade, bool) or not isinstance(grade, int | float) or grade <= 0:
            raise bad_argument(f"{where}: relevant[{doc!r}]", "a grade > 0", repr(grade))
        out[index[str(doc)]] = grade
    return out


def transfer_files(directory: Path | str = TRANSFER_DIR) -> list[Path]:
    """The committed transfer query files for WordNet (``wordnet-SOURCE.jsonl.gz``)."""
    found = [Path(directory) / f"wordnet-{s}.jsonl.gz" for s in SOURCES]
    missing = [p.name for p in found if not p.is_file()]
    if missing:
        raise HeadwiseError(f"transfer query files: expected {missing} in {directory}, got none")
    return found
