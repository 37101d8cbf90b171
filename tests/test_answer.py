"""The report's opening answer: generated from the numbers, plain when nothing survives."""

from __future__ import annotations

from reuse_lens.circuits.circuit import Circuit
from reuse_lens.compare.answer import answer, node_counts
from reuse_lens.compare.edges import compare_edges
from reuse_lens.compare.overlap import compare
from reuse_lens.nodes import ModelShape
from tests.test_edge_overlap import SHAPE as EDGE_SHAPE
from tests.test_edge_overlap import A, B

SHAPE = ModelShape(n_layers=4, n_heads=8, has_mlps=True)
SAME = [f"a{layer}.h{head}" for layer in range(2) for head in range(4)]
FAR = [f"a3.h{head}" for head in range(8)]


def test_names_the_pairs_that_survive() -> None:
    rep = compare(
        {
            "a": Circuit.from_nodes(SAME, SHAPE),
            "b": Circuit.from_nodes(SAME, SHAPE),
            "c": Circuit.from_nodes(FAR, SHAPE),
        }
    )
    heads, mlps, most = answer(rep)
    assert heads.startswith("Heads: of the 3 pairs, one pair shares more than chance after Holm")
    assert "a and b (shared a0.h0, a0.h1" in heads and "Jaccard 1.00" in heads
    assert mlps.startswith("MLPs: no pair could be tested") is False  # the model has MLPs
    assert "no pair of circuits shares more MLPs than chance" in mlps
    assert most.startswith("Used by more than half of the 3 circuits: a0.h0 (2 of 3)")


def test_says_plainly_when_none_survives() -> None:
    shape = ModelShape(n_layers=2, n_heads=2, has_mlps=False)
    rep = compare(
        {
            "x": Circuit.from_nodes(["a0.h0", "a1.h0"], shape),
            "y": Circuit.from_nodes(["a0.h0", "a1.h1"], shape),
        },
        correction="bh",
    )
    lines = answer(rep)
    assert lines[0].startswith(
        "Heads: no pair of circuits shares more heads than chance after Benjamini-Hochberg "
        "correction (α = 0.05), across the pair. The strongest is x and y (shared a0.h0;"
    )
    assert len(lines) == 2  # no MLP sentence for an attention-only model
    assert lines[1] == "Used by more than half of the 2 circuits: a0.h0 (2 of 2)."
    assert node_counts(rep) == {"a0.h0": ["x", "y"], "a1.h0": ["x"], "a1.h1": ["y"]}


def test_one_circuit_and_edges() -> None:
    only = compare({"x": Circuit.from_nodes(["a0.h0"], SHAPE)})
    assert answer(only) == ["Only one circuit (x): there is no pair to compare."]
    circuits = {"A": Circuit.from_edges(A, EDGE_SHAPE), "B": Circuit.from_edges(B, EDGE_SHAPE)}
    lines = answer(compare(circuits), compare_edges(circuits))
    assert lines[-2].startswith("Edges: the two edge circuits share more edges than random")
    assert lines[-1] == (
        "Of 3 (pair, head) cases where both circuits feed the same head, 1 read it through "
        "other q/k/v inputs and 1 through the same inputs from other senders, e.g. a1.h0 in "
        "A (q) and B (k)."
    )


def test_says_whether_a_pair_survives_without_layer_0() -> None:
    first = [f"a0.h{head}" for head in range(8)]
    far = Circuit.from_nodes([f"a3.h{head}" for head in range(8)], SHAPE)
    # x and y share all of layer 0 and nothing after it: the later layers carry no reuse.
    rep = compare(
        {
            "x": Circuit.from_nodes([*first, "a1.h0", "a2.h0"], SHAPE),
            "y": Circuit.from_nodes([*first, "a1.h1", "a2.h1"], SHAPE),
            "z": far,
        }
    )
    lines = answer(rep)
    assert lines[0].startswith("Heads: of the 3 pairs, one pair shares more than chance")
    assert lines[1].startswith(
        "Most heads those pairs share are in layer 0 (8 of 8). Over the heads of layers 1 to 3 "
        "only, none still does; the strongest is x and y (shared none;"
    )
    # Six shared heads after layer 0 survive on their own.
    later = [f"a1.h{head}" for head in range(6)]
    both = Circuit.from_nodes([*first, *later], SHAPE)
    lines = answer(compare({"x": both, "y": both}))
    assert lines[1].startswith(
        "Most heads those pairs share are in layer 0 (8 of 14). Over the heads of layers 1 to 3 "
        "only, it still does: x and y (shared a1.h0, a1.h1, a1.h2, a1.h3, a1.h4, a1.h5;"
    )
    # Two circuits of layer 0 alone: nothing to test after it, said so.
    only_first = Circuit.from_nodes(first, ModelShape(n_layers=4, n_heads=8, has_mlps=False))
    lines = answer(compare({"x": only_first, "y": only_first}))
    assert lines[1].endswith("only, none still does: x and y hold no head there.")
    # Shared heads mostly after layer 0: no sentence.
    only_later = Circuit.from_nodes(later, SHAPE)
    assert not any(
        line.startswith("Most heads")
        for line in answer(compare({"x": only_later, "y": only_later}))
    )


def test_compare_after_layer_0_keeps_every_node_but_layer_0_heads() -> None:
    from reuse_lens.compare.overlap import compare_after_layer_0

    only_first = Circuit.from_nodes(["a0.h0", "a0.h1"], SHAPE)
    rep = compare_after_layer_0({"x": only_first, "y": Circuit.from_nodes(["a0.h0", "m0"], SHAPE)})
    assert rep.universe("all") == {n.name for n in SHAPE.nodes()} - {f"a0.h{h}" for h in range(8)}
    assert rep.nodes("x") == frozenset() and rep.nodes("y") == {"m0"}  # no warning for x
