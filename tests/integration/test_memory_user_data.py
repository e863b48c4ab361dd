"""``headwise memory build --corpus`` on a user's own JSONL corpus, then train and eval on it."""

from __future__ import annotations

import gzip
import json

import pytest
from typer.testing import CliRunner

from headwise import HeadwiseError
from headwise.memory.cli import memory_app
from headwise.memory.userdata import read_corpus, user_dataset

runner = CliRunner()
ANIMALS = ["dog", "cat", "horse", "cow", "sheep", "goat", "pig", "duck", "goose", "hen", "fox", "wolf", "bear",
           "deer", "mouse", "rat", "owl", "crow", "trout", "salmon"]  # fmt: skip


def invoke(*args: str):
    return runner.invoke(memory_app, list(args), catch_exceptions=False, terminal_width=200)


def _write(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture()
def files(tmp_path):
    corpus = [{"id": f"a{i}", "text": f"the {a} is an animal; note {i}", "metadata": {"n": i}}
              for i, a in enumerate(ANIMALS)]  # fmt: skip
    queries = [{"query": f"tell me about the {a}", "relevant": [f"a{i}"]} for i, a in enumerate(ANIMALS)]
    return _write(tmp_path / "corpus.jsonl.gz", corpus, gz=True), _write(tmp_path / "queries.jsonl", queries)


def test_user_dataset_split_and_errors(files, tmp_path):
    corpus, queries = files
    ds = user_dataset(corpus, queries, test=0.25, validation=0.25, seed=1)
    assert len(ds.documents) == 20 and ds.doc_ids[3] == "a3" and sum(map(len, ds.split.values())) == 20
    assert {k: len(v) for k, v in ds.split.items()} == {"test": 5, "validation": 5, "train": 10}
    assert user_dataset(corpus, queries, test=0.25, validation=0.25, seed=1).fingerprint() == ds.fingerprint()
    own = _write(tmp_path / "own.jsonl", [{"query": "q", "relevant": ["a1"], "split": s}
                                         for s in ("train", "train", "validation", "test")])  # fmt: skip
    assert {k: list(v) for k, v in user_dataset(corpus, own).split.items()} == {
        "train": [0, 1], "validation": [2], "test": [3]}  # fmt: skip
    bad = _write(
        tmp_path / "bad.jsonl",
        [{"query": "q", "relevant": ["a1"], "split": "train"}, {"query": "q", "relevant": ["a1"]}],
    )
    with pytest.raises(HeadwiseError, match="on every query"):
        user_dataset(corpus, bad)
    dup = _write(tmp_path / "dup.jsonl", [{"id": 1, "text": "x"}, {"id": "1", "text": "y"}])
    with pytest.raises(HeadwiseError, match="dup.jsonl line 2: id.*first on line 1"):
        read_corpus(dup)
    for row, message in (({"id": 1}, "text"), ({"id": True, "text": "x"}, "id"),
                         ({"id": 1, "text": "x", "metadata": [1]}, "metadata")):  # fmt: skip
        with pytest.raises(HeadwiseError, match=message):
            read_corpus(_write(tmp_path / "one.jsonl", [row]))
    with pytest.raises(HeadwiseError, match="fractions"):
        user_dataset(corpus, queries, test=0.6, validation=0.5)


@pytest.mark.slow
def test_build_train_eval_on_own_corpus(files, tmp_path):
    corpus, queries = files
    d = tmp_path / "own"
    res = invoke("build", "--corpus", str(corpus), "--queries", str(queries), "--out", str(d),
                 "--test-fraction", "0.25", "--validation-fraction", "0.25")  # fmt: skip
    assert res.exit_code == 0, res.output
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["documents"] == 20 and manifest["split"] == {"test": 5, "validation": 5, "train": 10}
    assert manifest["source"]["corpus"] == str(corpus.resolve())
    res = invoke("train", "--dir", str(d), "--method", "linear", "--steps", "5", "--eval-every", "5",
                 "--batch-size", "4")  # fmt: skip
    assert res.exit_code == 0, res.output
    res = invoke("eval", "--dir", str(d), "--method", "knn,linear", "--latency", "0", "--samples", "20")
    assert res.exit_code == 0 and "own test" not in res.output and "corpus test: 5 queries" in res.output
    # a corpus without queries builds too (nothing to train on yet)
    res = invoke("build", "--corpus", str(corpus), "--out", str(tmp_path / "bare"))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "bare" / "manifest.json").read_text())["queries"] == 0
    # ... and trains from the corpus alone: pseudo-queries cut from its documents
    res = invoke("train", "--dir", str(tmp_path / "bare"), "--method", "linear", "--self-supervised", "40",
                 "--steps", "5", "--eval-every", "5", "--batch-size", "8", "--name", "linear-self")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "16 corpus pseudo-queries" in res.output  # 20 documents, each drawn once: 16 train, 4 validate
    hist = json.loads((tmp_path / "bare" / "models" / "linear-self" / "history.json").read_text())
    assert "--self-supervised 40" in hist["command"] and "--name linear-self" in hist["command"]
    res = invoke("train", "--dir", str(tmp_path / "bare"), "--method", "linear,multi-head", "--name", "x")
    assert res.exit_code == 2 and "one --method" in res.output


def test_build_argument_errors(files, tmp_path):
    corpus, queries = files
    res = invoke("build", "--out", str(tmp_path / "x"))
    assert res.exit_code == 2 and "exactly one of them" in res.output
    res = invoke("build", "--dataset", "wordnet", "--queries", str(queries), "--out", str(tmp_path / "x"))
    assert res.exit_code == 2 and "--corpus as well" in res.output
    plain = _write(
        tmp_path / "sample.jsonl", [{"package": "p", "source": "s", "synopsis": "a b c", "description": "d"}]
    )
    from headwise.memory.datasets import debian

    assert debian(plain).documents == ["d"]  # a plain (not gzipped) JSONL sample reads too


def test_parquet_corpus_and_queries_read_like_jsonl(files, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    corpus, queries = files
    rows = [{"id": f"a{i}", "text": f"the {a} is an animal; note {i}", "metadata": json.dumps({"n": i})}
            for i, a in enumerate(ANIMALS)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet")
    qrows = [{"query": f"tell me about the {a}", "relevant": [f"a{i}"]} for i, a in enumerate(ANIMALS)]
    pq.write_table(pa.Table.from_pylist(qrows), tmp_path / "queries.parquet")
    a = user_dataset(corpus, queries, seed=3)
    b = user_dataset(tmp_path / "corpus.parquet", tmp_path / "queries.parquet", seed=3)
    assert (b.documents, b.doc_ids, b.relevant) == (a.documents, a.doc_ids, a.relevant)
    assert read_corpus(tmp_path / "corpus.parquet")[2][4] == {"n": 4}  # JSON text decoded
    graded = [{"query": "q", "relevant": json.dumps({"a1": 2})}]
    pq.write_table(pa.Table.from_pylist(graded), tmp_path / "graded.parquet")
    assert user_dataset(corpus, tmp_path / "graded.parquet").relevant == [{1: 2}]
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(HeadwiseError, match="a readable Parquet file"):
        read_corpus(tmp_path / "broken.parquet")
    bad = [{"id": "x", "text": ""}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(HeadwiseError, match="bad.parquet line 1: text"):
        read_corpus(tmp_path / "bad.parquet")
