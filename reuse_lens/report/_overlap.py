"""The overlap sections of the HTML report: the answer it opens with, node and edge overlap.

Split from ``html.py`` so that each stays short; ``report.write`` and
``report.write_comparison`` call these with their :class:`~reuse_lens.report.html.HtmlReport`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import TYPE_CHECKING

from reuse_lens import plot

if TYPE_CHECKING:
    import pandas as pd

    from reuse_lens.compare.edges import EdgeOverlapReport
    from reuse_lens.compare.overlap import OverlapReport
    from reuse_lens.report.html import HtmlReport

__all__ = ["answer_section", "edge_overlap_section", "model_overlap_section", "overlap_section"]

# Pairwise statistics shown in overlap tables, with the names a reader sees; the full set
# is in OverlapReport.table(). The short table shows _PAIR_KEY, the rest is folded.
_PAIR_COLUMNS = {
    "a": "a",
    "b": "b",
    "shared_all": "shared nodes",
    "jaccard_heads": "Jaccard (heads)",
    "expected_jaccard_heads": "by chance",
    "p_adjusted_heads": "corrected p (heads)",
    "p_value_heads": "uncorrected p",
    "jaccard_all": "Jaccard (all)",
    "jaccard_mlps": "Jaccard (MLPs)",
    "size_a_all": "nodes in a",
    "size_b_all": "nodes in b",
    "directional_ab_all": "share of a in b",
    "directional_ba_all": "share of b in a",
    "edge_iou": "edge IoU",
    "spearman": "score correlation",
    "stability": "stability ceiling",
}
_PAIR_KEY = [
    "a", "b", "shared_all", "jaccard_heads", "expected_jaccard_heads", "p_adjusted_heads",
    "p_value_heads", "stability",
]  # fmt: skip

_EDGE_COLUMNS = {
    "a": "a",
    "b": "b",
    "shared": "shared edges",
    "jaccard": "edge Jaccard",
    "expected_jaccard": "by chance",
    "p_adjusted": "corrected p",
    "p_adjusted_receivers": "corrected p, senders redrawn",
    "p_value": "uncorrected p",
    "edges_a": "edges in a",
    "edges_b": "edges in b",
    "heads_same": "heads read alike",
    "heads_other_inputs": "heads through other inputs",
    "heads_other_senders": "heads from other senders",
}
_EDGE_KEY = [
    "a", "b", "shared", "jaccard", "expected_jaccard", "p_adjusted", "p_adjusted_receivers",
    "heads_other_inputs",
]  # fmt: skip
_SWEEP_PAIRS = 4  # pairs drawn in the top-k sweep: a line and its chance line each
_MAX_HEAD_ROWS = 120  # rows of the "shared heads read differently" table before it is cut


def answer_section(
    report: HtmlReport,
    overlap: OverlapReport | None,
    edges: EdgeOverlapReport | None,
    *,
    what: str,
    sentences: list[str] | None = None,
) -> None:
    """The answer first: the generated sentences, then the marked Jaccard matrix.

    ``sentences`` replaces ``answer(overlap, edges)`` (a study's answer says more); the
    matrix is drawn here only, once, when there are two circuits or more.
    """
    from reuse_lens.compare.answer import answer

    report.add_heading(f"Which {what} reuse which heads and MLPs, and is it significant?")
    if sentences is None:
        sentences = answer(overlap, edges) if overlap is not None else []
    rows = "".join(f"<li>{html.escape(line)}</li>" for line in sentences)
    report.add_raw(f'<ul class="answer">{rows}</ul>')
    if overlap is None or len(overlap.names) < 2:
        return
    kinds = ("heads", "mlps") if overlap.shape.has_mlps else ("heads",)
    report.add_figure(
        plot.jaccard_matrix(overlap, kinds=kinds, title=_answer_title(overlap, what)),
        name="jaccard_matrix",
        key=f"answer/{what}",
        caption="Colour: the Jaccard index of every pair, darker blue where more is shared "
        "(0: nothing, 1: the same nodes); * marks the pairs whose p-value "
        "(hypergeometric, P(X ≥ shared)) survives the correction for testing every pair. "
        "Hover for the p-values.",
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
    report.add_figure(
        plot.edge_jaccard_matrix(edges), name="edge_jaccard_matrix", key="edges",
        caption="Colour: the edge Jaccard of every pair of edge circuits, darker blue where "
        "more edges are shared.",
    )  # fmt: skip
    table = edges.table()
    report.add_table(
        table.reindex(columns=[c for c in _EDGE_COLUMNS if c in table.columns]),
        names=_EDGE_COLUMNS,
        key=_EDGE_KEY,
        caption="Pairwise edge overlap. By chance and p: b's edges drawn at random from the "
        "model's edge graph (hypergeometric), corrected over the pairs; senders redrawn: only "
        "the senders of each input both circuits read are redrawn. Heads: the heads both "
        "circuits feed, read the same way, through other q/k/v inputs, or from other senders.",
    )
    report.add_heading("Shared heads read differently", level=3)
    frame = _head_differences(edges)
    cut = len(frame) > _MAX_HEAD_ROWS
    report.add_folded(f"{len(frame)} (pair, head) cases: each circuit's inputs and senders")
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
    report.end_folded()


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
    """Headline grid first, then UpSet, the top-k sweep and the pairwise table.

    The Jaccard matrix is the answer's (``answer_section``), drawn once at the top.
    """
    if len(overlap.names) < 2:
        report.add_text("Only one circuit: there is no pair to compare.", css_class="empty")
        return
    report.add_figure(
        plot.overlap_grid(overlap), name="overlap_grid", key=key, caption=_grid_caption(overlap)
    )
    report.add_figure(plot.upset(overlap), name="upset", key=key)
    if all(c.node_scores for c in overlap.circuits.values()):
        pairs = _sweep_pairs(overlap)
        n_pairs = len(overlap.names) * (len(overlap.names) - 1) // 2
        which = (
            "the pair"
            if n_pairs == 1
            else f"the {len(pairs)} pairs with the lowest corrected p-values for heads, of {n_pairs}"
        )
        report.add_figure(
            plot.threshold_sweep(overlap, pairs, title=f"Overlap of the top-k nodes: {which}"),
            name="threshold_sweep",
            key=key,
            caption=f"Jaccard of the top-k nodes by |score| of {which}, as k grows; dashed, "
            "the same pair by chance. OverlapReport.sweep(a, b) gives any pair.",
        )
    report.add_table(
        _pair_table(overlap),
        names=_PAIR_COLUMNS,
        key=_PAIR_KEY,
        caption="Pairwise overlap: the corrected p-value of the head overlap under a "
        f"hypergeometric null (P(X ≥ shared)), {overlap.correction} over the pairs, then "
        "uncorrected; the Jaccard expected by chance; and the stability ceiling (the lower "
        "within-task Jaccard of the two).",
    )


def _sweep_pairs(overlap: OverlapReport) -> list[tuple[str, str]]:
    """The pairs the sweep draws: the lowest corrected p-values for heads, then Jaccard."""
    import itertools
    import math

    def order(pair: tuple[str, str]) -> tuple[float, float]:
        p = overlap.p_value(*pair, "heads", corrected=True)
        return (1.0 if math.isnan(p) else p, -overlap.jaccard(*pair, "heads"))

    pairs = sorted(itertools.combinations(overlap.names, 2), key=order)
    return pairs[:_SWEEP_PAIRS]


def _grid_caption(overlap: OverlapReport) -> str:
    if len(overlap.names) == 2:
        return "Colour: which of the two circuits holds each head (columns) and MLP (last column) of each layer (rows)."
    return (
        "Colour: how many of the circuits hold each head (columns) and MLP (last column) of "
        "each layer (rows); darker is more. Hover a cell for which circuits."
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
        report.add_figure(
            plot.overlap_grid(overlap), name="overlap_grid", key=f"models/{task}",
            caption=_grid_caption(overlap),
        )  # fmt: skip
        report.add_table(_pair_table(overlap), names=_PAIR_COLUMNS, key=_PAIR_KEY)


def _pair_table(overlap: OverlapReport) -> pd.DataFrame:
    """The pairwise statistics a reader needs; ``OverlapReport.table()`` has them all."""
    table = overlap.table()
    return table.reindex(columns=[c for c in _PAIR_COLUMNS if c in table.columns])
