"""Edge overlap: do two tasks' circuits share *connections*, not only heads and MLPs?

Node overlap (``reuse_lens.compare.overlap``) says two tasks use the same head; it cannot say
whether they use it the same way. An edge circuit (``discover_circuit(..., method="eap-ig",
level="edge")``) names each connection with the input it enters: ``a0.h1 -> a2.h3<q>`` is
a different edge from ``a0.h1 -> a2.h3<v>``. ``compare_edges({"ioi": c1, "sva": c2})``
returns an :class:`EdgeOverlapReport` with, for every pair of circuits:

- the edge Jaccard (IoU) and its chance level, with a p-value corrected over the pairs as
  in the node report (Holm by default);
- :meth:`EdgeOverlapReport.differences`: for each head both circuits feed, which of its
  q, k and v inputs each circuit uses and from which senders, so that "shared head" can
  be read as "same head, same inputs" or "same head, read differently".

Chance. Two nulls, both exact (no Monte Carlo error):

- ``"graph"`` (the default): B's edges are a uniformly random set of |B| edges of the
  model's edge graph, independent of A. Then |A∩B| is hypergeometric with M = the number
  of edges in the graph, exactly the node report's test with edges for nodes, so node and
  edge p-values read alike. Random edge sets are not connected circuits, and discovery
  concentrates edges near the logits, so this null is lenient: it answers "more shared
  edges than two unrelated edge sets of these sizes?".
- ``"receivers"``: each circuit keeps how many edges it sends into each receiver input
  (each q, k, v, MLP and the logits), and only *which senders* feed it is redrawn, per
  receiver, uniformly from the senders that can reach it. |A∩B| is then a sum of
  independent hypergeometrics, whose pmf is their convolution. This conditions on the
  node-level picture (which inputs of which nodes each circuit reads), so a small p says
  the circuits also agree on where the shared inputs read from.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from reuse_lens._io import write_text_atomic
from reuse_lens.circuits._checks import check_edge, edge_key
from reuse_lens.compare import _sets as sets
from reuse_lens.compare import _stats as stats
from reuse_lens.compare._stats import Correction
from reuse_lens.nodes import ModelShape, parse_edge

if TYPE_CHECKING:
    import pandas as pd

    from reuse_lens.circuits._checks import EdgeKey
    from reuse_lens.circuits.circuit import Circuit, EdgeLike
    from reuse_lens.compare._sets import Kind

__all__ = ["NULLS", "EdgeOverlapReport", "EdgeStat", "Null", "compare_edges"]

Null = Literal["graph", "receivers"]
"""The null model of chance edge overlap; see the module docstring."""

NULLS: tuple[Null, ...] = get_args(Null)

EdgeStat = Literal["jaccard", "expected_jaccard", "p_value", "p_adjusted", "shared"]
"""A statistic that :meth:`EdgeOverlapReport.matrix` tabulates for every pair."""

EDGE_STATS: tuple[EdgeStat, ...] = get_args(EdgeStat)

EDGE_REPORT_FORMAT_VERSION = 1
"""Version of the JSON written by :meth:`EdgeOverlapReport.to_json`."""

_INPUTS = ("q", "k", "v")


def compare_edges(
    circuits: Mapping[str, Circuit],
    *,
    universe: Iterable[EdgeLike] | None = None,
    correction: Correction = "holm",
) -> EdgeOverlapReport:
    """Compare the edges of named edge circuits of one model architecture, pair by pair.

    Arguments:
        circuits: ``{name: Circuit}`` of edge-level circuits (``circuit.level == "edge"``)
            of one ``ModelShape``, e.g. from ``discover_circuit(model, task,
            method="eap-ig", level="edge")``.
        universe: the edges that could have been chosen, by default every edge of the
            shape's graph (``reuse_lens.nodes.edges_of``). When given, circuit edges
            outside it are ignored. Restrict it when only part of the graph was scored.
        correction: the multiple-comparison correction over the pairs, as in
            ``reuse_lens.compare``: ``"holm"`` (default), ``"bh"``, ``"bonferroni"``,
            ``"none"``.

    Raises:
        ValueError: for an empty mapping, bad names, circuits of different shapes, a
            node-level circuit (it has no edges to compare; path-patching circuits record
            paths, not an edge graph), a universe edge that is not in the graph, or an
            empty universe.

    Warns:
        OverlapWarning: naming each circuit with no edge (inside ``universe``), whose
            statistics are NaN.
    """
    if not isinstance(circuits, Mapping) or not circuits:
        raise ValueError(
            "compare_edges() takes a non-empty mapping of names to edge circuits, e.g. "
            "compare_edges({'ioi': c1, 'sva': c2})"
        )
    for name, circuit in circuits.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"circuit names must be non-empty strings, got {name!r}")
        if not circuit.edges and (not circuit.nodes or circuit.metadata.get("level") == "edge"):
            continue  # an empty edge circuit: compared, with a warning below
        if circuit.level != "edge":
            raise ValueError(
                f"circuit {name!r} is a node-level circuit, so it has no edge graph to "
                "compare; find edge circuits with discover_circuit(model, task, "
                "method='eap-ig', level='edge'), or compare nodes with reuse_lens.compare"
            )
    shape = sets.shared_shape(circuits)
    if universe is None:
        edges = frozenset(edge_key(edge) for edge in shape.edges())
    else:
        if isinstance(universe, str):
            raise ValueError(f"universe must be a collection of edges, got the string {universe!r}")
        edges = frozenset(edge_key(check_edge(e, shape, "universe edge")) for e in universe)
    inside = {name: frozenset(c.edges) & edges for name, c in circuits.items()}
    sets.check_not_empty(inside, edges, "edge", restricted=universe is not None)
    return EdgeOverlapReport(
        circuits, shape=shape, universe=edges, correction=stats.check_correction(correction)
    )


class EdgeOverlapReport(sets.NamedPairs):
    """Edge overlap statistics for every pair of a set of edge circuits; see :func:`compare_edges`.

    Edges are ``(sender, receiver)`` keys as in ``Circuit.edges``: ``("a0.h1",
    "a2.h3<q>")``, ``("input", "m0")``, ``("m3", "logits")``.
    """

    names: tuple[str, ...]
    circuits: Mapping[str, Circuit]
    shape: ModelShape
    correction: Correction

    def __init__(
        self,
        circuits: Mapping[str, Circuit],
        *,
        shape: ModelShape,
        universe: frozenset[EdgeKey],
        correction: Correction = "holm",
    ) -> None:
        self.names = tuple(circuits)
        self.circuits = MappingProxyType(dict(circuits))
        self.shape = shape
        self.correction = stats.check_correction(correction)
        self._universe = universe
        self._edges = {name: frozenset(c.edges) & universe for name, c in circuits.items()}
        # Receiver -> how many universe edges enter it: the strata of the "receivers" null.
        self._fan_in: dict[str, int] = {}
        for _, receiver in universe:
            self._fan_in[receiver] = self._fan_in.get(receiver, 0) + 1

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}: {len(self._edges[name])}" for name in self.names)
        return f"EdgeOverlapReport({sizes}; universe of {len(self._universe)} edges)"

    # ------------------------------------------------------------------ sets

    def universe(self) -> frozenset[EdgeKey]:
        """The edges the circuits were chosen from."""
        return self._universe

    def edges(self, name: str) -> frozenset[EdgeKey]:
        """The edges of circuit ``name`` inside the universe."""
        return self._edges[self._check_name(name)]

    def shared(self, a: str, b: str) -> frozenset[EdgeKey]:
        """Edges in both ``a`` and ``b``."""
        return self.edges(a) & self.edges(b)

    def unique(self, a: str, b: str) -> frozenset[EdgeKey]:
        """Edges in ``a`` but not in ``b``."""
        return self.edges(a) - self.edges(b)

    def inputs(self, name: str, node: str) -> dict[str, frozenset[str]]:
        """Which inputs of ``node`` circuit ``name`` uses, and from which senders.

        Returns:
            For a head, ``{"q": senders, "k": senders, "v": senders}`` (inputs the circuit
            does not use map to an empty set); for an MLP or ``"logits"``, ``{"": senders}``.
        """
        receivers = [f"{node}<{i}>" for i in _INPUTS] if node.startswith("a") else [node]
        by_receiver: dict[str, set[str]] = {r: set() for r in receivers}
        for sender, receiver in self.edges(name):
            if receiver in by_receiver:
                by_receiver[receiver].add(sender)
        return {_input_of(r): frozenset(s) for r, s in by_receiver.items()}

    # ------------------------------------------------------------ statistics

    def jaccard(self, a: str, b: str) -> float:
        """Edge IoU |A∩B| / |A∪B|; ``nan`` when both circuits have no edges in the universe."""
        edges_a, edges_b = self.edges(a), self.edges(b)
        return stats.ratio(len(edges_a & edges_b), len(edges_a | edges_b))

    def expected_jaccard(self, a: str, b: str, null: Null = "graph") -> float:
        """The edge Jaccard expected by chance under ``null`` (exact, over the null's pmf)."""
        n, big_n = len(self.edges(a)), len(self.edges(b))
        if _check_null(null) == "graph":
            return stats.expected_jaccard(len(self._universe), n, big_n)
        return stats.expected_jaccard_from_pmf(self._strata_pmf(a, b), n, big_n)

    def p_value(self, a: str, b: str, null: Null = "graph", *, corrected: bool = False) -> float:
        """Chance of sharing at least as many edges under ``null``: P(X >= |A∩B|).

        Arguments:
            null: ``"graph"`` (hypergeometric over all edges of the graph) or
                ``"receivers"`` (senders redrawn per receiver input); see the module.
            corrected: adjusted by the report's ``correction`` over every pair of the
                report; ``nan`` for a circuit compared with itself.
        """
        _check_null(null)
        if corrected:
            self._check_name(a)
            self._check_name(b)
            return self.adjusted_p_values(null).get(self._pair(a, b), math.nan)
        x = len(self.shared(a, b))
        if null == "graph":
            big_m = len(self._universe)
            return stats.hypergeom_tail(big_m, len(self.edges(a)), len(self.edges(b)), x)
        return stats.tail_from_pmf(self._strata_pmf(a, b), x)

    def permutation_p_value(
        self, a: str, b: str, n_permutations: int = 10_000, seed: int = 0
    ) -> float:
        """A Monte Carlo check of the ``"graph"`` p-value: redraw B's edges and count."""
        if not isinstance(n_permutations, int) or n_permutations < 1:
            raise ValueError(f"n_permutations must be a positive int, got {n_permutations!r}")
        ordered = sorted(self._universe)
        edges_a = self.edges(a)
        in_a = np.array([edge in edges_a for edge in ordered])
        observed = len(self.shared(a, b))
        rng = np.random.default_rng(seed)
        return stats.permutation_p_value(in_a, len(self.edges(b)), observed, n_permutations, rng)

    def adjusted_p_values(
        self, null: Null = "graph", method: Correction | None = None
    ) -> dict[tuple[str, str], float]:
        """``{(a, b): p}`` for every unordered pair, corrected over the pairs (report order)."""
        method = self.correction if method is None else stats.check_correction(method)
        pairs = self._pairs()
        raw = [self.p_value(a, b, null) for a, b in pairs]
        return dict(zip(pairs, stats.adjust_p_values(raw, method), strict=True))

    def significant_pairs(
        self, alpha: float = 0.05, null: Null = "graph", method: Correction | None = None
    ) -> list[tuple[str, str]]:
        """Pairs whose corrected p-value is at most ``alpha``, smallest first."""
        if not isinstance(alpha, int | float) or not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be a level in (0, 1), e.g. 0.05; got {alpha!r}")
        adjusted = self.adjusted_p_values(null, method)
        kept = [pair for pair, p in adjusted.items() if not math.isnan(p) and p <= alpha]
        return sorted(kept, key=lambda pair: adjusted[pair])

    # ------------------------------------------------------------ differences

    def differences(
        self,
        a: str | None = None,
        b: str | None = None,
        *,
        kind: Kind = "heads",
        include_same: bool = False,
    ) -> pd.DataFrame:
        """Where two circuits use one node differently: other inputs, or other senders.

        For each pair (or only ``a`` and ``b``) and each node of ``kind`` that *both*
        circuits feed (a shared receiver), one row per input that either circuit uses:
        a head's ``q``, ``k``, ``v``; an MLP's single input (written ``""``).

        Returns:
            A DataFrame with columns ``a``, ``b``, ``node``, ``input``, ``senders_a``,
            ``senders_b`` (sorted lists, empty when that circuit does not use the input),
            ``shared`` (senders in both) and ``verdict``: ``"only a"`` / ``"only b"`` (one
            circuit does not read this input at all), ``"different senders"`` or
            ``"same senders"`` (rows of the last kind only with ``include_same``).
        """
        import pandas as pd

        kind = sets.check_kind(kind)
        pairs = self._pairs() if a is None and b is None else [self._given_pair(a, b)]
        rows = []
        for left, right in pairs:
            for node in self._shared_receivers(left, right, kind):
                uses_a, uses_b = self.inputs(left, node), self.inputs(right, node)
                for put in uses_a:
                    senders_a, senders_b = uses_a[put], uses_b[put]
                    if not senders_a and not senders_b:
                        continue
                    verdict = _verdict(senders_a, senders_b)
                    if verdict == "same senders" and not include_same:
                        continue
                    rows.append(
                        {
                            "a": left,
                            "b": right,
                            "node": node,
                            "input": put,
                            "senders_a": _sorted_senders(senders_a),
                            "senders_b": _sorted_senders(senders_b),
                            "shared": _sorted_senders(senders_a & senders_b),
                            "verdict": verdict,
                        }
                    )
        columns = ["a", "b", "node", "input", "senders_a", "senders_b", "shared", "verdict"]
        return pd.DataFrame(rows, columns=columns)

    def head_usage(self, a: str, b: str) -> dict[str, list[str]]:
        """The heads both circuits feed, split by how they are read.

        Returns:
            ``{"same": [...], "other_inputs": [...], "other_senders": [...]}``: heads read
            through the same inputs from the same senders; through a different set of
            q/k/v inputs; through the same inputs but from partly different senders.
        """
        out: dict[str, list[str]] = {"same": [], "other_inputs": [], "other_senders": []}
        for node in self._shared_receivers(a, b, "heads"):
            uses_a, uses_b = self.inputs(a, node), self.inputs(b, node)
            used_a = {put for put, senders in uses_a.items() if senders}
            used_b = {put for put, senders in uses_b.items() if senders}
            if used_a != used_b:
                out["other_inputs"].append(node)
            elif uses_a != uses_b:
                out["other_senders"].append(node)
            else:
                out["same"].append(node)
        return out

    # ---------------------------------------------------------------- tables

    def matrix(self, stat: EdgeStat = "jaccard", null: Null = "graph") -> pd.DataFrame:
        """A names x names table of one statistic (``p_adjusted``: ``nan`` on the diagonal)."""
        import pandas as pd

        if stat not in EDGE_STATS:
            raise ValueError(f"unknown statistic {stat!r}; choose one of {', '.join(EDGE_STATS)}")
        functions = {
            "jaccard": lambda a, b: self.jaccard(a, b),
            "expected_jaccard": lambda a, b: self.expected_jaccard(a, b, null),
            "p_value": lambda a, b: self.p_value(a, b, null),
            "p_adjusted": lambda a, b: self.p_value(a, b, null, corrected=True),
            "shared": lambda a, b: float(len(self.shared(a, b))),
        }
        values = [[functions[stat](row, col) for col in self.names] for row in self.names]
        return pd.DataFrame(values, index=list(self.names), columns=list(self.names), dtype=float)

    def table(self) -> pd.DataFrame:
        """One row per unordered pair: sizes, Jaccard, chance and p-values under both nulls
        (raw and corrected), and how the heads both circuits feed are read
        (:meth:`head_usage` counts: ``heads_same``, ``heads_other_inputs``,
        ``heads_other_senders``)."""
        import pandas as pd

        return pd.DataFrame(self._pair_rows(), columns=_PAIR_COLUMNS)

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The report as plain JSON (``nan`` as ``null``); also written to ``path`` if given.

        Holds the universe size, each circuit's edges and metadata, the correction, the
        rows of :meth:`table` under ``"pairs"`` and :meth:`differences` under
        ``"differences"``.
        """
        document: dict[str, Any] = {
            "format": "reuse_lens.compare.edges",
            "format_version": EDGE_REPORT_FORMAT_VERSION,
            "names": list(self.names),
            "shape": {
                "n_layers": self.shape.n_layers,
                "n_heads": self.shape.n_heads,
                "has_mlps": self.shape.has_mlps,
            },
            "universe_size": len(self._universe),
            "circuits": {
                name: {
                    "edges": [f"{s}->{r}" for s, r in _sorted_edges(self._edges[name])],
                    "metadata": dict(getattr(self.circuits[name], "metadata", {}) or {}),
                }
                for name in self.names
            },
            "correction": {
                "method": self.correction,
                "family": "every unordered pair of circuits of the report, per null",
            },
            "pairs": self._pair_rows(),
            "differences": self.differences().to_dict(orient="records"),
        }
        text = json.dumps(stats.plain(document), indent=2, allow_nan=False)
        if path is not None:
            write_text_atomic(path, text)
        return text

    # --------------------------------------------------------------- helpers

    def _given_pair(self, a: str | None, b: str | None) -> tuple[str, str]:
        if a is None or b is None:
            raise ValueError("give both a and b (two circuit names), or neither for every pair")
        return self._check_name(a), self._check_name(b)

    def _receivers(self, name: str) -> set[str]:
        """The heads and MLPs that circuit ``name`` feeds (through any input)."""
        return {receiver.split("<", 1)[0] for _, receiver in self.edges(name)} - {"logits"}

    def _shared_receivers(self, a: str, b: str, kind: Kind) -> list[str]:
        both = self._receivers(a) & self._receivers(b)
        if kind == "heads":
            both = {n for n in both if n.startswith("a")}
        elif kind == "mlps":
            both = {n for n in both if n.startswith("m")}
        return sets.sorted_nodes(both)

    def _strata_pmf(self, a: str, b: str) -> np.ndarray:
        """The pmf of |A∩B| when B's senders are redrawn within each receiver input."""
        count_a = _per_receiver(self.edges(a))
        count_b = _per_receiver(self.edges(b))
        strata = [
            (self._fan_in[r], count_a.get(r, 0), count_b.get(r, 0))
            for r in sorted(set(count_a) & set(count_b))
        ]
        return stats.hypergeom_sum_pmf(strata)

    def _pair_rows(self) -> list[dict[str, Any]]:
        adjusted = {null: self.adjusted_p_values(null) for null in NULLS}
        rows = []
        for a, b in self._pairs():
            usage = self.head_usage(a, b)
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "edges_a": len(self.edges(a)),
                    "edges_b": len(self.edges(b)),
                    "shared": len(self.shared(a, b)),
                    "jaccard": self.jaccard(a, b),
                    "expected_jaccard": self.expected_jaccard(a, b),
                    "p_value": self.p_value(a, b),
                    "p_adjusted": adjusted["graph"][(a, b)],
                    "expected_jaccard_receivers": self.expected_jaccard(a, b, "receivers"),
                    "p_value_receivers": self.p_value(a, b, "receivers"),
                    "p_adjusted_receivers": adjusted["receivers"][(a, b)],
                    "heads_same": len(usage["same"]),
                    "heads_other_inputs": len(usage["other_inputs"]),
                    "heads_other_senders": len(usage["other_senders"]),
                }
            )
        return rows


_PAIR_COLUMNS = [
    "a",
    "b",
    "edges_a",
    "edges_b",
    "shared",
    "jaccard",
    "expected_jaccard",
    "p_value",
    "p_adjusted",
    "expected_jaccard_receivers",
    "p_value_receivers",
    "p_adjusted_receivers",
    "heads_same",
    "heads_other_inputs",
    "heads_other_senders",
]


def _check_null(null: object) -> Null:
    if null not in NULLS:
        raise ValueError(f"unknown null {null!r}; choose one of {', '.join(map(repr, NULLS))}")
    return null  # type: ignore[return-value]


def _input_of(receiver: str) -> str:
    """``"q"`` for ``"a2.h3<q>"``; ``""`` for an MLP or the logits."""
    return receiver[-2] if receiver.endswith(">") else ""


def _per_receiver(edges: Iterable[EdgeKey]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, receiver in edges:
        counts[receiver] = counts.get(receiver, 0) + 1
    return counts


def _verdict(senders_a: frozenset[str], senders_b: frozenset[str]) -> str:
    if not senders_b:
        return "only a"
    if not senders_a:
        return "only b"
    return "same senders" if senders_a == senders_b else "different senders"


def _sender_key(name: str) -> tuple[int, int, int]:
    return (-1, 0, 0) if name == "input" else sets.node_key(name)


def _sorted_senders(senders: Iterable[str]) -> list[str]:
    return sorted(senders, key=_sender_key)


def _sorted_edges(edges: Iterable[EdgeKey]) -> list[EdgeKey]:
    """Edges in forward order of receiver, then sender (as ``edges_of`` lists them)."""

    def key(edge: EdgeKey) -> tuple[Any, ...]:
        parsed = parse_edge(f"{edge[0]}->{edge[1]}")
        receiver = parsed.receiver.name
        layer = math.inf if receiver == "logits" else sets.node_key(receiver)[0]
        position = _INPUTS.index(parsed.receiver_input) if parsed.receiver_input else 3
        return (layer, position, _receiver_rank(receiver), _sender_key(edge[0]))

    return sorted(edges, key=key)


def _receiver_rank(receiver: str) -> tuple[int, int, int]:
    return (10**9, 0, 0) if receiver == "logits" else sets.node_key(receiver)
