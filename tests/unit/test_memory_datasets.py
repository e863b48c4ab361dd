"""Datasets: WordNet W1 and the committed Debian sample parse deterministically into disjoint splits."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from tests.conftest import require_data

from headwise.data.wordnet import wordnet_available
from headwise.errors import HeadwiseError
from headwise.memory.datasets import (
    DEBIAN_SAMPLE,
    RetrievalDataset,
    _apt_stanzas,
    _long_description,
    debian,
    load_dataset,
    split_indices,
    wordnet_w1,
)


def _check_split(ds: RetrievalDataset) -> None:
    parts = [set(ds.split[p].tolist()) for p in ("train", "validation", "test")]
    assert sum(map(len, parts)) == len(ds)
    assert set().union(*parts) == set(range(len(ds)))
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1 :])


def test_split_fixed_and_disjoint():
    a, b = split_indices(1000, seed=5, test=200, validation=100), split_indices(1000, seed=5, test=200, validation=100)
    assert all(np.array_equal(a[p], b[p]) for p in a)
    assert len(a["test"]) == 200 and len(a["validation"]) == 100 and len(a["train"]) == 700
    assert not np.array_equal(a["test"], split_indices(1000, seed=6, test=200, validation=100)["test"])
    with pytest.raises(HeadwiseError, match="test \\+ validation"):
        split_indices(10, test=8, validation=5)


def test_wordnet_slice():
    require_data(wordnet_available(), "WordNet (wordnet-base)")
    ds = wordnet_w1(limit=100)
    assert len(ds.documents) == 400
    assert ds.documents[0].startswith("entity: that which is perceived")
    assert all(len(r) == 1 for r in ds.relevant)
    # The query of synset i is its first example; its one relevant document is its own gloss.
    q0 = next(iter(ds.relevant[0]))
    assert ds.doc_ids[q0].startswith("n")
    _check_split(ds)
    again = wordnet_w1(limit=100)
    assert again.fingerprint() == ds.fingerprint() and again.queries == ds.queries


def test_wordnet_full_split_sizes():
    require_data(wordnet_available(), "WordNet (wordnet-base)")
    ds = wordnet_w1()
    assert len(ds.documents) == 117_659
    assert len(ds.split["test"]) == 5000 and len(ds.split["validation"]) == 2000
    _check_split(ds)
    # Splits are by synset: every query has its own relevant document, none shared.
    docs = [next(iter(r)) for r in ds.relevant]
    assert len(set(docs)) == len(docs)


def test_debian_sample_graded():
    ds = debian()
    assert len(ds) >= 10_000 and len(ds.documents) == len(ds)
    assert len(set(ds.documents)) == len(ds.documents)
    _check_split(ds)
    with gzip.open(DEBIAN_SAMPLE, "rt") as fh:
        rows = [json.loads(line) for line in fh]
    i = next(i for i, r in enumerate(ds.relevant) if len(r) > 1)
    assert ds.relevant[i][i] == 2
    assert all(rows[j]["source"] == rows[i]["source"] for j in ds.relevant[i])
    assert {g for j, g in ds.relevant[i].items() if j != i} == {1}
    assert load_dataset("debian").fingerprint() == ds.fingerprint()


def test_deb822_parsing():
    text = "Package: a\nDescription-en: short one\n first line\n .\n second\n\nPackage: b\nSource: s (1.0)\n"
    st = _apt_stanzas(text)
    assert [s["Package"] for s in st] == ["a", "b"]
    assert _long_description(st[0]["Description-en"]) == "first line second"


def test_bad_inputs(tmp_path):
    with pytest.raises(HeadwiseError, match="dataset"):
        load_dataset("no-such-dataset")
    with pytest.raises(HeadwiseError, match="path"):
        debian(tmp_path / "missing.jsonl.gz")
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write(json.dumps({"package": "x"}) + "\n")
    with pytest.raises(HeadwiseError, match="fields"):
        debian(bad)
    with pytest.raises(HeadwiseError, match="relevant"):
        RetrievalDataset("x", ["d"], ["q"], [{3: 1}], split_indices(1, test=0, validation=0))


def test_a_plain_jsonl_file_in_the_debian_format_loads_like_the_gzipped_one(tmp_path):
    rows = [{"package": f"p{i}", "source": f"s{i // 2}", "synopsis": f"tool {i}", "description": f"does {i}"}
            for i in range(10)]  # fmt: skip
    plain, gz = tmp_path / "d.jsonl", tmp_path / "d.jsonl.gz"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(gz, "wt") as fh:
        fh.write(plain.read_text())
    a, b = load_dataset(str(plain)), load_dataset(str(gz))
    assert a.fingerprint() == b.fingerprint() and a.documents[3] == "does 3" and a.relevant[0] == {0: 2, 1: 1}
