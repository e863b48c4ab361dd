"""A user's own corpus and queries as a :class:`RetrievalDataset`.

Corpus: JSONL or JSONL.gz, one object per line ``{"id": str | int, "text": str, "metadata": {...}?}``
(ids unique, texts non-empty), or Parquet with the same columns (needs pyarrow, the ``parquet``
extra; ``metadata`` a struct column or JSON text). Queries (optional): the query-file format of
:mod:`headwise.memory.transfer`, ``{"query": str, "relevant": [doc id, ...] or {doc id: grade},
"split": "train" | "validation" | "test"?}``, also as Parquet (``relevant`` a list column or
JSON text). Without a ``split`` field on every line, the queries are split at random with
``seed`` into ``validation`` and ``test`` fractions and the rest train; with one, the user's
split is kept as given (all lines must then carry it).

Example:
    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "c.jsonl").write_text("\\n".join(json.dumps({"id": i, "text": f"doc {i}"}) for i in range(10)))
    >>> _ = (d / "q.jsonl").write_text("\\n".join(json.dumps({"query": f"q {i}", "relevant": [i]}) for i in range(10)))
    >>> ds = user_dataset(d / "c.jsonl", d / "q.jsonl", test=0.2, validation=0.2)
    >>> len(ds.documents), {k: len(v) for k, v in ds.split.items()}
    (10, {'test': 2, 'validation': 2, 'train': 6})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from headwise.errors import bad_argument
from headwise.memory.datasets import SPLIT_SEED, SPLITS, RetrievalDataset, split_indices
from headwise.memory.transfer import json_field, jsonl_rows, read_query_file


def read_corpus(path: Path | str) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(ids as strings, texts, metadata dicts) of a corpus file (see the module docstring)."""
    path = Path(path)
    ids, texts, metadata, seen = [], [], [], {}
    for number, row in jsonl_rows(path, "--corpus"):
        where = f"{path.name} line {number}"
        doc_id, text, meta = row.get("id"), row.get("text"), json_field(row.get("metadata") or {})
        if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or str(doc_id) == "":
            raise bad_argument(f"{where}: id", "a non-empty string or an integer", repr(doc_id))
        if not isinstance(text, str) or not text.strip():
            raise bad_argument(f"{where}: text", "a non-empty string", repr(text))
        if not isinstance(meta, dict):
            raise bad_argument(f"{where}: metadata", "an object", type(meta).__name__)
        if str(doc_id) in seen:
            got = f"{doc_id!r} again (first on line {seen[str(doc_id)]})"
            raise bad_argument(f"{where}: id", "ids unique in the corpus", got)
        seen[str(doc_id)] = number
        ids.append(str(doc_id))
        texts.append(text)
        metadata.append(meta)
    if not ids:
        raise bad_argument("--corpus", "at least one document", f"none in {path}")
    return ids, texts, metadata


def user_dataset(
    corpus: Path | str,
    queries: Path | str | None = None,
    *,
    seed: int = SPLIT_SEED,
    test: float = 0.2,
    validation: float = 0.1,
) -> RetrievalDataset:
    """The corpus and its labelled queries as a dataset, split by the file's ``split`` field or at random."""
    if not (0 <= test < 1 and 0 <= validation < 1 and test + validation < 1):
        raise bad_argument("test, validation", "fractions in [0, 1) summing to less than 1", (test, validation))
    ids, texts, _ = read_corpus(corpus)
    name = Path(corpus).name.split(".")[0]
    if queries is None:
        return RetrievalDataset(name, texts, [], [], split_indices(0, test=0, validation=0), ids)
    qf = read_query_file(queries, ids)
    given = qf.splits
    if any(s is not None for s in given):
        bad = [i + 1 for i, s in enumerate(given) if s not in SPLITS]
        if bad:
            where = f"{Path(queries).name} split"
            raise bad_argument(where, f"one of {SPLITS} on every query", f"not on query {bad[0]}")
        split = {p: np.array([i for i, s in enumerate(given) if s == p], dtype=np.int64) for p in SPLITS}
    else:
        n = len(qf.queries)
        split = split_indices(n, seed=seed, test=int(round(n * test)), validation=int(round(n * validation)))
    return RetrievalDataset(name, texts, qf.queries, qf.relevant, split, ids)
