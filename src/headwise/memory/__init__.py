"""The vector memory: an embedded, durable vector store with a faiss-style API.

See :mod:`headwise.memory.store` for the store and its durability design, and
``docs/memory.md`` for a tour.

Example:
    >>> import numpy as np
    >>> from headwise.memory import VectorMemory
    >>> mem = VectorMemory(2, metric="cosine")
    >>> mem.add([[1.0, 0.0], [0.0, 1.0]]).tolist()
    [0, 1]
    >>> mem.search([1.0, 0.1], k=1)[1].tolist()
    [[0]]
"""

from headwise.memory.cache import ResultCache
from headwise.memory.encoder import EmbeddingCache, MiniLMEncoder, TextEncoder
from headwise.memory.metrics import MetricsCollector
from headwise.memory.store import Hit, Record, VectorMemory


def __getattr__(name: str) -> object:
    """``RemoteMemory`` and ``MilvusMemory`` load on first use: ``import headwise.memory`` must not
    import httpx or pymilvus (the extras ``headwise[server]`` and ``headwise[milvus]``)."""
    if name == "RemoteMemory":
        from headwise.server.client import RemoteMemory

        return RemoteMemory
    if name == "MilvusMemory":
        from headwise.memory.milvus import MilvusMemory

        return MilvusMemory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EmbeddingCache",
    "Hit",
    "MetricsCollector",
    "MilvusMemory",
    "MiniLMEncoder",
    "Record",
    "RemoteMemory",
    "ResultCache",
    "TextEncoder",
    "VectorMemory",
]
