"""Export and import of a store (headwise.memory.export) and the record files they read (records_io), #20."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from headwise import HeadwiseError
from headwise.memory import VectorMemory
from headwise.memory.export import add_records, export_store, import_store, store_config
from headwise.memory.records_io import EXPORT_FORMAT, read_records

FORMATS = ["jsonl", "jsonl.gz", "parquet"]


def _store(path, *, metric="cosine", index="hnsw", n=300, dim=24) -> VectorMemory:
    """A store with awkward content: gaps in the ids (deletes), texts and metadata of every kind, None."""
    rng = np.random.default_rng(7)
    mem = VectorMemory(dim, metric=metric, index=index, path=path, hnsw_m=12, ef_construction=64, ef_search=33)
    meta = [{"n": i, "tags": ["a", "b"][: i % 3], "x": i / 7} if i % 4 else None for i in range(n)]
    meta[5], meta[6], meta[7] = "a JSON string", [1, "two", None], 3.25
    texts = [f"text {i} — ünïcode" if i % 3 else None for i in range(n)]
    texts[9] = ""
    mem.add(rng.standard_normal((n, dim)).astype(np.float32) * 3, ids=np.arange(n) * 2 + 5, metadata=meta,
            texts=texts)  # fmt: skip
    mem.delete([9, 11, 13])
    mem.add(rng.standard_normal((4, dim)).astype(np.float32))  # automatic ids, after the deletes
    return mem


def _assert_identical(a: VectorMemory, b: VectorMemory) -> None:
    assert store_config(a) == store_config(b)
    assert a.ids().tolist() == b.ids().tolist()
    ra, rb = a.get(a.ids()), b.get(b.ids())
    for x, y in zip(ra, rb):
        assert x.id == y.id and x.metadata == y.metadata and x.text == y.text
        assert x.vector.tobytes() == y.vector.tobytes(), f"vector of id {x.id} differs"
    q = np.random.default_rng(1).standard_normal((20, a.dim)).astype(np.float32)
    sa, ia = a.search(q, 10)
    sb, ib = b.search(q, 10)
    if a.index_kind == "flat":
        assert np.array_equal(ia, ib) and np.array_equal(sa, sb)
    else:  # the graph is rebuilt: the same records, an approximate search of nearly the same results
        overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ia.tolist(), ib.tolist())])
        assert overlap >= 0.9, overlap


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("metric", "index"), [("cosine", "hnsw"), ("l2", "flat"), ("ip", "hnsw-fp16"), ("cosine", "flat")]
)
def test_round_trip_gives_an_identical_store(tmp_path, fmt, metric, index):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    with _store(tmp_path / "src", metric=metric, index=index) as mem:
        assert export_store(mem, tmp_path / f"out.{fmt}") == len(mem)
        with import_store(tmp_path / f"out.{fmt}", tmp_path / "copy") as copy:
            _assert_identical(mem, copy)
            assert copy.verify().ok
        # the copy on disk reopens identical too (it was saved)
        with VectorMemory.open(tmp_path / "copy", read_only=True) as again:
            _assert_identical(mem, again)


def test_export_is_deterministic_and_keeps_insertion_order(tmp_path):
    with _store(tmp_path / "src", n=40) as mem:
        mem.add(np.ones((2, mem.dim), dtype=np.float32), ids=[0, 2])
        export_store(mem, tmp_path / "a.jsonl.gz")
        export_store(mem, tmp_path / "b.jsonl.gz")
        with gzip.open(tmp_path / "a.jsonl.gz", "rt") as fh:
            ids = [json.loads(line)["id"] for line in fh.readlines()[1:]]
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    assert ids[-6:] == [84, 85, 86, 87, 0, 2]  # in the order they were added, not sorted


def test_empty_store_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    for fmt in FORMATS:
        mem = VectorMemory(5, metric="l2", index="flat")
        export_store(mem, tmp_path / f"e.{fmt}")
        with import_store(tmp_path / f"e.{fmt}", tmp_path / f"c-{fmt}") as copy:
            assert len(copy) == 0 and store_config(copy) == store_config(mem)


def test_import_overrides_and_plain_files(tmp_path):
    with _store(tmp_path / "src", n=30) as mem:
        export_store(mem, tmp_path / "e.jsonl")
    with import_store(tmp_path / "e.jsonl", tmp_path / "flat", index="flat") as copy:
        assert copy.index_kind == "flat" and copy.metric == "cosine" and len(copy) == 31
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"vector": [i, 1.0, 2.0]}) + "\n" for i in range(5)))
    with import_store(plain, tmp_path / "plain", metric="l2") as copy:
        assert (copy.dim, copy.metric, copy.index_kind, copy.ids().tolist()) == (3, "l2", "flat", [0, 1, 2, 3, 4])
    np.save(tmp_path / "v.npy", np.ones((3, 4), dtype=np.float64))
    with import_store(tmp_path / "v.npy", tmp_path / "npy") as copy:
        assert len(copy) == 3 and copy.dim == 4


def test_a_failed_import_leaves_no_store(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"vector": [1.0, 2.0]}) + "\n" + json.dumps({"vector": [1.0, "x"]}) + "\n")
    with pytest.raises(HeadwiseError, match="bad.jsonl line 2: vector"):
        import_store(bad, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"vector": [1.0, 2.0]}) + "\n")
    with pytest.raises(HeadwiseError, match="new or empty directory"):
        import_store(ok, tmp_path / "full")


def _jsonl(tmp_path, *rows, name="f.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"vector": [1, 2]', "{}"], "f.jsonl line 1: expected a JSON object, got invalid JSON"),
        ([{"vector": [1, 2]}, "[1, 2]"], "f.jsonl line 2: expected a JSON object, got list"),
        ([{"vector": [1, 2]}, {"vector": [1, 2, 3]}], "f.jsonl line 2: vector: expected 2 numbers (the store's dim)"),
        ([{"vector": [1, None]}], "f.jsonl line 1: vector: expected a non-empty list of numbers"),
        ([{"vector": "1 2"}], "f.jsonl line 1: vector: expected a non-empty list of numbers, got str"),
        ([{"vector": [1, 1e39]}], "f.jsonl line 1: vector: expected finite numbers"),
        ([{"vector": [1, 2], "id": -1}], "f.jsonl line 1: id: expected an integer in [0, 2**63 - 1)"),
        ([{"vector": [1, 2], "id": 1.5}], "f.jsonl line 1: id: expected an integer"),
        ([{"vector": [1, 2], "id": 3}, {"vector": [1, 2], "id": 3}], "line 2: id: expected ids unique in the file"),
        ([{"vector": [1, 2], "id": 3}, {"vector": [1, 2]}], "line 2: id: expected an id on every record or on none"),
        ([{"vector": [1, 2], "vectors": [1, 2]}], "f.jsonl line 1: expected only the fields"),
        ([{"metadata": {"a": 1}}], "f.jsonl line 1: expected a vector, or a text to encode, got neither"),
        ([{"vector": [1, 2], "text": 5}], "f.jsonl line 1: text: expected a string, got int"),
        ([{"format": "something-else"}], "f.jsonl: header: expected format 'headwise.memory.export'"),
        ([{"format": EXPORT_FORMAT, "version": 9, "store": {"dim": 2}}], "header version: expected 1, got 9"),
        ([{"format": EXPORT_FORMAT, "version": 1, "store": {"dim": 3}}], "header store.dim: expected 2"),
    ],
)
def test_malformed_record_files_name_the_line_and_field(tmp_path, rows, message):
    with pytest.raises(HeadwiseError) as err:
        read_records(_jsonl(tmp_path, *rows), dim=2)
    assert message in str(err.value)


def test_other_malformed_files(tmp_path):
    with pytest.raises(HeadwiseError, match="--file: expected an existing file"):
        read_records(tmp_path / "none.jsonl", dim=2)
    with pytest.raises(HeadwiseError, match=r"file: expected a file named \*.jsonl"):
        read_records(_jsonl(tmp_path, {"vector": [1, 2]}, name="f.csv"), dim=2)
    (tmp_path / "p.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(HeadwiseError, match="expected a plain .npy array"):
        read_records(tmp_path / "p.npy", dim=2)
    np.save(tmp_path / "w.npy", np.ones((2, 3)))
    with pytest.raises(HeadwiseError, match=r"w.npy: expected a \(n, 2\) array of numbers, got float64 \(2, 3\)"):
        read_records(tmp_path / "w.npy", dim=2)
    np.save(tmp_path / "nan.npy", np.array([[1.0, 2.0], [np.nan, 1.0]]))
    with pytest.raises(HeadwiseError, match="nan.npy row 2: expected finite numbers"):
        read_records(tmp_path / "nan.npy", dim=2)
    gz = tmp_path / "g.jsonl.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(HeadwiseError, match="expected a readable UTF-8 JSONL file"):
        read_records(gz, dim=2)


def test_parquet_files_of_a_user(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"vector": [[1.0, 0.0], [0.0, 2.0]], "metadata": ['{"a": 1}', "plain"], "text": ["x", None]})
    pq.write_table(table, tmp_path / "u.parquet")
    recs = read_records(tmp_path / "u.parquet", dim=2)
    assert recs.metadata == [{"a": 1}, "plain"] and recs.texts == ["x", None] and recs.header is None
    pq.write_table(pa.table({"vector": [[1.0, 0.0]], "extra": [1]}), tmp_path / "x.parquet")
    with pytest.raises(HeadwiseError, match=r"x.parquet: columns: expected some of .*, got also \['extra'\]"):
        read_records(tmp_path / "x.parquet", dim=2)
    pq.write_table(pa.table({"vector": [[1.0, 0.0], [1.0]]}), tmp_path / "short.parquet")
    with pytest.raises(HeadwiseError, match="short.parquet row 2: vector: expected 2 numbers"):
        read_records(tmp_path / "short.parquet", dim=2)
    pq.write_table(pa.table({"vector": [[1, 2], None, [3, 4]], "text": ["a", "b", "c"]}), tmp_path / "ints.parquet")
    recs = read_records(tmp_path / "ints.parquet", dim=2)  # integers, and a row to encode from its text
    assert recs.vectors.tolist() == [[1, 2], [0, 0], [3, 4]] and recs.missing.tolist() == [False, True, False]
    pq.write_table(pa.table({"vector": [[1.0, 2.0], [3.0, None]]}), tmp_path / "hole.parquet")
    with pytest.raises(HeadwiseError, match="hole.parquet row 2: vector: expected a non-empty list of numbers"):
        read_records(tmp_path / "hole.parquet", dim=2)
    pq.write_table(pa.table({"vector": [[1.0, float("nan")]]}), tmp_path / "nan.parquet")
    with pytest.raises(HeadwiseError, match="nan.parquet row 1: vector: expected finite numbers"):
        read_records(tmp_path / "nan.parquet", dim=2)
    pq.write_table(pa.table({"vector": ["1 2"]}), tmp_path / "str.parquet")
    with pytest.raises(HeadwiseError, match="str.parquet row 1: vector: expected a non-empty list of numbers, got str"):
        read_records(tmp_path / "str.parquet", dim=2)


def test_add_records_checks_everything_before_writing(tmp_path):
    mem = VectorMemory(2, metric="l2")
    mem.add([[0.0, 0.0]], ids=[4])
    recs = read_records(_jsonl(tmp_path, {"id": 1, "vector": [1, 2]}, {"id": 4, "vector": [3, 4]}), dim=2)
    with pytest.raises(HeadwiseError, match="f.jsonl line 2: id: expected ids not yet in the store, got 4"):
        add_records(mem, recs)
    assert mem.ids().tolist() == [4]
    texts = read_records(_jsonl(tmp_path, {"text": "only a text"}), dim=2)
    with pytest.raises(HeadwiseError, match=r"line 1: vector: expected a vector \(texts are encoded with MiniLM"):
        add_records(mem, texts)
    assert len(mem) == 1


class HashEncoder:
    """A stand-in for MiniLM (384-d): a unit vector drawn from the text's hash."""

    dim = 384

    def encode(self, texts):
        out = [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(384) for t in texts]
        out = np.asarray(out, dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_texts_without_vectors_are_encoded(tmp_path):
    mem = VectorMemory(384)
    vec = np.ones(384).tolist()
    path = _jsonl(tmp_path, {"text": "alpha", "metadata": {"k": 1}}, {"vector": vec, "text": "b"})
    recs = read_records(path, dim=384)
    ids = add_records(mem, recs, encoder=HashEncoder())
    assert ids.tolist() == [0, 1]
    assert np.allclose(mem.vectors([0])[0], HashEncoder().encode(["alpha"])[0], atol=1e-6)
    assert mem.get([0])[0].metadata == {"k": 1} and mem.get([1])[0].text == "b"


def test_cosine_rows_that_are_not_unit_are_normalised(tmp_path):
    mem = VectorMemory(2)
    recs = read_records(_jsonl(tmp_path, {"vector": [3, 4]}, {"vector": [0.6, 0.8]}), dim=2)
    add_records(mem, recs)
    assert np.allclose(mem.vectors([0, 1]), [[0.6, 0.8], [0.6, 0.8]])
    with pytest.raises(HeadwiseError, match="zero rows"):
        add_records(mem, read_records(_jsonl(tmp_path, {"vector": [0, 0]}, name="z.jsonl"), dim=2))
