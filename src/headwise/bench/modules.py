"""``headwise bench modules``: MultiHeadAttention against torch's nn.MultiheadAttention.

Forward (eval; inference mode, and again with autograd on) at L=1024, E=512, 8 heads,
batch 4, returning no weights, head-averaged weights (torch's default) or per-head weights, and
GQA 8/2 against MHA 8/8 at L=4096 (a prefill forward, and one decoding step against a
cache of 4096 keys). torch runs as users run it: ``nn.MultiheadAttention``
in eval mode under ``torch.inference_mode`` takes its native fast path when it can.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from headwise.attend import attend
from headwise.bench.harness import Timing, measure_in_subprocess, paired_ratio, time_interleaved
from headwise.modules import MultiHeadAttention

# The weights each side returns: none; averaged over heads (torch's default with
# need_weights=True); per head (torch's average_attn_weights=False).
WEIGHT_MODES = ("none", "mean", "heads")


def module_fns(
    weights: str, L: int = 1024, embed: int = 512, heads: int = 8, batch: int = 4, grad: bool = False
) -> dict[str, Callable[[], object]]:
    """torch's and our MHA forward on the same weights and input (eval mode).

    ``weights`` is one of WEIGHT_MODES; both sides return the same tensors. ``grad=False``:
    under inference mode, where torch takes its native fast path (which computes weights
    too). ``grad=True``: autograd on, as in a training step, where torch leaves the fast path.
    """
    need, average = weights != "none", weights == "mean"
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(embed, heads, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(theirs).eval()
    x = torch.randn(batch, L, embed)
    mode = torch.enable_grad if grad else torch.inference_mode

    def torch_fwd():
        with mode():
            return theirs(x, x, x, need_weights=need, average_attn_weights=average)[0]

    def ours_fwd():
        with mode():
            return ours(x, need_weights=need, average_attn_weights=average).out

    return {"torch nn.MultiheadAttention": torch_fwd, "headwise MultiHeadAttention": ours_fwd}


def gqa_fns(L: int = 4096, embed: int = 512, heads: int = 8) -> dict[str, Callable[[], object]]:
    """Our MHA 8/8 and GQA 8/2 forward on one sequence of length L."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(embed, heads).eval()
    gqa = MultiHeadAttention(embed, heads, num_kv_heads=2).eval()
    xg = torch.randn(1, L, embed)

    def fwd(m):
        def run():
            with torch.inference_mode():
                return m(xg).out

        return run

    return {"headwise MHA 8/8": fwd(mha), "headwise GQA 8/2": fwd(gqa)}


def decode_fns(cache: int = 4096, heads: int = 8, head_dim: int = 64, batch: int = 8) -> dict[str, Callable]:
    """One decoding step through ``attend``: one new query per sequence against a k/v cache.

    This is where GQA pays: every query head still scores every cached key, but the cache
    that has to be read per step is Hq / Hkv times smaller (memory-bound, not FLOP-bound).
    """
    torch.manual_seed(0)
    q = torch.randn(batch, heads, 1, head_dim)
    kvs = (heads, max(1, heads // 4))  # 8/8 and 8/2 at the default sizes
    caches = {kv: (torch.randn(batch, kv, cache, head_dim), torch.randn(batch, kv, cache, head_dim)) for kv in kvs}

    def step(kv: int) -> Callable[[], object]:
        k, v = caches[kv]

        def run():
            with torch.inference_mode():
                return attend(q, k, v).out

        return run

    return {f"headwise MHA {heads}/{kvs[0]} cache": step(kvs[0]), f"headwise GQA {heads}/{kvs[1]} cache": step(kvs[1])}


def run_modules(
    repeat: int, L: int = 1024, L_gqa: int = 4096, embed: int = 512, heads: int = 8, batch: int = 4
) -> dict[str, list[dict]]:
    """Time both comparisons; ``rows`` hold the speed-ups, ``records`` one entry per (case, implementation)."""
    rows, records = [], []
    for grad in (False, True):
        for weights in WEIGHT_MODES:
            how = ", autograd on (torch off its fast path)" if grad else ""
            case = f"forward L={L} E={embed} H={heads} N={batch}, weights: {weights}{how}"
            t = time_interleaved(module_fns(weights, L, embed, heads, batch, grad), repeat=repeat)
            rows.append(_row(case, t))
            records += [{"case": case, "impl": name, **tm.record(items=batch * L)} for name, tm in t.items()]

    case = f"forward L={L_gqa} E={embed} N=1: GQA 8/2 vs MHA 8/8"
    t = time_interleaved(gqa_fns(L_gqa, embed, heads), repeat=repeat)
    row = _row(case, t)
    records += [{"case": case, "impl": name, **tm.record(items=L_gqa)} for name, tm in t.items()]
    # GQA shrinks the k/v projections, not the attention: every query head still scores
    # every key. The FLOP ratio bounds the speed-up any implementation can reach.
    row["flop_bound"] = forward_flops(L_gqa, embed, heads, heads) / forward_flops(L_gqa, embed, heads, 2)
    rows.append(row)

    head_dim = embed // heads
    case = f"decode step: 1 query x {L_gqa} cached keys, N={2 * batch}, d={head_dim}: GQA 8/2 vs MHA 8/8 cache"
    t = time_interleaved(decode_fns(L_gqa, heads, head_dim, 2 * batch), repeat=repeat, min_seconds=2.0)
    rows.append(_row(case, t))
    records += [{"case": case, "impl": name, **tm.record(items=2 * batch)} for name, tm in t.items()]
    return {"rows": rows, "records": records}


def run_module_memory(L: int = 1024, L_gqa: int = 4096) -> list[dict]:
    """Peak extra memory of each module forward, each in a fresh subprocess."""
    out = []
    for weights in WEIGHT_MODES:
        for impl in module_fns(weights, 8, 16, 2, 1):
            spec = {"suite": "modules", "impl": impl, "weights": weights, "L": L}
            out.append({**spec, **measure_in_subprocess("headwise.bench.memprobe", spec)})
    for impl in gqa_fns(8, 16, 2):
        spec = {"suite": "modules", "impl": impl, "L": L_gqa}
        out.append({**spec, **measure_in_subprocess("headwise.bench.memprobe", spec)})
    return out


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
        "speedup": paired_ratio(a.times, b.times),
    }


def to_markdown(result: dict, command: str, info: dict) -> str:
    rows, memory = result["rows"], result.get("memory", [])
    lines = [
        "# Module benchmark: headwise MultiHeadAttention vs torch nn.MultiheadAttention",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}; "
        f"load average at start {info['load_average'][0]:.2f}. Medians of interleaved runs after a warm-up; "
        "CV% flagged `!` above 10%. Speed-up: the median over rounds of baseline / candidate in the same round.",
        "",
        "| case | baseline | ms (CV%) | candidate | ms (CV%) | speed-up (baseline / candidate) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        flags = ["!" if r[f"{w}_cv"] > 10 else "" for w in ("baseline", "candidate")]
        lines.append(
            f"| {r['case']} | {r['baseline']} | {r['baseline_ms']:.2f} ({r['baseline_cv']:.1f}{flags[0]}) "
            f"| {r['candidate']} | {r['candidate_ms']:.2f} ({r['candidate_cv']:.1f}{flags[1]}) | {r['speedup']:.2f}x |"
        )
    if result.get("records"):
        lines += [
            "",
            "## Latency distribution",
            "",
            "| case | implementation | avg ms | p50 ms | p95 ms | p99 ms | tokens/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["records"]:
            lines.append(
                f"| {r['case']} | {r['impl']} | {r['mean_ms']:.2f} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} "
                f"| {r['p99_ms']:.2f} | {r['throughput_per_s']:,.0f} |"
            )
    if memory:
        lines += [
            "",
            "## Peak extra memory of one forward (fresh subprocess per row, resident-set high-water mark)",
            "",
            "| implementation | case | peak extra MiB |",
            "|---|---|---|",
        ]
        for m in memory:
            case = f"weights: {m['weights']}, L={m['L']}" if "weights" in m else f"L={m['L']}, N=1"
            val = f"{m['peak_extra_bytes'] / 2**20:.1f}" if "peak_extra_bytes" in m else m.get("error", "?")
            lines.append(f"| {m['impl']} | {case} | {val} |")
    for r in rows:
        if "flop_bound" in r:
            lines += [
                "",
                f"GQA 8/2 does {100 * (1 - 1 / r['flop_bound']):.1f}% fewer FLOPs than MHA 8/8 at this size "
                f"(`headwise.bench.modules.forward_flops`): only the k/v projections shrink, every query head "
                f"still attends to every key, so the FLOPs allow at most {r['flop_bound']:.2f}x; anything beyond "
                "comes from memory traffic (k/v read once per group). The 1.3x of the modules issue is out of "
                "reach at this size. What GQA saves for sure is the k/v cache (4x smaller): the decode-step row "
                "reads it once per generated token.",
            ]
    return "\n".join(lines) + "\n"
