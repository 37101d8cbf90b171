"""The report's fine-tuning sections: what each fine-tune changed and what its circuit reuses.

Split from ``html.py`` so that each stays short; ``html.write`` calls these with its
:class:`~reuse_lens.report.html.HtmlReport` when the study has a fine-tuning analysis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

from reuse_lens import plot

if TYPE_CHECKING:
    import pandas as pd

    from reuse_lens.report.html import HtmlReport
    from reuse_lens.study.finetune import FineTuneAnalysis

__all__ = ["answer_sentences", "fine_tuning_section", "tables"]


def answer_sentences(analyses: Mapping[str, FineTuneAnalysis], claims: Sequence[str]) -> list[str]:
    """One sentence per fine-tune for the report's opening answer, then the two claims."""
    return [a.headline() for a in analyses.values()] + list(claims)


def fine_tuning_section(
    report: HtmlReport, analyses: Mapping[str, FineTuneAnalysis], claims: Sequence[str]
) -> None:
    """Per fine-tune: its answer, the drift grid, cross-model patching, the tests, the reuse of
    base circuits, their survival inside it, and the circuit through the run's checkpoints."""
    report.add_heading("What fine-tuning changed")
    report.add_text(
        "For each fine-tuned model: how much each head and MLP changed (relative weight "
        "change), which changes carry what the fine-tune gained (cross-model activation "
        "patching, Prakash et al. 2024: each node's fine-tuned output patched into the base, "
        "as a share of the gain), what its task's circuit shares with the base's circuits "
        "(Merullo et al. 2024), and how that circuit forms along the run (Wang et al. 2025)."
    )
    if claims:
        report.add_heading("The fine-tuning literature's claims, tested here", level=3)
        report.add_list(list(claims))
    for label, analysis in analyses.items():
        _one(report, label, analysis)


def _one(report: HtmlReport, label: str, analysis: FineTuneAnalysis) -> None:
    report.add_heading(f"{label}: what fine-tuning changed", level=3)
    report.add_list(analysis.sentences())
    report.add_figure(
        plot.drift_grid(analysis.drift),
        name="drift_grid",
        key=label,
        caption="Relative weight change of each head (its W_Q, W_K, W_V, W_O together) and "
        "MLP; darker is more. Red squares: the fine-tune's circuit.",
    )
    if analysis.drift.notes:
        report.add_list(list(analysis.drift.notes))
    if analysis.cmap is not None:
        report.add_figure(
            plot.cmap_grid(analysis.cmap, circuit=analysis.circuit or ()),
            name="cmap_grid",
            key=label,
            caption="Share of the fine-tune's gain on its task that each node's fine-tuned output "
            "recovers when patched into the base (blue: towards the fine-tune; red: away). Red "
            "squares: the fine-tune's circuit.",
        )
    if analysis.cmap_reverse is not None:
        report.add_figure(
            plot.cmap_grid(analysis.cmap_reverse, circuit=analysis.circuit or ()),
            name="cmap_grid",
            key=f"{label}/reverse",
            caption="The other direction: each node's base output patched into the fine-tune, as "
            "a share of the gap between them (blue: reverting the node takes that share of the "
            "gain away; red: reverting it raises the fine-tune's metric). It shows which nodes "
            "the fine-tune's new computation runs through, even where the gain is read out by "
            "weights no node holds.",
        )
    if analysis.cmap_reason:
        report.add_text(f"Cross-model patching: {analysis.cmap_reason}", css_class="empty")
    for caption, frame in tables(label, analysis):
        report.add_table(frame, caption=caption)
    if analysis.trajectory is not None:
        report.add_figure(
            _trajectory_figure(analysis.trajectory, analysis.task),
            name="circuit_trajectory",
            key=label,
        )


def tables(label: str, analysis: FineTuneAnalysis) -> list[tuple[str, pd.DataFrame]]:
    """(caption, table) of one fine-tune's analysis, for the report and for results.md: the
    nodes that changed most, the drift tests, the reuse of the base's circuits, their
    survival inside the fine-tune, and the task's circuit along the run."""
    top = analysis.drift.table().sort_values("weight", ascending=False).head(8)
    top["in_circuit"] = [
        "yes" if member is True else "no" if member is False else "–"
        for member in top["in_circuit"]
    ]
    columns = ["node", "weight", "weight_q", "weight_k", "weight_v", "weight_o"]
    columns += ["act_l2_answer", "in_circuit"]
    out = [
        (
            "The nodes whose weights changed most (relative Frobenius change; NaN where a part "
            "does not apply, such as W_Q of an MLP).",
            _named(
                top[columns],
                {
                    "weight": "weight change",
                    "weight_q": "W_Q",
                    "weight_k": "W_K",
                    "weight_v": "W_V",
                    "weight_o": "W_O",
                    "act_l2_answer": "output change at answer",
                    "in_circuit": "in circuit",
                },
            ),
        ),
        (_tests_caption(analysis), _tests(analysis)),
        (
            f"Does {label}'s {analysis.task} circuit reuse the heads of the base's circuits? "
            "Hypergeometric P(X ≥ shared) over the model's heads, Holm-corrected over these "
            "pairs; then the same over the heads after layer 0, which many circuits hold "
            "whatever their task.",
            _named(
                analysis.reuse,
                {
                    "base_task": "base task",
                    "shared": "shared heads",
                    "heads": "which",
                    "jaccard": "head Jaccard",
                    "expected_jaccard": "chance Jaccard",
                    "p_value": "p",
                    "p_adjusted": "Holm p",
                    "shared_later": "shared after layer 0",
                    "p_later": "p after layer 0",
                    "p_later_adjusted": "Holm p after layer 0",
                },
            ),
        ),
        (
            "Faithfulness of each base task's circuit, in the base and inside the fine-tune "
            "(Prakash et al. 2024: does the mechanism survive fine-tuning?).",
            _named(analysis.survival, {"base": "in the base", "inside": f"inside {label}"}),
        ),
    ]
    if analysis.trajectory is not None:
        out.append(
            (
                "The task's circuit along the fine-tuning run: accuracy, circuit size and "
                "faithfulness, node Jaccard with the final circuit and head Jaccard with each "
                "base task's circuit; where the study finds edge circuits, the same for the "
                "EAP-IG edge circuits (– where the model did not do the task: no circuit).",
                _trajectory_table(analysis.trajectory),
            )
        )
    return out


def _named(table: Any, names: Mapping[str, str]) -> pd.DataFrame:
    return table.rename(columns=dict(names))


_MEASURES = {
    "weight": "relative weight change",
    "act_l2_answer": "relative output change at the answer",
    "act_cos_answer": "1 − cosine of the output at the answer",
    "act_l2_all": "relative output change, all positions",
    "act_cos_all": "1 − cosine of the output, all positions",
}
"""How the tests' table names each drift measure."""


def _tests(analysis: FineTuneAnalysis) -> pd.DataFrame:
    import pandas as pd

    rows = [
        {
            "test": f"{t.group} > {t.rest}",
            "measure": _MEASURES.get(t.measure, t.measure),
            "mean (group)": t.mean_group,
            "mean (rest)": t.mean_rest,
            "rank-biserial": t.rank_biserial,
            "p": t.p_value,
            "Holm p": t.p_adjusted,
        }
        for t in analysis.drift.tests
    ]
    return pd.DataFrame(rows)


def _tests_caption(analysis: FineTuneAnalysis) -> str:
    nulls = sorted({t.null for t in analysis.drift.tests})
    return "One-sided permutation tests over nodes. Nulls: " + "; ".join(nulls) + "."


def _trajectory_table(trajectory: pd.DataFrame) -> pd.DataFrame:
    renamed = {
        c: c.replace("heads_jaccard_", "heads J. ").replace("edges_jaccard_", "edges J. ")
        for c in trajectory.columns
    }
    renamed |= {
        "jaccard_final": "J. with final",
        "n_nodes": "nodes",
        "n_edges": "edges",
        "edge_jaccard_final": "edge J. with final",
    }
    return trajectory.rename(columns=renamed)


def _trajectory_figure(trajectory: pd.DataFrame, task: str) -> go.Figure:
    fig = go.Figure()
    x = list(trajectory["point"])
    series = [("accuracy", "accuracy"), ("jaccard_final", "Jaccard with the final circuit")]
    if "edge_jaccard_final" in trajectory.columns:
        series.append(("edge_jaccard_final", "edge Jaccard with the final edge circuit"))
    series += [
        (c, f"head Jaccard with base {c.removeprefix('heads_jaccard_')}")
        for c in trajectory.columns
        if c.startswith("heads_jaccard_")
    ]
    for column, name in series:
        y = [None if isinstance(v, float) and math.isnan(v) else v for v in trajectory[column]]
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name))
    fig.update_layout(
        template="plotly_white",
        title=f"The {task} circuit through the fine-tuning run",
        xaxis_title="point of the run",
        yaxis={"title": "value", "range": [0, 1.05]},
    )
    return fig
