"""Running the notebooks: a kernel of this interpreter, and what their outputs came from.

Shared by tests/test_notebooks.py and scripts/run_notebooks.py, which executes the
notebooks and saves them with their outputs.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ipykernel.kernelspec import RESOURCES, get_kernel_dict
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets import default

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_circuit_reuse.ipynb", "03_fine_tuned_models.ipynb"]
CELL_TIMEOUT = 300
PLOTLY_MIME = "application/vnd.plotly.v1+json"
# The kernel's environment: one thread (the machine's cores are shared), no hub, and
# figures as plotly's JSON alone (scripts/run_notebooks.py turns them into PNG images).
ENVIRONMENT = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PLOTLY_RENDERER": "plotly_mimetype"}


class ThisPython(KernelSpecManager):
    """Every kernel name resolves to ipykernel on ``sys.executable``.

    A user-level ``python3`` kernelspec may point at another interpreter that lacks
    reuse_lens (or has another copy of it); the notebooks must run the one being tested.
    """

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        del kernel_name
        return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())


class ThisPythonKernel(AsyncKernelManager):
    """nbclient's kernel manager, reading kernelspecs from ``ThisPython``.

    Passed as ``kernel_manager_class`` (not as ``km=``) so that nbclient owns the
    manager and shuts the kernel and its sockets down when the notebook ends.
    """

    @default("kernel_spec_manager")
    def _this_python(self) -> KernelSpecManager:
        return ThisPython(data_dir=self.data_dir)


def provenance(nb: Any) -> dict[str, str]:
    """What a notebook's outputs come from: its code cells and the zoo's weights."""
    import reuse_lens as rl

    code = "\n\0".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    zoo = json.dumps(rl.zoo.manifest(), sort_keys=True)
    return {
        "code_sha256": hashlib.sha256(code.encode()).hexdigest(),
        "zoo_sha256": hashlib.sha256(zoo.encode()).hexdigest(),
    }


_NUMBER = re.compile(r"[-−+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def stable_outputs(cell: Any) -> list[str]:
    """A code cell's outputs with what may change between machines taken out: numbers
    (float rounding differs with the CPU), how a figure is stored (plotly's JSON when
    run, a PNG image once saved), stderr (progress bars, which are not saved) and where a
    stream was cut into pieces."""
    out = []
    for output in cell.outputs:
        data = output.get("data", {})
        if output.output_type == "stream" and output.name == "stderr":
            continue
        if PLOTLY_MIME in data or "image/png" in data:
            out.append("figure")
        elif output.output_type == "stream":
            text = _NUMBER.sub("#", output.text)
            if out and out[-1].startswith(f"{output.name}: "):  # a stream comes in pieces
                out[-1] += text
            else:
                out.append(f"{output.name}: {text}")
        elif output.output_type == "error":
            out.append(f"error: {output.ename}")
        else:
            out.append(f"{output.output_type}: {_NUMBER.sub('#', data.get('text/plain', ''))}")
    return out
