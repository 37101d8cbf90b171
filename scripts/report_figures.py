"""Save figures of an HTML report as PNG files, for the docs.

    .venv/bin/python scripts/report_figures.py demo_out/report.html docs/figures \
        overlap_grid jaccard_matrix faithfulness_matrix circuit_diagram

Each name is a ``data-figure`` of the report (the plot function that drew it); the first
figure of each name is saved as ``NAME.png`` (``NAME-2.png`` ... with ``--all``). It
drives Debian's Chromium through playwright, as the browser test does, so it needs
``/usr/bin/chromium`` (``make test-browser`` installs it).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("names", nargs="+", help="data-figure names to save")
    parser.add_argument("--all", action="store_true", help="every figure of each name")
    args = parser.parse_args()
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        parser.error("no chromium on PATH: install Debian's chromium (make test-browser does)")
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(args.report.resolve().as_uri())
        for name in args.names:
            figures = page.locator(f'div[data-figure="{name}"]')
            if figures.count() == 0:
                parser.error(f"the report has no figure {name!r}")
            for i in range(figures.count() if args.all else 1):
                figure = figures.nth(i)
                figure.locator(".main-svg").first.wait_for()
                figure.scroll_into_view_if_needed()
                path = args.out / (f"{name}.png" if i == 0 else f"{name}-{i + 1}.png")
                figure.screenshot(path=str(path))
                print(path)
        browser.close()


if __name__ == "__main__":
    main()
