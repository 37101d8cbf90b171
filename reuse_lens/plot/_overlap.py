"""Figures of circuit overlap: the membership grid, statistic matrices, UpSet, top-k sweeps."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from reuse_lens.compare.answer import CORRECTION_NAMES
from reuse_lens.compare.overlap import ALPHA, KINDS, STATS, OverlapReport, compare
from reuse_lens.plot._common import (
    NEITHER_COLOR,
    canonical_scores,
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
    from reuse_lens.compare.overlap import Kind, Stat

__all__ = ["jaccard_matrix", "overlap_grid", "threshold_sweep", "upset"]

# Two circuits: one colour each and their mix for the shared nodes (blue + red = purple).
_PAIR_COLORS = ("#1f77b4", "#d62728", "#7b3294")
_PALETTE = qualitative.Plotly + qualitative.Dark24
_BOUNDED = frozenset({"jaccard", "overlap", "directional", "expected_jaccard", "edge_iou"})


def overlap_grid(
    circuits_or_report: Mapping[str, Circuit] | OverlapReport,
    *,
    template: str = "plotly_white",
    title: str | None = None,
) -> go.Figure:
    """The layer x head grid (plus an MLP column), each cell coloured by which circuits hold it.

    This is the picture of circuit reuse. For two circuits A and B the cells are "A only",
    "B only", "both" or "neither", one colour each. For three or more, a colour per
    combination of circuits stops being readable (seven circuits give a dozen or more), so
    each cell is coloured by *how many* circuits use it, on one scale, and its hover text
    lists them. Only nodes inside the report's universe count.

    Arguments:
        circuits_or_report: ``{name: Circuit}`` (compared with ``reuse_lens.compare``)
            or an OverlapReport.
        template: a plotly template name.
        title: the figure title; by default it names the circuits.

    Returns:
        For two circuits, a figure with one heatmap trace per membership category, named
        by it; a trace's ``z`` is 1 on its cells and NaN elsewhere. For three or more, one
        heatmap trace named ``"circuits"`` whose ``z`` is the number of circuits using each
        node (NaN in the MLP column of an attention-only model). Hover text lists the
        circuits holding the node and each circuit's score for it.

    Raises:
        ValueError: for fewer than two circuits, or circuits of models of different shapes.
    """
    report = _as_report(circuits_or_report)
    if len(report.names) < 2:
        raise ValueError(
            f"overlap_grid needs at least two circuits to compare, got {len(report.names)} "
            f"({', '.join(map(repr, report.names))}); pass e.g. {{'ioi': c1, 'sva': c2}}"
        )
    shape = report.shape
    names = grid_names(shape)
    members = [[_members(report, node) for node in row] for row in names]
    scores = {name: canonical_scores(report.circuits[name].node_scores) for name in report.names}
    text = [
        [_grid_hover(node, held, scores) for node, held in zip(row, held_row, strict=True)]
        for row, held_row in zip(names, members, strict=True)
    ]
    default = "Which circuits use each head and MLP: " + ", ".join(report.names)
    if len(report.names) > 2:
        fig = _count_grid(report, names, members, text)
        grid_axes(fig, shape)
        return finish(fig, template=template, title=title, default_title=default)
    present = {held for row in members for held in row if held is not None}
    fig = go.Figure()
    for index, combo in enumerate(_category_order(present, report.names)):
        z = np.array([[1.0 if held == combo else np.nan for held in row] for row in members])
        color = _category_color(combo, report.names, index)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(range(grid_width(shape))),
                y=list(range(shape.n_layers)),
                name=_category_label(combo, report.names),
                colorscale=[[0.0, color], [1.0, color]],
                showscale=False,
                showlegend=True,
                hoverongaps=False,
                xgap=1,
                ygap=1,
                customdata=names,
                text=text,
                hovertemplate="%{text}<extra></extra>",
            )
        )
    grid_axes(fig, shape)
    return finish(fig, template=template, title=title, default_title=default)


def jaccard_matrix(
    report: OverlapReport,
    kind: Kind = "all",
    stat: Stat = "jaccard",
    *,
    kinds: Sequence[Kind] | None = None,
    significance: bool = True,
    alpha: float = ALPHA,
    template: str = "plotly_white",
    title: str | None = None,
) -> go.Figure:
    """Annotated heatmap of one overlap statistic for every pair of circuits.

    With ``significance``, a cell whose pair's overlap of that kind is significant after
    the report's multiple-comparison correction (``OverlapReport.significant_pairs``) is
    marked ``*``, and every off-diagonal cell's hover text gives the p-value, raw and
    corrected.

    Arguments:
        report: the overlap report.
        kind: which nodes count: ``"all"``, ``"heads"`` or ``"mlps"``.
        stat: a statistic of ``OverlapReport.matrix``; ``"directional"`` reads row ->
            column (the share of the row's circuit that the column's reuses).
        kinds: several kinds drawn side by side on one colour scale, e.g.
            ``("heads", "mlps")``; replaces ``kind``.
        significance: mark the pairs that survive the correction at level ``alpha``.
        template: a plotly template name.
        title: the figure title; by default it names the statistic.

    Returns:
        A figure with one heatmap per kind; its ``z`` is ``report.matrix(stat, kind)``,
        rows top to bottom and columns left to right in report order.
    """
    check_choice("stat", stat, STATS)
    panels: list[Kind] = [kind] if kinds is None else list(kinds)
    if not panels:
        raise ValueError("kinds is empty; pass e.g. kinds=('heads', 'mlps'), or leave it None")
    for panel in panels:
        check_choice("kind", panel, KINDS)
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        subplot_titles=panels if len(panels) > 1 else None,
        horizontal_spacing=0.12 if len(panels) > 1 else 0.2,
    )
    for column, panel in enumerate(panels, start=1):
        matrix = report.matrix(stat, panel)
        values = matrix.to_numpy(dtype=float)
        rows, cols = list(matrix.index), list(matrix.columns)
        marked = set(report.significant_pairs(panel, alpha)) if significance else set()
        text = [
            [
                _cell_text(stat, v) + ("*" if _in(r, c, marked) else "")
                for c, v in zip(cols, row, strict=True)
            ]
            for r, row in zip(rows, values, strict=True)
        ]
        hover = [
            [
                f"row: {r}<br>column: {c}<br>{stat} ({panel}): {_cell_text(stat, v)}"
                + (_p_hover(report, r, c, panel) if significance and r != c else "")
                for c, v in zip(cols, row, strict=True)
            ]
            for r, row in zip(rows, values, strict=True)
        ]
        fig.add_trace(
            go.Heatmap(
                z=values,
                x=cols,
                y=rows,
                name=panel,
                text=text,
                texttemplate="%{text}",
                customdata=hover,
                hovertemplate="%{customdata}<extra></extra>",
                coloraxis="coloraxis",
                xgap=1,
                ygap=1,
            ),
            row=1,
            col=column,
        )
    fig.update_yaxes(autorange="reversed")  # the first circuit on top, as in a table
    fig.update_layout(coloraxis=_color_axis(stat))
    what = stat if kinds is None else f"{stat} by kind"
    default = f"{what} of every pair of circuits" + (f" ({kind})" if kinds is None else "")
    if significance:
        method = CORRECTION_NAMES.get(report.correction, report.correction)
        default += f"; * significant after {method} correction (α = {alpha:g})"
    return finish(fig, template=template, title=title, default_title=default)


def upset(
    report: OverlapReport,
    kind: Kind = "all",
    *,
    template: str = "plotly_white",
    title: str | None = None,
) -> go.Figure:
    """UpSet plot: how many nodes lie in exactly each combination of circuits.

    Venn diagrams stop being readable past three sets; an UpSet plot does not. The bars
    are the exclusive sets of ``OverlapReport.intersections`` (largest first) and the dot
    matrix beneath says which circuits each bar's nodes belong to.

    Returns:
        A figure of two rows: a bar trace (``y`` = set sizes, hover lists the nodes) and
        the dot matrix (trace ``"in"``: one point per (set, circuit) membership).
    """
    check_choice("kind", kind, KINDS)
    sets = report.intersections(kind)
    names = list(report.names)
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.62, 0.38], vertical_spacing=0.04
    )
    x = list(range(len(sets)))
    sizes = [len(nodes) for _, nodes in sets]
    hover = [
        f"{' & '.join(held)}<br>{len(nodes)} nodes: {', '.join(_forward(nodes, report))}"
        for held, nodes in sets
    ]
    fig.add_trace(
        go.Bar(
            x=x,
            y=sizes,
            name="nodes",
            text=sizes,
            textposition="outside",
            marker_color="#444444",
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            showlegend=False,
        ),
        row=1,
        col=1,
    )
    row_of = {name: len(names) - 1 - i for i, name in enumerate(names)}  # first circuit on top
    fig.add_trace(
        go.Scatter(
            x=[i for i in x for _ in names],
            y=[row_of[name] for _ in x for name in names],
            mode="markers",
            name="not in",
            marker={"color": NEITHER_COLOR, "size": 11},
            hoverinfo="skip",
            showlegend=False,
        ),
        row=2,
        col=1,
    )
    line_x: list[float | None] = []
    line_y: list[float | None] = []
    dot_x, dot_y, dot_name = [], [], []
    for i, (held, _) in enumerate(sets):
        ys = [row_of[name] for name in held]
        line_x += [i, i, None]
        line_y += [min(ys), max(ys), None]
        dot_x += [i] * len(held)
        dot_y += ys
        dot_name += list(held)
    fig.add_trace(
        go.Scatter(
            x=line_x,
            y=line_y,
            mode="lines",
            line={"color": "#444444", "width": 2},
            hoverinfo="skip",
            showlegend=False,
        ),
        row=2,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=dot_x,
            y=dot_y,
            mode="markers",
            name="in",
            marker={"color": "#444444", "size": 11},
            customdata=dot_name,
            hovertemplate="%{customdata}<extra></extra>",
            showlegend=False,
        ),
        row=2,
        col=1,
    )
    totals = {name: len(report.nodes(name, kind)) for name in names}
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, range=[-0.6, len(x)])
    fig.update_yaxes(title_text="nodes", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(
        tickvals=[row_of[n] for n in names],
        ticktext=[f"{n} ({totals[n]})" for n in names],
        range=[-0.6, len(names) - 0.4],
        showgrid=False,
        zeroline=False,
        row=2,
        col=1,
    )
    default = f"Nodes ({kind}) in exactly these circuits"
    return finish(fig, template=template, title=title, default_title=default)


def threshold_sweep(
    report: OverlapReport,
    pairs: Iterable[tuple[str, str]] | None = None,
    *,
    ks: Iterable[int] | None = None,
    chance: bool = True,
    template: str = "plotly_white",
    title: str | None = None,
) -> go.Figure:
    """Jaccard of the top-k nodes of two circuits against k, one line per pair.

    Overlap depends on where circuits are cut; a sweep shows whether a conclusion holds
    at every size. Each pair's chance level (two random k-sets) is drawn dashed.

    Arguments:
        report: the overlap report; its circuits need node scores.
        pairs: ``[(a, b), ...]``; by default every pair in report order.
        ks: the k values (``OverlapReport.sweep``'s default when None).
        chance: draw the chance level of each pair.
        template: a plotly template name.
        title: the figure title.

    Returns:
        A figure with a line trace per pair named ``"a vs b"`` (x = k, y = Jaccard) and,
        with ``chance``, a dashed trace per pair named ``"a vs b (chance)"``.
    """
    chosen = _pairs(report, pairs)
    k_values = None if ks is None else list(ks)
    fig = go.Figure()
    for index, (a, b) in enumerate(chosen):
        sweep = report.sweep(a, b, k_values)
        color = _PALETTE[index % len(_PALETTE)]
        label = f"{a} vs {b}"
        hover = [
            f"{label}<br>top {k}: {shared} shared, Jaccard {fmt(j)}"
            for k, shared, j in zip(sweep["k"], sweep["shared"], sweep["jaccard"], strict=True)
        ]
        fig.add_trace(
            go.Scatter(
                x=sweep["k"].tolist(),
                y=sweep["jaccard"].tolist(),
                mode="lines+markers",
                name=label,
                legendgroup=label,
                line={"color": color},
                text=hover,
                hovertemplate="%{text}<extra></extra>",
            )
        )
        if chance:
            fig.add_trace(
                go.Scatter(
                    x=sweep["k"].tolist(),
                    y=sweep["expected_jaccard"].tolist(),
                    mode="lines",
                    name=f"{label} (chance)",
                    legendgroup=label,
                    line={"color": color, "dash": "dash", "width": 1},
                    hovertemplate=f"{label} by chance<br>top %{{x}}: Jaccard %{{y:.3g}}"
                    "<extra></extra>",
                )
            )
    fig.update_xaxes(title_text="k (top nodes by |score| of each circuit)")
    fig.update_yaxes(title_text="Jaccard", range=[0, 1.05])
    default = "Overlap of the top-k nodes"
    return finish(fig, template=template, title=title, default_title=default)


# ------------------------------------------------------------------- internals


def _count_grid(
    report: OverlapReport,
    names: list[list[str | None]],
    members: list[list[tuple[str, ...] | None]],
    text: list[list[str]],
) -> go.Figure:
    """One heatmap: how many circuits use each node, light (none) to dark (all)."""
    total = len(report.names)
    z = [[np.nan if held is None else float(len(held)) for held in row] for row in members]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(grid_width(report.shape))),
            y=list(range(report.shape.n_layers)),
            name="circuits",
            zmin=0,
            zmax=total,
            colorscale=[[0.0, NEITHER_COLOR], [1.0 / (total + 1), "#deebf7"], [1.0, "#08306b"]],
            colorbar={
                "title": {"text": "circuits"},
                "tickvals": list(range(total + 1)),
                "ticktext": [str(k) for k in range(total + 1)],
            },
            hoverongaps=False,
            xgap=1,
            ygap=1,
            customdata=names,
            text=[
                [
                    f"{cell}<br>{_count_line(held, total)}"
                    for cell, held in zip(row, held_row, strict=True)
                ]
                for row, held_row in zip(text, members, strict=True)
            ],
            texttemplate="%{z}",
            hovertemplate="%{text}<extra></extra>",
        )
    )
    return fig


def _count_line(held: tuple[str, ...] | None, total: int) -> str:
    return "" if held is None else f"used by {len(held)} of {total} circuits"


def _in(row: str, col: str, pairs: set[tuple[str, str]]) -> bool:
    return (row, col) in pairs or (col, row) in pairs


def _p_hover(report: OverlapReport, a: str, b: str, kind: Kind) -> str:
    method = CORRECTION_NAMES.get(report.correction, report.correction)
    raw = _cell_text("p_value", report.p_value(a, b, kind))
    corrected = _cell_text("p_value", report.p_value(a, b, kind, corrected=True))
    return f"<br>p ({kind}) = {raw}, {method}-corrected {corrected}"


def _as_report(value: Mapping[str, Circuit] | OverlapReport) -> OverlapReport:
    if isinstance(value, OverlapReport):
        return value
    if isinstance(value, Mapping):
        return compare(value)
    raise ValueError(
        "expected {name: Circuit} or an OverlapReport (from reuse_lens.compare), got "
        f"{type(value).__name__}"
    )


def _members(report: OverlapReport, node: str | None) -> tuple[str, ...] | None:
    """The circuits (in report order) that hold ``node``; None for a cell with no node."""
    if node is None:
        return None
    return tuple(name for name in report.names if node in report.nodes(name))


def _category_label(combo: tuple[str, ...], names: Sequence[str]) -> str:
    """The legend name of a membership combination."""
    if not combo:
        return "neither" if len(names) == 2 else "none"
    if len(combo) == 1:
        return f"{combo[0]} only"
    if len(names) == 2:
        return "both"
    return "all" if len(combo) == len(names) else " & ".join(combo)


def _category_order(present: set[tuple[str, ...]], names: Sequence[str]) -> list[tuple[str, ...]]:
    """Single circuits first, then larger combinations, in report order; none last."""
    position = {name: i for i, name in enumerate(names)}
    return sorted(
        present,
        key=lambda combo: (not combo, len(combo), [position[n] for n in combo]),
    )


def _category_color(combo: tuple[str, ...], names: Sequence[str], index: int) -> str:
    if not combo:
        return NEITHER_COLOR
    if len(names) == 2:
        return _PAIR_COLORS[2] if len(combo) == 2 else _PAIR_COLORS[names.index(combo[0])]
    return _PALETTE[index % len(_PALETTE)]


def _grid_hover(
    node: str | None, held: tuple[str, ...] | None, scores: Mapping[str, Mapping[str, float]]
) -> str:
    if node is None or held is None:
        return "no MLP (attention-only model)"
    lines = [node, f"in: {', '.join(held) if held else 'no circuit'}"]
    lines += [f"{name}: {fmt(s[node])}" for name, s in scores.items() if node in s]
    return "<br>".join(lines)


def _forward(nodes: Iterable[str], report: OverlapReport) -> list[str]:
    return sorted(nodes, key=lambda node: grid_cell(node, report.shape))


def _cell_text(stat: str, value: float) -> str:
    if math.isnan(value):
        return "–"
    if stat == "shared":
        return str(round(value))
    if stat == "p_value":
        return f"{value:.2g}"
    return f"{value:.2f}"


def _color_axis(stat: str) -> dict[str, object]:
    if stat in _BOUNDED:
        return {"colorscale": "Blues", "cmin": 0.0, "cmax": 1.0}
    if stat == "p_value":  # small p = strong overlap: dark, like a high Jaccard
        return {"colorscale": "Blues", "reversescale": True, "cmin": 0.0, "cmax": 1.0}
    return {"colorscale": "Blues", "cmin": 0.0}


def _pairs(report: OverlapReport, pairs: Iterable[tuple[str, str]] | None) -> list[tuple[str, str]]:
    names = report.names
    if pairs is None:
        if len(names) < 2:
            raise ValueError(
                f"a sweep compares pairs of circuits; the report has only {len(names)}"
            )
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    chosen = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(
                f"each pair must be two circuit names, e.g. ('ioi', 'sva'); got {pair!r}"
            )
        for name in pair:
            if name not in names:
                known = ", ".join(map(repr, names))
                raise ValueError(f"unknown circuit {name!r} in pairs; this report has: {known}")
        chosen.append((pair[0], pair[1]))
    if not chosen:
        raise ValueError("pairs is empty; pass e.g. pairs=[('ioi', 'sva')] or leave it None")
    return chosen
