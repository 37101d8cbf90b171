"""The patching heatmap: every head's and MLP's effect on one layer x head grid."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from reuse_lens.plot._common import finish, fmt, grid_axes, grid_names, grid_width, to_numpy

if TYPE_CHECKING:
    from reuse_lens.patching.edges import EdgeScores
    from reuse_lens.patching.scores import NodeScores

__all__ = ["patching_heatmap"]


def patching_heatmap(
    scores: NodeScores | EdgeScores,
    *,
    normalized: bool = False,
    template: str = "plotly_white",
    title: str | None = None,
) -> go.Figure:
    """Layer x head heatmap of patching effects, with each layer's MLP in a last column.

    The colour scale is diverging and centred on 0 (RdBu), because an effect's sign
    matters: in noising, a node the task needs pulls the metric down. The MLP column is
    blank for attention-only models, so grids of different models line up.

    Arguments:
        scores: the node scores of a patching method; edge scores are first summed into
            node scores (``EdgeScores.to_node_scores``).
        normalized: divide every effect by (clean − corrupted), so −1 means a patch undoes
            the whole gap (``NodeScores.normalized``).
        template: a plotly template name.
        title: the figure title; by default it names the method.

    Returns:
        A figure with one heatmap trace whose ``z`` has shape (layer, head_index + 1);
        hover text reads ``"a3.h1: -0.42"``.
    """
    if hasattr(scores, "to_node_scores"):
        scores = scores.to_node_scores()  # type: ignore[union-attr]
    node_scores: NodeScores = scores  # type: ignore[assignment]
    if normalized:
        node_scores = node_scores.normalized()
    shape = node_scores.shape
    names = grid_names(shape)
    missing = "no such expert in this layer" if shape.experts else "no MLP (attention-only model)"
    if shape.experts:  # the experts' columns follow the heads (grid_cell)
        values = node_scores.as_dict()
        z = np.array([[values.get(n, np.nan) if n else np.nan for n in row] for row in names])
    else:
        heads = to_numpy(node_scores.heads)
        mlps = to_numpy(node_scores.mlps) if node_scores.mlps is not None else None
        mlp_column = np.full((shape.n_layers, 1), np.nan) if mlps is None else mlps[:, None]
        z = np.concatenate([heads, mlp_column], axis=1)
    text = [
        [_hover(name, float(value), missing) for name, value in zip(row, values, strict=True)]
        for row, values in zip(names, z, strict=True)
    ]
    label = "normalized effect" if normalized else "effect"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(grid_width(shape))),
            y=list(range(shape.n_layers)),
            text=text,
            hovertemplate="%{text}<extra></extra>",
            colorscale="RdBu",
            zmid=0.0,
            xgap=1,
            ygap=1,
            # RdBu runs red (low) to blue (high): say so where the reader looks.
            colorbar={"title": {"text": f"{label}<br>red: metric falls<br>blue: rises"}},
        )
    )
    grid_axes(fig, shape)
    default = f"{node_scores.method} patching: {label} of each head and MLP"
    return finish(fig, template=template, title=title, default_title=default)


def _hover(name: str | None, value: float, missing: str) -> str:
    if name is None:
        return missing
    return f"{name}: {fmt(value)}"
