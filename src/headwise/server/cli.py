"""``headwise serve``: one store as an authenticated HTTP service (uvicorn; see docs/cli.md).

The key comes from a file (``--api-key-file``), never from the command line or the
environment, so it does not show in ``ps`` or in shell history, and it is never logged.
Without a key the server binds only a loopback address: an open store on a network
interface would let anyone on it read and delete every record.

Example::

    umask 077 && python -c "import secrets; print(secrets.token_urlsafe(32))" > key.txt
    headwise serve --store mem --host 0.0.0.0 --port 8000 --api-key-file key.txt
"""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path
from typing import Annotated

import typer

from headwise.cliutil import fail, in_dir, in_file, int_in, reports_errors

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine: ``localhost``, 127.0.0.0/8 or ::1.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0"), is_loopback("example.org")
    (True, True, False, False)
    """
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key(path: Path) -> str:
    """The key in ``path`` (surrounding whitespace stripped); refuses an empty or world-readable file."""
    in_file(path, "--api-key-file")
    if path.stat().st_mode & stat.S_IROTH:
        fail(f"--api-key-file: expected a file other users cannot read (chmod 600), got {path} (world-readable)")
    key = path.read_text().strip()
    if not key:
        fail(f"--api-key-file: expected a file holding the key, got {path} (empty)")
    return key


@reports_errors
def serve(
    store: Annotated[Path, typer.Option("--store", help="the VectorMemory directory to serve (opened as its writer)")],
    host: Annotated[str, typer.Option(help="address to bind; without --api-key-file only loopback")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key_file: Annotated[
        Path | None, typer.Option("--api-key-file", help="a file holding the key clients send as 'Bearer <key>'")
    ] = None,
    enhancer: Annotated[Path | None, typer.Option(help="an enhancer directory to load into the store")] = None,
    minilm: Annotated[bool, typer.Option("--minilm", help="encode texts (add texts, search text) with MiniLM")] = False,
    max_body_mb: Annotated[int, typer.Option("--max-body-mb", help="largest request body, MiB")] = 64,
    public_docs: Annotated[
        bool, typer.Option("--public-docs", help="serve /docs and /openapi.json without the key (they hold no data)")
    ] = False,
) -> None:
    """Serve a store over HTTP: /search, /add, /upsert, /update_metadata, /get, /delete, /feedback, /count, /metrics."""
    int_in("--port", port, 0, 65535)
    int_in("--max-body-mb", max_body_mb, 1, 4096)
    in_dir(store, "--store")
    key = None if api_key_file is None else read_api_key(api_key_file)
    if key is None and not is_loopback(host):
        fail(f"--host: expected a loopback address (127.0.0.1, ::1, localhost) without --api-key-file, got {host}")
    if enhancer is not None:
        in_dir(enhancer, "--enhancer")
    # The server's dependencies load only here: `import headwise` and the other commands never need them.
    try:
        import uvicorn

        from headwise.server.app import create_app
    except ImportError as exc:
        fail(f"headwise serve: expected the server extra (pip install 'headwise[server]'), got {exc}")
    from headwise.memory.store import VectorMemory

    encoder = None
    if minilm:
        from headwise.memory.encoder import MiniLMEncoder

        encoder = MiniLMEncoder()
    mem = VectorMemory.open(store, encoder=encoder)
    try:
        if enhancer is not None:
            from headwise.memory.enhancer import load_enhancer

            mem.set_enhancer(load_enhancer(enhancer))
        app = create_app(mem, api_key=key, max_body_bytes=max_body_mb * 1024 * 1024, close_store=True,
                         public_docs=public_docs)  # fmt: skip
    except BaseException:
        mem.close()
        raise
    # uvicorn handles SIGTERM / SIGINT: it stops accepting, drains the requests in flight, then
    # runs the app's shutdown, which closes the store (releasing the writer lock).
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
