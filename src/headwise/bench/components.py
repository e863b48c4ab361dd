"""``headwise bench components``: where a MultiHeadAttention forward spends its time.

The torch profiler times the labelled scopes of one forward (:mod:`headwise.profiling`):
QKV projection, QK^T, mask/score, softmax, AV and the output projection (with the head
gates and the concatenation). The breakdown uses the ``eager`` backend, whose components are
separate operations; the fused backends (SDPA, tiled) do them inside one kernel, so for
``auto`` the table shows the attention core as one row. Times are the profiler's inclusive
CPU time per forward, averaged over ``repeat`` profiled forwards after a warm-up.

Example:
    >>> rows = run_components(seqs=[16], repeat=1, embed=32, heads=4)
    >>> sorted({r["backend"] for r in rows}), rows[0]["component"]
    (['auto', 'eager'], 'QKV projection')
"""

from __future__ import annotations

import torch
from torch.autograd.profiler import record_function

from headwise.modules import MultiHeadAttention
from headwise.profiling import (
    ATTENTION_CORE,
    AV,
    MASK_SCORE,
    OUTPUT_PROJECTION,
    QK,
    QKV_PROJECTION,
    SOFTMAX,
)

FORWARD = "headwise::bench_forward"
NAMES = {
    QKV_PROJECTION: "QKV projection",
    QK: "QK^T",
    MASK_SCORE: "mask / score",
    SOFTMAX: "softmax",
    AV: "AV",
    OUTPUT_PROJECTION: "gates, concat, output projection",
}
CORE_PARTS = (QK, MASK_SCORE, SOFTMAX, AV)


def _profile(module: MultiHeadAttention, x: torch.Tensor, backend: str, repeat: int, causal: bool) -> dict[str, float]:
    """Inclusive CPU microseconds per forward of every labelled scope."""
    from headwise.masks import causal as causal_mask

    mask = causal_mask if causal else None
    with torch.inference_mode():
        module(x, mask=mask, backend=backend)  # warm-up: plans, caches, thread pools
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(repeat):
                with record_function(FORWARD):
                    module(x, mask=mask, backend=backend)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("headwise::"):
            totals[event.key] = event.cpu_time_total / repeat
    return totals


def run_components(
    seqs: list[int] | tuple[int, ...] = (128, 1024, 4096),
    repeat: int = 3,
    embed: int = 512,
    heads: int = 8,
    causal: bool = True,
) -> list[dict]:
    """One row per (L, backend, component): ms per forward and % of the forward."""
    torch.manual_seed(0)
    module = MultiHeadAttention(embed, heads).eval()
    rows = []
    for L in seqs:
        x = torch.randn(1, L, embed)
        for backend in ("eager", "auto"):
            t = _profile(module, x, backend, repeat, causal)
            total = t.get(FORWARD, 0.0)
            parts = [QKV_PROJECTION, *CORE_PARTS, OUTPUT_PROJECTION] if backend == "eager" else []
            named = {NAMES[p]: t.get(p, 0.0) for p in parts}
            if backend == "eager":
                named["other attention core (lse, copies)"] = t.get(ATTENTION_CORE, 0.0) - sum(
                    t.get(p, 0.0) for p in CORE_PARTS
                )
            else:
                named = {
                    NAMES[QKV_PROJECTION]: t.get(QKV_PROJECTION, 0.0),
                    "attention core (fused)": t.get(ATTENTION_CORE, 0.0),
                    NAMES[OUTPUT_PROJECTION]: t.get(OUTPUT_PROJECTION, 0.0),
                }
            named["other (checks, masks, dispatch)"] = total - sum(
                t.get(p, 0.0) for p in (QKV_PROJECTION, ATTENTION_CORE, OUTPUT_PROJECTION)
            )
            for name, us in named.items():
                rows.append(
                    {
                        "L": L,
                        "backend": backend,
                        "component": name,
                        "ms": us / 1e3,
                        "pct": 100.0 * us / total if total else 0.0,
                        "forward_ms": total / 1e3,
                    }
                )
    return rows


def to_markdown(rows: list[dict], command: str, info: dict, embed: int, heads: int, causal: bool) -> str:
    lines = [
        "# Component breakdown of a MultiHeadAttention forward (torch profiler)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}; load average at start "
        f"{info['load_average'][0]:.2f}. E={embed}, {heads} heads, batch 1, {'causal' if causal else 'no mask'}, "
        "float32, inference mode. Inclusive CPU time of each labelled scope per forward, from the profiler "
        "(which adds its own per-operation overhead: compare shares, not absolute times, with other tables).",
        "",
    ]
    for L in sorted({r["L"] for r in rows}):
        for backend in ("eager", "auto"):
            sel = [r for r in rows if r["L"] == L and r["backend"] == backend]
            if not sel:
                continue
            lines += [
                f"## L={L}, backend={backend}: {sel[0]['forward_ms']:.2f} ms per forward",
                "",
                "| component | ms | % of total |",
                "|---|---|---|",
            ]
            lines += [f"| {r['component']} | {r['ms']:.3f} | {r['pct']:.1f}% |" for r in sel]
            lines.append("")
    return "\n".join(lines)
