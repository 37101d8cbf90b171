"""A study's tables as Markdown: what ``reuse-lens demo`` writes to ``results.md``.

docs/results.md is this file for the zoo, produced by ``reuse-lens demo --out DIR``.
Tables are plain GitHub Markdown, so the results read well in a repository or a terminal.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

    from reuse_lens.compare.edges import EdgeOverlapReport
    from reuse_lens.study import StudyResult

__all__ = ["markdown", "write_markdown"]


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


def markdown(
    result: StudyResult, *, heading: str = "Results on the zoo", command: str = "reuse-lens demo"
) -> str:
    """Every table of a study, with a line on how to read each, under ``heading``.

    Opens with the answer (``reuse_lens.compare.answer``): which tasks reuse which heads and MLPs,
    and which pairs survive the correction for testing every pair. Reads the study's
    ``edge_overlap`` (an ``EdgeOverlapReport``) when it has one.
    """
    from reuse_lens.compare.answer import CORRECTION_NAMES, answer

    config = result.config
    overlap = result.task_overlap
    edges: EdgeOverlapReport | None = getattr(result, "edge_overlap", None)
    method = CORRECTION_NAMES.get(overlap.correction, overlap.correction)
    n_pairs = len(overlap.names) * (len(overlap.names) - 1) // 2
    parts = [
        f"# {heading}\n",
        f"Produced by `{command}` in {result.seconds:.0f} s: base model `{config.base}`, "
        f"{config.n_prompts} held-out prompts per task (seed {config.seed}), methods "
        f"{', '.join(config.methods)} (the first is used for overlap), `{config.ablation}` "
        f"ablation, {config.n_random} random circuits per baseline, {config.n_boot} bootstrap "
        "resamples for stability.\n",
        "## Which tasks reuse which heads and MLPs, and is it significant?\n",
        "\n".join(f"- {line}" for line in answer(overlap, edges)) + "\n",
        "## Findings\n",
        "\n".join(f"- {line}" for line in result.findings) + "\n",
        "## How well each model does each task\n",
        "Accuracy: the answer is the top-1 token; logit diff: right minus wrong answer.\n",
        table(result.evaluations.to_dict(orient="records")),
        "## Circuits\n",
        "Faithfulness: 1 = the circuit alone does what the model does, 0 = no better than "
        "ablating everything. A circuit below 0.8 is not a faithful explanation (`faithful` "
        "= no). Random: the faithfulness of random circuits with as many heads and MLPs.\n",
        table(
            result.circuit_table.to_dict(orient="records"),
            ["key", "n_heads", "n_mlps", "faithfulness", "random_mean", "random_std", "faithful"],
        ),
        "\nNodes of each circuit:\n",
        table([{"circuit": k, "nodes": c.nodes_in_order()} for k, c in result.circuits.items()]),
        "## Agreement between methods\n",
        table(result.method_agreement.to_dict(orient="records")),
        "## Stability (the ceiling for overlap)\n",
        "Mean Jaccard between circuits found on bootstrap resamples of the same task's prompts.\n",
        table(result.stability.to_dict(orient="records")),
        "## Which heads and MLPs tasks share (base model)\n",
        "p: hypergeometric P(X ≥ shared) for heads; corrected: the same p-value after "
        f"{method} correction over the {n_pairs} pairs; significant: corrected p ≤ 0.05; "
        "chance: the Jaccard expected by chance.\n",
    ]
    rows = []
    for a, b in itertools.combinations(overlap.names, 2):
        corrected = overlap.p_value(a, b, "heads", corrected=True)
        rows.append(
            {
                "a": a, "b": b, "shared heads": sorted(overlap.shared(a, b, "heads")),
                "Jaccard heads": overlap.jaccard(a, b, "heads"),
                "chance": overlap.expected_jaccard(a, b, "heads"),
                "p (heads)": overlap.p_value(a, b, "heads"),
                "corrected": corrected,
                "significant": "yes" if corrected <= 0.05 else "no",
                "Jaccard MLPs": overlap.jaccard(a, b, "mlps"),
                "ceiling": min(overlap.stability.get(a, math.nan), overlap.stability.get(b, math.nan)),
            }
        )  # fmt: skip
    parts.append(table(rows))
    if edges is not None:
        parts += _edge_parts(edges)
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
                    "p (heads)": r.p_value(r.names[0], r.names[1], "heads"),
                }
                for label, r in result.within_model.items()
            ]
        ),
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
            result.interventions,
            [
                "name",
                "task",
                "heads",
                "accuracy_before",
                "accuracy_after",
                "metric_before",
                "metric_after",
                "random_metric",
                "percentile",
            ],
        ),
    ]
    return "\n".join(parts)


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
