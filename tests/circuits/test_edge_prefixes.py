"""Edge prefixes share their senders: the size rule's batched, memoized evaluation of a
ranking's prefixes gives each prefix the faithfulness it has alone, and so the circuit
that scanning every size one circuit at a time gives.

The references are independent of the sharing: each circuit evaluated alone by a fresh
evaluator (no memo, no other circuit in its pass), and the dense edge forward, which
computes every sender of every circuit (``DroppedEdges``). The rankings are shuffled
scores, so their faithfulness rises and falls.
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
    BOOTSTRAP_SEED,
    _select,
    prefix_intervals,
    prefix_sizes,
)
from reuse_lens.circuits.interval import FaithfulnessInterval
from reuse_lens.circuits.measure import CircuitEvaluator, ranked
from reuse_lens.nodes import ModelShape, shape_of
from reuse_lens.patching._sparse_edges import _full_positions, _layout
from reuse_lens.patching.ablation import AblationRunner, EdgeMemo
from reuse_lens.patching.edges import EdgeScores
from reuse_lens.patching.graph import GraphIndex
from tests.archs import load_arch
from tests.conftest import native_config
from tests.patching.helpers import random_task

ATOL = 1e-4
"""Metric values of two engines (float rounding of different sums)."""

FAITH_ATOL = 1e-6
"""Faithfulness of the same circuit, batched with a memo or evaluated alone."""

# The circuits the exhaustive scan gave on these rankings before prefixes shared their
# senders (commit 36f913c): per shuffling seed, the size chosen for TARGETS.
TARGETS = (0.3, 0.5, 0.6, 0.7)
BEFORE = {0: [356, 393, 434, 456], 1: [374, 413, 456, 456]}


@pytest.fixture(scope="module")
def zoo() -> tuple[Any, rl.Task]:
    model = rl.load_model("zoo:base")
    return model, rl.tasks.load("ioi", model, n=24, seed=2)


@pytest.fixture(scope="module")
def found(zoo: tuple[Any, rl.Task]) -> EdgeScores:
    model, task = zoo
    scores = rl.attribution_patching(model, task, method="eap", level="edge")
    assert isinstance(scores, EdgeScores)
    return scores


def _shuffled(scores: EdgeScores, seed: int) -> EdgeScores:
    """The same scores given to other edges: a ranking whose prefixes rise and fall."""
    order = torch.randperm(len(scores.scores), generator=torch.Generator().manual_seed(seed))
    return dataclasses.replace(scores, scores=scores.scores[order])


def _alone(
    zoo: tuple[Any, rl.Task], order: list[Any], sizes: list[int]
) -> list[FaithfulnessInterval]:
    """The slow reference: each prefix alone, by a fresh evaluator, one pass each."""
    model, task = zoo
    evaluator = CircuitEvaluator(model, task)
    shape = shape_of(model)
    return [
        evaluator.interval(rl.Circuit.from_edges(order[:k], shape), seed=BOOTSTRAP_SEED)
        for k in sizes
    ]


@pytest.fixture(scope="module")
def reference(
    zoo: tuple[Any, rl.Task], found: EdgeScores
) -> dict[int, tuple[EdgeScores, list[int], list[FaithfulnessInterval]]]:
    """Per shuffling seed: the scores, the grid of sizes and each size's interval alone."""
    out = {}
    for seed in BEFORE:
        scores = _shuffled(found, seed)
        order = ranked(scores)
        sizes = prefix_sizes(len(order), "edge")
        out[seed] = (scores, sizes, _alone(zoo, order, sizes))
    return out


def test_batched_prefixes_with_a_memo_equal_each_prefix_alone(
    zoo: tuple[Any, rl.Task], reference: dict[int, Any]
) -> None:
    """Batches of 8 rising sizes, a memo carried from each to the next (as the size rule
    asks for them): every value and interval equals the prefix's own."""
    model, task = zoo
    evaluator = CircuitEvaluator(model, task)
    scores, sizes, alone = reference[0]
    order = ranked(scores)
    memo = EdgeMemo()
    batched = []
    for start in range(0, len(sizes), 8):
        batched += prefix_intervals(evaluator, order, "edge", sizes[start : start + 8], memo)
    for k, got, want in zip(sizes, batched, alone, strict=True):
        assert got.value == pytest.approx(want.value, abs=FAITH_ATOL), k
        assert got.low == pytest.approx(want.low, abs=FAITH_ATOL), k
        assert got.high == pytest.approx(want.high, abs=FAITH_ATOL), k
    lows = [iv.low for iv in alone]
    assert any(b < a for a, b in itertools.pairwise(lows)), "the curve should fall"
    # What was shared: far fewer senders computed than the prefixes read in all.
    index = GraphIndex(shape_of(model))
    read = sum(len({index.sender[s] for s, _ in order[:k]}) for k in sizes)
    assert memo.computed < read / 2


def test_prefixes_equal_the_dense_edge_forward(
    zoo: tuple[Any, rl.Task], reference: dict[int, Any]
) -> None:
    """Every sixth size, batched with a memo, against the forward that computes every
    sender of every circuit: another engine altogether."""
    model, task = zoo
    scores, sizes, _ = reference[1]
    order = ranked(scores)
    runner = AblationRunner(model, task)
    index = GraphIndex(shape_of(model))

    def mask(k: int) -> torch.Tensor:
        keep = torch.zeros(index.n_senders, index.n_receivers, dtype=torch.bool)
        for sender, receiver in order[:k]:
            keep[index.sender[sender], index.receiver[receiver]] = True
        return keep

    keep = torch.stack([mask(k) for k in sizes[::6]])
    memo = EdgeMemo()
    shared = torch.cat([runner.edge_values(keep[i : i + 3], memo) for i in range(0, len(keep), 3)])
    runner.sparse_edges = False
    torch.testing.assert_close(shared, runner.edge_values(keep), atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", sorted(BEFORE))
def test_the_rule_equals_the_scan_of_prefixes_alone_and_the_circuits_before(
    zoo: tuple[Any, rl.Task], reference: dict[int, Any], seed: int
) -> None:
    """The automatic rule returns the smallest size whose interval, evaluated alone,
    reaches the target (also where the curve falls back below it), and the circuits the
    exhaustive scan gave before prefixes shared their senders."""
    model, task = zoo
    evaluator = CircuitEvaluator(model, task)
    scores, sizes, alone = reference[seed]
    order = ranked(scores)
    lows = {k: iv.low for k, iv in zip(sizes, alone, strict=True)}
    # Targets between the curve's own values, where a later size falls below them.
    falls = [lows[a] for a, b in itertools.pairwise(sizes) if lows[b] < lows[a] - 0.01]
    between = sorted({round(v - 0.005, 3) for v in falls if 0.05 < v < 0.99})
    targets = list(TARGETS) + random.Random(seed).sample(between, min(4, len(between)))
    chosen = []
    for target in targets:
        circuit, _ = _select(scores, evaluator, 1.0, None, None, target, None)
        expected = next((k for k in sizes if lows[k] >= target - _TOLERANCE), len(order))
        assert circuit.edges == frozenset(order[:expected]), (target, expected)
        chosen.append(expected)
    assert chosen[: len(TARGETS)] == BEFORE[seed]


def test_discovery_finds_the_circuit_it_found_before(zoo: tuple[Any, rl.Task]) -> None:
    """EAP-IG edges on the zoo: the circuit of the exhaustive scan before the memo."""
    model, task = zoo
    circuit = rl.discover_circuit(model, task, method="eap-ig", level="edge")
    assert len(circuit.edges) == 322
    order = ranked(rl.attribution_patching(model, task, method="eap-ig", level="edge"))
    assert circuit.edges == frozenset(order[:322])
    low, _ = circuit.metadata["faithfulness_interval"]
    assert low >= 0.9 - _TOLERANCE


# ---- the memo on any circuits ---------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> tuple[Any, rl.Task]:
    model = rl.load_model(native_config(n_layers=3))
    return model, random_task(model, n=5, lengths=[6, 5, 6, 4, 6], seed=1)


def _random_masks(shape: Any, n: int, seed: int) -> torch.Tensor:
    """Circuits that are not nested, dense and sparse, the empty one among them."""
    index = GraphIndex(shape)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, index.n_senders, index.n_receivers, generator=gen) < 0.5
    keep[n // 2 :] &= (
        torch.rand(n - n // 2, index.n_senders, index.n_receivers, generator=gen) < 0.1
    )
    keep[1] = False
    return keep


@pytest.mark.parametrize("ablation", ["mean", "resample", "zero"])
@pytest.mark.parametrize("input_node", ["embeddings", "tokens"])
def test_a_memo_changes_no_value(
    small: tuple[Any, rl.Task], ablation: str, input_node: str
) -> None:
    """Circuits that share nothing in particular, call after call through one memo, in
    chunks of prompts, with a memo that may hold nothing: the values without a memo and
    those of the dense forward."""
    model, task = small
    keep = _random_masks(shape_of(model), 8, seed=3)
    options: dict[str, Any] = {"ablation": ablation, "input_node": input_node}
    runner = AblationRunner(model, task, **options)
    alone = torch.cat([runner.edge_values(k.unsqueeze(0)) for k in keep])
    memo = EdgeMemo()
    carried = torch.cat([runner.edge_values(keep[i : i + 3], memo) for i in range(0, 8, 3)])
    torch.testing.assert_close(carried, alone, atol=ATOL, rtol=0)
    again = torch.cat([runner.edge_values(keep[i : i + 1], memo) for i in range(8)])
    torch.testing.assert_close(again, alone, atol=ATOL, rtol=0)
    chunked = AblationRunner(model, task, batch_size=2, **options)
    memo = EdgeMemo()
    got = torch.cat([chunked.edge_values(keep[i : i + 2], memo) for i in range(0, 8, 2)])
    torch.testing.assert_close(got, alone, atol=ATOL, rtol=0)
    starved = EdgeMemo()
    starved.bind(runner)
    starved.limit = 0  # holds nothing: every call computes every class again
    got = torch.cat([runner.edge_values(keep[i : i + 2], starved) for i in range(0, 8, 2)])
    torch.testing.assert_close(got, alone, atol=ATOL, rtol=0)
    runner.sparse_edges = False
    torch.testing.assert_close(runner.edge_values(keep), alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt_neox", "llama_gqa", "qwen3", "gptj", "gpt_oss", "hunyuan"])
def test_memoized_prefixes_on_other_architectures(
    name: str, tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any
) -> None:
    """Parallel blocks, grouped-query attention, rotary, per-head q/k norms (before and
    after rotary) and attention sinks with sliding windows: nested
    prefixes through a memo equal the dense forward."""
    arch = load_arch(name, tmp_path_factory.mktemp(name), word_tokenizer)
    job = random_task(arch, n=3, width=6, seed=2)
    runner = AblationRunner(arch, job, ablation="mean")
    index = GraphIndex(shape_of(arch))
    edges = [(s, r) for s in range(index.n_senders) for r in range(index.n_receivers)]
    random.Random(0).shuffle(edges)
    keep = torch.zeros(9, index.n_senders, index.n_receivers, dtype=torch.bool)
    for i, k in enumerate(torch.linspace(1, len(edges), 9).long().tolist()):
        for s, r in edges[:k]:
            keep[i, s, r] = True
    memo = EdgeMemo()
    got = torch.cat([runner.edge_values(keep[i : i + 2], memo) for i in range(0, 9, 2)])
    runner.sparse_edges = False
    torch.testing.assert_close(got, runner.edge_values(keep), atol=ATOL, rtol=0)


def test_a_memo_belongs_to_one_runner(small: tuple[Any, rl.Task]) -> None:
    model, task = small
    keep = _random_masks(shape_of(model), 2, seed=0)
    memo = EdgeMemo()
    AblationRunner(model, task).edge_values(keep, memo)
    with pytest.raises(ValueError, match="one runner"):
        AblationRunner(model, task).edge_values(keep, memo)


def test_senders_read_at_the_answer_alone() -> None:
    """Which senders a circuit computes at every position: those whose kept edges reach
    a key or a value, directly or through queries and MLPs read at every position."""
    shape = ModelShape(n_layers=3, n_heads=2, has_mlps=True)
    index = GraphIndex(shape)
    keep = torch.zeros(2, index.n_senders, index.n_receivers, dtype=torch.bool)

    def edge(sender: str, receiver: str) -> None:
        keep[1, index.sender[sender], index.receiver[receiver]] = True

    edge("a2.h0", "logits")  # the logits: the answer alone
    edge("a1.h0", "a2.h0<q>")  # the query of a head read at the answer
    edge("m0", "m1")  # the input of an MLP read at the answer
    edge("m1", "m2")
    edge("m2", "logits")
    edge("a0.h0", "a2.h1<k>")  # a key: every position
    edge("a2.h1", "logits")
    edge("a1.h1", "a2.h1<v>")  # a value: every position
    edge("a0.h1", "a1.h1<q>")  # the query of a head read at every position
    full = _full_positions(_layout(shape), keep)
    assert not full[0].any()  # the empty circuit reads nothing
    at_every = {s for s, i in index.sender.items() if full[1, i]}
    assert at_every == {"a0.h0", "a1.h1", "a0.h1"}


def test_an_edge_mask_names_the_edge_the_graph_lacks(zoo: tuple[Any, rl.Task]) -> None:
    model, task = zoo
    evaluator = CircuitEvaluator(model, task)
    keep = evaluator.edge_mask([("input", "a0.h1<q>"), ("a1.h0", "logits")])
    index = GraphIndex(shape_of(model))
    assert int(keep.sum()) == 2
    assert keep[index.sender["a1.h0"], index.receiver["logits"]]
    with pytest.raises(ValueError, match=r"a9\.h0->logits is not in this model's graph"):
        evaluator.edge_mask([("input", "a0.h1<q>"), ("a9.h0", "logits")])
    with pytest.raises(ValueError, match=r"a1\.h0->a0\.h1<q> is not in"):
        evaluator.edge_mask([("a1.h0", "a0.h1<q>")])
