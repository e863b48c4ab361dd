"""The on-disk layout of a vector memory: manifest, creation, leftovers, loading and reconciling the index.

A store directory holds ``manifest.json`` (format name and version, and the index files
with their sha256), ``memory.sqlite`` (the records, the source of truth) and the two index
files of the last save. See :mod:`headwise.memory.store` for the crash-safety argument.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> write_manifest(d, None)
    >>> read_manifest(d)["version"], read_manifest(d)["index"]
    (1, None)
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import fsync_dir, write_atomic
from headwise.memory.index import INDEX_KINDS, METRICS, SlotIndex
from headwise.memory.storage import Storage

FORMAT = "headwise.memory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "memory.sqlite"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(directory: Path, index_entry: dict[str, Any] | None) -> None:
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "database": DATABASE, "index": index_entry}
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2).encode())


def read_manifest(directory: Path) -> dict[str, Any]:
    file = directory / MANIFEST
    if not file.is_file():
        raise HeadwiseError(f"path {directory}: expected a headwise memory directory with {MANIFEST}, got none")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeadwiseError(f"{file}: expected JSON, got unreadable content ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise HeadwiseError(f"{file}: expected format {FORMAT!r}, got {got!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise HeadwiseError(f"{file}: expected format version {FORMAT_VERSION}, got {manifest.get('version')!r}")
    _check_index_entry(manifest.get("index"), file)
    return manifest


#: The only names save() writes: a plain file name inside the store, never a path.
_INDEX_NAMES = {"file": re.compile(r"index-[0-9a-f]{16}\.faiss"), "slots_file": re.compile(r"slots-[0-9a-f]{16}\.npy")}


def _check_index_entry(entry: Any, file: Path) -> None:
    """The manifest's ``index`` is None or names two index files of this store, with checksums and counts.

    Checked before anything reads or deletes a file the manifest names: a damaged or hostile
    manifest (``"file": "/etc/passwd"`` or ``"../x"``) is refused, never followed.
    """
    if entry is None:
        return
    if not isinstance(entry, dict):
        raise HeadwiseError(f"{file}: expected 'index' to be an object or null, got {type(entry).__name__}")
    for key, pattern in _INDEX_NAMES.items():
        name = entry.get(key)
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise HeadwiseError(f"{file}: expected index.{key} to be a file name like {pattern.pattern}, got {name!r}")
    for key in ("sha256", "slots_sha256"):
        digest = entry.get(key)
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise HeadwiseError(f"{file}: expected index.{key} to be a sha256 hex digest, got {digest!r}")


def create_on_disk(directory: Path, config: dict[str, str]) -> Storage:
    """Build the store in a temporary sibling directory, then rename it into place (all or nothing)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise bad_argument(
            "path", "a new or empty directory (VectorMemory.open opens an existing store)", f"{directory} (not empty)"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.creating-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    Storage.create(tmp / DATABASE, config).close()
    write_manifest(tmp, None)
    tmp.rename(directory)  # rename(2) may replace an empty directory
    fsync_dir(directory.parent)
    return Storage.open(directory / DATABASE)


def remove_leftovers(directory: Path, manifest: dict[str, Any]) -> None:
    """Delete temporary files and index files the manifest does not name (an interrupted save)."""
    entry = manifest.get("index") or {}
    keep = {entry.get("file"), entry.get("slots_file")}
    for f in directory.iterdir():
        stale_tmp = f.name.startswith(".") and f.name.endswith(".tmp")
        stale_index = (f.name.startswith("index-") or f.name.startswith("slots-")) and f.name not in keep
        if f.is_file() and (stale_tmp or stale_index):
            f.unlink(missing_ok=True)


def load_index(
    directory: Path, entry: dict[str, Any], dim: int, metric: str, kind: str, hnsw: dict[str, int], rebuild: bool
) -> SlotIndex | None:
    """The saved index if its files match the manifest; None (rebuild) only when ``rebuild`` is set."""
    try:
        data = (directory / entry["file"]).read_bytes()
        slots = (directory / entry["slots_file"]).read_bytes()
        if sha256(data) != entry["sha256"] or sha256(slots) != entry["slots_sha256"]:
            raise HeadwiseError(f"index file {directory / entry['file']}: checksum does not match {MANIFEST}")
        return SlotIndex.deserialize(data, slots, dim, metric, kind, **hnsw)
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        if rebuild:
            return None
        raise HeadwiseError(
            f"index of {directory}: expected the files named in {MANIFEST}, got {exc} "
            "(the index is a cache: VectorMemory.open(path, rebuild_index=True) rebuilds it from SQLite)"
        ) from exc


def reconcile(slot_index: SlotIndex, storage: Storage) -> None:
    """Make the index hold exactly the records in SQLite: add those it lacks, tombstone the others."""
    seqs, ids = storage.seq_ids()
    slot_index.set_live(seqs, ids)
    missing = np.setdiff1d(seqs, slot_index.slot_seq, assume_unique=True)
    if len(missing):
        dim = slot_index.dim
        m_seqs, m_ids, vecs = storage.vectors_by_seq(None if len(missing) == len(seqs) else missing, dim)
        slot_index.add(m_seqs, m_ids, vecs)


def open_store(directory: Path, *, read_only: bool, rebuild: bool, attempts: int = 3) -> tuple[Storage, SlotIndex]:
    """The database and the index reconciled with it, for a writer (who holds the lock) or a reader.

    A writer removes leftovers first. A reader starts a snapshot (every later read sees that
    committed state, see :meth:`Storage.begin_snapshot`) and, since a writer's ``save()`` may
    replace the index files between the reader's reading the manifest and the files, reads the
    manifest again up to ``attempts`` times; the reconciliation then makes the index match the
    snapshot whatever saved index it started from.
    """
    manifest = read_manifest(directory)
    storage = Storage.open(directory / DATABASE, read_only=read_only)
    try:
        cfg = storage.config()
        dim, metric, kind = int(cfg["dim"]), cfg["metric"], cfg["index"]
        hnsw = {k: int(cfg[k]) for k in ("hnsw_m", "ef_construction", "ef_search")}
        if metric not in METRICS or kind not in INDEX_KINDS:
            raise HeadwiseError(f"database {directory / DATABASE}: unknown metric {metric!r} or index {kind!r}")
        if read_only:
            storage.begin_snapshot()
        else:
            remove_leftovers(directory, manifest)
        slot_index = None
        for attempt in range(attempts if read_only else 1):
            if manifest.get("index") is None:
                break
            try:
                slot_index = load_index(directory, manifest["index"], dim, metric, kind, hnsw, rebuild)
                break
            except HeadwiseError:
                if attempt + 1 >= (attempts if read_only else 1):
                    raise
                manifest = read_manifest(directory)  # a save() replaced the files: read its manifest
        if slot_index is None:
            slot_index = SlotIndex(dim, metric, kind, **hnsw)
        reconcile(slot_index, storage)
    except BaseException:
        storage.close()
        raise
    return storage, slot_index
