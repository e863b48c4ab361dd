"""The HTTP service over one :class:`~headwise.memory.VectorMemory`: ``create_app(store, api_key=...)``.

Endpoints (every one but ``/health`` needs ``Authorization: Bearer <key>`` when a key is set):

- ``GET /health`` (no auth): ``{"status": "ok"}``. ``GET /count``: ``{"count": n}``.
- ``POST /add``: JSON ``{"vectors": [[...]], "ids"?, "metadata"?, "texts"?}`` (``texts`` alone
  are encoded by the store's encoder), or a ``.npy`` (n, d) body with ``ids``, ``metadata``,
  ``texts`` as JSON query parameters; answers ``{"ids": [...]}``.
- ``POST /search``: JSON ``{"query": [...] or [[...]], "k", "enhance"?, "filter"?}`` answers
  ``{"scores", "ids"}`` (n, k) with ``null`` for a -inf score; ``{"text": "...", "k", ...}``
  answers ``{"hits": [{"id", "score", "text", "metadata"}]}``; a ``.npy`` (d,) or (n, d) body
  with ``k``, ``enhance``, ``filter`` (JSON) as query parameters answers a ``.npy`` of records
  (``score`` float32, ``id`` int64) of shape (n, k): exactly ``store.search``'s arrays; the
  same with raw little-endian float32 (``application/octet-stream`` and ``X-Shape: n,d``)
  answers raw records with ``X-Shape: n,k`` (:mod:`headwise.server.wire`). ``/add`` and
  ``/upsert`` take both binary forms too.
- ``POST /get`` ``{"ids": [...]}``: ``{"records": [{"id", "vector", "metadata", "text"} or null]}``.
- ``POST /vectors`` ``{"ids": [...]}``: the stored vectors (n, d) as ``.npy`` (every id must be stored).
- ``POST /delete`` ``{"ids": [...]}``: ``{"deleted": n}``.
- ``POST /upsert``: as ``/add`` with ``ids`` required: inserts or replaces those records.
- ``POST /update_metadata`` ``{"ids", "metadata", "merge"?}``: ``{"updated": n}``.
- ``POST /feedback`` ``{"query": text or vector, "relevant": ids or {id: grade}}``: ``{"id"}``
  (``VectorMemory.record_feedback``, for ``headwise memory train --from-feedback``).
- ``GET /docs``, ``GET /openapi.json``: the OpenAPI description (behind the key unless
  ``public_docs``).
- ``GET /metrics``: Prometheus text: requests per endpoint and status, a latency histogram per
  endpoint, the store's size.

Every error is ``{"error": {"code", "message"}}``: 400 ``bad_request`` (a HeadwiseError: the
store's own message), 401 ``unauthorized``, 404 ``not_found``, 405 ``method_not_allowed``,
413 ``too_large``, 500 ``internal`` (the traceback goes to the log, never to the client).

Concurrency: the store work of a request runs in the threadpool (``run_in_threadpool``), so
the event loop keeps accepting requests (the handlers are ``async`` only to read the body as a
stream, which the size limit needs, and hand everything else to the pool). Searches share the
store's own lock; writes are serialised by one more ``threading.Lock``, so a write's
check-then-insert is never interleaved with another write's.

Shapes: d = the store's dimension, n = queries or vectors in one request, k = results per query.

Example:
    >>> from fastapi.testclient import TestClient
    >>> from headwise.memory import VectorMemory
    >>> client = TestClient(create_app(VectorMemory(2, metric="ip"), api_key="s3cret"))
    >>> auth = {"Authorization": "Bearer s3cret"}
    >>> client.post("/add", json={"vectors": [[1, 0], [0, 1]]}, headers=auth).json()
    {'ids': [0, 1]}
    >>> client.post("/search", json={"query": [1, 0.5], "k": 3}, headers=auth).json()
    {'scores': [[1.0, 0.5, None]], 'ids': [[0, 1, -1]]}
    >>> client.get("/count").json()["error"]["code"]
    'unauthorized'
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from headwise import __version__
from headwise.errors import HeadwiseError, bad_argument
from headwise.memory.store import VectorMemory
from headwise.server.wire import NPY, RAW, SHAPE_HEADER, from_raw, npy_bytes, pack_hits, read_npy

log = logging.getLogger("headwise.server")

DEFAULT_MAX_BODY = 64 * 1024 * 1024
#: Upper bounds (seconds) of the latency histogram's buckets (Prometheus ``le``).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
T = TypeVar("T")


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body of the service."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 401: "unauthorized"}


class _Metrics:
    """Request counts per (endpoint, status) and one latency histogram per endpoint (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, int], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.counts[(endpoint, status)] = self.counts.get((endpoint, status), 0) + 1
            b = self.buckets.setdefault(endpoint, [0] * (len(LATENCY_BUCKETS) + 1))
            for i, le in enumerate(LATENCY_BUCKETS):
                if seconds <= le:
                    b[i] += 1
            b[-1] += 1  # +Inf: every request
            self.sums[endpoint] = self.sums.get(endpoint, 0.0) + seconds

    def render(self, store_size: int) -> str:
        lines = [
            "# HELP headwise_requests_total Requests by endpoint and status.",
            "# TYPE headwise_requests_total counter",
        ]
        with self._lock:
            for (ep, st), c in sorted(self.counts.items()):
                lines.append(f'headwise_requests_total{{endpoint="{ep}",status="{st}"}} {c}')
            lines += [
                "# HELP headwise_request_seconds Request latency by endpoint.",
                "# TYPE headwise_request_seconds histogram",
            ]
            for ep, b in sorted(self.buckets.items()):
                for le, c in zip([*map(str, LATENCY_BUCKETS), "+Inf"], b):
                    lines.append(f'headwise_request_seconds_bucket{{endpoint="{ep}",le="{le}"}} {c}')
                lines.append(f'headwise_request_seconds_sum{{endpoint="{ep}"}} {self.sums[ep]:.6f}')
                lines.append(f'headwise_request_seconds_count{{endpoint="{ep}"}} {b[-1]}')
        lines += ["# HELP headwise_store_records Records in the store.", "# TYPE headwise_store_records gauge"]
        lines.append(f"headwise_store_records {store_size}")
        return "\n".join(lines) + "\n"


class _Observe:
    """Pure ASGI middleware: records every request's endpoint, status and latency, and turns a bug
    into a 500 JSON body (traceback to the log only). Pure ASGI because starlette's
    ``BaseHTTPMiddleware`` costs a task and a stream per request, a third of a small search's time."""

    def __init__(self, app: Any, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500, False]  # (status code, response started)

        async def observed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0], status[1] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:  # a bug: logged with its traceback here, never sent to the client
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not status[1]:
                await error_response(500, "internal", "internal server error (see the server's log)")(
                    scope, receive, send
                )
            status[0] = 500
        endpoint = getattr(scope.get("route"), "path", None) or "unmatched"
        self.metrics.record(endpoint, status[0], time.perf_counter() - start)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes: by Content-Length, then while reading.

    The second check matters for a chunked body (no Content-Length) or a lying header: the
    reading stops at the first chunk past the limit instead of buffering the whole upload.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"request body: expected at most {limit} bytes, got {declared}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"request body: expected at most {limit} bytes, got more")
        chunks.append(chunk)
    return b"".join(chunks)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _binary_array(request: Request, body: bytes) -> np.ndarray | None:
    """The body as an array when it is binary (.npy, or raw float32 with X-Shape), else None (JSON)."""
    kind = _content_type(request)
    if kind == NPY:
        return read_npy(body)
    if kind == RAW:
        return from_raw(body, request.headers.get(SHAPE_HEADER), "<f4")
    return None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_argument("request body", "a JSON object", f"invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise bad_argument("request body", "a JSON object", type(value).__name__)
    return value


def _floats(value: Any, name: str) -> np.ndarray:
    """A JSON list (or nested lists) as float32; the store checks the shape, NaN and Inf."""
    if value is None or isinstance(value, (str, bool, dict)):
        raise bad_argument(name, "a list of numbers or a list of lists of numbers", type(value).__name__)
    try:
        with np.errstate(over="ignore"):  # 1e40 becomes inf, which the store refuses by name
            return np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise bad_argument(
            name, "a list of numbers or a list of lists of numbers (all rows of one length)", str(exc)
        ) from None


def _query_json(request: Request, name: str) -> Any:
    """A query parameter holding JSON (``filter``, ``metadata``, ``ids``...), None when absent."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise bad_argument(name, "a JSON value in the query string", repr(raw[:80])) from None


def _query_k(request: Request) -> Any:
    raw = request.query_params.get("k")
    if raw is None:
        raise bad_argument("k", "a query parameter k (an integer)", "none")
    try:
        return int(raw)
    except ValueError:
        raise bad_argument("k", "an integer", repr(raw[:80])) from None


def _query_enhance(request: Request) -> bool | None:
    raw = request.query_params.get("enhance")
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise bad_argument("enhance", "true or false", repr(raw[:80]))


def _scores_json(scores: np.ndarray) -> list[list[float | None]]:
    # JSON has no -inf: an empty slot's score is null (its id is -1).
    return [[None if np.isneginf(s) else float(s) for s in row] for row in scores]


def _hits_response(request: Request, scores: np.ndarray, ids: np.ndarray) -> Response:
    """The binary search answer in the request's form: raw records with X-Shape, or one .npy."""
    hits = pack_hits(scores, ids)
    if _content_type(request) == RAW:
        return Response(hits.tobytes(), media_type=RAW, headers={SHAPE_HEADER: f"{hits.shape[0]},{hits.shape[1]}"})
    return Response(npy_bytes(hits), media_type=NPY)  # one .npy: np.savez's zip costs more than a small search


_VECTORS = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}, "description": "(n, d)"}
_ADD = {
    "type": "object",
    "properties": {
        "vectors": _VECTORS,
        "ids": {"type": "array", "items": {"type": "integer"}},
        "metadata": {"type": "array", "items": {}},
        "texts": {"type": "array", "items": {"type": ["string", "null"]}},
    },
}
_SEARCH = {
    "type": "object",
    "required": ["k"],
    "properties": {
        "query": {"description": "(d,) or (n, d)", "type": "array", "items": {}},
        "text": {"type": "string"},
        "k": {"type": "integer", "minimum": 1, "maximum": 16384},
        "enhance": {"type": ["boolean", "null"]},
        "filter": {"type": "object"},
    },
}
_IDS = {"type": "object", "required": ["ids"], "properties": {"ids": {"type": "array", "items": {"type": "integer"}}}}
_UPDATE = {
    "type": "object",
    "required": ["ids", "metadata"],
    "properties": {
        "ids": {"type": "array", "items": {"type": "integer"}},
        "metadata": {"type": "array", "items": {}},
        "merge": {"type": "boolean", "default": False},
    },
}
_FEEDBACK = {
    "type": "object",
    "required": ["query", "relevant"],
    "properties": {
        "query": {"description": "a text (the store's encoder) or a (d,) vector"},
        "relevant": {"description": "ids, or {id: grade > 0}"},
    },
}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI request body of a handler that reads the raw request: JSON with ``schema``, or ``.npy``."""
    content = {"application/json": {"schema": schema}}
    if "vectors" in schema.get("properties", {}) or "query" in schema.get("properties", {}):
        content[NPY] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


class _Service:
    """What every handler needs: the store, the auth check, the thread pool, the write lock, body limits."""

    def __init__(self, store: VectorMemory, api_key: str | None, max_body_bytes: int) -> None:
        if api_key is not None and not api_key:
            raise bad_argument("api_key", "a non-empty key or None", "''")
        self.store, self.max_body_bytes = store, max_body_bytes
        self._expected = None if api_key is None else api_key.encode()
        self._write_lock = threading.Lock()
        self.metrics = _Metrics()

    async def check_auth(self, request: Request) -> None:  # async: no thread hop for a string compare
        if self._expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._expected):
            raise ApiError(401, "unauthorized", "Authorization: expected 'Bearer <key>' with the server's key")

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn`` in the thread pool (the event loop keeps serving); a HeadwiseError becomes a 400."""
        try:
            return await run_in_threadpool(fn)
        except HeadwiseError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None

    async def write(self, fn: Callable[[], T]) -> T:
        """A write: in the thread pool, one at a time (a write's check-then-insert is never interleaved)."""

        def locked() -> T:
            with self._write_lock:
                return fn()

        return await self.run(locked)

    async def body(self, request: Request) -> bytes:
        return await _read_body(request, self.max_body_bytes)

    async def json(self, request: Request) -> dict[str, Any]:
        return _json_object(await self.body(request))

    async def vectors_payload(self, request: Request) -> tuple[Any, Any, Any, Any]:
        """(vectors or None, ids, metadata, texts) of an add or upsert: JSON, or binary with JSON query parameters."""
        body = await self.body(request)
        binary = _binary_array(request, body)
        if binary is not None:
            return (binary, *(_query_json(request, n) for n in ("ids", "metadata", "texts")))
        obj = _json_object(body)
        vectors = None if obj.get("vectors") is None else _floats(obj["vectors"], "vectors")
        return vectors, obj.get("ids"), obj.get("metadata"), obj.get("texts")


def create_app(
    store: VectorMemory,
    *,
    api_key: str | None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    close_store: bool = False,
    public_docs: bool = False,
) -> Any:
    """A FastAPI app serving ``store``; ``api_key`` None serves without auth (loopback only: the CLI's rule).

    ``max_body_bytes`` bounds every request body (413 past it). ``close_store=True`` closes the
    store when the app shuts down (what ``headwise serve`` does on SIGTERM, after uvicorn drains).
    ``public_docs=True`` serves ``/docs`` and ``/openapi.json`` without the key (they describe the
    API and hold no data); by default they need it like every endpoint but ``/health``.
    """
    svc = _Service(store, api_key, max_body_bytes)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_store:
            store.close()

    docs_url, openapi_url = ("/docs", "/openapi.json") if public_docs else (None, None)
    app = FastAPI(title="headwise", version=__version__, lifespan=lifespan, redoc_url=None, docs_url=docs_url,
                  openapi_url=openapi_url)  # fmt: skip
    _add_error_handlers(app)
    app.add_middleware(_Observe, metrics=svc.metrics)
    auth = [Depends(svc.check_auth)]
    if not public_docs:  # the API description is served like every endpoint: behind the key
        _add_docs(app, auth)
    _add_reads(app, svc, auth)
    _add_writes(app, svc, auth)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(HeadwiseError)
    async def _bad_request(_request: Request, exc: HeadwiseError) -> JSONResponse:
        return error_response(400, "bad_request", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))


def _add_docs(app: FastAPI, auth: list) -> None:
    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    def openapi_json() -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", dependencies=auth, include_in_schema=False)
    def swagger() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="headwise API")


def _add_reads(app: FastAPI, svc: _Service, auth: list) -> None:
    store = svc.store

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/count", dependencies=auth)
    async def count() -> dict[str, int]:
        return {"count": await svc.run(lambda: len(store))}

    @app.get("/metrics", dependencies=auth)
    async def metrics_text() -> PlainTextResponse:
        size = await svc.run(lambda: len(store))
        return PlainTextResponse(svc.metrics.render(size), media_type="text/plain; version=0.0.4")

    @app.post("/search", dependencies=auth, response_model=None, openapi_extra=_body(_SEARCH))
    async def search(request: Request) -> Any:
        body = await svc.body(request)
        q = _binary_array(request, body)
        if q is not None:
            k, enhance, flt = _query_k(request), _query_enhance(request), _query_json(request, "filter")
            scores, ids = await svc.run(lambda: store.search(q, k, enhance=enhance, filter=flt))
            return _hits_response(request, scores, ids)
        obj = _json_object(body)
        if "k" not in obj:
            raise bad_argument("k", "a field k (an integer)", "none")
        k, enhance, flt = obj["k"], obj.get("enhance"), obj.get("filter")
        if obj.get("text") is not None:
            hits = await svc.run(lambda: store.search_text(obj["text"], k, enhance=enhance, filter=flt))
            return {"hits": [{"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata} for h in hits]}
        q = _floats(obj.get("query"), "query")
        scores, ids = await svc.run(lambda: store.search(q, k, enhance=enhance, filter=flt))
        return {"scores": _scores_json(scores), "ids": ids.tolist()}

    @app.post("/get", dependencies=auth, openapi_extra=_body(_IDS))
    async def get(request: Request) -> dict[str, list[Any]]:
        obj = await svc.json(request)
        records = await svc.run(lambda: store.get(obj.get("ids")))
        as_json = [None if r is None else {"id": r.id, "vector": r.vector.tolist(), "metadata": r.metadata,
                                           "text": r.text} for r in records]  # fmt: skip
        return {"records": as_json}

    @app.post("/vectors", dependencies=auth, openapi_extra=_body(_IDS), response_model=None)
    async def vectors(request: Request) -> Response:
        obj = await svc.json(request)
        return Response(npy_bytes(await svc.run(lambda: store.vectors(obj.get("ids")))), media_type=NPY)


def _add_writes(app: FastAPI, svc: _Service, auth: list) -> None:
    store = svc.store

    @app.post("/add", dependencies=auth, openapi_extra=_body(_ADD))
    async def add(request: Request) -> dict[str, list[int]]:
        vectors, ids, meta, texts = await svc.vectors_payload(request)
        if vectors is None:
            if texts is None:
                raise bad_argument("request body", "'vectors' or 'texts'", "neither")
            out = await svc.write(lambda: store.add_texts(texts, metadata=meta, ids=ids))
        else:
            out = await svc.write(lambda: store.add(vectors, ids=ids, metadata=meta, texts=texts))
        return {"ids": [int(i) for i in out]}

    @app.post("/upsert", dependencies=auth, openapi_extra=_body(_ADD))
    async def upsert(request: Request) -> dict[str, list[int]]:
        vectors, ids, meta, texts = await svc.vectors_payload(request)
        if vectors is None:
            raise bad_argument("vectors", "the vectors to insert or replace (n, d)", "none")
        out = await svc.write(lambda: store.upsert(vectors, ids, metadata=meta, texts=texts))
        return {"ids": [int(i) for i in out]}

    @app.post("/update_metadata", dependencies=auth, openapi_extra=_body(_UPDATE))
    async def update_metadata(request: Request) -> dict[str, int]:
        obj = await svc.json(request)
        merge = obj.get("merge", False)
        if not isinstance(merge, bool):
            raise bad_argument("merge", "true or false", repr(merge))
        ids, meta = obj.get("ids"), obj.get("metadata")
        await svc.write(lambda: store.update_metadata(ids, meta, merge=merge))
        return {"updated": len(ids) if isinstance(ids, list) else 1}

    @app.post("/feedback", dependencies=auth, openapi_extra=_body(_FEEDBACK))
    async def feedback(request: Request) -> dict[str, int]:
        obj = await svc.json(request)
        query = obj.get("query")
        query = query if isinstance(query, str) else _floats(query, "query")
        relevant = obj.get("relevant")
        if isinstance(relevant, dict):  # JSON object keys are strings: {"12": 2} means id 12, grade 2
            try:
                relevant = {int(i): g for i, g in relevant.items()}
            except ValueError:
                raise bad_argument("relevant", "ids (integers) as keys", list(relevant)[:5]) from None
        return {"id": int(await svc.write(lambda: store.record_feedback(query, relevant)))}

    @app.post("/delete", dependencies=auth, openapi_extra=_body(_IDS))
    async def delete(request: Request) -> dict[str, int]:
        obj = await svc.json(request)
        return {"deleted": int(await svc.write(lambda: store.delete(obj.get("ids"))))}
