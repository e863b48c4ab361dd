"""Retrieval datasets on real text: WordNet W1 and Debian package descriptions.

A :class:`RetrievalDataset` is a corpus of documents, a list of queries and, per query, the
relevant documents with graded relevance (``{doc index: grade}``), split into train /
validation / test query sets by a fixed seed. Embeddings come from MiniLM and are cached as
``.npy`` files keyed by a hash of the texts, so a corpus is encoded once per machine.

- **WordNet W1** (``wordnet-base``): query = the first example sentence of a synset;
  corpus = every synset's ``"lemmas: definition"`` (117,659 documents); one relevant document.
- **Debian** (a committed sample, ``data/debian/descriptions.jsonl.gz``): query = a package
  synopsis; corpus = the long descriptions of the sample; relevance 2 for the package's own
  description and 1 for other binaries built from the same source package.

Shapes: corpus embeddings (N, 384), query embeddings (Q, 384), float32, L2-normalised.

Example:
    >>> ds = RetrievalDataset(
    ...     name="toy", documents=["a: first", "b: second", "c: third"],
    ...     queries=["q one", "q two", "q three"], relevant=[{0: 1}, {1: 1}, {2: 2, 0: 1}],
    ...     split=split_indices(3, seed=0, test=1, validation=1))
    >>> len(ds), len(ds.split["test"]), ds.subset("test").relevant[0] in ds.relevant
    (3, 1, True)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from headwise.errors import HeadwiseError, bad_argument

CACHE_DIR = Path(os.environ.get("HEADWISE_CACHE", Path(__file__).resolve().parents[3] / ".headwise-cache"))
DEBIAN_SAMPLE = Path(__file__).resolve().parents[3] / "data" / "debian" / "descriptions.jsonl.gz"
SPLIT_SEED = 20240505
SPLITS = ("train", "validation", "test")
ENCODE_BATCH = 128  # texts per MiniLM forward when embedding a corpus (a Ray block holds a multiple of it)


class TextEngine(Protocol):
    """Embeds texts somewhere else than in this process (``headwise.engines.ray_data.RayEngine``)."""

    def embed(self, texts: list[str], *, progress: bool, description: str) -> np.ndarray: ...


def split_indices(n: int, *, seed: int = SPLIT_SEED, test: int = 5000, validation: int = 2000) -> dict[str, np.ndarray]:
    """A fixed random split of ``range(n)`` into disjoint train / validation / test index arrays (sorted)."""
    if test < 0 or validation < 0 or test + validation > n:
        raise bad_argument("test + validation", f"non-negative sizes summing to at most n={n}", test + validation)
    perm = np.random.default_rng(seed).permutation(n)
    return {
        "test": np.sort(perm[:test]),
        "validation": np.sort(perm[test : test + validation]),
        "train": np.sort(perm[test + validation :]),
    }


@dataclass
class RetrievalDataset:
    """Documents, queries, graded relevance per query, and a split of the query indices."""

    name: str
    documents: list[str]
    queries: list[str]
    relevant: list[dict[int, int]]
    split: dict[str, np.ndarray]
    doc_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.queries) != len(self.relevant):
            raise bad_argument("relevant", f"one dict per query ({len(self.queries)})", len(self.relevant))
        n_docs = len(self.documents)
        for i, rel in enumerate(self.relevant):
            if not rel or any(not 0 <= d < n_docs or g <= 0 for d, g in rel.items()):
                raise bad_argument(f"relevant[{i}]", f"doc indices in [0, {n_docs}) with grades > 0", rel)

    def __len__(self) -> int:
        return len(self.queries)

    def subset(self, part: str) -> QuerySet:
        """The queries of one split ("train", "validation" or "test")."""
        if part not in self.split:
            raise bad_argument("part", f"one of {sorted(self.split)}", repr(part))
        idx = self.split[part]
        return QuerySet(idx, [self.queries[i] for i in idx], [self.relevant[i] for i in idx])

    def fingerprint(self) -> str:
        """A short hash of the content (documents, queries, labels, split): names a cache or a result."""
        h = hashlib.sha256()
        for text in (*self.documents, "\x00", *self.queries):
            h.update(text.encode())
            h.update(b"\x00")
        h.update(json.dumps([sorted(r.items()) for r in self.relevant]).encode())
        for part in SPLITS:
            h.update(np.asarray(self.split.get(part, []), dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


@dataclass
class QuerySet:
    """Query indices into the dataset, their texts and their relevance dicts."""

    index: np.ndarray
    queries: list[str]
    relevant: list[dict[int, int]]


def wordnet_w1(
    directory: Path | str | None = None,
    *,
    limit: int | None = None,
    seed: int = SPLIT_SEED,
    test: int = 5000,
    validation: int = 2000,
) -> RetrievalDataset:
    """WordNet W1: first example sentence -> ``"lemmas: definition"`` over all synsets.

    ``limit`` keeps the first ``limit`` synsets of each part of speech (a real, small slice for
    tests); the split sizes are then capped at a fifth of the queries each.
    """
    from headwise.data.wordnet import iter_synsets, wordnet_available

    if not wordnet_available(directory):
        raise HeadwiseError("WordNet: expected the Debian package wordnet-base, got no data.* files")
    if limit is None:
        synsets = list(iter_synsets(directory))
    else:
        synsets = [s for pos in "nvar" for s, _ in zip(iter_synsets(directory, pos), range(limit))]
    queries, relevant = [], []
    for i, s in enumerate(synsets):
        if s.examples:
            queries.append(s.examples[0])
            relevant.append({i: 1})
    n = len(queries)
    if limit is not None:
        test, validation = min(test, n // 5), min(validation, n // 5)
    return RetrievalDataset(
        name="wordnet" if limit is None else f"wordnet-{limit}",
        documents=[s.document for s in synsets],
        queries=queries,
        relevant=relevant,
        split=split_indices(n, seed=seed, test=test, validation=validation),
        doc_ids=[s.key for s in synsets],
    )


def embed(
    texts: Sequence[str],
    *,
    cache: bool = True,
    progress: bool = True,
    description: str = "encoding",
    engine: TextEngine | None = None,
) -> np.ndarray:
    """MiniLM embeddings (N, 384) float32 of ``texts``, cached under ``CACHE_DIR/embeddings``.

    The cache key hashes the model directory name, the max length and every text, so a changed
    corpus never reads stale vectors. Writes go to a temporary file renamed into place.
    ``engine`` computes a cache miss elsewhere (``headwise.engines.ray_data.RayEngine``: Ray
    Data workers); None encodes in this process. Both run :func:`headwise.pretrained.encode`
    on the same length-sorted batches, so the vectors agree to float rounding.
    """
    from headwise.pretrained import encode, load_minilm, minilm_path

    h = hashlib.sha256(f"{minilm_path().name}|128|{len(texts)}".encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    path = CACHE_DIR / "embeddings" / f"{h.hexdigest()[:24]}.npy"
    if cache and path.is_file():
        arr = np.load(path, allow_pickle=False)
        if arr.shape == (len(texts), 384):
            return arr
    if engine is not None:
        arr = engine.embed(list(texts), progress=progress, description=description)
    else:
        tokenizer, model = load_minilm()
        arr = encode(list(texts), tokenizer, model, batch_size=ENCODE_BATCH, progress=progress, description=description)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, path)
    return arr


def embed_dataset(
    ds: RetrievalDataset, *, progress: bool = True, engine: TextEngine | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(document embeddings (N, 384), query embeddings (Q, 384)) of a dataset, cached (see :func:`embed`)."""
    docs = embed(ds.documents, progress=progress, description=f"{ds.name}: documents", engine=engine)
    queries = embed(ds.queries, progress=progress, description=f"{ds.name}: queries", engine=engine)
    return docs, queries


# ---------------------------------------------------------------------------------------
# Debian package descriptions


def _apt_stanzas(text: str) -> list[dict[str, str]]:
    """Split a deb822 text (Packages, Translation-en) into field dicts; continuation lines join with \\n."""
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur, last = {}, ""
        elif line[0] in " \t" and last:
            cur[last] += "\n" + line[1:]
        else:
            name, _, value = line.partition(":")
            last = name
            cur[name] = value.strip()
    if cur:
        out.append(cur)
    return out


def _long_description(body: str) -> str:
    """The long description of a ``Description-en`` field: lines joined, ``.`` paragraph marks removed."""
    lines = [ln.strip() for ln in body.split("\n")[1:]]
    return " ".join(ln for ln in lines if ln and ln != ".")


def read_debian_descriptions() -> list[dict[str, str]]:
    """Every package with an English long description in the apt lists: package, source, synopsis, description.

    Needs ``apt-get update -o Acquire::Languages=en`` (Translation-en) and reads ``Source:`` from
    ``apt-cache dumpavail`` (a binary without one is built from the source of the same name).
    """
    import glob
    import subprocess

    files = sorted(glob.glob("/var/lib/apt/lists/*Translation-en*"))
    if not files:
        raise HeadwiseError(
            "apt lists: expected Translation-en files (run: apt-get update -o Acquire::Languages=en), got none"
        )
    sources: dict[str, str] = {}
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    for st in _apt_stanzas(dump):
        if "Package" in st:
            sources[st["Package"]] = st.get("Source", st["Package"]).split()[0]
    seen: dict[str, dict[str, str]] = {}
    for f in files:
        text = subprocess.run(
            ["/usr/lib/apt/apt-helper", "cat-file", f], capture_output=True, text=True, check=True
        ).stdout
        for st in _apt_stanzas(text):
            pkg, body = st.get("Package"), st.get("Description-en")
            if not pkg or not body or pkg not in sources:
                continue
            seen[pkg] = {
                "package": pkg,
                "source": sources[pkg],
                "synopsis": body.split("\n")[0].strip(),
                "description": _long_description(body),
            }
    return [seen[p] for p in sorted(seen)]


def build_debian_sample(
    out: Path | str = DEBIAN_SAMPLE, *, size: int = 10_000, seed: int = SPLIT_SEED, min_words: int = 15
) -> int:
    """Write a fixed sample of Debian descriptions to gzipped JSONL (run once, then commit the file).

    Whole source packages are drawn at random until ``size`` entries are reached, so that the
    other binaries of a source (relevance 1) are in the corpus too. Descriptions shorter than
    ``min_words`` and exact duplicates of a description already taken are dropped: with two
    identical documents the grade 2 vs 1 would be a coin toss. Returns the number written.
    """
    entries = [e for e in read_debian_descriptions() if len(e["description"].split()) >= min_words]
    by_source: dict[str, list[dict[str, str]]] = {}
    for e in entries:
        by_source.setdefault(e["source"], []).append(e)
    order = np.random.default_rng(seed).permutation(sorted(by_source))
    taken: list[dict[str, str]] = []
    texts: set[str] = set()
    for src in order:
        for e in by_source[str(src)]:
            if e["description"] not in texts and e["synopsis"]:
                texts.add(e["description"])
                taken.append(e)
        if len(taken) >= size:
            break
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # mtime=0 keeps the gzip bytes identical across rebuilds of the same sample.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for e in sorted(taken, key=lambda e: e["package"]):
            gz.write((json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n").encode())
    os.replace(tmp, out)
    return len(taken)


def debian(
    path: Path | str = DEBIAN_SAMPLE, *, seed: int = SPLIT_SEED, test: int = 2000, validation: int = 1000
) -> RetrievalDataset:
    """Debian: synopsis -> long description, graded 2 (own package) / 1 (same source package).

    Reads the committed sample (see :func:`build_debian_sample`), never the live apt lists.
    """
    path = Path(path)
    if not path.is_file():
        raise bad_argument("path", "a JSONL or JSONL.gz file of Debian sample rows (data/debian/descriptions.jsonl.gz)",
                           str(path))  # fmt: skip
    opener = gzip.open if path.suffix == ".gz" else open  # JSONL, gzipped or not
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    except (OSError, UnicodeDecodeError, EOFError, json.JSONDecodeError) as exc:
        raise bad_argument("path", "a JSONL(.gz) file of Debian sample rows", f"{path}: {exc}") from None
    for i, r in enumerate(rows):
        if not {"package", "source", "synopsis", "description"} <= r.keys():
            raise bad_argument(f"{path.name} line {i + 1}", "fields package, source, synopsis, description", sorted(r))
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_source.setdefault(r["source"], []).append(i)
    relevant = [{j: (2 if j == i else 1) for j in by_source[r["source"]]} for i, r in enumerate(rows)]
    n = len(rows)
    test, validation = min(test, n // 5), min(validation, n // 5)
    return RetrievalDataset(
        name="debian",
        documents=[r["description"] for r in rows],
        queries=[r["synopsis"] for r in rows],
        relevant=relevant,
        split=split_indices(n, seed=seed, test=test, validation=validation),
        doc_ids=[r["package"] for r in rows],
    )


def load_dataset(name: str, *, limit: int | None = None) -> RetrievalDataset:
    """``"wordnet"``, ``"debian"`` or a path to a JSONL(.gz) file in the Debian sample's format."""
    if name == "wordnet":
        return wordnet_w1(limit=limit)
    if name == "debian":
        return debian()
    if Path(name).is_file():
        return debian(name)
    raise bad_argument("dataset", "'wordnet', 'debian' or an existing JSONL(.gz) file", repr(name))
