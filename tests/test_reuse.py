"""Functional reuse on the hand-built model, whose circuit is known exactly."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import reuse_lens as rl
from reuse_lens.compare.reuse import (
    circuit_stability,
    cross_model_faithfulness,
    cross_task_ablation,
    cross_task_faithfulness,
)
from tests.patching.handbuilt import DECOYS, PLANTED, build_model, build_task


@pytest.fixture(scope="module")
def handbuilt() -> tuple[Any, rl.Task]:
    model = build_model()
    return model, build_task(model, lengths=(5, 5, 4, 6, 5, 6))


def test_the_planted_circuit_is_perfectly_stable(handbuilt: tuple[Any, rl.Task]) -> None:
    model, task = handbuilt
    stability = circuit_stability(model, task, n_boot=4, seed=0)
    assert stability.mean_jaccard == 1.0 and stability.std_jaccard == 0.0
    assert len(stability.jaccards) == 6  # 4 choose 2
    assert all(c.nodes == frozenset(PLANTED) for c in stability.circuits)
    with pytest.raises(ValueError, match="n_boot"):
        circuit_stability(model, task, n_boot=1)


def test_cross_task_matrices(handbuilt: tuple[Any, rl.Task]) -> None:
    model, task = handbuilt
    shape = rl.nodes.shape_of(model)
    circuits = {
        "planted": rl.Circuit.from_nodes(PLANTED, shape),
        "decoys": rl.Circuit.from_nodes(DECOYS, shape),
    }
    tasks = {"short": task.select([0, 1, 2]), "long": task.select([3, 4, 5])}
    faith = cross_task_faithfulness(model, circuits, tasks)
    assert list(faith.index) == ["planted", "decoys"] and list(faith.columns) == ["short", "long"]
    torch.testing.assert_close(
        torch.tensor(faith.to_numpy(dtype=float)), torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64),
        atol=1e-5, rtol=0,
    )  # fmt: skip
    damage = cross_task_ablation(model, circuits, tasks)
    # Ablating the planted heads (m0 stays) removes the answer; the decoy heads do nothing.
    torch.testing.assert_close(
        torch.tensor(damage.to_numpy(dtype=float)), torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64),
        atol=1e-5, rtol=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="kind"):
        cross_task_ablation(model, circuits, tasks, kind="edges")  # type: ignore[arg-type]


def test_cross_model_faithfulness_in_a_modified_copy(handbuilt: tuple[Any, rl.Task]) -> None:
    model, task = handbuilt
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if name.endswith("head._original_component.weight"):
                param.mul_(2.0)  # a "fine-tune" that sharpens the answer
    shape = rl.nodes.shape_of(model)
    circuit = rl.Circuit.from_nodes(PLANTED, shape)
    table = cross_model_faithfulness(
        {"handbuilt": circuit}, {"base": model, "tuned": tuned}, {"handbuilt": task}
    )
    assert table.loc["handbuilt", "base"] == pytest.approx(1.0, abs=1e-5)
    assert table.loc["handbuilt", "tuned"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="no task given"):
        cross_model_faithfulness({"x": circuit}, {"base": model}, {})
