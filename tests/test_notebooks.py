"""The notebooks run top to bottom on the zoo, offline, without an error.

Notebooks only call the library (STYLE.md), so running them checks that the public API
they teach still works as written. Each one runs in a fresh kernel of *this* interpreter
(so the kernel imports the reuse_lens under test, whatever kernelspecs the machine has),
from an empty folder, with one thread and no hub.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

from ipykernel.kernelspec import RESOURCES, get_kernel_dict  # noqa: E402
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from traitlets import default  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_circuit_reuse.ipynb", "03_fine_tuned_models.ipynb"]
CELL_TIMEOUT = 300


class _ThisPython(KernelSpecManager):
    """Every kernel name resolves to ipykernel on ``sys.executable``.

    A user-level ``python3`` kernelspec may point at another interpreter that lacks
    reuse_lens (or has another copy of it); the test must run the one being tested.
    """

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        del kernel_name
        return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())


class _ThisPythonKernel(AsyncKernelManager):
    """nbclient's kernel manager, reading kernelspecs from ``_ThisPython``.

    Passed as ``kernel_manager_class`` (not as ``km=``) so that nbclient owns the
    manager and shuts the kernel and its sockets down when the notebook ends.
    """

    @default("kernel_spec_manager")
    def _this_python(self) -> KernelSpecManager:
        return _ThisPython(data_dir=self.data_dir)


def test_the_kernel_runs_this_interpreter() -> None:
    spec = _ThisPythonKernel(kernel_name="python3").kernel_spec
    assert spec is not None
    assert spec.argv[0] == sys.executable
    assert spec.argv[1:3] == ["-m", "ipykernel_launcher"]


def test_every_notebook_is_tested_and_saved_without_outputs() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert code, f"{name} has no code cell"
        stale = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count]
        assert not stale, f"{name}: code cells {stale} were saved with outputs; clear them"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this environment: one thread (2 shared cores), no hub.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        kernel_manager_class=_ThisPythonKernel,
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
