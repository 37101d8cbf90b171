"""Circuit discovery: every method finds exactly the planted circuit of the hand-built model."""

from __future__ import annotations

import json
from typing import Any

import pytest

import reuse_lens as rl
from reuse_lens.circuits.discovery import discover_circuit
from tests.conftest import native_config
from tests.patching.handbuilt import DECOYS, PLANTED, build_model, build_task
from tests.patching.helpers import random_task

PLANTED_EDGES = {
    ("input", "a0.h0<v>"),
    ("a0.h0", "m0"),
    ("m0", "a1.h0<v>"),
    ("a1.h0", "logits"),
}


@pytest.fixture(scope="module")
def handbuilt() -> tuple[Any, rl.Task]:
    model = build_model()
    return model, build_task(model)


def _precision_recall(found: frozenset[str], planted: set[str]) -> tuple[float, float]:
    hits = len(found & planted)
    return hits / max(len(found), 1), hits / len(planted)


@pytest.mark.parametrize("method", ["activation", "path", "eap", "eap-ig"])
def test_every_method_finds_exactly_the_planted_nodes(
    handbuilt: tuple[Any, rl.Task], method: str
) -> None:
    model, task = handbuilt
    circuit = discover_circuit(model, task, method=method)  # type: ignore[arg-type]
    assert _precision_recall(circuit.nodes, set(PLANTED)) == (1.0, 1.0)
    assert not circuit.nodes & set(DECOYS)
    assert circuit.metadata["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    assert circuit.metadata["method"] == method
    assert circuit.metadata["task"] == "handbuilt"
    assert circuit.metadata["library_version"] == rl.__version__
    # MIB's cfg gets the model's width, not a placeholder
    assert circuit.metadata["d_model"] == model.cfg.d_model
    assert json.loads(circuit.to_mib_json())["cfg"]["d_model"] == model.cfg.d_model


@pytest.mark.parametrize("ablation", ["mean", "resample", "zero"])
def test_activation_discovery_is_exact_under_every_ablation(
    handbuilt: tuple[Any, rl.Task], ablation: str
) -> None:
    model, task = handbuilt
    circuit = discover_circuit(model, task, ablation=ablation)  # type: ignore[arg-type]
    assert circuit.nodes == frozenset(PLANTED)


def test_path_search_records_stages_and_the_inputs_it_went_through(
    handbuilt: tuple[Any, rl.Task],
) -> None:
    model, task = handbuilt
    circuit = discover_circuit(model, task, method="path")
    # a1.h0 writes the answer; a0.h0 and m0 reach it through its value input (a0.h0
    # through m0, which path patching does not freeze).
    assert dict(circuit.stages) == {"a1.h0": 0, "a0.h0": 1, "m0": 1}
    assert circuit.edges == {("a1.h0", "logits"), ("a0.h0", "a1.h0<v>"), ("m0", "a1.h0<v>")}
    assert circuit.metadata["level"] == "node"


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_edge_circuits_are_exactly_the_planted_edges(
    handbuilt: tuple[Any, rl.Task], method: str
) -> None:
    model, task = handbuilt
    auto = discover_circuit(model, task, method=method, level="edge")  # type: ignore[arg-type]
    assert auto.edges == PLANTED_EDGES
    assert auto.nodes == frozenset(PLANTED)
    assert auto.metadata["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    greedy = discover_circuit(
        model,
        task,
        method=method,
        level="edge",
        selection="greedy",
        top_k=4,  # type: ignore[arg-type]
    )
    assert greedy.edges == PLANTED_EDGES


def test_top_k_and_threshold_rules(handbuilt: tuple[Any, rl.Task]) -> None:
    model, task = handbuilt
    top = discover_circuit(model, task, top_k=2)
    assert len(top) == 2 and top.nodes <= set(PLANTED)
    assert top.metadata["settings"]["rule"] == "top_k"
    # Resampling a planted node makes the run the corrupted one: an effect of the whole
    # clean - corrupted gap (normalised -1); decoys do nothing.
    strict = discover_circuit(model, task, ablation="resample", threshold=0.99)
    assert strict.nodes == frozenset(PLANTED)
    assert discover_circuit(model, task, ablation="resample", threshold=1.01).nodes == frozenset()


def test_discovery_is_deterministic() -> None:
    model = rl.load_model("zoo:base")
    task = rl.tasks.load("ioi", model, n=16, seed=3)
    first = discover_circuit(model, task, method="eap-ig")
    again = discover_circuit(model, rl.tasks.load("ioi", model, n=16, seed=3), method="eap-ig")
    assert first == again


def test_a_task_the_model_only_guesses_at_is_refused() -> None:
    """A random model's logit differences on random prompts are noise: no circuit."""
    model = rl.load_model(native_config())
    task = random_task(model, n=8, seed=5)
    gaps = rl.evaluate(model, task)
    assert abs(gaps["clean_metric"] - gaps["corrupted_metric"]) > 1e-3  # not exactly equal
    with pytest.raises(rl.tasks.MetricError, match="interval does not exclude 0 .accuracy 0.00"):
        discover_circuit(model, task)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "acdc"}, "unknown method"),
        ({"level": "graph"}, "unknown level"),
        ({"method": "activation", "level": "edge"}, "edge circuits come from"),
        ({"threshold": 0.1, "top_k": 3}, "not both"),
        ({"top_k": 0}, "positive integer"),
        ({"threshold": -1.0}, "non-negative"),
        ({"target_faithfulness": 1.5}, r"\(0, 1\]"),
        ({"target_faithfulness": 0.8, "top_k": 2}, "drop threshold/top_k"),
        ({"selection": "greedy", "top_k": 3}, "level='edge'"),
        ({"ablation": "noise"}, "unknown ablation"),
    ],
)
def test_bad_options_are_named(
    handbuilt: tuple[Any, rl.Task], kwargs: dict[str, Any], message: str
) -> None:
    model, task = handbuilt
    with pytest.raises(ValueError, match=message):
        discover_circuit(model, task, **kwargs)


def test_a_task_whose_corruption_changes_nothing_is_refused(
    handbuilt: tuple[Any, rl.Task],
) -> None:
    model, _ = handbuilt
    same = random_task(model, n=2, width=4, same=True)
    with pytest.raises(rl.tasks.MetricError):
        discover_circuit(model, same)


def test_an_empty_task_cannot_be_built(handbuilt: tuple[Any, rl.Task]) -> None:
    model, _ = handbuilt
    with pytest.raises(rl.tasks.TaskError, match="no prompts"):
        rl.Task.from_pairs(model, [], [], [], [])


def test_path_top_k_keeps_that_many_senders_per_stage(handbuilt: tuple[Any, rl.Task]) -> None:
    model, task = handbuilt
    circuit = discover_circuit(model, task, method="path", top_k=1)
    per_stage: dict[int, int] = {}
    for stage in circuit.stages.values():
        per_stage[stage] = per_stage.get(stage, 0) + 1
    assert per_stage[0] == 1 and circuit.stages["a1.h0"] == 0
    assert all(count == 1 for count in per_stage.values())
    assert circuit.level == "node"  # path edges are paths: ablated node by node
    with pytest.raises(ValueError, match="not target_faithfulness"):
        discover_circuit(model, task, method="path", target_faithfulness=0.9)


@pytest.mark.parametrize(
    ("clean", "corrupted", "ok"),
    [
        ([3.0, 2.0, 4.0, 3.5], [0.0, 0.5, -1.0, 0.2], True),
        ([0.1, -0.2, 0.15, 0.0], [0.0, 0.1, 0.1, 0.05], False),  # noise
        ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], False),  # the wrong answer wins every time
        ([1.0, 1.0], [0.0, 0.0], True),  # two prompts, both clearly apart
        ([1.0], [0.0], False),  # one prompt gives no interval
    ],
)
def test_check_separates(clean: list[float], corrupted: list[float], ok: bool) -> None:
    import torch

    from reuse_lens.circuits.discovery import check_separates

    a, b = torch.tensor(clean), torch.tensor(corrupted)
    if ok:
        assert check_separates(a, b, "t") == pytest.approx(float((a - b).mean()))
    else:
        with pytest.raises(rl.tasks.MetricError, match="cannot separate"):
            check_separates(a, b, "t")
