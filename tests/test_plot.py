"""Figures carry exactly the data they are given: hand-made inputs, checked cell by cell."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from reuse_lens import plot
from reuse_lens.circuits import Circuit
from reuse_lens.compare.overlap import OverlapReport, compare
from reuse_lens.nodes import ModelShape, edges_of
from reuse_lens.patching.edges import EdgeScores
from reuse_lens.patching.scores import NodeScores

SHAPE = ModelShape(n_layers=2, n_heads=3, has_mlps=True)  # 6 heads + 2 MLPs

# Hand-made circuits. Membership of every grid cell, by hand:
#   a0.h0: A      a0.h1: A B C   a0.h2: -     m0: -
#   a1.h0: C      a1.h1: -       a1.h2: B     m1: A
A_NODES = ["a0.h0", "a0.h1", "m1"]
B_NODES = ["a0.h1", "a1.h2"]
C_NODES = ["a0.h1", "a1.h0"]


@dataclass(frozen=True)
class Curve:
    """A stand-in for FaithfulnessCurve: the plot functions only read these fields."""

    fractions: tuple[float, ...]
    sizes: tuple[int, ...]
    faithfulness: tuple[float, ...]
    level: str = "node"
    cpr: float = 0.8
    cmd: float = 0.25
    method: str = "eap-ig"
    task: str = "ioi"


def node_scores(mlps: bool = True) -> NodeScores:
    return NodeScores(
        heads=torch.tensor([[0.5, -0.25, 0.0], [1.0, -0.42, 0.125]]),
        mlps=torch.tensor([0.3, -0.7]) if mlps else None,
        clean=2.0,
        corrupted=0.0,
        method="activation",
    )


def circuit_a() -> Circuit:
    return Circuit.from_nodes(
        A_NODES, SHAPE, node_scores={"a0.h0": 3.0, "a0.h1": -2.0, "m1": 1.0}, metadata={"task": "A"}
    )


def circuit_b() -> Circuit:
    return Circuit.from_nodes(
        B_NODES, SHAPE, node_scores={"a0.h1": 5.0, "a1.h2": 0.5, "a0.h0": -0.1}
    )


def circuit_c() -> Circuit:
    return Circuit.from_nodes(C_NODES, SHAPE)


@pytest.fixture
def report() -> OverlapReport:
    return compare({"A": circuit_a(), "B": circuit_b(), "C": circuit_c()})


def edge_circuit() -> Circuit:
    edges = [
        ("input", "a0.h0<v>"),
        ("a0.h0", "a1.h1<q>"),
        ("a0.h0", "a1.h1<k>"),
        ("a0.h0", "m0"),
        ("m0", "logits"),
        ("a1.h1", "logits"),
    ]
    return Circuit.from_edges(edges, SHAPE, edge_scores={("a0.h0", "a1.h1<q>"): 0.5})


def traces(fig: go.Figure) -> list[Any]:
    """The traces of ``fig``, typed loosely: plotly's attribute types are generated at runtime."""
    return list(fig.data)


def layout(fig: Any) -> Any:
    """The layout of a figure or template, typed loosely (see ``traces``)."""
    return fig.layout


def trace(fig: go.Figure, name: str) -> Any:
    """The single trace of ``fig`` called ``name`` that carries customdata."""
    found = [t for t in traces(fig) if t.name == name and t.customdata is not None]
    assert len(found) == 1, [t.name for t in traces(fig)]
    return found[0]


def cells(heatmap: Any) -> set[str]:
    """Names of the grid cells where ``heatmap``'s z is set."""
    z = np.asarray(heatmap.z, dtype=float)
    names = np.asarray(heatmap.customdata, dtype=object)
    return {str(names[r, c]) for r, c in zip(*np.nonzero(~np.isnan(z)), strict=True)}


# ----------------------------------------------------------------- patching_heatmap


def test_heatmap_z_is_the_scores_with_an_mlp_column() -> None:
    scores = node_scores()
    fig = plot.patching_heatmap(scores)
    (heatmap,) = traces(fig)
    z = np.asarray(heatmap.z, dtype=float)
    assert z.shape == (2, 4)
    np.testing.assert_array_equal(z[:, :3], scores.heads.numpy())
    np.testing.assert_array_equal(z[:, 3], scores.mlps.numpy())  # type: ignore[union-attr]
    assert heatmap.zmid == 0
    assert heatmap.colorscale == go.Heatmap(colorscale="RdBu").colorscale
    assert heatmap.text[1][1] == "a1.h1: -0.42"
    assert heatmap.text[0][3] == "m0: 0.3"
    assert list(layout(fig).xaxis.ticktext) == ["0", "1", "2", "MLP"]


def test_heatmap_normalized_divides_by_the_gap() -> None:
    fig = plot.patching_heatmap(node_scores(), normalized=True)  # gap = 2 - 0
    z = np.asarray(traces(fig)[0].z, dtype=float)
    np.testing.assert_allclose(z, [[0.25, -0.125, 0.0, 0.15], [0.5, -0.21, 0.0625, -0.35]])
    assert traces(fig)[0].text[1][3] == "m1: -0.35"


def test_heatmap_of_attention_only_model_has_a_blank_mlp_column() -> None:
    fig = plot.patching_heatmap(node_scores(mlps=False))
    z = np.asarray(traces(fig)[0].z, dtype=float)
    assert np.isnan(z[:, 3]).all()
    np.testing.assert_array_equal(z[:, :3], node_scores().heads.numpy())
    assert "no MLP" in traces(fig)[0].text[0][3]


def test_heatmap_of_edge_scores_sums_each_sender() -> None:
    shape = ModelShape(n_layers=1, n_heads=2, has_mlps=True)
    edges = tuple(edges_of(shape))
    scores = EdgeScores(edges, torch.ones(len(edges)), shape, 1.0, 0.0, "eap")
    z = np.asarray(traces(plot.patching_heatmap(scores))[0].z, dtype=float)
    # each head feeds m0 and logits (2 edges); m0 feeds logits only
    np.testing.assert_array_equal(z, [[2.0, 2.0, 1.0]])


# ----------------------------------------------------------------- circuit_diagram


def test_circuit_diagram_draws_members_by_kind_and_the_rest_faintly() -> None:
    fig = plot.circuit_diagram(circuit_a())
    assert list(trace(fig, "head").customdata) == ["a0.h0", "a0.h1"]
    assert list(trace(fig, "MLP").customdata) == ["m1"]
    background = trace(fig, "not in the circuit")
    assert set(background.customdata) == {"a0.h2", "a1.h0", "a1.h1", "a1.h2", "m0"}
    head = trace(fig, "head")
    assert (list(head.x), list(head.y)) == ([0, 1], [0, 0])
    assert list(trace(fig, "MLP").x) == [3]  # the MLP column is right of the 3 heads
    assert head.text[0] == "a0.h0<br>score: 3"
    assert layout(fig).title.text.endswith("(A)")


def test_a_node_circuit_is_drawn_on_its_layers_without_input_and_logits() -> None:
    """A node circuit has no edges: input and logits would stand alone, joined to nothing."""
    fig = plot.circuit_diagram(circuit_a())
    assert [t.name for t in traces(fig) if t.name == "ends"] == []
    axis = layout(fig).yaxis
    assert list(axis.ticktext) == ["0", "1"] and list(axis.range) == [-0.7, 1.7]
    edges = plot.circuit_diagram(edge_circuit())
    assert list(layout(edges).yaxis.ticktext) == ["input", "0", "1", "logits"]


def test_patching_heatmap_says_what_red_and_blue_mean() -> None:
    scores = NodeScores(torch.zeros(2, 3), torch.zeros(2), clean=1.0, corrupted=0.0, method="m")
    title = traces(plot.patching_heatmap(scores))[0].colorbar.title.text
    assert "red: metric falls" in title and "blue: rises" in title


def test_circuit_diagram_edges_by_receiver_input() -> None:
    fig = plot.circuit_diagram(edge_circuit())
    assert list(trace(fig, "into q").customdata) == ["a0.h0->a1.h1<q>"]
    assert list(trace(fig, "into k").customdata) == ["a0.h0->a1.h1<k>"]
    assert list(trace(fig, "into v").customdata) == ["input->a0.h0<v>"]
    other = trace(fig, "into MLPs / logits")
    assert set(other.customdata) == {"a0.h0->m0", "m0->logits", "a1.h1->logits"}
    assert trace(fig, "into q").text[0] == "a0.h0->a1.h1<q>: 0.5"
    q_line = next(t for t in traces(fig) if t.name == "into q" and t.mode == "lines")
    k_line = next(t for t in traces(fig) if t.name == "into k" and t.mode == "lines")
    assert q_line.line.color != k_line.line.color
    # a0.h0 at (0, 0) to a1.h1 at (1, 1), the q end shifted left of the k end
    assert (q_line.x[0], q_line.y[0], q_line.y[1]) == (0, 0, 1)
    assert q_line.x[1] < k_line.x[1]


def test_circuit_diagram_by_stage_by_class_and_by_score() -> None:
    staged = Circuit.from_nodes(["a1.h1", "a0.h0"], SHAPE, stages={"a1.h1": 0, "a0.h0": 1})
    fig = plot.circuit_diagram(staged)  # auto: stages exist
    assert list(trace(fig, "stage 0").customdata) == ["a1.h1"]
    assert list(trace(fig, "stage 1").customdata) == ["a0.h0"]
    assert "stage: 1" in trace(fig, "stage 1").text[0]

    classes = {"a0.h1": "name mover"}
    fig = plot.circuit_diagram(circuit_a(), classes=classes)  # auto: classes are given
    assert list(trace(fig, "name mover").customdata) == ["a0.h1"]
    assert list(trace(fig, "head").customdata) == ["a0.h0"]

    scored = Circuit.from_nodes(["a0.h0", "a1.h1"], SHAPE, node_scores={"a0.h0": -0.5})
    fig = plot.circuit_diagram(scored, color_by="score")
    nodes = trace(fig, "circuit nodes")
    assert list(nodes.customdata) == ["a0.h0", "a1.h1"]
    assert nodes.marker.color[0] == -0.5 and math.isnan(nodes.marker.color[1])
    assert nodes.marker.cmid == 0


def test_circuit_diagram_of_an_attention_only_model() -> None:
    shape = ModelShape(n_layers=2, n_heads=3, has_mlps=False)
    circuit = Circuit.from_edges([("input", "a0.h0<q>"), ("a0.h0", "logits")], shape)
    fig = plot.circuit_diagram(circuit)
    ends = trace(fig, "ends")
    assert list(ends.customdata) == ["input", "logits"]
    assert list(ends.x) == [1.0, 1.0] and list(ends.y) == [-1.0, 2.0]  # centred, below/above
    assert list(layout(fig).xaxis.ticktext) == ["0", "1", "2"]  # no MLP column


def test_circuit_diagram_bad_color_by() -> None:
    with pytest.raises(ValueError, match="unknown color_by 'kind'.*'stage'"):
        plot.circuit_diagram(circuit_a(), color_by="kind")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="circuit.stages is empty"):
        plot.circuit_diagram(circuit_a(), color_by="stage")
    with pytest.raises(ValueError, match="classes= labels nodes for color_by='class'"):
        plot.circuit_diagram(circuit_a(), color_by="score", classes={"a0.h0": "x"})
    with pytest.raises(ValueError, match="node_scores is empty"):
        plot.circuit_diagram(circuit_c(), color_by="score")


# -------------------------------------------------------------------- overlap_grid


def test_overlap_grid_of_two_circuits_by_hand() -> None:
    fig = plot.overlap_grid({"A": circuit_a(), "B": circuit_b()})
    got = {t.name: cells(t) for t in traces(fig)}
    assert got == {
        "A only": {"a0.h0", "m1"},
        "B only": {"a1.h2"},
        "both": {"a0.h1"},
        "neither": {"a0.h2", "a1.h0", "a1.h1", "m0"},
    }
    hover = traces(fig)[0].text
    assert traces(fig)[0].customdata[1][3] == "m1"  # the MLP column follows the 3 heads
    assert hover[0][1] == "a0.h1<br>in: A, B<br>A: -2<br>B: 5"
    assert hover[1][0] == "a1.h0<br>in: no circuit"
    colors = {t.name: t.colorscale[0][1] for t in traces(fig)}
    assert len(set(colors.values())) == 4


def test_overlap_grid_of_three_circuits_counts_the_circuits_using_each_node(
    report: OverlapReport,
) -> None:
    fig = plot.overlap_grid(report)
    (heatmap,) = traces(fig)  # one trace on one colour scale, not a colour per combination
    assert heatmap.name == "circuits"
    z = np.asarray(heatmap.z, dtype=float)
    # A {a0.h0, a0.h1, m1}, B {a0.h1, a1.h2}, C {a0.h1, a1.h0}; columns: 3 heads, MLP
    np.testing.assert_array_equal(z, [[1, 3, 0, 0], [1, 0, 1, 1]])
    assert (heatmap.zmin, heatmap.zmax) == (0, 3)
    assert list(heatmap.colorbar.tickvals) == [0, 1, 2, 3]
    assert heatmap.text[0][1].startswith("a0.h1<br>in: A, B, C<br>")
    assert heatmap.text[0][1].endswith("used by 3 of 3 circuits")


def test_overlap_grid_of_seven_circuits_stays_one_scale() -> None:
    shape = ModelShape(n_layers=2, n_heads=2, has_mlps=False)
    heads = ["a0.h0", "a0.h1", "a1.h0", "a1.h1"]
    circuits = {f"t{i}": Circuit.from_nodes(heads[: 1 + i % 4], shape) for i in range(7)}
    fig = plot.overlap_grid(circuits)
    (heatmap,) = traces(fig)
    z = np.asarray(heatmap.z, dtype=float)
    assert z[0, 0] == 7 and math.isnan(z[0, 2])  # every circuit has a0.h0; no MLP column
    assert heatmap.text[0][2].startswith("no MLP")


def test_overlap_grid_bad_input() -> None:
    with pytest.raises(ValueError, match="at least two circuits"):
        plot.overlap_grid({"A": circuit_a()})
    other = Circuit.from_nodes(["a0.h0"], ModelShape(3, 3, True))
    with pytest.raises(ValueError, match="different shapes"):
        plot.overlap_grid({"A": circuit_a(), "X": other})
    with pytest.raises(ValueError, match="OverlapReport"):
        plot.overlap_grid([circuit_a(), circuit_b()])  # type: ignore[arg-type]


# ------------------------------------------------------------------ jaccard_matrix


def test_jaccard_matrix_is_the_report_matrix(report: OverlapReport) -> None:
    fig = plot.jaccard_matrix(report)
    (heatmap,) = traces(fig)
    # |A∩B| = 1 of 4, |A∩C| = 1 of 4, |B∩C| = 1 of 3
    third = 1 / 3
    expected = [[1.0, 0.25, 0.25], [0.25, 1.0, third], [0.25, third, 1.0]]
    np.testing.assert_allclose(np.asarray(heatmap.z, dtype=float), expected)
    assert list(heatmap.x) == ["A", "B", "C"] and list(heatmap.y) == ["A", "B", "C"]
    assert heatmap.text[1][2] == "0.33"  # no pair is significant among 8 nodes
    assert heatmap.customdata[0][1].startswith("row: A<br>column: B<br>jaccard (all): 0.25<br>")
    assert "p (all) = " in heatmap.customdata[0][1]
    assert "Holm-corrected" in heatmap.customdata[0][1]
    plain = traces(plot.jaccard_matrix(report, significance=False))[0]
    assert plain.customdata[0][1] == "row: A<br>column: B<br>jaccard (all): 0.25"
    assert layout(fig).yaxis.autorange == "reversed"


def test_jaccard_matrix_marks_the_pairs_that_survive_correction() -> None:
    shape = ModelShape(n_layers=4, n_heads=8, has_mlps=False)
    same = [f"a{layer}.h{head}" for layer in range(2) for head in range(4)]
    far = [f"a3.h{head}" for head in range(8)]
    rep = compare(
        {
            "a": Circuit.from_nodes(same, shape),
            "b": Circuit.from_nodes(same, shape),
            "c": Circuit.from_nodes(far, shape),
        }
    )
    fig = plot.jaccard_matrix(rep, kind="heads")
    text = traces(fig)[0].text
    assert (text[0][1], text[1][0], text[0][2], text[0][0]) == ("1.00*", "1.00*", "0.00", "1.00")
    assert "* significant after Holm correction" in layout(fig).title.text


def test_jaccard_matrix_kinds_side_by_side(report: OverlapReport) -> None:
    fig = plot.jaccard_matrix(report, kinds=("heads", "mlps"))
    heads, mlps = traces(fig)
    assert (heads.xaxis, mlps.xaxis) == ("x", "x2")
    # heads: A {a0.h0, a0.h1} vs B {a0.h1, a1.h2}: 1 of 3; MLPs: B and C have none
    assert float(np.asarray(heads.z)[0, 1]) == pytest.approx(1 / 3)
    mlp_z = np.asarray(mlps.z, dtype=float)
    assert mlp_z[0, 1] == 0.0 and math.isnan(mlp_z[1, 2])
    assert mlps.text[1][2] == "–"
    assert heads.coloraxis == mlps.coloraxis  # one colour scale for both panels


def test_jaccard_matrix_other_stats_and_bad_input(report: OverlapReport) -> None:
    shared = plot.jaccard_matrix(report, stat="shared")
    assert traces(shared)[0].text[0][0] == "3"  # A shares all its 3 nodes with itself
    with pytest.raises(ValueError, match="unknown stat 'iou'"):
        plot.jaccard_matrix(report, stat="iou")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown kind 'attn'"):
        plot.jaccard_matrix(report, kinds=("heads", "attn"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kinds is empty"):
        plot.jaccard_matrix(report, kinds=())


# -------------------------------------------------------------------------- upset


def test_upset_bars_are_the_exclusive_intersection_sizes(report: OverlapReport) -> None:
    fig = plot.upset(report)
    bars = traces(fig)[0]
    # A only {a0.h0, m1}; then the singletons sorted by more circuits first: all {a0.h1},
    # B only {a1.h2}, C only {a1.h0}
    assert list(bars.y) == [2, 1, 1, 1]
    assert bars.customdata[0] == "A<br>2 nodes: a0.h0, m1"
    assert bars.customdata[1] == "A & B & C<br>1 nodes: a0.h1"
    dots = next(t for t in traces(fig) if t.name == "in")
    # rows: A on top (2), B (1), C (0)
    assert list(zip(dots.x, dots.y, strict=True)) == [
        (0, 2),
        (1, 2),
        (1, 1),
        (1, 0),
        (2, 1),
        (3, 0),
    ]
    assert list(layout(fig).yaxis2.ticktext) == ["A (3)", "B (2)", "C (2)"]


def test_upset_of_heads_only(report: OverlapReport) -> None:
    fig = plot.upset(report, kind="heads")
    assert list(traces(fig)[0].y) == [1, 1, 1, 1]  # a0.h0 | a0.h1 | a1.h2 | a1.h0
    with pytest.raises(ValueError, match="unknown kind"):
        plot.upset(report, kind="edges")  # type: ignore[arg-type]


# ------------------------------------------------------------------ threshold_sweep


def test_threshold_sweep_by_hand(report: OverlapReport) -> None:
    fig = plot.threshold_sweep(report, pairs=[("A", "B")])
    line = next(t for t in traces(fig) if t.name == "A vs B")
    # ranked by |score|: A = a0.h0, a0.h1, m1; B = a0.h1, a1.h2, a0.h0
    assert list(line.x) == [1, 2, 3]
    np.testing.assert_allclose(line.y, [0.0, 1 / 3, 0.5])
    assert line.text[2] == "A vs B<br>top 3: 2 shared, Jaccard 0.5"
    chance = next(t for t in traces(fig) if t.name == "A vs B (chance)")
    # chance at k=1: two random nodes of 8 coincide (Jaccard 1) with probability 1/8
    assert chance.line.dash == "dash" and chance.y[0] == pytest.approx(1 / 8)


def test_threshold_sweep_bad_pairs(report: OverlapReport) -> None:
    with pytest.raises(ValueError, match="unknown circuit 'D'"):
        plot.threshold_sweep(report, pairs=[("A", "D")])
    with pytest.raises(ValueError, match="two circuit names"):
        plot.threshold_sweep(report, pairs=["AB"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no node_scores"):
        plot.threshold_sweep(report)  # C has no scores
    with pytest.raises(ValueError, match="only 1"):
        plot.threshold_sweep(compare({"A": circuit_a()}))


# --------------------------------------------------------------------- faithfulness


def test_faithfulness_curves_draw_each_curve_on_a_log_axis() -> None:
    eap = Curve((0.01, 0.1, 1.0), (1, 3, 30), (0.2, 0.7, 1.0))
    act = Curve((0.01, 1.0), (1, 30), (-0.1, 1.0), cpr=0.5, cmd=0.6, method="activation")
    fig = plot.faithfulness_curves({"eap-ig": eap, "activation": act})
    first, second = traces(fig)
    assert list(first.x) == [0.01, 0.1, 1.0] and list(first.y) == [0.2, 0.7, 1.0]
    assert list(second.y) == [-0.1, 1.0]
    assert first.name == "eap-ig (CPR 0.8, CMD 0.25)"
    assert first.text[1] == "eap-ig<br>10% of nodes (3 kept)<br>faithfulness 0.7"
    assert layout(fig).xaxis.type == "log"
    assert list(layout(fig).xaxis.tickvals) == list(plot.MIB_FRACTIONS)
    assert layout(fig).xaxis.ticktext[0] == "0.1%"
    assert sorted(shape.y0 for shape in layout(fig).shapes) == [0.0, 1.0]


def test_a_single_curve_is_named_by_its_method() -> None:
    fig = plot.faithfulness_curves(Curve((0.5, 1.0), (2, 4), (0.9, 1.0), level="edge"))
    assert traces(fig)[0].name.startswith("eap-ig (CPR")
    assert layout(fig).xaxis.title.text == "fraction of edges kept"


def test_faithfulness_curves_bad_input() -> None:
    with pytest.raises(ValueError, match="no curves"):
        plot.faithfulness_curves({})
    with pytest.raises(ValueError, match="3 fractions, 2 sizes"):
        plot.faithfulness_curves({"x": Curve((0.1, 0.5, 1.0), (1, 2), (0.1, 0.5, 1.0))})
    with pytest.raises(ValueError, match="must be positive"):
        plot.faithfulness_curves({"x": Curve((0.0, 1.0), (0, 4), (0.0, 1.0))})
    with pytest.raises(ValueError, match="lacks fractions"):
        plot.faithfulness_curves({"x": object()})  # type: ignore[dict-item]


def test_faithfulness_matrix_is_the_frame() -> None:
    df = pd.DataFrame(
        [[0.9, 0.4, float("nan")], [0.2, 1.1, 0.5]],
        index=pd.Index(["ioi", "sva"], name="circuit"),
        columns=pd.Index(["ioi", "sva", "induction"], name="task"),
    )
    fig = plot.faithfulness_matrix(df, title="cross-task")
    (heatmap,) = traces(fig)
    np.testing.assert_array_equal(np.asarray(heatmap.z, dtype=float), df.to_numpy())
    assert list(heatmap.y) == ["ioi", "sva"] and list(heatmap.x) == ["ioi", "sva", "induction"]
    assert heatmap.text[1][1] == "1.10" and heatmap.text[0][2] == "–"
    assert heatmap.customdata[0][1] == "circuit: ioi<br>task: sva<br>faithfulness: 0.4"
    assert (heatmap.zmin, heatmap.zmax) == (0.0, 1.1)
    assert layout(fig).title.text == "cross-task"


def test_faithfulness_matrix_names_its_values() -> None:
    df = pd.DataFrame(
        [[0.25, 0.5]],
        index=pd.Index(["ioi"], name="ablated circuit"),
        columns=pd.Index(["ioi", "sva"], name="damaged task"),
    )
    (default,) = traces(plot.faithfulness_matrix(df))
    assert default.colorbar.title.text == "faithfulness"
    fig = plot.faithfulness_matrix(df, value_name="damage")
    (heatmap,) = traces(fig)
    assert heatmap.colorbar.title.text == "damage"
    assert heatmap.customdata[0][1] == "ablated circuit: ioi<br>damaged task: sva<br>damage: 0.5"
    assert layout(fig).title.text == "Damage of each ablated circuit on each damaged task"


def test_faithfulness_matrix_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        plot.faithfulness_matrix(pd.DataFrame())
    with pytest.raises(ValueError, match="needs numbers"):
        plot.faithfulness_matrix(pd.DataFrame({"ioi": ["high"]}, index=["c"]))


# ------------------------------------------------------- every figure: template, html


def _figures() -> dict[str, Callable[..., go.Figure]]:
    def report() -> OverlapReport:
        return compare({"A": circuit_a(), "B": circuit_b()})

    curve = Curve((0.01, 1.0), (1, 30), (0.5, 1.0))
    frame = pd.DataFrame([[0.5]], index=["A"], columns=["ioi"])
    return {
        "patching_heatmap": lambda **kw: plot.patching_heatmap(node_scores(), **kw),
        "circuit_diagram": lambda **kw: plot.circuit_diagram(edge_circuit(), **kw),
        "overlap_grid": lambda **kw: plot.overlap_grid(report(), **kw),
        "jaccard_matrix": lambda **kw: plot.jaccard_matrix(report(), **kw),
        "upset": lambda **kw: plot.upset(report(), **kw),
        "threshold_sweep": lambda **kw: plot.threshold_sweep(report(), **kw),
        "faithfulness_curves": lambda **kw: plot.faithfulness_curves(curve, **kw),
        "faithfulness_matrix": lambda **kw: plot.faithfulness_matrix(frame, **kw),
    }


@pytest.mark.parametrize("name", list(_figures()))
def test_every_figure_takes_a_template_and_a_title_and_serialises(name: str) -> None:
    make = _figures()[name]
    white = make()
    dark = make(template="plotly_dark", title="my title")
    assert isinstance(dark, go.Figure)
    assert layout(white).template.layout.paper_bgcolor == "white"
    dark_bg = layout(pio.templates["plotly_dark"]).paper_bgcolor
    assert layout(dark).template.layout.paper_bgcolor == dark_bg != "white"
    assert layout(dark).title.text == "my title"
    assert layout(white).title.text  # a default title says what is drawn
    html = dark.to_html(include_plotlyjs=False, full_html=False)
    assert "my title" in html


def test_plot_functions_are_exported() -> None:
    assert set(plot.__all__) >= {
        "patching_heatmap",
        "circuit_diagram",
        "overlap_grid",
        "jaccard_matrix",
        "upset",
        "threshold_sweep",
        "faithfulness_curves",
        "faithfulness_matrix",
    }
