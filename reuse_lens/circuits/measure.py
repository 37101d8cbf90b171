"""How much of a task's behaviour a circuit carries on its own.

Faithfulness (Hanna et al. 2024; MIB) ablates everything outside the circuit and asks how
much of the metric is left::

    f(C) = (m(C) − m(∅)) / (m(full) − m(∅))

``m(full)`` is the unablated model, ``m(∅)`` the model with *everything* ablated at the
circuit's level: every head and MLP output for a node circuit (the embedding stays), every
edge for an edge circuit (with ``resample`` ablation that is exactly the corrupted run).
So 1.0 means the circuit does all the work and 0.0 means it does none; values outside
[0, 1] are real (a circuit that drops a component working against the task can exceed 1).

``faithfulness_curve`` evaluates the top-scoring circuits at MIB's sizes and reports CPR
(the area under the curve, higher is better) and CMD (the area of |1 − f|, lower is
better), each over the fraction axis and divided by its span, so both lie in the units
of f. ``random_baseline`` gives the faithfulness of random circuits of the same size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, overload

import numpy as np
import torch

from reuse_lens._memory import MemoryBudget
from reuse_lens._validate import check_circuit, check_count, check_seed
from reuse_lens.circuits.evaluator import (
    CircuitEvaluator,
    Level,
    NodeEmpty,
    ablation_level,
    node_mask,
)
from reuse_lens.circuits.interval import (
    DEFAULT_CONFIDENCE,
    DEFAULT_N_BOOT,
    FaithfulnessInterval,
    check_confidence,
)
from reuse_lens.nodes import MLP, AttentionHead, Expert, edges_of
from reuse_lens.patching._common import Engine
from reuse_lens.patching._experts import RoutingMode
from reuse_lens.patching.ablation import InputKind, MeanPositions
from reuse_lens.patching.edges import EdgeScores
from reuse_lens.patching.scores import NodeScores
from reuse_lens.separation import accuracy_of, check_separation

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.circuits.circuit import Circuit
    from reuse_lens.nodes import Ablation
    from reuse_lens.tasks.metrics import Metric
    from reuse_lens.tasks.task import Task

__all__ = [
    "MIB_FRACTIONS",
    "CircuitEvaluator",
    "FaithfulnessCurve",
    "FaithfulnessInterval",
    "Level",
    "NodeEmpty",
    "RandomBaseline",
    "ablation_level",
    "faithfulness",
    "faithfulness_curve",
    "node_mask",
    "random_baseline",
]

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The circuit sizes of MIB's faithfulness curve, as fractions of all nodes or edges."""

CurveSizes = Literal["round", "mib"]
"""How ``faithfulness_curve`` turns a fraction ``p`` of ``N`` into a count: ``round``,
``max(1, round(p · N))``; ``mib``, ``int(p · N)`` as MIB's evaluation (0 is allowed)."""


@overload
def faithfulness(
    model: TransformerBridge,
    task: Task,
    circuit: Circuit,
    *,
    ablation: Ablation = "mean",
    metric: str | Metric | None = None,
    batch_size: int | None = None,
    level: Level | None = None,
    input_node: InputKind = "embeddings",
    engine: Engine = "auto",
    mean_positions: MeanPositions = "real",
    prune: bool = False,
    node_empty: NodeEmpty = "nodes",
    memory_budget: MemoryBudget = None,
    check_task: bool = True,
    interval: Literal[False] = False,
    confidence: float = DEFAULT_CONFIDENCE,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    routing: RoutingMode = "frozen",
) -> float: ...


@overload
def faithfulness(
    model: TransformerBridge,
    task: Task,
    circuit: Circuit,
    *,
    ablation: Ablation = "mean",
    metric: str | Metric | None = None,
    batch_size: int | None = None,
    level: Level | None = None,
    input_node: InputKind = "embeddings",
    engine: Engine = "auto",
    mean_positions: MeanPositions = "real",
    prune: bool = False,
    node_empty: NodeEmpty = "nodes",
    memory_budget: MemoryBudget = None,
    check_task: bool = True,
    interval: Literal[True],
    confidence: float = DEFAULT_CONFIDENCE,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    routing: RoutingMode = "frozen",
) -> FaithfulnessInterval: ...


def faithfulness(
    model: TransformerBridge,
    task: Task,
    circuit: Circuit,
    *,
    ablation: Ablation = "mean",
    metric: str | Metric | None = None,
    batch_size: int | None = None,
    level: Level | None = None,
    input_node: InputKind = "embeddings",
    engine: Engine = "auto",
    mean_positions: MeanPositions = "real",
    prune: bool = False,
    node_empty: NodeEmpty = "nodes",
    memory_budget: MemoryBudget = None,
    check_task: bool = True,
    interval: bool = False,
    confidence: float = DEFAULT_CONFIDENCE,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    routing: RoutingMode = "frozen",
) -> float | FaithfulnessInterval:
    """The circuit's share of the task's behaviour: 1.0 = the full model, 0.0 = all ablated.

    Arguments:
        model: the model, a ``TransformerBridge``.
        task: the prompts; every prompt is read at its own answer position.
        circuit: a node circuit (outputs of every other head and MLP are ablated) or an
            edge circuit (every other edge is ablated).
        ablation: ``mean`` (the mean over the task's clean prompts, position by
            position), ``resample`` (the corrupted partner's activation) or ``zero``.
        metric: a metric name or ``Metric``; the task's own when None.
        batch_size: rows per forward pass; by default as many as ``memory_budget`` holds.
        level: ``node`` or ``edge`` to override how the circuit is ablated (see
            ``ablation_level``); an edge circuit evaluated at ``node`` level keeps its nodes.
        input_node: what the ``input`` sender is when its edges are ablated:
            ``embeddings`` (token plus position embedding, the default) or ``tokens`` (the
            token embedding alone, as EAP-IG and MIB's evaluation). Only edge circuits
            ablate ``input``; see ``reuse_lens.patching.ablation.InputKind``.
        engine: ``auto``, ``functional`` or ``hooks``, as in ``activation_patching``.
        mean_positions: ``real`` (the default: a position's mean is over the prompts with
            a real token there) or ``padded`` (over every prompt of the padded batch, as
            EAP-IG's ``mean-positional``); see ``reuse_lens.patching.ablation.MeanPositions``.
        prune: drop, before ablating, the edges of an edge circuit that lie on no path
            from ``input`` to ``logits``, as EAP-IG's ``Graph.prune`` (and so MIB's
            evaluation) does; see ``reuse_lens.circuits.mib.prune_edges``. It changes
            nothing under ``resample`` ablation.
        node_empty: ``nodes`` (the default) or ``edges``: what a node circuit's
            faithfulness is normalized against (see ``NodeEmpty``; MIB's is ``edges``).
        memory_budget: bytes or a size such as ``"2GiB"`` for the runs and each chunk of
            (circuit, prompt) rows; by default ``REUSE_LENS_MEMORY_BUDGET``, else 2 GiB on
            the CPU and half the free memory of a GPU (docs/scale.md).
        check_task: refuse a task the model does not do (the default), by
            ``reuse_lens.separation``'s test on the clean − corrupted gap, as
            ``discover_circuit`` does: there faithfulness divides noise by noise. False
            computes the ratio anyway (the engines' exactness tests on random models do).
        interval: also return the bootstrap interval over prompts (a
            ``FaithfulnessInterval``; ``reuse_lens.circuits.interval``).
        confidence: the interval's coverage, in (0, 1).
        n_boot: the interval's bootstrap draws.
        seed: the draws' seed: the same seed gives the same interval.
        routing: for a circuit of expert nodes (``m3.e5``), what the routers do in the
            ablated run: keep each prompt's clean routing (``frozen``, the default) or
            route what they read (``recompute``); docs/models.md, "Experts as nodes".

    Returns:
        The faithfulness, a float; with ``interval=True`` a ``FaithfulnessInterval``
        (``value``, ``low``, ``high``, ``confidence``, ``n_boot``, ``seed``) whose
        ``value`` is that same float.

    Raises:
        TypeError: when model, task or circuit is not one (a spec string, a list).
        CircuitError: when the circuit was made for a model of another shape, or its
            nodes are not in this model.
        MetricError: when the model does not do the task (``reuse_lens.separation``: the
            clean − corrupted gap's interval includes 0, or the gap is small next to the
            metric's spread), or the metric cannot separate the full model from the
            ablated one.
        ValueError: for an empty task, an unknown ablation, or a confidence outside
            (0, 1) or n_boot below 1.
    """
    check_circuit(circuit)  # before the set-up's forward passes
    confidence, n_boot = check_confidence(confidence), check_count(n_boot, "n_boot")
    seed = check_seed(seed)
    evaluator = CircuitEvaluator(
        model,
        task,
        ablation=ablation,
        metric=metric,
        batch_size=batch_size,
        input_node=input_node,
        engine=engine,
        mean_positions=mean_positions,
        prune=prune,
        node_empty=node_empty,
        memory_budget=memory_budget,
        experts=bool(circuit.shape.experts),
        routing=routing,
    )
    if check_task:  # a faithfulness of a task the model does not do divides noise by noise
        prep = evaluator.runner.prep
        check_separation(
            prep.clean_metric, prep.corrupted_metric, task.name,
            accuracy=accuracy_of(prep.clean_logits, prep.inputs),
        )  # fmt: skip
    if interval:
        return evaluator.interval(circuit, level, confidence=confidence, n_boot=n_boot, seed=seed)
    return evaluator(circuit, level)


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of the top-scoring circuits at a range of sizes (MIB).

    Attributes:
        fractions: each circuit's size as a fraction of all nodes (or edges).
        sizes: the number of nodes (or edges) kept at each fraction (see ``CurveSizes``).
        faithfulness: f at each size.
        level: ``node`` or ``edge``.
        cpr: area under f over the fraction axis, divided by its span (higher is better).
        cmd: area of |1 − f| likewise (lower is better).
        method: the scoring method the circuits were ranked by.
        task: the task's name.
    """

    fractions: tuple[float, ...]
    sizes: tuple[int, ...]
    faithfulness: tuple[float, ...]
    level: Level
    cpr: float
    cmd: float
    method: str
    task: str

    @property
    def area_under(self) -> float:
        """MIB's ``area_under`` (its CPR): the trapezoid area under f, not divided by the
        span of the fraction axis; ``cpr`` times that span (0.999 for MIB's fractions)."""
        return self.cpr * (self.fractions[-1] - self.fractions[0])

    @property
    def area_from_1(self) -> float:
        """MIB's ``area_from_1`` (its CMD): ``cmd`` times the span of the fraction axis."""
        return self.cmd * (self.fractions[-1] - self.fractions[0])


def _area(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoid area under y(x), divided by the span of x (a mean value of y)."""
    if len(x) < 2:
        return float(y[0]) if y else float("nan")
    return float(np.trapezoid(np.asarray(y), np.asarray(x)) / (x[-1] - x[0]))


def ranked(
    scores: NodeScores | EdgeScores, *, absolute: bool = True
) -> list[str] | list[tuple[str, str]]:
    """Nodes (or edges as (sender, receiver) pairs) by decreasing |score|, ties in forward order.

    ``absolute=False`` ranks by decreasing score in MIB's sign (the negated score: ours is
    the metric change when noised, so the most negative, most important, comes first).
    """
    if isinstance(scores, EdgeScores):
        key = scores.scores.abs() if absolute else -scores.scores
        order = torch.argsort(key, descending=True, stable=True).tolist()
        return [(scores.edges[i].sender.name, scores.edges[i].receiver_name) for i in order]
    items = [
        (name, abs(value) if absolute else -value)
        for name, value in scores.as_dict().items()
        if not math.isnan(value)
    ]
    items.sort(key=lambda kv: kv[1], reverse=True)  # stable: ties keep forward order
    return [name for name, _ in items]


def faithfulness_curve(
    model: TransformerBridge,
    task: Task,
    scores: NodeScores | EdgeScores,
    *,
    ablation: Ablation = "mean",
    fractions: Sequence[float] = MIB_FRACTIONS,
    metric: str | Metric | None = None,
    evaluator: CircuitEvaluator | None = None,
    input_node: InputKind = "embeddings",
    sizes: CurveSizes = "round",
    absolute: bool = True,
    mean_positions: MeanPositions = "real",
    prune: bool = False,
    node_empty: NodeEmpty = "nodes",
    memory_budget: MemoryBudget = None,
) -> FaithfulnessCurve:
    """Faithfulness of the top-|score| circuit at each size in ``fractions`` (MIB's by default).

    With ``sizes="round"`` (the default) a fraction ``p`` keeps ``max(1, round(p · N))`` of
    the ``N`` scored nodes (NodeScores) or edges (EdgeScores); with ``sizes="mib"`` it
    keeps ``int(p · N)``, as MIB's evaluation does, and an empty circuit has faithfulness
    0. ``absolute=False`` ranks by signed score in MIB's sign (the most negative of ours
    first: important for the metric), as MIB's evaluation does without ``--absolute``.
    ``input_node``, ``mean_positions``, ``prune``, ``node_empty`` and ``memory_budget`` are as in
    ``faithfulness`` (at node level ``prune`` does nothing, at edge level ``node_empty``);
    an ``evaluator`` given brings its own.
    ``reuse_lens.circuits.mib.MIB_EVALUATION`` holds the options that reproduce MIB's
    evaluation.
    """
    if not fractions or any(not 0 < p <= 1 for p in fractions):
        raise ValueError(f"fractions must be non-empty and in (0, 1], got {list(fractions)}")
    if sizes not in ("round", "mib"):
        raise ValueError(f"unknown sizes {sizes!r}: choose 'round' (the default) or 'mib'")
    fractions = sorted(fractions)
    evaluator = evaluator or CircuitEvaluator(
        model,
        task,
        ablation=ablation,
        metric=metric,
        input_node=input_node,
        mean_positions=mean_positions,
        prune=prune,
        node_empty=node_empty,
        memory_budget=memory_budget,
        experts=isinstance(scores, NodeScores) and scores.expert_shape is not None,
    )
    order = ranked(scores, absolute=absolute)
    if not order:
        raise ValueError("the scores hold no scored node or edge")
    counts = (
        [max(1, round(p * len(order))) for p in fractions]
        if sizes == "round"
        else [int(p * len(order)) for p in fractions]
    )
    if isinstance(scores, EdgeScores):
        level: Level = "edge"
        values = [evaluator.edges(order[:k]) if k else 0.0 for k in counts]  # type: ignore[arg-type]
    else:
        level = "node"
        values = evaluator.nodes([order[:k] for k in counts])  # type: ignore[misc]
    return FaithfulnessCurve(
        fractions=tuple(fractions),
        sizes=tuple(counts),
        faithfulness=tuple(values),
        level=level,
        cpr=_area(fractions, values),
        cmd=_area(fractions, [abs(1 - v) for v in values]),
        method=scores.method,
        task=task.name,
    )


@dataclass(frozen=True)
class RandomBaseline:
    """Faithfulness of random circuits of a given size: the chance level to beat.

    Attributes:
        mean, std: over the ``values``.
        values: the faithfulness of each random circuit.
        size: nodes (or edges) per random circuit; for node circuits, heads and MLPs are
            drawn separately, as many of each as the circuit has.
    """

    mean: float
    std: float
    values: tuple[float, ...]
    size: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f} (n={len(self.values)})"


def random_baseline(
    model: TransformerBridge,
    task: Task,
    circuit: Circuit,
    *,
    n: int = 20,
    seed: int = 0,
    ablation: Ablation = "mean",
    metric: str | Metric | None = None,
    evaluator: CircuitEvaluator | None = None,
    memory_budget: MemoryBudget = None,
) -> RandomBaseline:
    """Faithfulness of ``n`` random circuits as large as ``circuit`` (seeded).

    ``memory_budget`` is as in ``faithfulness``; an ``evaluator`` given brings its own.
    """
    n = check_count(n, "n")
    seed = check_seed(seed)
    check_circuit(circuit)
    evaluator = evaluator or CircuitEvaluator(
        model,
        task,
        ablation=ablation,
        metric=metric,
        memory_budget=memory_budget,
        experts=bool(circuit.shape.experts),
    )
    evaluator.check(circuit)
    rng = np.random.default_rng(seed)
    if ablation_level(circuit) == "edge":
        every = [(e.sender.name, e.receiver_name) for e in edges_of(evaluator.shape)]
        size = len(circuit.edges)
        values = []
        for _ in range(n):
            pick = rng.choice(len(every), size=size, replace=False)
            values.append(evaluator.edges([every[i] for i in pick]))
    else:
        shape = evaluator.shape
        heads = [n_.name for n_ in shape.nodes() if isinstance(n_, AttentionHead)]
        mlps = [n_.name for n_ in shape.nodes() if isinstance(n_, MLP | Expert)]
        n_heads, n_mlps = len(circuit.heads), len(circuit.mlps)
        size = len(circuit.nodes)
        sets = [
            [heads[i] for i in rng.choice(len(heads), size=n_heads, replace=False)]
            + [mlps[i] for i in rng.choice(len(mlps), size=n_mlps, replace=False)]
            for _ in range(n)
        ]
        values = evaluator.nodes(sets)
    array = np.asarray(values, dtype=float)
    return RandomBaseline(
        mean=float(array.mean()),
        std=float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        values=tuple(float(v) for v in array),
        size=size,
    )
