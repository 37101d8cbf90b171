"""Helpers shared by the figure families: the layer x head grid, hover text, templates.

Every grid figure uses the same coordinates, so that a heatmap of scores, a circuit and
an overlap grid of the same model line up cell for cell: column ``h`` is head ``h``,
column ``n_heads`` is the MLP, row ``layer`` is the layer with layer 0 at the bottom.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from reuse_lens.nodes import MLP, AttentionHead, Expert, parse_node

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from reuse_lens.nodes import ModelShape

MLP_LABEL = "MLP"
"""The label of the grid column that holds each layer's MLP."""

NEITHER_COLOR = "#e5e5e5"
"""Cells that no circuit contains: light enough that the grid stays readable."""


def finish(fig: go.Figure, *, template: str, title: str | None, default_title: str) -> go.Figure:
    """Apply the caller's template and title; the default title says what is drawn."""
    fig.update_layout(template=template, title=default_title if title is None else title)
    return fig


def fmt(value: float | None) -> str:
    """A score as hover text shows it: three significant digits, or why there is none."""
    if value is None:
        return "no score"
    if math.isnan(value):
        return "not scored"
    return f"{value:.3g}"


def to_numpy(values: Any) -> np.ndarray:
    """A float array from a torch tensor or anything array-like, without importing torch."""
    if hasattr(values, "detach"):  # a torch tensor, maybe on the GPU or in bfloat16
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=float)


def grid_width(shape: ModelShape) -> int:
    """Columns of the grid: the heads, then the MLP (or, with expert nodes, its experts)."""
    return shape.n_heads + (shape.n_columns if shape.experts else 1)


def grid_cell(node: str, shape: ModelShape) -> tuple[int, int]:
    """(row, column) of a head, MLP or expert in the grid of a model of ``shape``.

    With expert nodes, the columns after the heads are the experts (``ModelShape.column``:
    shared experts last); a layer whose MLP is dense has it in the first of them.
    """
    parsed = parse_node(node)
    if isinstance(parsed, AttentionHead):
        return parsed.layer, parsed.head
    if isinstance(parsed, MLP):
        return parsed.layer, shape.n_heads
    if isinstance(parsed, Expert):
        return parsed.layer, shape.n_heads + shape.column(parsed)
    raise ValueError(f"{node!r} is an edge end, not a head or MLP; it has no grid cell")


def grid_names(shape: ModelShape) -> list[list[str | None]]:
    """The node name of every grid cell, ``None`` where there is no node (the MLP column of
    attention-only models, an expert column a layer lacks)."""
    rows: list[list[str | None]] = []
    for layer in range(shape.n_layers):
        row: list[str | None] = [None] * grid_width(shape)
        for node in shape.nodes():
            if node.layer == layer:
                row[grid_cell(node.name, shape)[1]] = node.name
        rows.append(row)
    return rows


def grid_labels(shape: ModelShape) -> list[str]:
    """The grid's column labels: head numbers, then ``MLP`` or the experts."""
    heads = [str(head) for head in range(shape.n_heads)]
    if not shape.experts:
        return [*heads, MLP_LABEL]
    routed = [f"e{k}" for k in range(max(shape.experts))]
    return heads + routed + (["shared"] if any(shape.shared) else [])


def grid_axes(fig: go.Figure, shape: ModelShape, **where: Any) -> None:
    """Label the grid's axes: heads and an MLP column (or the experts) across, layers up
    (layer 0 at bottom).

    ``where`` passes ``row``/``col`` through when the grid is one panel of subplots.
    """
    width = grid_width(shape)
    fig.update_xaxes(
        title_text="head, then expert" if shape.experts else "head",
        tickvals=list(range(width)),
        ticktext=grid_labels(shape),
        range=[-0.5, width - 0.5],
        **where,
    )
    fig.update_yaxes(
        title_text="layer",
        tickvals=list(range(shape.n_layers)),
        range=[-0.5, shape.n_layers - 0.5],
        **where,
    )


def canonical_scores(scores: Mapping[str, float] | None) -> dict[str, float]:
    """Node scores keyed by canonical names (``"a3.h1"``), skipping keys that are not nodes."""
    out: dict[str, float] = {}
    for key, value in (scores or {}).items():
        try:
            name = parse_node(key).name
        except ValueError:
            continue  # an edge key or a foreign label: hover text only shows node scores
        out[name] = float(value)
    return out


def check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the bad ``value`` and every accepted choice."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(map(repr, choices))}")
