"""A study's tables as Markdown: what ``reuse-lens demo`` writes to ``results.md``.

docs/results.md is this file for the zoo, produced by ``reuse-lens demo --out DIR``.
Tables are plain GitHub Markdown, so the results read well in a repository or a terminal.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

    from reuse_lens.compare.edges import EdgeOverlapReport
    from reuse_lens.compare.overlap import OverlapReport
    from reuse_lens.study import StudyResult

__all__ = [
    "ANSWER_HEADING",
    "circuit_rows",
    "evaluation_rows",
    "markdown",
    "study_answer",
    "write_markdown",
]


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "–"
    return str(value).replace("|", "\\|")


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts), in ``columns`` order."""
    if not rows:
        return "_(none)_\n"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _matrix(frame: pd.DataFrame, corner: str) -> str:
    rows = [{corner: index, **frame.loc[index].to_dict()} for index in frame.index]
    return table(rows, [corner, *map(str, frame.columns)])


ANSWER_HEADING = "Which tasks reuse which heads and MLPs, and is it significant?"
"""The heading of the answer a study opens with, in the report, results.md and the terminal."""


def study_answer(result: StudyResult | Any) -> list[str]:
    """The sentences a study opens with (``reuse_lens.compare.answer.study_answer``), then
    one per fine-tune and the fine-tuning claims tested: the same in the report, in
    results.md and on the terminal."""
    from reuse_lens.compare.answer import study_answer as sentences

    analyses = getattr(result, "fine_tuning", None) or {}
    return [
        *sentences(
            result.task_overlap,
            getattr(result, "edge_overlap", None),
            refused=getattr(result, "refused", None),
            base=str(getattr(result.config, "base", "the base model")),
        ),
        *(analysis.headline() for analysis in analyses.values()),
        *(getattr(result, "claims", None) or []),
    ]


EVALUATION_COLUMNS = {
    "model": "model",
    "task": "task",
    "accuracy": "accuracy",
    "logit_diff": "logit diff",
    "corrupted_accuracy": "corrupted accuracy",
    "corrupted_logit_diff": "corrupted logit diff",
    "gap": "gap (clean − corrupted metric)",
    "gap_interval": "95% interval",
    "effect": "effect (spreads)",
    "does_task": "does the task",
}
"""The evaluation table's columns, by the study's names, with the names a reader sees."""


def evaluation_rows(evaluations: pd.DataFrame) -> list[dict[str, Any]]:
    """The evaluation table as rows with human column names and the gap's interval as one
    ``[low, high]`` cell; columns a study did not record are left out."""
    rows = []
    for record in evaluations.to_dict(orient="records"):
        if "gap_low" in record and "gap_high" in record:
            record["gap_interval"] = f"[{_cell(record['gap_low'])}, {_cell(record['gap_high'])}]"
        rows.append(
            {name: record[key] for key, name in EVALUATION_COLUMNS.items() if key in record}
        )
    return rows


CIRCUIT_COLUMNS = {
    "key": "circuit",
    "n_heads": "heads",
    "n_mlps": "MLPs",
    "n_edges": "edges",
    "faithfulness": "faithfulness",
    "faithfulness_interval": "95% interval",
    "random_mean": "random circuits",
    "random_std": "random std",
    "faithful": "faithful",
}
"""The circuit table's columns, with their human names; ``faithfulness_interval`` is
there only for circuits whose metadata carries one."""


def circuit_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The circuit table as rows with human column names; the faithfulness interval as
    one ``[low, high]`` cell where a circuit has one, and no interval column where none has."""
    records = table.to_dict(orient="records")
    has_interval = any(_present(r.get("faithfulness_low")) for r in records)
    rows = []
    for record in records:
        if has_interval:
            low, high = record.get("faithfulness_low"), record.get("faithfulness_high")
            record["faithfulness_interval"] = (
                f"[{_cell(low)}, {_cell(high)}]" if _present(low) else None
            )
        rows.append({name: record[key] for key, name in CIRCUIT_COLUMNS.items() if key in record})
    return rows


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def markdown(
    result: StudyResult, *, heading: str = "Results on the zoo", command: str = "reuse-lens demo"
) -> str:
    """Every table of a study, with a line on how to read each, under ``heading``.

    Opens with the answer (``study_answer``): which tasks reuse which heads and MLPs,
    which pairs survive the correction for testing every pair, and which tasks the
    models do not do. Reads the study's ``edge_overlap`` (an ``EdgeOverlapReport``) when
    it has one. A study whose task overlap is None (fewer than two tasks had a circuit)
    gets every table it has and no overlap.
    """
    from reuse_lens.compare.answer import CORRECTION_NAMES

    config = result.config
    overlap = result.task_overlap
    edges: EdgeOverlapReport | None = getattr(result, "edge_overlap", None)
    parts = [
        f"# {heading}\n",
        f"Produced by `{command}` in {result.seconds:.0f} s: base model `{config.base}`, "
        f"{config.n_prompts} held-out prompts per task (seed {config.seed}), methods "
        f"{', '.join(config.methods)} (the first is used for overlap), `{config.ablation}` "
        f"ablation, {config.n_random} random circuits per baseline, {config.n_boot} bootstrap "
        "resamples for stability.\n",
        f"## {ANSWER_HEADING}\n",
        "\n".join(f"- {line}" for line in study_answer(result)) + "\n",
        "## Findings\n",
        "\n".join(f"- {line}" for line in result.findings) + "\n",
        "## How well each model does each task\n",
        "Accuracy: the answer is the top-1 token; logit diff: right minus wrong answer. "
        "Gap: the task's metric on the clean prompts minus on the corrupted ones, with its "
        "95% bootstrap interval over prompts; effect: the gap in standard deviations of the "
        "metric over prompts. A model does a task when the interval excludes 0 and the "
        "effect is at least 1; no circuit is looked for where it does not.\n",
        table(evaluation_rows(result.evaluations)),
        "## Circuits\n",
        "Faithfulness: 1 = the circuit alone does what the model does, 0 = no better than "
        "ablating everything. A circuit below 0.8 is not a faithful explanation (`faithful` "
        "= no). Random: the faithfulness of random circuits with as many heads and MLPs.\n",
        table(circuit_rows(result.circuit_table)),
    ]
    if overlap is not None:
        method = CORRECTION_NAMES.get(overlap.correction, overlap.correction)
        n_pairs = len(overlap.names) * (len(overlap.names) - 1) // 2
        parts += [
            "## Which heads and MLPs tasks share (base model)\n",
            "corrected: the p-value of the head overlap (hypergeometric, P(X ≥ shared)) "
            f"after {method} correction over the {n_pairs} pairs; significant: corrected "
            "p ≤ 0.05; p (heads): the same p-value uncorrected; chance: the Jaccard expected "
            "by chance.\n",
            table(_pair_rows(overlap)),
        ]
        if edges is not None:
            parts += _edge_parts(edges)
    else:
        parts += [
            "## Which heads and MLPs tasks share (base model)\n",
            "_Not compared: fewer than two tasks had a circuit in the base model._\n",
        ]
    parts += [
        "\n## Across models: each task's circuit in the base model and its fine-tune\n",
        table(
            [
                {
                    "task": t,
                    "shared": sorted(r.shared(r.names[0], r.names[1])),
                    "only base": sorted(r.unique(r.names[0], r.names[1])),
                    "only fine-tune": sorted(r.unique(r.names[1], r.names[0])),
                    "Jaccard": r.jaccard(r.names[0], r.names[1]),
                }
                for t, r in result.model_overlap.items()
            ]
        ),
        "\n## Inside each fine-tune: IOI's circuit against the fine-tune's own task's\n",
        table(
            [
                {
                    "model": label,
                    "shared heads": sorted(r.shared(r.names[0], r.names[1], "heads")),
                    "only ioi": sorted(r.unique(r.names[0], r.names[1], "heads")),
                    "only own task": sorted(r.unique(r.names[1], r.names[0], "heads")),
                    "Jaccard heads": r.jaccard(r.names[0], r.names[1], "heads"),
                    "chance": r.expected_jaccard(r.names[0], r.names[1], "heads"),
                    "corrected p (heads)": r.p_value(
                        r.names[0], r.names[1], "heads", corrected=True
                    ),
                }
                for label, r in result.within_model.items()
            ]
        ),
    ]
    parts += _fine_tuning_parts(result)
    parts += [
        "\n## Cross-task faithfulness (base circuit of the row's task, on the column's task)\n",
        _matrix(result.cross_task, "circuit"),
        "\n## Cross-model faithfulness (base circuit, inside each model, on its own task)\n",
        _matrix(result.cross_model, "circuit"),
        "\n## Cross-task ablation (damage to the column's task when the row's heads are ablated)\n",
        "0 = no harm, 1 = as bad as ablating every node; above 1, the model without these "
        "heads scores below the model with every node ablated.\n",
        _matrix(result.cross_ablation, "circuit heads"),
        "\n## Interventions\n",
        table(
            [_intervention_row(i) for i in result.interventions],
            [
                "name",
                "task",
                "heads",
                "accuracy before",
                "accuracy after",
                "metric before",
                "metric after",
                "random heads' metric",
                "percentile",
            ],
        ),
        "## Agreement between methods\n",
        table(
            [
                {_AGREEMENT.get(str(k), str(k)): v for k, v in row.items()}
                for row in result.method_agreement.to_dict(orient="records")
            ]
        ),
        "## Stability (the ceiling for overlap)\n",
        "Mean Jaccard between circuits found on bootstrap resamples of the same task's prompts.\n",
        table(
            [
                {_STABILITY.get(str(k), str(k)): v for k, v in row.items()}
                for row in result.stability.to_dict(orient="records")
            ]
        ),
        "\n## Nodes of each circuit\n",
        table([{"circuit": k, "nodes": c.nodes_in_order()} for k, c in result.circuits.items()]),
    ]
    return "\n".join(parts)


def _fine_tuning_parts(result: StudyResult) -> list[str]:
    """Each fine-tune's analysis (the report's "What fine-tuning changed"), as text and tables."""
    from reuse_lens.report import _finetune

    analyses = getattr(result, "fine_tuning", None) or {}
    if not analyses:
        return []
    parts = ["\n## What fine-tuning changed\n"]
    if result.claims:
        parts.append("\n".join(f"- {claim}" for claim in result.claims) + "\n")
    for label, analysis in analyses.items():
        parts += [f"\n### {label}\n", "\n".join(f"- {s}" for s in analysis.sentences()) + "\n"]
        for caption, frame in _finetune.tables(label, analysis):
            parts += [f"{caption}\n", table(frame.to_dict(orient="records")), ""]
    return parts


_AGREEMENT = {
    "method_a": "method a",
    "method_b": "method b",
    "jaccard": "Jaccard",
    "jaccard_heads": "Jaccard heads",
    "jaccard_mlps": "Jaccard MLPs",
}
_STABILITY = {
    "mean_jaccard": "mean Jaccard",
    "std_jaccard": "std",
    "n_boot": "resamples",
}


def _intervention_row(item: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": item.get("name"), "task": item.get("task"), "heads": item.get("heads"),
        "accuracy before": item.get("accuracy_before"),
        "accuracy after": item.get("accuracy_after"),
        "metric before": item.get("metric_before"), "metric after": item.get("metric_after"),
        "random heads' metric": item.get("random_metric"), "percentile": item.get("percentile"),
    }  # fmt: skip


def _pair_rows(overlap: OverlapReport) -> list[dict[str, Any]]:
    """One row per pair of tasks: shared heads, Jaccard against chance, corrected p first."""
    rows = []
    for a, b in itertools.combinations(overlap.names, 2):
        corrected = overlap.p_value(a, b, "heads", corrected=True)
        rows.append(
            {
                "a": a, "b": b, "shared heads": sorted(overlap.shared(a, b, "heads")),
                "Jaccard heads": overlap.jaccard(a, b, "heads"),
                "chance": overlap.expected_jaccard(a, b, "heads"),
                "corrected": corrected,
                "significant": "yes" if corrected <= 0.05 else "no",
                "p (heads)": overlap.p_value(a, b, "heads"),
                "Jaccard MLPs": overlap.jaccard(a, b, "mlps"),
                "ceiling": min(overlap.stability.get(a, math.nan), overlap.stability.get(b, math.nan)),
            }
        )  # fmt: skip
    return rows


def _edge_parts(edges: EdgeOverlapReport) -> list[str]:
    """The edge overlap table, and the shared heads each pair reads through other inputs."""
    rows = [
        {
            "a": r["a"], "b": r["b"], "edges a": r["edges_a"], "edges b": r["edges_b"],
            "shared": r["shared"], "edge Jaccard": r["jaccard"],
            "chance": r["expected_jaccard"], "p": r["p_value"], "corrected": r["p_adjusted"],
            "corrected (senders)": r["p_adjusted_receivers"],
            "heads read alike": r["heads_same"], "other inputs": r["heads_other_inputs"],
            "other senders": r["heads_other_senders"],
        }
        for r in edges.table().to_dict(orient="records")
    ]  # fmt: skip
    differing = edges.differences(kind="heads")
    inputs = [
        {
            "a": r["a"], "b": r["b"], "head": r["node"], "input": r["input"],
            "senders a": r["senders_a"], "senders b": r["senders_b"],
        }
        for r in differing.to_dict(orient="records")
        if r["verdict"] != "different senders"
    ]  # fmt: skip
    return [
        "\n## Edges the tasks share (EAP-IG edge circuits, base model)\n",
        "chance and p: B's edges drawn at random from the model's edge graph "
        "(hypergeometric); corrected: over the pairs, as above; (senders): only the senders "
        "of each input both circuits read are redrawn. The last three columns count the "
        "heads both circuits feed: read through the same inputs from the same senders, "
        "through other q/k/v inputs, or through the same inputs from other senders.\n",
        table(rows),
        "\nShared heads read through different inputs (q, k, v), with the senders each "
        "circuit uses there:\n",
        table(inputs),
    ]


def write_markdown(
    result: StudyResult,
    path: str | Path,
    *,
    heading: str = "Results on the zoo",
    command: str = "reuse-lens demo",
) -> Path:
    """Write ``markdown(result, heading=heading, command=command)`` atomically."""
    from reuse_lens._io import write_text_atomic

    return write_text_atomic(path, markdown(result, heading=heading, command=command))
