"""Generated documentation stays in sync with the code."""

from pathlib import Path

from headwise.docs import BEGIN, END, render_attend_doc
from headwise.kernels.registry import backend_names, backend_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "attend.md"


def test_backend_table_in_docs_matches_registry():
    text = DOC.read_text()
    assert render_attend_doc(text) == text, "docs/attend.md is stale: run `headwise docs`"


def test_backend_table_lists_every_backend_once():
    table = backend_table()
    for name in backend_names():
        assert table.count(f"| `{name}` |") == 1


def test_render_inserts_markers_into_a_new_doc():
    out = render_attend_doc("# attend\n")
    assert BEGIN in out and END in out and backend_table() in out
