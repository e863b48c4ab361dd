"""Report section 9: head analysis of MiniLM (issue #4's code) and the memory evaluation tables.

The head analysis runs :func:`headwise.analysis.corpus.analyze_texts` on real WordNet example
sentences (Debian package ``wordnet-base``) and writes what ``headwise analyze --out DIR``
writes (``analysis.json`` and PNG figures) into ``<report>/analysis``. The memory tables are
the ``benchmarks/results/memory_*.md`` files of ``headwise memory eval``, embedded when present.

Example:
    >>> from headwise.report.summary import markdown_tables
    >>> markdown_tables("text\\n\\n| a | b |\\n|---|---|\\n| 1 | 2 |\\n")[0].rows
    [['1', '2']]
"""

from __future__ import annotations

import shutil
from pathlib import Path

from headwise.report.common import FigureSpec, Section, Table, check_flag, check_seed, fmt

ANALYZE_COMMAND = "headwise analyze --model minilm --file <one sentence per line> --out report/analysis"
MEMORY_COMMAND = "headwise memory eval --dir runs/wordnet --out benchmarks/results/memory_wordnet"


def markdown_tables(text: str) -> list[Table]:
    """The pipe tables of a Markdown text, each with the paragraph before it as caption."""
    tables, lines, caption = [], text.splitlines(), ""
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        is_table = line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: ")
        if is_table and lines[i + 1].strip():
            header = [c.strip() for c in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            tables.append(Table(caption, header, rows))
            continue
        if line:
            caption = line.lstrip("#").strip()
        i += 1
    return tables


def wordnet_examples(n: int) -> list[str]:
    """The first ``n`` WordNet example sentences (nouns, then verbs, ..., file order)."""
    from headwise.data.wordnet import iter_synsets

    out: list[str] = []
    for s in iter_synsets():
        out.extend(s.examples)
        if len(out) >= n:
            break
    return out[:n]


def analysis_summary(
    out: Path | None = None, *, quick: bool = False, seed: int = 0, results: Path = Path("benchmarks/results")
) -> Section:
    """Section 9: MiniLM's heads over real sentences (entropy, diversity, importance) + memory tables.

    ``out`` is the report directory: the analysis figures and JSON go to ``out/analysis``
    (without ``out`` they are computed but not written). ``results`` is where the memory
    issue's ``memory_*.md`` tables are looked for.
    """
    check_flag("quick", quick)
    check_seed(seed)
    notes: list[str] = []
    data: dict = {}
    figures: list[FigureSpec] = []
    links: list[tuple[str, str]] = []
    tables: list[Table] = []
    finding = ""
    try:
        from headwise.data.wordnet import wordnet_available

        texts = wordnet_examples(8 if quick else 48) if wordnet_available() else []
    except ImportError:  # pragma: no cover - depends on the checkout
        texts = []
    if texts:
        finding, data, figures, links, tables = _run_analysis(texts, out, seed)
    else:
        notes.append(f"WordNet (Debian wordnet-base) is missing here: `{ANALYZE_COMMAND}` fills this part.")
    memory_files = sorted(Path(results).glob("memory_*.md"))
    for path in memory_files:
        for t in markdown_tables(path.read_text(encoding="utf-8")):
            t.caption = f"{path.name}: {t.caption}" if t.caption else path.name
            tables.append(t)
        if out is not None:
            dest = Path(out) / "memory" / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            links.append((path.name, f"memory/{path.name}"))
    data["memory_tables"] = [p.name for p in memory_files]
    if not memory_files:
        notes.append(f"No memory evaluation table in {results}/ yet: `{MEMORY_COMMAND}` produces it.")
    else:
        finding += f" Memory evaluation: {len(memory_files)} table file(s) from {results}/ are shown below."
    if not finding:
        finding = "Nothing to summarise yet: " + " ".join(notes)
    sec = Section("analysis", 9, "MiniLM head analysis and memory evaluation", finding.strip(), data=data)
    sec.figures, sec.links, sec.tables, sec.notes = figures, links, tables, notes
    return sec


def _run_analysis(texts: list[str], out: Path | None, seed: int):
    import torch

    from headwise.analysis import register
    from headwise.analysis.corpus import analyze_texts
    from headwise.analysis.figures import write_figures
    from headwise.pretrained import load_minilm

    torch.manual_seed(seed)
    register()
    tok, model = load_minilm("headwise")
    res = analyze_texts(texts, tok, model, importance=True, batch_size=16)
    summary = res.to_dict()
    per_head = summary["per_head"]
    layers = sorted({r["layer"] for r in per_head})
    ent = {lay: sum(r["entropy"] for r in per_head if r["layer"] == lay) / 12 for lay in layers}
    top = sorted(per_head, key=lambda r: -r.get("importance", 0.0))[:5]
    div = summary.get("diversity", {})
    patterns: dict[str, int] = {}
    for r in per_head:
        patterns[r.get("pattern", "?")] = patterns.get(r.get("pattern", "?"), 0) + 1
    data = {
        "texts": len(texts),
        "tokens": summary["n_tokens"],
        "mean_entropy_per_layer": ent,
        "patterns": patterns,
        "diversity": div,
        "top_importance": [{k: r[k] for k in ("layer", "head", "importance", "entropy")} for r in top],
    }
    lo, hi = min(ent, key=ent.get), max(ent, key=ent.get)
    common = max(patterns, key=patterns.get)
    finding = (
        f"Over {len(texts)} WordNet example sentences ({summary['n_tokens']} tokens), MiniLM's mean head entropy is "
        f"lowest in layer {lo} ({fmt(ent[lo])} nats) and highest in layer {hi} ({fmt(ent[hi])}). The most common "
        f"pattern class is {common} ({patterns[common]} of {len(per_head)} heads). "
    )
    if div:
        finding += (
            f"Across all {len(per_head)} heads the mean JS divergence is {fmt(div['mean_js'])} nats per row and the "
            f"mean cosine {fmt(div['mean_cosine'])}; the most similar pair is {div['most_similar'][0]}/"
            f"{div['most_similar'][1]}, the most different {div['most_different'][0]}/{div['most_different'][1]}. "
        )
    if top and "importance" in top[0]:
        finding += "By gradient importance the top heads are " + ", ".join(
            f"L{r['layer']}H{r['head']} ({r['importance']:.2f})" for r in top
        )
        finding += "."
    tables = [
        Table(
            "Mean head entropy per layer (nats)",
            ["layer", "mean entropy"],
            [[str(lay), f"{ent[lay]:.3f}"] for lay in layers],
        ),
        Table(
            "Top heads by normalised gradient importance (Michel et al. 2019)",
            ["head", "importance", "entropy"],
            [[f"L{r['layer']}H{r['head']}", f"{r.get('importance', 0.0):.3f}", f"{r['entropy']:.3f}"] for r in top],
        ),
    ]
    figures, links = [], []
    if out is not None:
        import json

        from headwise.fileio import write_atomic

        where = Path(out) / "analysis"
        written = write_figures(res, where)
        write_atomic(where / "analysis.json", json.dumps(summary, indent=1))
        links.append(("analysis.json", "analysis/analysis.json"))
        captions = {
            "entropy_per_layer.png": "Entropy of each MiniLM head, by layer (from headwise.analysis).",
            "diversity.png": "Head x head diversity (JS divergence, cosine) of MiniLM's 72 heads.",
            "importance.png": "Gradient importance of each head (normalised per layer).",
        }
        for p in written:
            rel = f"analysis/{p.name}"
            if p.name in captions:
                figures.append(FigureSpec(name=p.stem, caption=captions[p.name], path=rel, png=p.read_bytes()))
            else:
                links.append((p.name, rel))
    return finding, data, figures, links, tables
