"""What a study found (``StudyResult``), its JSON summary, and scores read back from circuits."""

from __future__ import annotations

import json
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
    from reuse_lens.study.finetune import FineTuneAnalysis

__all__ = ["StudyResult", "save_summary", "scores_of"]


@dataclass
class StudyResult:
    """Everything a study found; ``reuse_lens.report.html.write`` renders it."""

    config: StudyConfig
    models: dict[str, str]
    evaluations: pd.DataFrame
    circuits: dict[str, Circuit]
    scores: dict[str, NodeScores]
    curves: dict[str, FaithfulnessCurve]
    circuit_table: pd.DataFrame
    method_agreement: pd.DataFrame
    task_overlap: OverlapReport
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
        "task_overlap": json.loads(result.task_overlap.to_json()),
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
    from reuse_lens._io import write_text_atomic

    write_text_atomic(path, json.dumps(doc, indent=2, default=float))
