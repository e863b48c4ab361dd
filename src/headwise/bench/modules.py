"""``headwise bench modules``: MultiHeadAttention against torch's nn.MultiheadAttention.

Forward (eval, no grad) at L=1024, E=512, 8 heads, batch 4, with and without weights, and
GQA 8/2 against MHA 8/8 at L=4096. torch runs as users run it: ``nn.MultiheadAttention``
in eval mode under ``torch.inference_mode`` takes its native fast path when it can.
"""

from __future__ import annotations

import torch
from torch import nn

from headwise.bench.harness import Timing, time_interleaved
from headwise.modules import MultiHeadAttention


def run_modules(repeat: int, L: int = 1024, L_gqa: int = 4096, embed: int = 512, heads: int = 8, batch: int = 4):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(embed, heads, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(theirs).eval()
    x = torch.randn(batch, L, embed)
    rows = []

    def torch_fwd(weights: bool):
        def run():
            with torch.inference_mode():
                return theirs(x, x, x, need_weights=weights)[0]

        return run

    def ours_fwd(weights: bool):
        def run():
            with torch.inference_mode():
                return ours(x, need_weights=weights).out

        return run

    for weights in (False, True):
        t = time_interleaved(
            {"torch nn.MultiheadAttention": torch_fwd(weights), "headwise MultiHeadAttention": ours_fwd(weights)},
            repeat=repeat,
        )
        rows.append(_row(f"forward L={L} E={embed} H={heads} N={batch}, need_weights={weights}", t))

    mha = MultiHeadAttention(embed, heads).eval()
    gqa = MultiHeadAttention(embed, heads, num_kv_heads=2).eval()
    xg = torch.randn(1, L_gqa, embed)

    def fwd(m):
        def run():
            with torch.inference_mode():
                return m(xg).out

        return run

    t = time_interleaved({"headwise MHA 8/8": fwd(mha), "headwise GQA 8/2": fwd(gqa)}, repeat=repeat)
    row = _row(f"forward L={L_gqa} E={embed} N=1: GQA 8/2 vs MHA 8/8", t)
    # GQA shrinks the k/v projections, not the attention: every query head still scores
    # every key. The FLOP ratio bounds the speed-up any implementation can reach.
    row["flop_bound"] = forward_flops(L_gqa, embed, heads, heads) / forward_flops(L_gqa, embed, heads, 2)
    rows.append(row)
    return rows


def forward_flops(L: int, embed: int, heads: int, kv_heads: int, batch: int = 1) -> float:
    """Multiply-adds x2 of one self-attention forward: projections plus QK^T and AV."""
    d = embed // heads
    proj = 2 * L * embed * (embed + 2 * kv_heads * d) + 2 * L * embed * embed
    attention = 4 * heads * L * L * d
    return batch * (proj + attention)


def _row(case: str, timings: dict[str, Timing]) -> dict:
    names = list(timings)
    a, b = timings[names[0]], timings[names[1]]
    return {
        "case": case,
        "baseline": names[0],
        "candidate": names[1],
        "baseline_ms": a.median * 1e3,
        "baseline_cv": a.cv,
        "candidate_ms": b.median * 1e3,
        "candidate_cv": b.cv,
        "speedup": a.median / b.median,
    }


def to_markdown(rows: list[dict], command: str, info: dict) -> str:
    lines = [
        "# Module benchmark: headwise MultiHeadAttention vs torch nn.MultiheadAttention",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}; "
        f"load average at start {info['load_average'][0]:.2f}. Medians of interleaved runs after a warm-up.",
        "",
        "| case | baseline | ms (CV%) | candidate | ms (CV%) | speed-up (baseline / candidate) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['baseline']} | {r['baseline_ms']:.2f} ({r['baseline_cv']:.1f}) | {r['candidate']} "
            f"| {r['candidate_ms']:.2f} ({r['candidate_cv']:.1f}) | {r['speedup']:.2f}x |"
        )
    for r in rows:
        if "flop_bound" in r:
            lines += [
                "",
                f"GQA 8/2 does {100 * (1 - 1 / r['flop_bound']):.1f}% fewer FLOPs than MHA 8/8 at this size "
                f"(`headwise.bench.modules.forward_flops`): only the k/v projections shrink, every query head "
                f"still attends to every key, so the FLOPs allow at most {r['flop_bound']:.2f}x; anything beyond "
                "comes from memory traffic (k/v read once per group). The 1.3x of the modules issue is out of "
                "reach at this size. What GQA saves for sure is the k/v cache (4x smaller).",
            ]
    return "\n".join(lines) + "\n"
