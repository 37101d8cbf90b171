"""The notebooks run top to bottom on the zoo, offline, and their saved outputs are current.

Notebooks only call the library (STYLE.md), so running them checks that the public API
they teach still works as written. They are saved with their outputs, so that a reader
on a web page sees the results (``make notebooks`` runs and saves them); the outputs must
come from the notebook's code and the zoo as they are now, and a fresh run must print
the same words and draw the same figures (numbers aside, which depend on the CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

from tests.notebooks import (  # noqa: E402
    CELL_TIMEOUT,
    ENVIRONMENT,
    NAMES,
    NOTEBOOKS,
    ThisPythonKernel,
    provenance,
    stable_outputs,
)

RERUN = "run `make notebooks` (scripts/run_notebooks.py) and commit the notebooks"


def test_the_kernel_runs_this_interpreter() -> None:
    spec = ThisPythonKernel(kernel_name="python3").kernel_spec
    assert spec is not None
    assert spec.argv[0] == sys.executable
    assert spec.argv[1:3] == ["-m", "ipykernel_launcher"]


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_saved_with_current_outputs(name: str) -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cell"
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{name} was not run top to bottom: {RERUN}"
    assert sum(bool(cell.outputs) for cell in code) >= len(code) - 1, f"{name}: {RERUN}"
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{name} was saved with an error"
    figures = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert figures, f"{name}: figures are saved as PNG images, for pages that run no script"
    assert nb.metadata.get("reuse_lens") == provenance(nb), (
        f"{name}'s outputs come from other code cells or another zoo: {RERUN}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_prints_what_it_was_saved_with(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in ENVIRONMENT.items():  # the kernel inherits this environment
        monkeypatch.setenv(key, value)
    saved = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        kernel_manager_class=ThisPythonKernel,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working folder
    )
    client.execute()  # raises CellExecutionError naming the cell and the traceback
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    assert not list(tmp_path.iterdir()), "a notebook left files in its working folder"
    for index, (old, new) in enumerate(zip(saved.cells, nb.cells, strict=True)):
        if new.cell_type == "code":
            assert stable_outputs(new) == stable_outputs(old), f"{name}, cell {index}: {RERUN}"
