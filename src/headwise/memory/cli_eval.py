"""``headwise memory eval`` and ``headwise memory transfer-sets``: in-distribution and transfer evaluation.

``eval`` measures the methods on a split of the working directory's own queries and, with
``--queries FILE`` (repeatable), on other query sets against the same corpus: every set gets
its own table with bootstrap CIs and paired differences, and a summary table puts the sets
side by side (the transfer columns). ``--models DIR`` evaluates enhancers trained elsewhere
(a WordNet-trained enhancer on the Debian corpus, for example).

Example (see docs/memory-eval.md)::

    headwise memory eval --dir runs/wordnet --method knn,linear,multi-head --latency 0 \\
        --queries data/transfer/wordnet-foldoc.jsonl.gz --queries data/transfer/wordnet-devil.jsonl.gz
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from headwise.cliutil import out_dir, out_file
from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import write_atomic
from headwise.memory.cli import ADAPTER_ONLY, _command, _fail, _load, _methods, _retrievers, console, memory_app
from headwise.memory.datasets import embed
from headwise.memory.evaluate import METRICS, MethodResult, evaluate_methods, paired_difference, results_json
from headwise.memory.evaluate import results_markdown as method_table

SUMMARY_METRICS = ("recall@10", "ndcg@10")


def _comparisons(results: list[MethodResult], samples: int, seed: int) -> dict[str, dict]:
    """Paired differences of every method against knn and linear, and of each enhancer against its adapter."""
    by_name = {r.name: r for r in results}
    pairs = [(r.name, base) for base in ("knn", "linear") if base in by_name
             for r in results if r.name not in (base, "knn")]  # fmt: skip
    pairs += [(n, n + ADAPTER_ONLY) for n in by_name if n + ADAPTER_ONLY in by_name]  # the read-out's own share
    out = {}
    for name, base in pairs:
        for m in SUMMARY_METRICS:
            diff = paired_difference(by_name[name], by_name[base], m, samples=samples, seed=seed)
            base_mean = by_name[base].metrics[m][0]
            out[f"{name} - {base} {m}"] = {
                "diff": list(diff), "relative": diff[0] / base_mean if base_mean else float("nan")
            }  # fmt: skip
    return out


def _print_set(title: str, results: list[MethodResult], comparisons: dict) -> None:
    table = Table(title=title)
    table.add_column("method")
    for m in METRICS:
        table.add_column(f"{m} [95% CI]", justify="right")
    for r in results:
        table.add_row(
            r.name, *(f"{r.metrics[m][0]:.3f} [{r.metrics[m][1]:.3f}, {r.metrics[m][2]:.3f}]" for m in METRICS)
        )
    console.print(table)
    if comparisons:
        ct = Table(title="paired differences (bootstrap 95% CI)")
        for col in ("comparison", "difference", "95% CI", "relative"):
            ct.add_column(col, justify="right")
        for k, v in comparisons.items():
            d = v["diff"]
            ct.add_row(k, f"{d[0]:+.4f}", f"[{d[1]:+.4f}, {d[2]:+.4f}]", f"{100 * v['relative']:+.1f}%")
        console.print(ct)


def _head_metrics(models: Path, names: list[str], docs: np.ndarray, queries: np.ndarray, limit: int = 2000) -> dict:
    """Retrieval-head metrics of every multi-head read-out among ``names`` on the first ``limit`` queries."""
    from headwise.memory.enhancer import QueryEnhancer, load_enhancer
    from headwise.memory.evaluate import exact_search
    from headwise.memory.gate import GatedEnhancer
    from headwise.memory.heads import retrieval_head_metrics

    out = {}
    q = np.ascontiguousarray(queries[:limit], dtype=np.float32)
    for name in names:
        if name == "knn":
            continue
        model = load_enhancer(models / name)
        inner = model.inner if isinstance(model, GatedEnhancer) else model
        if not isinstance(inner, QueryEnhancer) or inner.mechanism != "multi-head":
            continue
        scores, ids = exact_search(docs, inner.first_pass_queries(q), inner.candidates)
        out[name] = retrieval_head_metrics(inner, q, docs[ids], scores)
    return out


def head_metrics_markdown(sets: dict[str, dict]) -> str:
    """One row per (query set, method): head means of the retrieval-head metrics and the diversity."""
    cols = ["entropy", "normalized_entropy", "gini", "sparsity", "max_weight", "top_rank"]
    head = ["query set", "method", *cols, "mean JS", "mean cosine"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for set_name, data in sets.items():
        for method, m in data.get("head_metrics", {}).items():
            means = [np.mean([h[c] for h in m["heads"]]) for c in cols]
            div = m["diversity"]
            lines.append(
                f"| {set_name} | {method} | "
                + " | ".join(f"{x:.3f}" for x in means)
                + f" | {div.get('mean_js', float('nan')):.3f} | {div.get('mean_cosine', float('nan')):.3f} |"
            )
    return "\n".join(lines) + "\n"


def summary_markdown(sets: dict[str, dict]) -> str:
    """Methods x query sets: recall@10 and NDCG@10, and each method's paired difference to knn."""
    names = list(sets)
    methods = list(next(iter(sets.values()))["results"]) if sets else []
    head = ["method"] + [f"{s} {m}" for s in names for m in SUMMARY_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method in methods:
        cells = []
        for s in names:
            metrics = sets[s]["results"][method]
            for m in SUMMARY_METRICS:
                cell = f"{metrics[m][0]:.3f}"
                diff = sets[s]["comparisons"].get(f"{method} - knn {m}")
                if diff is not None:
                    d = diff["diff"]
                    cell += f" ({d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}])"
                cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nIn parentheses: the paired difference to knn with its bootstrap 95% CI.\n"


@memory_app.command("eval")
def evaluate(
    ctx: typer.Context,
    dir: Annotated[Path, typer.Option(help="working directory made by 'build' and 'train'")],
    method: Annotated[str, typer.Option(help="comma-separated methods; knn is the baseline")] = "knn,linear,multi-head",
    split: Annotated[str, typer.Option(help="train, validation or test ('none': only the --queries sets)")] = "test",
    queries: Annotated[
        list[Path] | None,
        typer.Option("--queries", help="a JSONL(.gz) query file against the same corpus (repeatable)"),
    ] = None,
    models: Annotated[
        Path | None, typer.Option(help="folder of trained models (default DIR/models), e.g. another dataset's")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="write OUT.md and OUT.json (e.g. benchmarks/results/memory_x)")] = (
        None
    ),
    samples: Annotated[int, typer.Option(help="bootstrap resamples for the 95% CIs")] = 1000,
    latency: Annotated[int, typer.Option(help="queries of the split timed one by one for latency (0: skip)")] = 200,
    seed: Annotated[int, typer.Option()] = 0,
    ablate: Annotated[
        bool, typer.Option(help="also evaluate each attention enhancer's adapter alone (its read-out switched off)")
    ] = False,
    head_metrics: Annotated[
        bool, typer.Option(help="per-head entropy, Gini, sparsity and diversity of each multi-head read-out")
    ] = False,
) -> None:
    """Recall@1/10/100, MRR@10, NDCG@10 with bootstrap 95% CIs (exact search), per query set; latency."""
    from headwise.memory.transfer import read_query_file

    try:
        if samples < 1:
            raise bad_argument("--samples", "an integer >= 1", samples)
        if out is not None:  # checked before the evaluation, not after it
            out_file(out.with_suffix(".md"))
        names = _methods(method, models or dir / "models")
        manifest, ds, docs, split_queries = _load(dir)
        query_sets: dict[str, tuple[np.ndarray, list]] = {}
        if split != "none":
            sub = ds.subset(split)
            query_sets[f"{manifest['name']} {split}"] = (split_queries[sub.index], sub.relevant)
        for path in queries or []:
            qf = read_query_file(path, ds.doc_ids)
            if qf.name in query_sets:
                raise bad_argument("--queries", "files with distinct names", qf.name)
            query_sets[qf.name] = (embed(qf.queries, description=f"{qf.name}: queries"), qf.relevant)
        if not query_sets:
            raise bad_argument("--split/--queries", "a split or at least one query file", "split none, no files")
        retrievers = _retrievers(models or dir / "models", names, docs, ablate=ablate)
    except HeadwiseError as exc:
        _fail(exc)
    sets: dict[str, dict] = {}
    all_results: dict[str, list[MethodResult]] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("evaluating", total=len(retrievers) * len(query_sets))
        for set_name, (emb, relevant) in query_sets.items():

            def step(name: str, set_name: str = set_name) -> None:
                bar.update(task, description=f"{set_name}: {name}", advance=1)

            results = evaluate_methods(docs, emb, relevant, retrievers, samples=samples, seed=seed, progress=step)
            all_results[set_name] = results
            sets[set_name] = {
                "queries": len(relevant),
                "results": {r.name: r.metrics for r in results},
                "comparisons": _comparisons(results, samples, seed),
            }
    if head_metrics:
        for set_name, (emb, _) in query_sets.items():
            sets[set_name]["head_metrics"] = _head_metrics(models or dir / "models", names, docs, emb)
    for set_name, results in all_results.items():
        _print_set(f"{set_name}: {sets[set_name]['queries']:,} queries, {len(docs):,} documents", results,
                   sets[set_name]["comparisons"])  # fmt: skip
    timing = {}
    if latency > 0 and split != "none":
        from headwise.bench.memory import latency_table, measure_latency

        first = next(iter(query_sets.values()))[0]
        timing = measure_latency(docs, first, retrievers, single=latency)
        console.print(latency_table(timing))
    if len(sets) > 1:
        console.print(summary_markdown(sets))
    if head_metrics:
        console.print(head_metrics_markdown(sets))
    if out is not None:
        _write(out, ctx, manifest, sets, all_results, timing, len(docs))


def _write(out: Path, ctx: typer.Context, manifest: dict, sets: dict, all_results: dict, timing: dict, n_docs: int):
    command = _command(ctx)
    parts = []
    if len(sets) > 1:
        parts += ["## Summary: recall@10 and NDCG@10 per query set", "", summary_markdown(sets)]
    if any("head_metrics" in v for v in sets.values()):
        parts += ["## Retrieval heads: the read-out's attention over its candidates (means over heads)", "",
                  head_metrics_markdown(sets)]  # fmt: skip
    for set_name, results in all_results.items():
        comps = sets[set_name]["comparisons"]
        notes = [f"{k}: {v['diff'][0]:+.4f} [{v['diff'][1]:+.4f}, {v['diff'][2]:+.4f}], {100 * v['relative']:+.1f}%"
                 for k, v in comps.items()]  # fmt: skip
        title = f"{set_name} ({sets[set_name]['queries']:,} queries, {n_docs:,} documents, exact search)"
        parts.append(method_table(title, results, command, notes))
    write_atomic(out.with_suffix(".md"), "\n".join(parts))
    first = next(iter(sets.values()))
    payload = results_json(all_results[next(iter(sets))], command=command, dataset=manifest, sets=sets,
                           comparisons=first["comparisons"], latency=timing)  # fmt: skip
    write_atomic(out.with_suffix(".json"), payload)
    console.print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


@memory_app.command("transfer-sets")
def transfer_sets(
    out: Annotated[Path, typer.Option(help="folder for wordnet-SOURCE.jsonl.gz")] = Path("data/transfer"),
    limit: Annotated[int, typer.Option(help="most queries per set (a seeded sample beyond that)")] = 3000,
    max_senses: Annotated[int, typer.Option(help="leave out headwords with more WordNet synsets than this")] = 10,
) -> None:
    """Build the WordNet transfer query sets from FOLDOC and the Devil's Dictionary (dict-foldoc, dict-devil)."""
    from headwise.data.wordnet import load_synsets
    from headwise.memory.transfer import SOURCES, build_transfer_set, write_query_file

    try:
        if limit < 1 or max_senses < 1:
            raise bad_argument("--limit/--max-senses", "integers >= 1", (limit, max_senses))
        out_dir(out)
        synsets = load_synsets()
        table = Table(title=f"transfer query sets in {out}")
        for col in ("file", "queries", "relevant per query", "sha256"):
            table.add_column(col)
        for source in SOURCES:
            rows = build_transfer_set(source, synsets, limit=limit, max_senses=max_senses)
            path = out / f"wordnet-{source}.jsonl.gz"
            digest = write_query_file(path, rows)
            mean_rel = sum(len(r["relevant"]) for r in rows) / max(1, len(rows))
            table.add_row(str(path), f"{len(rows):,}", f"{mean_rel:.2f}", digest)
    except HeadwiseError as exc:
        _fail(exc)
    console.print(table)
