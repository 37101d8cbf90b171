"""Node and edge names: MIB's spelling, both ways, and enumeration in forward order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reuse_lens.nodes import (
    INPUT,
    LOGITS,
    MLP,
    AttentionHead,
    Edge,
    ModelShape,
    NodeNameError,
    edges_of,
    nodes_of,
    parse_edge,
    parse_node,
    parse_nodes,
    shape_of,
)


@given(st.integers(0, 200), st.integers(0, 200))
def test_head_names_round_trip(layer: int, head: int) -> None:
    node = AttentionHead(layer, head)
    assert node.name == f"a{layer}.h{head}"
    assert parse_node(node.name) == node


@given(st.integers(0, 200))
def test_mlp_names_round_trip(layer: int) -> None:
    assert parse_node(f"m{layer}") == MLP(layer)
    assert MLP(layer).name == f"m{layer}"


def test_edge_ends() -> None:
    assert parse_node("input") is INPUT
    assert parse_node("logits") is LOGITS


@pytest.mark.parametrize(
    "bad", ["a3", "h1", "a3.h", "m", "mlp3", "a-1.h0", "A3.H1", "", "a3.h1 m2"]
)
def test_invalid_node_names_are_clear_errors(bad: str) -> None:
    with pytest.raises(NodeNameError, match="invalid node name"):
        parse_node(bad)


def test_non_string_node_name() -> None:
    with pytest.raises(NodeNameError, match="must be a string"):
        parse_node(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    [
        "a0.h1->a2.h3<q>",
        "a0.h1->a2.h3<k>",
        "input->a0.h0<v>",
        "m0->m1",
        "a1.h2->logits",
        "input->logits",
    ],
)
def test_edge_names_round_trip(name: str) -> None:
    assert parse_edge(name).name == name


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("a0.h1", "sender->receiver"),
        ("a0.h1->a2.h3", "must say which input"),
        ("a0.h1->m2<q>", "only heads have q/k/v"),
        ("logits->m1", "cannot send"),
        ("m1->input", "cannot receive"),
    ],
)
def test_invalid_edges(bad: str, message: str) -> None:
    with pytest.raises(NodeNameError, match=message):
        parse_edge(bad)


def test_nodes_in_forward_order() -> None:
    names = [n.name for n in nodes_of(ModelShape(2, 2, has_mlps=True))]
    assert names == ["a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]


def test_attention_only_has_no_mlps() -> None:
    names = [n.name for n in nodes_of(ModelShape(2, 3, has_mlps=False))]
    assert names == ["a0.h0", "a0.h1", "a0.h2", "a1.h0", "a1.h1", "a1.h2"]


def test_nodes_of_a_real_model(native_model) -> None:
    nodes = nodes_of(native_model)
    assert len(nodes) == 2 * 4 + 2
    assert nodes[4] == MLP(0)


def test_edges_count_and_order() -> None:
    shape = ModelShape(2, 2, has_mlps=True)
    edges = edges_of(shape)
    # Receivers: each head has 3 inputs fed by every upstream node; MLPs and logits 1.
    upstream_l0_heads, upstream_m0 = 1, 3
    upstream_l1_heads, upstream_m1, upstream_logits = 4, 6, 7
    expected = (
        2 * 3 * upstream_l0_heads
        + upstream_m0
        + 2 * 3 * upstream_l1_heads
        + upstream_m1
        + upstream_logits
    )
    assert len(edges) == expected == len(set(edges))
    assert Edge(AttentionHead(0, 1), MLP(0)) in edges  # heads feed their own layer's MLP
    assert Edge(MLP(0), AttentionHead(0, 0), "q") not in edges  # but not the heads beside them


def test_shape_check_names_the_node() -> None:
    shape = ModelShape(2, 4, has_mlps=False)
    with pytest.raises(NodeNameError, match="a5.h0 does not exist"):
        parse_nodes(["a0.h0", "a5.h0"], shape)
    with pytest.raises(NodeNameError, match="attention-only"):
        parse_nodes(["m1"], shape)
    with pytest.raises(NodeNameError, match="edge end"):
        parse_nodes(["logits"], shape)


def test_parallel_blocks_have_no_edges_from_a_layers_heads_into_its_mlp() -> None:
    sequential = ModelShape(n_layers=2, n_heads=2, has_mlps=True)
    parallel = ModelShape(n_layers=2, n_heads=2, has_mlps=True, parallel=True)
    missing = {e.name for e in edges_of(sequential)} - {e.name for e in edges_of(parallel)}
    # each layer's 2 heads into its own MLP, and nothing else
    assert missing == {f"a{layer}.h{h}->m{layer}" for layer in (0, 1) for h in (0, 1)}
    assert {e.name for e in edges_of(parallel)} < {e.name for e in edges_of(sequential)}
    for edge in edges_of(parallel):
        assert parallel.feeds(edge.sender, edge.receiver)
    assert not parallel.feeds(AttentionHead(1, 0), MLP(1))
    assert parallel.feeds(AttentionHead(0, 0), MLP(1))
    assert parallel.feeds(MLP(0), AttentionHead(1, 1))
    assert not parallel.feeds(MLP(1), AttentionHead(1, 1))


def test_shape_of_reads_the_parallel_flag(native_model) -> None:
    import reuse_lens as rl
    from tests.conftest import native_config

    assert not shape_of(native_model).parallel
    model = rl.load_model(native_config(parallel_attn_mlp=True))
    assert shape_of(model).parallel


@pytest.mark.parametrize(
    "shape",
    [
        ModelShape(n_layers=3, n_heads=2, has_mlps=True),
        ModelShape(n_layers=2, n_heads=3, has_mlps=True, parallel=True),
        ModelShape(n_layers=2, n_heads=2, has_mlps=False),
    ],
)
def test_the_graph_index_marks_exactly_the_edges_of_the_shape(shape: ModelShape) -> None:
    from reuse_lens.patching.graph import GraphIndex

    index = GraphIndex(shape)
    marked = {
        (sender, receiver)
        for sender, row in index.sender.items()
        for receiver, column in index.receiver.items()
        if index.edges[row, column]
    }
    assert marked == {(e.sender.name, e.receiver_name) for e in edges_of(shape)}
