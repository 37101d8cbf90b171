"""The rows of ``OverlapReport.table`` and of its JSON: every statistic of every pair."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from reuse_lens.compare._sets import KINDS

if TYPE_CHECKING:
    from reuse_lens.compare.overlap import OverlapReport

__all__ = ["pair_columns", "pair_rows"]


def pair_columns(n_permutations: int) -> list[str]:
    """The columns of ``OverlapReport.table``, in order."""
    per_kind = [
        "size_a",
        "size_b",
        "shared",
        "jaccard",
        "overlap",
        "directional_ab",
        "directional_ba",
        "p_value",
        "p_adjusted",
        "expected_jaccard",
    ]
    if n_permutations > 0:
        per_kind.append("permutation_p_value")
    tail = ["edge_iou", "spearman", "kendall", "n_scored"]
    tail += ["stability_a", "stability_b", "stability"]
    return ["a", "b", *(f"{col}_{kind}" for kind in KINDS for col in per_kind), *tail]


def pair_rows(report: OverlapReport, *, n_permutations: int, seed: int) -> list[dict[str, Any]]:
    """One dict per unordered pair of ``report``, every statistic (``OverlapReport.table``)."""
    rows = []
    adjusted = {kind: report.adjusted_p_values(kind) for kind in KINDS}
    for i, a in enumerate(report.names):
        for b in report.names[i + 1 :]:
            row: dict[str, Any] = {"a": a, "b": b}
            for kind in KINDS:
                row[f"size_a_{kind}"] = len(report.nodes(a, kind))
                row[f"size_b_{kind}"] = len(report.nodes(b, kind))
                row[f"shared_{kind}"] = len(report.shared(a, b, kind))
                row[f"jaccard_{kind}"] = report.jaccard(a, b, kind)
                row[f"overlap_{kind}"] = report.overlap_coefficient(a, b, kind)
                row[f"directional_ab_{kind}"] = report.directional(a, b, kind)
                row[f"directional_ba_{kind}"] = report.directional(b, a, kind)
                row[f"p_value_{kind}"] = report.p_value(a, b, kind)
                row[f"p_adjusted_{kind}"] = adjusted[kind][(a, b)]
                row[f"expected_jaccard_{kind}"] = report.expected_jaccard(a, b, kind)
                if n_permutations > 0:
                    row[f"permutation_p_value_{kind}"] = report.permutation_p_value(
                        a, b, kind, n_permutations=n_permutations, seed=seed
                    )
            edge_iou = report.edge_iou(a, b)
            row["edge_iou"] = math.nan if edge_iou is None else edge_iou
            ranks = report.rank_correlation(a, b)
            row["spearman"] = math.nan if ranks is None else ranks["spearman"]
            row["kendall"] = math.nan if ranks is None else ranks["kendall"]
            row["n_scored"] = math.nan if ranks is None else ranks["n"]
            stab_a = report.stability.get(a, math.nan)
            stab_b = report.stability.get(b, math.nan)
            row["stability_a"], row["stability_b"] = stab_a, stab_b
            both = a in report.stability and b in report.stability
            row["stability"] = min(stab_a, stab_b) if both else math.nan
            rows.append(row)
    return rows
