"""The report renders in a real browser: every figure drawn, no JavaScript error, offline.

Needs the ``playwright`` package and a system Chromium (Debian's ``chromium``); playwright's
own browser downloads are not used. Without them the test skips, unless
``REUSE_LENS_REQUIRE_BROWSER=1`` (``make test-browser``), where a missing browser fails.
``REUSE_LENS_CHROMIUM`` names another Chromium binary; ``REUSE_LENS_SCREENSHOT_DIR``
receives a copy of the full-page screenshot.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

from reuse_lens import report
from tests.test_report import EXPECTED_FIGURES, fake_study

REQUIRE = os.environ.get("REUSE_LENS_REQUIRE_BROWSER") == "1"

# A quiet, offline browser: no sandbox (containers run as root), no GPU, no background
# traffic to Google's update, sync or QUIC endpoints.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# True once every figure div holds a drawn plotly graph of non-zero size.
ALL_DRAWN = """() => {
  const divs = [...document.querySelectorAll('div[data-figure]')];
  return divs.length > 0 && divs.every(d => {
    const svg = d.querySelector('.js-plotly-plot .main-svg');
    return svg !== null && svg.getBoundingClientRect().width > 0
      && svg.getBoundingClientRect().height > 0;
  });
}"""


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail when the browser is required (CI's browser job must not skip)."""
    if REQUIRE:
        pytest.fail(f"REUSE_LENS_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def sync_playwright_or_skip() -> Callable[[], Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install playwright)")
    return sync_playwright


def chromium_or_skip() -> str:
    if named := os.environ.get("REUSE_LENS_CHROMIUM"):
        if not os.access(named, os.X_OK):
            unavailable(f"REUSE_LENS_CHROMIUM={named} is not an executable Chromium")
        return named
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        unavailable("no Chromium binary found (apt-get install chromium)")
    return found


def test_report_renders_every_figure_without_errors(tmp_path: Path) -> None:
    sync_playwright = sync_playwright_or_skip()
    chromium = chromium_or_skip()
    path = report.write(tmp_path / "report.html", fake_study())
    problems: list[str] = []
    requests: list[str] = []
    shot = tmp_path / "report.png"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on(
                "console",
                lambda msg: (
                    problems.append(f"console {msg.type}: {msg.text}")
                    if msg.type == "error"
                    else None
                ),
            )
            # An alert would mean a task name ran as script: record it and dismiss it.
            page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri(), wait_until="load")
            page.wait_for_function(ALL_DRAWN, timeout=60_000)
            drawn = page.evaluate(
                "() => [...document.querySelectorAll('div[data-figure]')]"
                ".filter(d => d.querySelector('.js-plotly-plot .main-svg'))"
                ".map(d => d.dataset.figure)"
            )
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    if target := os.environ.get("REUSE_LENS_SCREENSHOT_DIR"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)
    assert problems == []
    assert {url for url in requests if not url.startswith("file://")} == set()  # offline
    assert len(drawn) == sum(EXPECTED_FIGURES.values())
    assert {name: drawn.count(name) for name in set(drawn)} == EXPECTED_FIGURES
    assert shot.stat().st_size > 10_000  # a real picture, not an empty page
