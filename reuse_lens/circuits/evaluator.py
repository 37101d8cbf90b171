"""The faithfulness of many circuits on one (model, task, ablation), sharing the set-up.

``CircuitEvaluator`` holds the ablation engine (``reuse_lens.patching.ablation``), the full
model's metric and the metric with everything ablated, and normalizes what a circuit keeps
between the two (``measure.py`` has the definition). It evaluates node circuits and edge
circuits in batches, with or without their bootstrap intervals over prompts
(``interval.py``). ``reuse_lens.circuits.measure`` re-exports everything here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NoReturn

import torch
from jaxtyping import Bool
from torch import Tensor

from reuse_lens._memory import MemoryBudget
from reuse_lens._validate import check_circuit, check_count, check_fits, check_seed
from reuse_lens.circuits._checks import CircuitError
from reuse_lens.circuits.interval import (
    DEFAULT_CONFIDENCE,
    DEFAULT_N_BOOT,
    FaithfulnessInterval,
    Resamples,
    check_confidence,
)
from reuse_lens.nodes import ModelShape
from reuse_lens.patching._common import Engine
from reuse_lens.patching._experts import RoutingMode
from reuse_lens.patching.ablation import (
    AblationRunner,
    EdgeMemo,
    InputKind,
    MeanPositions,
    NodeMask,
)
from reuse_lens.patching.graph import GraphIndex
from reuse_lens.tasks.metrics import MetricError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.circuits.circuit import Circuit
    from reuse_lens.nodes import Ablation
    from reuse_lens.tasks.metrics import Metric
    from reuse_lens.tasks.task import Task

__all__ = ["CircuitEvaluator", "Level", "NodeEmpty", "ablation_level", "node_mask"]

_MIN_GAP = 1e-6
"""The smallest full − empty gap in absolute terms, for metrics near zero."""

_MIN_RELATIVE_GAP = 1e-3
"""The smallest full − empty gap relative to the metric's scale (max |full|, |empty|).

Below it the gap is float noise (float32 forward passes agree to about 1e-6 of the
logits' scale), and dividing by it would turn noise into any faithfulness at all.
"""

Level = Literal["node", "edge"]

NodeEmpty = Literal["nodes", "edges"]
"""What "everything ablated" is when a node circuit's faithfulness is normalized:
``nodes`` (the default), every head and MLP output with the embedding kept, the empty
node circuit; ``edges``, every edge, ``input`` included, as MIB's evaluation normalizes
node circuits too (so there the empty node circuit scores the input-to-logits edge's
share, not 0)."""


class CircuitEvaluator:
    """Faithfulness of many circuits on one (model, task, ablation), sharing the set-up.

    Attributes:
        full: the metric of the unablated model.
        runner: the ablation engine (``reuse_lens.patching.ablation``).
    """

    def __init__(
        self,
        model: TransformerBridge,
        task: Task,
        *,
        ablation: Ablation = "mean",
        metric: str | Metric | None = None,
        batch_size: int | None = None,
        input_node: InputKind = "embeddings",
        engine: Engine = "auto",
        mean_positions: MeanPositions = "real",
        prune: bool = False,
        node_empty: NodeEmpty = "nodes",
        memory_budget: MemoryBudget = None,
        experts: bool = False,
        routing: RoutingMode = "frozen",
        hold_runs: bool = False,
    ) -> None:
        """``hold_runs``: keep the unablated runs until ``runner.release_runs()``
        (``AblationRunner``); the other arguments are ``faithfulness``'s."""
        if node_empty not in ("nodes", "edges"):
            raise ValueError(
                f"unknown node_empty {node_empty!r}: choose 'nodes' (the default) or 'edges'"
            )
        self.runner = AblationRunner(
            model,
            task,
            ablation=ablation,
            metric=metric,
            batch_size=batch_size,
            input_node=input_node,
            engine=engine,
            mean_positions=mean_positions,
            memory_budget=memory_budget,
            experts=experts,
            routing=routing,
            hold_runs=hold_runs,
        )
        self.prune = bool(prune)
        self.node_empty: NodeEmpty = node_empty
        self.model = model
        self.task = task
        self.ablation = ablation
        self.shape = self.runner.shape
        self.full = self.runner.full
        self._empty: dict[Level, float] = {}
        self._empty_values: dict[Level, Tensor] = {}
        self._graph: GraphIndex | None = None
        self._resamples: dict[tuple[float, int, int], Resamples] = {}

    @property
    def _index(self) -> GraphIndex:
        """The edge graph, built on first use (a shape with expert nodes has none)."""
        if self._graph is None:
            self._graph = GraphIndex(self.shape)
        return self._graph

    def empty(self, level: Level) -> float:
        """The metric with everything ablated at ``level``."""
        if level not in self._empty:
            if level == "node":
                per_prompt = self.runner.node_values(NodeMask.full(self.shape, keep=False))[0]
            else:
                keep = torch.zeros(self._index.n_senders, self._index.n_receivers, dtype=torch.bool)
                per_prompt = self.runner.edge_values(keep.unsqueeze(0))[0]
            value = float(per_prompt.mean())
            gap = self.full - value
            scale = max(abs(self.full), abs(value))
            if abs(gap) < max(_MIN_GAP, _MIN_RELATIVE_GAP * scale):
                hint = (
                    f" With mean ablation over {len(self.task)} prompt(s), the mean activation "
                    "is (nearly) each prompt's own, so ablating changes nothing: use more "
                    "prompts, or resample ablation."
                    if self.ablation == "mean" and len(self.task) < 4
                    else ""
                )
                raise MetricError(
                    f"the metric cannot separate the full model ({self.full:.6g}) from the "
                    f"model with every {level} ablated ({value:.6g}) on task "
                    f"{self.task.name!r} with {self.ablation!r} ablation: their gap is below "
                    f"{_MIN_RELATIVE_GAP:g} of the metric's scale, so faithfulness is "
                    f"undefined.{hint} Use a task the model solves, or another ablation/metric."
                )
            self._empty[level] = value
            self._empty_values[level] = per_prompt
        return self._empty[level]

    def _empty_level(self, level: Level) -> Level:
        return "edge" if self.node_empty == "edges" else level

    def normalize(self, value: float | Tensor, level: Level) -> float | Tensor:
        empty = self.empty(self._empty_level(level))
        return (value - empty) / (self.full - empty)

    def resamples(
        self,
        *,
        confidence: float = DEFAULT_CONFIDENCE,
        n_boot: int = DEFAULT_N_BOOT,
        seed: int = 0,
    ) -> Resamples:
        """The bootstrap draws of this task's prompts (made once per setting)."""
        key = (check_confidence(confidence), check_count(n_boot, "n_boot"), check_seed(seed))
        if key not in self._resamples:
            self._resamples[key] = Resamples(
                len(self.task), confidence=key[0], n_boot=key[1], seed=key[2]
            )
        return self._resamples[key]

    def _intervals(
        self, per_prompt: Tensor, level: Level, resamples: Resamples
    ) -> list[FaithfulnessInterval]:
        """Faithfulness and its interval for each row of per-prompt metric values."""
        empty_level = self._empty_level(level)
        self.empty(empty_level)
        means = per_prompt.mean(1)
        # As ``nodes`` (a tensor of means) and ``edges`` (one float) normalize: the same bytes.
        values = (
            [float(self.normalize(float(m), level)) for m in means]
            if level == "edge"
            else [float(v) for v in self.normalize(means, level)]  # type: ignore[union-attr]
        )
        return resamples.intervals(
            values,
            per_prompt.double().numpy(),
            self.runner.prep.clean_metric.double().cpu().numpy(),
            self._empty_values[empty_level].double().numpy(),
        )

    def check(self, circuit: object, arg: str = "circuit") -> Circuit:
        """The circuit, if it is one and was made for a model of this model's shape."""
        checked = check_circuit(circuit, arg)
        if bool(checked.shape.experts) != bool(self.shape.experts):
            has = "has" if checked.shape.experts else "has no"
            raise CircuitError(
                f"{arg} {has} expert nodes (m3.e5) and this evaluation "
                f"{'does not' if checked.shape.experts else 'does'}: evaluate it with "
                f"experts={bool(checked.shape.experts)}"
            )
        checked.check(self.shape)  # names the nodes a smaller model lacks
        check_fits(checked, self.shape, arg)
        return checked

    # ---- node circuits --------------------------------------------------------------

    def node_mask(self, nodes: Iterable[str]) -> NodeMask:
        return node_mask(self.shape, nodes)

    def nodes(self, node_sets: Sequence[Iterable[str]]) -> list[float]:
        """Faithfulness of each node set (batched through the engine)."""
        if not node_sets:
            return []
        values = self.runner.nodes([self.node_mask(s) for s in node_sets])
        return [float(v) for v in self.normalize(values, "node")]  # type: ignore[union-attr]

    def node_intervals(
        self, node_sets: Sequence[Iterable[str]], resamples: Resamples
    ) -> list[FaithfulnessInterval]:
        """Faithfulness of each node set with its bootstrap interval (``resamples``)."""
        if not node_sets:
            return []
        per_prompt = self.runner.node_values([self.node_mask(s) for s in node_sets])
        return self._intervals(per_prompt, "node", resamples)

    # ---- edge circuits --------------------------------------------------------------

    def edge_mask(self, edges: Iterable[tuple[str, str]]) -> Bool[Tensor, "sender receiver"]:
        index, pairs = self._index, list(edges)
        missing = next(
            ((s, r) for s, r in pairs if s not in index.sender or r not in index.receiver), None
        )
        if missing is not None:
            self._refuse_edge(*missing)
        # One write for every edge: the size rule builds a mask per prefix.
        rows = [index.sender[sender] for sender, _ in pairs]
        columns = [index.receiver[receiver] for _, receiver in pairs]
        outside = torch.nonzero(~index.edges[rows, columns]).flatten()
        if len(outside):  # a receiver reading a later sender
            self._refuse_edge(*pairs[int(outside[0])])
        keep = torch.zeros(index.n_senders, index.n_receivers, dtype=torch.bool)
        keep[rows, columns] = True
        return keep

    def _refuse_edge(self, sender: str, receiver: str) -> NoReturn:
        raise ValueError(
            f"edge {sender}->{receiver} is not in this model's graph ({self.shape.n_layers} "
            f"layers, {self.shape.n_heads} heads; a receiver reads only the senders before it)"
        )

    def edges(self, edges: Iterable[tuple[str, str]]) -> float:
        value = self.runner.edges(self._pruned_mask(edges))
        return float(self.normalize(value, "edge"))

    def edge_intervals(
        self,
        edge_sets: Sequence[Iterable[tuple[str, str]]],
        resamples: Resamples,
        memo: EdgeMemo | None = None,
    ) -> list[FaithfulnessInterval]:
        """Faithfulness of each edge set with its bootstrap interval, the sets stacked
        along the batch (``memo``: senders carried between calls, ``EdgeMemo``)."""
        if not edge_sets:
            return []
        keep = torch.stack([self._pruned_mask(e) for e in edge_sets])
        per_prompt = self.runner.edge_values(keep, memo)
        return self._intervals(per_prompt, "edge", resamples)

    def _pruned_mask(self, edges: Iterable[tuple[str, str]]) -> Bool[Tensor, "sender receiver"]:
        if self.prune:
            from reuse_lens.circuits.mib import prune_edges

            edges = prune_edges(edges)
        return self.edge_mask(edges)

    # ---- circuits -------------------------------------------------------------------

    def __call__(self, circuit: Circuit, level: Level | None = None) -> float:
        self.check(circuit)
        if ablation_level(circuit, level) == "edge":
            return self.edges(circuit.edges)
        return self.nodes([circuit.nodes])[0]

    def interval(
        self,
        circuit: Circuit,
        level: Level | None = None,
        *,
        confidence: float = DEFAULT_CONFIDENCE,
        n_boot: int = DEFAULT_N_BOOT,
        seed: int = 0,
    ) -> FaithfulnessInterval:
        """The circuit's faithfulness (as ``__call__``) with its bootstrap interval."""
        resamples = self.resamples(confidence=confidence, n_boot=n_boot, seed=seed)
        self.check(circuit)
        if ablation_level(circuit, level) == "edge":
            return self.edge_intervals([circuit.edges], resamples)[0]
        return self.node_intervals([circuit.nodes], resamples)[0]


def node_mask(shape: ModelShape, nodes: Iterable[str]) -> NodeMask:
    """The keep-mask of a node circuit: True for the named heads, MLPs and experts."""
    return NodeMask.of(shape, nodes)


def ablation_level(circuit: Circuit, level: Level | None = None) -> Level:
    """How a circuit is ablated: ``level`` if given, else the circuit's own.

    A circuit's own level is ``metadata["level"]`` when set (path-patching circuits set
    ``node``: their edges name the input each sender was found through, and a sender may
    reach it through MLPs, so they are paths, not a complete edge graph), else ``edge``
    when it has edges and ``node`` when not.
    """
    if level is None:
        level = circuit.level
    if level not in ("node", "edge"):
        raise ValueError(f"unknown level {level!r}: choose 'node' or 'edge'")
    if level == "edge" and not circuit.edges:
        raise ValueError("level='edge' needs a circuit with edges; this one has only nodes")
    return level
