"""What fine-tuning changed, drawn on the layer x head grid: drift and cross-model patching."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from reuse_lens.plot._common import (
    check_choice,
    finish,
    fmt,
    grid_axes,
    grid_cell,
    grid_names,
    grid_width,
)

if TYPE_CHECKING:
    from reuse_lens.circuits.circuit import Circuit
    from reuse_lens.compare.drift import DriftReport
    from reuse_lens.nodes import ModelShape
    from reuse_lens.patching.scores import NodeScores

__all__ = ["cmap_grid", "drift_grid"]

_MEASURES = (
    "weight",
    "act_l2_answer",
    "act_cos_answer",
    "act_l2_all",
    "act_cos_all",
    "attn_tv",
)
_MEASURE_LABELS = {
    "weight": "relative weight change",
    "act_l2_answer": "relative output change (answer position)",
    "act_cos_answer": "1 − cosine of the output (answer position)",
    "act_l2_all": "relative output change (all positions)",
    "act_cos_all": "1 − cosine of the output (all positions)",
    "attn_tv": "attention pattern change (total variation)",
}


def drift_grid(
    report: DriftReport,
    measure: str = "weight",
    *,
    circuit: Circuit | Iterable[str] | None = None,
    template: str = "plotly_white",
    title: str | None = None,
) -> go.Figure:
    """The layer x head grid (plus an MLP column) coloured by how much fine-tuning changed
    each node, with a circuit's members outlined.

    Arguments:
        report: a ``DriftReport`` (``rl.component_drift``).
        measure: a column of ``report.table()``: ``"weight"`` (relative weight change),
            ``"act_l2_answer"``, ``"act_cos_answer"``, ``"act_l2_all"``, ``"act_cos_all"``
            or ``"attn_tv"`` (heads only).
        circuit: nodes to outline; by default the report's own circuit, if it has one.
        template: a plotly template name.
        title: the figure title; by default it names the two models and the measure.

    Returns:
        A figure with a heatmap trace ``"drift"`` whose ``z`` has shape (layer, head + 1),
        darker where a node changed more (0 = unchanged), and a scatter trace
        ``"circuit"`` of outlined cells when there is a circuit.
    """
    check_choice("measure", measure, _MEASURES)
    values = report.values(measure)
    members = report.circuit if circuit is None else _names(circuit)
    label = _MEASURE_LABELS[measure]
    fig = _grid(report.shape, values, label, colorscale="Viridis", zmid=None)
    _outline(fig, report.shape, members, "circuit")
    default = f"What fine-tuning changed, {report.base} -> {report.tuned}: {label}"
    return finish(fig, template=template, title=title, default_title=default)


def cmap_grid(
    scores: NodeScores,
    *,
    circuit: Circuit | Iterable[str] | None = None,
    template: str = "plotly_white",
    title: str | None = None,
) -> go.Figure:
    """Cross-model patching (``rl.cross_model_patching``) on the grid: the share of the
    fine-tune's gain each node's output carries, with a circuit's members outlined.

    The colour scale is diverging and centred on 0: blue nodes move the target towards
    the source model (1 = the node alone closes the gap), red ones away from it.
    """
    from reuse_lens.plot._common import to_numpy

    shape = scores.shape
    values: dict[str, float] = {}
    heads = to_numpy(scores.heads)
    for layer in range(shape.n_layers):
        for head in range(shape.n_heads):
            values[f"a{layer}.h{head}"] = float(heads[layer, head])
        if scores.mlps is not None:
            values[f"m{layer}"] = float(to_numpy(scores.mlps)[layer])
    normalized = bool(scores.settings.get("normalize", True))
    label = "share of the gap recovered" if normalized else "effect on the metric"
    fig = _grid(shape, values, label, colorscale="RdBu", zmid=0.0)
    _outline(fig, shape, None if circuit is None else _names(circuit), "circuit")
    source, target = (
        scores.settings.get("source", "source"),
        scores.settings.get("target", "target"),
    )
    default = f"Cross-model patching: each node's output from {source} into {target}"
    return finish(fig, template=template, title=title, default_title=default)


def _names(circuit: Circuit | Iterable[str]) -> frozenset[str]:
    from reuse_lens.circuits.circuit import Circuit

    return frozenset(circuit.nodes if isinstance(circuit, Circuit) else circuit)


def _grid(
    shape: ModelShape, values: dict[str, float], label: str, *, colorscale: str, zmid: float | None
) -> go.Figure:
    names = grid_names(shape)
    z = np.array(
        [[np.nan if n is None else values.get(n, np.nan) for n in row] for row in names],
        dtype=float,
    )
    text = [
        [
            "no MLP (attention-only model)" if n is None else f"{n}: {fmt(float(v))}"
            for n, v in zip(row, zrow, strict=True)
        ]
        for row, zrow in zip(names, z, strict=True)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(grid_width(shape))),
            y=list(range(shape.n_layers)),
            name="drift" if zmid is None else "cmap",
            text=text,
            hovertemplate="%{text}<extra></extra>",
            colorscale=colorscale,
            zmid=zmid,
            zmin=None if zmid is not None else 0.0,
            xgap=1,
            ygap=1,
            colorbar={"title": {"text": label}},
        )
    )
    grid_axes(fig, shape)
    return fig


def _outline(fig: go.Figure, shape: ModelShape, members: frozenset[str] | None, name: str) -> None:
    if not members:
        return
    cells = [grid_cell(node, shape) for node in sorted(members)]
    fig.add_trace(
        go.Scatter(
            x=[col for _, col in cells],
            y=[row for row, _ in cells],
            mode="markers",
            name=name,
            marker={"symbol": "square-open", "size": 22, "color": "#d62728", "line": {"width": 3}},
            hovertemplate="%{text} (in the circuit)<extra></extra>",
            text=sorted(members),
        )
    )
