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


# Every table and figure inside the page's column: nothing wider than the viewport, and
# no table wider than the box that holds it (a table that needs a scroll bar hides the
# columns its caption talks about). Returns what overflows.
OVERFLOWING = """() => {
  const out = [];
  const page = document.documentElement;
  if (page.scrollWidth > window.innerWidth) out.push(`page ${page.scrollWidth}px`);
  document.querySelectorAll('div.table > table').forEach((t, i) => {
    const box = t.parentElement.getBoundingClientRect().width;
    const width = t.getBoundingClientRect().width;
    if (width > box + 1) out.push(`table ${i}: ${Math.round(width)}px in ${Math.round(box)}px`);
  });
  return out;
}"""

OPEN_ALL = "() => document.querySelectorAll('details').forEach(d => { d.open = true; })"

WIDTH = 1400  # the width: a laptop's browser window


def wide_study() -> Any:
    """fake_study with the seven built-in tasks: 21 pairs, the widest tables a study has."""
    import pandas as pd

    from reuse_lens.circuits import Circuit
    from reuse_lens.compare.overlap import compare
    from tests.test_report import SHAPE, scores

    names = ["ioi", "colored_objects", "entity_tracking", "greater_than", "induction", "sva",
             "gendered_pronoun"]  # fmt: skip
    nodes = [n.name for n in SHAPE.nodes()]
    circuits = {
        name: Circuit.from_nodes(
            nodes[i % 3 : i % 3 + 4],
            SHAPE,
            node_scores=scores(0.1 * i).as_dict(),
            metadata={"task": name},
        )
        for i, name in enumerate(names)
    }
    study = fake_study()
    study.config.tasks = tuple(names)
    study.task_overlap = compare(circuits).with_stability({n: 0.8 for n in names})
    rows = []
    for name in names:
        rows.append({"model": "base", "task": name, "accuracy": 1.0, "logit_diff": 24.8,
                     "corrupted_accuracy": 0.0, "corrupted_logit_diff": -0.951,
                     "clean_metric": 24.8, "corrupted_metric": -0.951, "gap": 25.7,
                     "gap_low": 25.1, "gap_high": 26.3, "effect": 6.2, "does_task": True})  # fmt: skip
    study.evaluations = pd.DataFrame(rows)
    return study


def test_report_renders_every_figure_without_errors(tmp_path: Path) -> None:
    sync_playwright = sync_playwright_or_skip()
    chromium = chromium_or_skip()
    path = report.write(tmp_path / "report.html", fake_study())
    wide = report.write(tmp_path / "wide.html", wide_study())
    problems: list[str] = []
    requests: list[str] = []
    shot = tmp_path / "report.png"
    shots = {"wide-top.png": 0, "wide-tables.png": None}
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": WIDTH, "height": 900},
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
            # Figures in folded parts are drawn when the reader opens them.
            page.evaluate(OPEN_ALL)
            page.wait_for_function(ALL_DRAWN, timeout=60_000)
            drawn = page.evaluate(
                "() => [...document.querySelectorAll('div[data-figure]')]"
                ".filter(d => d.querySelector('.js-plotly-plot .main-svg'))"
                ".map(d => d.dataset.figure)"
            )
            overflowing = page.evaluate(OVERFLOWING)
            page.screenshot(path=str(shot), full_page=True)
            page.goto(wide.as_uri(), wait_until="load")
            page.evaluate(OPEN_ALL)
            page.wait_for_function(ALL_DRAWN, timeout=60_000)
            overflowing += [f"wide {o}" for o in page.evaluate(OVERFLOWING)]
            page.screenshot(path=str(tmp_path / "wide-top.png"))
            top = page.evaluate(
                "() => document.getElementById('task-overlap').getBoundingClientRect().top"
                " + window.scrollY"
            )
            page.screenshot(
                path=str(tmp_path / "wide-tables.png"),
                clip={"x": 0, "y": top, "width": WIDTH, "height": 2400},
                full_page=True,
            )
        finally:
            context.close()
    if target := os.environ.get("REUSE_LENS_SCREENSHOT_DIR"):
        Path(target).mkdir(parents=True, exist_ok=True)
        for name in (shot.name, *shots):
            shutil.copy(tmp_path / name, Path(target) / name)
    assert problems == []
    assert overflowing == []  # every table fits the page at 1,400 px
    assert {url for url in requests if not url.startswith("file://")} == set()  # offline
    assert len(drawn) == sum(EXPECTED_FIGURES.values())
    assert {name: drawn.count(name) for name in set(drawn)} == EXPECTED_FIGURES
    assert shot.stat().st_size > 10_000  # a real picture, not an empty page
    for name in shots:
        assert (tmp_path / name).stat().st_size > 10_000
