"""``headwise serve``: the HTTP app (auth, JSON and .npy search, errors, metrics), its CLI and RemoteMemory.

Most tests drive the app in process through fastapi's TestClient; the RemoteMemory and
concurrency tests run uvicorn on a free loopback port in a thread; one test runs the real
``headwise serve`` process and stops it with SIGTERM.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402
from tests.server_utils import KEY, free_port, serving, start_serve_process, wait_listening  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from headwise.cli import app as cli_app  # noqa: E402
from headwise.errors import HeadwiseError  # noqa: E402
from headwise.memory import RemoteMemory, VectorMemory  # noqa: E402
from headwise.server.app import create_app  # noqa: E402
from headwise.server.wire import HITS_DTYPE, NPY, RAW, SHAPE_HEADER, from_raw, unpack_hits  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}
DIM = 8


def _store(n: int = 200, dim: int = DIM, seed: int = 0, path: Path | None = None) -> VectorMemory:
    rng = np.random.default_rng(seed)
    mem = VectorMemory(dim, metric="cosine", index="flat", path=path)
    mem.add(rng.standard_normal((n, dim)).astype(np.float32), metadata=[{"g": i % 3, "i": i} for i in range(n)])
    return mem


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _hits(content: bytes) -> tuple[np.ndarray, np.ndarray]:
    hits = np.lib.format.read_array(io.BytesIO(content), allow_pickle=False)
    assert hits.dtype.names == ("score", "id")
    return np.ascontiguousarray(hits["score"]), np.ascontiguousarray(hits["id"])


@pytest.fixture
def mem() -> VectorMemory:
    return _store()


@pytest.fixture
def client(mem: VectorMemory) -> TestClient:
    return TestClient(create_app(mem, api_key=KEY))


def _code(response) -> str:  # noqa: ANN001 - an httpx.Response
    return response.json()["error"]["code"]


def test_auth_is_required_except_for_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/count"), ("GET", "/metrics"), ("POST", "/search"), ("POST", "/delete")):
            r = client.request(method, path, headers=headers, json={"ids": [0], "query": [1] * DIM, "k": 1})
            assert r.status_code == 401 and _code(r) == "unauthorized", (headers, path)
            assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/count", headers=AUTH).json() == {"count": 200}


def test_json_and_npy_search_return_what_the_store_returns(client: TestClient, mem: VectorMemory) -> None:
    q = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)
    for k, flt in ((10, None), (250, None), (7, {"g": 1}), (100, {"i": {"$lt": 4}})):
        want_s, want_i = mem.search(q, k, filter=flt)
        r = client.post("/search", json={"query": q.tolist(), "k": k, "filter": flt}, headers=AUTH)
        body = r.json()
        got_s = np.array([[-np.inf if s is None else s for s in row] for row in body["scores"]], dtype=np.float32)
        np.testing.assert_array_equal(np.array(body["ids"]), want_i)
        np.testing.assert_array_equal(got_s, want_s)
        params = {"k": k} if flt is None else {"k": k, "filter": json.dumps(flt)}
        r = client.post("/search", content=_npy(q), params=params, headers={**AUTH, "Content-Type": NPY})
        got_s, got_i = _hits(r.content)
        assert got_s.dtype == np.float32 and got_i.dtype == np.int64 and got_s.shape == (5, k)
        np.testing.assert_array_equal(got_s, want_s)
        np.testing.assert_array_equal(got_i, want_i)
        raw = {**AUTH, "Content-Type": RAW, SHAPE_HEADER: f"5,{DIM}"}
        r = client.post("/search", content=q.astype("<f4").tobytes(), params=params, headers=raw)
        assert r.headers["content-type"] == RAW and r.headers[SHAPE_HEADER] == f"5,{k}"
        got_s, got_i = unpack_hits(from_raw(r.content, r.headers[SHAPE_HEADER], HITS_DTYPE))
        np.testing.assert_array_equal(got_s, want_s)
        np.testing.assert_array_equal(got_i, want_i)
    one = client.post("/search", json={"query": q[0].tolist(), "k": 3}, headers=AUTH).json()
    assert one["ids"] == mem.search(q[0], 3)[1].tolist()


def test_add_get_delete_round_trip(client: TestClient, mem: VectorMemory) -> None:
    v = np.random.default_rng(2).standard_normal((2, DIM)).astype(np.float32)
    body = {"vectors": v.tolist(), "ids": [1000, 1001], "metadata": [{"tag": "a"}, None], "texts": ["x", None]}
    assert client.post("/add", json=body, headers=AUTH).json() == {"ids": [1000, 1001]}
    r = client.post(
        "/add",
        content=_npy(v * 2),
        params={"ids": "[2000, 2001]", "metadata": '[{"tag": "b"}, 3]'},
        headers={**AUTH, "Content-Type": NPY},
    )
    assert r.json() == {"ids": [2000, 2001]}
    records = client.post("/get", json={"ids": [1000, 2001, 5]}, headers=AUTH).json()["records"]
    assert [(r["id"], r["metadata"], r["text"]) for r in records[:2]] == [(1000, {"tag": "a"}, "x"), (2001, 3, None)]
    assert records[2] == {
        "id": 5,
        "vector": mem.get([5])[0].vector.tolist(),
        "metadata": {"g": 2, "i": 5},
        "text": None,
    }
    np.testing.assert_array_equal(np.asarray(records[0]["vector"], dtype=np.float32), mem.get([1000])[0].vector)
    found = client.post("/search", json={"query": [1.0] * DIM, "k": 3, "filter": {"tag": "b"}}, headers=AUTH).json()
    assert found["ids"] == [[2000, -1, -1]]
    assert client.post("/delete", json={"ids": [1000, 2000, 99999]}, headers=AUTH).json() == {"deleted": 2}
    assert client.get("/count", headers=AUTH).json() == {"count": 202} and len(mem) == 202
    assert client.post("/get", json={"ids": [1000]}, headers=AUTH).json() == {"records": [None]}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"query": [1.0] * DIM, "k": 0}, "k"),
        ({"query": [1.0] * DIM, "k": 16385}, "k"),
        ({"query": [1.0] * (DIM + 1), "k": 3}, "got shape (9,)"),
        ({"query": [[1.0] * DIM, [1.0]], "k": 3}, "query"),
        ({"query": [1.0] * DIM}, "k"),
        ({"query": [1.0] * DIM, "k": 3, "filter": {"g": {"$regex": "x"}}}, "$regex"),
        ({"query": "abc", "k": 3}, "query"),
        ({"text": "hello", "k": 3}, "encoder"),
    ],
)
def test_bad_requests_are_400_with_the_store_message(client: TestClient, body: dict, words: str) -> None:
    r = client.post("/search", json=body, headers=AUTH)
    assert r.status_code == 400 and _code(r) == "bad_request"
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("shape", "body", "words"),
    [
        (None, b"\0" * 4 * DIM, "X-Shape: expected a header"),
        ("1,x", b"\0" * 4 * DIM, "comma-separated integers"),
        ("1,2,3,4", b"\0" * 24, "one or two"),
        (f"2,{DIM}", b"\0" * 4 * DIM, f"expected {8 * DIM} bytes"),
        (f"1,{DIM + 1}", b"\0" * 4 * (DIM + 1), "queries"),
    ],
)
def test_bad_raw_bodies_are_400(client: TestClient, shape: str | None, body: bytes, words: str) -> None:
    headers = {**AUTH, "Content-Type": RAW} | ({} if shape is None else {SHAPE_HEADER: shape})
    r = client.post("/search", content=body, params={"k": 3}, headers=headers)
    assert r.status_code == 400 and _code(r) == "bad_request"
    assert words in r.json()["error"]["message"]


def test_errors_are_json_with_codes(mem: VectorMemory) -> None:
    client = TestClient(create_app(mem, api_key=KEY, max_body_bytes=4096))
    nan = np.full((1, DIM), np.nan, dtype=np.float32)
    r = client.post("/search", content=_npy(nan), params={"k": 3}, headers={**AUTH, "Content-Type": NPY})
    assert r.status_code == 400 and "NaN" in r.json()["error"]["message"]
    pickled = np.array([{"a": 1}], dtype=object)
    buf = io.BytesIO()
    np.save(buf, pickled, allow_pickle=True)
    r = client.post("/search", content=buf.getvalue(), params={"k": 3}, headers={**AUTH, "Content-Type": NPY})
    assert r.status_code == 400 and _code(r) == "bad_request"
    r = client.post("/search", content=b"{not json", headers=AUTH)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    big = np.zeros((200, DIM), dtype=np.float32)
    r = client.post("/add", content=_npy(big), headers={**AUTH, "Content-Type": NPY})
    assert r.status_code == 413 and _code(r) == "too_large"
    # no Content-Length (a chunked body): refused while reading
    r = client.post("/add", content=iter([_npy(big)[:3000], _npy(big)[3000:]]), headers={**AUTH, "Content-Type": NPY})
    assert r.status_code == 413 and _code(r) == "too_large" and len(mem) == 200
    r = client.get("/nowhere", headers=AUTH)
    assert r.status_code == 404 and _code(r) == "not_found"
    r = client.get("/search", headers=AUTH)
    assert r.status_code == 405 and _code(r) == "method_not_allowed"


def test_a_bug_is_a_500_without_traceback(mem: VectorMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("secret internals /home/x.py line 3")

    monkeypatch.setattr(mem, "search", broken)
    client = TestClient(create_app(mem, api_key=KEY), raise_server_exceptions=False)
    r = client.post("/search", json={"query": [1.0] * DIM, "k": 3}, headers=AUTH)
    assert r.status_code == 500 and _code(r) == "internal"
    assert "secret" not in r.text and "Traceback" not in r.text


def test_metrics_count_requests_and_the_store(client: TestClient) -> None:
    client.post("/search", json={"query": [1.0] * DIM, "k": 3}, headers=AUTH)
    client.post("/search", json={"query": [1.0] * DIM, "k": 0}, headers=AUTH)
    client.get("/count")
    text = client.get("/metrics", headers=AUTH).text
    assert 'headwise_requests_total{endpoint="/search",status="200"} 1' in text
    assert 'headwise_requests_total{endpoint="/search",status="400"} 1' in text
    assert 'headwise_requests_total{endpoint="/count",status="401"} 1' in text
    assert 'headwise_request_seconds_bucket{endpoint="/search",le="+Inf"} 2' in text
    assert "headwise_store_records 200" in text


def test_serve_without_a_key_binds_only_loopback(tmp_path: Path) -> None:
    _store(10, path=tmp_path / "mem").close()
    runner = CliRunner()
    r = runner.invoke(cli_app, ["serve", "--store", str(tmp_path / "mem"), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert r.output.startswith("error: --host: expected a loopback address")
    key = tmp_path / "key"
    key.write_text("  \n")
    key.chmod(0o600)
    r = runner.invoke(
        cli_app, ["serve", "--store", str(tmp_path / "mem"), "--host", "0.0.0.0", "--api-key-file", str(key)]
    )
    assert r.exit_code == 2 and "empty" in r.output and r.output.count("\n") == 1
    key.write_text(KEY)
    key.chmod(0o644)
    r = runner.invoke(cli_app, ["serve", "--store", str(tmp_path / "mem"), "--api-key-file", str(key)])
    assert r.exit_code == 2 and "world-readable" in r.output


class _HashEncoder:
    """A tiny offline TextEncoder: a text's vector is seeded by its characters."""

    dim = DIM

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([np.random.default_rng(sum(map(ord, t))).standard_normal(DIM) for t in texts]).astype(
            np.float32
        )


def test_texts_go_through_the_store_encoder() -> None:
    mem = VectorMemory(DIM, metric="cosine", encoder=_HashEncoder())
    client = TestClient(create_app(mem, api_key=None))  # no key: every endpoint is open (loopback only via the CLI)
    body = {"texts": ["alpha", "beta", "gamma"], "metadata": [{"n": 0}, {"n": 1}, {"n": 2}]}
    assert client.post("/add", json=body).json() == {"ids": [0, 1, 2]}
    hits = client.post("/search", json={"text": "beta", "k": 2, "filter": {"n": {"$gte": 1}}}).json()["hits"]
    want = mem.search_text("beta", 2, filter={"n": {"$gte": 1}})
    assert hits == [{"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata} for h in want]
    assert hits[0]["text"] == "beta"


def test_importing_headwise_does_not_import_the_server_dependencies() -> None:
    code = (
        "import sys, headwise, headwise.memory, headwise.cli; "
        "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'httpx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_remote_memory_mirrors_the_store(mem: VectorMemory) -> None:
    q = np.random.default_rng(3).standard_normal((4, DIM)).astype(np.float32)
    with serving(mem) as url, RemoteMemory(url, api_key=KEY) as remote:
        assert len(remote) == 200
        for args in ((q, 5), (q[0], 300), (q, 4, {"g": 2})):
            flt = args[2] if len(args) > 2 else None
            want, got = mem.search(args[0], args[1], filter=flt), remote.search(args[0], args[1], filter=flt)
            for w, g in zip(want, got):
                assert g.dtype == w.dtype and g.shape == w.shape
                np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(remote.search_batch(q, 3)[1], mem.search_batch(q, 3)[1])
        with pytest.raises(HeadwiseError, match="2-d"):
            remote.search_batch(q[0], 3)
        ids = remote.add(q[:2], ids=[500, 501])
        assert ids.dtype == np.int64 and ids.tolist() == [500, 501]
        assert remote.add(q[2:], metadata=[{"n": 1}, {"n": 2}], texts=["a", "b"]).tolist() == [502, 503]
        recs = remote.get([500, 503, 7777])
        assert recs[2] is None and recs[1].metadata == {"n": 2} and recs[1].text == "b"
        np.testing.assert_array_equal(recs[0].vector, mem.get([500])[0].vector)
        assert remote.delete([500, 501, 7777]) == 2 and len(remote) == len(mem) == 202
        with pytest.raises(HeadwiseError, match="k: expected"):
            remote.search(q, 0)
        with pytest.raises(HeadwiseError, match="already stored|duplicate"):
            remote.add(q[2], ids=[502])
        with RemoteMemory(url, api_key="wrong") as bad, pytest.raises(HeadwiseError, match="401 unauthorized"):
            len(bad)


@pytest.mark.slow
def test_concurrent_searches_are_exact_and_error_free() -> None:
    mem = _store(117_659, dim=32, seed=4)  # the size of the WordNet corpus; random vectors
    queries = np.random.default_rng(5).standard_normal((8, 200, 32)).astype(np.float32)
    want = [[mem.search(q, 10) for q in block] for block in queries]
    errors: list[BaseException] = []

    def worker(t: int) -> int:
        done = 0
        with RemoteMemory(url, api_key=KEY) as remote:
            for i, q in enumerate(queries[t]):
                try:
                    scores, ids = remote.search(q, 10)
                    np.testing.assert_array_equal(ids, want[t][i][1])
                    np.testing.assert_array_equal(scores, want[t][i][0])
                    done += 1
                except BaseException as exc:  # noqa: BLE001 - every failure is counted and shown
                    errors.append(exc)
        return done

    with serving(mem) as url, ThreadPoolExecutor(8) as pool:
        done = sum(pool.map(worker, range(8)))
    assert not errors, errors[:3]
    assert done == 8 * 200


@pytest.mark.slow
def test_the_real_serve_process_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    store = tmp_path / "mem"
    _store(50, path=store).close()
    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    port = free_port()
    proc = start_serve_process(store, key, port)
    try:
        remote = RemoteMemory(f"http://127.0.0.1:{port}", api_key=KEY, timeout=5)
        n = wait_listening(proc, remote)
        assert n == 50
        assert remote.add(np.ones((1, DIM), dtype=np.float32)).tolist() == [50]
        remote.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        # uvicorn drains, runs the shutdown, then re-raises SIGTERM: -15 is its clean exit
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "Application shutdown complete" in out
        assert KEY not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the lifespan closed the store: the writer lock is free and the add is durable
    with VectorMemory.open(store, lock_timeout=1) as mem:
        assert len(mem) == 51


@pytest.mark.slow
def test_sigkill_under_write_load_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """Four clients add (and upsert) as fast as they can; the server is SIGKILLed mid-stream; every
    write it acknowledged is in the reopened store, bit for bit, and the store verifies clean."""
    store = tmp_path / "mem"
    _store(20, path=store).close()
    key = tmp_path / "key"
    key.write_text(KEY)
    key.chmod(0o600)
    port = free_port()
    acknowledged: dict[int, np.ndarray] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def writer(t: int) -> None:
        rng = np.random.default_rng(t)
        with RemoteMemory(f"http://127.0.0.1:{port}", api_key=KEY, timeout=10) as remote:
            for i in range(100_000):
                if stop.is_set():
                    return
                ids = [1000 + 100_000 * t + 2 * i, 1000 + 100_000 * t + 2 * i + 1]
                x = rng.standard_normal((2, DIM)).astype(np.float32)
                try:
                    (remote.upsert if i % 2 else remote.add)(x, ids)
                except Exception:  # noqa: BLE001 - the kill cuts requests in flight: not acknowledged
                    return
                with lock:
                    acknowledged.update({ids[0]: x[0], ids[1]: x[1]})

    proc = start_serve_process(store, key, port)  # the try below always stops it
    try:
        with RemoteMemory(f"http://127.0.0.1:{port}", api_key=KEY, timeout=5) as probe:
            assert wait_listening(proc, probe) == 20
        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no shutdown, no close, no checkpoint
        proc.wait(10)
        stop.set()
        for th in threads:
            th.join(15)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acknowledged) >= 200, "the writers did not get going"
    with VectorMemory.open(store, lock_timeout=5) as mem:
        ids = np.array(sorted(acknowledged))
        got = mem.vectors(ids)
        want = np.stack([acknowledged[i] / np.linalg.norm(acknowledged[i]) for i in ids.tolist()])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert len(mem) >= 20 + len(acknowledged)
        assert mem.verify().ok


@pytest.mark.slow
def test_bench_serve_measures_every_configuration_against_in_process(tmp_path: Path) -> None:
    from headwise.bench.serve import CONFIGS, run, to_markdown

    result = run(n=600, dim=8, index="hnsw", k=5, batch=16, seconds=0.05, repeats=1, vectors=None,
                 command="headwise bench serve --n 600")  # fmt: skip
    assert [(r["config"], r["clients"]) for r in result["rows"]] == list(CONFIGS)
    assert all(r["qps_median"] > 0 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] for r in result["rows"])
    assert [g[0][:6] for g in result["goals"]] == ["binary", "single"]
    md = to_markdown(result)
    assert "| http binary batch | 8 |" in md and "headwise bench serve --n 600" in md
