"""The automatic size rule: the same circuit as scanning every size, in a few batched passes.

Faithfulness need not grow with the circuit, so the tests build curves (and rankings of a
real model) that are not monotone, and compare the rule with the exhaustive scan. The
batched engine behind it shares blocks between circuits; it must give every circuit the
value it has alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Any

import pytest
import torch

import reuse_lens as rl
from reuse_lens.circuits.discovery import (
    _TOLERANCE,
    EDGE_SIZES_EXACT,
    _select,
    prefix_intervals,
    prefix_sizes,
    select_prefix,
)
from reuse_lens.circuits.measure import CircuitEvaluator, node_mask, ranked
from reuse_lens.nodes import edges_of, nodes_of, shape_of
from reuse_lens.patching.ablation import AblationRunner, NodeMask
from reuse_lens.patching.edges import EdgeScores
from reuse_lens.patching.graph import GraphIndex
from reuse_lens.patching.scores import NodeScores
from tests.archs import load_arch
from tests.conftest import native_config
from tests.patching.helpers import random_task

ATOL = 1e-4


def exhaustive(values: list[float], target: float, sizes: list[int] | None = None) -> int:
    """The reference: scan every size from the smallest, return the first that reaches."""
    sizes = sizes or list(range(1, len(values) + 1))
    return next((k for k in sizes if values[k - 1] >= target), sizes[-1])


class Curve:
    """A curve of values by size that records which sizes were asked for."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.asked: list[list[int]] = []

    def __call__(self, sizes: list[int]) -> list[float]:
        self.asked.append(list(sizes))
        return [self.values[k - 1] for k in sizes]


def _wiggly(rng: random.Random, n: int) -> list[float]:
    """A curve that rises on the whole but falls often, with isolated spikes."""
    values, level = [], 0.0
    for _ in range(n):
        level += rng.uniform(-0.15, 0.2)
        spike = rng.uniform(0.3, 0.8) if rng.random() < 0.05 else 0.0
        values.append(level + spike)
    values[-1] = 1.0  # everything kept
    return values


@pytest.mark.parametrize("seed", range(40))
def test_select_prefix_equals_the_exhaustive_scan_on_curves_that_are_not_monotone(
    seed: int,
) -> None:
    rng = random.Random(seed)
    n = rng.choice([1, 2, 7, 20, 64, 156, 300])
    values = _wiggly(rng, n)
    target = rng.choice([0.3, 0.5, 0.9, 1.0])
    first, most = rng.choice([1, 4, 8]), rng.choice([None, 1, 3, 16])
    grow = rng.choice([1, 2, 3])
    curve = Curve(values)
    got = select_prefix(n, curve, target, first=first, grow=grow, most=most)
    assert got == exhaustive(values, target)
    asked = [k for batch in curve.asked for k in batch]
    assert asked == list(range(1, len(asked) + 1))  # ascending, none skipped or repeated
    # Nothing past the batch that holds the answer.
    assert got in curve.asked[-1]
    if most is not None:
        assert all(len(batch) <= most for batch in curve.asked)


def test_select_prefix_finds_a_lone_size_that_bisection_would_miss() -> None:
    """Only size 3 reaches the target below n: bisection between a failing grid point and
    n would never look there."""
    values = [0.0, 0.1, 0.95, 0.2, 0.3] + [0.4] * 94 + [1.0]
    assert select_prefix(100, Curve(values), 0.9) == 3
    dip = [0.0] * 10 + [0.92] + [0.1] * 88 + [1.0]  # the curve rises again only at n
    assert select_prefix(100, Curve(dip), 0.9, most=8) == 11


def test_select_prefix_evaluates_little_past_the_answer() -> None:
    curve = Curve([0.0] * 9 + [1.0] * 4991)
    assert select_prefix(5000, curve, 0.9, first=4, most=64) == 10
    assert sum(map(len, curve.asked)) == 12  # batches of 4 and 8: sizes 1..12
    alike = Curve(curve.values)
    assert select_prefix(5000, alike, 0.9, first=4, grow=1) == 10
    assert [len(batch) for batch in alike.asked] == [4, 4, 4]  # sizes 1..12 again
    assert select_prefix(3, Curve([0.0, 0.0, 0.5]), 0.9) == 3  # none reaches: n


def test_select_prefix_on_a_grid_of_sizes() -> None:
    rng = random.Random(7)
    n = 2000
    values = _wiggly(rng, n)
    sizes = prefix_sizes(n, "edge")
    curve = Curve(values)
    got = select_prefix(n, curve, 0.9, sizes=sizes, most=32)
    assert got == exhaustive(values, 0.9, sizes)
    assert all(k in sizes for batch in curve.asked for k in batch)
    with pytest.raises(ValueError, match="end at n"):
        select_prefix(10, curve, 0.9, sizes=[1, 2, 5])
    with pytest.raises(ValueError, match="nothing to select"):
        select_prefix(0, curve, 0.9)


def test_prefix_sizes() -> None:
    assert prefix_sizes(156) == list(range(1, 157))  # nodes: every size
    assert prefix_sizes(20, "edge") == list(range(1, 21))
    sizes = prefix_sizes(32000, "edge")
    assert sizes[:EDGE_SIZES_EXACT] == list(range(1, EDGE_SIZES_EXACT + 1))
    assert sizes[-1] == 32000 and sizes == sorted(set(sizes))
    steps = [b / a for a, b in itertools.pairwise(sizes[EDGE_SIZES_EXACT - 1 : -1])]
    assert all(1.0 < r <= 1.05 + 1 / EDGE_SIZES_EXACT for r in steps)
    assert len(sizes) < 200  # thousands of edges, a few hundred sizes at most


# ---- the batched engine ---------------------------------------------------------------------


def _prefix_masks(model: Any, order: list[str]) -> list[NodeMask]:
    shape = shape_of(model)
    return [node_mask(shape, order[:k]) for k in range(len(order) + 1)]


@pytest.fixture(scope="module")
def model() -> Any:
    return rl.load_model(native_config(n_layers=3))


@pytest.fixture(scope="module")
def task(model: Any) -> rl.Task:
    return random_task(model, n=5, lengths=[6, 5, 6, 4, 6], seed=1)


@pytest.mark.parametrize("ablation", ["mean", "resample", "zero"])
def test_circuits_sharing_blocks_get_their_own_values(
    model: Any, task: rl.Task, ablation: str
) -> None:
    """Every prefix of a ranking, batched (blocks shared), equals each circuit alone and
    the hook engine's value."""
    order = [n.name for n in nodes_of(model)]
    random.Random(3).shuffle(order)
    masks = _prefix_masks(model, order)
    fast = AblationRunner(model, task, ablation=ablation)  # type: ignore[arg-type]
    slow = AblationRunner(model, task, ablation=ablation, engine="hooks")  # type: ignore[arg-type]
    together = fast.node_values(masks)
    alone = torch.cat([fast.node_values([m]) for m in masks])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    fast.sparse_nodes = False  # every head and MLP computed: the same values
    torch.testing.assert_close(fast.node_values(masks), together, atol=ATOL, rtol=0)
    fast.sparse_nodes = True
    torch.testing.assert_close(together, slow.node_values(masks), atol=ATOL, rtol=0)
    # Chunked one prompt per pass, and two circuits per pass: the same values.
    torch.testing.assert_close(
        AblationRunner(model, task, ablation=ablation, batch_size=3).node_values(masks),  # type: ignore[arg-type]
        together,
        atol=ATOL,
        rtol=0,
    )
    torch.testing.assert_close(
        AblationRunner(model, task, ablation=ablation, batch_size=10).node_values(masks),  # type: ignore[arg-type]
        together,
        atol=ATOL,
        rtol=0,
    )
    assert torch.equal(fast.nodes(masks), together.mean(1))


@pytest.mark.parametrize("name", ["gpt_neox", "gemma2", "llama_gqa", "qwen3", "gptj", "bloom"])
def test_batched_circuits_on_other_architectures(
    name: str, tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any
) -> None:
    """Parallel blocks, post-norms and grouped-query attention: node circuits sharing
    blocks, and edge circuits stacked, equal the same circuits one at a time."""
    arch = load_arch(name, tmp_path_factory.mktemp(name), word_tokenizer)
    shape = shape_of(arch)
    job = random_task(arch, n=3, width=6, seed=2)
    runner = AblationRunner(arch, job, ablation="mean")
    assert runner.engine == "functional"
    order = [n.name for n in nodes_of(arch)]
    random.Random(1).shuffle(order)
    masks = _prefix_masks(arch, order)
    together = runner.node_values(masks)
    alone = torch.cat([runner.node_values([m]) for m in masks])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    runner.sparse_nodes = False
    torch.testing.assert_close(runner.node_values(masks), together, atol=ATOL, rtol=0)
    index = GraphIndex(shape)
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(4, index.n_senders, index.n_receivers, generator=gen) < 0.6
    keep[2:] &= torch.rand(2, index.n_senders, index.n_receivers, generator=gen) < 0.05
    stacked = runner.edge_values(keep)
    torch.testing.assert_close(
        stacked, torch.cat([runner.edge_values(k.unsqueeze(0)) for k in keep]), atol=ATOL, rtol=0
    )
    runner.sparse_edges = False  # every sender computed: the same values
    torch.testing.assert_close(runner.edge_values(keep), stacked, atol=ATOL, rtol=0)


@pytest.mark.parametrize("input_node", ["embeddings", "tokens"])
def test_stacked_edge_circuits_equal_each_alone(model: Any, task: rl.Task, input_node: str) -> None:
    """Stacked, sparse (only the senders a circuit keeps an edge of) and dense, alone and
    in chunks: one value per circuit and prompt. The masks mark edges outside the graph
    too, which every engine ignores."""
    index = GraphIndex(shape_of(model))
    gen = torch.Generator().manual_seed(4)
    keep = torch.rand(6, index.n_senders, index.n_receivers, generator=gen) < 0.5
    keep[3:] &= torch.rand(3, index.n_senders, index.n_receivers, generator=gen) < 0.05
    keep[5] = False  # the empty circuit: every edge ablated
    for ablation in ("mean", "resample", "zero"):
        runner = AblationRunner(
            model,
            task,
            ablation=ablation,  # type: ignore[arg-type]
            input_node=input_node,  # type: ignore[arg-type]
        )
        stacked = runner.edge_values(keep)
        alone = torch.cat([runner.edge_values(k.unsqueeze(0)) for k in keep])
        torch.testing.assert_close(stacked, alone, atol=ATOL, rtol=0)
        runner.sparse_edges = False
        torch.testing.assert_close(runner.edge_values(keep), stacked, atol=ATOL, rtol=0)
        runner.sparse_edges = True
        assert runner.edges(keep[0]) == pytest.approx(float(alone[0].mean()), abs=1e-6)
        small = AblationRunner(
            model,
            task,
            ablation=ablation,  # type: ignore[arg-type]
            input_node=input_node,  # type: ignore[arg-type]
            batch_size=2,
        )
        torch.testing.assert_close(small.edge_values(keep), stacked, atol=ATOL, rtol=0)


# ---- the rule on a model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo() -> tuple[Any, rl.Task]:
    model = rl.load_model("zoo:base")
    return model, rl.tasks.load("ioi", model, n=24, seed=2)


def _lows(evaluator: CircuitEvaluator, order: list[Any], level: str) -> list[float]:
    sizes = list(range(1, len(order) + 1))
    return [iv.low for iv in prefix_intervals(evaluator, order, level, sizes)]  # type: ignore[arg-type]


def _shuffled_scores(scores: NodeScores, shape: Any, seed: int) -> NodeScores:
    """The same scores given to other nodes: a ranking whose prefixes rise and fall."""
    given = scores.as_dict()
    values = list(given.values())
    random.Random(seed).shuffle(values)
    return NodeScores.from_mapping(dict(zip(given, values, strict=True)), shape)


def _bisected(values: list[float], target: float, grid: list[int]) -> int:
    """What a grid and a bisection return, taking the curve as monotone (the old rule)."""
    hit = next((i for i, k in enumerate(grid) if values[k - 1] >= target), len(grid) - 1)
    low, high = (grid[hit - 1] if hit else 0), grid[hit]
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if values[mid - 1] >= target else (mid, high)
    return high


def test_node_rule_equals_the_exhaustive_scan_on_rankings_that_are_not_monotone(
    zoo: tuple[Any, rl.Task],
) -> None:
    model, task = zoo
    evaluator = CircuitEvaluator(model, task)
    found = rl.activation_patching(model, task)
    misses, answers = 0, set()
    for seed in range(3):
        scores = _shuffled_scores(found, shape_of(model), seed)
        order = ranked(scores)
        lows = _lows(evaluator, order, "node")  # type: ignore[arg-type]
        assert any(b < a for a, b in itertools.pairwise(lows)), "the curve should fall"
        # Targets between the curve's own values: the answers spread over the sizes.
        targets = sorted({round(v - 0.005, 3) for v in lows if 0.05 < v < 0.99})
        for target in targets:
            circuit, rule = _select(scores, evaluator, 1.0, None, None, target, None)
            expected = exhaustive(lows, target - _TOLERANCE)
            assert circuit.nodes == frozenset(order[:expected]), (seed, target, lows)
            assert rule == {"rule": "auto", "target_faithfulness": target}
            answers.add(expected)
            bisected = _bisected(lows, target - _TOLERANCE, [1, 5, 10, len(lows)])
            misses += bisected != expected
    assert len(answers) >= 4
    # The curves are not monotone where it matters: a bisection would answer otherwise.
    assert misses > 0


def test_edge_rule_equals_the_exhaustive_scan_of_its_sizes(zoo: tuple[Any, rl.Task]) -> None:
    model, task = zoo
    evaluator = CircuitEvaluator(model, task)
    found = rl.attribution_patching(model, task, method="eap", level="edge")
    assert isinstance(found, EdgeScores)
    # The same scores given to other edges: a ranking whose prefixes rise and fall.
    shuffled = torch.randperm(len(found.scores), generator=torch.Generator().manual_seed(0))
    scores = dataclasses.replace(found, scores=found.scores[shuffled])
    order = ranked(scores)
    n = len(order)
    assert n == len(edges_of(model)) and n > EDGE_SIZES_EXACT
    sizes = prefix_sizes(n, "edge")
    intervals = prefix_intervals(evaluator, order, "edge", sizes)
    lows = {k: iv.low for k, iv in zip(sizes, intervals, strict=True)}
    assert any(lows[b] < lows[a] for a, b in itertools.pairwise(sizes))
    for target in (0.5, 0.8):
        circuit, _ = _select(scores, evaluator, 1.0, None, None, target, None)
        expected = next((k for k in sizes if lows[k] >= target - _TOLERANCE), n)
        assert circuit.edges == frozenset(order[:expected])  # type: ignore[arg-type]


def test_discovery_records_the_interval_and_cuts_on_its_lower_end(
    zoo: tuple[Any, rl.Task], tmp_path: Any
) -> None:
    model, task = zoo
    circuit = rl.discover_circuit(model, task, method="eap-ig")
    meta = circuit.metadata
    low, high = meta["faithfulness_interval"]
    assert low <= meta["faithfulness"] <= high
    assert low >= 0.9 - _TOLERANCE  # the rule's criterion
    settings = meta["settings"]
    assert (settings["confidence"], settings["n_boot"], settings["bootstrap_seed"]) == (
        0.95,
        1000,
        0,
    )
    again = rl.faithfulness(model, task, circuit, interval=True)
    assert [again.low, again.high] == [low, high] and again.value == meta["faithfulness"]
    # One node fewer: its lower end falls short (the rule took the smallest).
    evaluator = CircuitEvaluator(model, task)
    order = ranked(rl.attribution_patching(model, task, method="eap-ig"))
    k = len(circuit.nodes)
    assert frozenset(order[:k]) == circuit.nodes
    if k > 1:
        smaller = prefix_intervals(evaluator, order, "node", list(range(1, k)))
        assert all(iv.low < 0.9 - _TOLERANCE for iv in smaller)
    path = tmp_path / "c.json"
    circuit.to_json(path)
    assert rl.Circuit.from_json(path).metadata["faithfulness_interval"] == [low, high]
    top = rl.discover_circuit(model, task, top_k=3)  # every rule records its interval
    assert len(top.metadata["faithfulness_interval"]) == 2
