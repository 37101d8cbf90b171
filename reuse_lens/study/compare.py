"""A study's second stage: its circuits compared across methods, tasks and models.

Everything here runs where the study was started, on the models it loaded: overlap and
its significance, cross-task and cross-model faithfulness, cross-task ablation and
Merullo et al.'s intervention are cheap next to finding the circuits.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reuse_lens.circuits.circuit import Circuit
from reuse_lens.circuits.measure import FaithfulnessCurve
from reuse_lens.patching.scores import NodeScores
from reuse_lens.separation import Separation
from reuse_lens.study.config import FAITHFUL, StudyConfig
from reuse_lens.study.finetune import analyse_fine_tunes, claims
from reuse_lens.study.result import StudyResult, refused_pairs

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.compare.overlap import OverlapReport
    from reuse_lens.compare.reuse import Stability
    from reuse_lens.tasks.task import Task

__all__ = ["StudyRun", "compare_circuits"]


@dataclass
class StudyRun:
    """What the discovery stage of a study hands to the comparison stage.

    ``stability`` holds, per base task, the Stability of its resampled circuits, or None
    when the model did not separate the task on one of its resamples. ``edge_circuits``
    holds each base task's EAP-IG edge circuit, when the study compares edges, and
    ``point_edges`` the edge circuit of a task with checkpoints at each point of its run,
    by ``model/task``.
    ``separations`` holds, by ``model/task``, whether each model does each task.
    """

    config: StudyConfig
    specs: dict[str, str]
    models: dict[str, TransformerBridge]
    tasks: dict[str, Task]
    evaluations: pd.DataFrame
    circuits: dict[str, Circuit]
    skipped: dict[str, str]
    scores: dict[str, NodeScores]
    curves: dict[str, FaithfulnessCurve]
    rows: list[dict[str, Any]]
    stability: dict[str, Stability | None]
    start: float
    edge_circuits: dict[str, Circuit] = field(default_factory=dict)
    point_edges: dict[str, Circuit] = field(default_factory=dict)
    separations: dict[str, Separation] = field(default_factory=dict)

    def circuit(self, model: str, task: str) -> Circuit | None:
        """The primary method's circuit, if one was found."""
        return self.circuits.get(f"{model}/{task}/{self.config.methods[0]}")


def _agreement(run: StudyRun) -> pd.DataFrame:
    import pandas as pd

    from reuse_lens.compare.overlap import compare

    rows = []
    pairs = sorted({tuple(k.split("/")[:2]) for k in run.circuits})
    for model_label, task_name in pairs:
        for a, b in itertools.combinations(run.config.methods, 2):
            ka, kb = f"{model_label}/{task_name}/{a}", f"{model_label}/{task_name}/{b}"
            if ka not in run.circuits or kb not in run.circuits:
                continue
            report = compare({a: run.circuits[ka], b: run.circuits[kb]})
            rows.append(
                {
                    "model": model_label, "task": task_name, "method_a": a, "method_b": b,
                    "jaccard": report.jaccard(a, b), "jaccard_heads": report.jaccard(a, b, "heads"),
                    "jaccard_mlps": report.jaccard(a, b, "mlps"),
                }
            )  # fmt: skip
    return pd.DataFrame(rows)


def _stability(run: StudyRun, task_names: list[str]) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for task_name in task_names if run.config.n_boot >= 2 else []:
        result = run.stability.get(task_name)
        if result is None:  # a resample on which the model does not separate the task
            rows.append({"task": task_name, "mean_jaccard": math.nan,
                         "std_jaccard": math.nan, "n_boot": 0})  # fmt: skip
            continue
        rows.append(
            {"task": task_name, "mean_jaccard": result.mean_jaccard,
             "std_jaccard": result.std_jaccard, "n_boot": result.n_boot}
        )  # fmt: skip
    return pd.DataFrame(rows, columns=["task", "mean_jaccard", "std_jaccard", "n_boot"])


def compare_circuits(run: StudyRun) -> StudyResult:
    """Every comparison of the study's circuits, as the StudyResult the report renders."""
    import pandas as pd

    from reuse_lens.compare.edges import compare_edges
    from reuse_lens.compare.overlap import compare
    from reuse_lens.compare.reuse import (
        cross_model_faithfulness,
        cross_task_ablation,
        cross_task_faithfulness,
    )

    config, base = run.config, run.models["base"]
    base_circuits = {t: c for t in config.tasks if (c := run.circuit("base", t)) is not None}
    # With fewer than two tasks there is no overlap of tasks: the study still reports
    # what it found (the evaluations, why tasks were refused, the circuits, and what the
    # fine-tunes did with them).
    stability = _stability(run, list(base_circuits))
    task_overlap = compare(base_circuits) if len(base_circuits) >= 2 else None
    if task_overlap is not None and len(stability):
        ceilings = {
            t: v
            for t, v in zip(stability["task"], stability["mean_jaccard"], strict=True)
            if not math.isnan(v)
        }
        task_overlap = task_overlap.with_stability(ceilings)
    model_overlap = {}
    for t in config.fine_tuned:
        pair = {"base": run.circuit("base", t), f"ft-{t}": run.circuit(f"ft-{t}", t)}
        if all(c is not None for c in pair.values()):
            model_overlap[t] = compare(pair)  # type: ignore[arg-type]
    within_model = {}
    for t in config.fine_tuned:
        pair = {"ioi": run.circuit(f"ft-{t}", "ioi"), t: run.circuit(f"ft-{t}", t)}
        if t != "ioi" and all(c is not None for c in pair.values()):
            within_model[f"ft-{t}"] = compare(pair)  # type: ignore[arg-type]
    base_tasks = {t: run.tasks[t] for t in base_circuits}
    ablation = config.ablation
    budget = config.memory_budget
    cross_task = cross_task_faithfulness(
        base, base_circuits, base_tasks, ablation=ablation, memory_budget=budget
    ) if base_circuits else pd.DataFrame()  # fmt: skip
    tuned = {t: base_circuits[t] for t in config.fine_tuned if t in base_circuits}
    cross_model = cross_model_faithfulness(
        tuned, run.models, {t: run.tasks[t] for t in tuned}, ablation=ablation,
        memory_budget=budget,
    ) if tuned else pd.DataFrame()  # fmt: skip
    cross_ablation = cross_task_ablation(
        base, base_circuits, base_tasks, ablation=ablation, memory_budget=budget
    ) if base_circuits else pd.DataFrame()  # fmt: skip
    interventions = (
        _interventions(config, base, run.tasks, task_overlap) if task_overlap is not None else []
    )
    interventions += _within_model_interventions(run, within_model)
    circuit_table = pd.DataFrame(run.rows)
    edges = {t: run.edge_circuits[t] for t in base_circuits if t in run.edge_circuits}
    edge_overlap = compare_edges(edges) if len(edges) >= 2 else None
    # The answer (reuse_lens.compare.answer.study_answer) opens the report and results.md
    # on its own; the findings are what follows it. A task a model does not do is one
    # line with its numbers, however many circuits it would have had.
    findings = [
        f"No circuit of {pair.split('/')[1]} in {pair.split('/')[0]}: the model does not do "
        f"the task: {test.reason()} ({test.brief()})."
        for pair, test in refused_pairs(run.skipped, run.separations).items()
    ]
    findings += [
        f"No circuit for {key}: {why}."
        for key, why in run.skipped.items()
        if "does not do the task" not in why
    ]
    findings += _findings(circuit_table, task_overlap, model_overlap, cross_model, interventions)
    findings += _within_findings(within_model)
    fine_tuning = analyse_fine_tunes(run, base_circuits) if config.fine_tuning else {}
    return StudyResult(
        config=config, models=run.specs, evaluations=run.evaluations, circuits=run.circuits,
        scores=run.scores, curves=run.curves, circuit_table=circuit_table,
        method_agreement=_agreement(run), task_overlap=task_overlap,
        model_overlap=model_overlap, within_model=within_model, stability=stability,
        cross_task=cross_task,
        cross_model=cross_model, cross_ablation=cross_ablation, interventions=interventions,
        findings=findings, seconds=time.perf_counter() - run.start, skipped=run.skipped,
        edge_overlap=edge_overlap, fine_tuning=fine_tuning,
        claims=claims(fine_tuning, base_circuits) if fine_tuning else [],
        separations=dict(run.separations), edge_circuits=dict(run.edge_circuits),
        point_edges=dict(run.point_edges),
    )  # fmt: skip


def _interventions(
    config: StudyConfig,
    model: TransformerBridge,
    tasks: Mapping[str, Task],
    overlap: OverlapReport,
) -> list[dict[str, Any]]:
    """Merullo et al.'s repair experiment, and the ablation of shared heads with a control."""
    from reuse_lens.interventions import ablate_heads

    out: list[dict[str, Any]] = []
    names = overlap.names
    if "ioi" in names and "colored_objects" in tasks:
        if "colored_objects" in names:
            heads = sorted(overlap.unique("ioi", "colored_objects", "heads"))
            which = "IOI-only heads (in the IOI circuit, not the Colored Objects one)"
        else:  # the model has no Colored Objects circuit: every IOI head is "IOI-only"
            heads = sorted(overlap.circuits["ioi"].heads)
            which = "the IOI circuit's heads (the model has no Colored Objects circuit)"
        if heads:
            out.append(_uniform_attention(model, tasks, heads, "uniform attention", which))
    for a, b in itertools.combinations(names, 2):
        shared = sorted(overlap.shared(a, b, "heads"))
        if not shared:
            continue
        for task_name in (a, b):
            result = ablate_heads(
                model, tasks[task_name], shared, ablation=config.ablation,
                n_random=config.n_random, seed=config.seed, memory_budget=config.memory_budget,
            )  # fmt: skip
            out.append(
                {
                    "name": "ablate shared heads", "task": task_name, "heads": shared,
                    "description": f"heads shared by {a} and {b} ablated, against "
                    f"{config.n_random} random sets of {len(shared)} heads",
                    **_result_fields(result.result),
                    "random_metric": result.random_metric,
                    "random_metric_std": result.random_metric_std,
                    "percentile": result.percentile,
                }
            )  # fmt: skip
        break  # the first pair with shared heads: the demo's second experiment
    return out


def _within_model_interventions(
    run: StudyRun, within_model: Mapping[str, OverlapReport]
) -> list[dict[str, Any]]:
    """Merullo et al.'s repair inside a model that has both an IOI and a Colored Objects circuit."""
    out = []
    for label, overlap in within_model.items():
        if "colored_objects" not in overlap.names:
            continue
        heads = sorted(overlap.unique("ioi", "colored_objects", "heads"))
        if heads:
            name, which = f"uniform attention in {label}", f"IOI-only heads of {label}"
            out.append(_uniform_attention(run.models[label], run.tasks, heads, name, which))
    return out


def _uniform_attention(
    model: TransformerBridge, tasks: Mapping[str, Task], heads: list[str], name: str, which: str
) -> dict[str, Any]:
    """One row of Merullo et al.'s repair: ``heads`` attend uniformly over the wrong colours."""
    from reuse_lens.interventions import uniform_attention

    result = uniform_attention(model, tasks["colored_objects"], heads, "wrong")
    return {
        "name": name, "task": "colored_objects", "heads": heads,
        "description": f"{which} attend uniformly over the wrong colours at the answer "
        "position (Merullo et al. 2024)",
        **_result_fields(result),
    }  # fmt: skip


def _within_findings(within_model: Mapping[str, OverlapReport]) -> list[str]:
    return [
        f"Inside {label}, {_sharing(overlap, *overlap.names[:2])}"
        for label, overlap in within_model.items()
    ]


def _sharing(overlap: OverlapReport, a: str, b: str) -> str:
    """The finding that a and b share N heads: Jaccard, chance, raw and corrected p-value."""
    from reuse_lens.compare.answer import CORRECTION_NAMES

    shared = sorted(overlap.shared(a, b, "heads"))
    corrected = overlap.p_value(a, b, "heads", corrected=True)
    how = CORRECTION_NAMES[overlap.correction]
    return (
        f"{a} and {b} share {len(shared)} heads ({', '.join(shared) or 'none'}): head Jaccard "
        f"{overlap.jaccard(a, b, 'heads'):.2f}, chance "
        f"{overlap.expected_jaccard(a, b, 'heads'):.2f}, corrected p = {corrected:.3g} "
        f"({how} over the pairs; uncorrected {overlap.p_value(a, b, 'heads'):.3g})."
    )


def _result_fields(result: Any) -> dict[str, Any]:
    return {
        "accuracy_before": result.accuracy_before,
        "accuracy_after": result.accuracy_after,
        "metric_before": result.metric_before,
        "metric_after": result.metric_after,
    }


def _findings(
    circuits: pd.DataFrame,
    overlap: OverlapReport | None,
    model_overlap: Mapping[str, OverlapReport],
    cross_model: pd.DataFrame,
    interventions: list[dict[str, Any]],
) -> list[str]:
    """Plain sentences for the report's summary: what the numbers say, unfaithful ones included."""
    out = []
    weak = [r for r in circuits.to_dict(orient="records") if not r["faithful"]]
    if weak:
        listed = ", ".join(f"{r['key']} ({r['faithfulness']:.2f})" for r in weak)
        out.append(f"Below faithfulness {FAITHFUL}: {listed}. Read their overlap with care.")
    if overlap is not None:
        pairs = [
            (overlap.jaccard(a, b, "heads"), a, b)
            for a, b in itertools.combinations(overlap.names, 2)
        ]
        pairs.sort(key=lambda p: -1 if p[0] != p[0] else -p[0])
        out += [_sharing(overlap, a, b) for _, a, b in pairs[:3]]
    for task_name, report in model_overlap.items():
        a, b = report.names
        out.append(
            f"{task_name}: the base and fine-tuned circuits have node Jaccard "
            f"{report.jaccard(a, b):.2f}; the base circuit keeps faithfulness "
            f"{cross_model.loc[task_name, b]:.2f} inside {b}."
        )
    for item in interventions:
        out.append(
            f"{item['name']} on {item['task']} ({', '.join(item['heads'])}): accuracy "
            f"{item['accuracy_before']:.0%} -> {item['accuracy_after']:.0%}."
        )
    return out
