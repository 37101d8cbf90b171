"""Run every method on a tiny random model of each architecture and print what works.

    .venv/bin/python scripts/arch_matrix.py > matrix.md

Each model comes from a ``transformers`` config (tests/archs.py: 2 layers, d_model 64, 4
query heads), is saved with a word-level tokenizer and loaded by ``rl.load_model(folder)``.
A cell says which engine ran (``functional`` or ``hooks``) or, for a refusal, the start of
its reason. docs/models.md keeps the table this prints.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import reuse_lens as rl
from reuse_lens.nodes import edges_of, shape_of
from tests.archs import ARCHS, load_arch
from tests.conftest import task_texts
from tests.patching.helpers import random_task

COLUMNS = (
    "activation",
    "path → heads (qkv)",
    "EAP nodes",
    "EAP edges",
    "edge faithfulness",
    "bfloat16",
)


def _cell(run: Callable[[], str]) -> str:
    try:
        return run()
    except (NotImplementedError, ValueError, RuntimeError) as error:
        text = str(error).split(";")[0].split(". ")[0]
        return f"refused: {text[:70]}"


def _row(model: Any, task: rl.Task) -> list[str]:
    shape = shape_of(model)
    last = [f"a{shape.n_layers - 1}.h{h}" for h in range(shape.n_heads)]
    everything = rl.Circuit.from_edges([e.name for e in edges_of(shape)], shape)

    def activation() -> str:
        return str(rl.activation_patching(model, task).settings["engine"])

    def path() -> str:
        scores = rl.path_patching(model, task, receivers=last, receiver_input="qkv")
        return str(scores.settings["engine"])

    def eap_nodes() -> str:
        return str(rl.attribution_patching(model, task, method="eap").settings["engine"])

    def eap_edges() -> str:
        scores = rl.attribution_patching(model, task, method="eap-ig", level="edge", steps=2)
        return str(scores.settings["engine"])

    def edge_faithfulness() -> str:
        value = rl.faithfulness(model, task, everything, ablation="mean")
        return "ok" if abs(value - 1) < 1e-3 else f"wrong: {value:.3f}"

    def half() -> str:
        rl.activation_patching(rl.load_model(model, dtype="bfloat16"), task)
        return "ok"

    return [_cell(f) for f in (activation, path, eap_nodes, eap_edges, edge_faithfulness, half)]


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from reuse_lens.zoo.tokenizer import tokenizer_from_texts

    tokenizer = tokenizer_from_texts(task_texts(20))
    print("| architecture | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARCHS:
            try:
                model = load_arch(name, Path(tmp), tokenizer)
                task = random_task(model, n=3, lengths=[6, 5, 6], seed=0)
                cells = _row(model, task)
            except (NotImplementedError, ValueError, rl.ModelLoadError) as error:
                cells = [f"refused: {str(error)[:70]}"] + [""] * (len(COLUMNS) - 1)
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
