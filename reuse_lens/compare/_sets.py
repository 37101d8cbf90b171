"""The node sets behind ``reuse_lens.compare.overlap``: kinds, universes, canonical names, order.

Shared by the node report (``overlap.py``) and the edge report (``edges.py``) so that
both read circuits, universes and node order the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, get_args

from reuse_lens.nodes import MLP, AttentionHead, Expert, ModelShape, forward_order, parse_node

if TYPE_CHECKING:
    from reuse_lens.circuits.circuit import Circuit
    from reuse_lens.nodes import Node

Kind = Literal["all", "heads", "mlps"]
"""Which nodes a statistic counts: every head and MLP, the heads only, or the MLPs only."""

KINDS: tuple[Kind, ...] = get_args(Kind)


class OverlapWarning(UserWarning):
    """A comparison that was made, but some of whose statistics are NaN: an empty circuit
    (or one with nothing inside the universe) has no overlap with anything."""


def check_not_empty(
    sets_by_name: Mapping[str, frozenset[Any]],
    universe: frozenset[Any],
    what: str,
    *,
    restricted: bool,
) -> None:
    """ValueError for an empty universe; OverlapWarning naming the empty circuits.

    Every statistic is a ratio over the universe or the circuits' sets: with an empty
    universe all of them are 0/0, so the comparison is refused; an empty circuit makes
    the ratios of its own pairs NaN, so it is compared, with a warning that says why.
    """
    if not universe:
        raise ValueError(
            f"the universe is empty: no {what} could have been chosen, so every overlap "
            f"statistic would be NaN. Give the {what}s that could have been chosen, or leave "
            f"universe out (every {what} of the model)"
        )
    empty = [name for name, items in sets_by_name.items() if not items]
    if empty:
        warnings.warn(
            f"circuit(s) {', '.join(repr(n) for n in empty)} have no {what}s"
            f"{' inside the universe' if restricted else ''}, so their pairs test nothing: "
            "their overlap coefficients and directional overlaps are NaN (0 / 0), their "
            "Jaccard indices 0 (NaN against another empty one). Check that each was found "
            "(an empty circuit says the rule kept nothing), or leave it out",
            OverlapWarning,
            stacklevel=3,
        )


def check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind  # type: ignore[return-value]


def node_key(name: str) -> tuple[int, int, int]:
    """Forward order: a layer's heads by index, then its MLP (or its experts)."""
    node = parse_node(name)
    if not isinstance(node, AttentionHead | MLP | Expert):
        raise ValueError(f"{name!r} is an edge end, not a head or MLP")
    return forward_order(node)


def sorted_nodes(nodes: Iterable[str]) -> list[str]:
    return sorted(nodes, key=node_key)


def layer_of(name: str) -> int:
    return node_key(name)[0]


def shared_shape(circuits: Mapping[str, Circuit]) -> ModelShape:
    shapes = {name: circuit.shape for name, circuit in circuits.items()}
    distinct = set(shapes.values())
    if len(distinct) > 1:
        listing = "; ".join(f"{name!r}: {shape}" for name, shape in shapes.items())
        raise ValueError(
            "circuits of models with different shapes cannot be compared node by node "
            f"({listing}). Compare circuits of one architecture; a base model and its "
            "fine-tunes share a shape."
        )
    return next(iter(distinct))


def canonical(name: str | Node, shape: ModelShape, where: str) -> str:
    """The canonical name of a head or MLP of ``shape``; a ValueError says ``where`` it was."""
    try:
        node = parse_node(name)
        if not isinstance(node, AttentionHead | MLP | Expert):
            raise ValueError(f"{node.name!r} is an edge end, not a head or MLP")
        shape.check(node)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    return node.name


def universes_of(
    shape: ModelShape, universe: Iterable[str | Node] | None
) -> dict[Kind, frozenset[str]]:
    if universe is None:
        everything = frozenset(node.name for node in shape.nodes())
    else:
        if isinstance(universe, str):
            raise ValueError(
                f"universe must be a collection of node names, got the string {universe!r}; "
                f"write universe=[{universe!r}]"
            )
        everything = frozenset(canonical(n, shape, "universe") for n in universe)
    heads = frozenset(n for n in everything if node_key(n)[1] == 0)
    return {"all": everything, "heads": heads, "mlps": everything - heads}


def kind_sets(
    name: str, circuit: Circuit, shape: ModelShape, universe: frozenset[str]
) -> dict[Kind, frozenset[str]]:
    nodes = {canonical(n, shape, f"circuit {name!r}") for n in circuit.nodes}
    inside = frozenset(nodes & universe)
    heads = frozenset(n for n in inside if node_key(n)[1] == 0)
    return {"all": inside, "heads": heads, "mlps": inside - heads}


def edges_inside(circuit: Circuit, universe: frozenset[str]) -> frozenset[tuple[str, str]]:
    """The circuit's edges whose both ends lie in the universe (or are input/logits)."""

    def inside(end: str) -> bool:
        node = end.split("<", 1)[0]  # "a2.h3<q>" enters head a2.h3
        return node in ("input", "logits") or node in universe

    edges = getattr(circuit, "edges", frozenset()) or frozenset()
    return frozenset((s, r) for s, r in edges if inside(s) and inside(r))


def scores_inside(circuit: Circuit, universe: frozenset[str]) -> dict[str, float]:
    """The circuit's node scores under canonical names, for nodes in the universe."""
    scores = getattr(circuit, "node_scores", {}) or {}
    out: dict[str, float] = {}
    for key, value in scores.items():
        node = parse_node(key)
        if node.name in universe:
            out[node.name] = float(value)
    return out


class NamedPairs:
    """The pair bookkeeping of a report over named circuits, in the report's order."""

    names: tuple[str, ...]

    def _check_name(self, name: str) -> str:
        if name not in self.names:
            known = ", ".join(repr(n) for n in self.names)
            raise ValueError(f"unknown circuit {name!r}; this report has: {known}")
        return name

    def _pairs(self) -> list[tuple[str, str]]:
        """Every unordered pair, a before b in report order: the family of tests."""
        return [(a, b) for i, a in enumerate(self.names) for b in self.names[i + 1 :]]

    def _pair(self, a: str, b: str) -> tuple[str, str]:
        """(a, b) in report order: the key of a report's adjusted p-values."""
        return (a, b) if self.names.index(a) <= self.names.index(b) else (b, a)
