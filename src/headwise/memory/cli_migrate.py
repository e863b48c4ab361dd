"""``headwise memory migrate --from SRC --to DST``: copy a store between a directory and Milvus.

SRC and DST are each a VectorMemory directory or a Milvus collection,
``milvus://HOST:PORT/COLLECTION`` (a server, over http; ``milvus+https://`` for TLS) or
``milvus://PATH.db/COLLECTION`` (a milvus-lite directory, started in this process). Records
go over in batches of ``--batch`` with their ids, metadata and texts, behind a progress bar
on a terminal (:mod:`headwise.memory.migrate`). A copy that stopped continues with
``--resume`` (the ids already copied are skipped); without it the destination must be new.
Milvus credentials come from the environment variable ``MILVUS_TOKEN`` (``user:password`` or
an API key), never from the command line. Errors are one line, exit status 2 (docs/cli.md).

Example::

    headwise memory migrate --from mem --to milvus://127.0.0.1:19530/docs
    headwise memory migrate --from milvus://127.0.0.1:19530/docs --to mem-copy --resume
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from headwise.cliutil import int_in, reports_errors
from headwise.memory.cli import memory_app
from headwise.memory.cli_store import JsonFlag, _emit, _kv_table, _progress
from headwise.memory.milvus_collection import is_location

#: The environment variable holding Milvus credentials for either side.
TOKEN_ENV = "MILVUS_TOKEN"

Location = "a store directory, milvus://HOST:PORT/COLLECTION or milvus://PATH.db/COLLECTION"


@contextmanager
def _quiet_pymilvus(used: bool) -> Iterator[None]:
    """pymilvus's own log lines off during the command (when ``used``): a failure is the command's one
    error line, which carries Milvus's message (:func:`headwise.memory.milvus_collection.milvus_errors`)."""
    if not used:
        yield
        return
    try:
        import pymilvus  # noqa: F401  (configures its loggers on import: adjust them after)
    except ImportError:  # a milvus:// side then fails with the extra to install
        yield
        return
    loggers = [logging.getLogger(name) for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@memory_app.command("migrate")
@reports_errors
def migrate_command(
    from_: Annotated[str, typer.Option("--from", help=f"the store to copy: {Location}")],
    to: Annotated[str, typer.Option(help=f"where to copy it (new, or see --resume): {Location}")],
    batch: Annotated[int, typer.Option(help="records per batch (one read and one write each)")] = 2048,
    resume: Annotated[bool, typer.Option(help="continue into an existing destination, skipping its ids")] = False,
    index: Annotated[
        str | None, typer.Option(help="the destination's index kind instead of the source's (flat, hnsw, ...)")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Copy every record (ids, vectors, metadata, texts) and the configuration from --from to --to."""
    from headwise.memory.migrate import migrate

    int_in("--batch", batch, 1, 65536)
    token = os.environ.get(TOKEN_ENV, "")
    with _quiet_pymilvus(is_location(from_) or is_location(to)), _progress("migrating") as bar:
        task = bar.add_task("migrate", total=None)
        doc = migrate(from_, to, batch=batch, resume=resume, index=index, token=token,
                      progress=lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip
    _emit(as_json, doc, _kv_table(f"migrated {from_} to {to}", doc))
