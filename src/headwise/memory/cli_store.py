"""``headwise memory create | add | query | info | delete | export | import | compact``: a store from the shell.

These commands work on a :class:`~headwise.memory.store.VectorMemory` directory of your own
(not on the working directories of ``build`` / ``train`` / ``eval``). Each prints a table, or
one JSON document on stdout with ``--json``; a refused command prints one line
``error: ...`` on stderr and exits with status 2 (docs/cli.md). Readers (``query``, ``info``,
``export``) open the store read-only, so they run beside a writer; the others take the
writer lock and save the index before they return, so the next open is fast.

Example::

    headwise memory create mem --dim 384 --index hnsw
    headwise memory add mem --file notes.jsonl          # {"text": "...", "metadata": {...}} per line
    headwise memory query mem "how do I undo a commit" --k 5 --filter '{"lang": "en"}'
    headwise memory export mem --to mem.parquet && headwise memory import copy --from mem.parquet
"""

from __future__ import annotations

import inspect
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from headwise.cliutil import in_dir, in_file, int_in, out_dir, out_file, reports_errors
from headwise.errors import bad_argument
from headwise.memory.checks import MAX_ID, MAX_K
from headwise.memory.cli import console, memory_app

JsonFlag = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout instead of a table")]
StoreDir = Annotated[Path, typer.Argument(help="a VectorMemory directory")]

#: Text cells are cut to this many characters in tables (--json prints them whole).
CELL = 70
#: Seconds a writer command waits for another writer to close the store (the store's default).
LOCK_TIMEOUT = 5.0


def _encoder() -> Any:
    """The text encoder of ``query TEXT`` and of records without a vector (MiniLM, 384-d; loads on first use)."""
    from headwise.memory.encoder import MiniLMEncoder

    return MiniLMEncoder(progress=False)


def _emit(as_json: bool, doc: dict[str, Any], table: Table | None) -> None:
    if as_json:
        typer.echo(json.dumps(doc, ensure_ascii=False))
    elif table is not None:
        console.print(table)


def _kv_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("")
    table.add_column("", justify="right")
    for key, value in rows.items():
        table.add_row(
            key.replace("_", " "), "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)
        )
    return table


def _progress(what: str) -> Progress:
    # On stderr, so that --json keeps stdout for its one document; only on a terminal, so that
    # a refused command's stderr is its one error line.
    err = Console(stderr=True)
    cols = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*cols, console=err, transient=True, disable=not err.is_terminal)


def _open(directory: Path, *, writer: bool) -> Any:
    from headwise.memory import VectorMemory

    in_dir(directory, "DIR")
    return VectorMemory.open(directory, read_only=not writer, lock_timeout=LOCK_TIMEOUT)


def _new_dir(directory: Path) -> Path:
    """DIR for a new store: new, or an empty directory (checked before any work)."""
    out_dir(directory, "DIR")
    if directory.is_dir() and any(directory.iterdir()):
        raise bad_argument("DIR", "a new or empty directory", f"{directory}, which is not empty")
    return directory


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= CELL else text[: CELL - 1] + "…"


@memory_app.command("create")
@reports_errors
def create(
    directory: StoreDir,
    dim: Annotated[int, typer.Option(help="vector dimension (384 for MiniLM texts)")],
    metric: Annotated[str, typer.Option(help="cosine, ip or l2")] = "cosine",
    index: Annotated[str, typer.Option(help="flat (exact), hnsw or hnsw-fp16")] = "flat",
    hnsw_m: Annotated[int, typer.Option(help="HNSW graph degree M")] = 32,
    ef_construction: Annotated[int, typer.Option(help="HNSW build beam width")] = 200,
    ef_search: Annotated[int, typer.Option(help="HNSW search beam width")] = 64,
    as_json: JsonFlag = False,
) -> None:
    """Create an empty store in DIR (new or empty)."""
    from headwise.memory import VectorMemory

    _new_dir(directory)
    int_in("--dim", dim, 1, 65536)  # a 65,536-d float32 vector is 256 KB: beyond any embedding model
    mem = VectorMemory(dim, metric=metric, index=index, path=directory, hnsw_m=hnsw_m,
                       ef_construction=ef_construction, ef_search=ef_search)  # fmt: skip
    with mem:
        doc = _info(mem)
    _emit(as_json, doc, _kv_table(f"created {directory}", doc))


@memory_app.command("add")
@reports_errors
def add(
    directory: StoreDir,
    file: Annotated[
        Path, typer.Option(help='records: JSONL(.gz) {"id"?, "vector"?, "text"?, "metadata"?}, .npy, .parquet')
    ],
    as_json: JsonFlag = False,
) -> None:
    """Add the records of --file to the store in DIR (texts without vectors are encoded with MiniLM)."""
    from headwise.memory.export import add_records
    from headwise.memory.records_io import read_records

    in_file(file, "--file")
    with _open(directory, writer=True) as mem:
        records = read_records(file, dim=mem.dim)
        t0 = time.perf_counter()
        with _progress(f"adding {len(records):,} records") as bar:
            task = bar.add_task("add", total=len(records))
            ids = add_records(
                mem, records, encoder=_encoder(), progress=lambda done, _: bar.update(task, completed=done)
            )
        mem.save()
        doc = {"added": len(ids), "first_id": int(ids.min()) if len(ids) else None,
               "last_id": int(ids.max()) if len(ids) else None, "count": len(mem),
               "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    _emit(as_json, doc, _kv_table(f"added {file.name} to {directory}", doc))


def _filter_arg(text: str | None) -> dict[str, Any] | None:
    """--filter JSON as a dict, refused here when this store's search takes no filter."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_argument(
            "--filter", 'a JSON object such as \'{"lang": "en"}\'', f"invalid JSON ({exc.msg})"
        ) from None
    if not isinstance(value, dict):
        raise bad_argument("--filter", 'a JSON object such as \'{"lang": "en"}\'', type(value).__name__)
    from headwise.memory import VectorMemory

    if "filter" not in inspect.signature(VectorMemory.search).parameters:
        raise bad_argument("--filter", "a headwise whose VectorMemory.search takes filter= (metadata filters)", "none")
    return value


def _query_vectors(text: str | None, vector_file: Path | None, dim: int) -> np.ndarray:
    if (text is None) == (vector_file is None):
        raise bad_argument("QUERY / --vector-file", "exactly one of them", "both" if text is not None else "neither")
    if vector_file is not None:
        try:
            arr = np.load(in_file(vector_file, "--vector-file"), allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise bad_argument("--vector-file", "a plain .npy array (no pickle)", f"{vector_file}: {exc}") from None
        if arr.ndim not in (1, 2) or arr.shape[-1] != dim or arr.dtype.kind not in "fiu" or arr.size == 0:
            raise bad_argument(
                "--vector-file", f"a ({dim},) or (n, {dim}) array of numbers", f"{arr.dtype} {arr.shape}"
            )
        return np.atleast_2d(arr).astype(np.float32)
    if not text.strip():
        raise bad_argument("QUERY", "a non-empty text", repr(text))
    if dim != 384:  # MiniLM makes 384-d vectors
        want = "a store of dim 384 for a text (encoded with MiniLM), or --vector-file"
        raise bad_argument("QUERY", want, f"a text for a store of dim {dim}")
    return _encoder().encode([text])


@memory_app.command("query")
@reports_errors
def query(
    directory: StoreDir,
    text: Annotated[str | None, typer.Argument(help="a text query (MiniLM, 384-d stores)")] = None,
    vector_file: Annotated[
        Path | None, typer.Option(help="query vectors instead: .npy of shape (d,) or (n, d)")
    ] = None,
    k: Annotated[int, typer.Option(help=f"results per query, 1 to {MAX_K:,}")] = 10,
    filter: Annotated[
        str | None, typer.Option(help='only records whose metadata match, e.g. \'{"lang": "en"}\'')
    ] = None,
    enhance: Annotated[bool, typer.Option(help="use the enhancer saved next to the store (DIR/enhancer)")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Search the store in DIR (read-only) for a text or for the vectors of --vector-file."""
    from headwise.memory.fit import load_saved_enhancer

    int_in("--k", k, 1, MAX_K)
    flt = _filter_arg(filter)
    with _open(directory, writer=False) as mem:
        q = _query_vectors(text, vector_file, mem.dim)
        if enhance:
            if not (directory / "enhancer" / "enhancer.json").is_file():
                raise bad_argument("--enhance", f"an enhancer saved next to the store ({directory}/enhancer)", "none")
            load_saved_enhancer(mem)
        extra = {"filter": flt} if flt is not None else {}
        scores, ids = mem.search(q, k, enhance=enhance, **extra)
        found = ids[ids >= 0]
        records = {r.id: r for r in mem.get(np.unique(found)) if r is not None}
    results = [
        [{"rank": rank, "id": int(i), "score": float(s), "text": records[int(i)].text,
          "metadata": records[int(i)].metadata}
         for rank, (i, s) in enumerate(((i, s) for i, s in zip(row_ids, row_scores) if i >= 0), 1)]
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist())
    ]  # fmt: skip
    if as_json:
        _emit(True, {"k": k, "enhanced": enhance, "filter": flt, "results": results}, None)
        return
    for n, hits in enumerate(results):
        label = repr(text) if text is not None else f"{vector_file.name} row {n}"
        table = Table(title=f"{label}: {len(hits)} of k={k}" + (" (enhanced)" if enhance else ""))
        for col in ("rank", "id", "score", "text", "metadata"):
            table.add_column(col, justify="right" if col in ("rank", "id", "score") else "left")
        for h in hits:
            table.add_row(str(h["rank"]), str(h["id"]), f"{h['score']:.4f}", _short(h["text"] or ""),
                          _short(h["metadata"]) if h["metadata"] is not None else "")  # fmt: skip
        console.print(table)


def _info(mem: Any) -> dict[str, Any]:
    from headwise.memory.export import store_config

    directory = Path(mem.path)
    manifest = json.loads((directory / "manifest.json").read_text())
    saved = None
    if manifest.get("index") is not None:  # save() wrote an index: the manifest was replaced then
        saved = datetime.fromtimestamp((directory / "manifest.json").stat().st_mtime, UTC).isoformat(timespec="seconds")
    enhancer = None
    enh_file = directory / "enhancer" / "enhancer.json"
    if enh_file.is_file():
        try:
            cfg = json.loads(enh_file.read_text())
            enhancer = cfg.get("mechanism") or cfg.get("class") or "present"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            enhancer = "unreadable"
    index = getattr(mem, "_index", None)  # slots and tombstones: the index's own counts
    slots = int(index.n_slots) if index is not None else len(mem)
    return {
        "path": str(directory),
        "count": len(mem),
        **store_config(mem),
        "slots": slots,
        "tombstones": slots - len(mem),
        "bytes_on_disk": sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()),
        "enhancer": enhancer,
        "last_save": saved,
        "feedback_pairs": len(mem.feedback()),
    }


@memory_app.command("info")
@reports_errors
def info(directory: StoreDir, as_json: JsonFlag = False) -> None:
    """Describe the store in DIR (read-only): size, configuration, files, enhancer, last save."""
    with _open(directory, writer=False) as mem:
        doc = _info(mem)
    _emit(as_json, doc, _kv_table(f"store {directory}", doc))


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise bad_argument("--ids", "comma-separated integers such as 3,17,42", repr(text)) from None
    if not ids or any(not 0 <= i < MAX_ID for i in ids):
        raise bad_argument("--ids", "one or more ids in [0, 2**63 - 1)", repr(text))
    return ids


@memory_app.command("delete")
@reports_errors
def delete(
    directory: StoreDir,
    ids: Annotated[str, typer.Option(help="comma-separated ids, e.g. 3,17,42 (absent ids are ignored)")],
    as_json: JsonFlag = False,
) -> None:
    """Delete records from the store in DIR."""
    id_list = _id_list(ids)
    with _open(directory, writer=True) as mem:
        deleted = mem.delete(id_list)
        mem.save()
        doc = {"deleted": deleted, "not_found": len(set(id_list)) - deleted, "count": len(mem)}
    _emit(as_json, doc, _kv_table(f"deleted from {directory}", doc))


@memory_app.command("export")
@reports_errors
def export(
    directory: StoreDir,
    to: Annotated[Path, typer.Option(help="FILE.parquet, FILE.jsonl or FILE.jsonl.gz")],
    as_json: JsonFlag = False,
) -> None:
    """Write every record of the store in DIR, and its configuration, to one file (read-only)."""
    from headwise.memory.export import _format, export_store

    _format(out_file(to, "--to"), "--to")
    with _open(directory, writer=False) as mem, _progress(f"exporting {len(mem):,} records") as bar:
        task = bar.add_task("export", total=len(mem))
        n = export_store(mem, to, progress=lambda done, _: bar.update(task, completed=done))
    doc = {"exported": n, "file": str(to), "bytes": to.stat().st_size}
    _emit(as_json, doc, _kv_table(f"exported {directory}", doc))


@memory_app.command("import")
@reports_errors
def import_(
    directory: StoreDir,
    from_: Annotated[Path, typer.Option("--from", help="a file written by export (or any file that add reads)")],
    index: Annotated[str | None, typer.Option(help="index kind instead of the exported one")] = None,
    metric: Annotated[str | None, typer.Option(help="metric instead of the exported one (default cosine)")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a new store in DIR (new or empty) from an exported file: the same records and configuration."""
    from headwise.memory.export import import_store

    in_file(from_, "--from")
    _new_dir(directory)
    with _progress("importing") as bar:
        task = bar.add_task("import", total=None)
        mem = import_store(from_, directory, index=index, metric=metric, encoder=_encoder(),
                           progress=lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip
    with mem:
        doc = _info(mem)
    _emit(as_json, doc, _kv_table(f"imported {from_.name} into {directory}", doc))


@memory_app.command("compact")
@reports_errors
def compact(directory: StoreDir, as_json: JsonFlag = False) -> None:
    """Rebuild the index of the store in DIR without the slots of deleted records, and save it."""
    with _open(directory, writer=True) as mem:
        before, after = mem.compact()
        mem.save()
        doc = {"slots_before": int(before), "slots_after": int(after), "count": len(mem)}
    _emit(as_json, doc, _kv_table(f"compacted {directory}", doc))
