"""Report sections 1, 2 and 5: why scale by sqrt(d_k), what masks do, causal masking checked.

Shape legend: q (B, H, L, d_k), k and v (B, H, S, d_k); weights (B, H, L, S); a row is
one query's distribution over the S keys; entropy in nats (log S = uniform row).

Example:
    >>> from headwise.report.basics import sqrt_dk_scaling
    >>> s = sqrt_dk_scaling(quick=True)
    >>> rows = s.data["rows"]
    >>> rows[-1]["entropy_unscaled"] < rows[0]["entropy_unscaled"], rows[-1]["entropy_scaled"] > 3.0
    (True, True)
"""

from __future__ import annotations

import math

import torch

from headwise.attend import attend
from headwise.masks import Mask, causal, chunked, local, per_head_windows, sliding_window
from headwise.report.common import Section, Table, check_flag, check_seed, fmt, new_figure, row_entropy

DK_VALUES = (8, 32, 64, 128, 256, 512)


def sqrt_dk_scaling(*, quick: bool = False, seed: int = 0, dks: tuple[int, ...] = DK_VALUES) -> Section:
    """Section 1: entropy of attention rows with and without the 1/sqrt(d_k) scale.

    Random standard-normal queries and keys (float64): q.k has variance d_k, so unscaled
    logits grow like sqrt(d_k) and softmax saturates; scaled logits have variance 1 at
    every d_k. ``data["rows"]`` holds, per d_k, the mean row entropy and mean max weight
    both ways; ``data["row_dk256"]`` one row's weights at d_k=256 both ways.
    """
    check_flag("quick", quick)
    check_seed(seed)
    n_rows, S = (64, 64) if quick else (512, 128)
    g = torch.Generator().manual_seed(seed)
    rows, example = [], {}
    for d in dks:
        q = torch.randn(n_rows, d, generator=g, dtype=torch.float64)
        k = torch.randn(S, d, generator=g, dtype=torch.float64)
        logits = q @ k.T
        rec: dict = {"d_k": d}
        for name, s in (("scaled", logits / math.sqrt(d)), ("unscaled", logits)):
            w = torch.softmax(s, dim=-1)
            h = row_entropy(w)
            rec[f"entropy_{name}"] = float(h.mean())
            rec[f"entropy_{name}_std"] = float(h.std())
            rec[f"max_weight_{name}"] = float(w.amax(-1).mean())
            rec[f"logit_std_{name}"] = float(s.std())
            if d == 256:
                example[name] = w[0].tolist()
        rows.append(rec)
    log_s = math.log(S)
    data = {"keys": S, "rows_per_dk": n_rows, "log_keys": log_s, "rows": rows, "row_dk256": example}
    first, last = rows[0], rows[-1]
    scaled = [r["entropy_scaled"] for r in rows]
    finding = (
        f"With the 1/sqrt(d_k) scale the mean row entropy stays between {fmt(min(scaled))} and "
        f"{fmt(max(scaled))} nats for every d_k from {first['d_k']} to {last['d_k']} (uniform over {S} keys would "
        f"be log {S} = {fmt(log_s)}). Without it, the logits' standard deviation grows from "
        f"{fmt(first['logit_std_unscaled'], 1)} to {fmt(last['logit_std_unscaled'], 1)} and the entropy falls from "
        f"{fmt(first['entropy_unscaled'])} to {fmt(last['entropy_unscaled'])} nats, while the largest weight of a row "
        f"averages {fmt(last['max_weight_unscaled'])} at d_k={last['d_k']} (scaled: {fmt(last['max_weight_scaled'])})"
        ": unscaled softmax turns into a near one-hot argmax whose gradients vanish."
    )
    sec = Section("scaling", 1, "Why scale by sqrt(d_k)", finding, data=data)
    sec.tables.append(
        Table(
            f"Mean entropy (nats) and max weight of {n_rows} random rows over {S} keys",
            ["d_k", "entropy scaled", "entropy unscaled", "max weight scaled", "max weight unscaled"],
            [
                [
                    str(r["d_k"]),
                    f"{r['entropy_scaled']:.3f}",
                    f"{r['entropy_unscaled']:.3f}",
                    f"{r['max_weight_scaled']:.3f}",
                    f"{r['max_weight_unscaled']:.3f}",
                ]
                for r in rows
            ],
        )
    )
    fig, axes = new_figure(1, 2, width=10, height=3.6)
    ax = axes[0, 0]
    ds = [r["d_k"] for r in rows]
    ax.plot(ds, scaled, "o-", label="scaled by 1/sqrt(d_k)")
    ax.plot(ds, [r["entropy_unscaled"] for r in rows], "s-", label="unscaled")
    ax.axhline(log_s, color="gray", ls="--", lw=1, label=f"uniform: log {S}")
    ax.set(xscale="log", xlabel="d_k", ylabel="mean row entropy (nats)", title="Entropy of attention rows")
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(ds, [r["max_weight_scaled"] for r in rows], "o-", label="scaled")
    ax.plot(ds, [r["max_weight_unscaled"] for r in rows], "s-", label="unscaled")
    ax.set(xscale="log", xlabel="d_k", ylabel="mean max weight of a row", title="Largest weight per row")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.legend(fontsize=8)
    sec.add_figure("scaling_entropy", fig, f"Mean entropy and max weight of attention rows vs d_k ({S} keys).")
    if example:
        fig, axes = new_figure(1, 2, width=10, height=3.0, sharey=True)
        for ax, name in zip(axes[0], ("scaled", "unscaled")):
            w = example[name]
            ax.bar(range(len(w)), w, width=1.0, color="C0" if name == "scaled" else "C1")
            ax.set(title=f"d_k=256, {name}: max {max(w):.3f}", xlabel="key index")
        axes[0, 0].set_ylabel("weight")
        sec.add_figure("scaling_row", fig, "The weights of one query row at d_k=256, scaled and unscaled.")
    return sec


def _pattern_masks() -> list[tuple[str, Mask | None, int]]:
    """(label, mask, head shown) for section 2; per-head windows use 2 heads."""
    phw = per_head_windows([2, 6])
    return [
        ("full", None, 0),
        ("causal", causal, 0),
        ("sliding_window(4)", sliding_window(4), 0),
        ("local(2, 2)", local(2, 2), 0),
        ("chunked(4)", chunked(4), 0),
        ("per_head_windows([2, 6]) head 0", phw, 0),
        ("per_head_windows([2, 6]) head 1", phw, 1),
    ]


def attention_patterns(*, quick: bool = False, seed: int = 0, length: int = 16) -> Section:
    """Section 2: each mask as a boolean grid and the weights it produces (float64 reference).

    ``data["patterns"]`` lists, per mask, the attended share of the L x L grid, the mean row
    entropy and the largest weight found where the mask says no (0 when the mask holds).
    """
    check_flag("quick", quick)
    check_seed(seed)
    g = torch.Generator().manual_seed(seed)
    L, d = length, 16
    q = torch.randn(1, 2, L, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, L, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, L, d, generator=g, dtype=torch.float64)
    masks = _pattern_masks()
    fig, axes = new_figure(2, len(masks), width=2.0 * len(masks), height=4.6)
    patterns = []
    for col, (label, mask, head) in enumerate(masks):
        res = attend(q, k, v, mask=mask, backend="reference", need_weights=True)
        w = res.weights[0, head]
        allowed = torch.ones(L, L, dtype=torch.bool) if mask is None else mask.dense(1, 2, L, L)[0, head % 2]
        allowed = allowed.expand(L, L)
        patterns.append(
            {
                "mask": label,
                "attended_share": float(allowed.double().mean()),
                "mean_row_entropy": float(row_entropy(w).mean()),
                "max_weight_outside_mask": float(w[~allowed].abs().max()) if (~allowed).any() else 0.0,
                "max_row_sum_error": float((w.sum(-1) - 1).abs().max()),
            }
        )
        short = label.replace("per_head_windows([2, 6]) ", "per-head ")
        axes[0, col].imshow(allowed.numpy(), cmap="Greys", vmin=0, vmax=1)
        axes[0, col].set_title(short, fontsize=8)
        axes[1, col].imshow(w.numpy(), cmap="viridis", vmin=0)
        for r in (0, 1):
            axes[r, col].set_xticks([])
            axes[r, col].set_yticks([])
    axes[0, 0].set_ylabel("mask (black = attend)")
    axes[1, 0].set_ylabel("weights")
    outside = max(p["max_weight_outside_mask"] for p in patterns)
    sums = max(p["max_row_sum_error"] for p in patterns)
    dens = ", ".join(f"{p['mask']} {100 * p['attended_share']:.0f}%" for p in patterns[1:5])
    lo = min(patterns, key=lambda p: p["mean_row_entropy"])
    hi = max(patterns, key=lambda p: p["mean_row_entropy"])
    h0, h1 = patterns[-2], patterns[-1]
    finding = (
        f"On L={L} random queries and keys, the masks keep this share of the L x L grid: {dens}. The mean row "
        f"entropy ranges from {fmt(lo['mean_row_entropy'])} nats ({lo['mask']}, {100 * lo['attended_share']:.0f}% "
        f"of the grid) to {fmt(hi['mean_row_entropy'])} ({hi['mask']}, {100 * hi['attended_share']:.0f}%). Across all "
        f"{len(patterns)} panels the largest weight where a mask says no is {fmt(outside)} and rows sum to 1 within "
        f"{fmt(sums)}; in one per-head-windows call, head 0 attends to {100 * h0['attended_share']:.0f}% of the grid "
        f"and head 1 to {100 * h1['attended_share']:.0f}%."
    )
    sec = Section(
        "patterns",
        2,
        "Attention patterns",
        finding,
        data={"length": L, "d": d, "patterns": patterns},
    )
    sec.add_figure("patterns", fig, f"Top: masks on an L={L} grid (query rows, key columns). Bottom: the weights.")
    return sec


def causal_checks(*, quick: bool = False, seed: int = 0) -> Section:
    """Section 5: causal masking, checked on the numbers of every backend that runs it.

    For weights (reference and eager, float32 and float64): the largest weight on a future
    key (must be exactly 0) and the largest |row sum - 1|. For outputs (reference, eager,
    tiled, sdpa): changing every key and value after position t must leave the outputs of
    queries 0..t bit-for-bit unchanged.
    """
    check_flag("quick", quick)
    check_seed(seed)
    B, H, L, d = (1, 4, 32, 16) if quick else (2, 8, 128, 32)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64) for _ in range(3))
    future = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    weight_checks = []
    shown = None
    for dtype in (torch.float64, torch.float32):
        for backend in ("reference", "eager"):
            res = attend(q.to(dtype), k.to(dtype), v.to(dtype), mask=causal, backend=backend, need_weights=True)
            w = res.weights.double()
            weight_checks.append(
                {
                    "backend": backend,
                    "dtype": str(dtype).removeprefix("torch."),
                    "max_future_weight": float(w[..., future].abs().max()),
                    "future_weights_nonzero": int((w[..., future] != 0).sum()),
                    "max_row_sum_error": float((w.sum(-1) - 1).abs().max()),
                }
            )
            if shown is None:
                shown = w[0, 0]
    t = L // 2
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1 :] = torch.randn(B, H, L - t - 1, d, generator=g, dtype=torch.float64) * 3
    v2[:, :, t + 1 :] = torch.randn(B, H, L - t - 1, d, generator=g, dtype=torch.float64) * 3
    output_checks = []
    for backend in ("reference", "eager", "tiled", "sdpa"):
        a = attend(q.float(), k.float(), v.float(), mask=causal, backend=backend).out
        b = attend(q.float(), k2.float(), v2.float(), mask=causal, backend=backend).out
        output_checks.append(
            {
                "backend": backend,
                "max_change_past_outputs": float((a[:, :, : t + 1] - b[:, :, : t + 1]).abs().max()),
                "max_change_future_outputs": float((a[:, :, t + 1 :] - b[:, :, t + 1 :]).abs().max()),
            }
        )
    worst_future = max(c["max_future_weight"] for c in weight_checks)
    worst_sum = max(c["max_row_sum_error"] for c in weight_checks)
    worst_past = max(c["max_change_past_outputs"] for c in output_checks)
    min_fut = min(c["max_change_future_outputs"] for c in output_checks)
    passed = {
        "future_weight_zero": worst_future == 0.0,
        "rows_sum_to_one": worst_sum <= 1e-6,
        "past_outputs_unchanged": worst_past == 0.0,
    }
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    finding = (
        f"Over {B * H * L * (L - 1) // 2:,} future (query, key) pairs per run, the largest future weight is "
        f"{worst_future!r} ({verdict(passed['future_weight_zero'])}: exactly zero) and rows sum to 1 within "
        f"{fmt(worst_sum)} ({verdict(passed['rows_sum_to_one'])}, float32 included). Replacing every key and value "
        f"after position {t} changes the outputs of queries 0..{t} by at most {worst_past!r} on every backend "
        f"({verdict(passed['past_outputs_unchanged'])}), while later outputs move by at least {fmt(min_fut)}."
    )
    sec = Section(
        "causal",
        5,
        "Causal masking",
        finding,
        data={
            "shape": [B, H, L, d],
            "perturbed_after": t,
            "weights": weight_checks,
            "outputs": output_checks,
            "passed": passed,
        },
    )
    sec.tables.append(
        Table(
            "Weights of a causal attention call (every batch and head)",
            ["backend", "dtype", "max future weight", "nonzero future weights", "max |row sum - 1|"],
            [
                [c["backend"], c["dtype"], repr(c["max_future_weight"]), str(c["future_weights_nonzero"])]
                + [f"{c['max_row_sum_error']:.2e}"]
                for c in weight_checks
            ],
        )
    )
    sec.tables.append(
        Table(
            f"Outputs after replacing keys and values at positions > {t} (float32)",
            ["backend", f"max change, queries 0..{t}", f"max change, queries {t + 1}..{L - 1}"],
            [
                [c["backend"], repr(c["max_change_past_outputs"]), f"{c['max_change_future_outputs']:.3f}"]
                for c in output_checks
            ],
        )
    )
    fig, axes = new_figure(1, 3, width=11, height=3.4)
    axes[0, 0].imshow((~future).numpy(), cmap="Greys")
    axes[0, 0].set(title="causal mask (black = attend)", xlabel="key", ylabel="query")
    im = axes[0, 1].imshow(shown.numpy(), cmap="viridis")
    axes[0, 1].set(title="weights, batch 0 head 0 (reference)", xlabel="key")
    fig.colorbar(im, ax=axes[0, 1], shrink=0.8)
    sums = shown.sum(-1).numpy()
    axes[0, 2].plot(range(L), sums - 1.0, "o", ms=3)
    axes[0, 2].set(title="row sum - 1 (float64)", xlabel="query")
    sec.add_figure("causal", fig, "The causal mask, the weights it gives and how far each row's sum is from 1.")
    return sec
