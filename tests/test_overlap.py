"""Overlap statistics: hand-computed cases, chance levels, and invariants under hypothesis."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reuse_lens.circuits.circuit import Circuit
from reuse_lens.compare import _stats as _overlap_stats
from reuse_lens.compare import overlap
from reuse_lens.compare._sets import OverlapWarning
from reuse_lens.compare.overlap import KINDS, Kind, OverlapReport, compare
from reuse_lens.nodes import Edge, ModelShape, edges_of

SHAPE = ModelShape(n_layers=3, n_heads=4, has_mlps=True)  # 12 heads + 3 MLPs

# A toy version of Merullo et al.'s IOI vs Colored Objects comparison.
IOI = ["a0.h1", "a1.h2", "a1.h3", "a2.h0", "m1"]
COLORED = ["a0.h1", "a1.h2", "a2.h1", "a2.h3", "m1", "m2"]
THIRD = ["a0.h1", "a2.h3", "a0.h0"]


def circuit(names: list[str], shape: ModelShape = SHAPE, **kw: object) -> Circuit:
    return Circuit.from_nodes(names, shape, **kw)


def hypergeom_tail(big_m: int, n: int, big_n: int, x: int) -> Fraction:
    """P(X >= x) for X ~ Hypergeometric(M, n, N), written out with binomials."""
    total = math.comb(big_m, big_n)
    hits = sum(
        math.comb(n, k) * math.comb(big_m - n, big_n - k) for k in range(x, min(n, big_n) + 1)
    )
    return Fraction(hits, total)


@pytest.fixture
def report() -> OverlapReport:
    return compare({"ioi": circuit(IOI), "colored": circuit(COLORED), "third": circuit(THIRD)})


# ------------------------------------------------------------------ hand-computed


def test_hand_computed_overlap(report: OverlapReport) -> None:
    assert report.names == ("ioi", "colored", "third")
    assert report.shape == SHAPE
    assert report.shared("ioi", "colored") == {"a0.h1", "a1.h2", "m1"}
    assert report.unique("ioi", "colored") == {"a1.h3", "a2.h0"}
    assert report.unique("colored", "ioi", "heads") == {"a2.h1", "a2.h3"}
    assert report.jaccard("ioi", "colored") == pytest.approx(3 / 8)
    assert report.jaccard("ioi", "colored", "heads") == pytest.approx(2 / 6)
    assert report.jaccard("ioi", "colored", "mlps") == pytest.approx(1 / 2)
    assert report.overlap_coefficient("ioi", "colored") == pytest.approx(3 / 5)
    assert report.directional("ioi", "colored") == pytest.approx(3 / 5)
    assert report.directional("colored", "ioi") == pytest.approx(3 / 6)
    assert report.directional("colored", "ioi", "mlps") == pytest.approx(1 / 2)


def test_universe_is_every_node_of_the_shape(report: OverlapReport) -> None:
    assert len(report.universe("all")) == 15
    assert len(report.universe("heads")) == 12
    assert report.universe("mlps") == {"m0", "m1", "m2"}


def test_p_value_is_the_hypergeometric_tail_at_least_x(report: OverlapReport) -> None:
    # heads: M = 12, |A| = 4, |B| = 4, x = 2: (C(4,2)C(8,2) + C(4,3)C(8,1) + C(4,4)) / C(12,4)
    assert hypergeom_tail(12, 4, 4, 2) == Fraction(168 + 32 + 1, 495)
    assert report.p_value("ioi", "colored", "heads") == pytest.approx(201 / 495, rel=1e-12)
    # all: M = 15, n = 5, N = 6, x = 3
    expected = float(hypergeom_tail(15, 5, 6, 3))
    assert report.p_value("ioi", "colored", "all") == pytest.approx(expected, rel=1e-12)
    # Hanna et al.'s code computes P(X > x) = P(X >= x + 1), which is smaller.
    assert float(hypergeom_tail(12, 4, 4, 3)) == pytest.approx(33 / 495)
    assert report.p_value("ioi", "colored", "heads") > 0.4


def test_p_value_with_nothing_shared_is_one() -> None:
    rep = compare({"a": circuit(["a0.h0"]), "b": circuit(["a0.h1"])})
    assert rep.p_value("a", "b", "heads") == 1.0


def test_expected_jaccard_by_hand() -> None:
    # M = 3 heads, |A| = |B| = 1: x = 1 with probability 1/3 (J = 1), else J = 0.
    shape = ModelShape(n_layers=1, n_heads=3, has_mlps=False)
    rep = compare({"a": circuit(["a0.h0"], shape), "b": circuit(["a0.h2"], shape)})
    assert rep.expected_jaccard("a", "b", "heads") == pytest.approx(1 / 3)


def test_per_layer(report: OverlapReport) -> None:
    frame = report.per_layer("ioi", "colored")
    assert list(frame.columns) == ["layer", "kind", "shared", "only_a", "only_b"]
    rows = {(r["layer"], r["kind"]): r for r in frame.to_dict("records")}
    assert len(rows) == 6  # 3 layers x (heads, mlps), zeros included
    assert (rows[0, "heads"]["shared"], rows[0, "heads"]["only_a"]) == (1, 0)
    assert (rows[1, "heads"]["shared"], rows[1, "heads"]["only_a"]) == (1, 1)
    assert (rows[2, "heads"]["only_a"], rows[2, "heads"]["only_b"]) == (1, 2)
    assert (rows[1, "mlps"]["shared"], rows[2, "mlps"]["only_b"]) == (1, 1)
    assert rows[0, "mlps"] == {"layer": 0, "kind": "mlps", "shared": 0, "only_a": 0, "only_b": 0}


def test_intersections_are_exclusive_upset_sets(report: OverlapReport) -> None:
    sets = report.intersections("all")
    assert sets == [
        (("ioi", "colored"), frozenset({"a1.h2", "m1"})),
        (("ioi",), frozenset({"a1.h3", "a2.h0"})),  # ties: shared by more circuits first,
        (("colored",), frozenset({"a2.h1", "m2"})),  # then report order
        (("ioi", "colored", "third"), frozenset({"a0.h1"})),
        (("colored", "third"), frozenset({"a2.h3"})),
        (("third",), frozenset({"a0.h0"})),
    ]
    flat = [node for _, nodes in sets for node in nodes]
    assert len(flat) == len(set(flat))  # every node in exactly one set


def test_matrix(report: OverlapReport) -> None:
    jac = report.matrix("jaccard")
    assert list(jac.index) == list(jac.columns) == ["ioi", "colored", "third"]
    assert jac.loc["ioi", "ioi"] == 1.0
    assert jac.loc["ioi", "colored"] == pytest.approx(3 / 8)
    direc = report.matrix("directional")
    assert direc.loc["ioi", "colored"] == pytest.approx(3 / 5)  # row -> column
    assert direc.loc["colored", "ioi"] == pytest.approx(3 / 6)
    pvals = report.matrix("p_value", "heads")
    assert pvals.loc["colored", "ioi"] == pytest.approx(201 / 495)
    assert report.matrix("shared").loc["ioi", "colored"] == 3
    assert math.isnan(report.matrix("edge_iou").loc["ioi", "colored"])
    with pytest.raises(ValueError, match="unknown statistic 'iou'.*jaccard"):
        report.matrix("iou")  # type: ignore[arg-type]


def test_table_has_one_row_per_pair(report: OverlapReport) -> None:
    frame = report.with_stability({"ioi": 0.8, "colored": 0.6}).table()
    assert [(r["a"], r["b"]) for r in frame.to_dict("records")] == [
        ("ioi", "colored"),
        ("ioi", "third"),
        ("colored", "third"),
    ]
    first = frame.to_dict("records")[0]
    assert first["jaccard_all"] == pytest.approx(3 / 8)
    assert first["jaccard_heads"] == pytest.approx(1 / 3)
    assert (first["size_a_all"], first["size_b_all"], first["shared_all"]) == (5, 6, 3)
    assert first["directional_ab_all"] == pytest.approx(3 / 5)
    assert first["directional_ba_all"] == pytest.approx(1 / 2)
    assert first["p_value_heads"] == pytest.approx(201 / 495)
    assert (first["stability_a"], first["stability_b"], first["stability"]) == (0.8, 0.6, 0.6)
    assert math.isnan(frame.to_dict("records")[1]["stability"])  # 'third' has no ceiling
    for kind in KINDS:
        for stat in ("jaccard", "overlap", "p_value", "expected_jaccard"):
            assert f"{stat}_{kind}" in frame.columns
    assert "permutation_p_value_heads" not in frame.columns
    with_perm = report.table(n_permutations=200)
    assert "permutation_p_value_heads" in with_perm.columns


# ------------------------------------------------------------------- empty sets


def test_empty_sets_give_nan_not_errors() -> None:
    # Both circuits are MLP-only, so their head sets are empty.
    rep = compare({"a": circuit(["m0"]), "b": circuit(["m1", "m2"])})
    for stat in (rep.jaccard, rep.overlap_coefficient, rep.directional, rep.expected_jaccard):
        assert math.isnan(stat("a", "b", "heads"))
    assert rep.p_value("a", "b", "heads") == 1.0  # P(X >= 0)
    assert rep.jaccard("a", "b", "mlps") == 0.0
    assert rep.intersections("heads") == []


def test_one_empty_side() -> None:
    rep = compare({"a": circuit(["m0"]), "b": circuit(["a0.h0", "m0"])})
    assert rep.jaccard("a", "b", "heads") == 0.0
    assert math.isnan(rep.overlap_coefficient("a", "b", "heads"))
    assert math.isnan(rep.directional("a", "b", "heads"))
    assert rep.directional("b", "a", "heads") == 0.0


def test_attention_only_model_has_no_mlp_statistics() -> None:
    shape = ModelShape(n_layers=2, n_heads=2, has_mlps=False)
    rep = compare({"a": circuit(["a0.h0"], shape), "b": circuit(["a0.h0", "a1.h1"], shape)})
    assert rep.universe("mlps") == frozenset()
    assert math.isnan(rep.p_value("a", "b", "mlps"))
    assert math.isnan(rep.permutation_p_value("a", "b", "mlps"))
    assert math.isnan(rep.expected_jaccard("a", "b", "mlps"))
    assert rep.jaccard("a", "b", "all") == pytest.approx(1 / 2)
    assert set(rep.per_layer("a", "b")["kind"]) == {"heads"}


# --------------------------------------------------------------------- universe


def test_restricted_universe() -> None:
    upper = [f"a{layer}.h{head}" for layer in (1, 2) for head in range(4)]
    rep = compare({"ioi": circuit(IOI), "colored": circuit(COLORED)}, universe=upper)
    assert rep.universe("heads") == set(upper)
    assert rep.universe("mlps") == frozenset()
    assert rep.nodes("ioi") == {"a1.h2", "a1.h3", "a2.h0"}  # a0.h1 and m1 fall outside
    assert rep.jaccard("ioi", "colored") == pytest.approx(1 / 5)
    # M = 8, n = 3, N = 3, x = 1
    assert rep.p_value("ioi", "colored", "heads") == pytest.approx(
        float(hypergeom_tail(8, 3, 3, 1)), rel=1e-12
    )
    assert json.loads(rep.to_json())["universe"] == upper  # written out when restricted


def test_bad_universe() -> None:
    with pytest.raises(ValueError, match="universe.*a9.h0 does not exist"):
        compare({"a": circuit(IOI)}, universe=["a9.h0"])
    with pytest.raises(ValueError, match=r"write universe=\['a0.h0'\]"):
        compare({"a": circuit(IOI)}, universe="a0.h0")


# -------------------------------------------------------------------- models


def test_mismatched_shapes_name_the_circuits() -> None:
    other = ModelShape(n_layers=2, n_heads=4, has_mlps=True)
    expected = r"different shapes.*'ioi'.*n_layers=3.*'small'.*n_layers=2"
    with pytest.raises(ValueError, match=expected):
        compare({"ioi": circuit(IOI), "small": circuit(["a0.h0"], other)})


def test_base_and_fine_tuned_model_compare() -> None:
    # Prakash et al. 2024: same architecture, different weights.
    base = circuit(IOI, metadata={"model": "zoo:base", "task": "ioi"})
    tuned = circuit(IOI[:4], metadata={"model": "zoo:base-ft", "task": "ioi"})
    rep = compare({"base": base, "tuned": tuned})
    assert rep.jaccard("base", "tuned") == pytest.approx(4 / 5)
    assert rep.directional("tuned", "base") == 1.0
    document = json.loads(rep.to_json())
    assert document["circuits"]["tuned"]["metadata"]["model"] == "zoo:base-ft"


def test_bad_queries_say_what_exists(report: OverlapReport) -> None:
    with pytest.raises(ValueError, match="unknown circuit 'IOI'.*'ioi', 'colored', 'third'"):
        report.jaccard("IOI", "colored")
    with pytest.raises(ValueError, match="unknown circuit 'x'"):
        report.edge_iou("ioi", "x")
    with pytest.raises(ValueError, match="unknown kind 'attn'.*heads"):
        report.jaccard("ioi", "colored", "attn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one circuit"):
        compare({})
    with pytest.raises(ValueError, match="mapping of names to circuits"):
        compare([circuit(IOI)])  # type: ignore[arg-type]


# ----------------------------------------------------------------------- edges


def test_edge_iou() -> None:
    a = Circuit.from_edges([("input", "a0.h0<q>"), ("a0.h0", "logits"), ("a0.h1", "logits")], SHAPE)
    b = Circuit.from_edges([("input", "a0.h0<k>"), ("a0.h0", "logits")], SHAPE)
    rep = compare({"a": a, "b": b, "nodes_only": circuit(["a0.h0"])})
    assert rep.edge_iou("a", "b") == pytest.approx(1 / 4)  # <q> and <k> are different edges
    assert rep.edge_iou("a", "nodes_only") is None
    restricted = compare({"a": a, "b": b}, universe=["a0.h0"])
    assert restricted.edge_iou("a", "b") == pytest.approx(1 / 3)  # a0.h1 -> logits drops out


# ---------------------------------------------------------------------- scores


def test_rank_correlation_by_hand() -> None:
    # Union {a0.h0, a0.h1, a0.h2, a0.h3}; a missing score counts as 0:
    # a = (3, 2, 1, 0), b = (3, 2, 0, 1). Spearman: sum d^2 = 2, rho = 1 - 6*2/(4*15) = 0.8.
    # Kendall: only the (a0.h2, a0.h3) pair of 6 is discordant: tau = (5 - 1) / 6.
    a = circuit(["a0.h0", "a0.h1", "a0.h2"], node_scores={"a0.h0": 3, "a0.h1": 2, "a0.h2": 1})
    b = circuit(["a0.h0", "a0.h1", "a0.h3"], node_scores={"a0.h0": 3, "a0.h1": 2, "a0.h3": 1})
    rep = compare({"a": a, "b": b, "plain": circuit(["a0.h0", "a0.h1"])})
    ranks = rep.rank_correlation("a", "b")
    assert ranks is not None
    assert ranks["spearman"] == pytest.approx(0.8)
    assert ranks["kendall"] == pytest.approx(2 / 3)
    assert ranks["n"] == 4
    assert rep.rank_correlation("a", "plain") is None


def test_rank_correlation_uses_the_sign() -> None:
    # A head whose effect flips sign (a negative mover in one task) is disagreement:
    # a = (3, -2, 1), b = (3, 2, 1): ranks (3, 1, 2) vs (3, 2, 1), rho = 1 - 6*2/(3*8) = 0.5.
    nodes = ["a0.h0", "a0.h1", "a0.h2"]
    a = circuit(nodes, node_scores={"a0.h0": 3, "a0.h1": -2, "a0.h2": 1})
    b = circuit(nodes, node_scores={"a0.h0": 3, "a0.h1": 2, "a0.h2": 1})
    ranks = compare({"a": a, "b": b}).rank_correlation("a", "b")
    assert ranks is not None
    assert ranks["spearman"] == pytest.approx(0.5)
    assert ranks["kendall"] == pytest.approx(1 / 3)


def test_rank_correlation_of_constant_scores_is_nan_without_warning() -> None:
    a = circuit(["a0.h0", "a0.h1"], node_scores={"a0.h0": 1.0, "a0.h1": 1.0})
    b = circuit(["a0.h0", "a0.h1"], node_scores={"a0.h0": 1.0, "a0.h1": 2.0})
    ranks = compare({"a": a, "b": b}).rank_correlation("a", "b")
    assert ranks is not None and math.isnan(ranks["spearman"]) and math.isnan(ranks["kendall"])


def test_sweep_by_hand() -> None:
    # |score| order: a: a0.h0, a0.h1 (tie with a0.h2, broken by forward order), a0.h2, m0
    #                b: a0.h2, a0.h0, m0, a0.h3
    a = circuit(["a0.h0"], node_scores={"a0.h0": -5, "a0.h1": 2, "a0.h2": -2, "m0": 1})
    b = circuit(["a0.h2"], node_scores={"a0.h2": 9, "a0.h0": 4, "m0": -3, "a0.h3": 0.5})
    rep = compare({"a": a, "b": b})
    frame = rep.sweep("a", "b")
    assert list(frame["k"]) == [1, 2, 3, 4]
    # k=1: {h0} vs {h2}; k=2: {h0,h1} vs {h2,h0}; k=3: {h0,h1,h2} vs {h2,h0,m0};
    # k=4: {h0,h1,h2,m0} vs {h2,h0,m0,h3}
    assert list(frame["shared"]) == [0, 1, 2, 3]
    assert list(frame["jaccard"]) == pytest.approx([0, 1 / 3, 2 / 4, 3 / 5])
    # two random 1-sets of 15 nodes coincide with probability 1/15
    assert frame["expected_jaccard"].iloc[0] == pytest.approx(1 / 15)
    assert list(rep.sweep("a", "b", ks=[2])["jaccard"]) == pytest.approx([1 / 3])
    with pytest.raises(ValueError, match=r"int in 1\.\.4"):
        rep.sweep("a", "b", ks=[5])


def test_sweep_grid_on_many_scored_nodes() -> None:
    shape = ModelShape(n_layers=4, n_heads=32, has_mlps=True)  # 132 nodes
    scores = {node.name: float(i) for i, node in enumerate(shape.nodes())}
    a = circuit(["a0.h0"], shape, node_scores=scores)
    b = circuit(["a0.h0"], shape, node_scores={k: -v for k, v in scores.items()})
    frame = compare({"a": a, "b": b}).sweep("a", "b")
    ks = list(frame["k"])
    assert ks[0] == 1 and ks[-1] == 132 and len(ks) <= 64
    assert all(x < y for x, y in itertools.pairwise(ks))
    assert list(frame["jaccard"])[-1] == 1.0  # every node at k = K


def test_sweep_needs_scores() -> None:
    rep = compare({"a": circuit(["a0.h0"], node_scores={"a0.h0": 1.0}), "b": circuit(["a0.h0"])})
    with pytest.raises(ValueError, match="'b' has no node_scores"):
        rep.sweep("a", "b")


# ----------------------------------------------------------- stability and JSON


def test_with_stability(report: OverlapReport) -> None:
    assert report.stability == {}
    first = report.with_stability({"ioi": 0.7})
    both = first.with_stability({"colored": 0.5})
    assert both.stability == {"ioi": 0.7, "colored": 0.5}
    assert first.stability == {"ioi": 0.7}  # a copy, not an edit
    with pytest.raises(ValueError, match="unknown circuit 'nope'"):
        report.with_stability({"nope": 0.5})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        report.with_stability({"ioi": 1.5})


def test_to_json_is_plain_json(report: OverlapReport, tmp_path: Path) -> None:
    rep = compare({"a": circuit(["m0"]), "b": circuit(["m1"])}).with_stability({"a": 0.9})

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    document = json.loads(rep.to_json(), parse_constant=refuse)
    assert document["format_version"] == overlap.REPORT_FORMAT_VERSION
    assert document["names"] == ["a", "b"]
    (pair,) = document["pairs"]
    assert pair["jaccard_heads"] is None  # nan -> null
    assert pair["jaccard_mlps"] == 0.0
    assert pair["edge_iou"] is None
    assert document["stability"] == {"a": 0.9}
    assert document["universe_size"] == {"all": 15, "heads": 12, "mlps": 3}
    assert document["circuits"]["a"]["nodes"] == ["m0"]
    path = tmp_path / "report.json"
    text = report.to_json(path)
    with open(path, encoding="utf-8") as handle:
        assert handle.read() == text
    assert json.loads(text)["intersections"]["all"][0] == {
        "circuits": ["ioi", "colored"],
        "nodes": ["a1.h2", "m1"],
    }


# ------------------------------------------------------------ permutation test


def test_permutation_p_value_agrees_with_the_hypergeometric_tail() -> None:
    shape = ModelShape(n_layers=4, n_heads=8, has_mlps=False)  # M = 32 heads
    a = circuit([f"a{layer}.h{head}" for layer in range(2) for head in range(4)], shape)
    b = circuit(["a0.h0", "a0.h1", "a1.h0", "a2.h0", "a2.h1", "a3.h0", "a3.h1", "a3.h2"], shape)
    rep = compare({"a": a, "b": b})
    exact = rep.p_value("a", "b", "heads")  # x = 3 of n = N = 8
    assert exact == pytest.approx(float(hypergeom_tail(32, 8, 8, 3)), rel=1e-12)
    n_perm = 20_000
    perm = rep.permutation_p_value("a", "b", "heads", n_permutations=n_perm, seed=1)
    standard_error = math.sqrt(exact * (1 - exact) / n_perm)
    assert abs(perm - exact) < 5 * standard_error
    first = rep.permutation_p_value("a", "b", "heads", n_permutations=500, seed=3)
    again = rep.permutation_p_value("a", "b", "heads", n_permutations=500, seed=3)
    assert first == again  # seeded


def test_permutation_p_value_counts_the_observed_draw() -> None:
    rep = compare({"a": circuit(["a0.h0"]), "b": circuit(["a0.h1"])})
    # x = 0: every permutation reaches it, p = (1 + n) / (1 + n) = 1.
    assert rep.permutation_p_value("a", "b", "heads", n_permutations=50) == 1.0
    # Identical 6-head circuits among 32 heads: P(X >= 6) = 1 / C(32, 6), so no permutation
    # of 99 reaches x, and the p-value is its floor 1 / (1 + 99), never 0.
    shape = ModelShape(n_layers=4, n_heads=8, has_mlps=False)
    six = [f"a{layer}.h{head}" for layer in range(2) for head in range(3)]
    same = compare({"a": circuit(six, shape), "b": circuit(six, shape)})
    assert same.permutation_p_value("a", "b", "heads", n_permutations=99) == 1 / 100
    # Otherwise (1 + count) / (1 + n): p * 100 - 1 is a whole count.
    p = rep.permutation_p_value("a", "b", "all", n_permutations=99, seed=5)
    assert p * 100 - 1 == pytest.approx(round(p * 100 - 1), abs=1e-9)
    with pytest.raises(ValueError, match="positive int"):
        rep.permutation_p_value("a", "b", n_permutations=0)


def test_permutation_chunks_do_not_change_the_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    rep = compare({"ioi": circuit(IOI), "colored": circuit(COLORED)})
    whole = rep.permutation_p_value("ioi", "colored", "all", n_permutations=1000, seed=7)
    monkeypatch.setattr(_overlap_stats, "_MAX_DRAWS_PER_CHUNK", 15 * 7)  # 7 draws per chunk
    chunked = rep.permutation_p_value("ioi", "colored", "all", n_permutations=1000, seed=7)
    assert chunked == whole


# ------------------------------------------------------------------- properties

SMALL = ModelShape(n_layers=2, n_heads=3, has_mlps=True)  # 6 heads + 2 MLPs
SMALL_NODES = [node.name for node in SMALL.nodes()]
SMALL_EDGES = edges_of(SMALL)
node_sets = st.sets(st.sampled_from(SMALL_NODES), min_size=1)
edge_sets = st.sets(st.sampled_from(SMALL_EDGES), min_size=1, max_size=12)
kinds = st.sampled_from(KINDS)


def both(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12)


@settings(deadline=None, max_examples=60)
@given(node_sets, node_sets, kinds)
def test_symmetric_statistics_in_unit_range(a: set[str], b: set[str], kind: Kind) -> None:
    rep = compare({"a": circuit(sorted(a), SMALL), "b": circuit(sorted(b), SMALL)})
    for stat in (rep.jaccard, rep.overlap_coefficient, rep.p_value, rep.expected_jaccard):
        forward, backward = stat("a", "b", kind), stat("b", "a", kind)
        assert both(forward, backward)
        assert math.isnan(forward) or 0.0 <= forward <= 1.0 + 1e-12
    size_a, size_b = len(rep.nodes("a", kind)), len(rep.nodes("b", kind))
    if size_a and size_b:
        ab = rep.directional("a", "b", kind)
        ba = rep.directional("b", "a", kind)
        assert ab * size_a == pytest.approx(ba * size_b)
        assert 0.0 <= ab <= 1.0
        assert rep.jaccard("a", "a", kind) == 1.0
        assert rep.jaccard("a", "b", kind) <= rep.overlap_coefficient("a", "b", kind)


INPUT_TO_LOGITS = {
    e for e in SMALL_EDGES if str(e.sender) == "input" and str(e.receiver) == "logits"
}


@settings(deadline=None, max_examples=40)
@given(edge_sets, edge_sets)
@example(set(SMALL_EDGES[:1]), INPUT_TO_LOGITS)  # a circuit with an edge and no node
def test_edge_iou_symmetric_in_unit_range(a: set[Edge], b: set[Edge]) -> None:
    circuit_a = Circuit.from_edges(sorted(a, key=str), SMALL)
    circuit_b = Circuit.from_edges(sorted(b, key=str), SMALL)
    # An edge set of input -> logits alone has no node: compared, with the warning that says so.
    empty = not circuit_a.nodes or not circuit_b.nodes
    with pytest.warns(OverlapWarning) if empty else contextlib.nullcontext():
        rep = compare({"a": circuit_a, "b": circuit_b})
    forward, backward = rep.edge_iou("a", "b"), rep.edge_iou("b", "a")
    assert forward is not None and forward == backward
    assert 0.0 <= forward <= 1.0
    assert rep.edge_iou("a", "a") == 1.0


@settings(deadline=None, max_examples=40)
@given(
    st.sets(st.sampled_from(SMALL_NODES[:3] + SMALL_NODES[4:7]), min_size=1),
    st.integers(0, 6),
)
def test_expected_jaccard_equals_enumeration(a: set[str], size_b: int) -> None:
    """Average the Jaccard index over every possible B of the given size."""
    heads = [n for n in SMALL_NODES if n.startswith("a")]
    b = heads[:size_b] or ["m0"]  # any B of that size; only its size matters
    rep = compare({"a": circuit(sorted(a), SMALL), "b": circuit(b, SMALL)})
    set_a = rep.nodes("a", "heads")
    draws = [set(draw) for draw in itertools.combinations(heads, size_b)]
    if not set_a and size_b == 0:
        assert math.isnan(rep.expected_jaccard("a", "b", "heads"))
        return
    brute = sum(Fraction(len(set_a & d), len(set_a | d)) for d in draws) / len(draws)
    assert rep.expected_jaccard("a", "b", "heads") == pytest.approx(float(brute), rel=1e-12)


def test_expected_jaccard_in_a_gpt2_medium_sized_universe() -> None:
    """Chance overlap in a GPT2-Medium-sized universe (384 heads) is small but not zero."""
    shape = ModelShape(n_layers=24, n_heads=16, has_mlps=True)
    a = circuit([f"a{i}.h0" for i in range(24)] + [f"a{i}.h1" for i in range(8)], shape)
    b = circuit([f"a{i}.h2" for i in range(24)] + [f"a{i}.h3" for i in range(8)], shape)
    rep = compare({"a": a, "b": b})
    # 32 of 384 heads each: E[x] = 32 * 32 / 384 = 2.67, so E[J] is about 2.67 / 61.3
    assert rep.expected_jaccard("a", "b", "heads") == pytest.approx(2.667 / 61.33, rel=0.05)
    rng = np.random.default_rng(0)
    in_a = np.zeros(384, dtype=bool)
    in_a[:32] = True
    hits = _overlap_stats.random_subset_hits(in_a, 32, 4000, rng)
    simulated = float(np.mean(hits / (64 - hits)))
    assert rep.expected_jaccard("a", "b", "heads") == pytest.approx(simulated, rel=0.05)
