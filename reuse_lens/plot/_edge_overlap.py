"""The figure of an edge overlap report: edge Jaccard of every pair, significance marked."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import plotly.graph_objects as go

from reuse_lens.compare.answer import CORRECTION_NAMES
from reuse_lens.plot._common import finish

if TYPE_CHECKING:
    from reuse_lens.compare.edges import EdgeOverlapReport, Null

__all__ = ["edge_jaccard_matrix"]


def edge_jaccard_matrix(
    report: EdgeOverlapReport,
    *,
    null: Null = "graph",
    alpha: float = 0.05,
    template: str = "plotly_white",
    title: str | None = None,
) -> go.Figure:
    """Annotated heatmap of the edge Jaccard of every pair of edge circuits.

    A cell is marked ``*`` when the pair shares more edges than chance under ``null``
    after the report's correction (``EdgeOverlapReport.significant_pairs``); hover text
    gives the shared edge count, the Jaccard expected by chance, the p-value raw and
    corrected, and how the heads both circuits feed are read (same way, other inputs,
    other senders).

    Returns:
        A figure with one heatmap whose ``z`` is ``report.matrix("jaccard")``, rows top to
        bottom and columns left to right in report order.
    """
    matrix = report.matrix("jaccard")
    names = list(matrix.index)
    marked = set(report.significant_pairs(alpha, null))
    text, hover = [], []
    for a in names:
        text_row, hover_row = [], []
        for b in names:
            value = float(matrix.loc[a, b])
            star = "*" if (a, b) in marked or (b, a) in marked else ""
            text_row.append("–" if math.isnan(value) else f"{value:.2f}{star}")
            hover_row.append(_hover(report, a, b, null))
        text.append(text_row)
        hover.append(hover_row)
    fig = go.Figure(
        go.Heatmap(
            z=matrix.to_numpy(dtype=float),
            x=names,
            y=names,
            name="edge jaccard",
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale="Blues",
            zmin=0.0,
            zmax=1.0,
            xgap=1,
            ygap=1,
        )
    )
    fig.update_yaxes(autorange="reversed")
    method = CORRECTION_NAMES.get(report.correction, report.correction)
    default = (
        f"Edge Jaccard of every pair of edge circuits; * more shared edges than chance "
        f"({null} null) after {method} correction (α = {alpha:g})"
    )
    return finish(fig, template=template, title=title, default_title=default)


def _hover(report: EdgeOverlapReport, a: str, b: str, null: Null) -> str:
    lines = [f"{a} vs {b}", f"edges: {len(report.edges(a))} and {len(report.edges(b))}"]
    if a == b:
        return "<br>".join(lines)
    usage = report.head_usage(a, b)
    lines += [
        f"shared edges: {len(report.shared(a, b))}",
        f"Jaccard {report.jaccard(a, b):.3g}, by chance {report.expected_jaccard(a, b, null):.3g}",
        f"p = {report.p_value(a, b, null):.2g}, corrected "
        f"{report.p_value(a, b, null, corrected=True):.2g}",
        f"heads both feed: {len(usage['same'])} read the same way, "
        f"{len(usage['other_inputs'])} through other inputs, "
        f"{len(usage['other_senders'])} from other senders",
    ]
    return "<br>".join(lines)
