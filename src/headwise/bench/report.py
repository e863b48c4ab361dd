"""Run the kernel suite and write Markdown + JSON reports with the goals of the core issue."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from headwise.bench.harness import (
    Timing,
    machine_info,
    measure_in_subprocess,
    paired_ratio,
    time_interleaved,
    wait_for_quiet,
)
from headwise.bench.kernels import HEADWISE, IMPLS, Case, cases_for, run_case
from headwise.cliutil import argv_command
from headwise.fileio import write_atomic

COMPETITORS = tuple(i for i in IMPLS if i not in HEADWISE)
# Peak-memory probes: (variant, backward, implementations); run at the largest L <= limit.
MEMORY_PROBES = (
    ("stats", False, ("headwise tiled",)),
    ("dense", False, ("headwise tiled", "torch SDPA", "eager math")),
    ("window128", True, ("headwise tiled", "torch SDPA")),
)


def matmul_peak_gflops(n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = time_interleaved({"mm": lambda: a @ b}, repeat=repeat)["mm"]
    return 2 * n**3 / t.median / 1e9


def run_kernels(
    seqs: list[int], repeat: int, memory: bool, progress: Callable[[str], None] = print, device: str = "cpu"
) -> dict:
    """Time every case at every length; return a JSON-ready result."""
    load = wait_for_quiet()
    info = machine_info()
    info["load_average_at_start"] = load
    peak = matmul_peak_gflops()
    info["matmul_peak_gflops"] = round(peak, 1)
    records = []
    for case in cases_for(seqs):
        progress(f"{case.label} L={case.L}")
        res = run_case(case, repeat, device)
        for impl, r in res.items():
            rec = {"variant": case.variant, "L": case.L, "backward": case.backward, "impl": impl}
            if isinstance(r, Timing):
                # Throughput in query tokens per second (B*L per call).
                rec.update(r.record(items=case.B * case.L), gflops=case.useful_flops() / r.median / 1e9)
            else:
                rec["note"] = r
            records.append(rec)
    mem = []
    if memory:
        for variant, backward, impls in MEMORY_PROBES:
            for L in sorted({min(seqs), 4096, max(seqs)} & set(seqs)):
                for impl in impls:
                    progress(f"memory {variant} {'fwd+bwd' if backward else 'fwd'} L={L} {impl}")
                    spec = {"variant": variant, "L": L, "backward": backward, "impl": impl, "device": device}
                    out = measure_in_subprocess("headwise.bench.memprobe", spec)
                    mem.append({**spec, **out})
    return {"machine": info, "records": records, "memory": mem, "repeat": repeat, "seqs": seqs}


def _find(records, variant, L, backward, impl):
    for r in records:
        if (r["variant"], r["L"], r["backward"], r["impl"]) == (variant, L, backward, impl) and "median_ms" in r:
            return r
    return None


def _ratio(a: dict, b: dict) -> float:
    """a's time / b's time: the median of per-round ratios (same interleaved rounds), which
    cancels the machine's drift between rounds; the ratio of medians for older records."""
    if a.get("times_ms") and b.get("times_ms") and len(a["times_ms"]) == len(b["times_ms"]):
        return paired_ratio(a["times_ms"], b["times_ms"])
    return a["median_ms"] / b["median_ms"]


def goals(result: dict) -> list[tuple[str, str, bool | None]]:
    """The core issue's goals, each (goal, evidence, met?), computed from the records.

    Every ratio is the median of per-round ratios (see :func:`_ratio`).
    """
    rec, seqs = result["records"], result["seqs"]
    out = []
    worst = None
    for r in rec:
        if r["impl"] != "headwise auto" or "median_ms" not in r:
            continue
        comp = [_find(rec, r["variant"], r["L"], r["backward"], c) for c in COMPETITORS]
        comp = [c for c in comp if c]
        if not comp:
            continue
        best = min(comp, key=lambda c: c["median_ms"])
        ratio = _ratio(r, best)
        if worst is None or ratio > worst[0]:
            worst = (ratio, f"{r['variant']} {'fwd+bwd' if r['backward'] else 'fwd'} L={r['L']} vs {best['impl']}")
    if worst:
        out.append(
            (
                "auto <= 1.05x the fastest competitor, every case",
                f"worst {worst[0]:.3f}x ({worst[1]})",
                worst[0] <= 1.05,
            )
        )
    t, s = _find(rec, "dense", 4096, False, "headwise tiled"), _find(rec, "dense", 4096, False, "torch SDPA")
    if t and s:
        ratio = _ratio(t, s)
        out.append(("tiled dense L=4096 within 1.5x of SDPA", f"{ratio:.2f}x", ratio <= 1.5))
    Lmax = max(seqs)
    t, s = _find(rec, "window128", Lmax, False, "headwise tiled"), _find(rec, "window128", Lmax, False, "torch SDPA")
    if t and s:
        ratio = _ratio(s, t)
        out.append((f"tiled window128 L={Lmax} >= 20x faster than SDPA + dense mask", f"{ratio:.1f}x", ratio >= 20))
    t4 = _find(rec, "window128", 4096, False, "headwise tiled")
    if t and t4 and Lmax > 4096:
        growth = t["median_ms"] / t4["median_ms"]
        bound = 5 * Lmax / 16384
        out.append((f"tiled window128 time(L={Lmax}) / time(4096) <= {bound:g}", f"{growth:.2f}", growth <= bound))
    worst_stats = None
    for L in seqs:
        a, b = _find(rec, "stats", L, False, "headwise tiled"), _find(rec, "stats", L, False, "tiled, no stats")
        if a and b:
            over = _ratio(a, b) - 1
            worst_stats = max(worst_stats or (-1, 0), (over, L))
    if worst_stats:
        ok = worst_stats[0] <= 0.30
        out.append(
            ("need_stats adds <= 30% to tiled forward", f"worst +{100 * worst_stats[0]:.0f}% (L={worst_stats[1]})", ok)
        )
    for m in result["memory"]:
        if m["L"] != max(seqs) or "peak_extra_bytes" not in m:
            continue
        if m["variant"] == "window128" and m["backward"] and m["impl"] == "headwise tiled":
            per_head = m["L"] * m["L"] * 4
            share = m["workspace_bytes"] / per_head
            out.append(
                (
                    f"window128 fwd+bwd L={m['L']}: workspace < 10% of one L x S float32 matrix",
                    f"{m['workspace_bytes'] / 2**20:.1f} MiB = {100 * share:.1f}% of {per_head / 2**20:.0f} MiB "
                    f"(peak extra {m['peak_extra_bytes'] / 2**20:.1f} MiB incl. out, dq, dk, dv)",
                    share < 0.10,
                )
            )
        if m["variant"] == "stats":
            per_head = m["L"] * m["L"] * 4
            out.append(
                (
                    f"need_stats L={m['L']}: no L x S allocation",
                    f"peak extra {m['peak_extra_bytes'] / 2**20:.1f} MiB vs {per_head / 2**20:.0f} MiB "
                    "for one L x S matrix",
                    m["peak_extra_bytes"] < per_head,
                )
            )
    return out


def to_markdown(result: dict, command: str) -> str:
    info, rec = result["machine"], result["records"]
    peak = info.get("matmul_peak_gflops") or float("nan")
    lines = [
        "# Kernel benchmark: headwise attend() vs torch SDPA, FlexAttention, eager math",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']} ({', '.join(info['cpu_flags'])}), {info['threads']} threads, "
        f"torch {info['torch']}, Python {info['python']}, device {info['device']}; "
        f"measured matmul peak {peak} GFLOP/s; load average at start {info['load_average_at_start']:.2f}.",
        "",
        f"B=1, H=8, d=64, float32. Median of at least {result['repeat']} interleaved rounds after one "
        "warm-up (fast cases run more rounds, up to 10x, until ~6 s; rounds rotate their order); "
        "mean, p50, p95, p99, CV% (flagged `!` above 10%), throughput in query tokens per second, "
        "useful GFLOP/s (4*B*H*pairs*d, x3.5 with backward) "
        "and % of the matmul peak. `vs best` = the median over rounds of this time / the fastest "
        "competitor's time in the same round (below 1 is faster); the goals use the same paired ratios. "
        "Competitors: " + ", ".join(COMPETITORS) + ".",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    for goal, evidence, ok in goals(result):
        lines.append(f"| {goal} | {evidence} | {'yes' if ok else 'NO'} |")
    lines += ["", "## Times", ""]
    keys = []
    for r in rec:
        key = (r["variant"], r["backward"], r["L"])
        if key not in keys:
            keys.append(key)
    lines += [
        "| case | L | implementation | avg ms | p50 ms | p95 ms | p99 ms | CV% | tokens/s | GFLOP/s | % peak "
        "| vs best |",
        "|---" * 12 + "|",
    ]
    for variant, backward, L in keys:
        rows = [r for r in rec if (r["variant"], r["backward"], r["L"]) == (variant, backward, L)]
        comp = [r for r in rows if r["impl"] in COMPETITORS and "median_ms" in r]
        best = min(comp, key=lambda r: r["median_ms"], default=None)
        label = f"{variant} {'fwd+bwd' if backward else 'fwd'}"
        for r in rows:
            if "median_ms" in r:
                flag = "!" if r["cv_pct"] > 10 else ""
                vs = f"{_ratio(r, best):.2f}" if best else "-"
                lines.append(
                    f"| {label} | {L} | {r['impl']} | {r['mean_ms']:.2f} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} "
                    f"| {r['p99_ms']:.2f} | {r['cv_pct']:.1f}{flag} | {r['throughput_per_s']:,.0f} "
                    f"| {r['gflops']:.1f} | {100 * r['gflops'] / peak:.0f}% | {vs} |"
                )
            else:
                lines.append(f"| {label} | {L} | {r['impl']} | {r['note']} |" + " |" * 8)
    if result["memory"]:
        lines += ["", "## Peak extra memory (fresh subprocess per row)", ""]
        lines += [
            "Peak extra = growth of the resident-set high-water mark during one call, after a warm-up on a tiny "
            "case; workspace = peak extra minus what the call returns (out, and dq, dk, dv with backward).",
            "",
            "| case | L | implementation | peak extra MiB | workspace MiB | one L x S float32 matrix, MiB |",
            "|---|---|---|---|---|---|",
        ]
        for m in result["memory"]:
            case = f"{m['variant']} {'fwd+bwd' if m['backward'] else 'fwd'}"
            if "peak_extra_bytes" in m:
                val = f"{m['peak_extra_bytes'] / 2**20:.1f} | {m['workspace_bytes'] / 2**20:.1f}"
            else:
                val = f"{m.get('skipped', m.get('error'))} |"
            lines.append(f"| {case} | {m['L']} | {m['impl']} | {val} | {m['L'] ** 2 * 4 / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: Path, name: str = "kernels") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    command = result.get("command") or argv_command()
    result["command"] = command
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    write_atomic(js, json.dumps(result, indent=1))
    write_atomic(md, to_markdown(result, command))
    return md, js


__all__ = ["run_kernels", "write_report", "to_markdown", "goals", "Case"]
