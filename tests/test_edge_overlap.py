"""Edge overlap: hand-built circuits with known answers, both nulls, and the zoo."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

import reuse_lens as rl
from reuse_lens.circuits.circuit import Circuit
from reuse_lens.compare.edges import EdgeOverlapReport, compare_edges
from reuse_lens.nodes import ModelShape
from tests.test_overlap import hypergeom_tail

SHAPE = ModelShape(n_layers=2, n_heads=2, has_mlps=True)
# Edges of SHAPE: layer 0 heads 2 x 3 inputs x 1 sender (input) = 6; m0 reads input and
# both layer-0 heads = 3; layer 1 heads 2 x 3 x 4 = 24; m1 reads 6; logits read 7.
N_EDGES = 6 + 3 + 24 + 6 + 7

# Both feed a0.h0's value from the input (same use). a1.h0: A reads it through q, B
# through k (other inputs). a1.h1: both through v, from a0.h0 in A and a0.h1 in B (other
# senders). Both read a1.h0 and a1.h1 at the logits.
A = [
    ("input", "a0.h0<v>"),
    ("a0.h0", "a1.h0<q>"),
    ("a0.h0", "a1.h1<v>"),
    ("a1.h0", "logits"),
    ("a1.h1", "logits"),
]
B = [
    ("input", "a0.h0<v>"),
    ("a0.h0", "a1.h0<k>"),
    ("input", "a0.h1<v>"),
    ("a0.h1", "a1.h1<v>"),
    ("a1.h0", "logits"),
    ("a1.h1", "logits"),
]


@pytest.fixture
def report() -> EdgeOverlapReport:
    return compare_edges({"A": Circuit.from_edges(A, SHAPE), "B": Circuit.from_edges(B, SHAPE)})


def test_universe_and_sets(report: EdgeOverlapReport) -> None:
    assert len(report.universe()) == N_EDGES == len(SHAPE.edges())
    assert report.shared("A", "B") == {
        ("input", "a0.h0<v>"),
        ("a1.h0", "logits"),
        ("a1.h1", "logits"),
    }
    assert report.unique("A", "B") == {("a0.h0", "a1.h0<q>"), ("a0.h0", "a1.h1<v>")}
    assert report.jaccard("A", "B") == pytest.approx(3 / 8)
    assert report.inputs("A", "a1.h0") == {"q": {"a0.h0"}, "k": set(), "v": set()}
    assert report.inputs("B", "a1.h1")["v"] == {"a0.h1"}
    assert report.inputs("A", "logits") == {"": {"a1.h0", "a1.h1"}}


def test_graph_null_is_the_hypergeometric_over_the_edge_graph(report: EdgeOverlapReport) -> None:
    exact = hypergeom_tail(N_EDGES, 5, 6, 3)
    assert report.p_value("A", "B") == pytest.approx(float(exact), rel=1e-12)
    expected = sum(
        Fraction(math.comb(5, x) * math.comb(N_EDGES - 5, 6 - x), math.comb(N_EDGES, 6))
        * Fraction(x, 11 - x)
        for x in range(0, 6)
    )
    assert report.expected_jaccard("A", "B") == pytest.approx(float(expected), rel=1e-12)
    perm = report.permutation_p_value("A", "B", n_permutations=10_000, seed=0)
    assert perm == pytest.approx(float(exact), abs=0.004)


def test_receivers_null_by_hand(report: EdgeOverlapReport) -> None:
    # Receivers both circuits feed: a0.h0<v> (1 possible sender: both pick it, X1 = 1),
    # a1.h1<v> (4 senders, one pick each: P(match) = 1/4) and logits (7 senders, two picks
    # each: Y ~ Hypergeometric(7, 2, 2)). Observed 3 shared: P(Y + Z >= 2) with
    # P(Y = 2) = 1/21, P(Y = 1) = 10/21: 1/21 + 10/21 x 1/4 = 1/6.
    assert report.p_value("A", "B", "receivers") == pytest.approx(1 / 6, rel=1e-12)
    pmf_y = {0: Fraction(10, 21), 1: Fraction(10, 21), 2: Fraction(1, 21)}
    pmf_z = {0: Fraction(3, 4), 1: Fraction(1, 4)}
    expected = sum(
        py * pz * Fraction(1 + y + z, 11 - (1 + y + z))
        for y, py in pmf_y.items()
        for z, pz in pmf_z.items()
    )
    assert report.expected_jaccard("A", "B", "receivers") == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="unknown null 'nodes'"):
        report.p_value("A", "B", "nodes")  # type: ignore[arg-type]


def test_differences_say_where_a_shared_head_is_read_differently(report: EdgeOverlapReport) -> None:
    rows = report.differences().to_dict(orient="records")
    got = {(r["node"], r["input"]): (r["senders_a"], r["senders_b"], r["verdict"]) for r in rows}
    assert got == {
        ("a1.h0", "q"): (["a0.h0"], [], "only a"),
        ("a1.h0", "k"): ([], ["a0.h0"], "only b"),
        ("a1.h1", "v"): (["a0.h0"], ["a0.h1"], "different senders"),
    }
    same = report.differences("A", "B", include_same=True)
    assert ("a0.h0", "v", "same senders") in set(
        zip(same["node"], same["input"], same["verdict"], strict=True)
    )
    assert report.head_usage("A", "B") == {
        "same": ["a0.h0"],
        "other_inputs": ["a1.h0"],
        "other_senders": ["a1.h1"],
    }
    assert report.differences(kind="mlps").empty  # neither feeds an MLP
    with pytest.raises(ValueError, match="give both a and b"):
        report.differences("A")


def test_table_matrix_and_json(report: EdgeOverlapReport) -> None:
    row = report.table().iloc[0].to_dict()
    assert (row["edges_a"], row["edges_b"], row["shared"]) == (5, 6, 3)
    assert row["p_adjusted"] == pytest.approx(row["p_value"])  # one pair: nothing to correct
    assert (row["heads_same"], row["heads_other_inputs"], row["heads_other_senders"]) == (1, 1, 1)
    matrix = report.matrix("jaccard")
    assert matrix.loc["A", "A"] == 1.0 and matrix.loc["B", "A"] == pytest.approx(3 / 8)
    assert math.isnan(report.matrix("p_adjusted").loc["A", "A"])
    document = json.loads(report.to_json())
    assert document["format"] == "reuse_lens.compare.edges"
    assert document["correction"]["method"] == "holm"
    assert document["universe_size"] == N_EDGES
    assert document["circuits"]["A"]["edges"][0] == "input->a0.h0<v>"
    assert document["circuits"]["A"]["edges"][-1] == "a1.h1->logits"
    assert len(document["differences"]) == 3


def test_correction_over_three_circuits() -> None:
    third = Circuit.from_edges([("input", "m0"), ("m0", "logits")], SHAPE)
    rep = compare_edges(
        {"A": Circuit.from_edges(A, SHAPE), "B": Circuit.from_edges(B, SHAPE), "C": third},
        correction="bonferroni",
    )
    raw = rep.p_value("A", "B")
    assert rep.p_value("B", "A", corrected=True) == pytest.approx(min(1.0, 3 * raw))
    assert rep.adjusted_p_values(method="none")[("A", "B")] == pytest.approx(raw)
    assert 3 * raw < 0.05 and rep.significant_pairs() == [("A", "B")]
    assert rep.significant_pairs(alpha=2 * raw) == []  # raw would pass, corrected not


def test_bad_input() -> None:
    nodes = Circuit.from_nodes(["a0.h0"], SHAPE)
    with pytest.raises(ValueError, match="node-level circuit"):
        compare_edges({"A": Circuit.from_edges(A, SHAPE), "n": nodes})
    with pytest.raises(ValueError, match="non-empty mapping"):
        compare_edges({})
    other = Circuit.from_edges([("input", "logits")], ModelShape(3, 2, True))
    with pytest.raises(ValueError, match="different shapes"):
        compare_edges({"A": Circuit.from_edges(A, SHAPE), "X": other})
    with pytest.raises(ValueError, match="unknown circuit"):
        compare_edges({"A": Circuit.from_edges(A, SHAPE)}).jaccard("A", "Z")


def test_a_restricted_universe_ignores_edges_outside_it() -> None:
    universe = [e for e in SHAPE.edges() if e.receiver.name != "logits"]
    rep = compare_edges(
        {"A": Circuit.from_edges(A, SHAPE), "B": Circuit.from_edges(B, SHAPE)}, universe=universe
    )
    assert len(rep.universe()) == N_EDGES - 7
    assert rep.shared("A", "B") == {("input", "a0.h0<v>")}


def test_zoo_edge_circuits_compare() -> None:
    """Two EAP-IG edge circuits of zoo:base on a few prompts: the report is consistent."""
    model = rl.load_model("zoo:base")
    circuits = {
        name: rl.discover_circuit(
            model, rl.tasks.load(name, model, n=8, seed=0), method="eap-ig", level="edge", top_k=60
        )
        for name in ("induction", "entity_tracking")
    }
    rep = rl.compare_edges(circuits)
    assert len(rep.universe()) == len(rl.nodes.edges_of(model))
    assert all(len(rep.edges(name)) == 60 for name in rep.names)
    shared = len(rep.shared("induction", "entity_tracking"))
    assert rep.jaccard("induction", "entity_tracking") == pytest.approx(shared / (120 - shared))
    assert 0.0 < rep.expected_jaccard("induction", "entity_tracking") < 0.2
    assert 0.0 <= rep.p_value("induction", "entity_tracking") <= 1.0
    frame = rep.differences(include_same=True)
    usage = rep.head_usage("induction", "entity_tracking")
    assert set(frame["node"]) == {h for names in usage.values() for h in names}
    json.loads(rep.to_json())


def test_edge_jaccard_matrix_figure(report: EdgeOverlapReport) -> None:
    fig = rl.plot.edge_jaccard_matrix(report)
    (heatmap,) = fig.data
    assert heatmap.text[0][1] == "0.38*"  # 3 of 8 edges; p ~ 0.005 survives (one pair)
    assert "shared edges: 3" in heatmap.customdata[0][1]
    assert (
        "1 read the same way, 1 through other inputs, 1 from other senders"
        in (heatmap.customdata[1][0])
    )
    assert "Holm correction" in fig.layout.title.text
