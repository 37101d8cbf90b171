"""From scores to a circuit: which heads, MLPs and edges a task uses.

``discover_circuit`` scores the model's nodes (or edges) with one patching method and
keeps the important ones. How many it keeps is decided by one of three rules:

- ``top_k``: the ``k`` nodes (edges) of largest |score|;
- ``threshold``: every node (edge) whose |score| is at least ``threshold`` times the
  clean − corrupted gap of the metric (scores are compared normalised);
- the automatic rule, when neither is given: order by |score| and keep the smallest prefix
  whose faithfulness, measured by really ablating everything else, reaches
  ``target_faithfulness`` (0.9 by default) with the lower end of its 95% bootstrap
  interval over prompts (``interval.py``): a circuit is kept only when the prompts
  support it, not when one lucky draw of them does. The full prefix keeps every node
  (edge), so every draw gives it 1.0 and the rule always ends. ``select_prefix`` finds
  that prefix in a few batched passes and returns what scanning every size would; edge
  circuits, thousands of candidates, are sized on a grid of 5% steps above 32 edges
  (``prefix_sizes``).

Edge circuits from EAP / EAP-IG can also be grown greedily (``selection="greedy"``,
Hanna et al. 2024): starting from the logits, repeatedly add the best-scoring edge whose
receiver is already connected to the logits, until ``top_k`` edges are kept.

``method="path"`` is the path-patching search of Wang et al. (2022) and Merullo et al.
(2024): stage 0 finds the senders whose direct path to the logits passes the threshold;
stage s + 1 patches each head found at stage s, through its q, k and v inputs apart, and
finds the senders to each; the search stops when a stage finds no new sender. Each node
records the stage it was found at, and each edge the input it enters by.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from jaxtyping import Float
from torch import Tensor

from reuse_lens._memory import MemoryBudget, resolve_budget
from reuse_lens._validate import check_pair
from reuse_lens.circuits.circuit import Circuit
from reuse_lens.circuits.interval import DEFAULT_CONFIDENCE, DEFAULT_N_BOOT, FaithfulnessInterval
from reuse_lens.circuits.measure import CircuitEvaluator, ranked
from reuse_lens.nodes import AttentionHead, parse_node, shape_of
from reuse_lens.patching._experts import RoutingMode, check_routing
from reuse_lens.patching.ablation import AblationRunner, EdgeMemo
from reuse_lens.patching.activation import _activation_patching
from reuse_lens.patching.attribution import _attribution_patching
from reuse_lens.patching.edges import EdgeScores
from reuse_lens.patching.experts import expert_activation_patching
from reuse_lens.patching.path import path_patching
from reuse_lens.patching.scores import NodeScores
from reuse_lens.separation import accuracy_of, check_separation
from reuse_lens.tasks.metrics import MetricError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.nodes import Ablation
    from reuse_lens.tasks.metrics import Metric
    from reuse_lens.tasks.task import Task

__all__ = [
    "METHODS",
    "check_separates",
    "discover_circuit",
    "prefix_intervals",
    "prefix_lower_bounds",
    "prefix_sizes",
    "select_prefix",
]

Method = Literal["activation", "path", "eap", "eap-ig"]
Level = Literal["node", "edge"]
Selection = Literal["auto", "top_k", "threshold", "greedy"]

METHODS: tuple[str, ...] = ("activation", "path", "eap", "eap-ig")

DEFAULT_TARGET = 0.9
"""The faithfulness the automatic rule aims for."""

DEFAULT_PATH_THRESHOLD = 0.05
"""Path patching keeps a sender whose normalised path effect reaches 5% of the gap."""

BOOTSTRAP_SEED = 0
"""The seed of the bootstrap draws behind every interval that discovery records."""

_TOLERANCE = 1e-6
"""How far below the target a lower bound may fall and still reach it: the full circuit's
every draw is 1.0 up to float rounding."""

_FIRST_BATCH = 8
"""Sizes in the size rule's first batch (``select_prefix``)."""

EDGE_SIZES_EXACT = 32
"""Edge circuits up to this size are considered at every size (``prefix_sizes``)."""

EDGE_SIZE_STEP = 0.05
"""Above ``EDGE_SIZES_EXACT`` edges, each size the rule considers is 5% above the last."""


def discover_circuit(
    model: TransformerBridge,
    task: Task,
    *,
    method: Method = "activation",
    level: Level | None = None,
    threshold: float | None = None,
    top_k: int | None = None,
    target_faithfulness: float | None = None,
    ablation: Ablation = "mean",
    selection: Literal["greedy"] | None = None,
    steps: int = 5,
    metric: str | Metric | None = None,
    max_stages: int | None = None,
    memory_budget: MemoryBudget = None,
    experts: bool = False,
    routing: RoutingMode = "frozen",
) -> Circuit:
    """Find the heads and MLPs (or edges) that the task uses, as a ``Circuit``.

    Arguments:
        model: the model, a ``TransformerBridge`` in eval mode.
        task: clean and corrupted prompts with answers.
        method: ``activation`` (activation patching of each node, with ``ablation``),
            ``path`` (the staged path-patching search), ``eap`` or ``eap-ig``
            (attribution patching; ``steps`` integration steps for EAP-IG).
        level: ``node`` or ``edge``; edge circuits come from ``eap`` and ``eap-ig``. By
            default ``node`` (``path`` always returns nodes with their edges).
        threshold: keep what scores at least this fraction of the clean − corrupted gap
            (for ``path``: per stage; 0.05 when neither threshold nor top_k is given).
        top_k: keep this many nodes (edges); for ``path``, this many senders per stage.
        target_faithfulness: the automatic rule's target, 0.9 by default; only when
            neither ``threshold`` nor ``top_k`` is given.
        ablation: how everything outside the circuit is ablated when faithfulness is
            measured (``mean``, ``resample`` or ``zero``); activation patching scores
            nodes with the same ablation.
        selection: ``"greedy"`` grows an edge circuit from the logits (needs ``top_k``).
        steps: EAP-IG's integration steps.
        metric: a metric name or ``Metric``; the task's own when None.
        max_stages: for ``path``, the most stages to search, stage 0 included (by default
            as many as it takes: each stage reaches at least one layer further down).
        memory_budget: bytes or a size such as ``"2GiB"``, passed to the scoring method
            and to the faithfulness evaluator; by default ``REUSE_LENS_MEMORY_BUDGET``,
            else 2 GiB on the CPU and half the free memory of a GPU (docs/scale.md). It
            changes how the work is chunked, never the circuit.
        experts: make each expert of a mixture-of-experts MLP a node (``m3.e5``,
            ``m3.shared``): node circuits from ``activation``, ``eap`` or ``eap-ig``,
            scored and ablated expert by expert (docs/models.md, "Experts as nodes").
        routing: with ``experts``, what the routers do in patched and ablated runs:
            ``frozen`` (the default, each prompt's clean routing) or ``recompute``.

    Returns:
        A Circuit with the scores of every scored node (and edge), path stages, and
        metadata: model, task, method, settings, rule, seed, library version, the
        circuit's faithfulness under ``ablation`` and its 95% bootstrap interval over
        prompts (``faithfulness_interval``, ``[low, high]``; docs/circuit_format.md).

    Raises:
        ValueError: for an unknown method, level or ablation, conflicting rules, an
            out-of-range threshold/top_k/target, or an empty task.
        TypeError: when model or task is not one (a spec string, a list).
        MetricError: when the metric cannot separate clean from corrupted, or when the
            automatic rule cannot reach its target (the message says why).
    """
    model, task = check_pair(model, task)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    level = level or "node"
    if level not in ("node", "edge"):
        raise ValueError(f"unknown level {level!r}: choose 'node' or 'edge'")
    if level == "edge" and method not in ("eap", "eap-ig"):
        raise ValueError(
            f"edge circuits come from method='eap' or 'eap-ig', not {method!r}; "
            "path patching returns its edges with level='node'"
        )
    if len(task) == 0:
        raise ValueError(f"task {task.name!r} has no prompts")
    check_routing(routing)
    if experts and (level == "edge" or method == "path"):
        raise ValueError(
            "experts=True finds node circuits (method 'activation', 'eap' or 'eap-ig', "
            "level 'node'): expert nodes have no edges"
        )
    _check_rule(threshold, top_k, target_faithfulness, selection, level)
    if method == "path" and target_faithfulness is not None:
        raise ValueError(
            "path patching stops when a stage finds no sender above the threshold; it takes "
            "threshold or top_k, not target_faithfulness"
        )
    resolve_budget(memory_budget)  # a bad budget is refused before any forward pass
    # Activation patching and edge attribution run on the same prompts first, from the
    # evaluator's verified forward and unablated runs.
    hold = not experts and (
        method == "activation" or (method in ("eap", "eap-ig") and level == "edge")
    )
    evaluator = CircuitEvaluator(
        model,
        task,
        ablation=ablation,
        metric=metric,
        memory_budget=memory_budget,
        experts=experts,
        routing=routing,
        hold_runs=hold,
    )
    prep = evaluator.runner.prep
    gap = check_separates(
        prep.clean_metric,
        prep.corrupted_metric,
        task.name,
        accuracy=accuracy_of(prep.clean_logits, prep.inputs),
    )
    settings: dict[str, Any] = {"level": level, "ablation": ablation}
    if method == "path":
        circuit, rule = _path_circuit(
            model, task, evaluator, gap, threshold, top_k, metric, max_stages, memory_budget
        )
        settings.update(rule)
    else:
        scoring = _Scoring(method, level, ablation, steps, metric, memory_budget, experts, routing)
        scores = _score(model, task, scoring, evaluator.runner)
        if hold:
            evaluator.runner.release_runs()
        settings.update(scores.settings)
        settings["ablation"] = ablation
        circuit, rule = _select(
            scores, evaluator, gap, threshold, top_k, target_faithfulness, selection
        )
        settings.update(rule)
    circuit = circuit.with_metadata(level="node" if method == "path" else level)
    faith = evaluator.interval(circuit, seed=BOOTSTRAP_SEED)
    settings.update(confidence=faith.confidence, n_boot=faith.n_boot, bootstrap_seed=faith.seed)
    goal = settings.get("target_faithfulness")
    if settings.get("rule") == "auto" and goal is not None and not faith.low >= goal - _TOLERANCE:
        raise MetricError(
            f"no circuit of task {task.name!r} reaches the faithfulness target {goal}: even "
            f"all {len(circuit)} scored {level}s give {faith} (the {faith.confidence:.0%} "
            f"interval over {len(task)} prompts) under {ablation!r} ablation, so the metric "
            "does not measure what the circuit does. Check that the model does the task "
            "(rl.evaluate(model, task)), use more prompts, or another ablation."
        )
    return circuit.with_metadata(
        model=_spec(model),
        # MIB's cfg needs d_model (for neuron-level circuits); a circuit has no model.
        d_model=int(model.cfg.d_model),
        task=task.name,
        n_prompts=len(task),
        task_seed=task.seed,
        method=method,
        settings=settings,
        faithfulness=faith.value,
        faithfulness_interval=faith.bounds,
        clean_metric=evaluator.full,
        library_version=_version(),
    )


# ---- rules --------------------------------------------------------------------------------


def check_separates(
    clean: Float[Tensor, " batch"],
    corrupted: Float[Tensor, " batch"],
    task: str,
    *,
    accuracy: float | None = None,
) -> float:
    """The mean clean − corrupted gap, or MetricError if the model does not do the task.

    The test is ``reuse_lens.separation``'s, shared with faithfulness and the study: the
    gap's bootstrap interval must exclude 0 and the gap must reach ``MIN_EFFECT`` spreads
    of the metric. A model that only guesses gives a gap of noise, and every circuit
    "found" in noise is noise. The refusal gives the accuracy (when given), the gap and
    its interval.
    """
    return check_separation(clean, corrupted, task, accuracy=accuracy).gap


def _check_rule(
    threshold: float | None,
    top_k: int | None,
    target: float | None,
    selection: str | None,
    level: str,
) -> None:
    if threshold is not None and top_k is not None:
        raise ValueError("give threshold or top_k, not both")
    if target is not None and (threshold is not None or top_k is not None):
        raise ValueError(
            "target_faithfulness picks the size itself: drop threshold/top_k to use it"
        )
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if target is not None and not 0 < target <= 1:
        raise ValueError(f"target_faithfulness must be in (0, 1], got {target!r}")
    if selection is not None:
        if selection != "greedy":
            raise ValueError(f"unknown selection {selection!r}: the only option is 'greedy'")
        if level != "edge" or top_k is None:
            raise ValueError(
                "selection='greedy' grows an edge circuit: give level='edge' and top_k"
            )


@dataclass(frozen=True)
class _Scoring:
    """How ``discover_circuit`` scores nodes or edges before it selects them."""

    method: str
    level: str
    ablation: Ablation
    steps: int
    metric: str | Metric | None
    memory_budget: MemoryBudget
    experts: bool
    routing: RoutingMode


def _score(
    model: TransformerBridge, task: Task, how: _Scoring, runner: AblationRunner
) -> NodeScores | EdgeScores:
    """The scores a circuit is cut from. Activation patching takes the evaluator's
    ``runner``: with expert nodes the runner itself (the same runs, the same sources),
    else its preparation, whose bridge passes it would otherwise run again; edge
    attribution takes the preparation's verified forward and unablated runs."""
    if how.method == "activation" and how.experts:
        return expert_activation_patching(
            model,
            task,
            nodes="all",
            ablation=how.ablation,
            routing=how.routing,
            metric=how.metric,
            batch_size=None,
            memory_budget=how.memory_budget,
            runner=runner,
        )
    if how.method == "activation":
        return _activation_patching(
            model,
            task,
            nodes="all",
            ablation=how.ablation,
            direction="noising",
            per_position=False,
            component="out",
            metric=how.metric,
            batch_size=None,
            memory_budget=how.memory_budget,
            prep=runner.prep.renewed(),
        )
    return _attribution_patching(
        model,
        task,
        method=how.method,  # type: ignore[arg-type]
        level=how.level,  # type: ignore[arg-type]
        steps=how.steps,
        per_position=False,
        metric=how.metric,
        batch_size=None,
        engine="auto",
        memory_budget=how.memory_budget,
        experts=how.experts,
        routing=how.routing,
        prep=runner.prep if how.level == "edge" else None,
    )


def _select(
    scores: NodeScores | EdgeScores,
    evaluator: CircuitEvaluator,
    gap: float,
    threshold: float | None,
    top_k: int | None,
    target: float | None,
    selection: str | None,
) -> tuple[Circuit, dict[str, Any]]:
    order = ranked(scores)
    if isinstance(scores, EdgeScores):
        values = scores.as_dict()
        edge_scores = {(e.sender.name, e.receiver_name): values[e.name] for e in scores.edges}
        by_key = edge_scores
    else:
        by_key = scores.as_dict()
        edge_scores = {}
    if selection == "greedy":
        assert top_k is not None and isinstance(scores, EdgeScores)
        kept: list[Any] = _greedy(edge_scores, top_k)
        rule: dict[str, Any] = {"rule": "greedy", "top_k": top_k}
    elif top_k is not None:
        kept = order[:top_k]
        rule = {"rule": "top_k", "top_k": top_k}
    elif threshold is not None:
        kept = [x for x in order if abs(by_key[x]) >= threshold * abs(gap)]  # type: ignore[index]
        rule = {"rule": "threshold", "threshold": threshold}
    else:
        goal = DEFAULT_TARGET if target is None else target
        level: Level = "edge" if isinstance(scores, EdgeScores) else "node"
        lows = prefix_lower_bounds(evaluator, order, level)
        most = evaluator.runner.circuits_per_pass(level)
        sizes = prefix_sizes(len(order), level)
        grow = 1 if evaluator.runner.prep.clean.device.type == "cpu" else 2
        size = select_prefix(len(order), lows, goal - _TOLERANCE, sizes=sizes, grow=grow, most=most)
        kept = order[:size]
        rule = {"rule": "auto", "target_faithfulness": goal}
    node_scores = (
        scores.to_node_scores().as_dict() if isinstance(scores, EdgeScores) else scores.as_dict()
    )
    node_scores = {k: v for k, v in node_scores.items() if not math.isnan(v)}
    if isinstance(scores, EdgeScores):
        circuit = Circuit.from_edges(
            kept, evaluator.shape, node_scores=node_scores, edge_scores=edge_scores
        )
    else:
        circuit = Circuit.from_nodes(kept, evaluator.shape, node_scores=node_scores)
    return circuit, rule


def prefix_intervals(
    evaluator: CircuitEvaluator,
    order: Sequence[str] | Sequence[tuple[str, str]],
    level: Literal["node", "edge"],
    sizes: Sequence[int],
    memo: EdgeMemo | None = None,
) -> list[FaithfulnessInterval]:
    """The faithfulness and interval of the first ``k`` of ``order`` for each ``k`` in
    ``sizes``, evaluated in one batch (draws seeded with ``BOOTSTRAP_SEED``).

    ``memo`` (edges): the senders' outputs held from the previous batch of the same
    ranking, which the next prefixes share (``EdgeMemo``); it changes no value."""
    resamples = evaluator.resamples(
        confidence=DEFAULT_CONFIDENCE, n_boot=DEFAULT_N_BOOT, seed=BOOTSTRAP_SEED
    )
    prefixes = [order[:k] for k in sizes]
    if level == "edge":
        return evaluator.edge_intervals(prefixes, resamples, memo)  # type: ignore[arg-type]
    return evaluator.node_intervals(prefixes, resamples)  # type: ignore[arg-type]


def prefix_lower_bounds(
    evaluator: CircuitEvaluator,
    order: Sequence[str] | Sequence[tuple[str, str]],
    level: Literal["node", "edge"],
) -> Callable[[list[int]], list[float]]:
    """The automatic rule's criterion, a function of prefix sizes: the lower end of each
    prefix's bootstrap interval. Edge prefixes, asked for in rising batches, carry their
    senders' outputs from one batch to the next (``EdgeMemo``): a prefix recomputes only
    the senders downstream of the edges it adds."""
    memo = EdgeMemo() if level == "edge" else None
    return lambda sizes: [iv.low for iv in prefix_intervals(evaluator, order, level, sizes, memo)]


def prefix_sizes(n: int, level: Literal["node", "edge"] = "node") -> list[int]:
    """The prefix sizes the automatic rule considers for a ranking of ``n``, ascending.

    Nodes: every size from 1 to ``n``. Edges, whose counts run into the thousands: every
    size up to ``EDGE_SIZES_EXACT`` (32), then sizes each ``EDGE_SIZE_STEP`` (5%) larger
    than the last (rounded up), and ``n``: an edge circuit is sized to within 5%, and
    the rule evaluates about 20 sizes per tenfold of the circuit's size instead of every
    one of them.
    """
    if n < 1:
        raise ValueError("there is nothing to select: no node or edge was scored")
    if level == "node" or n <= EDGE_SIZES_EXACT:
        return list(range(1, n + 1))
    sizes = list(range(1, EDGE_SIZES_EXACT + 1))
    while sizes[-1] < n:
        sizes.append(min(n, max(sizes[-1] + 1, math.ceil(sizes[-1] * (1 + EDGE_SIZE_STEP)))))
    return sizes


def select_prefix(
    n: int,
    values: Callable[[list[int]], Sequence[float]],
    target: float,
    *,
    sizes: Sequence[int] | None = None,
    first: int = _FIRST_BATCH,
    grow: int = 2,
    most: int | None = None,
) -> int:
    """The smallest prefix size whose value reaches ``target``, else ``n``.

    It returns exactly what scanning every size of ``sizes`` (by default 1..n) from the
    smallest up returns, without evaluating the sizes above the answer: ``values(batch)``
    evaluates a batch of sizes at once, and the batches go up from the smallest size,
    ``first`` sizes, then ``grow`` times as many each time (at most ``most``, where given:
    what one pass of the engine holds), until a batch holds a size that reaches the target.
    No size is skipped, because faithfulness need not grow with the circuit: a prefix
    that adds a node working against the task falls, so a size below a bisection's
    bracket can reach the target when the sizes around it do not, and only a scan of
    every size below the answer rules that out. The engine is what makes it cheap: the
    circuits of one batch share the runs of their common early blocks, and each computes
    only the heads and MLPs (senders) it keeps (``patching._circuit_forward``,
    ``patching._sparse_edges``); edge
    prefixes compute a sender once per distinct set of inputs, and carry those of the
    last prefix to the next batch (``EdgeMemo``), so a prefix costs the senders
    downstream of the edges it adds. At most one batch is evaluated past the answer.

    Arguments:
        n: how many nodes (edges) the ranking has; size ``n`` keeps all of them.
        values: the value of each prefix size in a list (for the automatic rule, the lower
            end of its faithfulness interval).
        target: the value to reach.
        sizes: the sizes to consider, ascending, ending at ``n`` (``prefix_sizes``).
        first: sizes in the first batch.
        grow: each batch is this many times the last (1: all alike).
        most: the largest batch.

    Returns:
        The smallest size whose value is at least ``target``, or ``n`` when none is.
    """
    candidates = list(range(1, n + 1)) if sizes is None else list(sizes)
    if n < 1 or not candidates:
        raise ValueError("there is nothing to select: no node or edge was scored")
    if candidates[-1] != n or any(b <= a for a, b in itertools.pairwise(candidates)):
        raise ValueError(f"sizes must rise strictly and end at n = {n}")
    batch = max(1, first if most is None else min(first, most))
    start = 0
    while start < len(candidates):
        chunk = candidates[start : start + batch]
        found = values(chunk)
        hit = next((k for k, v in zip(chunk, found, strict=True) if v >= target), None)
        if hit is not None:
            return hit
        start += len(chunk)
        batch = grow * batch if most is None else min(grow * batch, max(1, most))
    return n


def _greedy(edge_scores: dict[tuple[str, str], float], k: int) -> list[tuple[str, str]]:
    """Grow from the logits: add the best |score| edge whose receiver is already reached."""
    reached = {"logits"}
    kept: list[tuple[str, str]] = []
    remaining = dict(edge_scores)
    while len(kept) < k and remaining:
        candidates = [e for e in remaining if _receiver_node(e[1]) in reached]
        if not candidates:
            break
        best = max(candidates, key=lambda e: abs(remaining[e]))
        kept.append(best)
        del remaining[best]
        reached.add(best[0])
    return kept


def _receiver_node(receiver: str) -> str:
    return receiver.split("<", 1)[0]


# ---- path patching ------------------------------------------------------------------------


def _path_circuit(
    model: TransformerBridge,
    task: Task,
    evaluator: CircuitEvaluator,
    gap: float,
    threshold: float | None,
    top_k: int | None,
    metric: str | Metric | None,
    max_stages: int | None,
    memory_budget: MemoryBudget = None,
) -> tuple[Circuit, dict[str, Any]]:
    shape = shape_of(model)
    if threshold is None and top_k is None:
        threshold = DEFAULT_PATH_THRESHOLD

    def select(candidates: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
        """The edges of one stage that pass the rule.

        With ``top_k``, the ``k`` senders whose best edge of the stage is largest are kept,
        each with its edges at least as large as the weakest kept sender's best edge.
        """
        if threshold is not None:
            return {e: v for e, v in candidates.items() if abs(v) >= threshold * abs(gap)}
        assert top_k is not None
        best: dict[str, float] = {}
        for (sender, _), value in candidates.items():
            best[sender] = max(best.get(sender, 0.0), abs(value))
        kept = [n for n in sorted(best, key=lambda n: -best[n]) if best[n] > 0][:top_k]
        if not kept:
            return {}
        floor = min(best[n] for n in kept)
        return {e: v for e, v in candidates.items() if e[0] in kept and abs(v) >= floor}

    def scored(scores: NodeScores, receiver: str) -> dict[tuple[str, str], float]:
        return {(n, receiver): v for n, v in scores.as_dict().items() if not math.isnan(v)}

    stages: dict[str, int] = {}
    node_scores: dict[str, float] = {}
    edges: dict[tuple[str, str], float] = {}
    frontier = ["logits"]
    # Each stage after the first reaches at least one layer further down.
    limit = shape.n_layers + 1 if max_stages is None else max_stages
    stage = 0
    while frontier and stage < limit:
        candidates: dict[tuple[str, str], float] = {}
        for receiver in frontier:
            if receiver == "logits":
                found = path_patching(model, task, metric=metric, memory_budget=memory_budget)
                candidates |= scored(found, "logits")
                continue
            head = parse_node(receiver)
            assert isinstance(head, AttentionHead)
            if head.layer == 0:
                continue  # nothing sends to layer 0 but the embedding
            for qkv in ("q", "k", "v"):
                scores = path_patching(
                    model,
                    task,
                    receivers=[receiver],
                    receiver_input=qkv,
                    metric=metric,
                    memory_budget=memory_budget,
                )
                candidates |= scored(scores, f"{receiver}<{qkv}>")
        new: set[str] = set()
        for (sender, receiver), value in select(candidates).items():
            edges[(sender, receiver)] = value
            if sender not in stages:
                stages[sender] = stage
                new.add(sender)
            if abs(value) > abs(node_scores.get(sender, 0.0)):
                node_scores[sender] = value
        frontier = sorted(n for n in new if isinstance(parse_node(n), AttentionHead))
        stage += 1
    circuit = Circuit(
        nodes=frozenset(stages),
        shape=shape,
        edges=frozenset(edges),
        node_scores=node_scores,
        edge_scores=edges,
        stages=stages,
    )
    rule: dict[str, Any] = {
        "rule": "path stages",
        "threshold": threshold,
        "top_k_senders_per_stage": top_k,
        "n_stages": max(stages.values(), default=-1) + 1,
    }
    return circuit, rule


def _spec(model: TransformerBridge) -> str:
    from reuse_lens.models import model_spec

    return model_spec(model)


def _version() -> str:
    import reuse_lens

    return reuse_lens.__version__
