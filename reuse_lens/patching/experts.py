"""Activation patching with the experts of mixture-of-experts MLPs as nodes.

``activation_patching(model, task, experts=True)`` lands here. Every node is patched in
its own run through hooks on the bridge: a head at ``hook_z``, a dense MLP at
``hook_mlp_out``, an expert by replacing its term in its block's sum
(``_experts.ExpertRuns``). A node patched alone is the circuit of every other node, so
the runs are the ablation engine's (``ablation.AblationRunner``), which also evaluates
expert circuits; the effect is the metric of that run minus the unpatched clean metric.
The router's behaviour in the patched runs is ``routing`` (``_experts``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from reuse_lens.nodes import MLP, AttentionHead, Expert, ModelShape, Node, NodeNameError
from reuse_lens.patching._common import parse_all
from reuse_lens.patching._experts import RoutingMode
from reuse_lens.patching.ablation import AblationRunner, NodeMask
from reuse_lens.patching.scores import NodeScores

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens._memory import MemoryBudget
    from reuse_lens.tasks.metrics import Metric
    from reuse_lens.tasks.task import Task

__all__ = ["expert_activation_patching", "select_expert_nodes"]


def select_expert_nodes(shape: ModelShape, nodes: str | Sequence[str | Node]) -> list[Node]:
    """The nodes of ``shape`` that ``nodes`` names: ``all``, ``heads``, ``mlps`` (experts
    and dense MLPs) or a list of names, each checked."""
    if not isinstance(nodes, str):
        return parse_all(list(nodes), shape)
    if nodes not in ("all", "heads", "mlps"):
        return parse_all([nodes], shape)
    every = shape.nodes()
    if nodes == "heads":
        return [n for n in every if isinstance(n, AttentionHead)]
    if nodes == "mlps":
        return [n for n in every if isinstance(n, MLP | Expert)]
    return every


def expert_activation_patching(
    model: TransformerBridge,
    task: Task,
    *,
    nodes: str | Sequence[str | Node],
    ablation: str,
    routing: RoutingMode,
    metric: str | Metric | None,
    batch_size: int | None,
    memory_budget: MemoryBudget,
    runner: AblationRunner | None = None,
) -> NodeScores:
    """``activation_patching`` with expert nodes, in the noising direction; ``runner``, an
    expert runner of the same (model, task, ablation, metric, routing), spares the set-up
    (``discover_circuit`` hands its evaluator's on)."""
    if runner is None:
        runner = AblationRunner(
            model,
            task,
            ablation=ablation,  # type: ignore[arg-type]
            metric=metric,
            batch_size=batch_size,
            memory_budget=memory_budget,
            experts=True,
            routing=routing,
        )
    shape = runner.shape
    chosen = select_expert_nodes(shape, nodes)
    if not chosen:
        raise NodeNameError(f"nodes={nodes!r} selects no node of this model")
    masks = [NodeMask.of(shape, [node], keep=False) for node in chosen]
    values = runner.node_values(masks)
    base = runner.prep.clean_metric.cpu()
    effects = (values - base).mean(1)
    scores = NodeScores.from_mapping(
        {node.name: float(effect) for node, effect in zip(chosen, effects, strict=True)},
        shape,
        clean=float(base.mean()),
        corrupted=float(runner.prep.corrupted_metric.mean()),
        method="activation",
        settings={
            "nodes": nodes if isinstance(nodes, str) else [str(n) for n in nodes],
            "ablation": ablation,
            "direction": "noising",
            "per_position": False,
            "component": "out",
            "metric": getattr(runner.prep.metric, "name", repr(runner.prep.metric)),
            "mean_over": "clean prompts" if ablation == "mean" else None,
            "engine": "hooks",
            "experts": True,
            "routing": routing,
            "n_prompts": runner.prep.n,
        },
    )
    return scores
