"""``headwise bench tune``: tune auto for the kernel benchmark's problems on this machine.

For each forward case of ``headwise bench kernels`` (variants x lengths) it runs
:func:`headwise.kernels.tuning.tune_request` (every serving backend once to warm up, then
``rounds`` interleaved timed calls) and records the winner in the tuning file that ``auto``
reads. The table shows, per case, the cost model's pick (what auto ran before), the tuned
winner and each contender's median.

Example::

    headwise bench tune --seq 1024 --seq 4096 --rounds 5
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from headwise.attend import make_request
from headwise.bench.kernels import VARIANTS, cases_for, make_inputs
from headwise.kernels.registry import clear_choice_cache, decide
from headwise.kernels.tuning import problem_key, tune_request


def tune_cases(
    seqs: list[int], rounds: int, variants=VARIANTS, progress: Callable[[str], None] | None = None
) -> list[dict]:
    """One row per forward case: {case, L, model_pick, tuned, median_ms}."""
    rows = []
    for case in cases_for(seqs, variants):
        if case.backward:
            continue  # tune times forward calls; a training call keeps the cost model's choice
        if progress:
            progress(f"tuning {case.label} L={case.L}")
        q, k, v = make_inputs(case)
        with torch.no_grad():
            req = make_request(q, k, v, case.mask, None, None, 0.0, False, case.variant == "stats")
            if problem_key(req) is None:
                continue
            clear_choice_cache()
            before = decide(req)
            model_pick = before.backend if "tuned" not in before.why else "(already tuned)"
            result = tune_request(req, rounds=rounds)
        rows.append({"case": case.label, "variant": case.variant, "L": case.L, "model_pick": model_pick,
                     "tuned": result["backend"], "median_ms": result["median_ms"]})  # fmt: skip
    return rows


def to_markdown(rows: list[dict], command: str, file: str) -> str:
    lines = [f"Command: `{command}`; tuning file: `{file}`", "",
             "| case | L | cost model's pick | tuned | medians (ms) |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        medians = ", ".join(f"{n} {t:.3g}" for n, t in sorted(r["median_ms"].items(), key=lambda x: x[1]))
        lines.append(f"| {r['case']} | {r['L']} | {r['model_pick']} | {r['tuned']} | {medians} |")
    return "\n".join(lines) + "\n"
