"""Regression comparison of two benchmark result files (``--compare OLD.json``).

Every suite writes JSON with a ``records`` list: one record per (case, implementation) run.
A record's identity is every field that is not a measurement (variant, L, impl, ...), so
files from different suites or different case lists compare on what they share.

A slowdown is flagged when the new median exceeds the old one by more than ``threshold``
(relative). Medians on a shared 2-core machine move by several percent between runs: use
this by hand on a quiet machine, never as a CI gate.

Example:
    >>> old = {"records": [{"impl": "tiled", "L": 512, "median_ms": 10.0, "cv_pct": 1.0}]}
    >>> new = {"records": [{"impl": "tiled", "L": 512, "median_ms": 12.0, "cv_pct": 1.0}]}
    >>> rows = compare(old, new, threshold=0.10)
    >>> rows[0].ratio, rows[0].regressed
    (1.2, True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from headwise.errors import HeadwiseError

# Fields that are measurements, not identity. Anything else names the case.
MEASUREMENTS = frozenset(
    {
        "mean_ms",
        "median_ms",
        "p95_ms",
        "p99_ms",
        "std_ms",
        "cv_pct",
        "times_ms",
        "gflops",
        "throughput_per_s",
        "note",
        "peak_extra_bytes",
        "workspace_bytes",
    }
)


@dataclass(frozen=True)
class Comparison:
    """One case present in both files."""

    key: str
    old_ms: float
    new_ms: float
    old_cv: float
    new_cv: float
    threshold: float

    @property
    def ratio(self) -> float:
        """new / old median time: above 1 is slower."""
        return self.new_ms / self.old_ms

    @property
    def regressed(self) -> bool:
        return self.ratio > 1 + self.threshold


def record_key(record: dict) -> str:
    """A stable text identity of a record: its non-measurement fields, sorted by name."""
    return ", ".join(f"{k}={record[k]}" for k in sorted(record) if k not in MEASUREMENTS)


def load_records(path: Path | str, name: str = "compare file") -> dict:
    """Read a result file written by ``headwise bench``; a HeadwiseError naming ``name`` if it is not one.

    Checked whole here, so that a bad file is refused before a benchmark runs rather than
    failing in the comparison after it: a JSON object with a ``records`` list of objects,
    each ``median_ms`` (where present) a finite number > 0 (it divides the new time).
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bytes that are not UTF-8
        raise HeadwiseError(
            f"{name}: expected a readable JSON result of headwise bench, got {p} ({type(exc).__name__})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise HeadwiseError(f"{name}: expected JSON with a 'records' list, got {p} without one")
    for i, r in enumerate(data["records"]):
        if not isinstance(r, dict):
            raise HeadwiseError(f"{name}: expected every record to be a JSON object, got record {i} of {p}: {r!r:.60}")
        ms = r.get("median_ms", 1.0)
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 < ms < float("inf"):
            raise HeadwiseError(f"{name}: expected median_ms > 0 in every record, got {ms!r:.30} in record {i} of {p}")
    return data


def compare(old: dict, new: dict, threshold: float = 0.10) -> list[Comparison]:
    """Cases timed in both results, in the order of ``new``."""
    if not threshold >= 0:
        raise HeadwiseError(f"threshold: expected a relative slowdown >= 0, got {threshold}")
    before = {record_key(r): r for r in old["records"] if "median_ms" in r}
    rows = []
    for r in new["records"]:
        key = record_key(r)
        if "median_ms" in r and key in before:
            o = before[key]
            rows.append(
                Comparison(key, o["median_ms"], r["median_ms"], o.get("cv_pct", 0.0), r.get("cv_pct", 0.0), threshold)
            )
    return rows


def to_markdown(rows: list[Comparison], old_name: str, new_name: str) -> str:
    """A regression table; slower-than-threshold rows are marked REGRESSED."""
    lines = [
        f"# Regression check: {new_name} against {old_name}",
        "",
        "| case | old ms (CV%) | new ms (CV%) | new / old | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "REGRESSED" if r.regressed else ("faster" if r.ratio < 1 - r.threshold else "same")
        lines.append(
            f"| {r.key} | {r.old_ms:.2f} ({r.old_cv:.1f}) | {r.new_ms:.2f} ({r.new_cv:.1f}) "
            f"| {r.ratio:.3f} | {verdict} |"
        )
    n_bad = sum(r.regressed for r in rows)
    lines += (
        ["", f"{len(rows)} cases compared, {n_bad} slower by more than {100 * rows[0].threshold:.0f}%."] if rows else []
    )
    return "\n".join(lines) + "\n"
