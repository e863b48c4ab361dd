"""The Milvus side of :class:`~headwise.memory.milvus.MilvusMemory`: connection, collection schema, errors.

A headwise collection has four fields and one vector index::

    id        INT64, primary key, auto_id off    the record's id (headwise numbers new records itself)
    vector    FLOAT_VECTOR(dim)                  L2-normalised by headwise for metric "cosine"
    metadata  VARCHAR(65535), nullable           the metadata as JSON text (any JSON value), or null
    text      VARCHAR(65535), nullable           the text, or null

and the collection property ``headwise.memory`` (JSON: HNSW build and search parameters) and
``headwise.next_id`` (the next automatic id, above every id ever added through headwise). It
is created with ``consistency_level="Strong"``, and every read passes Strong too (a
collection made elsewhere may default to "Bounded").

``uri``: a local milvus-lite directory, a path ending in ``.db`` (pymilvus's convention; milvus-lite
starts a server on a thread of this process, one process per directory), or
``http://host:19530`` / ``https://...`` / ``tcp://...`` for a Milvus standalone or cluster.
:func:`parse_location` reads the ``milvus://HOST:PORT/COLLECTION`` and
``milvus://PATH.db/COLLECTION`` locations of ``headwise memory migrate``.

Every pymilvus or gRPC error is raised as a :class:`~headwise.errors.HeadwiseError` that names
the operation, the uri and Milvus's message (:func:`milvus_errors`).

Example:
    >>> parse_location("milvus://10.0.0.5:19530/docs")
    ('http://10.0.0.5:19530', 'docs')
    >>> parse_location("milvus://./data/mem.db/docs")
    ('./data/mem.db', 'docs')
    >>> milvus_metric("cosine"), headwise_metric("L2")
    ('COSINE', 'l2')
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headwise.errors import HeadwiseError, bad_argument

#: The metrics of VectorMemory and Milvus's names for them.
METRICS = {"cosine": "COSINE", "ip": "IP", "l2": "L2"}
#: Index kinds a MilvusMemory creates, and Milvus's index types. "hnsw-fp16" is HNSW over
#: half-precision codes (HNSW_SQ with sq_type FP16); "autoindex" lets the server choose.
INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "hnsw-fp16": "HNSW_SQ", "autoindex": "AUTOINDEX"}
#: Index types whose search is exact (no merge of the first pass's candidates).
EXACT_TYPES = ("FLAT", "BRUTE_FORCE")
#: Index types that take an HNSW beam width ``ef`` at search time.
EF_TYPES = ("HNSW", "HNSW_SQ", "HNSW_PQ", "HNSW_PRQ")
#: The longest metadata JSON or text, in UTF-8 bytes (Milvus's VARCHAR limit).
VARCHAR_MAX = 65_535
CONFIG_PROPERTY = "headwise.memory"
NEXT_ID_PROPERTY = "headwise.next_id"
FIELDS = ("id", "vector", "metadata", "text")
DESCRIPTION = "headwise MilvusMemory"
STRONG = "Strong"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_SCHEMES = ("http://", "https://", "tcp://", "unix:")


def milvus_metric(metric: str) -> str:
    """Milvus's name of a headwise metric ("cosine" -> "COSINE")."""
    return METRICS[metric]


def headwise_metric(milvus: str) -> str:
    """The headwise metric of a Milvus metric type ("L2" -> "l2"); a HeadwiseError for others."""
    for name, value in METRICS.items():
        if value == str(milvus).upper():
            return name
    raise bad_argument("collection index metric_type", f"one of {sorted(METRICS.values())}", repr(milvus))


@contextmanager
def milvus_errors(what: str, uri: str) -> Iterator[None]:
    """Raise pymilvus's and gRPC's errors inside the block as HeadwiseError: ``what: Milvus at uri: message``."""
    import grpc
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise HeadwiseError(f"{what}: Milvus at {uri}: {message}") from exc
    except grpc.RpcError as exc:  # pragma: no cover - pymilvus wraps most of them
        raise HeadwiseError(f"{what}: Milvus at {uri}: {exc}") from exc


def check_uri(uri: Any) -> str:
    """``uri`` as a str: a server URL, or a local milvus-lite path ending in ``.db`` whose folder exists."""
    if isinstance(uri, Path):
        uri = str(uri)
    want = "http(s)://host:port or a milvus-lite directory named *.db"
    if not isinstance(uri, str) or not uri:
        raise bad_argument("uri", want, repr(uri))
    if uri.startswith(_SCHEMES):
        return uri
    if not uri.endswith(".db"):
        raise bad_argument("uri", want, repr(uri))
    path = Path(uri)
    if path.exists() and not path.is_dir():
        raise bad_argument("uri", "a milvus-lite directory (milvus-lite 3 keeps a directory)", f"{uri}, a file")
    if not path.parent.is_dir():
        raise bad_argument("uri", want, f"{uri}, whose folder {path.parent} does not exist")
    return uri


def is_local(uri: str) -> bool:
    """Whether ``uri`` names a milvus-lite directory (started in this process) rather than a server."""
    return not uri.startswith(_SCHEMES)


def check_collection_name(name: Any) -> str:
    """A Milvus collection name: a letter or _, then letters, digits or _, at most 255 characters."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_argument(
            "collection", "a name of letters, digits and _ (not starting with a digit, <= 255)", repr(name)
        )
    return name


def parse_location(location: str, name: str = "location") -> tuple[str, str]:
    """(uri, collection) of ``milvus://HOST:PORT/COLLECTION``, ``milvus+https://...`` or ``milvus://PATH.db/COLLECTION``.

    A ``<where>`` ending in ``.db`` is a milvus-lite directory (relative, or absolute as in
    ``milvus:///srv/mem.db/docs``); anything else is a server reached over http (https with
    ``milvus+https``). A server without a port gets Milvus's default, 19530.
    """
    scheme = next((s for s in ("milvus://", "milvus+https://") if location.startswith(s)), None)
    want = "milvus://HOST:PORT/COLLECTION or milvus://PATH.db/COLLECTION"
    rest = location[len(scheme) :] if scheme else ""
    if not scheme or "/" not in rest:
        raise bad_argument(name, want, repr(location))
    where, collection = rest.rsplit("/", 1)
    check_collection_name(collection)
    if where.endswith(".db"):
        if scheme != "milvus://":
            raise bad_argument(name, "milvus:// for a milvus-lite directory (TLS is for servers)", repr(location))
        return where, collection
    if not where or "/" in where:
        raise bad_argument(name, want, repr(location))
    http = "https" if scheme == "milvus+https://" else "http"
    return f"{http}://{where if ':' in where else where + ':19530'}", collection


def is_location(text: str) -> bool:
    """Whether ``text`` is a Milvus location (``milvus://...``) rather than a store directory."""
    return text.startswith(("milvus://", "milvus+https://"))


class _LiteServers:
    """milvus-lite servers that this process started, counted by the MilvusMemory objects using them.

    pymilvus starts one milvus-lite server per ``.db`` directory on first connect and keeps it
    until the process exits; the last MilvusMemory to close a directory stops its server, so
    that another process can open the directory afterwards (one process per directory).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[str, int] = {}

    def acquire(self, uri: str) -> None:
        key = os.path.abspath(uri)  # the key of pymilvus's server manager
        with self._lock:
            self._users[key] = self._users.get(key, 0) + 1

    def release(self, uri: str) -> None:
        key = os.path.abspath(uri)
        with self._lock:
            left = self._users.get(key, 0) - 1
            if left > 0:
                self._users[key] = left
                return
            self._users.pop(key, None)
        try:
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:  # without milvus-lite no server was started
            return
        server_manager_instance.release_server(key)


LITE_SERVERS = _LiteServers()


def connect(uri: str, token: str, timeout: float) -> Any:
    """A pymilvus MilvusClient of ``uri`` (a HeadwiseError when it cannot be reached or pymilvus is missing)."""
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:
        want = "pymilvus and milvus-lite installed (pip install 'headwise[milvus]')"
        raise bad_argument("MilvusMemory", want, f"{type(exc).__name__}: {exc}") from None

    hint = " (is another process using this milvus-lite directory?)" if is_local(uri) else ""
    try:
        with milvus_errors("connect", uri):
            return MilvusClient(uri=uri, token=token, timeout=timeout)
    except HeadwiseError as exc:
        raise HeadwiseError(f"{exc}{hint}") from exc.__cause__


@dataclass
class CollectionConfig:
    """What a headwise collection holds (see the module docstring): dim, metric, Milvus index type,
    HNSW parameters and the next automatic id."""

    dim: int
    metric: str
    index_type: str
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 64
    next_id: int = 0

    @property
    def index_kind(self) -> str:
        """The headwise name of the index ("flat", "hnsw", ...; another Milvus type lower-cased)."""
        for kind, value in INDEX_TYPES.items():
            if value == self.index_type:
                return kind
        return "flat" if self.index_type == "BRUTE_FORCE" else self.index_type.lower()

    @property
    def exact(self) -> bool:
        return self.index_type in EXACT_TYPES

    def properties(self) -> dict[str, str]:
        """The collection properties that keep what Milvus does not (values are strings in Milvus)."""
        params = {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}
        return {CONFIG_PROPERTY: json.dumps({"version": 1, **params}), NEXT_ID_PROPERTY: str(self.next_id)}


def create_collection(client: Any, name: str, config: CollectionConfig, uri: str) -> None:
    """Create collection ``name`` with headwise's schema, its vector index and properties, and load it."""
    from pymilvus import DataType

    with milvus_errors(f"create collection {name!r}", uri):
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=DESCRIPTION)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=config.dim)
        schema.add_field("metadata", DataType.VARCHAR, max_length=VARCHAR_MAX, nullable=True)
        schema.add_field("text", DataType.VARCHAR, max_length=VARCHAR_MAX, nullable=True)
        params: dict[str, Any] = {}
        if config.index_type in EF_TYPES:
            params = {"M": config.hnsw_m, "efConstruction": config.ef_construction}
            if config.index_type == "HNSW_SQ":
                params["sq_type"] = "FP16"
        index = client.prepare_index_params()
        index.add_index("vector", index_type=config.index_type, metric_type=milvus_metric(config.metric), params=params)
        client.create_collection(
            name, schema=schema, index_params=index, consistency_level=STRONG, properties=config.properties()
        )


def read_config(client: Any, name: str, uri: str) -> CollectionConfig:
    """The configuration of an existing collection, after checking that it has headwise's schema.

    A collection made elsewhere is accepted when its fields are the four above (types and
    primary key as listed) and its vector field has an index; HNSW parameters it does not
    record take the defaults. Loads the collection when it is not loaded.
    """
    from pymilvus import DataType

    where = f"collection {name!r} at {uri}"
    with milvus_errors(f"open collection {name!r}", uri):
        desc = client.describe_collection(name)
        indexes = client.list_indexes(name, field_name="vector")
        index = client.describe_index(name, indexes[0]) if indexes else None
        if client.get_load_state(name).get("state") is not _loaded():
            client.load_collection(name)
    fields = {f["name"]: f for f in desc.get("fields", [])}
    if sorted(fields) != sorted(FIELDS):
        raise bad_argument(f"{where}: fields", f"exactly {list(FIELDS)} (headwise's schema)", sorted(fields))
    want = {
        "id": DataType.INT64,
        "vector": DataType.FLOAT_VECTOR,
        "metadata": DataType.VARCHAR,
        "text": DataType.VARCHAR,
    }
    for field, dtype in want.items():
        if fields[field].get("type") != dtype:
            raise bad_argument(f"{where}: field {field!r}", f"type {dtype.name}", fields[field].get("type"))
    if not fields["id"].get("is_primary") or desc.get("auto_id"):
        raise bad_argument(f"{where}: field 'id'", "the primary key, auto_id off", fields["id"])
    for field in ("metadata", "text"):
        if not fields[field].get("nullable"):
            raise bad_argument(f"{where}: field {field!r}", "nullable", "not nullable")
    if index is None:
        raise bad_argument(f"{where}: vector index", "an index on field 'vector' (create one)", "none")
    props = desc.get("properties") or {}
    try:
        saved = json.loads(props.get(CONFIG_PROPERTY, "{}"))
        next_id = int(props.get(NEXT_ID_PROPERTY, 0))
    except (TypeError, ValueError) as exc:
        raise bad_argument(f"{where}: properties {CONFIG_PROPERTY}", "JSON written by headwise", str(exc)) from None
    return CollectionConfig(
        dim=int(fields["vector"]["params"]["dim"]),
        metric=headwise_metric(index.get("metric_type")),
        index_type=str(index.get("index_type")).upper(),
        hnsw_m=int(saved.get("hnsw_m", index.get("M", 32))),
        ef_construction=int(saved.get("ef_construction", index.get("efConstruction", 200))),
        ef_search=int(saved.get("ef_search", 64)),
        next_id=next_id,
    )


def _loaded() -> Any:
    from pymilvus.client.types import LoadState

    return LoadState.Loaded


class _DropSessionTsWarning(logging.Filter):
    """Drops pymilvus's warning that a server gave its query iterator no session timestamp.

    milvus-lite returns none; the iterator then reads as of the client's clock, the latest
    state, which is what a Strong read asks for anyway.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to get mvccTs" not in record.getMessage()


@contextmanager
def quiet_iterator() -> Iterator[None]:
    """Within the block, :class:`_DropSessionTsWarning` filters pymilvus's query iterator log."""
    logger = logging.getLogger("pymilvus.client.iterator.query_iterator")
    flt = _DropSessionTsWarning()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)
