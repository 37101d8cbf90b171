"""Multiple-comparison corrections of the overlap p-values: by hand, against scipy, in reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import false_discovery_control

from reuse_lens.circuits.circuit import Circuit
from reuse_lens.compare._stats import adjust_p_values
from reuse_lens.compare.overlap import OverlapReport, compare
from reuse_lens.nodes import ModelShape
from tests.test_overlap import COLORED, IOI, THIRD, circuit, hypergeom_tail

RAW = [0.01, 0.04, 0.03, 0.2]


def test_holm_by_hand() -> None:
    # Sorted: 0.01 x 4 = 0.04; 0.03 x 3 = 0.09; 0.04 x 2 = 0.08, raised to 0.09 by the
    # running maximum; 0.2 x 1 = 0.2. Returned in the input's order.
    assert adjust_p_values(RAW, "holm") == pytest.approx([0.04, 0.09, 0.09, 0.2])


def test_bh_by_hand_and_against_scipy() -> None:
    # Sorted ranks 1..4: 0.01 x 4/1 = 0.04; 0.03 x 4/2 = 0.06; 0.04 x 4/3 = 0.0533; 0.2.
    # Step-up minimum from the top: 0.0533 also caps the rank-2 value.
    by_hand = [0.04, 0.16 / 3, 0.16 / 3, 0.2]
    assert adjust_p_values(RAW, "bh") == pytest.approx(by_hand)
    assert adjust_p_values(RAW, "bh") == pytest.approx(false_discovery_control(RAW))


def test_bonferroni_and_none() -> None:
    assert adjust_p_values(RAW, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.8])
    assert adjust_p_values([0.5, 0.3], "bonferroni") == [1.0, 0.6]  # capped at 1
    assert adjust_p_values(RAW, "none") == RAW


def test_nan_is_no_test() -> None:
    out = adjust_p_values([0.01, math.nan, 0.04], "holm")
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert all(math.isnan(p) for p in adjust_p_values([math.nan, math.nan], "bh"))
    assert adjust_p_values([], "holm") == []


def test_unknown_correction() -> None:
    with pytest.raises(ValueError, match="unknown correction 'fdr'.*'holm', 'bh'"):
        adjust_p_values(RAW, "fdr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown correction"):
        compare({"a": circuit(IOI)}, correction="sidak")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30))
def test_adjusted_values_are_valid_and_ordered(raw: list[float]) -> None:
    for method in ("holm", "bh", "bonferroni"):
        adjusted = np.array(adjust_p_values(raw, method))
        assert np.all(adjusted >= np.array(raw) - 1e-12) and np.all(adjusted <= 1.0)
        order = np.argsort(raw, kind="stable")  # monotone in the raw p-values
        assert np.all(np.diff(adjusted[order]) >= -1e-12)
    # Holm is never more lenient than BH, nor stricter than Bonferroni.
    holm, bh = np.array(adjust_p_values(raw, "holm")), np.array(adjust_p_values(raw, "bh"))
    assert np.all(holm >= bh - 1e-12)
    assert np.all(holm <= np.array(adjust_p_values(raw, "bonferroni")) + 1e-12)


@pytest.fixture
def report() -> OverlapReport:
    return compare({"ioi": circuit(IOI), "colored": circuit(COLORED), "third": circuit(THIRD)})


def test_report_corrects_over_its_pairs(report: OverlapReport) -> None:
    assert report.correction == "holm"
    raw = {
        # heads: 12 of them; ioi 4 heads, colored 4, third 3.
        ("ioi", "colored"): float(hypergeom_tail(12, 4, 4, 2)),
        ("ioi", "third"): float(hypergeom_tail(12, 4, 3, 1)),
        ("colored", "third"): float(hypergeom_tail(12, 4, 3, 2)),
    }
    for (a, b), p in raw.items():
        assert report.p_value(a, b, "heads") == pytest.approx(p)
    ordered = sorted(raw, key=raw.__getitem__)
    holm, running = {}, 0.0
    for i, pair in enumerate(ordered):
        running = max(running, min(1.0, raw[pair] * (3 - i)))
        holm[pair] = running
    assert report.adjusted_p_values("heads") == pytest.approx(holm)
    assert report.p_value("colored", "ioi", "heads", corrected=True) == pytest.approx(
        holm[("ioi", "colored")]
    )  # either order
    bh = report.adjusted_p_values("heads", method="bh")
    assert list(bh.values()) == pytest.approx(false_discovery_control(list(raw.values())))
    assert math.isnan(report.p_value("ioi", "ioi", corrected=True))  # no test of reuse
    with pytest.raises(ValueError, match="unknown circuit"):
        report.p_value("ioi", "nope", corrected=True)


def test_table_matrix_and_json_carry_the_correction(report: OverlapReport) -> None:
    table = report.table()
    adjusted = report.adjusted_p_values("heads")
    assert table["p_adjusted_heads"].tolist() == pytest.approx(list(adjusted.values()))
    assert table.columns.get_loc("p_adjusted_all") == table.columns.get_loc("p_value_all") + 1
    matrix = report.matrix("p_adjusted", "heads")
    assert math.isnan(matrix.loc["ioi", "ioi"])
    assert matrix.loc["third", "ioi"] == pytest.approx(adjusted[("ioi", "third")])
    document = json.loads(report.to_json())
    assert document["correction"]["method"] == "holm"
    assert document["pairs"][0]["p_adjusted_heads"] == pytest.approx(adjusted[("ioi", "colored")])
    bh = compare(dict(report.circuits), correction="bh")
    assert json.loads(bh.to_json())["correction"]["method"] == "bh"
    assert bh.with_stability({"ioi": 0.5}).correction == "bh"  # kept by the copy


def test_significant_pairs() -> None:
    shape = ModelShape(n_layers=4, n_heads=8, has_mlps=False)  # 32 heads
    same = [f"a{layer}.h{head}" for layer in range(2) for head in range(4)]
    far = [f"a3.h{head}" for head in range(8)]
    circuits = {
        "a": Circuit.from_nodes(same, shape),
        "b": Circuit.from_nodes(same, shape),  # 8 of 8 shared: p = 1 / C(32, 8)
        "c": Circuit.from_nodes(far, shape),  # shares nothing with a or b
    }
    rep = compare(circuits)
    assert rep.significant_pairs() == [("a", "b")]
    assert rep.p_value("a", "b", corrected=True) == pytest.approx(3 / math.comb(32, 8))
    assert rep.significant_pairs(alpha=1e-12) == []
    with pytest.raises(ValueError, match="alpha must be a level in"):
        rep.significant_pairs(alpha=5)
    assert compare({"a": circuits["a"]}).significant_pairs() == []  # no pairs, no tests


def test_a_kind_the_model_lacks_is_no_test() -> None:
    shape = ModelShape(n_layers=2, n_heads=2, has_mlps=False)
    rep = compare(
        {"a": Circuit.from_nodes(["a0.h0"], shape), "b": Circuit.from_nodes(["a0.h0"], shape)}
    )
    assert math.isnan(rep.p_value("a", "b", "mlps", corrected=True))
    assert rep.significant_pairs("mlps") == []
