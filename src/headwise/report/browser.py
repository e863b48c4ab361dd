"""Open the report in headless Chromium (through chromedriver's W3C HTTP API, stdlib only).

:func:`check_page` starts ``chromedriver`` on a free port, opens ``file://.../index.html``
in Chromium (--headless --no-sandbox --disable-gpu, no background networking), and returns
the images that failed to load (``complete`` false or ``naturalWidth`` 0), the console
errors, the page height, and a full-page PNG screenshot when asked (Chrome DevTools
``Page.captureScreenshot`` with ``captureBeyondViewport``, optionally scaled down).

Example (needs the Debian packages chromium and chromium-driver; run for real by
tests/integration/test_report_browser.py)::

    from headwise.report.browser import check_page

    r = check_page(Path("report/index.html"), screenshot=Path("shot.png"))
    r.broken_images, r.console_errors   # ([], []) for a good page
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from headwise.errors import HeadwiseError, bad_argument
from headwise.fileio import write_atomic

FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--no-first-run",
    "--metrics-recording-only",
    "--window-size=1200,900",
]


@dataclass
class PageCheck:
    """What the browser saw: images, broken ones, console errors, page size."""

    images: int
    broken_images: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    width: int = 0
    height: int = 0
    title: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Driver:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.session = ""

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 120.0) -> object:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}").get("value")

    def s(self, method: str, path: str, body: dict | None = None) -> object:
        return self.call(method, f"/session/{self.session}{path}", body)

    def script(self, js: str) -> object:
        return self.s("POST", "/execute/sync", {"script": js, "args": []})

    def cdp(self, cmd: str, params: dict) -> object:
        return self.s("POST", "/goog/cdp/execute", {"cmd": cmd, "params": params})


def check_page(
    page: Path, screenshot: Path | None = None, scale: float = 1.0, width: int = 1200, timeout: float = 60.0
) -> PageCheck:
    """Load ``page`` in headless Chromium and report broken images and console errors."""
    page = Path(page).resolve()
    if not page.is_file():
        raise bad_argument("page", "an existing HTML file", str(page))
    if not 0.1 <= scale <= 2.0:
        raise bad_argument("scale", "a number in [0.1, 2]", scale)
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_bin is None:
        raise HeadwiseError("browser: expected chromium and chromedriver on PATH, got not installed")
    port = _free_port()
    proc = subprocess.Popen([driver_bin, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    drv = _Driver(port)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if drv.call("GET", "/status", timeout=2).get("ready"):
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise HeadwiseError(f"browser: expected chromedriver to start within {timeout} s, got no answer")
            time.sleep(0.2)
        caps = {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": FLAGS + [f"--window-size={width},900"]},
            "goog:loggingPrefs": {"browser": "ALL"},
        }
        drv.session = drv.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        drv.s("POST", "/url", {"url": page.as_uri()})
        while drv.script("return document.readyState") != "complete":
            if time.time() > deadline:
                raise HeadwiseError("browser: expected the page to finish loading, got a timeout")
            time.sleep(0.1)
        imgs = drv.script(
            "return Array.from(document.images).map(i => [i.alt || i.src.slice(0, 60), i.complete, i.naturalWidth])"
        )
        logs = drv.s("POST", "/se/log", {"type": "browser"}) or []
        size = drv.script("return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        result = PageCheck(
            images=len(imgs),
            broken_images=[alt for alt, complete, w in imgs if not complete or w == 0],
            console_errors=[e["message"] for e in logs if e.get("level") == "SEVERE"],
            width=int(size[0]),
            height=int(size[1]),
            title=str(drv.script("return document.title")),
        )
        if screenshot is not None:
            shot = drv.cdp(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": result.width, "height": result.height, "scale": scale},
                },
            )
            write_atomic(Path(screenshot), base64.b64decode(shot["data"]))
        drv.s("DELETE", "")
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
