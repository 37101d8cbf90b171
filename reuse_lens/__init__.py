"""reuse_lens: which parts of a model does a task use, and which do other tasks reuse?

The public API is exactly what this module exports. Submodules load on first use, so
``import reuse_lens`` stays cheap; torch and TransformerLens load with the first call.

>>> import reuse_lens as rl
>>> model = rl.load_model("zoo:base")
>>> task = rl.tasks.load("ioi", model, n=64, seed=0)
>>> rl.evaluate(model, task)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from reuse_lens import circuits, interventions, nodes, plot, report, study, tasks, zoo
    from reuse_lens.circuits.circuit import Circuit, CircuitError
    from reuse_lens.circuits.discovery import discover_circuit
    from reuse_lens.circuits.measure import (
        FaithfulnessCurve,
        FaithfulnessInterval,
        faithfulness,
        faithfulness_curve,
        random_baseline,
    )
    from reuse_lens.compare import edges as edge_overlap
    from reuse_lens.compare import overlap
    from reuse_lens.compare.cross_model import cross_model_patching, cross_model_recovery
    from reuse_lens.compare.drift import DriftReport, component_drift
    from reuse_lens.compare.edges import EdgeOverlapReport, compare_edges
    from reuse_lens.compare.overlap import OverlapReport, compare
    from reuse_lens.compare.reuse import (
        circuit_stability,
        cross_model_faithfulness,
        cross_task_ablation,
        cross_task_faithfulness,
    )
    from reuse_lens.evaluation import evaluate, normalized_metric
    from reuse_lens.models import ModelLoadError, load_model
    from reuse_lens.nodes import (
        MLP,
        AttentionHead,
        Edge,
        UnsupportedArchitectureError,
        nodes_of,
        parse_node,
    )
    from reuse_lens.patching._hooks import PatternEditsDropped
    from reuse_lens.patching.activation import activation_patching
    from reuse_lens.patching.attribution import attribution_patching
    from reuse_lens.patching.edges import EdgeScores
    from reuse_lens.patching.path import path_patching
    from reuse_lens.patching.scores import NodeScores
    from reuse_lens.tasks.task import Task

__all__ = [
    "MLP",
    "AttentionHead",
    "Circuit",
    "CircuitError",
    "DriftReport",
    "Edge",
    "EdgeOverlapReport",
    "EdgeScores",
    "FaithfulnessCurve",
    "FaithfulnessInterval",
    "ModelLoadError",
    "NodeScores",
    "OverlapReport",
    "PatternEditsDropped",
    "Task",
    "UnsupportedArchitectureError",
    "__version__",
    "activation_patching",
    "attribution_patching",
    "circuit_stability",
    "circuits",
    "compare",
    "compare_edges",
    "component_drift",
    "cross_model_faithfulness",
    "cross_model_patching",
    "cross_model_recovery",
    "cross_task_ablation",
    "cross_task_faithfulness",
    "discover_circuit",
    "edge_overlap",
    "evaluate",
    "faithfulness",
    "faithfulness_curve",
    "interventions",
    "load_model",
    "nodes",
    "nodes_of",
    "normalized_metric",
    "overlap",
    "parse_node",
    "path_patching",
    "plot",
    "random_baseline",
    "report",
    "study",
    "tasks",
    "zoo",
]

_LAZY: dict[str, tuple[str, str | None]] = {
    # The loader behind the boundary checks (a missing folder, a folder without a tokenizer).
    "load_model": ("reuse_lens.models", "load_model"),
    "ModelLoadError": ("reuse_lens.models", "ModelLoadError"),
    "Task": ("reuse_lens.tasks.task", "Task"),
    "evaluate": ("reuse_lens.evaluation", "evaluate"),
    "normalized_metric": ("reuse_lens.evaluation", "normalized_metric"),
    "AttentionHead": ("reuse_lens.nodes", "AttentionHead"),
    "MLP": ("reuse_lens.nodes", "MLP"),
    "Edge": ("reuse_lens.nodes", "Edge"),
    "nodes_of": ("reuse_lens.nodes", "nodes_of"),
    "parse_node": ("reuse_lens.nodes", "parse_node"),
    "UnsupportedArchitectureError": ("reuse_lens.nodes", "UnsupportedArchitectureError"),
    "PatternEditsDropped": ("reuse_lens.patching._hooks", "PatternEditsDropped"),
    "activation_patching": ("reuse_lens.patching.activation", "activation_patching"),
    "path_patching": ("reuse_lens.patching.path", "path_patching"),
    "attribution_patching": ("reuse_lens.patching.attribution", "attribution_patching"),
    "EdgeScores": ("reuse_lens.patching.edges", "EdgeScores"),
    "NodeScores": ("reuse_lens.patching.scores", "NodeScores"),
    "Circuit": ("reuse_lens.circuits.circuit", "Circuit"),
    "CircuitError": ("reuse_lens.circuits.circuit", "CircuitError"),
    "discover_circuit": ("reuse_lens.circuits.discovery", "discover_circuit"),
    "faithfulness": ("reuse_lens.circuits.measure", "faithfulness"),
    "faithfulness_curve": ("reuse_lens.circuits.measure", "faithfulness_curve"),
    "random_baseline": ("reuse_lens.circuits.measure", "random_baseline"),
    "FaithfulnessCurve": ("reuse_lens.circuits.measure", "FaithfulnessCurve"),
    "FaithfulnessInterval": ("reuse_lens.circuits.interval", "FaithfulnessInterval"),
    "compare": ("reuse_lens.compare.overlap", "compare"),
    "OverlapReport": ("reuse_lens.compare.overlap", "OverlapReport"),
    "circuits": ("reuse_lens.circuits", None),
    "overlap": ("reuse_lens.compare.overlap", None),
    "compare_edges": ("reuse_lens.compare.edges", "compare_edges"),
    "component_drift": ("reuse_lens.compare.drift", "component_drift"),
    "DriftReport": ("reuse_lens.compare.drift", "DriftReport"),
    "cross_model_patching": ("reuse_lens.compare.cross_model", "cross_model_patching"),
    "cross_model_recovery": ("reuse_lens.compare.cross_model", "cross_model_recovery"),
    "EdgeOverlapReport": ("reuse_lens.compare.edges", "EdgeOverlapReport"),
    "edge_overlap": ("reuse_lens.compare.edges", None),
    "circuit_stability": ("reuse_lens.compare.reuse", "circuit_stability"),
    "cross_task_faithfulness": ("reuse_lens.compare.reuse", "cross_task_faithfulness"),
    "cross_model_faithfulness": ("reuse_lens.compare.reuse", "cross_model_faithfulness"),
    "cross_task_ablation": ("reuse_lens.compare.reuse", "cross_task_ablation"),
    "interventions": ("reuse_lens.interventions", None),
    "plot": ("reuse_lens.plot", None),
    "report": ("reuse_lens.report", None),
    "study": ("reuse_lens.study", None),
    "nodes": ("reuse_lens.nodes", None),
    "tasks": ("reuse_lens.tasks", None),
    "zoo": ("reuse_lens.zoo", None),
}


# ``reuse_lens.compare`` is a subpackage and ``rl.compare`` a function. Python binds a
# subpackage to its parent's attribute when it is first imported, which would turn
# ``rl.compare`` into the module as soon as anything imports ``reuse_lens.compare.overlap``.
# Importing the (empty) package here, once, and unbinding it keeps the function's name.
importlib.import_module("reuse_lens.compare")
globals().pop("compare", None)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'reuse_lens' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
