"""What a circuit file and a circuit's parts must be: names checked against a model shape.

Shared by ``circuit.py`` (our format) and ``mib.py`` (MIB's); it imports neither, so the
two formats do not import each other.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from reuse_lens._io import write_text_atomic
from reuse_lens.nodes import (
    MLP,
    AttentionHead,
    Edge,
    Endpoint,
    Expert,
    ModelShape,
    Node,
    NodeNameError,
    edges_of,
    parse_edge,
    parse_node,
    shape_of,
)

__all__ = [
    "CIRCUIT_FORMAT",
    "CIRCUIT_FORMAT_VERSION",
    "CircuitError",
    "EdgeKey",
    "as_shape",
    "check_edge",
    "check_node",
    "count_field",
    "edge_ends",
    "edge_key",
    "node_ends",
    "require",
    "write_atomic",
]

CIRCUIT_FORMAT = "reuse_lens.circuit"
"""The ``format`` field of our circuit files."""

CIRCUIT_FORMAT_VERSION = 1
"""The version of our circuit files that this code writes and reads."""


EdgeKey = tuple[str, str]
"""An edge as a circuit stores it: ``(sender, receiver_name)``, e.g. ``("a0.h1", "a2.h3<q>")``."""


class CircuitError(ValueError):
    """A circuit that cannot exist: a node the model lacks, a bad file, an unknown version."""


def as_shape(model_or_shape: object, *, experts: bool = False) -> ModelShape:
    """``model_or_shape`` itself, or the shape of a model (with expert nodes if
    ``experts``)."""
    if isinstance(model_or_shape, ModelShape):
        return model_or_shape
    if hasattr(model_or_shape, "cfg"):
        return shape_of(model_or_shape, experts=experts)  # type: ignore[arg-type]
    raise CircuitError(
        f"expected a reuse_lens.nodes.ModelShape or a model with .cfg, got "
        f"{type(model_or_shape).__name__}; build one with ModelShape(n_layers, n_heads, has_mlps)"
    )


def check_node(name: object, shape: ModelShape, what: str = "circuit node") -> Node:
    """Parse and check one head or MLP name against ``shape``."""
    try:
        node = parse_node(name)  # type: ignore[arg-type]
        if not isinstance(node, AttentionHead | MLP | Expert):
            raise NodeNameError(
                f"{node.name!r} is an end of the residual stream, not a head or MLP; circuits "
                "hold heads ('a{layer}.h{head}') and MLPs ('m{layer}') only"
            )
        shape.check(node)
    except NodeNameError as error:
        raise CircuitError(f"bad {what}: {error}") from error
    return node


def check_edge(edge: object, shape: ModelShape, what: str = "circuit edge") -> Edge:
    """Parse and check one edge, given as a key tuple, an Edge or a name, against ``shape``."""
    is_key = isinstance(edge, tuple) and len(edge) == 2 and all(isinstance(e, str) for e in edge)
    # A key of the model's graph is parsed and checked once per shape (expert nodes have
    # no graph: their edges are refused below).
    if is_key and not shape.experts and (known := _edges_by_key(shape).get(edge)) is not None:  # type: ignore[arg-type]
        return known
    try:
        if isinstance(edge, Edge):
            parsed = edge
        elif isinstance(edge, str):
            parsed = parse_edge(edge)
        elif is_key:
            assert isinstance(edge, tuple)
            parsed = parse_edge(f"{edge[0]}->{edge[1]}")
        else:
            raise NodeNameError(
                f"{edge!r} is not an edge: give (sender, receiver) names such as "
                "('a0.h1', 'a2.h3<q>'), an Edge, or a name such as 'a0.h1->a2.h3<q>'"
            )
        shape.check(parsed.sender)
        shape.check(parsed.receiver)
    except NodeNameError as error:
        raise CircuitError(f"bad {what}: {error}") from error
    if not shape.feeds(parsed.sender, parsed.receiver):
        raise CircuitError(
            f"bad {what}: {parsed.name} is not an edge of the model's graph; a node feeds "
            "only later layers (and a layer's heads also feed that layer's MLP, unless "
            "attention and MLP run in parallel)"
        )
    return parsed


@functools.lru_cache(maxsize=8)
def _edges_by_key(shape: ModelShape) -> dict[tuple[str, str], Edge]:
    """Every edge of ``shape``'s graph by its key: a circuit of GPT-2 small holds the
    scores of all 32,000 edges, and parsing each key costs a discovery a second."""
    return {(edge.sender.name, edge.receiver_name): edge for edge in edges_of(shape)}


@functools.lru_cache(maxsize=8)
def edge_ranks(shape: ModelShape) -> dict[tuple[str, str], int]:
    """Each edge key of ``shape``'s graph by its place in ``edges_of``: ordering the
    scores of every edge of GPT-2 small by their parsed ends costs a discovery a quarter
    second."""
    return {key: rank for rank, key in enumerate(_edges_by_key(shape))}  # in edges_of order


def edge_ends(sender: str, receiver: str) -> tuple[Endpoint, Endpoint]:
    edge = parse_edge(f"{sender}->{receiver}")
    return edge.sender, edge.receiver


def edge_key(edge: Edge) -> EdgeKey:
    return (edge.sender.name, edge.receiver_name)


def node_ends(edges: Iterable[Edge]) -> set[str]:
    """The heads and MLPs at the ends of ``edges`` (``input`` and ``logits`` left out)."""
    ends = (end for edge in edges for end in (edge.sender, edge.receiver))
    return {end.name for end in ends if isinstance(end, AttentionHead | MLP)}


def require(value: object, kind: type, what: str, source: str) -> Any:
    if value is None:
        raise CircuitError(f"{source} lacks the field {what}")
    if not isinstance(value, kind):
        raise CircuitError(
            f"{source}: {what} must be a JSON {'object' if kind is dict else 'array'}, got "
            f"{type(value).__name__} {value!r:.80}"
        )
    return value


def count_field(value: object, what: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CircuitError(f"{source}: {what} must be a positive whole number, got {value!r}")
    return value


def write_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)
