"""The overlap sections of the HTML report: the answer it opens with, node and edge overlap.

Split from ``html.py`` so that each stays short; ``report.write`` and
``report.write_comparison`` call these with their :class:`~reuse_lens.report.html.HtmlReport`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from reuse_lens import plot

if TYPE_CHECKING:
    import pandas as pd

    from reuse_lens.compare.edges import EdgeOverlapReport
    from reuse_lens.compare.overlap import OverlapReport
    from reuse_lens.report.html import HtmlReport

__all__ = ["answer_section", "edge_overlap_section", "model_overlap_section", "overlap_section"]

# Pairwise statistics shown in overlap tables; the full set is in OverlapReport.table().
_PAIR_COLUMNS = [
    "a",
    "b",
    "size_a_all",
    "size_b_all",
    "shared_all",
    "jaccard_all",
    "jaccard_heads",
    "jaccard_mlps",
    "directional_ab_all",
    "directional_ba_all",
    "p_value_heads",
    "p_adjusted_heads",
    "expected_jaccard_heads",
    "edge_iou",
    "spearman",
    "stability",
]

_EDGE_COLUMNS = [
    "a",
    "b",
    "edges_a",
    "edges_b",
    "shared",
    "jaccard",
    "expected_jaccard",
    "p_value",
    "p_adjusted",
    "p_adjusted_receivers",
    "heads_same",
    "heads_other_inputs",
    "heads_other_senders",
]
_MAX_HEAD_ROWS = 120  # rows of the "shared heads read differently" table before it is cut


def answer_section(
    report: HtmlReport,
    overlap: OverlapReport,
    edges: EdgeOverlapReport | None,
    *,
    what: str,
    extra: Sequence[str] = (),
) -> None:
    """The answer first: the generated sentences (``extra``: the fine-tunes'), then the
    marked Jaccard matrix."""
    from reuse_lens.compare.answer import answer

    report.add_heading(f"Which {what} reuse which heads and MLPs, and is it significant?")
    sentences = [*answer(overlap, edges), *extra]
    rows = "".join(f"<li>{html.escape(line)}</li>" for line in sentences)
    report.add_raw(f'<ul class="answer">{rows}</ul>')
    if len(overlap.names) < 2:
        return
    kinds = ("heads", "mlps") if overlap.shape.has_mlps else ("heads",)
    report.add_figure(
        plot.jaccard_matrix(overlap, kinds=kinds, title=_answer_title(overlap, what)),
        name="jaccard_matrix",
        key=f"answer/{what}",
        caption="Jaccard index of every pair; * marks the pairs whose p-value (hypergeometric, "
        "P(X ≥ shared)) survives the correction for testing every pair. Hover for the p-values.",
    )


def _answer_title(overlap: OverlapReport, what: str) -> str:
    from reuse_lens.compare.answer import CORRECTION_NAMES

    method = CORRECTION_NAMES.get(overlap.correction, overlap.correction)
    return (
        f"Jaccard index of every pair of {what}, heads and MLPs; * more shared than chance "
        f"after {method} correction (α = 0.05)"
    )


def edge_overlap_section(report: HtmlReport, edges: EdgeOverlapReport) -> None:
    """Edge Jaccard against chance, and the shared heads each pair reads differently."""
    report.add_heading("Edge overlap")
    if len(edges.names) < 2:
        report.add_text("Only one edge circuit: there is no pair to compare.", css_class="empty")
        return
    report.add_figure(plot.edge_jaccard_matrix(edges), name="edge_jaccard_matrix", key="edges")
    table = edges.table()
    report.add_table(
        table.reindex(columns=[c for c in _EDGE_COLUMNS if c in table.columns]),
        caption="Pairwise edge overlap. expected_jaccard and p_value: B's edges drawn at random "
        "from the model's edge graph (hypergeometric); p_adjusted_receivers: only the senders "
        "of each input both circuits read are redrawn. heads_*: heads both circuits feed, "
        "read the same way, through other q/k/v inputs, or from other senders.",
    )
    report.add_heading("Shared heads read differently", level=3)
    frame = _head_differences(edges)
    cut = len(frame) > _MAX_HEAD_ROWS
    report.add_table(
        frame.head(_MAX_HEAD_ROWS),
        caption="For each pair and each head both circuits feed but read differently: the "
        "inputs (q, k, v) each circuit uses, with their senders."
        + (
            f" The first {_MAX_HEAD_ROWS} of {len(frame)} rows; "
            "EdgeOverlapReport.differences() has them all."
            if cut
            else ""
        ),
    )


def _head_differences(edges: EdgeOverlapReport) -> pd.DataFrame:
    """One row per (pair, head) read differently: each circuit's inputs and senders."""
    import pandas as pd

    rows = []
    for i, a in enumerate(edges.names):
        for b in edges.names[i + 1 :]:
            usage = edges.head_usage(a, b)
            for how, heads in (("other inputs", usage["other_inputs"]),
                               ("other senders", usage["other_senders"])):  # fmt: skip
                for head in heads:
                    rows.append(
                        {"a": a, "b": b, "head": head, "difference": how,
                         "uses in a": _uses(edges, a, head), "uses in b": _uses(edges, b, head)}
                    )  # fmt: skip
    columns = ["a", "b", "head", "difference", "uses in a", "uses in b"]
    return pd.DataFrame(rows, columns=columns)


def _uses(edges: EdgeOverlapReport, name: str, head: str) -> str:
    """``q: input, a0.h1; v: a0.h2``: the inputs a circuit reads a head through."""
    parts = [
        f"{put}: {', '.join(sorted(senders))}"
        for put, senders in edges.inputs(name, head).items()
        if senders
    ]
    return "; ".join(parts) or "–"


def overlap_section(report: HtmlReport, overlap: OverlapReport, *, key: str) -> None:
    """Headline grid first, then the matrices, UpSet, sweep and pairwise table."""
    if len(overlap.names) < 2:
        report.add_text("Only one circuit: there is no pair to compare.", css_class="empty")
        return
    report.add_figure(plot.overlap_grid(overlap), name="overlap_grid", key=key)
    kinds = ("heads", "mlps") if overlap.shape.has_mlps else ("heads",)
    report.add_figure(plot.jaccard_matrix(overlap, kinds=kinds), name="jaccard_matrix", key=key)
    report.add_figure(plot.upset(overlap), name="upset", key=key)
    if all(c.node_scores for c in overlap.circuits.values()):
        report.add_figure(plot.threshold_sweep(overlap), name="threshold_sweep", key=key)
    report.add_table(
        _pair_table(overlap),
        caption="Pairwise overlap: p-value of the head overlap under a hypergeometric null "
        f"(P(X ≥ shared)) and corrected over the pairs ({overlap.correction}), the Jaccard "
        "expected by chance, and the stability ceiling (the lower within-task Jaccard of "
        "the two).",
    )


def model_overlap_section(
    report: HtmlReport,
    reports: Mapping[str, OverlapReport],
    *,
    title: str = "Model overlap",
    heading: str = "Model overlap on {}",
) -> None:
    report.add_heading(title)
    if not reports:
        report.add_text("No fine-tuned models were compared.", css_class="empty")
    for task, overlap in reports.items():
        report.add_heading(heading.format(task), level=3)
        if len(overlap.names) < 2:
            report.add_text("Only one model's circuit: nothing to compare.", css_class="empty")
            continue
        report.add_figure(plot.overlap_grid(overlap), name="overlap_grid", key=f"models/{task}")
        report.add_table(_pair_table(overlap))


def _pair_table(overlap: OverlapReport) -> pd.DataFrame:
    """The pairwise statistics a reader needs; ``OverlapReport.table()`` has them all."""
    table = overlap.table()
    return table.reindex(columns=[c for c in _PAIR_COLUMNS if c in table.columns])
