"""Text encoders for a vector memory, with an on-disk embedding cache keyed by content hash.

``TextEncoder`` is the protocol the store needs (``dim`` and ``encode``). ``MiniLMEncoder``
wraps all-MiniLM-L6-v2 (:mod:`headwise.pretrained`): batched, with a progress bar, and
with an optional :class:`EmbeddingCache` so that a corpus is embedded once.

The cache stores *packs*: every ``put`` writes ``<h>.vectors.npy`` (m, d) float32 and then
``<h>.keys.npy`` (m, 32) uint8, where each key is sha256(model id, NUL, text) and ``h``
is the hash of the pack's keys. Both files go through a temporary file and ``os.replace``,
and the keys file is written last, so a pack without its keys file (a crash mid-write)
is simply ignored. Nothing is unpickled: ``np.load(..., allow_pickle=False)``.

Shapes: N texts -> (N, dim) float32, L2-normalised for MiniLM.

Example:
    >>> import tempfile
    >>> import numpy as np
    >>> cache = EmbeddingCache(tempfile.mkdtemp(), model_id="toy")
    >>> cache.put(["a", "b"], np.eye(2, dtype=np.float32))
    >>> found = cache.get(["b", "c"])
    >>> found[0].tolist(), found[1]
    ([0.0, 1.0], None)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import write_atomic

MINILM_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


@runtime_checkable
class TextEncoder(Protocol):
    """Anything with a ``dim`` and ``encode(texts) -> (len(texts), dim) float32``."""

    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def text_key(model_id: str, text: str) -> bytes:
    """sha256 of the model id and the text: equal keys mean equal embeddings."""
    return hashlib.sha256(model_id.encode() + b"\0" + text.encode()).digest()


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class EmbeddingCache:
    """Content-addressed embeddings of one model in a directory (see the module docstring)."""

    def __init__(self, directory: str | Path, model_id: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model_id = model_id
        self._where: dict[bytes, tuple[Path, int]] | None = None
        self._packs: dict[Path, np.ndarray] = {}

    def _load_index(self) -> dict[bytes, tuple[Path, int]]:
        if self._where is None:
            self._where = {}
            for keys_file in sorted(self.directory.glob("*.keys.npy")):
                vectors_file = keys_file.with_name(keys_file.name.replace(".keys.npy", ".vectors.npy"))
                try:
                    keys = np.load(keys_file, allow_pickle=False)
                except (OSError, ValueError):
                    continue  # a damaged pack is a cache miss, never an error
                if keys.ndim != 2 or keys.shape[1] != 32 or not vectors_file.exists():
                    continue
                for row, key in enumerate(keys):
                    self._where[key.tobytes()] = (vectors_file, row)
        return self._where

    def _vectors(self, path: Path) -> np.ndarray:
        if path not in self._packs:
            self._packs[path] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._packs[path]

    def get(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """The cached embedding of each text, None where it is not cached."""
        where = self._load_index()
        out: list[np.ndarray | None] = []
        for text in texts:
            hit = where.get(text_key(self.model_id, text))
            out.append(None if hit is None else np.array(self._vectors(hit[0])[hit[1]], dtype=np.float32))
        return out

    def put(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Store ``vectors`` (len(texts), d) as one pack."""
        if len(texts) == 0:
            return
        keys = np.frombuffer(b"".join(text_key(self.model_id, t) for t in texts), dtype=np.uint8).reshape(-1, 32)
        name = hashlib.sha256(keys.tobytes()).hexdigest()[:32]
        vectors_file = self.directory / f"{name}.vectors.npy"
        write_atomic(vectors_file, _npy_bytes(np.ascontiguousarray(vectors, dtype=np.float32)))
        write_atomic(self.directory / f"{name}.keys.npy", _npy_bytes(keys))
        where = self._load_index()
        for row, key in enumerate(keys):
            where[key.tobytes()] = (vectors_file, row)
        self._packs.pop(vectors_file, None)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised), loaded offline on first use.

    ``cache_dir`` enables the on-disk :class:`EmbeddingCache`; texts already cached are not
    re-encoded, and duplicates within a call are encoded once.
    """

    dim = 384

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        batch_size: int = 64,
        progress: bool = True,
        model_id: str = MINILM_MODEL_ID,
    ) -> None:
        if batch_size <= 0:
            raise bad_argument("batch_size", "a positive int", batch_size)
        self.batch_size, self.progress, self.model_id = batch_size, progress, model_id
        self.cache = EmbeddingCache(cache_dir, model_id) if cache_dir is not None else None
        self._model: tuple[Any, Any] | None = None

    def _encode_uncached(self, texts: list[str]) -> np.ndarray:
        from headwise.pretrained import encode, load_minilm

        if self._model is None:
            self._model = load_minilm()
        tokenizer, model = self._model
        return encode(texts, tokenizer, model, batch_size=self.batch_size, progress=self.progress)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings (len(texts), 384) float32 in the order of ``texts``."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise HeadwiseError("texts: expected a sequence of str, got " + type(texts).__name__)
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        cached = self.cache.get(texts) if self.cache is not None else [None] * len(texts)
        todo: dict[str, list[int]] = {}
        for i, (text, vec) in enumerate(zip(texts, cached)):
            if vec is None:
                todo.setdefault(text, []).append(i)
            else:
                out[i] = vec
        if todo:
            unique = list(todo)
            fresh = self._encode_uncached(unique)
            for text, vec in zip(unique, fresh):
                out[todo[text]] = vec
            if self.cache is not None:
                self.cache.put(unique, fresh)
        return out
