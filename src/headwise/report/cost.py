"""Report sections 6 and 7: memory of attention vs L (measured) and FLOPs by component.

Shape legend: x (1, L, E); q, k, v (1, H, L, E/H); the reference backend builds (1, H, L, L)
logits and weights, the tiled backend (1, H, block, block) tiles only.

FLOPs of one MultiHeadAttention(E, H) forward on L tokens (multiply-add = 2 FLOPs)::

    QKV projection   2 * L * E * 3E        QK^T   2 * L * L * E
    softmax          5 * H * L * L          AV     2 * L * L * E
    output proj.     2 * L * E * E

Example:
    >>> from headwise.report.cost import analytic_flops
    >>> f = analytic_flops(L=1024, E=512, H=8)
    >>> f["qk"] + f["av"] == f["qkv_projection"] + f["output_projection"]  # crossover at L = 2E
    True
"""

from __future__ import annotations

import math

import numpy as np
import torch

from headwise.errors import bad_argument
from headwise.modules import MultiHeadAttention
from headwise.report.common import Section, Table, check_flag, check_seed, fmt, new_figure
from headwise.report.memprobe import measure

GIB = 2**30


def analytic_flops(L: int, E: int, H: int) -> dict[str, int]:
    """FLOPs per component of one self-attention forward (batch 1); see the module docstring."""
    for name, v in (("L", L), ("E", E), ("H", H)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad_argument(name, "an int >= 1", repr(v))
    return {
        "qkv_projection": 2 * L * E * 3 * E,
        "qk": 2 * L * L * E,
        "softmax": 5 * H * L * L,
        "av": 2 * L * L * E,
        "output_projection": 2 * L * E * E,
    }


def counted_flops(L: int, E: int, H: int, seed: int = 0) -> dict[str, int]:
    """The same components counted by ``torch.utils.flop_counter.FlopCounterMode`` on real calls.

    QKV projection and output projection are the module's own calls, QK^T and AV the two
    matmuls of attention on its q, k, v; ``forward`` is a whole MultiHeadAttention forward
    (reference backend). FlopCounterMode counts matmuls only, so softmax is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(seed)
    mha = MultiHeadAttention(E, H).eval()
    x = torch.randn(1, L, E)

    def count(fn) -> tuple[int, object]:
        with FlopCounterMode(display=False) as counter:
            result = fn()
        return counter.get_total_flops(), result

    with torch.no_grad():
        c_qkv, (q, k, v) = count(lambda: mha.project(x, None, None))
        c_qk, s = count(lambda: q @ k.transpose(-1, -2))
        p = torch.softmax(s / math.sqrt(E // H), dim=-1)
        c_av, o = count(lambda: p @ v)
        c_out, _ = count(lambda: mha.out_proj(o.transpose(1, 2).reshape(1, L, E)))
        c_fwd, _ = count(lambda: mha(x, backend="reference"))
    return {"qkv_projection": c_qkv, "qk": c_qk, "av": c_av, "output_projection": c_out, "forward": c_fwd}


def flops_breakdown(*, quick: bool = False, seed: int = 0, E: int = 256, H: int = 8) -> Section:
    """Section 7: FLOPs by component vs L, analytic and checked against FlopCounterMode."""
    check_flag("quick", quick)
    check_seed(seed)
    lengths = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    checked = [64, 256, 1024] if quick else [64, 256, 1024, 2048]
    rows = []
    for L in lengths:
        a = analytic_flops(L, E, H)
        rec: dict = {"L": L, "analytic": a}
        if L in checked:
            c = counted_flops(L, E, H, seed)
            matmul_total = a["qkv_projection"] + a["qk"] + a["av"] + a["output_projection"]
            rec["counted"] = c
            rec["equal"] = all(c[n] == a[n] for n in ("qkv_projection", "qk", "av", "output_projection")) and (
                c["forward"] == matmul_total
            )
        rows.append(rec)
    proj = lambda a: a["qkv_projection"] + a["output_projection"]  # noqa: E731
    core = lambda a: a["qk"] + a["softmax"] + a["av"]  # noqa: E731
    over = next((r["L"] for r in rows if core(r["analytic"]) > proj(r["analytic"])), None)
    exact = [r for r in rows if "equal" in r]
    n_equal = sum(r["equal"] for r in exact)
    last = rows[-1]["analytic"]
    finding = (
        f"For MultiHeadAttention(E={E}, H={H}) the projections cost 8·L·E² FLOPs and the attention core "
        f"4·L²·E + 5·H·L², so the core overtakes the projections between L={over // 2 if over else '?'} and L={over} "
        f"(matmuls alone cross at L = 2E = {2 * E}); at L={rows[-1]['L']} the core is "
        f"{100 * core(last) / (core(last) + proj(last)):.0f}% of the {fmt(sum(last.values()) / 1e9, 1)} GFLOPs. "
        f"torch.utils.flop_counter.FlopCounterMode agrees exactly with the formulas (each matmul component and a "
        f"whole forward) at {n_equal} of {len(exact)} checked lengths "
        f"({', '.join(str(r['L']) for r in exact)}); it does not count softmax, whose 5·H·L² is a convention."
    )
    sec = Section("flops", 7, "FLOPs by component", finding, data={"E": E, "H": H, "rows": rows, "crossover_L": over})
    names = ("qkv_projection", "qk", "softmax", "av", "output_projection")
    sec.tables.append(
        Table(
            "FlopCounterMode vs formula (GFLOP; forward = one whole MultiHeadAttention call, reference backend)",
            ["L"]
            + [f"{n} counted / formula" for n in ("qkv_projection", "qk", "av", "output_projection")]
            + ["forward counted", "equal"],
            [
                [str(r["L"])]
                + [f"{r['counted'][n] / 1e9:.4f} / {r['analytic'][n] / 1e9:.4f}" for n in names if n != "softmax"]
                + [f"{r['counted']['forward'] / 1e9:.4f}", "yes" if r["equal"] else "NO"]
                for r in exact
            ],
        )
    )
    fig, axes = new_figure(1, 2, width=10.5, height=3.8)
    Ls = [r["L"] for r in rows]
    ax = axes[0, 0]
    bottom = np.zeros(len(Ls))
    for n in names:
        share = np.array([r["analytic"][n] / sum(r["analytic"].values()) for r in rows])
        ax.bar(range(len(Ls)), share, bottom=bottom, label=n)
        bottom += share
    ax.set_xticks(range(len(Ls)), [str(L) for L in Ls], rotation=45)
    ax.set(xlabel="L", ylabel="share of FLOPs", title=f"FLOPs by component (E={E}, H={H})")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    ax.plot(Ls, [proj(r["analytic"]) for r in rows], "o-", label="projections (QKV + output)")
    ax.plot(Ls, [core(r["analytic"]) for r in rows], "s-", label="attention core (QK^T + softmax + AV)")
    ax.plot([r["L"] for r in exact], [r["counted"]["forward"] for r in exact], "k*", ms=9, label="FlopCounterMode")
    if over:
        ax.axvline(over, color="gray", ls="--", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="L", ylabel="FLOPs", title="Projections vs attention core")
    ax.legend(fontsize=7)
    sec.add_figure("flops", fig, "Analytic FLOPs per component vs L; stars: a whole forward counted by the profiler.")
    return sec


def _fit(Ls: list[int], ys: list[float], powers: tuple[int, ...]) -> list[float]:
    A = np.array([[float(L) ** p for p in powers] for L in Ls])
    coef, *_ = np.linalg.lstsq(A, np.array(ys, dtype=float), rcond=None)
    return [float(c) for c in coef]


def memory_scaling(
    *, quick: bool = False, seed: int = 0, lengths: list[int] | None = None, budget_bytes: int = 3 * GIB
) -> Section:
    """Section 6: peak extra memory of one call vs L, reference (O(L^2)) vs tiled (O(L)).

    Each point is measured in a fresh subprocess (:mod:`headwise.report.memprobe`; B=1, H=1,
    d=64, float32, no grad). A reference length whose peak the quadratic fit of the smaller
    lengths predicts above ``budget_bytes`` is not run; the fit is shown there instead.
    """
    check_flag("quick", quick)
    check_seed(seed)
    lengths = sorted(lengths or ([1024, 2048, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]))
    if len(lengths) < 3 or any(isinstance(L, bool) or not isinstance(L, int) or L < 256 for L in lengths):
        raise bad_argument("lengths", "at least 3 ints >= 256", repr(lengths))
    points: dict[str, list[dict]] = {}
    for backend in ("reference", "tiled"):
        points[backend] = measure({"backend": backend, "lengths": lengths, "budget_bytes": budget_bytes})
    skipped = [dict(p, backend=b) for b, ps in points.items() for p in ps if p.get("skipped")]
    ref = [p for p in points["reference"] if not p.get("skipped")]
    til = points["tiled"]
    if len(ref) < 2:
        raise bad_argument("budget_bytes", "room for the reference at two lengths at least", budget_bytes)
    a2, a0 = _fit([p["L"] for p in ref], [p["peak_extra_bytes"] for p in ref], (2, 0))
    a1 = 0.0
    b1, b0 = _fit([p["L"] for p in til], [p["peak_extra_bytes"] for p in til], (1, 0))
    Lmax = max(lengths)
    pred_ref = a2 * Lmax**2 + a1 * Lmax + a0
    measured = {"points": points, "skipped": skipped, "fit_reference": [a2, a0], "fit_tiled": [b1, b0]}
    top_ref, top_til = ref[-1], til[-1]
    skip_txt = (
        f" The reference at L={', '.join(str(s['L']) for s in skipped if s['backend'] == 'reference')} was not run: "
        f"the fit predicts {pred_ref / GIB:.2f} GiB at L={Lmax}, above the {budget_bytes / GIB:.2f} GiB budget."
        if any(s["backend"] == "reference" for s in skipped)
        else ""
    )
    finding = (
        f"Measured in fresh processes (B=1, H=1, d=64, float32), the reference backend's peak extra memory fits "
        f"{fmt(a2, 2)}·L² + {fmt(a0 / 2**20, 1)} MiB: {fmt(a2 / 4, 2)} float32 L x L matrices alive at the peak, "
        f"{fmt(top_ref['peak_extra_bytes'] / 2**20, 1)} MiB at L={top_ref['L']}.{skip_txt} The tiled backend fits "
        f"{fmt(b1, 1)}·L + {fmt(b0 / 2**20, 1)} MiB ({fmt(top_til['peak_extra_bytes'] / 2**20, 1)} MiB at "
        f"L={top_til['L']}, where the output alone is {fmt(top_til['output_bytes'] / 2**20, 1)} MiB): linear in L, "
        f"{fmt(pred_ref / max(top_til['peak_extra_bytes'], 1), 0)}x less than the reference fit at L={Lmax}."
    )
    sec = Section(
        "memory",
        6,
        "Memory scaling",
        finding,
        data={"lengths": sorted(lengths), "B": 1, "H": 1, "d": 64, "budget_bytes": budget_bytes},
        measured=measured,
    )
    sec.tables.append(
        Table(
            "Peak extra memory of one attend() call (MiB, measured in a subprocess)",
            ["L", "reference", "tiled", "one L x L float32 matrix"],
            [
                [
                    str(L),
                    next((f"{p['peak_extra_bytes'] / 2**20:.1f}" for p in ref if p["L"] == L), "not run (budget)"),
                    next((f"{p['peak_extra_bytes'] / 2**20:.2f}" for p in til if p["L"] == L), "-"),
                    f"{4 * L * L / 2**20:.1f}",
                ]
                for L in sorted(lengths)
            ],
        )
    )
    fig, axes = new_figure(1, 1, width=7, height=4)
    ax = axes[0, 0]
    grid = np.geomspace(min(lengths), Lmax, 50)
    ax.plot([p["L"] for p in ref], [p["peak_extra_bytes"] for p in ref], "o", label="reference, measured")
    ax.plot(grid, a2 * grid**2 + a1 * grid + a0, "C0--", lw=1, label="reference fit a·L² + c")
    ax.plot([p["L"] for p in til], [p["peak_extra_bytes"] for p in til], "s", color="C1", label="tiled, measured")
    ax.plot(grid, np.maximum(b1 * grid + b0, 1), "C1--", lw=1, label="tiled fit b·L + c")
    ax.set(xscale="log", yscale="log", xlabel="L", ylabel="peak extra bytes", title="Memory of one attention call")
    ax.legend(fontsize=8)
    sec.add_figure("memory", fig, "Peak extra memory vs L, measured in subprocesses, with least-squares fits.")
    return sec
