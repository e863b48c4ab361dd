"""The quick report end to end: files, determinism for a seed, and the page in headless Chromium."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pytest
from tests.conftest import require_data

from headwise.report.cli import SECTION_KEYS, build_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    sections, index, _ = build_report(out, quick=True, seed=0)
    assert [s.key for s in sections] == list(SECTION_KEYS)
    assert index == out / "index.html"
    return out


def test_report_files(quick_report: Path):
    page = (quick_report / "index.html").read_text()
    for key in SECTION_KEYS:
        data = json.loads((quick_report / "data" / f"{key}.json").read_text())
        assert data["finding"] and html.escape(data["finding"]) in page, key
        for fig in data["figures"]:
            assert (quick_report / fig["path"]).stat().st_size > 1000, fig
        assert f'id="{key}"' in page
    assert page.count("data:image/png;base64,") >= 12
    for word in ("python", "torch", "headwise", "transformers", "numpy", "matplotlib", "headwise demo --out"):
        assert word in page


def test_same_seed_same_numbers(quick_report: Path, tmp_path: Path):
    """A second run with the same seed gives the same JSON numbers (measured memory aside)."""
    keys = [k for k in SECTION_KEYS if k != "memory"]
    build_report(tmp_path, quick=True, seed=0, only=keys)
    for key in keys:
        a = json.loads((quick_report / "data" / f"{key}.json").read_text())
        b = json.loads((tmp_path / "data" / f"{key}.json").read_text())
        assert a["data"] == b["data"], key
        assert a["finding"] == b["finding"], key


def test_page_in_headless_chromium(quick_report: Path):
    require_data(shutil.which("chromium") is not None and shutil.which("chromedriver") is not None, "chromium")
    from headwise.report.browser import check_page

    shot = quick_report / "screenshot.png"
    r = check_page(quick_report / "index.html", screenshot=shot, scale=0.5)
    assert r.images >= 12 and r.broken_images == [], r
    assert r.console_errors == [], r.console_errors
    assert r.title == "headwise report" and r.height > 3000
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size[1] >= r.height // 2 - 2
