"""``headwise bench serve``: search over HTTP (``headwise serve``) against in-process search, in one run.

A store of ``n`` vectors is built on disk and served by the real ``headwise serve`` command in a
child process (loopback, with an API key, as a user runs it); the bench process is the client.
In the same rounds it times the same store opened in process (read-only). Configurations:

- ``in-process single`` / ``in-process batch``: ``VectorMemory.search`` of one query, and
  ``search_batch`` of ``batch`` queries;
- ``http json single`` / ``http json batch``: ``POST /search`` with a JSON body;
- ``http binary single`` / ``http binary batch``: raw float32 with an ``X-Shape`` header, raw
  (score, id) records back (what :class:`~headwise.memory.RemoteMemory` sends), with 1 and with
  8 concurrent clients (threads of the bench process, each with its own connection).

Every configuration runs for ``seconds`` per round, ``repeats`` rounds, the order rotating each
round; throughput is queries per second (median over rounds, min..max beside it), latencies are
per request (p50 / p95 / p99 pooled over the rounds). The goals of issue #21: binary batched
search over HTTP at least 50% of in-process batched throughput, and single-query p50 under 2 ms.

Shapes: store (n, dim) float32, queries (Q, dim) float32.

Example (a tiny run; the committed figures use the defaults)::

    headwise bench serve --n 2000 --dim 32 --seconds 0.5 --repeats 1 --report /tmp/serve
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from headwise.bench.harness import Timing, machine_info
from headwise.errors import HeadwiseError
from headwise.server.wire import HITS_DTYPE, RAW, SHAPE_HEADER, from_raw, raw_bytes

KEY = "bench-" + "0" * 26
CONFIGS = (
    ("in-process single", 1),
    ("in-process batch", 1),
    ("http json single", 1),
    ("http binary single", 1),
    ("http binary single", 8),
    ("http json batch", 1),
    ("http binary batch", 1),
    ("http binary batch", 8),
)


def build_store(path: Path, vectors: np.ndarray, index: str, progress: Callable[[int], None] | None = None) -> None:
    """A cosine store of ``vectors`` (n, d) at ``path``, added in chunks, closed."""
    from headwise.memory.store import VectorMemory

    with VectorMemory(vectors.shape[1], metric="cosine", index=index, path=path) as mem:
        for s in range(0, len(vectors), 10_000):
            mem.add(vectors[s : s + 10_000])
            if progress:
                progress(min(len(vectors), s + 10_000))


def free_loopback_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    """``headwise serve`` on a free loopback port; (process, url) once it answers."""
    import httpx

    key = workdir / "key"
    key.write_text(KEY)
    key.chmod(0o600)
    port = free_loopback_port()
    cmd = [sys.executable, "-m", "headwise.cli", "serve", "--store", str(store), "--port", str(port),
           "--api-key-file", str(key)]  # fmt: skip
    log = open(workdir / "server.log", "w")  # noqa: SIM115 - closed with the process, see stop_server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise HeadwiseError(f"headwise serve did not start: {(workdir / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _caller(kind: str, url: str, k: int) -> tuple[Callable[[np.ndarray], Any], Callable[[], None]]:
    """(search function of a (n, d) or (d,) query block, close) for one client of ``kind``."""
    import httpx

    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    if kind == "json":

        def call(q: np.ndarray) -> Any:
            r = http.post("/search", json={"query": q.tolist(), "k": k})
            r.raise_for_status()
            return r.json()["ids"]

    else:

        def call(q: np.ndarray) -> Any:
            body, shape = raw_bytes(q)
            r = http.post("/search", content=body, params={"k": str(k)},
                          headers={"Content-Type": RAW, SHAPE_HEADER: shape})  # fmt: skip
            r.raise_for_status()
            return from_raw(r.content, r.headers[SHAPE_HEADER], HITS_DTYPE)["id"]

    return call, http.close


def _timed_loop(call: Callable[[np.ndarray], Any], blocks: list[np.ndarray], seconds: float) -> tuple[int, list[float]]:
    """Call on successive blocks until ``seconds`` pass: (queries done, per-call latencies)."""
    lat: list[float] = []
    done, i = 0, 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        q = blocks[i % len(blocks)]
        t0 = time.perf_counter()
        call(q)
        lat.append(time.perf_counter() - t0)
        done += 1 if q.ndim == 1 else len(q)
        i += 1
    return done, lat


def run_config(name: str, clients: int, mem: Any, url: str, queries: np.ndarray, k: int, batch: int,
               seconds: float) -> tuple[float, list[float]]:  # fmt: skip
    """One timed round of one configuration: (queries per second, latencies in seconds)."""
    single = name.endswith("single")
    blocks = list(queries) if single else [queries[s : s + batch] for s in range(0, len(queries) - batch + 1, batch)]
    if name.startswith("in-process"):
        fn = (lambda q: mem.search(q, k)) if single else (lambda q: mem.search_batch(q, k))
        start = time.perf_counter()
        done, lat = _timed_loop(fn, blocks, seconds)
        return done / (time.perf_counter() - start), lat
    kind = "json" if " json " in name else "binary"
    results: list[tuple[int, list[float]]] = []
    errors: list[BaseException] = []
    callers = [_caller(kind, url, k) for _ in range(clients)]

    def worker(c: int) -> None:
        try:  # each client starts at its own offset, so they do not ask the same query at once
            mine = blocks[c * len(blocks) // clients :] + blocks[: c * len(blocks) // clients]
            results.append(_timed_loop(callers[c][0], mine, seconds))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after every thread stopped
            errors.append(exc)

    for call, _ in callers:  # one warm request per connection
        call(blocks[0])
    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for _, close in callers:
        close()
    if errors:
        raise HeadwiseError(f"bench serve: {name} with {clients} clients failed: {errors[0]!r}")
    return sum(d for d, _ in results) / elapsed, [x for _, lat in results for x in lat]


def check_same_results(mem: Any, url: str, queries: np.ndarray, k: int) -> None:
    """The served ids equal the in-process ids (JSON and binary), before anything is timed."""
    want = mem.search(queries[:64], k)[1]
    for kind in ("json", "binary"):
        call, close = _caller(kind, url, k)
        got = np.asarray(call(queries[:64]))
        close()
        if not np.array_equal(got, want):
            raise HeadwiseError(f"bench serve: the server's {kind} answers differ from in-process search")


def summarise(rounds: dict[tuple[str, int], list[tuple[float, list[float]]]]) -> list[dict[str, Any]]:
    """One row per configuration: throughput median/min/max over rounds, pooled latency percentiles (ms)."""
    rows = []
    for (name, clients), runs in rounds.items():
        qps = [r[0] for r in runs]
        lat = Timing([x for r in runs for x in r[1]])  # the harness's nearest-rank percentiles
        rows.append({"config": name, "clients": clients, "qps_median": statistics.median(qps), "qps_min": min(qps),
                     "qps_max": max(qps), "p50_ms": 1e3 * lat.percentile(50), "p95_ms": 1e3 * lat.p95,
                     "p99_ms": 1e3 * lat.p99, "requests": len(lat.times)})  # fmt: skip
    return rows


def goals(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for the two goals of the serve bench."""
    by = {(r["config"], r["clients"]): r for r in rows}
    base = by[("in-process batch", 1)]["qps_median"]
    best = max(by[("http binary batch", c)]["qps_median"] for c in (1, 8))
    p50 = by[("http binary single", 1)]["p50_ms"]
    return [
        ("binary batched HTTP >= 50% of in-process batched throughput", f"{best / base:.0%}", best / base >= 0.5),
        ("single-query p50 over HTTP (binary, 1 client) < 2 ms", f"{p50:.2f} ms", p50 < 2.0),
    ]


def to_markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        "# headwise serve against in-process search",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Store: {s['n']:,} vectors of dimension {s['dim']} ({s['source']}), cosine, index `{s['index']}`; "
        f"k = {s['k']}, batches of {s['batch']}; {s['repeats']} rounds of {s['seconds']} s per configuration, "
        f"order rotated; server: `headwise serve` in a child process on loopback with an API key; clients: "
        f"threads of the bench process (httpx). Load average before: {result['load_before'][0]:.2f}.",
        "",
        "| configuration | clients | queries/s (median) | min .. max | vs in-process batch | p50 ms | p95 ms "
        "| p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = next(r for r in result["rows"] if r["config"] == "in-process batch")["qps_median"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['clients']} | {r['qps_median']:,.0f} | {r['qps_min']:,.0f} .. "
                     f"{r['qps_max']:,.0f} | {r['qps_median'] / base:.2f}x | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} |")  # fmt: skip
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {'yes' if ok else 'no'} |" for g, m, ok in result["goals"]]
    lines += ["", f"Machine: {json.dumps(result['machine'])}", ""]
    return "\n".join(lines)


def run(*, n: int, dim: int, index: str, k: int, batch: int, seconds: float, repeats: int, vectors: Path | None,
        command: str, progress: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Build, serve and time; the result dict that :func:`to_markdown` renders."""
    from headwise.memory.store import VectorMemory

    say = progress or (lambda _msg: None)
    rng = np.random.default_rng(0)
    if vectors is not None:
        data = np.load(vectors, mmap_mode="r", allow_pickle=False)
        if data.ndim != 2 or len(data) < n + 2 * batch:
            raise HeadwiseError(f"--vectors: expected a (N, d) .npy with N >= {n + 2 * batch}, got {data.shape}")
        pick = rng.permutation(len(data))
        docs = np.asarray(data[np.sort(pick[:n])], np.float32)
        queries = np.asarray(data[pick[n : n + 2048]], np.float32)
        source, dim = str(vectors), data.shape[1]
    else:
        docs = rng.standard_normal((n, dim), dtype=np.float32)
        queries = rng.standard_normal((2048, dim), dtype=np.float32)
        source = "random normal"
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory(prefix="headwise-bench-serve-") as tmp:
        work = Path(tmp)
        say(f"building a {index} store of {n:,} x {dim}")
        build_store(work / "store", docs, index)
        del docs
        proc, url = start_server(work / "store", work)
        try:
            with VectorMemory.open(work / "store", read_only=True) as mem:
                check_same_results(mem, url, queries, k)
                load_before = os.getloadavg()
                rounds: dict[tuple[str, int], list[tuple[float, list[float]]]] = {c: [] for c in CONFIGS}
                for r in range(repeats):
                    order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
                    for name, clients in order:
                        say(f"round {r + 1}/{repeats}: {name}, {clients} client(s)")
                        rounds[(name, clients)].append(run_config(name, clients, mem, url, queries, k, batch, seconds))
        finally:
            stop_server(proc)
    rows = summarise(rounds)
    setup = {"n": n, "dim": dim, "index": index, "k": k, "batch": batch, "seconds": seconds, "repeats": repeats,
             "source": source}  # fmt: skip
    return {"command": command, "setup": setup, "rows": rows, "goals": goals(rows), "machine": machine_info(),
            "load_before": load_before}  # fmt: skip
