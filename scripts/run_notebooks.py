"""Run the notebooks and save them with their outputs, for readers on a web page.

    .venv/bin/python scripts/run_notebooks.py [NAME.ipynb ...]      (make notebooks)

Each notebook runs top to bottom in a fresh kernel of this interpreter, offline, on one
thread and from an empty folder, as tests/test_notebooks.py runs it. Plotly figures are
drawn to PNG images in Chromium (Debian's, which ``make test-browser`` installs), so a
page that runs no script (GitHub's) shows them; their JSON is dropped to keep the files
small, and so are stderr's progress bars. The notebook's metadata records what the
outputs came from (its code cells and the zoo), which tests/test_notebooks.py checks.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nbclient
import nbformat

from tests.notebooks import (
    CELL_TIMEOUT,
    ENVIRONMENT,
    NAMES,
    NOTEBOOKS,
    PLOTLY_MIME,
    ThisPythonKernel,
    provenance,
)

_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

# Draw one figure off-screen and return it as a PNG data URL.
_TO_PNG = """async ([figure, width, height]) => {
  const div = document.createElement('div');
  document.body.appendChild(div);
  await Plotly.newPlot(div, figure.data, figure.layout || {});
  const url = await Plotly.toImage(div, {format: 'png', width: width, height: height});
  Plotly.purge(div);
  div.remove();
  return url;
}"""


def run(path: Path) -> Any:
    """The notebook at ``path`` executed in a fresh kernel, in an empty folder."""
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as folder:
        client = nbclient.NotebookClient(
            nb,
            kernel_name="python3",
            kernel_manager_class=ThisPythonKernel,
            timeout=CELL_TIMEOUT,
            resources={"metadata": {"path": folder}},
        )
        client.execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timestamps: a new diff on every run
        if cell.cell_type == "code":  # progress bars and their warnings, for a reader
            cell.outputs = [o for o in cell.outputs if not _is_stderr(o)]
    nb.metadata["reuse_lens"] = provenance(nb)
    return nb


def _is_stderr(output: Any) -> bool:
    return output.output_type == "stream" and output.name == "stderr"


def figures_to_png(nb: Any, page: Any) -> int:
    """Replace every plotly output by a PNG image of it; returns how many."""
    count = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIME not in data:
                continue
            figure = data[PLOTLY_MIME]
            layout = figure.get("layout", {})
            width, height = int(layout.get("width") or 900), int(layout.get("height") or 500)
            url = page.evaluate(_TO_PNG, [figure, width, height])
            png = url.split(",", 1)[1]
            base64.b64decode(png, validate=True)  # a real image, or fail here
            title = (layout.get("title") or {}).get("text") or "figure"
            output["data"] = {"image/png": png, "text/plain": f"<Figure: {title}>"}
            output.setdefault("metadata", {})
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("names", nargs="*", default=NAMES, help="notebooks (default: all)")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        parser.error("no chromium on PATH: install Debian's chromium (make test-browser does)")
    os.environ.update(ENVIRONMENT)  # the kernels inherit it
    from playwright.sync_api import sync_playwright
    from plotly.offline import get_plotlyjs

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=_ARGS)
        page = browser.new_page()
        page.set_content(
            f"<html><head><script>{get_plotlyjs()}</script></head><body></body></html>"
        )
        for name in args.names:
            path = NOTEBOOKS / name
            nb = run(path)
            n = figures_to_png(nb, page)
            nbformat.validate(nb)
            nbformat.write(nb, path)
            print(f"{name}: {sum(c.cell_type == 'code' for c in nb.cells)} cells run, {n} figures")
        browser.close()


if __name__ == "__main__":
    main()
