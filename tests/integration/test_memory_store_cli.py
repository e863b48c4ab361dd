"""``headwise memory create | add | query | info | delete | export | import | compact`` on a store of one's own (#20).

Vectors everywhere except one small test that encodes texts with MiniLM; elsewhere texts go
through a hash encoder standing in for it (``cli_store._encoder``).
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from headwise.cli import app
from headwise.memory import VectorMemory, cli_store
from headwise.memory.export import store_config

runner = CliRunner()
DIM = 8


def run(*args: str):
    return runner.invoke(app, ["memory", *map(str, args)], terminal_width=200)


def ok(*args: str) -> dict | list | None:
    """Run a command that must succeed; with --json, its parsed stdout."""
    res = run(*args)
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    return json.loads(res.stdout) if "--json" in args else None


def refused(fragment: str, *args: str) -> str:
    """Run a command that must fail: exit 2, one line 'error: ...' on stderr holding ``fragment``, no stdout."""
    res = run(*args)
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert fragment in lines[0], lines[0]
    assert res.stdout == "" and "Traceback" not in res.stderr
    return lines[0]


def _rows(n: int, *, start: int = 0, ids: bool = False, dim: int = DIM) -> list[dict]:
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, start + n):
        row = {"vector": rng.standard_normal(dim).tolist(), "metadata": {"n": i, "lang": "en" if i % 2 else "fr"},
               "text": f"record {i}"}  # fmt: skip
        if ids:
            row["id"] = 1000 + i
        out.append(row)
    return out


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def store(tmp_path):
    """A flat cosine store of 30 records made through the commands."""
    directory = tmp_path / "mem"
    created = ok("create", directory, "--dim", DIM, "--json")
    assert created["count"] == 0 and created["dim"] == DIM and created["index"] == "flat"
    added = ok("add", directory, "--file", _jsonl(tmp_path / "data.jsonl", _rows(30)), "--json")
    assert (added["added"], added["first_id"], added["last_id"], added["count"]) == (30, 0, 29, 30)
    return directory


def test_query_info_delete_compact(store, tmp_path):
    with VectorMemory.open(store, read_only=True) as mem:
        target = mem.vectors([7])
    np.save(tmp_path / "q.npy", np.concatenate([target, -target]))
    found = ok("query", store, "--vector-file", tmp_path / "q.npy", "--k", 3, "--json")
    first = found["results"][0][0]
    assert first["id"] == 7 and first["text"] == "record 7" and first["metadata"] == {"n": 7, "lang": "en"}
    assert len(found["results"]) == 2 and all(len(r) == 3 for r in found["results"])
    assert found["results"][0][0]["score"] == pytest.approx(1.0, abs=1e-5)
    res = run("query", store, "--vector-file", tmp_path / "q.npy", "--k", 2)
    assert res.exit_code == 0 and "record 7" in res.stdout and "q.npy row 1" in res.stdout
    np.save(tmp_path / "one.npy", target[0])
    everything = ok("query", store, "--vector-file", tmp_path / "one.npy", "--k", 100, "--json")
    assert everything["results"][0][-1]["rank"] == 30  # k beyond the store: every record, no padding

    info = ok("info", store, "--json")
    assert (info["count"], info["dim"], info["metric"], info["index"]) == (30, DIM, "cosine", "flat")
    assert info["bytes_on_disk"] > 0 and info["last_save"] is not None and info["enhancer"] is None
    assert info["feedback_pairs"] == 0 and info["tombstones"] == 0
    assert "bytes on disk" in run("info", store).stdout

    gone = ok("delete", store, "--ids", "1,2,3,999", "--json")
    assert gone == {"deleted": 3, "not_found": 1, "count": 27}
    compacted = ok("compact", store, "--json")
    assert compacted["slots_after"] == compacted["count"] == 27
    assert ok("info", store, "--json")["tombstones"] == 0


def test_compact_drops_tombstones_of_an_hnsw_store(tmp_path):
    directory = tmp_path / "h"
    ok("create", directory, "--dim", DIM, "--index", "hnsw", "--hnsw-m", 8)
    ok("add", directory, "--file", _jsonl(tmp_path / "d.jsonl", _rows(100)))
    # below save()'s 10% threshold for HNSW: the tombstones stay until compact
    ok("delete", directory, "--ids", "5,6,7")
    assert ok("info", directory, "--json")["tombstones"] == 3
    assert ok("compact", directory, "--json") == {"slots_before": 100, "slots_after": 97, "count": 97}
    assert ok("info", directory, "--json")["hnsw_m"] == 8


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "parquet"])
def test_export_import_round_trip(tmp_path, suffix):
    if suffix == "parquet":
        pytest.importorskip("pyarrow")
    directory = tmp_path / "src"
    ok("create", directory, "--dim", DIM, "--metric", "ip", "--index", "hnsw", "--hnsw-m", 12, "--ef-search", 40)
    ok("add", directory, "--file", _jsonl(tmp_path / "d.jsonl", _rows(50, ids=True)))
    ok("delete", directory, "--ids", "1003,1010")
    exported = ok("export", directory, "--to", tmp_path / f"e.{suffix}", "--json")
    assert exported["exported"] == 48 and exported["bytes"] > 0
    imported = ok("import", tmp_path / "copy", "--from", tmp_path / f"e.{suffix}", "--json")
    assert (imported["count"], imported["index"], imported["hnsw_m"], imported["ef_search"]) == (48, "hnsw", 12, 40)
    with VectorMemory.open(directory, read_only=True) as a, VectorMemory.open(tmp_path / "copy", read_only=True) as b:
        assert store_config(a) == store_config(b) and a.ids().tolist() == b.ids().tolist()
        for x, y in zip(a.get(a.ids()), b.get(b.ids())):
            assert (x.id, x.metadata, x.text, x.vector.tobytes()) == (y.id, y.metadata, y.text, y.vector.tobytes())


def test_texts_are_encoded_and_queried(tmp_path, monkeypatch):
    from tests.unit.test_memory_export import HashEncoder

    monkeypatch.setattr(cli_store, "_encoder", HashEncoder)
    directory = tmp_path / "t"
    ok("create", directory, "--dim", 384)
    rows = [{"text": f"note {i}", "metadata": {"i": i}} for i in range(5)]
    ok("add", directory, "--file", _jsonl(tmp_path / "t.jsonl", rows))
    found = ok("query", directory, "note 3", "--k", 2, "--json")
    assert found["results"][0][0]["text"] == "note 3" and found["results"][0][0]["metadata"] == {"i": 3}


@pytest.mark.slow
def test_minilm_query_finds_the_matching_text(tmp_path):
    """The one test that runs MiniLM: three texts, a paraphrase of one of them."""
    directory = tmp_path / "m"
    ok("create", directory, "--dim", 384)
    texts = ["the cat sat on the mat", "stock markets fell sharply today", "how to bake sourdough bread"]
    ok("add", directory, "--file", _jsonl(tmp_path / "m.jsonl", [{"text": t} for t in texts]))
    found = ok("query", directory, "shares dropped on the exchange", "--k", 1, "--json")
    assert found["results"][0][0]["text"] == "stock markets fell sharply today"


def test_filter_is_passed_to_search(store, tmp_path):
    np.save(tmp_path / "q.npy", np.ones(DIM, dtype=np.float32))
    args = ("query", store, "--vector-file", tmp_path / "q.npy", "--k", 30, "--filter", '{"lang": "en"}', "--json")
    if "filter" not in inspect.signature(VectorMemory.search).parameters:
        refused("--filter: expected a headwise whose VectorMemory.search takes filter=", *args)
        return
    found = ok(*args)
    assert len(found["results"][0]) == 15 and all(h["metadata"]["lang"] == "en" for h in found["results"][0])


def test_enhance_uses_the_saved_enhancer(store, tmp_path):
    from headwise.memory.enhancer import QueryEnhancer
    from headwise.memory.fit import save_enhancer

    np.save(tmp_path / "q.npy", np.ones(DIM, dtype=np.float32))
    refused("--enhance: expected an enhancer saved next to the store", "query", store, "--vector-file",
            tmp_path / "q.npy", "--enhance")  # fmt: skip
    with VectorMemory.open(store) as mem:
        save_enhancer(mem, QueryEnhancer(DIM, mechanism="flash", heads=2))
    assert ok("info", store, "--json")["enhancer"] == "flash"
    # untrained, the flash read-out is the identity: the same results as a plain search
    plain = ok("query", store, "--vector-file", tmp_path / "q.npy", "--json")
    enhanced = ok("query", store, "--vector-file", tmp_path / "q.npy", "--enhance", "--json")
    assert enhanced["enhanced"] and [h["id"] for h in enhanced["results"][0]] == [h["id"] for h in plain["results"][0]]


def test_bad_inputs_are_one_line_errors(store, tmp_path):
    q = tmp_path / "q.npy"
    np.save(q, np.ones(DIM, dtype=np.float32))
    np.save(tmp_path / "q3.npy", np.ones(3, dtype=np.float32))
    bad = _jsonl(tmp_path / "bad.jsonl", [_rows(1)[0], '{"vector": [1, 2', _rows(1)[0]])
    short = _jsonl(tmp_path / "short.jsonl", [_rows(1)[0], {"vector": [1.0, 2.0]}])
    dup = _jsonl(tmp_path / "dup.jsonl", [{"id": 3, "vector": [1.0] * DIM}])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        ("bad.jsonl line 2: expected a JSON object, got invalid JSON", "add", store, "--file", bad),
        ("short.jsonl line 2: vector: expected 8 numbers (the store's dim), got 2", "add", store, "--file", short),
        ("dup.jsonl line 1: id: expected ids not yet in the store, got 3, already stored", "add", store, "--file", dup),
        ("--file: expected an existing file", "add", store, "--file", tmp_path / "none.jsonl"),
        ("file: expected a file named", "add", store, "--file", _jsonl(tmp_path / "d.csv", [])),
        ("--k: expected an integer in [1, 16384], got 0", "query", store, "--vector-file", q, "--k", 0),
        ("--k: expected an integer in [1, 16384], got 16385", "query", store, "--vector-file", q, "--k", 16385),
        ("--vector-file: expected a (8,) or (n, 8) array", "query", store, "--vector-file", tmp_path / "q3.npy"),
        ("QUERY / --vector-file: expected exactly one of them, got neither", "query", store),
        ("QUERY: expected a store of dim 384", "query", store, "some text"),
        ("--filter: expected a JSON object", "query", store, "--vector-file", tmp_path / "q.npy", "--filter", "[1]"),
        ("--filter: expected a JSON object", "query", store, "--vector-file", tmp_path / "q.npy", "--filter", "{x"),
        ("DIR: expected an existing directory", "info", tmp_path / "nothing"),
        ("expected a headwise memory directory", "info", tmp_path / "full"),
        ("DIR: expected a new or empty directory", "create", tmp_path / "full", "--dim", 4),
        ("--dim: expected an integer in [1, 65536], got 0", "create", tmp_path / "new", "--dim", 0),
        ("metric: expected one of", "create", tmp_path / "new", "--dim", 4, "--metric", "hamming"),
        ("--ids: expected comma-separated integers", "delete", store, "--ids", "1,x"),
        ("--ids: expected one or more ids", "delete", store, "--ids", "-4"),
        ("--to: expected a file named *.parquet, *.jsonl or *.jsonl.gz", "export", store, "--to", tmp_path / "e.csv"),
        ("--to: expected a file path", "export", store, "--to", tmp_path),
        ("--from: expected an existing file", "import", tmp_path / "c", "--from", tmp_path / "none.jsonl"),
        ("DIR: expected a new or empty directory", "import", tmp_path / "full", "--from", short),
        ("No such option: --bogus", "info", store, "--bogus"),
    ]  # fmt: skip
    for fragment, *args in cases:
        refused(fragment, *args)
    assert not (tmp_path / "new").exists()  # refused before anything was created
    assert ok("info", store, "--json")["count"] == 30  # the failed adds wrote nothing


def test_writers_wait_for_the_lock_and_readers_do_not(store, tmp_path, monkeypatch):
    monkeypatch.setattr(cli_store, "LOCK_TIMEOUT", 0.0)
    np.save(tmp_path / "q.npy", np.ones(DIM, dtype=np.float32))
    with VectorMemory.open(store, lock_timeout=0):  # another writer holds the store
        assert ok("query", store, "--vector-file", tmp_path / "q.npy", "--json")["results"][0]
        assert ok("info", store, "--json")["count"] == 30
        refused("locked by another writer", "delete", store, "--ids", "1")


def test_build_reads_a_plain_jsonl_dataset(tmp_path, monkeypatch):
    """``memory build --dataset FILE.jsonl``: the Debian sample format, not gzipped (#20 item 6)."""
    import headwise.memory.cli as memory_cli

    rows = [{"package": f"p{i}", "source": f"s{i // 2}", "synopsis": f"tool {i}", "description": f"does {i}"}
            for i in range(12)]  # fmt: skip

    def fake_embedding(ds, progress, **engine):  # MiniLM is not what this test is about
        return np.ones((len(ds.documents), 4), np.float32), np.ones((len(ds), 4), np.float32)

    monkeypatch.setattr(memory_cli, "embed_dataset", fake_embedding)
    ok("build", "--dataset", _jsonl(tmp_path / "deb.jsonl", rows), "--out", tmp_path / "w")
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["documents"] == 12 and manifest["name"] == "debian"


def test_bench_refuses_an_unknown_mechanism(tmp_path):
    refused("--mechanism: expected comma-separated names from", "bench", "--dir", tmp_path, "--mechanism", "flashy")


def test_add_reads_npy_and_parquet_files(store, tmp_path):
    np.save(tmp_path / "v.npy", np.random.default_rng(3).standard_normal((5, DIM)).astype(np.float32))
    assert ok("add", store, "--file", tmp_path / "v.npy", "--json")["first_id"] == 30
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": [500, 501], "vector": [[1.0] * DIM, [2.0] * DIM], "metadata": ['{"a": 1}', None]})
    pq.write_table(table, tmp_path / "r.parquet")
    added = ok("add", store, "--file", tmp_path / "r.parquet", "--json")
    assert (added["first_id"], added["last_id"], added["count"]) == (500, 501, 37)
    with VectorMemory.open(store, read_only=True) as mem:
        assert mem.get([500])[0].metadata == {"a": 1}
