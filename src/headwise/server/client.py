""":class:`RemoteMemory`: the ``VectorMemory`` API of a ``headwise serve`` over HTTP.

The subset ``add``, ``upsert``, ``update_metadata``, ``record_feedback``, ``vectors``, ``search``,
``search_batch``, ``search_text``, ``get``, ``delete`` and
``len()`` with the store's shapes and dtypes: ``search`` returns scores (n, k) float32 and ids
(n, k) int64 padded with -inf / -1, exactly the arrays the server's store returned (vectors and
results travel as raw little-endian arrays with their shape in a header, so nothing is rounded
through JSON). An error the server reports (bad input, a wrong key, a body too large) is raised as a
:class:`~headwise.errors.HeadwiseError` carrying the server's message; a network failure is
httpx's own exception.

Shapes: d = the store's dimension, n = vectors or queries in one call, k = results per query.

Example (against a running ``headwise serve``; not run here)::

    from headwise.memory import RemoteMemory
    mem = RemoteMemory("http://127.0.0.1:8000", api_key=open("key.txt").read().strip())
    ids = mem.add(np.random.rand(10, 384).astype(np.float32), metadata=[{"n": i} for i in range(10)])
    scores, found = mem.search(np.random.rand(384), k=5, filter={"n": {"$lt": 5}})
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from headwise.errors import HeadwiseError
from headwise.memory.records import Hit, Record
from headwise.server.wire import HITS_DTYPE, RAW, SHAPE_HEADER, from_raw, raw_bytes, read_npy, unpack_hits


def _as_float32(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise HeadwiseError(f"{name}: expected numbers of one shape (n, d) or (d,), got {exc}") from None
    return arr


class RemoteMemory:
    """A client of ``headwise serve`` with the :class:`~headwise.memory.VectorMemory` API subset.

    ``url``: the server, e.g. ``"http://127.0.0.1:8000"``. ``api_key``: the server's key (sent as
    ``Authorization: Bearer``), None for a server without one. ``timeout``: seconds per request.
    One client holds one connection pool; it is safe to share between threads (httpx.Client is).
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> RemoteMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteMemory({self.url!r})"

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                message = f"{err['message']} (HTTP {response.status_code} {err['code']})"
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {response.status_code}: {response.text[:200]}"
            raise HeadwiseError(message)
        return response

    def __len__(self) -> int:
        return int(self._request("GET", "/count").json()["count"])

    def _vectors_request(
        self, path: str, x: np.ndarray, ids: Any, metadata: Sequence[Any] | None, texts: Sequence[str | None] | None
    ) -> np.ndarray:
        """POST vectors to /add or /upsert: a .npy body, or JSON when metadata or texts come along."""
        id_list = None if ids is None else np.asarray(ids).tolist()
        if metadata is None and texts is None:
            params = {} if id_list is None else {"ids": json.dumps(id_list)}
            body, shape = raw_bytes(x)
            response = self._request("POST", path, content=body, params=params,
                                     headers={"Content-Type": RAW, SHAPE_HEADER: shape})  # fmt: skip
        else:  # metadata and texts can be long: JSON body (float32 -> JSON -> float32 is exact)
            body = {"vectors": x.tolist(), "ids": id_list}
            body.update(
                metadata=None if metadata is None else list(metadata), texts=None if texts is None else list(texts)
            )
            response = self._request("POST", path, json=body)
        return np.asarray(response.json()["ids"], dtype=np.int64)

    def add(
        self,
        vectors: Any,
        ids: Any = None,
        metadata: Sequence[Any] | None = None,
        texts: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """Add vectors (n, d) or (d,) and return their ids (n,) int64 (as ``VectorMemory.add``)."""
        return self._vectors_request("/add", _as_float32(vectors, "vectors"), ids, metadata, texts)

    def upsert(
        self,
        vectors: Any,
        ids: Any,
        metadata: Sequence[Any] | None = None,
        texts: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """Insert or replace the records of ``ids`` (n,) with ``vectors`` (n, d) (as ``VectorMemory.upsert``)."""
        if ids is None:
            raise HeadwiseError("ids: expected the ids to insert or replace (upsert needs ids), got None")
        return self._vectors_request("/upsert", _as_float32(vectors, "vectors"), ids, metadata, texts)

    def update_metadata(self, ids: Any, metadata: Sequence[Any], *, merge: bool = False) -> None:
        """Set (or with ``merge`` update the keys of) the metadata of stored ``ids`` (n,)."""
        body = {"ids": np.asarray(ids).reshape(-1).tolist(), "metadata": list(metadata), "merge": merge}
        self._request("POST", "/update_metadata", json=body)

    def record_feedback(self, query: Any, relevant_ids: Any) -> int:
        """Record that ``relevant_ids`` (ids, or {id: grade > 0}) answered ``query`` (str or (d,)); its id."""
        q = query if isinstance(query, str) else _as_float32(query, "query").tolist()
        if isinstance(relevant_ids, dict):
            relevant: Any = {str(int(i)): g for i, g in relevant_ids.items()}
        else:
            relevant = np.asarray(relevant_ids).reshape(-1).tolist()
        return int(self._request("POST", "/feedback", json={"query": q, "relevant": relevant}).json()["id"])

    def add_texts(self, texts: Sequence[str], metadata: Sequence[Any] | None = None, ids: Any = None) -> np.ndarray:
        """Have the server encode and add ``texts`` (it needs an encoder); their ids (n,) int64."""
        body = {"texts": list(texts), "metadata": None if metadata is None else list(metadata)}
        body["ids"] = None if ids is None else np.asarray(ids).tolist()
        return np.asarray(self._request("POST", "/add", json=body).json()["ids"], dtype=np.int64)

    def search(
        self, queries: Any, k: int, *, enhance: bool | None = None, filter: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores (n, k) float32 and ids (n, k) int64 of ``queries`` (n, d) or (d,), -inf / -1 padded."""
        params: dict[str, Any] = {"k": str(k)}
        if enhance is not None:
            params["enhance"] = "true" if enhance else "false"
        if filter is not None:
            params["filter"] = json.dumps(filter)
        body, shape = raw_bytes(_as_float32(queries, "queries"))
        response = self._request("POST", "/search", content=body, params=params,
                                 headers={"Content-Type": RAW, SHAPE_HEADER: shape})  # fmt: skip
        return unpack_hits(from_raw(response.content, response.headers.get(SHAPE_HEADER), HITS_DTYPE))

    def search_batch(
        self, queries: Any, k: int, *, enhance: bool | None = None, filter: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` for a 2-d batch (n, d) (anything else is refused before sending)."""
        if np.ndim(queries) != 2:
            raise HeadwiseError(f"queries: expected a 2-d array (n, d), got shape {np.shape(queries)}")
        return self.search(queries, k, enhance=enhance, filter=filter)

    def search_text(
        self, query: str, k: int, *, enhance: bool | None = None, filter: dict[str, Any] | None = None
    ) -> list[Hit]:
        """Up to k hits (id, score, text, metadata) of ``query``, encoded by the server's encoder."""
        body = {"text": query, "k": k, "enhance": enhance, "filter": filter}
        hits = self._request("POST", "/search", json=body).json()["hits"]
        return [Hit(int(h["id"]), float(h["score"]), h["text"], h["metadata"]) for h in hits]

    def get(self, ids: Any) -> list[Record | None]:
        """The record of each id (vector (d,) float32, metadata, text), None where it is not stored."""
        body = {"ids": np.asarray(ids).reshape(-1).tolist()}
        records = self._request("POST", "/get", json=body).json()["records"]
        return [
            None
            if r is None
            else Record(int(r["id"]), np.asarray(r["vector"], dtype=np.float32), r["metadata"], r["text"])
            for r in records
        ]

    def vectors(self, ids: Any) -> np.ndarray:
        """The stored vectors (n, d) float32 of ``ids`` (every id must be stored, as ``VectorMemory.vectors``)."""
        body = {"ids": np.asarray(ids).reshape(-1).tolist()}
        return read_npy(self._request("POST", "/vectors", json=body).content)

    def delete(self, ids: Any) -> int:
        """Delete the records of ``ids`` (absent ids are ignored); returns how many were deleted."""
        body = {"ids": np.asarray(ids).reshape(-1).tolist()}
        return int(self._request("POST", "/delete", json=body).json()["deleted"])
