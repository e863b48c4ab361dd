"""Helpers for the tests of ``headwise serve``: a free loopback port, uvicorn in a thread, the real process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from headwise.bench.serve import free_loopback_port as free_port  # noqa: F401 - re-exported for the tests

KEY = "test-key-0123456789"


@contextmanager
def serving(mem, api_key: str | None = KEY) -> Iterator[str]:  # noqa: ANN001 - a VectorMemory
    """uvicorn over ``mem`` on a free loopback port in a thread; yields its URL."""
    import uvicorn

    from headwise.server.app import create_app

    port = free_port()
    config = uvicorn.Config(create_app(mem, api_key=api_key), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def start_serve_process(store: Path, key_file: Path, port: int) -> subprocess.Popen:
    """The real ``headwise serve`` command as a child process (one OpenMP thread)."""
    cmd = [sys.executable, "-m", "headwise.cli", "serve", "--store", str(store), "--port", str(port),
           "--api-key-file", str(key_file)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def wait_listening(proc: subprocess.Popen, remote, timeout: float = 60) -> int:  # noqa: ANN001 - a RemoteMemory
    """Poll ``len(remote)`` until the server answers; its count."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return len(remote)
        except Exception:  # noqa: BLE001 - not listening yet
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
