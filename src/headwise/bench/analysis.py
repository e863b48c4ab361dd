"""Head-analysis benchmarks (issue 4) and the MiniLM pruning curve.

- ``timing``: (a) the full analysis of all 72 MiniLM heads (metrics + gradient importance)
  over 256 real WordNet sentences, goal < 60 s; (b) a forward that captures every head
  through the headwise implementation against a plain "eager" forward, goal <= 20% more.
- ``memory``: one 4096-token input through a 6-layer, 12-head BERT (MiniLM sizes, random
  weights, 4096 positions): peak RSS growth of a plain forward, of streaming-stats capture
  and of full weight capture, each in a fresh process (``measure_in_subprocess``).
- ``pruning``: iterative pruning of MiniLM (10% of heads per step, lowest gradient
  importance first) against a random order, scored by the mean cosine similarity of the
  pruned model's embeddings of WordNet glosses to the intact model's.

Run: ``python -m headwise.bench.analysis {timing,memory,pruning} [--out benchmarks/results]``.
Each writes ``analysis_<suite>.json`` / ``.md`` (pruning: ``pruning_minilm.*`` and a PNG).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from headwise.bench.harness import (
    machine_info,
    measure_in_subprocess,
    peak_rss_bytes,
    reset_peak_rss,
    time_interleaved,
    wait_for_quiet,
)
from headwise.fileio import write_atomic

GIB = 1024**3


def wordnet_texts(n: int, kind: str = "example", skip: int = 0) -> list[str]:
    """``n`` real WordNet sentences, deterministic: examples or glosses ("document") in file order."""
    from headwise.data.wordnet import iter_synsets

    out: list[str] = []
    seen = 0
    for s in iter_synsets():
        if kind == "example" and not s.examples:
            continue
        seen += 1
        if seen <= skip:
            continue
        out.append(s.examples[0] if kind == "example" else s.document)
        if len(out) == n:
            break
    return out


# -- (a), (b): timing ----------------------------------------------------------------------


def run_timing(n_texts: int = 256, repeat: int = 5, batch_size: int = 32) -> dict[str, Any]:
    """Seconds of the full analysis, and forward times eager vs headwise capture (medians)."""
    from headwise.analysis import AttentionCache, register, run_cached
    from headwise.analysis.corpus import analyze_texts
    from headwise.pretrained import load_minilm

    register()
    tok, eager = load_minilm("eager")
    _, ours = load_minilm("headwise")
    texts = wordnet_texts(n_texts)
    analyze_texts(texts[:8], tok, ours, batch_size=batch_size)  # warm-up: first-call allocations
    t0 = time.perf_counter()
    res = analyze_texts(texts, tok, ours, batch_size=batch_size)
    full = time.perf_counter() - t0
    batch = dict(tok(texts[:batch_size], padding=True, return_tensors="pt"))
    weights, stats = AttentionCache(), AttentionCache(mode="stats")

    def eager_fwd() -> None:
        with torch.no_grad():
            eager(**batch)

    def capture(cache: AttentionCache) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                run_cached(ours, batch, cache)
            cache.clear()

        return run

    t = time_interleaved(
        {"eager": eager_fwd, "headwise capture weights": capture(weights), "headwise capture stats": capture(stats)},
        repeat=repeat,
    )
    base = t["eager"].median
    return {
        "n_texts": len(texts),
        "n_tokens": res.n_tokens,
        "full_analysis_s": full,
        "goal_full_analysis_s": 60.0,
        "forward_batch": batch_size,
        "forward_ms": {k: v.median * 1e3 for k, v in t.items()},
        "forward_cv": {k: v.cv for k, v in t.items()},
        "capture_overhead": {k: v.median / base - 1 for k, v in t.items() if k != "eager"},
        "goal_capture_overhead": 0.20,
    }


def timing_markdown(r: dict[str, Any], command: str, info: dict) -> str:
    lines = [
        "# Head analysis timing (MiniLM, WordNet sentences)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, load average "
        f"{info['load_average'][0]:.2f}.",
        "",
        f"- Full analysis of all 72 heads (metrics, JS/cosine matrices, patterns, gradient importance) over "
        f"{r['n_texts']} sentences ({r['n_tokens']} tokens): **{r['full_analysis_s']:.1f} s** "
        f"(goal < {r['goal_full_analysis_s']:.0f} s).",
        "",
        f"| forward, batch {r['forward_batch']} | ms (CV%) | vs eager |",
        "|---|---|---|",
    ]
    for k, ms in r["forward_ms"].items():
        extra = r["capture_overhead"].get(k)
        lines.append(
            f"| {k} | {ms:.1f} ({r['forward_cv'][k]:.1f}) | {'-' if extra is None else f'{100 * extra:+.1f}%'} |"
        )
    lines += ["", f"Goal: capture adds at most {100 * r['goal_capture_overhead']:.0f}% to a plain eager forward."]
    return "\n".join(lines) + "\n"


# -- (c): memory ---------------------------------------------------------------------------


def long_bert(L: int) -> Any:
    """6 layers x 12 heads, hidden 384 (MiniLM's sizes), ``L`` positions, random weights, headwise."""
    from transformers import BertConfig, BertModel

    from headwise.analysis import register

    register()
    cfg = BertConfig(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=max(L, 512),
        attn_implementation="headwise",
    )
    torch.manual_seed(0)
    return BertModel(cfg).eval()


def memprobe(spec: dict[str, Any]) -> dict[str, Any]:
    """In this (fresh) process: peak RSS growth of one forward of ``long_bert`` in one mode."""
    from headwise.analysis import AttentionCache, run_cached

    L, mode = int(spec["L"]), spec["mode"]
    model = long_bert(L)
    ids = torch.randint(1000, 2000, (1, L))

    def forward(n: int) -> AttentionCache | None:
        batch = {"input_ids": ids[:, :n], "attention_mask": torch.ones(1, n, dtype=torch.long)}
        with torch.no_grad():
            if mode == "plain":
                model(**batch)
                return None
            cache = AttentionCache(mode="stats" if mode == "stats" else "weights")
            run_cached(model, batch, cache)
            return cache

    forward(256)  # warm-up: thread pools and allocator arenas are not the measured call's
    before = reset_peak_rss()
    cache = forward(L)
    peak = peak_rss_bytes() - before
    return {"mode": mode, "L": L, "peak_extra_bytes": peak, "cache_bytes": cache.nbytes() if cache else 0}


def run_memory(L: int = 4096, budget_gib: float = 1.0) -> dict[str, Any]:
    """Peak memory of plain forward, stats capture and full capture, each in a fresh process."""
    rows = [
        measure_in_subprocess("headwise.bench.analysis", {"L": L, "mode": m}) for m in ("plain", "stats", "weights")
    ]
    return {"L": L, "budget_bytes": int(budget_gib * GIB), "rows": rows}


def memory_markdown(r: dict[str, Any], command: str) -> str:
    budget = r["budget_bytes"]
    lines = [
        f"# Streaming-stats capture memory: one {r['L']}-token input, 6 layers x 12 heads",
        "",
        f"Command: `{command}`",
        "",
        'BERT with MiniLM\'s sizes (hidden 384, FFN 1536), random weights, attn_implementation="headwise". '
        "Peak growth of the resident set during one forward, each mode in a fresh process after a warm-up.",
        "",
        f"| mode | peak extra memory | kept in the cache | within {budget / GIB:.1f} GiB budget |",
        "|---|---|---|---|",
    ]
    names = {
        "plain": "plain forward (no capture)",
        "stats": "capture streaming stats",
        "weights": "capture all weights",
    }
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row.get('mode', '?')} | error: {row['error']} | | |")
            continue
        ok = "yes" if row["peak_extra_bytes"] <= budget else "no"
        peak, kept = row["peak_extra_bytes"] / 2**20, row["cache_bytes"] / 2**20
        lines.append(f"| {names[row['mode']]} | {peak:.0f} MiB | {kept:.1f} MiB | {ok} |")
    return "\n".join(lines) + "\n"


# -- pruning curve -------------------------------------------------------------------------


def run_pruning(n_importance: int = 256, n_eval: int = 512, step: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """Gradient-importance pruning of MiniLM vs a random order; metric: cosine to intact embeddings."""
    from headwise.analysis import register
    from headwise.analysis.corpus import gradient_importance_frozen
    from headwise.analysis.importance import HeadGates, prune_iteratively
    from headwise.pretrained import encode, load_minilm

    register()
    tok, model = load_minilm("headwise")
    imp_texts = wordnet_texts(n_importance, "document")
    eval_texts = wordnet_texts(n_eval, "document", skip=n_importance)  # held out from the importance set
    intact = torch.from_numpy(encode(eval_texts, tok, model, progress=False))
    batches = []
    for start in range(0, len(imp_texts), 32):
        b = dict(tok(imp_texts[start : start + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        with torch.no_grad():
            from headwise.pretrained import mean_pool

            ref = mean_pool(model(**b).last_hidden_state, b["attention_mask"])
        batches.append({**b, "reference": ref})

    def evaluate(gates: torch.Tensor) -> float:
        with HeadGates(model, gates):
            emb = torch.from_numpy(encode(eval_texts, tok, model, progress=False))
        return float((emb * intact).sum(-1).mean())

    def importance(gates: torch.Tensor) -> torch.Tensor:
        return gradient_importance_frozen(model, batches, gates).normalized

    gen = torch.Generator().manual_seed(seed)
    random_scores = torch.rand(6, 12, generator=gen, dtype=torch.float64)
    t0 = time.perf_counter()
    curve = prune_iteratively(6, 12, importance, evaluate, step=step)
    rand = prune_iteratively(6, 12, lambda g: random_scores, evaluate, step=step)
    return {
        "model": "all-MiniLM-L6-v2 (6 x 12 heads)",
        "objective": "mean cosine of pruned vs intact embeddings of held-out WordNet glosses",
        "importance": "Michel et al. gradient importance, per-layer l2-normalised, label-free contrastive loss "
        "(each gloss must pick its own intact embedding among the batch, tau 0.05), recomputed every step",
        "n_importance_texts": len(imp_texts),
        "n_eval_texts": len(eval_texts),
        "step": step,
        "gradient": curve.to_dict(),
        "random": rand.to_dict(),
        "seconds": time.perf_counter() - t0,
    }


def pruning_markdown(r: dict[str, Any], command: str) -> str:
    g, rnd = r["gradient"]["points"], r["random"]["points"]
    lines = [
        "# Iterative head pruning of all-MiniLM-L6-v2",
        "",
        f"Command: `{command}`",
        "",
        f"Objective (higher is better, no labels): {r['objective']} ({r['n_eval_texts']} glosses). "
        f"Importance: {r['importance']}, on {r['n_importance_texts']} other glosses. "
        f"Each step gates off {100 * r['step']:.0f}% of the 72 heads (zero ablation at the output projection).",
        "",
        "| heads kept | pruned | cosine, gradient order | cosine, random order |",
        "|---|---|---|---|",
    ]
    for a, b in zip(g, rnd, strict=False):
        lines.append(f"| {a['heads_kept']} | {100 * a['pruned_share']:.0f}% | {a['metric']:.4f} | {b['metric']:.4f} |")
    for tol in (0.01, 0.05):
        ok = [p for p in g if p["metric"] >= g[0]["metric"] - tol]
        lines.append("")
        lines.append(
            f"Within {tol} of the intact model: down to {ok[-1]['heads_kept']} heads "
            f"({100 * ok[-1]['pruned_share']:.0f}% pruned) by gradient importance."
        )
    return "\n".join(lines) + "\n"


def pruning_png(r: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("gradient", "gradient importance"), ("random", "random order")):
        pts = r[key]["points"]
        ax.plot([p["heads_kept"] for p in pts], [p["metric"] for p in pts], marker="o", label=label)
    ax.invert_xaxis()
    ax.set_xlabel("heads kept (of 72)")
    ax.set_ylabel("mean cosine to intact embeddings")
    ax.set_title("Iterative pruning of all-MiniLM-L6-v2 (WordNet glosses)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str]) -> None:
    if argv and argv[0].startswith("{"):  # a memory probe in a fresh process (run_memory)
        print(json.dumps(memprobe(json.loads(argv[0]))))
        return
    import argparse

    p = argparse.ArgumentParser(prog="python -m headwise.bench.analysis")
    p.add_argument("suite", choices=["timing", "memory", "pruning"])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--n-texts", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--length", type=int, default=4096)
    args = p.parse_args(argv)
    out = Path(args.out)
    command = "python -m headwise.bench.analysis " + shlex.join(argv)
    if args.suite == "timing":
        wait_for_quiet()  # timings on a busy machine mean nothing (waits up to 2 minutes)
    info = machine_info()
    if args.suite == "timing":
        r = run_timing(args.n_texts, args.repeat)
        md, stem = timing_markdown(r, command, info), "analysis_timing"
    elif args.suite == "memory":
        r = run_memory(args.length)
        md, stem = memory_markdown(r, command), "analysis_memory"
    else:
        r = run_pruning()
        md, stem = pruning_markdown(r, command), "pruning_minilm"
        write_atomic(out / f"{stem}.png", pruning_png(r))
    r["command"], r["machine"] = command, info
    write_atomic(out / f"{stem}.json", json.dumps(r, indent=1, default=str))
    write_atomic(out / f"{stem}.md", md)
    print(md)


if __name__ == "__main__":
    main(sys.argv[1:])
