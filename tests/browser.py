"""Render the orchestrator's dashboard in a real headless browser (Debian's chromium) and check what it shows.

`render_dashboard(url, screenshot)` returns the DOM after the page's scripts ran (and writes a PNG);
`check_dashboard(dom)` asserts that the charts have data, the miners table has rows and the epoch is shown.
`require_chromium()` finds the browser: missing, a test fails under CI (CI=true) and skips elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHART_IDS = ("loss-chart", "throughput-chart")
_VOID = frozenset("area base br col embed hr img input link meta source track wbr".split())
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    override = os.environ.get("IOTA_CHROMIUM")  # a browser elsewhere; a wrong path counts as none
    if override:
        return shutil.which(override)
    return next((path for name in _CANDIDATES if (path := shutil.which(name))), None)


def require_chromium() -> str:
    """The browser's path; a missing browser fails the test under CI and skips it elsewhere."""
    path = find_chromium()
    if path is None:
        reason = "chromium is not installed (apt-get install chromium, or ./setup.sh --role dev as root)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; CI must run the browser test")
        pytest.skip(reason)
    return path


def _chromium(args: list[str], timeout_s: float) -> tuple[str, str]:
    browser = require_chromium()
    # A fresh profile each run: concurrent runs never fight over a profile lock, and nothing is cached.
    with tempfile.TemporaryDirectory(prefix="iota-chromium-") as profile:
        command = [
            browser,
            "--headless",
            "--no-sandbox",  # containers and CI run as root, where the sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout, done.stderr


def render_dashboard(
    url: str,
    screenshot: Path,
    *,
    wait_ms: int = 6000,
    window: tuple[int, int] = (1400, 1000),
    timeout_s: float = 90.0,
) -> str:
    """The dashboard's DOM after its scripts ran for `wait_ms` (virtual time), and a PNG of the window.
    One browser run does both."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    dom, log = _chromium(
        [
            f"--virtual-time-budget={wait_ms}",
            f"--window-size={window[0]},{window[1]}",
            f"--screenshot={screenshot}",
            "--dump-dom",
            url,
        ],
        timeout_s,
    )
    if not dom or not screenshot.is_file() or screenshot.stat().st_size == 0:
        # It exits 0 even when the page did not load; its log says why.
        lines = [line for line in log.splitlines() if "dbus" not in line.lower()]
        why = [line for line in lines if "page load failed" in line.lower()] or lines[-3:]
        raise RuntimeError(f"chromium rendered nothing from {url}: {' | '.join(why)[-1000:]}")
    return dom


@dataclass
class DashboardView:
    """What a test can check in the rendered DOM."""

    chart_points: dict[str, int] = field(default_factory=dict)
    text_by_id: dict[str, str] = field(default_factory=dict)
    miner_rows: int = 0
    score_rows: int = 0


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.view = DashboardView()
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of the elements we are inside
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        element_id = a.get("id")
        if element_id in CHART_IDS:
            self.view.chart_points[element_id] = int(a.get("data-points") or 0)
        if tag == "table":
            self._table = element_id
        if tag == "tr" and self._table == "miners-table" and "miner" in (a.get("class") or "").split():
            self.view.miner_rows += 1
        if tag == "tr" and self._table == "scores-table" and any(t == "tbody" for t, _ in self._open):
            self.view.score_rows += 1
        if tag not in _VOID:
            self._open.append((tag, element_id))

    def handle_endtag(self, tag: str) -> None:
        if any(t == tag for t, _ in self._open):
            while self._open and self._open.pop()[0] != tag:
                pass
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open:
            if element_id:
                self.view.text_by_id[element_id] = self.view.text_by_id.get(element_id, "") + data


def parse_dashboard(dom: str) -> DashboardView:
    parser = _Parser()
    parser.feed(dom)
    return parser.view


def check_dashboard(dom: str, *, scores: bool = False) -> DashboardView:
    """Assert the rendered dashboard shows data: both charts have points, the miners table has rows, the
    epoch is a number, and the page is connected (and, with `scores`, that validators' scores are shown)."""
    view = parse_dashboard(dom)
    for chart in CHART_IDS:
        assert view.chart_points.get(chart, 0) > 0, f"{chart} has no data: {view.chart_points}"
    assert view.miner_rows > 0, "the miners table is empty"
    epoch = view.text_by_id.get("epoch", "").strip()
    assert epoch.isdigit(), f"no epoch shown (got {epoch!r})"
    assert view.text_by_id.get("live", "").strip() == "live", f"not live: {view.text_by_id.get('live')!r}"
    if scores:
        assert view.score_rows > 0 and "no validator" not in view.text_by_id.get("scores-table", "")
    return view
