"""Faithfulness: the ablation engines against each other and against the patching methods."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import reuse_lens as rl
from reuse_lens.circuits.circuit import Circuit, CircuitError
from reuse_lens.circuits.measure import (
    CircuitEvaluator,
    _area,
    faithfulness,
    faithfulness_curve,
    node_mask,
    random_baseline,
)
from reuse_lens.nodes import ModelShape, edges_of, nodes_of, shape_of
from reuse_lens.patching.ablation import AblationRunner, NodeMask
from reuse_lens.patching.graph import GraphIndex
from tests.conftest import native_config
from tests.patching.helpers import random_task

ATOL = 1e-4
ABLATIONS = ("mean", "resample", "zero")


@pytest.fixture(scope="module")
def model() -> Any:
    return rl.load_model(native_config(n_layers=3))


@pytest.fixture(scope="module")
def task(model: Any) -> rl.Task:
    return random_task(model, n=4, lengths=[6, 5, 6, 4], seed=1)


def _random_masks(shape: ModelShape, count: int, seed: int) -> list[NodeMask]:
    gen = torch.Generator().manual_seed(seed)
    return [
        NodeMask(
            torch.rand(shape.n_layers, shape.n_heads, generator=gen) < 0.5,
            torch.rand(shape.n_layers, generator=gen) < 0.5,
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_node_engine_equals_the_hook_engine(model: Any, task: rl.Task, ablation: str) -> None:
    fast = AblationRunner(model, task, ablation=ablation)  # type: ignore[arg-type]
    slow = AblationRunner(model, task, ablation=ablation, engine="hooks")  # type: ignore[arg-type]
    assert fast.engine == "functional" and slow.engine == "hooks"
    masks = _random_masks(shape_of(model), 5, seed=0)
    torch.testing.assert_close(fast.nodes(masks), slow.nodes(masks), atol=ATOL, rtol=0)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablating_one_node_equals_its_activation_patching_effect(
    model: Any, task: rl.Task, ablation: str
) -> None:
    """Keeping every node but one is noising that node: activation patching's effect."""
    runner = AblationRunner(model, task, ablation=ablation)  # type: ignore[arg-type]
    scores = rl.activation_patching(model, task, ablation=ablation)  # type: ignore[arg-type]
    shape = shape_of(model)
    masks = []
    for node in nodes_of(model):
        mask = NodeMask.full(shape)
        if isinstance(node, rl.AttentionHead):
            mask.heads[node.layer, node.head] = False
        else:
            assert mask.mlps is not None
            mask.mlps[node.layer] = False
        masks.append(mask)
    effects = runner.nodes(masks) - runner.full
    expected = torch.tensor([scores[n] for n in nodes_of(model)])
    torch.testing.assert_close(effects, expected, atol=ATOL, rtol=0)


def _edge_mask_keeping_nodes(shape: ModelShape, keep: NodeMask) -> torch.Tensor:
    """The edge mask that drops every edge out of an ablated node, and nothing else."""
    index = GraphIndex(shape)
    mask = torch.ones(index.n_senders, index.n_receivers, dtype=torch.bool)
    for layer in range(shape.n_layers):
        for head in range(shape.n_heads):
            if not keep.heads[layer, head]:
                mask[index.sender[f"a{layer}.h{head}"]] = False
        if keep.mlps is not None and not keep.mlps[layer]:
            mask[index.sender[f"m{layer}"]] = False
    return mask


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_edge_engine_ablating_all_out_edges_equals_node_ablation(
    model: Any, task: rl.Task, ablation: str
) -> None:
    runner = AblationRunner(model, task, ablation=ablation)  # type: ignore[arg-type]
    shape = shape_of(model)
    for mask in _random_masks(shape, 3, seed=2):
        by_nodes = float(runner.nodes(mask)[0])
        by_edges = runner.edges(_edge_mask_keeping_nodes(shape, mask))
        assert by_edges == pytest.approx(by_nodes, abs=ATOL)


def test_edge_engine_extremes(model: Any, task: rl.Task) -> None:
    runner = AblationRunner(model, task, ablation="resample")
    index = GraphIndex(shape_of(model))
    everything = torch.ones(index.n_senders, index.n_receivers, dtype=torch.bool)
    assert runner.edges(everything) == pytest.approx(runner.full, abs=ATOL)
    # Every edge ablated with resampling: every receiver sees the corrupted run.
    corrupted = float(runner.prep.corrupted_metric.mean())
    assert runner.edges(~everything) == pytest.approx(corrupted, abs=ATOL)


@pytest.mark.parametrize(
    ("sender", "receiver", "receiver_input"),
    [("a0.h1", "logits", None), ("m1", "logits", None), ("a0.h2", "a2.h0", "q"),
     ("m0", "a1.h3", "k"), ("a1.h0", "a2.h1", "v")],
)  # fmt: skip
def test_dropping_one_edge_equals_path_patching_with_frozen_mlps(
    model: Any, task: rl.Task, sender: str, receiver: str, receiver_input: str | None
) -> None:
    """One resampled edge is path patching through that one receiver input, MLPs frozen."""
    runner = AblationRunner(model, task, ablation="resample")
    index = GraphIndex(shape_of(model))
    keep = torch.ones(index.n_senders, index.n_receivers, dtype=torch.bool)
    column = receiver if receiver_input is None else f"{receiver}<{receiver_input}>"
    keep[index.sender[sender], index.receiver[column]] = False
    effect = runner.edges(keep) - runner.full
    if receiver_input is None:
        scores = rl.path_patching(model, task, senders=[sender], freeze_mlps=True)
    else:
        scores = rl.path_patching(
            model,
            task,
            senders=[sender],
            receivers=[receiver],
            receiver_input=receiver_input,
            freeze_mlps=True,
        )
    assert effect == pytest.approx(scores[sender], abs=ATOL)


def test_faithfulness_is_one_for_everything_and_zero_for_nothing(model: Any, task: rl.Task) -> None:
    shape = shape_of(model)
    everything = Circuit.from_nodes([n.name for n in shape.nodes()], shape)
    assert faithfulness(model, task, everything, check_task=False) == pytest.approx(1.0, abs=1e-5)
    assert faithfulness(
        model, task, Circuit.from_nodes([], shape), check_task=False
    ) == pytest.approx(0.0, abs=1e-5)
    all_edges = Circuit.from_edges([e.name for e in edges_of(shape)], shape)
    assert faithfulness(
        model, task, all_edges, ablation="resample", check_task=False
    ) == pytest.approx(1.0, abs=1e-5)
    # An edge circuit can be ablated as the node circuit of its nodes.
    assert faithfulness(model, task, all_edges, level="node", check_task=False) == pytest.approx(
        1.0, abs=1e-5
    )


def test_faithfulness_matches_its_formula(model: Any, task: rl.Task) -> None:
    shape = shape_of(model)
    evaluator = CircuitEvaluator(model, task, ablation="mean")
    circuit = Circuit.from_nodes(["a0.h1", "m1", "a2.h3"], shape)
    m_c = float(evaluator.runner.nodes(evaluator.node_mask(circuit.nodes))[0])
    m_empty = float(evaluator.runner.nodes(NodeMask.full(shape, keep=False))[0])
    expected = (m_c - m_empty) / (evaluator.full - m_empty)
    assert faithfulness(model, task, circuit, check_task=False) == pytest.approx(expected, abs=1e-6)


def test_faithfulness_refuses_a_circuit_of_another_model(model: Any, task: rl.Task) -> None:
    bigger = Circuit.from_nodes(["a5.h0"], ModelShape(6, 4, True))
    with pytest.raises(CircuitError, match="a5.h0"):
        faithfulness(model, task, bigger, check_task=False)


def test_faithfulness_refuses_a_metric_that_cannot_separate(model: Any) -> None:
    same = random_task(model, n=3, same=True)
    circuit = Circuit.from_nodes(["a0.h0"], shape_of(model))
    with pytest.raises(rl.tasks.MetricError, match="cannot separate"):
        faithfulness(model, same, circuit, ablation="resample", check_task=False)


def test_unknown_ablation_is_refused(model: Any, task: rl.Task) -> None:
    with pytest.raises(ValueError, match="unknown ablation"):
        faithfulness(model, task, Circuit.from_nodes([], shape_of(model)), ablation="noise")  # type: ignore[arg-type]


def test_area_is_the_trapezoid_mean() -> None:
    assert _area([0.0, 1.0], [0.0, 1.0]) == pytest.approx(0.5)
    assert _area([0.0, 0.5, 1.0], [1.0, 1.0, 0.0]) == pytest.approx(0.75)
    assert _area([0.2, 0.6], [0.5, 0.5]) == pytest.approx(0.5)


def test_faithfulness_curve_on_node_scores(model: Any, task: rl.Task) -> None:
    scores = rl.activation_patching(model, task, ablation="mean")
    curve = faithfulness_curve(model, task, scores, fractions=(0.1, 0.5, 1.0))
    n_nodes = len(nodes_of(model))
    assert curve.sizes == (max(1, round(0.1 * n_nodes)), round(0.5 * n_nodes), n_nodes)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    assert curve.level == "node" and curve.method == "activation"
    f = curve.faithfulness
    assert curve.cpr == pytest.approx(((f[0] + f[1]) * 0.4 / 2 + (f[1] + f[2]) * 0.5 / 2) / 0.9)
    cmd_terms = [abs(1 - v) for v in f]
    expected_cmd = (
        (cmd_terms[0] + cmd_terms[1]) * 0.4 / 2 + (cmd_terms[1] + cmd_terms[2]) * 0.25
    ) / 0.9
    assert curve.cmd == pytest.approx(expected_cmd)


def test_faithfulness_curve_on_edge_scores(model: Any, task: rl.Task) -> None:
    scores = rl.attribution_patching(model, task, method="eap", level="edge")
    curve = faithfulness_curve(model, task, scores, ablation="resample", fractions=(0.05, 1.0))
    assert curve.level == "edge"
    assert curve.sizes[-1] == len(edges_of(model))
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)


def test_random_baseline_is_seeded_and_sized(model: Any, task: rl.Task) -> None:
    shape = shape_of(model)
    circuit = Circuit.from_nodes(["a0.h1", "a1.h2", "m0"], shape)
    first = random_baseline(model, task, circuit, n=6, seed=3)
    again = random_baseline(model, task, circuit, n=6, seed=3)
    other = random_baseline(model, task, circuit, n=6, seed=4)
    assert first == again
    assert first.values != other.values
    assert first.size == 3 and len(first.values) == 6
    assert first.mean == pytest.approx(sum(first.values) / 6)
    edges = Circuit.from_edges(["a0.h1->logits", "input->a1.h0<q>"], shape)
    edge_baseline = random_baseline(model, task, edges, n=3, seed=0, ablation="resample")
    assert edge_baseline.size == 2


@pytest.fixture(scope="module")
def rotary() -> Any:
    """A model outside the fast forward (rotary positions, RMSNorm): hooks do the work."""
    return rl.load_model(
        native_config(positional_embedding_type="rotary", rotary_dim=8, normalization_type="RMS")
    )


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_hook_engine_on_an_unsupported_model_matches_activation_patching(
    rotary: Any, ablation: str
) -> None:
    task = random_task(rotary, n=3, lengths=[6, 5, 6], seed=4)
    runner = AblationRunner(rotary, task, ablation=ablation)  # type: ignore[arg-type]
    assert runner.engine == "hooks"
    scores = rl.activation_patching(rotary, task, ablation=ablation)  # type: ignore[arg-type]
    shape = shape_of(rotary)
    for node in ("a0.h2", "m1", "a1.h3"):
        keep = node_mask(shape, {n.name for n in shape.nodes()} - {node})
        effect = float(runner.nodes(keep)[0]) - runner.full
        assert effect == pytest.approx(scores[node], abs=ATOL)


def test_edge_circuits_on_an_unsupported_model_are_refused_clearly(rotary: Any) -> None:
    task = random_task(rotary, n=2, seed=1)
    circuit = Circuit.from_edges(["a0.h1->logits"], shape_of(rotary))
    with pytest.raises(NotImplementedError, match="node circuit"):
        faithfulness(rotary, task, circuit, ablation="resample", check_task=False)
    assert (
        -10
        < faithfulness(rotary, task, circuit, ablation="resample", level="node", check_task=False)
        < 10
    )


# --- what the input sender is: MIB's (token embedding) or ours (token + position) ----------


@torch.no_grad()
def _bridge_metric_with_input_replaced(
    model: Any, runner: AblationRunner, hook: str, ablation: str
) -> float:
    """The metric with ``hook`` (the input sender's output) replaced by its ablated value,
    computed by the bridge's own hooks: the reference for ablating every input edge."""
    prep = runner.prep
    _, clean_cache = model.run_with_cache(prep.clean, names_filter=lambda n: n == hook)
    _, corrupted_cache = model.run_with_cache(prep.corrupted, names_filter=lambda n: n == hook)
    clean = clean_cache[hook]
    if ablation == "resample":
        source = corrupted_cache[hook]
    elif ablation == "zero":
        source = torch.zeros_like(clean)
    else:  # the mean over the prompts with a real token at each position
        width = clean.shape[1]
        valid = (torch.arange(width) < (prep.answer_pos + 1).unsqueeze(1)).float()
        mean = (clean * valid.unsqueeze(-1)).sum(0) / valid.sum(0).clamp(min=1).unsqueeze(-1)
        source = mean.expand_as(clean)
    logits = model.run_with_hooks(
        prep.clean, fwd_hooks=[(hook, lambda act, hook: source)], return_type="logits"
    )
    rows = torch.arange(prep.n)
    return float(prep.score(logits[rows, prep.answer_pos], rows).mean())


@pytest.mark.parametrize("ablation", ABLATIONS)
@pytest.mark.parametrize(
    ("input_node", "hook"), [("embeddings", "blocks.0.hook_resid_pre"), ("tokens", "hook_embed")]
)
def test_input_node_ablates_the_embedding_it_names(
    model: Any, task: rl.Task, ablation: str, input_node: str, hook: str
) -> None:
    """Dropping every edge out of ``input`` equals replacing that hook's output: the token
    plus position embedding by default, the token embedding alone (EAP-IG's and MIB's
    ``input``, the position embedding kept clean) with input_node="tokens"."""
    runner = AblationRunner(model, task, ablation=ablation, input_node=input_node)  # type: ignore[arg-type]
    index = GraphIndex(shape_of(model))
    keep = torch.ones(index.n_senders, index.n_receivers, dtype=torch.bool)
    keep[index.sender["input"]] = False
    expected = _bridge_metric_with_input_replaced(model, runner, hook, ablation)
    assert runner.edges(keep) == pytest.approx(expected, abs=ATOL)


def test_input_node_changes_only_what_the_input_sender_is(model: Any, task: rl.Task) -> None:
    """The default is byte-identical to not passing the option; node circuits never ablate
    the input, so they do not depend on it; zero ablation of the input edges does."""
    shape = shape_of(model)
    dropped = {
        e for e in edges_of(shape) if e.sender.name == "input" and e.receiver.name.startswith("a2")
    }
    circuit = Circuit.from_edges([e for e in edges_of(shape) if e not in dropped], shape)
    default = faithfulness(model, task, circuit, ablation="zero", check_task=False)
    assert (
        faithfulness(
            model, task, circuit, ablation="zero", input_node="embeddings", check_task=False
        )
        == default
    )
    tokens = faithfulness(
        model, task, circuit, ablation="zero", input_node="tokens", check_task=False
    )
    assert tokens != pytest.approx(default, abs=1e-6)
    nodes = Circuit.from_nodes(["a0.h1", "m1", "a2.h0"], shape)
    assert faithfulness(
        model, task, nodes, ablation="zero", input_node="tokens", check_task=False
    ) == (faithfulness(model, task, nodes, ablation="zero", check_task=False))
    with pytest.raises(ValueError, match="unknown input_node"):
        AblationRunner(model, task, input_node="token")  # type: ignore[arg-type]
