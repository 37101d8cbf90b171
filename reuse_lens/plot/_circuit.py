"""The circuit diagram: a circuit's nodes and edges on the model's layer x head grid."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import plotly.graph_objects as go
from plotly.colors import qualitative

from reuse_lens.nodes import InputNode, LogitsNode, parse_edge, parse_node
from reuse_lens.plot._common import (
    MLP_LABEL,
    NEITHER_COLOR,
    canonical_scores,
    check_choice,
    finish,
    fmt,
    grid_cell,
    grid_labels,
    grid_names,
    grid_width,
)

if TYPE_CHECKING:
    from reuse_lens.circuits.circuit import Circuit
    from reuse_lens.nodes import Endpoint, ModelShape

__all__ = ["ColorBy", "circuit_diagram"]

ColorBy = Literal["auto", "class", "stage", "score"]
"""How circuit nodes are coloured.

- ``auto``: by class when ``classes`` are given, else by stage when the circuit has
  path-patching stages, else by class (head or MLP).
- ``class``: by the ``classes`` given (e.g. ``{"a9.h9": "name mover"}``), else head or MLP.
- ``stage``: by path-patching stage (0 = direct senders to the logits).
- ``score``: by node score, on a diverging scale centred on 0.
"""

COLOR_BY: tuple[ColorBy, ...] = ("auto", "class", "stage", "score")

# q, k and v edges end a little apart under the receiving head, so that the three
# inputs of one head stay distinguishable even where their lines overlap.
_INPUT_STYLE: dict[str, tuple[str, str, float]] = {
    "q": ("#1f77b4", "solid", -0.2),
    "k": ("#2ca02c", "dash", 0.0),
    "v": ("#d62728", "dot", 0.2),
    "": ("#7f7f7f", "solid", 0.0),
}
_INPUT_LABEL = {"q": "into q", "k": "into k", "v": "into v", "": "into MLPs / logits"}


def circuit_diagram(
    circuit: Circuit,
    *,
    color_by: ColorBy = "auto",
    classes: Mapping[str, str] | None = None,
    template: str = "plotly_white",
    title: str | None = None,
) -> go.Figure:
    """Draw a circuit on its model's grid: layers up, the first at the bottom.

    Heads sit at their index across each layer and the MLP to their right, as in
    :func:`patching_heatmap`. Nodes outside the circuit are drawn faintly so that the
    grid, and hence where the circuit lies, stays visible. Edge circuits draw their
    edges as lines, from the input (below layer 0) to the logits (above the last layer);
    edges into a head's q, k and v inputs differ in colour and dash. Node circuits have
    no edges, so they draw their nodes on the layers alone, without input and logits.

    Arguments:
        circuit: the circuit to draw.
        color_by: ``"auto"``, ``"class"``, ``"stage"`` or ``"score"`` (see ``ColorBy``).
        classes: a class label per node for ``color_by="class"``, e.g. Wang et al.'s
            ``{"a9.h9": "name mover", "a7.h3": "s-inhibition"}``; nodes without one are
            labelled ``head`` or ``MLP``.
        template: a plotly template name.
        title: the figure title; by default it gives the circuit's size and task.

    Returns:
        A figure whose node traces carry each node's name in ``customdata`` and its name,
        score and stage in the hover text; edges' hover text gives their name and score.

    Raises:
        ValueError: for an unknown ``color_by``, ``"stage"`` for a circuit without stages
            or ``"score"`` for one without node scores.
    """
    check_choice("color_by", color_by, COLOR_BY)
    if classes and color_by not in ("auto", "class"):
        raise ValueError(f"classes= labels nodes for color_by='class', not color_by={color_by!r}")
    if color_by == "auto":
        color_by = "class" if classes or not circuit.stages else "stage"
    if color_by == "stage" and not circuit.stages:
        raise ValueError(
            "color_by='stage' needs a circuit with path-patching stages (circuit.stages is "
            "empty); use color_by='class' or 'score'"
        )
    scores = canonical_scores(circuit.node_scores)
    if color_by == "score" and not scores:
        raise ValueError(
            "color_by='score' needs node scores (circuit.node_scores is empty); use "
            "color_by='class', or build the circuit with node_scores"
        )
    shape = circuit.shape
    fig = go.Figure()
    _add_background(fig, circuit, scores)
    # A node circuit has no edges: input and logits would stand apart with nothing
    # joining them, so only the layers are drawn, bottom (first) to top (last).
    if circuit.edges:
        _add_edges(fig, circuit, shape)
        _add_ends(fig, shape)
    members = [name for row in grid_names(shape) for name in row if name in circuit.nodes]
    if color_by == "score":
        _add_scored_nodes(fig, circuit, members, scores)
    else:
        labels = _labels(circuit, members, color_by, classes or {})
        _add_categories(fig, circuit, members, labels, scores)
    _layout(fig, shape, ends=bool(circuit.edges))
    task = circuit.metadata.get("task")
    default = f"{circuit.level}-level circuit: {len(circuit)} nodes" + (
        f", {len(circuit.edges)} edges" if circuit.edges else ""
    )
    default += f" ({task})" if task else ""
    return finish(fig, template=template, title=title, default_title=default)


def _position(end: Endpoint, shape: ModelShape) -> tuple[float, float]:
    """Where a node or an end of the residual stream is drawn."""
    middle = (grid_width(shape) - (1 if shape.has_mlps else 2)) / 2  # centre of the columns
    if isinstance(end, InputNode):
        return middle, -1.0
    if isinstance(end, LogitsNode):
        return middle, float(shape.n_layers)
    row, column = grid_cell(end.name, shape)
    return float(column), float(row)


def _hover(name: str, circuit: Circuit, scores: Mapping[str, float]) -> str:
    lines = [name if name in circuit.nodes else f"{name} (not in the circuit)"]
    if name in scores:
        lines.append(f"score: {fmt(scores[name])}")
    if name in circuit.stages:
        lines.append(f"stage: {circuit.stages[name]}")
    return "<br>".join(lines)


def _add_background(fig: go.Figure, circuit: Circuit, scores: Mapping[str, float]) -> None:
    shape = circuit.shape
    others = [n for row in grid_names(shape) for n in row if n and n not in circuit.nodes]
    x, y = zip(*(grid_cell(n, shape)[::-1] for n in others), strict=True) if others else ((), ())
    fig.add_trace(
        go.Scatter(
            x=list(x),
            y=list(y),
            mode="markers",
            name="not in the circuit",
            marker={"color": NEITHER_COLOR, "size": 9, "line": {"width": 0}},
            opacity=0.6,
            customdata=others,
            text=[_hover(n, circuit, scores) for n in others],
            hovertemplate="%{text}<extra></extra>",
        )
    )


def _add_ends(fig: go.Figure, shape: ModelShape) -> None:
    ends = [InputNode(), LogitsNode()]
    points = [_position(end, shape) for end in ends]
    fig.add_trace(
        go.Scatter(
            x=[p[0] for p in points],
            y=[p[1] for p in points],
            mode="markers",
            marker={"symbol": "square", "size": 14, "color": "#444444"},
            name="ends",
            customdata=[end.name for end in ends],
            hovertemplate="%{customdata}<extra></extra>",
            showlegend=False,
        )
    )


def _add_edges(fig: go.Figure, circuit: Circuit, shape: ModelShape) -> None:
    """One line trace per receiver input, plus hoverable markers at the edges' middles."""
    groups: dict[str, list[tuple[str, str]]] = {kind: [] for kind in _INPUT_STYLE}
    for sender, receiver in sorted(circuit.edges):
        groups[parse_edge(f"{sender}->{receiver}").receiver_input or ""].append((sender, receiver))
    for kind, edges in groups.items():
        if not edges:
            continue
        color, dash, offset = _INPUT_STYLE[kind]
        xs: list[float | None] = []
        ys: list[float | None] = []
        mid_x, mid_y, names, hover = [], [], [], []
        for sender, receiver in edges:
            edge = parse_edge(f"{sender}->{receiver}")
            x0, y0 = _position(edge.sender, shape)
            x1, y1 = _position(edge.receiver, shape)
            x1 += offset
            xs += [x0, x1, None]
            ys += [y0, y1, None]
            mid_x.append((x0 + x1) / 2)
            mid_y.append((y0 + y1) / 2)
            names.append(edge.name)
            score = circuit.edge_scores.get((sender, receiver))
            hover.append(edge.name if score is None else f"{edge.name}: {fmt(score)}")
        group = f"edges {kind or 'other'}"
        line = {"color": color, "dash": dash, "width": 1.5}
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line=line,
                opacity=0.6,
                name=_INPUT_LABEL[kind],
                legendgroup=group,
                hoverinfo="skip",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=mid_x,
                y=mid_y,
                mode="markers",
                marker={"color": color, "size": 4},
                name=_INPUT_LABEL[kind],
                legendgroup=group,
                showlegend=False,
                customdata=names,
                text=hover,
                hovertemplate="%{text}<extra></extra>",
            )
        )


def _labels(
    circuit: Circuit, members: list[str], color_by: ColorBy, classes: Mapping[str, str]
) -> list[str]:
    if color_by == "stage":
        return [
            f"stage {circuit.stages[n]}" if n in circuit.stages else "no stage" for n in members
        ]
    # canonical keys, so that a label given for " a9.h9" finds node a9.h9
    named = {parse_node(k).name: str(v) for k, v in classes.items()}
    return [named.get(n, "head" if n.startswith("a") else MLP_LABEL) for n in members]


def _add_categories(
    fig: go.Figure,
    circuit: Circuit,
    members: list[str],
    labels: list[str],
    scores: Mapping[str, float],
) -> None:
    shape = circuit.shape
    palette = qualitative.Plotly
    for index, label in enumerate(sorted(set(labels), key=_label_order)):
        nodes = [n for n, lab in zip(members, labels, strict=True) if lab == label]
        cells = [grid_cell(n, shape) for n in nodes]
        fig.add_trace(
            go.Scatter(
                x=[c[1] for c in cells],
                y=[c[0] for c in cells],
                mode="markers",
                name=label,
                marker={
                    "color": palette[index % len(palette)],
                    "size": 15,
                    "line": {"width": 1, "color": "#333333"},
                },
                customdata=nodes,
                text=[_hover(n, circuit, scores) for n in nodes],
                hovertemplate="%{text}<extra></extra>",
            )
        )


def _label_order(label: str) -> tuple[int, int, str]:
    """Sort key: stages numerically (10 after 9), given classes by name, then head, MLP."""
    if label.startswith("stage "):
        return 0, int(label.split()[1]), ""
    fallback = {"head": 2, MLP_LABEL: 3, "no stage": 4}
    return fallback.get(label, 1), 0, label


def _add_scored_nodes(
    fig: go.Figure, circuit: Circuit, members: list[str], scores: Mapping[str, float]
) -> None:
    cells = [grid_cell(n, circuit.shape) for n in members]
    fig.add_trace(
        go.Scatter(
            x=[c[1] for c in cells],
            y=[c[0] for c in cells],
            mode="markers",
            name="circuit nodes",
            marker={
                "color": [scores.get(n, float("nan")) for n in members],
                "colorscale": "RdBu",
                "cmid": 0.0,
                "size": 15,
                "line": {"width": 1, "color": "#333333"},
                "colorbar": {"title": {"text": "score"}},
                "showscale": True,
            },
            customdata=members,
            text=[_hover(n, circuit, scores) for n in members],
            hovertemplate="%{text}<extra></extra>",
        )
    )


def _layout(fig: go.Figure, shape: ModelShape, *, ends: bool = True) -> None:
    """Axes: heads (and the MLP column) across, layers up; with ``ends``, the input below
    layer 0 and the logits above the last layer."""
    width = grid_width(shape) - (0 if shape.has_mlps else 1)  # no MLP column without MLPs
    columns, labels = list(range(width)), grid_labels(shape)[:width]
    layers = list(map(str, range(shape.n_layers)))
    if ends:
        rows = list(range(-1, shape.n_layers + 1))
        row_labels = ["input", *layers, "logits"]
        span = [-1.7, shape.n_layers + 0.7]
    else:
        rows, row_labels, span = list(range(shape.n_layers)), layers, [-0.7, shape.n_layers - 0.3]
    fig.update_xaxes(
        title_text="head", tickvals=columns, ticktext=labels, zeroline=False, showgrid=False
    )
    fig.update_yaxes(
        title_text="layer",
        tickvals=rows,
        ticktext=row_labels,
        range=span,
        zeroline=False,
        showgrid=False,
    )
    height = 45 * (shape.n_layers + (2 if ends else 0))
    fig.update_layout(height=max(400, height), legend={"itemsizing": "constant"})
