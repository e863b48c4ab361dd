"""The report page: one self-contained ``index.html`` (figures embedded as base64 PNG).

No JavaScript and no external resource: the page reads the same from a file, a server or
an archive. Figures are also beside it under ``figures/`` and the numbers under ``data/``.

Example:
    >>> from headwise.report.common import Section
    >>> page = render_page([Section("x", 1, "A <title>", "Found 1 < 2.")], {"command": "headwise demo"})
    >>> "A &lt;title&gt;" in page and "Found 1 &lt; 2." in page and 'href="#x"' in page
    True
"""

from __future__ import annotations

import base64
import platform
from html import escape
from importlib import metadata
from pathlib import Path

from headwise.fileio import write_atomic
from headwise.report.common import Section, Table

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; line-height: 1.5; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2.2em; }
nav ol { columns: 2; }
.finding { background: #f6f8fa; border-left: 4px solid #0969da; padding: .6em 1em; }
figure { margin: 1.2em 0; text-align: center; }
figure img { max-width: 100%; border: 1px solid #eaecef; }
figcaption { font-size: .9em; color: #57606a; }
table { border-collapse: collapse; margin: 1em 0; font-size: .88em; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; text-align: right; }
th { background: #f6f8fa; }
td:first-child, th:first-child { text-align: left; }
.note { color: #9a6700; }
footer { margin-top: 3em; border-top: 1px solid #d0d7de; font-size: .85em; color: #57606a; }
code { background: #f6f8fa; padding: .1em .3em; border-radius: 3px; }
"""


def versions() -> dict[str, str]:
    """Python and the versions of the packages the report depends on."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "headwise", "transformers", "numpy", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _table(t: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table><caption>{escape(t.caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(s: Section) -> str:
    parts = [f'<section id="{escape(s.key)}"><h2>{s.number}. {escape(s.title)}</h2>']
    parts.append(f'<p class="finding"><strong>Finding.</strong> {escape(s.finding)}</p>')
    for n, f in enumerate(s.figures, 1):
        src = f"data:image/png;base64,{base64.b64encode(f.png).decode()}" if f.png else escape(f.path)
        label = f"Figure {s.number}.{n}"
        parts.append(
            f'<figure><img src="{src}" alt="{escape(label)}: {escape(f.caption)}">'
            f"<figcaption>{label}. {escape(f.caption)}</figcaption></figure>"
        )
    parts.extend(_table(t) for t in s.tables)
    parts.extend(f'<p class="note">{escape(n)}</p>' for n in s.notes)
    links = [f'<a href="{escape(p)}">{escape(label)}</a>' for label, p in s.links]
    links.append(f'<a href="data/{escape(s.key)}.json">data/{escape(s.key)}.json</a>')
    parts.append(f"<p>Files: {', '.join(links)}</p></section>")
    return "\n".join(parts)


def render_page(sections: list[Section], meta: dict) -> str:
    """The HTML of the report; ``meta``: command, and optionally seed, seconds, machine, versions."""
    toc = "".join(f'<li><a href="#{escape(s.key)}">{escape(s.title)}</a></li>' for s in sections)
    vers = meta.get("versions") or versions()
    foot = [
        "Versions: " + ", ".join(f"{escape(k)} {escape(str(v))}" for k, v in vers.items()) + ".",
        f"Machine: {escape(str(meta.get('machine', platform.platform())))}.",
        f"Command: <code>{escape(str(meta.get('command', '')))}</code>"
        + (f" (seed {meta['seed']}" if "seed" in meta else "")
        + (f", {meta['seconds']:.0f} s" if "seconds" in meta else "")
        + (")" if "seed" in meta else "")
        + ".",
        "Every number on this page was computed by that command; findings are generated from the numbers.",
    ]
    body = "\n".join(_section(s) for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>headwise report</title><style>{CSS}</style></head><body>\n"
        "<h1>headwise report: multi-head attention, head by head</h1>\n"
        f"<nav><h3>Contents</h3><ol>{toc}</ol></nav>\n{body}\n"
        f"<footer>{''.join(f'<p>{line}</p>' for line in foot)}</footer></body></html>\n"
    )


def write_page(sections: list[Section], meta: dict, out: Path) -> Path:
    """Save every section (figures, JSON) under ``out`` and write ``out/index.html``."""
    out = Path(out)
    for s in sections:
        s.save(out)
    path = out / "index.html"
    write_atomic(path, render_page(sections, meta))
    return path
