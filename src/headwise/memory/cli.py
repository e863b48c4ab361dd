"""``headwise memory``: build a retrieval dataset, train query enhancers, evaluate them, search.

A working directory (``--dir``) holds everything one dataset needs::

    DIR/manifest.json          dataset name, slice, fingerprint, sizes, the build command
    DIR/docs.npy, queries.npy  MiniLM embeddings (N, 384) and (Q, 384), float32
    DIR/models/<method>/       enhancer.safetensors + enhancer.json + history.json

Typical session (see docs/memory-eval.md for the measured results)::

    headwise memory build --dataset wordnet --out runs/wordnet
    headwise memory train --dir runs/wordnet --method linear,multi-head
    headwise memory eval  --dir runs/wordnet --out benchmarks/results/memory_wordnet
    headwise memory search --dir runs/wordnet "a sharp cutting remark"
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from headwise.cliutil import fail, out_dir, out_file
from headwise.engines import ADDRESS_HELP, ENGINE_HELP, WORKERS_HELP, make_engine
from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import write_atomic
from headwise.memory.datasets import RetrievalDataset, embed_dataset, load_dataset
from headwise.memory.evaluate import (
    enhanced_retriever,
    knn_retriever,
)

memory_app = typer.Typer(help="Vector memory with a learned attention retrieval stage: build, train, eval, search.")
console = Console()
MANIFEST = "manifest.json"


def _command(ctx: typer.Context) -> str:
    """The running command with every parameter spelled out (defaults included): reproducible as written."""
    parts = ["headwise", "memory", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or (isinstance(value, list | tuple) and not value):
            continue
        if isinstance(value, list | tuple):  # a repeatable option: the flag once per value
            parts += [x for v in value for x in (param.opts[0], shlex.quote(str(v)))]
        elif param.param_type_name == "argument":
            parts.append(shlex.quote(str(value)))
        elif getattr(param, "is_flag", False) and isinstance(value, bool):  # --x / --no-x
            flag = param.opts[0] if value else next(iter(param.secondary_opts), None)
            parts += [flag] if flag else []
        else:
            parts += [param.opts[0], shlex.quote(str(value))]
    return " ".join(parts)


def _fail(exc: HeadwiseError) -> NoReturn:
    """One line on stderr and exit status 2 (the contract of every command, see docs/cli.md)."""
    fail(exc)


def _load(directory: Path) -> tuple[dict, RetrievalDataset, np.ndarray, np.ndarray]:
    """The manifest, the dataset rebuilt from its source (checked by fingerprint) and the embeddings.

    Every way a working directory can be damaged (unreadable or incomplete manifest, a missing,
    pickled or misshapen ``.npy``) is a HeadwiseError naming the file.
    """
    path = directory / MANIFEST
    if not path.is_file():
        raise bad_argument("--dir", f"a folder made by 'headwise memory build' (with {MANIFEST})", str(directory))
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_argument(str(path), "a JSON manifest written by 'headwise memory build'", str(exc)) from None
    missing = [k for k in ("source", "fingerprint", "documents", "queries", "name") if not isinstance(manifest, dict)
               or k not in manifest]  # fmt: skip
    if missing:
        raise bad_argument(str(path), "the keys source, fingerprint, documents, queries, name", f"no {missing}")
    try:
        ds = _dataset_from(manifest["source"], manifest.get("limit"))
    except (KeyError, TypeError, AttributeError) as exc:
        raise bad_argument(f"{path}: source", "a dataset name, file or corpus description", repr(exc)) from None
    if ds.fingerprint() != manifest["fingerprint"]:
        raise bad_argument("--dir", f"data matching fingerprint {manifest['fingerprint']}", ds.fingerprint())
    docs = _load_matrix(directory / "docs.npy", len(ds.documents))
    queries = _load_matrix(directory / "queries.npy", len(ds), dim=docs.shape[1])
    return manifest, ds, docs, queries


def _load_matrix(path: Path, rows: int, dim: int | None = None) -> np.ndarray:
    """A (rows, d) float32 embedding matrix written by build (no pickle), or a HeadwiseError naming the file."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise bad_argument(str(path), "the embeddings written by 'headwise memory build'", "no such file") from None
    except (OSError, ValueError, EOFError) as exc:  # a pickled or damaged file
        raise bad_argument(str(path), "a plain .npy array (no pickle)", f"{type(exc).__name__}: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] != rows or arr.dtype != np.float32 or (dim is not None and arr.shape[1] != dim):
        want = f"a ({rows}, {dim if dim is not None else 'd'}) float32 array"
        raise bad_argument(str(path), want, f"{arr.dtype} {arr.shape}")
    return arr


def _dataset_from(source: str | dict, limit: int | None) -> RetrievalDataset:
    """A built-in dataset by name or file, or a user's corpus (a manifest's ``source``)."""
    if isinstance(source, dict):
        from headwise.memory.userdata import user_dataset

        return user_dataset(source["corpus"], source.get("queries"), seed=source["seed"], test=source["test"],
                            validation=source["validation"])  # fmt: skip
    return load_dataset(source, limit=limit)


def _pseudo_training_set(
    ds: RetrievalDataset,
    n: int,
    seed: int,
    *,
    n_val: int | None = None,
    exclude: Sequence[int] = (),
    option: str = "--self-supervised",
    style: str = "span",
) -> tuple[np.ndarray, list, np.ndarray, np.ndarray]:
    """(query embeddings, relevance, train indices, validation indices) of corpus pseudo-queries.

    ``n`` for training plus ``n_val`` (default n // 10, at least 1) for validation, never
    drawn from the documents in ``exclude``; no labelled query is used (see
    headwise.memory.gate.pseudo_queries).
    """
    from headwise.memory.datasets import embed
    from headwise.memory.gate import pseudo_queries

    n_val = max(1, n // 10) if n_val is None else n_val
    pairs = pseudo_queries(ds.documents, n + n_val, seed=seed, exclude=exclude, style=style)
    if len(pairs) < 2:
        raise bad_argument(option, "a corpus with documents of at least 4 words", len(pairs))
    emb = embed([t for t, _ in pairs], description=f"{ds.name}: pseudo-queries")
    n_tr = max(1, len(pairs) - n_val)
    return emb, [{d: 1} for _, d in pairs], np.arange(n_tr), np.arange(n_tr, len(pairs))


def _methods(spec: str, models: Path | None = None) -> list[str]:
    """Method names: knn, linear, the mechanisms, and (with ``models``) any model folder in it."""
    from headwise.memory.enhancer import MECHANISMS

    names = [m.strip() for m in spec.split(",") if m.strip()]
    allowed = ("knn", "linear", *MECHANISMS)
    for n in names:
        saved = models is not None and (models / n / "enhancer.json").is_file()
        if n not in allowed and not saved:
            where = f" or a model folder in {models}" if models is not None else ""
            raise bad_argument("--method", f"comma-separated names from {allowed}{where}", repr(n))
    return names


@memory_app.command()
def build(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="working directory to create")],
    dataset: Annotated[
        str | None, typer.Option(help="wordnet, debian, or a JSONL(.gz) file in the Debian sample format")
    ] = None,
    corpus: Annotated[
        Path | None, typer.Option(help='your own corpus: JSONL(.gz) lines {"id", "text", "metadata"?} or Parquet')
    ] = None,
    queries: Annotated[
        Path | None, typer.Option(help='with --corpus: labelled queries, lines {"query", "relevant", "split"?}')
    ] = None,
    test_fraction: Annotated[float, typer.Option(help="with --queries and no split field: test share")] = 0.2,
    validation_fraction: Annotated[float, typer.Option(help="with --queries and no split field: validation share")] = (
        0.1
    ),
    seed: Annotated[int, typer.Option(help="seed of the random query split")] = 20240505,
    limit: Annotated[int | None, typer.Option(help="WordNet only: first N synsets of each part of speech")] = None,
    engine: Annotated[str, typer.Option(help=ENGINE_HELP)] = "local",
    ray_address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None,
    workers: Annotated[int | None, typer.Option(help=WORKERS_HELP)] = None,
) -> None:
    """Load a dataset (built-in or your own corpus), embed it with MiniLM (cached), write the working directory."""
    runner = None
    try:
        t0 = time.perf_counter()
        out_dir(out)
        runner = make_engine(engine, ray_address, workers)
        if (dataset is None) == (corpus is None):
            raise bad_argument("--dataset/--corpus", "exactly one of them", f"dataset={dataset}, corpus={corpus}")
        if queries is not None and corpus is None:
            raise bad_argument("--queries", "--corpus as well (built-in datasets bring their queries)", str(queries))
        if corpus is not None:
            source: str | dict = {"corpus": str(corpus.resolve()), "seed": seed, "test": test_fraction,
                                  "validation": validation_fraction,
                                  "queries": str(queries.resolve()) if queries is not None else None}  # fmt: skip
        else:
            source = str(Path(dataset).resolve()) if Path(dataset).is_file() else dataset
        ds = _dataset_from(source, limit)
        docs, queries_emb = embed_dataset(ds, progress=True, engine=runner)
    except HeadwiseError as exc:
        _fail(exc)
    finally:
        if runner is not None:
            runner.close()  # shuts Ray down if this command started it
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in (("docs.npy", docs), ("queries.npy", queries_emb)):
        tmp = out / f".{name}.tmp.npy"
        np.save(tmp, arr, allow_pickle=False)
        tmp.replace(out / name)
    manifest = {
        "source": source,
        "name": ds.name,
        "limit": limit,
        "fingerprint": ds.fingerprint(),
        "documents": len(ds.documents),
        "queries": len(ds),
        "split": {p: len(v) for p, v in ds.split.items()},
        "command": _command(ctx),
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2))
    table = Table(title=f"built {ds.name} in {out}")
    for col in ("documents", "queries", "train", "validation", "test", "dim", "seconds"):
        table.add_column(col, justify="right")
    sp = manifest["split"]
    table.add_row(
        f"{len(ds.documents):,}", f"{len(ds):,}", f"{sp['train']:,}", f"{sp['validation']:,}", f"{sp['test']:,}",
        str(docs.shape[1]), f"{time.perf_counter() - t0:.1f}",
    )  # fmt: skip
    console.print(table)


ADAPTER_ONLY = " (adapter only)"


def _retrievers(models: Path, names: list[str], docs: np.ndarray, *, ablate: bool = False) -> dict:
    """name -> retriever; with ``ablate``, "NAME (adapter only)" follows each attention enhancer."""
    from headwise.memory.enhancer import QueryEnhancer, load_enhancer

    out = {}
    for name in names:
        if name == "knn":
            out[name] = knn_retriever(docs)
            continue
        model = load_enhancer(models / name)
        if isinstance(model, QueryEnhancer) and model.mechanism == "flash":
            model.bind(docs)
        out[name] = enhanced_retriever(docs, model)
        if ablate and isinstance(model, QueryEnhancer) and model.uses_candidates:
            out[name + ADAPTER_ONLY] = enhanced_retriever(docs, model.adapter_only())
    return out


@memory_app.command()
def search(
    ctx: typer.Context,
    text: Annotated[str, typer.Argument(help="the query")],
    dir: Annotated[Path, typer.Option(help="working directory made by 'build'")],
    method: Annotated[str, typer.Option(help="knn or a trained method")] = "multi-head",
    k: Annotated[int, typer.Option(help="results per method (at most the corpus size are shown)")] = 5,
) -> None:
    """Search the corpus for TEXT with cosine kNN and with METHOD, side by side."""
    from headwise.memory.checks import check_k
    from headwise.memory.datasets import embed

    try:
        k = check_k(k)
        names = list(dict.fromkeys(["knn", *_methods(method)]))
        manifest, ds, docs, _ = _load(dir)
        retrievers = _retrievers(dir / "models", names, docs)
        q = embed([text], cache=False, progress=False)
    except HeadwiseError as exc:
        _fail(exc)
    for name, retrieve in retrievers.items():
        ids = retrieve(q, min(k, len(docs)))[0]  # real documents only, never padding
        table = Table(title=f"{name}: {text!r}")
        for col in ("rank", "score", "document"):
            table.add_column(col, justify="right" if col != "document" else "left")
        for rank, d in enumerate(ids, 1):
            table.add_row(str(rank), f"{float(docs[d] @ q[0]):.3f}", ds.documents[d][:110])
        console.print(table)


@memory_app.command("verify")
def verify(path: Annotated[Path, typer.Argument(help="a VectorMemory directory")]) -> None:
    """Check a store completely, read-only (safe beside a writer): SQLite pages, record checksums, the index."""
    from headwise.memory import VectorMemory

    try:
        with VectorMemory.open(path, read_only=True) as mem:
            report = mem.verify()
    except HeadwiseError as exc:
        _fail(exc)
    table = Table(title=f"verify {path}")
    for col in ("check", "result"):
        table.add_column(col)
    rows = [("records", f"{report.records:,}"), ("without a checksum (schema 1)", f"{report.unchecked:,}"),
            ("SQLite integrity_check", "; ".join(report.sqlite[:3]) or "ok")]  # fmt: skip
    for label, ids in (("checksum mismatches", report.corrupt), ("missing from the index", report.index_missing),
                       ("in the index, not in SQLite", report.index_extra),
                       ("index vector differs", report.index_differs)):  # fmt: skip
        rows.append((label, f"{len(ids):,}" + (f" (ids {ids[:10]})" if ids else "")))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if not report.ok:
        _fail(HeadwiseError(f"verify {path}: expected an intact store, got problems (see the table above)"))


def _qps_cell(row: dict) -> str:
    lo, hi = row["batch_qps_range"]
    return f"{row['batch_qps']:.0f} [{lo:.0f}, {hi:.0f}]"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"  # "-": the search has no such stage


def _hnsw_label(kind: str, m: int, ef_search: int, candidate_ef: int, ef_construction: int) -> str:
    if kind == "flat":
        return "exact"
    first = f", first pass ef {candidate_ef}" if candidate_ef else ""
    build = f", ef_construction={ef_construction}" if ef_construction != 200 else ""
    return f"M={m}{build}, ef_search={ef_search}{first}"


@memory_app.command()
def bench(
    ctx: typer.Context,
    dir: Annotated[Path, typer.Option(help="working directory made by 'build' and 'train'")],
    method: Annotated[str, typer.Option(help="trained methods to time besides plain search")] = "linear,multi-head",
    out: Annotated[Path | None, typer.Option(help="write OUT.md and OUT.json")] = None,
    queries: Annotated[int, typer.Option(help="test queries timed one by one")] = 200,
    batch: Annotated[int, typer.Option(help="queries in the batched call")] = 1000,
    sizes: Annotated[str, typer.Option(help="memory sizes for flash vs top-K ('' to skip)")] = "10000,100000,1000000",
    ef_search: Annotated[int, typer.Option(help="HNSW beam width of the (second) search pass")] = 64,
    hnsw_m: Annotated[int, typer.Option(help="HNSW graph degree M")] = 32,
    ef_construction: Annotated[int, typer.Option(help="HNSW build beam width")] = 200,
    candidate_ef: Annotated[
        int, typer.Option(help="HNSW beam width of an enhanced search's first pass (0: ef-search)")
    ] = 0,
    mechanism_sizes: Annotated[
        str,
        typer.Option(
            "--mechanism-sizes", "--size", help="store sizes for the per-mechanism latency (untrained; '' to skip)"
        ),
    ] = "1000,10000,100000",
    mechanisms: Annotated[
        str, typer.Option("--mechanisms", "--mechanism", help="enhancer mechanisms timed at each store size")
    ] = "multi-head,hyperbolic,moe",
    index: Annotated[
        str, typer.Option(help="store index kinds to time: flat, hnsw, hnsw-fp16")
    ] = "flat,hnsw,hnsw-fp16",
    filtered: Annotated[
        str, typer.Option(help="selectivities of the filtered-search latency ('' to skip)")
    ] = "0.5,0.05,0.005",
) -> None:
    """Latency and throughput through VectorMemory (flat and HNSW), and flash vs top-K at 10k-1M vectors."""
    from headwise.bench.filtered import filtered_latency, filtered_markdown, filtered_table, parse_selectivities
    from headwise.bench.memory import (
        BATCH_ROUNDS,
        STAGES,
        bench_info,
        flash_table,
        flash_vs_topk,
        latency_table,
        markdown_table,
        mechanism_latency,
        store_latency,
    )
    from headwise.memory.enhancer import MECHANISMS, QueryEnhancer, load_enhancer
    from headwise.memory.index import INDEX_KINDS

    try:
        if out is not None:
            out_file(out.with_suffix(".md"))
        names = [m for m in _methods(method) if m != "knn"]
        kinds = [x.strip() for x in index.split(",") if x.strip()]
        if any(x not in INDEX_KINDS for x in kinds):
            raise bad_argument("--index", f"comma-separated kinds from {INDEX_KINDS}", repr(index))
        mechs = [m.strip() for m in mechanisms.split(",") if m.strip()]
        if any(m not in MECHANISMS for m in mechs):
            raise bad_argument("--mechanism", f"comma-separated names from {MECHANISMS}", repr(mechanisms))
        selectivities = parse_selectivities(filtered)
        manifest, ds, docs, qemb = _load(dir)
        sub = ds.subset("test")
        enhancers = {"knn": None, **{n: load_enhancer(dir / "models" / n) for n in names}}
    except HeadwiseError as exc:
        _fail(exc)
    tq = qemb[sub.index]
    result: dict = {"command": _command(ctx), "dataset": manifest, "machine": bench_info(), "latency": {}}
    for kind in kinds:
        with console.status(f"timing VectorMemory ({kind})"):
            t = store_latency(
                docs, tq, enhancers, index=kind, ef_search=ef_search, hnsw_m=hnsw_m, ef_construction=ef_construction,
                candidate_ef=candidate_ef or None, single=queries, batch=batch,
            )  # fmt: skip
        result["latency"][kind] = t
        console.print(
            latency_table(
                t, f"VectorMemory {kind} ({_hnsw_label(kind, hnsw_m, ef_search, candidate_ef, ef_construction)})"
            )
        )
    hnsw_options = {"ef_search": ef_search, "hnsw_m": hnsw_m, "ef_construction": ef_construction}
    if selectivities and kinds:
        with console.status("filtered search"):
            result["filtered"] = filtered_latency(
                docs, tq, kinds=kinds, selectivities=selectivities, single=queries, batch=batch, **hnsw_options
            )
        console.print(filtered_table(result["filtered"]))
    size_list = [int(x) for x in sizes.split(",") if x.strip()]
    if size_list and "multi-head" in enhancers:
        flash_dir = dir / "models" / "flash"
        flash = load_enhancer(flash_dir) if flash_dir.is_dir() else QueryEnhancer(docs.shape[1], mechanism="flash")
        with console.status("flash vs top-K"):
            rows = flash_vs_topk(docs, tq, sub.relevant, enhancers["multi-head"], flash, sizes=size_list)
        result["flash_vs_topk"] = {"trained_flash": flash_dir.is_dir(), "rows": rows}
        console.print(flash_table(rows))
    mech_sizes = [int(x) for x in mechanism_sizes.split(",") if x.strip()]
    too_big = [n for n in mech_sizes if n > len(docs)]
    if too_big:
        console.print(f"per-mechanism latency: skipping store sizes {too_big} (the corpus has {len(docs):,} documents)")
    mech_sizes = [n for n in mech_sizes if n <= len(docs)]
    if mech_sizes and mechs:
        with console.status("per-mechanism latency"):
            result["mechanisms"] = mechanism_latency(docs, tq, sizes=mech_sizes, mechanisms=mechs, single=queries)
    if out is not None:
        lines = [f"## Vector memory latency ({manifest['name']}, {len(docs):,} vectors)", ""]
        for kind, t in result["latency"].items():
            cols = [
                "method",
                "p50 µs",
                "p95 µs",
                "single q/s",
                f"batched q/s (median of {BATCH_ROUNDS} [range])",
                "bytes/vector",
                "index recall@10 vs exact (same queries)",
                "top-10 agreement with an exact store",
            ]
            cells = [
                [n, f"{r['p50_us']:.0f}", f"{r['p95_us']:.0f}", f"{r['single_qps']:.0f}", _qps_cell(r),
                 f"{r['bytes_per_vector']:.0f}", f"{r['recall_vs_exact']:.3f}", f"{r['agreement_vs_exact']:.3f}"]
                for n, r in t.items()
            ]  # fmt: skip
            label = f"VectorMemory {kind} ({_hnsw_label(kind, hnsw_m, ef_search, candidate_ef, ef_construction)})"
            lines += markdown_table(label, cols, cells)
            stage_cols = ["method", *STAGES, "other", "total"]
            cells = [[n, *(_us(r["batch_stage_us"].get(c)) for c in stage_cols[1:])] for n, r in t.items()]
            lines += markdown_table(f"{label}: batched call by stage (µs per query, median of {BATCH_ROUNDS})",
                                    stage_cols, cells)  # fmt: skip
            enhanced = {n: r for n, r in t.items() if r.get("single_stage_us")}
            if enhanced:
                cols = ["method", *STAGES, "p50 of the whole search"]
                cells = [[n, *(_us(r["single_stage_us"].get(c)) for c in STAGES), f"{r['p50_us']:.0f}"]
                         for n, r in enhanced.items()]  # fmt: skip
                lines += markdown_table(f"{label}: one query at a time by stage (µs, median of each stage)",
                                        cols, cells)  # fmt: skip
        if "filtered" in result:
            label = _hnsw_label("hnsw", hnsw_m, ef_search, 0, ef_construction)
            lines += filtered_markdown(result["filtered"], f"Filtered search by selectivity (k=10, HNSW {label})")
        if "flash_vs_topk" in result:
            cols = ["memory", "queries", "knn R@10", "top-K R@10", "flash R@10", "knn ms/q", "top-K ms/q", "flash ms/q"]
            cells = [
                [f"{r['memory']:,}", str(r["queries"]), f"{r['knn recall@10']:.3f}", f"{r['top-K recall@10']:.3f}",
                 f"{r['flash recall@10']:.3f}", f"{r['knn ms/query']:.3f}", f"{r['top-K ms/query']:.3f}",
                 f"{r['flash ms/query']:.3f}"]
                for r in result["flash_vs_topk"]["rows"]
            ]  # fmt: skip
            lines += markdown_table("flash (whole memory, tiled attend) vs top-K route", cols, cells)
        if "mechanisms" in result:
            cols = ["stored vectors", "method", "p50 µs", "p95 µs", "single q/s", "batched q/s", "bytes/vector"]
            cells = [
                [f"{r['stored']:,}", r["method"], f"{r['p50_us']:.0f}", f"{r['p95_us']:.0f}", f"{r['single_qps']:.0f}",
                 f"{r['batch_qps']:.0f}", f"{r['bytes_per_vector']:.0f}"]
                for r in result["mechanisms"]
            ]  # fmt: skip
            title = "Each enhancer mechanism by store size (HNSW, untrained enhancers: latency only)"
            lines += markdown_table(title, cols, cells)
        lines += [f"Command: `{result['command']}`", ""]
        write_atomic(out.with_suffix(".md"), "\n".join(lines))
        write_atomic(out.with_suffix(".json"), json.dumps(result, indent=2, default=str))
        console.print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


# Registered on memory_app by import: train, eval, gate and transfer-sets live in their own modules.
from headwise.memory import cli_eval, cli_feedback, cli_gate, cli_migrate, cli_store, cli_sweep, cli_train  # noqa: E402, F401
