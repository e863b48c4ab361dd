"""Memory per stored vector: faiss's accounting of the index plus the SQLite bytes, over N.

``index_bytes`` counts what faiss holds: the float32 codes (N x d x 4), and for HNSW the
graph (neighbour lists int32, levels int32, offsets int64). ``sqlite_bytes`` is the size of
the database files on disk (main file + WAL), or the pages of an in-memory database; it
holds a second copy of each vector (the source of truth), the ids, metadata and texts.
``index_file_bytes`` is the size of the saved index file, when there is one.

Example:
    >>> import numpy as np
    >>> from headwise.memory import VectorMemory
    >>> mem = VectorMemory(4, metric="ip")
    >>> _ = mem.add(np.ones((10, 4), dtype=np.float32))
    >>> fp = mem.footprint()
    >>> fp["n_vectors"], fp["index_bytes"], fp["raw_vector_bytes"], fp["bytes_per_vector"] > 16
    (10, 160, 16, True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from headwise.memory.index import SlotIndex
from headwise.memory.layout import MANIFEST
from headwise.memory.storage import Storage


def measure(index: SlotIndex, storage: Storage, directory: Path | None) -> dict[str, Any]:
    """Footprint of one store; see the module docstring for what each field counts."""
    n = index.n_live
    index_bytes = index.memory_bytes()
    sqlite_bytes = storage.size_bytes()
    file_bytes = None
    if directory is not None:
        entry = json.loads((directory / MANIFEST).read_text()).get("index")
        if entry is not None and (directory / entry["file"]).exists():
            file_bytes = (directory / entry["file"]).stat().st_size
    return {
        "n_vectors": n,
        "n_slots": index.n_slots,
        "dim": index.dim,
        "index": index.kind,
        "raw_vector_bytes": index.dim * 4,
        "index_bytes": index_bytes,
        "index_file_bytes": file_bytes,
        "sqlite_bytes": sqlite_bytes,
        "bytes_per_vector": (index_bytes + sqlite_bytes) / n if n else float("nan"),
    }
