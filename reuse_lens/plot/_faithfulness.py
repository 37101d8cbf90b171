"""Faithfulness figures: MIB curves over circuit size, and cross-task / cross-model matrices."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from reuse_lens.plot._common import finish, fmt

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["MIB_FRACTIONS", "CurveLike", "faithfulness_curves", "faithfulness_matrix"]

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The circuit sizes of the MIB circuit track (Mueller et al. 2025): 0.1% to 100%."""

_CURVE_FIELDS = ("fractions", "sizes", "faithfulness", "level", "cpr", "cmd", "method", "task")


@runtime_checkable
class CurveLike(Protocol):
    """What a faithfulness curve needs to be drawn; ``FaithfulnessCurve`` is one."""

    @property
    def fractions(self) -> Sequence[float]: ...
    @property
    def sizes(self) -> Sequence[int]: ...
    @property
    def faithfulness(self) -> Sequence[float]: ...
    @property
    def level(self) -> str: ...
    @property
    def cpr(self) -> float: ...
    @property
    def cmd(self) -> float: ...
    @property
    def method(self) -> str: ...
    @property
    def task(self) -> str: ...


def faithfulness_curves(
    curves: Mapping[str, CurveLike] | CurveLike,
    *,
    template: str = "plotly_white",
    title: str | None = None,
) -> go.Figure:
    """Faithfulness against circuit size, on a log axis at MIB's sizes (0.1% to 100%).

    Lines at 1 (the full model) and 0 (everything ablated) frame the curves; CPR (area
    under the curve, higher is better) and CMD (area of |1 − f|, lower is better) are
    given in each legend entry.

    Arguments:
        curves: ``{label: FaithfulnessCurve}`` or a single curve (labelled by its method).
        template: a plotly template name.
        title: the figure title; by default it names the task(s).

    Returns:
        A figure with one line trace per curve (x = fractions, y = faithfulness); hover
        text gives the fraction, the number of nodes or edges kept and the faithfulness.

    Raises:
        ValueError: for no curves, a curve missing a field, fields of different lengths
            or a fraction that is not positive (the axis is logarithmic).
    """
    named = _named_curves(curves)
    fig = go.Figure()
    palette = qualitative.Plotly
    for index, (label, curve) in enumerate(named.items()):
        _check_curve(label, curve)
        unit = "edges" if curve.level == "edge" else "nodes"
        hover = [
            f"{label}<br>{_percent(f)} of {unit} ({n} kept)<br>faithfulness {fmt(float(y))}"
            for f, n, y in zip(curve.fractions, curve.sizes, curve.faithfulness, strict=True)
        ]
        fig.add_trace(
            go.Scatter(
                x=list(curve.fractions),
                y=list(curve.faithfulness),
                mode="lines+markers",
                name=f"{label} (CPR {fmt(curve.cpr)}, CMD {fmt(curve.cmd)})",
                line={"color": palette[index % len(palette)]},
                text=hover,
                hovertemplate="%{text}<extra></extra>",
            )
        )
    fig.add_hline(y=1.0, line={"color": "#555555", "dash": "dash", "width": 1})
    fig.add_hline(y=0.0, line={"color": "#999999", "dash": "dot", "width": 1})
    levels = {curve.level for curve in named.values()}
    unit = (
        {"edge": "edges", "node": "nodes"}.get(next(iter(levels)), "") if len(levels) == 1 else ""
    )
    fig.update_xaxes(
        type="log",
        title_text=f"fraction of {unit or 'the model'} kept",
        tickvals=list(MIB_FRACTIONS),
        ticktext=[_percent(f) for f in MIB_FRACTIONS],
    )
    fig.update_yaxes(title_text="faithfulness")
    tasks = sorted({str(curve.task) for curve in named.values()})
    default = f"Faithfulness against circuit size ({', '.join(tasks)})"
    return finish(fig, template=template, title=title, default_title=default)


def faithfulness_matrix(
    df: pd.DataFrame,
    *,
    template: str = "plotly_white",
    title: str | None = None,
    value_name: str = "faithfulness",
) -> go.Figure:
    """Annotated heatmap of the faithfulness of each circuit on each task (or model).

    Rows are circuits and columns the tasks or models they are evaluated on: a
    circuit reused by another task keeps a high faithfulness in that task's column
    (Merullo et al. 2024; Prakash et al. 2024 for fine-tuned models).

    Arguments:
        df: index = circuit names, columns = task (or model) names, values =
            faithfulness; the index and column ``name`` label the axes when set.
        template: a plotly template name.
        title: the figure title.
        value_name: what the values are, for the colour bar, the hover text and the
            default title; e.g. ``"damage"`` for a cross-ablation matrix, whose values
            are 1 − faithfulness.

    Returns:
        A figure with one heatmap whose ``z`` equals ``df``'s values (rows top to bottom).

    Raises:
        ValueError: if ``df`` is empty or holds values that are not numbers.
    """
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise ValueError(
            f"faithfulness_matrix needs at least one row and one column, got shape {df.shape}"
        )
    try:
        values = df.to_numpy(dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"faithfulness_matrix needs numbers ({value_name} floats); {error}"
        ) from error
    rows, cols = [str(r) for r in df.index], [str(c) for c in df.columns]
    row_title = str(df.index.name or "circuit")
    col_title = str(df.columns.name or "task")
    text = [["–" if math.isnan(v) else f"{v:.2f}" for v in row] for row in values]
    hover = [
        [
            f"{row_title}: {r}<br>{col_title}: {c}<br>{value_name}: {fmt(float(v))}"
            for c, v in zip(cols, row, strict=True)
        ]
        for r, row in zip(rows, values, strict=True)
    ]
    finite = values[np.isfinite(values)]
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    high = max(1.0, float(finite.max())) if finite.size else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=cols,
            y=rows,
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale="Blues",
            zmin=low,
            zmax=high,
            xgap=1,
            ygap=1,
            colorbar={"title": {"text": value_name}},
        )
    )
    fig.update_xaxes(title_text=col_title)
    fig.update_yaxes(title_text=row_title, autorange="reversed")
    default = f"{value_name[:1].upper()}{value_name[1:]} of each {row_title} on each {col_title}"
    return finish(fig, template=template, title=title, default_title=default)


def _named_curves(curves: Mapping[str, CurveLike] | CurveLike) -> dict[str, CurveLike]:
    if isinstance(curves, Mapping):
        if not curves:
            raise ValueError("no curves to draw; pass {label: FaithfulnessCurve, ...}")
        return {str(label): curve for label, curve in curves.items()}
    return {str(getattr(curves, "method", "circuit")): curves}


def _check_curve(label: str, curve: object) -> None:
    missing = [name for name in _CURVE_FIELDS if not hasattr(curve, name)]
    if missing:
        raise ValueError(
            f"curve {label!r} ({type(curve).__name__}) lacks {', '.join(missing)}; pass "
            "FaithfulnessCurve objects from reuse_lens.faithfulness_curve"
        )
    assert isinstance(curve, CurveLike)  # every field checked above
    lengths = {len(curve.fractions), len(curve.sizes), len(curve.faithfulness)}
    if len(lengths) != 1:
        raise ValueError(
            f"curve {label!r} has {len(curve.fractions)} fractions, {len(curve.sizes)} sizes "
            f"and {len(curve.faithfulness)} faithfulness values; they must pair up"
        )
    if any(not f > 0 for f in curve.fractions):
        raise ValueError(
            f"curve {label!r} has a fraction <= 0 ({list(curve.fractions)}); fractions are "
            "drawn on a log axis, so they must be positive"
        )


def _percent(fraction: float) -> str:
    """0.001 -> '0.1%', 0.5 -> '50%'."""
    return f"{fraction * 100:.3g}%"
