"""Metadata filters of :class:`~headwise.memory.store.VectorMemory`: a small Mongo-style language compiled to SQL.

A filter is a dict over the fields of each record's metadata (a JSON object; ``"a.b"`` names
the field ``b`` of the object in field ``a``). It is checked and compiled once into a SQLite
boolean expression over ``json_extract(metadata, '$.field')`` with every value bound as a
parameter, and SQLite evaluates it to the set of matching records (a ``seq`` each). The
search then only considers those records (:mod:`headwise.memory.filtered`).

- ``{"lang": "en"}``: equality (also ``{"lang": {"$eq": "en"}}``); values str, int, float, bool, None.
- ``{"lang": {"$ne": "en"}}``: not equal, records without the field included (the complement of ``$eq``).
- ``{"year": {"$gte": 2000, "$lt": 2010}}``: ranges ``$gt $gte $lt $lte``, numbers only; operators in one dict AND.
- ``{"tag": {"$in": ["a", "b"]}}``: one of the values; ``$nin``: none of them (records without the field included).
- ``{"tag": {"$exists": True}}``: the field is present (with any value, null included); ``False``: absent.
- ``{"$and": [f, g]}``, ``{"$or": [f, g]}``: non-empty lists of filters; several keys in one dict AND.
- ``{"$not": f}``: the complement of ``f`` (also inside a field: ``{"y": {"$not": {"$gt": 1}}}``).
- ``{}``: every record.

numpy scalars and 1-d arrays (for ``$in``) are taken as the Python values they hold.

Values are typed as in JSON: a string equals only a string, a number only a number (``1 ==
1.0``), a bool only a bool (``True`` is not ``1``), ``None`` only a JSON null. A range
compares numbers only: a record whose field holds a string, bool or null does not match, and
a range *operand* that is not a number is a HeadwiseError. Lists and objects are not values:
equality with a list is a HeadwiseError. A field that no record has is allowed: it matches
nothing (and ``$ne`` / ``$nin`` / ``$exists: False`` on it match everything). Metadata that
is not an object (a number, a list, null) has no fields.

Field names are identifiers (letters, digits and ``_``, not starting with a digit) joined by
dots for nesting; they are checked before they reach SQL, and values are always bound
parameters, never SQL text. The JSON path is written into the SQL as a literal so that an
expression index made by :func:`create_field_index` (``mem.index_field("lang")``) serves it.

Example:
    >>> f = compile_filter({"lang": "en", "year": {"$gte": 2000}})
    >>> f.params, f.key
    (('en', 2000), '{"lang":"en","year":{"$gte":2000}}')
    >>> compile_filter({"year": {"$gt": "2000"}})
    Traceback (most recent call last):
    ...
    headwise.errors.HeadwiseError: filter field 'year' $gt: expected a number (int or float, not bool), got '2000' (str)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from headwise.errors import bad_argument
from headwise.memory.storage import Storage, _sql_errors, write_transaction

#: Field names: identifiers joined by dots (nested objects).
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
MAX_FIELD_LENGTH = 256
#: Deepest nesting of $and / $or / $not accepted (Python recursion and SQLite's expression depth).
MAX_DEPTH = 32
#: Most bound values in one filter (SQLite allows 32,766; a list of $in values is one).
MAX_PARAMS = 10_000

COMPARISONS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
FIELD_OPERATORS = ("$eq", "$ne", *COMPARISONS, "$in", "$nin", "$exists", "$not")
LOGICAL_OPERATORS = ("$and", "$or", "$not")
_INT64 = (-(2**63), 2**63)


@dataclass(frozen=True)
class CompiledFilter:
    """A checked filter: ``where`` is a SQLite expression with ``?`` for each of ``params``.

    ``key``: canonical JSON of the filter (sorted keys), for cache keys. ``fields``: the
    field names it reads, in order of appearance.
    """

    where: str
    params: tuple[Any, ...]
    key: str
    fields: tuple[str, ...]


def check_field_name(name: Any, what: str = "field") -> str:
    """``name`` if it is a valid field name (see the module docstring), else a HeadwiseError naming it."""
    if not isinstance(name, str) or len(name) > MAX_FIELD_LENGTH or not FIELD_NAME.fullmatch(name):
        raise bad_argument(
            what,
            f"a field name: identifiers (letters, digits, _) joined by dots, at most {MAX_FIELD_LENGTH} characters",
            repr(name),
        )
    return name


def field_sql(name: str) -> str:
    """``json_extract(metadata, '$.name')``: the expression that filters compare and indexes store."""
    return f"json_extract(metadata, '$.{check_field_name(name)}')"  # checked: no quote can reach SQL


def compile_filter(where: Any) -> CompiledFilter:
    """Check ``where`` (a filter dict, see the module docstring) and compile it; HeadwiseError naming the culprit."""
    if not isinstance(where, Mapping):
        raise bad_argument("filter", "a dict such as {'lang': 'en'} or {'year': {'$gte': 2000}}", type(where).__name__)
    compiler = _Compiler()
    sql = compiler.filter(where, 0)
    if len(compiler.params) > MAX_PARAMS:
        raise bad_argument("filter", f"at most {MAX_PARAMS} values (use $in for long lists)", len(compiler.params))
    key = json.dumps(where, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)
    fields = tuple(dict.fromkeys(compiler.fields))
    return CompiledFilter(sql, tuple(compiler.params), key, fields)


def _balanced(terms: list[str], op: str) -> str:
    """``terms`` joined by ``op`` as a balanced tree: SQLite refuses expressions deeper than 1,000."""
    if len(terms) == 1:
        return terms[0]
    mid = len(terms) // 2
    return f"({_balanced(terms[:mid], op)} {op} {_balanced(terms[mid:], op)})"


def _not(sql: str) -> str:
    # SQL's NOT NULL is NULL: a term on an absent field is NULL, read as false by WHERE, AND and
    # OR, so only a negation needs IFNULL to make the complement exact.
    return f"(NOT IFNULL({sql}, 0))"


def _plain(value: Any) -> Any:
    """A numpy scalar or array as the Python value(s) it holds; anything else unchanged."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return value


def _json_default(value: Any) -> Any:
    """json.dumps's fallback for the checked filter's other types: mappings and numpy values."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "str"
    return "other"


class _Compiler:
    """Recursive descent over a filter dict, collecting bound parameters in SQL order."""

    def __init__(self) -> None:
        self.params: list[Any] = []
        self.fields: list[str] = []

    def filter(self, where: Mapping, depth: int) -> str:
        if depth > MAX_DEPTH:
            raise bad_argument("filter", f"at most {MAX_DEPTH} levels of $and / $or / $not", "a deeper filter")
        terms = []
        for key, value in where.items():
            if not isinstance(key, str):
                raise bad_argument("filter", "str keys (field names or $and, $or, $not)", repr(key))
            if key.startswith("$"):
                terms.append(self.logical(key, value, depth))
            else:
                terms.append(self.field(check_field_name(key, "filter field"), value))
        return _balanced(terms, "AND") if terms else "1"

    def logical(self, op: str, value: Any, depth: int) -> str:
        if op == "$not":
            if not isinstance(value, Mapping):
                raise bad_argument("filter $not", "a filter dict", type(value).__name__)
            return _not(self.filter(value, depth + 1))
        if op not in ("$and", "$or"):
            raise bad_argument("filter", f"a field name or one of {', '.join(LOGICAL_OPERATORS)}", f"operator {op!r}")
        if not isinstance(value, list | tuple) or not value or not all(isinstance(f, Mapping) for f in value):
            raise bad_argument(f"filter {op}", "a non-empty list of filter dicts", repr(value)[:80])
        return _balanced([self.filter(f, depth + 1) for f in value], op[1:].upper())

    def field(self, name: str, spec: Any) -> str:
        self.fields.append(name)
        spec = _plain(spec)
        if isinstance(spec, Mapping):
            if not spec:
                raise bad_argument(f"filter field {name!r}", "a value or a non-empty operator dict", "{}")
            return _balanced([self.operator(name, op, arg) for op, arg in spec.items()], "AND")
        return self.equal(name, self.scalar(name, "$eq", spec))

    def operator(self, name: str, op: Any, arg: Any) -> str:
        where = f"filter field {name!r} {op}"
        arg = _plain(arg)
        if op in ("$eq", "$ne"):
            sql = self.equal(name, self.scalar(name, op, arg))
            return sql if op == "$eq" else _not(sql)
        if op in COMPARISONS:
            if _kind(arg) != "number":
                raise bad_argument(where, "a number (int or float, not bool)", f"{arg!r} ({type(arg).__name__})")
            value = self.scalar(name, op, arg)
            x, t = self.sql(name)
            self.params.append(value)
            return f"({t} IN ('integer', 'real') AND {x} {COMPARISONS[op]} ?)"
        if op in ("$in", "$nin"):
            if not isinstance(arg, list | tuple):
                raise bad_argument(where, "a list of values (str, int, float, bool, None)", type(arg).__name__)
            sql = self.member(name, [self.scalar(name, op, v) for v in arg])
            return sql if op == "$in" else _not(sql)
        if op == "$exists":
            if not isinstance(arg, bool):
                raise bad_argument(where, "True or False", repr(arg))
            return f"({self.sql(name)[1]} IS {'NOT ' if arg else ''}NULL)"
        if op == "$not":
            if not isinstance(arg, Mapping):
                raise bad_argument(where, "an operator dict such as {'$gt': 1}", type(arg).__name__)
            return _not(self.field(name, arg))
        raise bad_argument(
            f"filter field {name!r}", f"operators from {', '.join(FIELD_OPERATORS)}", f"unknown operator {op!r}"
        )

    def scalar(self, name: str, op: str, value: Any) -> Any:
        """A value checked to be a JSON scalar SQLite can compare exactly."""
        value = _plain(value)
        kind = _kind(value)
        where = f"filter field {name!r} {op}"
        if kind == "other":
            raise bad_argument(where, "a str, int, float, bool or None (lists and objects are not values)",
                               f"{type(value).__name__}")  # fmt: skip
        if kind == "number":
            if isinstance(value, float) and not math.isfinite(value):
                raise bad_argument(where, "a finite number", repr(value))
            if isinstance(value, int) and not _INT64[0] <= value < _INT64[1]:
                raise bad_argument(where, "an int in [-2**63, 2**63)", repr(value))
            return float(value) if isinstance(value, float) else int(value)
        if kind == "str":
            if "\x00" in value:  # SQLite's JSON functions end a string at NUL
                raise bad_argument(where, "a str without NUL characters", repr(value)[:80])
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise bad_argument(where, "a str that is valid Unicode", f"{value!r} ({exc.reason})") from exc
        return value

    def sql(self, name: str) -> tuple[str, str]:
        """(value expression, JSON type expression) of a field."""
        path = f"'$.{name}'"  # name passed check_field_name: identifiers and dots only
        return f"json_extract(metadata, {path})", f"json_type(metadata, {path})"

    def equal(self, name: str, value: Any) -> str:
        # The json_type term keeps types apart (json_extract maps true to 1 and a list to its
        # JSON text); the json_extract term is the one an expression index serves.
        x, t = self.sql(name)
        kind = _kind(value)
        if kind == "null":
            return f"({t} = 'null')"
        if kind == "bool":
            return f"({t} = '{'true' if value else 'false'}' AND {x} = {int(value)})"
        self.params.append(value)
        types = "IN ('integer', 'real')" if kind == "number" else "= 'text'"
        return f"({t} {types} AND {x} = ?)"

    def member(self, name: str, values: list[Any]) -> str:
        x, t = self.sql(name)
        terms = []
        strings = [v for v in values if _kind(v) == "str"]
        numbers = [v for v in values if _kind(v) == "number"]
        # One bound JSON array per type: json_each yields TEXT for its strings and INTEGER/REAL
        # for its numbers, so each list compares within its own type.
        for group, types in ((strings, "= 'text'"), (numbers, "IN ('integer', 'real')")):
            if group:
                self.params.append(json.dumps(group))
                terms.append(f"({t} {types} AND {x} IN (SELECT value FROM json_each(?)))")
        json_types = sorted({"true" if v else "false" for v in values if _kind(v) == "bool"})
        json_types += ["null"] if any(v is None for v in values) else []
        if json_types:
            terms.append(f"({t} IN ({', '.join(repr(j) for j in json_types)}))")
        return _balanced(terms, "OR") if terms else "0"


# ---------------------------------------------------------------------- evaluation in SQLite
@_sql_errors
def matching_seqs(db: Storage, flt: CompiledFilter) -> np.ndarray:
    """The ``seq`` numbers (m,) int64, ascending, of the records of ``db`` that ``flt`` matches.

    Runs on the store's own connection, so a reader sees its snapshot.
    """
    rows = db.conn.execute(f"SELECT seq FROM records WHERE {flt.where}", flt.params).fetchall()
    return np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))


def _index_name(field: str) -> str:
    return f'"hw_field:{field}"'  # a quoted identifier; field passed check_field_name


@_sql_errors
def create_field_index(db: Storage, field: str) -> bool:
    """Create a SQLite expression index on ``json_extract(metadata, '$.field')``; False if it existed.

    Filters on the field then read the index instead of every record's JSON (equality, ranges,
    ``$in``); every write of a record also writes its entry.
    """
    check_field_name(field)
    if field in field_indexes(db):
        return False
    with write_transaction(db.conn) as conn:
        conn.execute(f"CREATE INDEX IF NOT EXISTS {_index_name(field)} ON records({field_sql(field)})")
    return True


@_sql_errors
def field_indexes(db: Storage) -> list[str]:
    """The fields with an index made by :func:`create_field_index`, sorted."""
    rows = db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'hw_field:%'")
    return sorted(r[0][len("hw_field:") :] for r in rows)
