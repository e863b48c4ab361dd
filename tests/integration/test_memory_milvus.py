"""MilvusMemory on milvus-lite: the VectorMemory API and semantics, the enhancer, migrate, the network path.

Every test runs milvus-lite in a temporary directory (pymilvus starts it on a thread of this
process); one test starts ``milvus-lite server --host 127.0.0.1 --port P`` as a separate
process, so pymilvus's network path is exercised as it is against a Milvus server, and stops
it again. Results are compared with a VectorMemory built on the same data with an exact
(flat) index: the same ids, with and without an enhancer; a stateful fuzzer checks sequences of
writes and reads against a dict model (``HEADWISE_MILVUS_FUZZ_EXAMPLES`` sequences, 8 by
default). This proves API compatibility on milvus-lite, not the behaviour of a Milvus cluster
(docs/memory.md, "Milvus backend").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from tests.conftest import require_extra
from typer.testing import CliRunner

from headwise.cli import app as cli_app
from headwise.errors import HeadwiseError
from headwise.memory import VectorMemory
from headwise.memory.enhancer import LinearAdapter, QueryEnhancer
from headwise.memory.migrate import copy_records, migrate
from headwise.memory.milvus import MilvusMemory
from headwise.memory.milvus_collection import parse_location

DIM = 32
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def milvus_extra() -> None:
    """Skip naming the extra when pymilvus or milvus-lite is missing (fail under HEADWISE_REQUIRE_DATA)."""
    require_extra("pymilvus", "milvus")
    require_extra("milvus_lite", "milvus")


def data(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def metas(n: int) -> list:
    """Metadata of every JSON kind (object, list, str, number, bool, null)."""
    kinds = [{"i": 0, "tag": "é"}, [1, 2], "s", 3.5, True, None]
    return [{"i": i} if i % 7 else kinds[(i // 7) % len(kinds)] for i in range(n)]


@pytest.fixture
def lite(tmp_path: Path) -> str:
    """A fresh milvus-lite directory."""
    return str(tmp_path / "milvus.db")


def pair(uri: str, name: str, metric: str, n: int = 400, index: str = "flat", **kw) -> tuple:
    """A MilvusMemory and a flat VectorMemory holding the same records."""
    x, meta = data(n, 1), metas(n)
    mm = MilvusMemory(uri, name, DIM, metric=metric, index=index, **kw)
    vm = VectorMemory(DIM, metric=metric)
    assert mm.add(x, metadata=meta).tolist() == vm.add(x, metadata=meta).tolist() == list(range(n))
    return mm, vm


def random_enhancer(kind: str) -> QueryEnhancer | LinearAdapter:
    """An enhancer with random weights (an untrained one is the identity): it moves the queries."""
    torch.manual_seed(5)
    if kind == "linear":
        enh = LinearAdapter(DIM)
    elif kind == "flash":  # attends over the whole store it is set on (it follows that store's writes)
        enh = QueryEnhancer(DIM, heads=4, mechanism="flash")
    else:
        enh = QueryEnhancer(DIM, heads=4, candidates=12, first_pass="adapted" if kind == "adapted" else "raw")
    with torch.no_grad():
        for p in enh.parameters():
            p.normal_(0.0, 0.2)
    return enh.eval()


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_search_returns_the_ids_and_scores_of_vector_memory(lite, metric):
    mm, vm = pair(lite, f"docs_{metric}", metric)
    q = data(30, 2)
    for k in (1, 10):
        s1, i1 = mm.search(q, k)
        s2, i2 = vm.search(q, k)
        assert s1.dtype == np.float32 and i1.dtype == np.int64 and i1.shape == (30, k)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-5)  # higher is better: -|q - x|^2 for l2
    np.testing.assert_array_equal(mm.search_batch(q, 5)[1], vm.search_batch(q, 5)[1])
    np.testing.assert_array_equal(mm.search(q[0], 3)[1], vm.search(q[0], 3)[1])  # one (d,) query
    mm.close()


@pytest.mark.parametrize(("metric", "kind"), [("cosine", "multi-head"), ("cosine", "adapted"), ("l2", "multi-head"),
                                              ("ip", "linear"), ("cosine", "flash")])  # fmt: skip
def test_enhanced_search_returns_the_ids_of_vector_memory(lite, metric, kind):
    mm, vm = pair(lite, "docs", metric)
    mm.set_enhancer(random_enhancer(kind))  # two equal enhancers: a flash one binds to its store
    vm.set_enhancer(random_enhancer(kind))
    q = data(25, 3)
    s1, i1 = mm.search(q, 10)
    s2, i2 = vm.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mm.refine_queries(q), vm.refine_queries(q), rtol=1e-5, atol=1e-5)
    plain = mm.search(q, 10, enhance=False)[1]
    assert (plain != i1).mean() > 0.2  # the enhancer changed the answer: the equality above means something
    np.testing.assert_array_equal(plain, vm.search(q, 10, enhance=False)[1])
    stages = mm.metrics.summary()
    assert {"search", "refine", "second_pass"} <= set(stages)
    assert ("first_pass" in stages) == (kind not in ("linear", "flash"))  # candidate-free: no first pass
    assert mm.delete(np.arange(0, 400, 3)) == vm.delete(np.arange(0, 400, 3)) == 134
    np.testing.assert_array_equal(mm.search(q, 10)[1], vm.search(q, 10)[1])  # after writes too
    mm.close()


def test_hnsw_collection_merges_first_pass_candidates_and_equals_exact_search(lite):
    # 300 records and a beam of 300: HNSW finds the exact neighbours, so the merged enhanced
    # search must equal the exact embedded store's.
    mm, vm = pair(lite, "graph", "cosine", n=300, index="hnsw", hnsw_m=16, ef_construction=100, ef_search=300)
    assert mm.index_kind == "hnsw" and mm.config()["hnsw_m"] == 16
    enh = random_enhancer("multi-head")
    mm.set_enhancer(enh)
    vm.set_enhancer(enh)
    q = data(12, 4)
    np.testing.assert_array_equal(mm.search(q, 8)[1], vm.search(q, 8)[1])
    assert "merge" in mm.metrics.summary()
    mm.merge_candidates = False
    mm.candidate_ef = 20
    np.testing.assert_array_equal(mm.search(q, 8)[1], vm.search(q, 8)[1])
    with pytest.raises(HeadwiseError, match="merge_candidates"):
        mm.merge_candidates = 1
    mm.close()


def test_fewer_records_than_k_pad_with_minus_one_and_minus_inf(lite):
    mm = MilvusMemory(lite, "small", DIM, metric="l2")
    vm = VectorMemory(DIM, metric="l2")
    q = data(4, 5)
    scores, ids = mm.search(q, 3)  # an empty collection
    assert (ids == -1).all() and np.isneginf(scores).all()
    x = data(5, 6)
    mm.add(x)
    vm.add(x)
    scores, ids = mm.search(q, 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all() and (ids[:, :5] >= 0).all()
    np.testing.assert_array_equal(ids, vm.search(q, 8)[1])
    # An enhancer asking for more candidates (12) than records: K is what exists, as in VectorMemory.
    enh = random_enhancer("multi-head")
    mm.set_enhancer(enh)
    vm.set_enhancer(enh)
    np.testing.assert_array_equal(mm.search(q, 8)[1], vm.search(q, 8)[1])
    np.testing.assert_allclose(mm.refine_queries(q), vm.refine_queries(q), rtol=1e-5, atol=1e-5)
    assert mm.search(np.empty((0, DIM)), 3)[1].shape == (0, 3)
    mm.close()


def test_duplicate_ids_are_refused_and_automatic_ids_pass_every_id_ever_used(lite):
    mm = MilvusMemory(lite, "ids", DIM)
    assert mm.add(data(10, 7)).tolist() == list(range(10))
    with pytest.raises(HeadwiseError, match=r"already stored: \[3, 4\]"):
        mm.add(data(2, 8), ids=[3, 4])  # milvus-lite itself would overwrite them
    with pytest.raises(HeadwiseError, match="duplicates within the call"):
        mm.add(data(2, 8), ids=[20, 20])
    assert len(mm) == 10
    kept = data(10, 7)[3]
    np.testing.assert_allclose(mm.vectors([3])[0], kept / np.linalg.norm(kept), rtol=1e-6)  # not overwritten
    assert mm.delete([9, 9, 1234]) == 1 and len(mm) == 9
    assert mm.add(data(1, 9)).tolist() == [10]  # not 9: above every id ever used, like VectorMemory
    assert mm.add(data(1, 9), ids=[100]).tolist() == [100]
    assert mm.add(data(2, 9)).tolist() == [101, 102]
    mm.close()
    with MilvusMemory(lite, "ids") as again:  # the counter is the collection's, not the client's
        assert again.add(data(1, 9)).tolist() == [103]
        assert again.upsert(data(2, 10), ids=[0, 500]).tolist() == [0, 500] and len(again) == 15
        np.testing.assert_allclose(again.vectors([0])[0], data(2, 10)[0] / np.linalg.norm(data(2, 10)[0]), rtol=1e-6)


def test_records_round_trip_with_metadata_and_texts(lite):
    mm = MilvusMemory(lite, "records", DIM, metric="cosine")
    x = data(40, 11)
    texts = [None if i % 5 == 0 else "" if i % 5 == 1 else f"text {i} ✓" for i in range(40)]
    mm.add(x, metadata=metas(40), texts=texts)
    records = mm.get([7, 999, 0])
    assert records[1] is None
    assert records[0].metadata == metas(40)[7] == [1, 2] and records[0].text == "text 7 ✓"
    assert records[2].metadata == {"i": 0, "tag": "é"} and records[2].text is None
    got = mm.get(np.arange(40))
    assert [r.metadata for r in got] == metas(40) and [r.text for r in got] == texts
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(mm.vectors([5, 6]), unit[[5, 6]], rtol=1e-6, atol=1e-7)  # cosine: normalised
    assert mm.ids().tolist() == list(range(40)) and mm.vectors([]).shape == (0, DIM)
    with pytest.raises(HeadwiseError, match=r"ids: expected stored ids, got 1 absent: \[77\]"):
        mm.vectors([5, 77])
    mm.close()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.add(np.ones((2, DIM + 1))), r"vectors: expected shape \(n, 32\)"),
        (lambda m: m.add(np.full((1, DIM), np.nan)), "finite"),
        (lambda m: m.add(np.zeros((1, DIM))), "non-zero"),
        (lambda m: m.add(np.ones((1, DIM)), ids=[-1]), "ids >= 0"),
        (lambda m: m.add(np.ones((1, DIM)), metadata=[float("nan")]), "JSON"),
        (lambda m: m.add(np.ones((1, DIM)), metadata=["x" * 70_000]), r"metadata\[0\]: expected at most 65,535"),
        (lambda m: m.add(np.ones((1, DIM)), texts=["é" * 40_000]), r"texts\[0\]: expected at most 65,535"),
        (lambda m: m.search(np.ones(DIM), k=0), "k: expected an int"),
        (lambda m: m.search(np.ones(DIM), k=2, enhance=True), "enhance"),
        (lambda m: m.search(np.ones(DIM), k=2, filter={"lang": "en"}), "filter: expected None"),
        (lambda m: m.search_batch(np.ones(DIM), k=2), "2-d"),
        (lambda m: m.upsert(np.ones((1, DIM)), ids=None), "ids"),
        (lambda m: m.set_enhancer(object()), "enhancer"),
        (lambda m: m.search_text("hello", k=1), "encoder"),
    ],
)
def test_bad_input_raises_and_leaves_the_collection_unchanged(lite, call, match):
    mm = MilvusMemory(lite, "bad", DIM)
    mm.add(data(3, 12), metadata=[{"n": i} for i in range(3)])
    with pytest.raises(HeadwiseError, match=match):
        call(mm)
    assert len(mm) == 3 and mm.ids().tolist() == [0, 1, 2]
    mm.close()


def test_opening_checks_uri_name_schema_and_arguments(lite, tmp_path):
    with pytest.raises(HeadwiseError, match="uri: expected http"):
        MilvusMemory(str(tmp_path / "plain-dir"), "x", DIM)
    with pytest.raises(HeadwiseError, match="folder .* does not exist"):
        MilvusMemory(str(tmp_path / "missing" / "m.db"), "x", DIM)
    with pytest.raises(HeadwiseError, match="collection: expected a name"):
        MilvusMemory(lite, "9 bad-name", DIM)
    with pytest.raises(HeadwiseError, match="dim: expected an int >= 1 to create collection 'nothing'"):
        MilvusMemory(lite, "nothing")
    with MilvusMemory(lite, "docs", DIM, metric="l2", index="hnsw", hnsw_m=8) as mm:
        mm.add(data(20, 13))
        with MilvusMemory(lite, "docs") as second:  # a second client in this process, same directory
            assert second.config() == mm.config() and len(second) == 20
        assert len(mm) == 20  # still served after the other client closed
    with MilvusMemory.from_location(f"milvus://{lite}/docs") as mm:  # reopened: the collection's configuration
        assert (mm.dim, mm.metric, mm.index_kind, mm.config()["hnsw_m"], len(mm)) == (DIM, "l2", "hnsw", 8, 20)
    for kwargs, match in (({"dim": 16}, "dim: expected 32"), ({"metric": "ip"}, "metric: expected 'l2'"),
                          ({"index": "flat"}, "index: expected 'hnsw'")):  # fmt: skip
        with pytest.raises(HeadwiseError, match=match):
            MilvusMemory(lite, "docs", **kwargs)
    from pymilvus import MilvusClient

    client = MilvusClient(lite)  # a collection made by another program, with another schema
    client.create_collection("foreign", dimension=DIM)
    client.close()
    with pytest.raises(HeadwiseError, match=r"collection 'foreign' at .*: fields: expected exactly \['id', 'vector'"):
        MilvusMemory(lite, "foreign")
    mm = MilvusMemory(lite, "docs")
    mm.close()
    mm.close()  # idempotent
    with pytest.raises(HeadwiseError, match="closed"):
        mm.search(data(1, 1), 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_a_headwise_error():
    with pytest.raises(HeadwiseError, match=r"connect: Milvus at http://127\.0\.0\.1:\d+: .*(connect|unavailable)"):
        MilvusMemory(f"http://127.0.0.1:{free_port()}", "docs", DIM, timeout=5)


class CharCountEncoder:
    """A 26-d text encoder: letter counts (a TextEncoder: ``dim`` and ``encode``)."""

    dim = 26

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 26), dtype=np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out + 1e-3


def test_add_texts_and_search_text(lite):
    with MilvusMemory(lite, "texts", 26, encoder=CharCountEncoder()) as mm:
        mm.add_texts(["aaaa", "bbbb", "abab"], metadata=[{"n": 0}, {"n": 1}, {"n": 2}])
        hits = mm.search_text("aaab", k=2)
        assert [h.id for h in hits] == [0, 2] and hits[0].text == "aaaa" and hits[1].metadata == {"n": 2}
        assert hits[0].score > hits[1].score
    with pytest.raises(HeadwiseError, match="encoder: expected a TextEncoder with dim 26"):
        MilvusMemory(lite, "texts", encoder=type("E", (), {"dim": 3, "encode": lambda s, t: t})())


def same_records(a, b) -> None:
    """The same ids, bit-identical vectors, metadata and texts."""
    ids = np.sort(a.ids())
    np.testing.assert_array_equal(ids, np.sort(b.ids()))
    ra, rb = a.get(ids), b.get(ids)
    assert [r.metadata for r in ra] == [r.metadata for r in rb] and [r.text for r in ra] == [r.text for r in rb]
    assert np.array_equal(np.stack([r.vector for r in ra]), np.stack([r.vector for r in rb]))


def test_migrate_a_directory_to_milvus_and_back_resumably(tmp_path, lite):
    src = tmp_path / "store"
    x = data(700, 14)
    with VectorMemory(DIM, metric="cosine", index="hnsw", hnsw_m=12, path=src) as mem:
        mem.add(x, metadata=metas(700), texts=[f"t{i}" for i in range(700)])
        mem.delete([3, 4])
    target = f"milvus://{lite}/copy"
    runner = CliRunner()
    result = runner.invoke(cli_app, ["memory", "migrate", "--from", str(src), "--to", target, "--batch", "256",
                                     "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["total"], doc["copied"], doc["skipped"], doc["count"]) == (698, 698, 0, 698)
    again = runner.invoke(cli_app, ["memory", "migrate", "--from", str(src), "--to", target])
    assert again.exit_code == 2 and "--resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    back = tmp_path / "back"
    assert migrate(target, str(back), batch=300)["copied"] == 698
    with VectorMemory.open(src, read_only=True) as a, VectorMemory.open(back, read_only=True) as b:
        same_records(a, b)  # through Milvus and back: bit for bit
        assert (b.index_kind, b.metric, b._index.hnsw_m) == ("hnsw", "cosine", 12)
        with MilvusMemory(*parse_location(target)) as m:
            same_records(a, m)
            assert m.index_kind == "hnsw" and m.config()["hnsw_m"] == 12

    # A copy interrupted after its first batch continues with resume, skipping what it holds.
    class StopCopyError(Exception):
        pass

    def stop_after_first(done: int, total: int) -> None:
        raise StopCopyError

    from headwise.memory.migrate import open_destination, open_source, source_config

    with open_source(str(src)) as s:
        d = open_destination(f"milvus://{lite}/partial", source_config(s), resume=False)
        with pytest.raises(StopCopyError):
            copy_records(s, d, batch=200, progress=stop_after_first)
        assert len(d) == 200
        d.close()
    report = migrate(str(src), f"milvus://{lite}/partial", batch=200, resume=True)
    assert (report["copied"], report["skipped"], report["count"]) == (498, 200, 698)


@pytest.fixture
def lite_server(tmp_path: Path) -> Iterator[str]:
    """``milvus-lite server`` on a free loopback port, as its own process; stopped after the test."""
    port = free_port()
    exe = Path(sys.executable).with_name("milvus-lite")
    cmd = [str(exe), "server", "--data-dir", str(tmp_path / "server-data"), "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # listening once a TCP connect succeeds
            if proc.poll() is not None:
                pytest.fail(f"milvus-lite server exited with {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail("milvus-lite server did not listen within 60 s")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and nothing else
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        proc.stderr.close()


def test_the_network_path_to_a_milvus_lite_server(lite_server, tmp_path):
    mm, vm = pair(lite_server, "net", "cosine", n=300)
    q = data(10, 15)
    np.testing.assert_array_equal(mm.search(q, 10)[1], vm.search(q, 10)[1])
    enh = random_enhancer("adapted")
    mm.set_enhancer(enh)
    vm.set_enhancer(enh)
    np.testing.assert_array_equal(mm.search(q, 10)[1], vm.search(q, 10)[1])
    with pytest.raises(HeadwiseError, match="already stored"):
        mm.add(data(1, 16), ids=[0])
    mm.close()
    port = lite_server.rsplit(":", 1)[1]
    back = tmp_path / "from-server"
    result = CliRunner().invoke(cli_app, ["memory", "migrate", "--from", f"milvus://127.0.0.1:{port}/net", "--to",
                                          str(back), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    with VectorMemory.open(back, read_only=True) as copy:
        same_records(copy, vm)


def test_locations_of_migrate():
    assert parse_location("milvus://db.example:19531/docs") == ("http://db.example:19531", "docs")
    assert parse_location("milvus://db.example/docs") == ("http://db.example:19530", "docs")
    assert parse_location("milvus+https://db.example:443/docs") == ("https://db.example:443", "docs")
    assert parse_location("milvus:///srv/mem.db/docs") == ("/srv/mem.db", "docs")
    for bad in ("http://x:1/docs", "milvus://x:1", "milvus://x:1/bad-name", "milvus+https://m.db/docs"):
        with pytest.raises(HeadwiseError):
            parse_location(bad)


def test_the_docs_snippet_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "memory.md").read_text()
    section = text[text.index("## Milvus backend") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it writes ./mem.db
    exec(compile(snippet, "docs/memory.md", "exec"), {})


FUZZ_DIM = 6


def unit_vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(FUZZ_DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class MilvusMachine(RuleBasedStateMachine):
    """Sequences of add / delete / upsert / get / search / reopen on a flat cosine collection,
    checked at every step against a dict id -> (vector, metadata, text), as the embedded store's
    stateful fuzzer (tests/property/test_memory_stateful.py) checks VectorMemory."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="hw-milvus-fuzz-"))
        self.uri = str(self.dir / "m.db")
        self.mem = MilvusMemory(self.uri, "fuzz", FUZZ_DIM)
        self.model: dict[int, tuple[np.ndarray, object, str | None]] = {}
        self.seed = 0

    def teardown(self) -> None:
        self.mem.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _vectors(self, n: int) -> np.ndarray:
        self.seed += n
        return np.stack([unit_vector(self.seed - n + j) for j in range(n)])

    @rule(ids=st.lists(st.integers(0, 30), min_size=1, max_size=4, unique=True), auto=st.booleans())
    def add(self, ids, auto):
        vecs, meta = self._vectors(len(ids)), [{"n": i} for i in ids]
        texts = [None if i % 2 else f"t{i}" for i in ids]
        if auto:
            got = self.mem.add(vecs, metadata=meta, texts=texts).tolist()
            assert not set(got) & set(self.model)
            ids = got
        elif set(ids) & set(self.model):
            with pytest.raises(HeadwiseError, match="already stored"):
                self.mem.add(vecs, ids=ids, metadata=meta, texts=texts)
            return
        else:
            assert self.mem.add(vecs, ids=ids, metadata=meta, texts=texts).tolist() == ids
        self.model.update({int(i): (v, m, t) for i, v, m, t in zip(ids, vecs, meta, texts)})

    @rule(ids=st.lists(st.integers(0, 30), max_size=4))
    def delete(self, ids):
        assert self.mem.delete(ids) == len(set(ids) & set(self.model))
        for i in ids:
            self.model.pop(i, None)

    @rule(ids=st.lists(st.integers(0, 30), min_size=1, max_size=3, unique=True))
    def upsert(self, ids):
        vecs, meta, texts = self._vectors(len(ids)), [[i, "u"] for i in ids], ["u"] * len(ids)
        assert self.mem.upsert(vecs, ids=ids, metadata=meta, texts=texts).tolist() == ids
        self.model.update({int(i): (v, m, t) for i, v, m, t in zip(ids, vecs, meta, texts)})

    @rule()
    def reopen(self):
        self.mem.close()
        self.mem = MilvusMemory(self.uri, "fuzz")

    @rule(i=st.integers(0, 30))
    def get(self, i):
        (record,) = self.mem.get([i])
        if i not in self.model:
            assert record is None
            return
        v, m, t = self.model[i]
        np.testing.assert_allclose(record.vector, v, rtol=1e-6, atol=1e-7)
        assert (record.metadata, record.text) == (m, t)

    @precondition(lambda self: self.model)
    @rule(k=st.integers(1, 8), data=st.data())
    def search(self, k, data):
        q = self.model[data.draw(st.sampled_from(sorted(self.model)))][0]
        scores, ids = self.mem.search(q, k)
        found = [x for x in ids[0].tolist() if x >= 0]
        assert len(found) == len(set(found)) == min(k, len(self.model)) and set(found) <= set(self.model)
        assert (ids[0, len(found) :] == -1).all() and np.isneginf(scores[0, len(found) :]).all()
        exact = sorted((float(v @ q) for v, _, _ in self.model.values()), reverse=True)[: len(found)]
        np.testing.assert_allclose(scores[0, : len(found)], exact, rtol=1e-5, atol=1e-5)

    @invariant()
    def counts_agree(self):
        assert len(self.mem) == len(self.model)
        assert self.mem.ids().tolist() == sorted(self.model)


TestMilvusMachine = MilvusMachine.TestCase
TestMilvusMachine.settings = settings(max_examples=int(os.environ.get("HEADWISE_MILVUS_FUZZ_EXAMPLES", "8")),
                                      stateful_step_count=15, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
