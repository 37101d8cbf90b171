"""What a study found (``StudyResult``), its JSON summary, and scores read back from circuits."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reuse_lens.circuits.circuit import Circuit
from reuse_lens.patching.scores import NodeScores
from reuse_lens.study.config import StudyConfig

if TYPE_CHECKING:
    import pandas as pd

    from reuse_lens.circuits.measure import FaithfulnessCurve
    from reuse_lens.compare.edges import EdgeOverlapReport
    from reuse_lens.compare.overlap import OverlapReport
    from reuse_lens.separation import Separation
    from reuse_lens.study.finetune import FineTuneAnalysis

__all__ = ["StudyResult", "faithfulness_interval", "refused_pairs", "save_summary", "scores_of"]


@dataclass
class StudyResult:
    """Everything a study found; ``reuse_lens.report.html.write`` renders it.

    ``task_overlap`` is None when fewer than two tasks had a circuit in the base model:
    the study then reports what it could (the evaluations, the reasons each task was
    refused, the circuits it found and their comparisons across models) and no overlap.
    ``separations`` holds, by ``model/task``, whether each model does each task.
    """

    config: StudyConfig
    models: dict[str, str]
    evaluations: pd.DataFrame
    circuits: dict[str, Circuit]
    scores: dict[str, NodeScores]
    curves: dict[str, FaithfulnessCurve]
    circuit_table: pd.DataFrame
    method_agreement: pd.DataFrame
    task_overlap: OverlapReport | None
    model_overlap: dict[str, OverlapReport]
    within_model: dict[str, OverlapReport]
    stability: pd.DataFrame
    cross_task: pd.DataFrame
    cross_model: pd.DataFrame
    cross_ablation: pd.DataFrame
    interventions: list[dict[str, Any]]
    findings: list[str]
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)
    edge_overlap: EdgeOverlapReport | None = None
    fine_tuning: dict[str, FineTuneAnalysis] = field(default_factory=dict)
    """What each fine-tune changed and what its circuit reuses, by label (``ft-<task>``)."""
    claims: list[str] = field(default_factory=list)
    """The fine-tuning literature's two claims, tested on the study's fine-tunes."""
    files: tuple[str, ...] = ()
    """The circuit files of this study in ``out/circuits`` (node and edge circuits)."""
    other_files: tuple[str, ...] = ()
    """Circuit files in ``out/circuits`` that are not this study's (an earlier study's)."""
    separations: dict[str, Separation] = field(default_factory=dict)
    edge_circuits: dict[str, Circuit] = field(default_factory=dict)
    """Each base task's EAP-IG edge circuit, by task (``StudyConfig.edge_overlap``)."""
    point_edges: dict[str, Circuit] = field(default_factory=dict)
    """The edge circuit of a task with checkpoints at each point of its fine-tuning run
    (checkpoints and fine-tune), by ``model/task``."""

    @property
    def refused(self) -> dict[str, Separation]:
        """The ``model/task`` pairs the study wanted a circuit of and whose separation
        test failed: the model does not do the task, so no circuit was looked for."""
        return refused_pairs(self.skipped, self.separations)

    @property
    def n_circuit_files(self) -> int:
        """How many circuit files the study has under ``circuits/``: node and edge circuits."""
        return len(self.circuits) + len(self.edge_circuits) + len(self.point_edges)


def refused_pairs(
    skipped: Mapping[str, str], separations: Mapping[str, Separation]
) -> dict[str, Separation]:
    """The failed separation tests, by ``model/task``, of the circuits in ``skipped``
    (keys ``model/task/method``, or ``edges/task[/model]`` for an edge circuit, of the base
    model when no model is named)."""
    pairs = []
    for key in skipped:
        first, second, *rest = key.split("/")
        if first == "edges":
            pairs.append(f"{rest[0] if rest else 'base'}/{second}")
        else:
            pairs.append(f"{first}/{second}")
    return {
        pair: separations[pair]
        for pair in dict.fromkeys(pairs)
        if pair in separations and not separations[pair].separates
    }


def faithfulness_interval(circuit: Circuit) -> dict[str, float]:
    """``{"faithfulness_low": ..., "faithfulness_high": ...}`` from the circuit's
    ``metadata["faithfulness_interval"]`` (its bootstrap interval over prompts), or ``{}``
    when it has none, so that tables show an interval exactly where one was measured."""
    interval = circuit.metadata.get("faithfulness_interval")
    if interval is None:
        return {}
    low, high = interval
    return {"faithfulness_low": float(low), "faithfulness_high": float(high)}


def scores_of(circuit: Circuit) -> NodeScores:
    """The node scores a circuit was cut from, as NodeScores (NaN where unscored)."""
    meta = circuit.metadata
    return NodeScores.from_mapping(
        circuit.node_scores,
        circuit.shape,
        clean=float(meta.get("clean_metric", float("nan"))),
        corrupted=float(meta.get("corrupted_metric", float("nan"))),
        method=str(meta.get("method", "unknown")),
        settings=meta.get("settings", {}),
    )


def save_summary(result: StudyResult, path: str | Path) -> None:
    """The study's tables as one JSON file (for docs and for comparing runs)."""
    doc = {
        "config": {
            **asdict(result.config),
            "fine_tuned": dict(result.config.fine_tuned),
            "checkpoints": {t: list(s) for t, s in result.config.checkpoints.items()},
        },
        "models": result.models,
        "seconds": result.seconds,
        "evaluations": result.evaluations.to_dict(orient="records"),
        "circuits": result.circuit_table.to_dict(orient="records"),
        "method_agreement": result.method_agreement.to_dict(orient="records"),
        "stability": result.stability.to_dict(orient="records"),
        "task_overlap": (
            None if result.task_overlap is None else json.loads(result.task_overlap.to_json())
        ),
        "refused": {key: test.line() for key, test in result.refused.items()},
        "within_model": {k: json.loads(r.to_json()) for k, r in result.within_model.items()},
        "cross_task": result.cross_task.to_dict(),
        "cross_model": result.cross_model.to_dict(),
        "cross_ablation": result.cross_ablation.to_dict(),
        "interventions": result.interventions,
        "findings": result.findings,
    }
    if result.edge_overlap is not None:
        doc["edge_overlap"] = json.loads(result.edge_overlap.to_json())
    if result.fine_tuning:
        doc["fine_tuning"] = {k: a.to_dict() for k, a in result.fine_tuning.items()}
        doc["claims"] = result.claims
    from reuse_lens.report.summary import study_answer

    # The sentences the report opens with: the demo's index page reads them from here.
    doc["answer"] = study_answer(result)
    from reuse_lens._io import write_text_atomic

    write_text_atomic(path, json.dumps(doc, indent=2, default=float))
