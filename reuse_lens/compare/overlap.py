"""How much of one circuit does another reuse? Overlap statistics for a set of circuits.

``compare({"ioi": c1, "colored_objects": c2})`` returns an :class:`OverlapReport` that
answers the questions of the circuit-reuse papers for every pair of circuits:

- Merullo et al. 2024 count the heads two task circuits share (25 of 32 for IOI and
  Colored Objects in GPT2-Medium): :meth:`OverlapReport.shared`, ``unique`` and the
  exclusive UpSet sets of :meth:`OverlapReport.intersections`.
- Hanna et al. 2024 report node IoU, edge IoU and the directional overlap |A∩B|/|A|,
  and test the shared count against chance with a hypergeometric tail. We use
  P(X >= x) = ``hypergeom.sf(x - 1, M, n, N)``; their code computes P(X > x), which is
  off by one and makes every overlap look less significant than it is.
- Prakash et al. 2024 compare circuits of a base model and its fine-tunes: circuits of
  models with the same shape (different ``metadata["model"]``) compare like any others.

Conventions, fixed here so every statistic is defined for every input:

- Sets are taken per *kind*: ``"all"`` nodes, ``"heads"`` only or ``"mlps"`` only, and
  always inside the *universe* (by default every node of that kind in the model).
- A ratio whose denominator is zero is ``nan``, never an exception and never a silent
  0 or 1: the Jaccard index of two empty sets, the overlap coefficient or directional
  overlap when a set is empty, and every statistic of a kind the model lacks (the MLPs
  of an attention-only model). ``nan`` is written as ``null`` in JSON.

scipy and pandas load on first use, so importing this module stays cheap. The chance
statistics themselves (hypergeometric tail, expected Jaccard, permutation test) live in
``reuse_lens.compare._stats``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from reuse_lens._io import write_text_atomic
from reuse_lens.compare import _rows
from reuse_lens.compare import _sets as sets
from reuse_lens.compare import _stats as stats
from reuse_lens.compare._sets import KINDS, Kind, OverlapWarning
from reuse_lens.compare._stats import CORRECTIONS, Correction
from reuse_lens.nodes import AttentionHead, ModelShape

if TYPE_CHECKING:
    import pandas as pd

    from reuse_lens.circuits.circuit import Circuit
    from reuse_lens.nodes import Node

__all__ = [
    "ALPHA",
    "CORRECTIONS",
    "DEFAULT_CORRECTION",
    "KINDS",
    "STATS",
    "Correction",
    "Kind",
    "OverlapReport",
    "OverlapWarning",
    "Stat",
    "compare",
    "compare_after_layer_0",
]

Stat = Literal[
    "jaccard",
    "overlap",
    "directional",
    "p_value",
    "p_adjusted",
    "expected_jaccard",
    "shared",
    "edge_iou",
]
"""A statistic that :meth:`OverlapReport.matrix` can tabulate for every ordered pair."""

STATS: tuple[Stat, ...] = get_args(Stat)

DEFAULT_CORRECTION: Correction = "holm"
"""The correction a report uses unless told otherwise: Holm's, which bounds the chance of
calling *any* pair significant by accident, without Bonferroni's loss of power."""

ALPHA = 0.05
"""The level at which :meth:`OverlapReport.significant_pairs` calls a pair significant."""

REPORT_FORMAT_VERSION = 1
"""Version of the JSON written by :meth:`OverlapReport.to_json`."""


def compare(
    circuits: Mapping[str, Circuit],
    *,
    universe: Iterable[str | Node] | None = None,
    correction: Correction = DEFAULT_CORRECTION,
) -> OverlapReport:
    """Compare named circuits of one model architecture, pair by pair.

    Arguments:
        circuits: ``{name: Circuit}``; the names label every row and column of the report.
            All circuits must have the same ``ModelShape``; they may come from different
            models of that shape, such as a base model and its fine-tunes.
        universe: the nodes that could have been chosen, against which chance overlap is
            measured. By default every head and MLP of the shared shape. When given (node
            names such as ``"a3.h1"``, ``"m3"``), every statistic is restricted to those
            nodes: circuit nodes outside it are ignored, and so are edges with an end
            outside it (``input`` and ``logits`` always count as inside). Restrict it when
            the circuits could only have come from part of the model, e.g. when only
            the heads of the upper layers were scored.
        correction: how :meth:`OverlapReport.p_value` with ``corrected=True`` and
            :meth:`OverlapReport.significant_pairs` correct for testing every pair:
            ``"holm"`` (family-wise error rate; the default), ``"bh"`` (Benjamini-Hochberg
            false discovery rate), ``"bonferroni"`` or ``"none"``. Recorded in the report
            and its JSON.

    Returns:
        An :class:`OverlapReport`.

    Raises:
        ValueError: if ``circuits`` is empty or not a mapping, if the circuits' shapes
            differ (the message names each circuit and its shape), if a node of a
            circuit or of ``universe`` is not a node of the shape, or if ``universe`` is
            empty (every statistic would be 0 / 0).

    Warns:
        OverlapWarning: naming each circuit with no node (inside ``universe``), whose
            statistics are NaN.
    """
    if not isinstance(circuits, Mapping):
        raise ValueError(
            "compare() takes a mapping of names to circuits, e.g. "
            f"compare({{'ioi': c1, 'colored_objects': c2}}); got {type(circuits).__name__}"
        )
    if not circuits:
        raise ValueError("compare() needs at least one circuit, e.g. compare({'ioi': c1})")
    for name in circuits:
        if not isinstance(name, str) or not name:
            raise ValueError(f"circuit names must be non-empty strings, got {name!r}")
    shape = sets.shared_shape(circuits)
    universes = sets.universes_of(shape, universe)
    inside = {name: frozenset(c.nodes) & universes["all"] for name, c in circuits.items()}
    sets.check_not_empty(inside, universes["all"], "node", restricted=universe is not None)
    return OverlapReport(
        circuits, shape=shape, universes=universes, correction=stats.check_correction(correction)
    )


def compare_after_layer_0(
    circuits: Mapping[str, Circuit], *, correction: Correction = DEFAULT_CORRECTION
) -> OverlapReport:
    """``compare`` over every node but layer 0's heads.

    Layer 0's heads mix token identity and position for everything downstream, and many
    circuits hold them whatever their task, so an overlap can beat chance on them alone;
    this measures it without them. A circuit of layer-0 heads alone is empty here, which is
    the point of the question, so no OverlapWarning is given for it.
    """
    shapes = {c.shape for c in circuits.values()}
    if len(shapes) != 1:
        return compare(circuits, correction=correction)  # compare names the mismatch
    (shape,) = shapes
    later = [n.name for n in shape.nodes() if not (isinstance(n, AttentionHead) and n.layer == 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OverlapWarning)
        return compare(circuits, universe=later, correction=correction)


class OverlapReport(sets.NamedPairs):
    """Overlap statistics for every pair of a set of circuits; made by :func:`compare`.

    Every query takes circuit names (``report.jaccard("ioi", "colored_objects")``) and a
    ``kind`` (``"all"``, ``"heads"`` or ``"mlps"``). Queries are cheap: sets are built
    once, and statistics are computed when asked for.
    """

    names: tuple[str, ...]
    circuits: Mapping[str, Circuit]
    shape: ModelShape
    stability: Mapping[str, float]
    correction: Correction

    def __init__(
        self,
        circuits: Mapping[str, Circuit],
        *,
        shape: ModelShape,
        universes: Mapping[Kind, frozenset[str]],
        stability: Mapping[str, float] | None = None,
        correction: Correction = DEFAULT_CORRECTION,
    ) -> None:
        self.names = tuple(circuits)
        self.correction = stats.check_correction(correction)
        self.circuits = MappingProxyType(dict(circuits))
        self.shape = shape
        self.stability = MappingProxyType(dict(stability or {}))
        self._universes = dict(universes)
        everything = self._universes["all"]
        self._sets = {
            name: sets.kind_sets(name, c, shape, everything) for name, c in circuits.items()
        }
        self._edges = {name: sets.edges_inside(c, everything) for name, c in circuits.items()}
        self._scores = {name: sets.scores_inside(c, everything) for name, c in circuits.items()}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}: {len(self._sets[name]['all'])}" for name in self.names)
        return f"OverlapReport({sizes}; universe of {len(self._universes['all'])} nodes)"

    # ------------------------------------------------------------------ sets

    def universe(self, kind: Kind = "all") -> frozenset[str]:
        """The nodes of ``kind`` that the circuits were chosen from."""
        return self._universes[sets.check_kind(kind)]

    def nodes(self, name: str, kind: Kind = "all") -> frozenset[str]:
        """The nodes of ``kind`` of circuit ``name``, inside the universe."""
        return self._sets[self._check_name(name)][sets.check_kind(kind)]

    def shared(self, a: str, b: str, kind: Kind = "all") -> frozenset[str]:
        """Nodes of ``kind`` in both ``a`` and ``b``."""
        return self.nodes(a, kind) & self.nodes(b, kind)

    def unique(self, a: str, b: str, kind: Kind = "all") -> frozenset[str]:
        """Nodes of ``kind`` in ``a`` but not in ``b``."""
        return self.nodes(a, kind) - self.nodes(b, kind)

    def intersections(self, kind: Kind = "all") -> list[tuple[tuple[str, ...], frozenset[str]]]:
        """The exclusive sets of an UpSet plot: nodes found in exactly these circuits.

        Returns:
            ``[(names, nodes), ...]``: each node of any circuit appears in exactly one
            entry, the one whose ``names`` (in report order) are the circuits containing
            it. Empty sets are left out. Largest sets come first; ties put sets shared
            by more circuits first, then follow report order.
        """
        groups: dict[tuple[str, ...], set[str]] = {}
        for node in self._union(self.names, kind):
            members = tuple(name for name in self.names if node in self._sets[name][kind])
            groups.setdefault(members, set()).add(node)
        position = {name: i for i, name in enumerate(self.names)}

        def order(item: tuple[tuple[str, ...], set[str]]) -> tuple[int, int, list[int]]:
            members, nodes = item
            return (-len(nodes), -len(members), [position[n] for n in members])

        return [(members, frozenset(nodes)) for members, nodes in sorted(groups.items(), key=order)]

    # ------------------------------------------------------------ statistics

    def jaccard(self, a: str, b: str, kind: Kind = "all") -> float:
        """Node IoU |A∩B| / |A∪B|; ``nan`` when both sets are empty."""
        set_a, set_b = self.nodes(a, kind), self.nodes(b, kind)
        return stats.ratio(len(set_a & set_b), len(set_a | set_b))

    def overlap_coefficient(self, a: str, b: str, kind: Kind = "all") -> float:
        """|A∩B| / min(|A|, |B|): 1 when one circuit contains the other; ``nan`` if one is empty.

        Unlike Jaccard it does not penalise a small circuit for sitting inside a large one.
        """
        set_a, set_b = self.nodes(a, kind), self.nodes(b, kind)
        return stats.ratio(len(set_a & set_b), min(len(set_a), len(set_b)))

    def directional(self, a: str, b: str, kind: Kind = "all") -> float:
        """|A∩B| / |A|: the share of ``a`` that ``b`` reuses (Hanna et al. 2024).

        Not symmetric: ``directional(a, b) * |A| == directional(b, a) * |B|``. ``nan``
        when A is empty.
        """
        set_a, set_b = self.nodes(a, kind), self.nodes(b, kind)
        return stats.ratio(len(set_a & set_b), len(set_a))

    def edge_iou(self, a: str, b: str) -> float | None:
        """Edge IoU, or ``None`` unless both circuits have edges (node-level circuits have none).

        Edges are ``(sender, receiver_name)`` pairs, so an edge into a head's query and
        one into its value are different edges.
        """
        edges_a, edges_b = self._edges[self._check_name(a)], self._edges[self._check_name(b)]
        if not edges_a or not edges_b:
            return None
        return len(edges_a & edges_b) / len(edges_a | edges_b)

    def p_value(self, a: str, b: str, kind: Kind = "heads", *, corrected: bool = False) -> float:
        """Chance of sharing at least as many nodes if ``b`` were drawn at random.

        The hypergeometric tail P(X >= x) with M = universe size of ``kind``, n = |A|,
        N = |B| and x = |A∩B|, i.e. ``hypergeom.sf(x - 1, M, n, N)`` (Hanna et al. 2024
        with their off-by-one fixed). Symmetric in ``a`` and ``b``. It is 1 when x = 0 and
        ``nan`` when the universe of ``kind`` is empty.

        Arguments:
            corrected: give the p-value adjusted by the report's ``correction`` over every
                pair of the report (:meth:`adjusted_p_values`); a circuit compared with
                itself is no test of reuse and gives ``nan``.
        """
        if not corrected:
            return stats.hypergeom_tail(*self._counts(a, b, kind))
        self._check_name(a)
        self._check_name(b)
        return self.adjusted_p_values(kind).get(self._pair(a, b), math.nan)

    def adjusted_p_values(
        self, kind: Kind = "heads", method: Correction | None = None
    ) -> dict[tuple[str, str], float]:
        """Every pair's :meth:`p_value`, corrected for testing all pairs of the report.

        With k circuits the report makes k(k-1)/2 tests per kind, and at alpha = 0.05 one
        in twenty null pairs comes out "significant" by chance; the family corrected over
        is those pairs (pairs with a ``nan`` p-value are no test and are left out).

        Arguments:
            kind: which nodes the tests count; each kind is its own family.
            method: ``"holm"``, ``"bh"``, ``"bonferroni"`` or ``"none"``; the report's
                ``correction`` when None.

        Returns:
            ``{(a, b): adjusted p}`` for every unordered pair, a before b in report order.
        """
        sets.check_kind(kind)
        method = self.correction if method is None else stats.check_correction(method)
        pairs = self._pairs()
        raw = [self.p_value(a, b, kind) for a, b in pairs]
        return dict(zip(pairs, stats.adjust_p_values(raw, method), strict=True))

    def significant_pairs(
        self, kind: Kind = "heads", alpha: float = ALPHA, method: Correction | None = None
    ) -> list[tuple[str, str]]:
        """The pairs whose corrected p-value is at most ``alpha``, smallest p first.

        Arguments:
            kind, method: as for :meth:`adjusted_p_values`.
            alpha: the significance level, in (0, 1).
        """
        if not isinstance(alpha, int | float) or not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be a level in (0, 1), e.g. 0.05; got {alpha!r}")
        adjusted = self.adjusted_p_values(kind, method)
        kept = [pair for pair, p in adjusted.items() if not math.isnan(p) and p <= alpha]
        return sorted(kept, key=lambda pair: adjusted[pair])

    def permutation_p_value(
        self,
        a: str,
        b: str,
        kind: Kind = "heads",
        n_permutations: int = 10_000,
        seed: int | np.random.Generator = 0,
    ) -> float:
        """A second opinion on :meth:`p_value`: redraw ``b`` at random and count.

        Each permutation draws |B| nodes uniformly without replacement from the universe
        of ``kind`` and counts how many lie in A. The p-value is
        ``(1 + #{count >= x}) / (1 + n_permutations)``, which is never 0 (the observed
        draw counts as one of the permutations). ``nan`` when the universe is empty.

        Arguments:
            seed: an int seed for ``numpy.random.default_rng``, or a Generator.
        """
        if not isinstance(n_permutations, int) or n_permutations < 1:
            raise ValueError(f"n_permutations must be a positive int, got {n_permutations!r}")
        big_m, _, big_n, x = self._counts(a, b, kind)
        if big_m == 0:
            return math.nan
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        in_a = self._mask(self.nodes(a, kind), kind)
        return stats.permutation_p_value(in_a, big_n, x, n_permutations, rng)

    def expected_jaccard(self, a: str, b: str, kind: Kind = "heads") -> float:
        """The Jaccard index expected by chance for circuits of these sizes.

        The exact E[x / (n + N - x)] with x hypergeometric (M = universe size of ``kind``,
        n = |A|, N = |B|), summed over the pmf. ``nan`` when both sets are empty or the
        universe is. Compare :meth:`jaccard` with it: small circuits in a small model
        share nodes by chance alone.
        """
        big_m, n, big_n, _ = self._counts(a, b, kind)
        return stats.expected_jaccard(big_m, n, big_n)

    def rank_correlation(self, a: str, b: str) -> dict[str, float] | None:
        """Spearman and Kendall (tau-b) correlation of the two circuits' node scores.

        Computed over the union of the two circuits' nodes (inside the universe), on the
        signed scores, so a head that changes sign between tasks counts against the
        agreement. A node a circuit has no score for counts as 0 (no effect).

        Returns:
            ``{"spearman": float, "kendall": float, "n": int}`` with n the number of
            nodes compared; the correlations are ``nan`` when n < 2 or a side is
            constant. ``None`` when either circuit has no node scores.
        """
        scores_a, scores_b = self._scores[self._check_name(a)], self._scores[self._check_name(b)]
        if not scores_a or not scores_b:
            return None
        nodes = self._union((a, b), "all")
        x = np.array([scores_a.get(node, 0.0) for node in nodes], dtype=float)
        y = np.array([scores_b.get(node, 0.0) for node in nodes], dtype=float)
        if len(nodes) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
            # scipy warns and returns nan on constant input; say nan without the warning.
            return {"spearman": math.nan, "kendall": math.nan, "n": len(nodes)}
        from scipy.stats import kendalltau, spearmanr

        spearman = float(spearmanr(x, y).statistic)  # type: ignore[attr-defined]
        kendall = float(kendalltau(x, y).statistic)  # type: ignore[attr-defined]
        return {"spearman": spearman, "kendall": kendall, "n": len(nodes)}

    def sweep(self, a: str, b: str, ks: Iterable[int] | None = None) -> pd.DataFrame:
        """Jaccard of the top-k nodes of each circuit by |score|, for each k.

        Shows whether overlap depends on where the circuits were cut. Ties in |score|
        are broken by forward order of the nodes, so the result is deterministic.

        Arguments:
            ks: the values of k; each in 1..K, with K the smaller number of scored nodes
                (inside the universe) of the two circuits. By default every k up to K
                when K <= 64, otherwise a geometric grid from 1 to K.

        Returns:
            A DataFrame with columns ``k``, ``shared``, ``jaccard`` and
            ``expected_jaccard`` (chance level for two random k-sets of the universe).

        Raises:
            ValueError: if a circuit has no node scores, or a k is out of range.
        """
        import pandas as pd

        ranked = {name: self._ranked(name) for name in (a, b)}
        available = min(len(ranked[a]), len(ranked[b]))
        chosen = stats.sweep_ks(available) if ks is None else stats.check_ks(ks, available)
        big_m = len(self._universes["all"])
        rows = []
        for k in chosen:
            top_a, top_b = frozenset(ranked[a][:k]), frozenset(ranked[b][:k])
            shared = len(top_a & top_b)
            rows.append(
                {
                    "k": k,
                    "shared": shared,
                    "jaccard": shared / len(top_a | top_b),
                    "expected_jaccard": stats.expected_jaccard(big_m, k, k),
                }
            )
        return pd.DataFrame(rows, columns=["k", "shared", "jaccard", "expected_jaccard"])

    # ---------------------------------------------------------------- tables

    def per_layer(self, a: str, b: str) -> pd.DataFrame:
        """Where the circuits agree, layer by layer.

        Returns:
            A DataFrame with columns ``layer``, ``kind`` (``"heads"`` or ``"mlps"``),
            ``shared``, ``only_a`` and ``only_b`` (node counts, inside the universe), with
            a row for every layer and kind of the model, zeros included.
        """
        import pandas as pd

        kinds: tuple[Kind, ...] = ("heads", "mlps") if self.shape.has_mlps else ("heads",)
        rows = []
        for layer in range(self.shape.n_layers):
            for kind in kinds:
                set_a = {n for n in self.nodes(a, kind) if sets.layer_of(n) == layer}
                set_b = {n for n in self.nodes(b, kind) if sets.layer_of(n) == layer}
                rows.append(
                    {
                        "layer": layer,
                        "kind": kind,
                        "shared": len(set_a & set_b),
                        "only_a": len(set_a - set_b),
                        "only_b": len(set_b - set_a),
                    }
                )
        return pd.DataFrame(rows, columns=["layer", "kind", "shared", "only_a", "only_b"])

    def matrix(self, stat: Stat = "jaccard", kind: Kind = "all") -> pd.DataFrame:
        """A names x names table of one statistic, e.g. for a heatmap.

        Arguments:
            stat: ``"jaccard"``, ``"overlap"`` (coefficient), ``"directional"`` (row ->
                column: the share of the row's circuit that the column's reuses),
                ``"p_value"``, ``"p_adjusted"`` (corrected by the report's ``correction``;
                ``nan`` on the diagonal), ``"expected_jaccard"``, ``"shared"`` (a count) or
                ``"edge_iou"`` (``kind`` is ignored; ``nan`` where a circuit has no edges).
        """
        import pandas as pd

        sets.check_kind(kind)
        if stat not in STATS:
            raise ValueError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
        values = [[self._stat(stat, row, col, kind) for col in self.names] for row in self.names]
        return pd.DataFrame(values, index=list(self.names), columns=list(self.names), dtype=float)

    def table(self, *, n_permutations: int = 0, seed: int = 0) -> pd.DataFrame:
        """One row per unordered pair (a before b in report order), every statistic.

        Columns: ``a``, ``b``; for each kind K of ``all``, ``heads``, ``mlps``:
        ``size_a_K``, ``size_b_K``, ``shared_K``, ``jaccard_K``, ``overlap_K``,
        ``directional_ab_K`` (|A∩B|/|A|), ``directional_ba_K``, ``p_value_K``,
        ``p_adjusted_K`` (corrected over the pairs by the report's ``correction``),
        ``expected_jaccard_K`` and, when ``n_permutations > 0``, ``permutation_p_value_K``
        (off by default: it costs ``n_permutations`` draws per pair and kind); then
        ``edge_iou``, ``spearman``, ``kendall``, ``n_scored`` (``nan`` without scores),
        and ``stability_a``, ``stability_b`` and ``stability``, the lower of the two
        within-task ceilings (``nan`` unless both are known; see :meth:`with_stability`).
        """
        import pandas as pd

        rows = _rows.pair_rows(self, n_permutations=n_permutations, seed=seed)
        return pd.DataFrame(rows, columns=_rows.pair_columns(n_permutations))

    def with_stability(self, stability: Mapping[str, float]) -> OverlapReport:
        """A copy that knows each circuit's within-task stability ceiling.

        The ceiling is the Jaccard index between circuits of the *same* task found with
        different prompts or seeds: cross-task overlap can only be read against it (an
        overlap of 0.6 is full reuse if re-finding the same circuit also gives 0.6).
        Values merge into any already given.

        Raises:
            ValueError: for a name the report lacks or a value outside [0, 1].
        """
        for name, value in stability.items():
            self._check_name(name)
            if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(
                    f"stability of {name!r} must be a Jaccard index in [0, 1], got {value!r}"
                )
        merged = {**self.stability, **{name: float(v) for name, v in stability.items()}}
        return OverlapReport(
            self.circuits,
            shape=self.shape,
            universes=self._universes,
            stability=merged,
            correction=self.correction,
        )

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Everything in the report as plain JSON (``nan`` written as ``null``).

        Holds the shape, universe sizes (and nodes when restricted), each circuit's
        nodes, edge count and metadata, the stability ceilings, the multiple-comparison
        correction (``"correction"``: its method and the family), the rows of
        :meth:`table` under ``"pairs"`` and :meth:`intersections` for each kind.
        Written to ``path`` too when given.
        """
        restricted = len(self._universes["all"]) != len(self.shape.nodes())
        document: dict[str, Any] = {
            "format": "reuse_lens.compare.overlap",
            "format_version": REPORT_FORMAT_VERSION,
            "names": list(self.names),
            "shape": {
                "n_layers": self.shape.n_layers,
                "n_heads": self.shape.n_heads,
                "has_mlps": self.shape.has_mlps,
            },
            "universe_size": {kind: len(self._universes[kind]) for kind in KINDS},
            "universe": sets.sorted_nodes(self._universes["all"]) if restricted else None,
            "circuits": {
                name: {
                    "nodes": sets.sorted_nodes(self._sets[name]["all"]),
                    "n_edges": len(self._edges[name]),
                    "metadata": dict(getattr(self.circuits[name], "metadata", {}) or {}),
                }
                for name in self.names
            },
            "stability": dict(self.stability),
            "correction": {
                "method": self.correction,
                "family": "every unordered pair of circuits of the report, per kind",
            },
            "pairs": _rows.pair_rows(self, n_permutations=0, seed=0),
            "intersections": {
                kind: [
                    {"circuits": list(members), "nodes": sets.sorted_nodes(nodes)}
                    for members, nodes in self.intersections(kind)
                ]
                for kind in KINDS
            },
        }
        text = json.dumps(stats.plain(document), indent=2, allow_nan=False)
        if path is not None:
            write_text_atomic(path, text)
        return text

    # --------------------------------------------------------------- helpers

    def _counts(self, a: str, b: str, kind: Kind) -> tuple[int, int, int, int]:
        """(M, n, N, x) of the hypergeometric test: universe, |A|, |B|, |A∩B|."""
        set_a, set_b = self.nodes(a, kind), self.nodes(b, kind)
        return len(self._universes[kind]), len(set_a), len(set_b), len(set_a & set_b)

    def _mask(self, nodes: frozenset[str], kind: Kind) -> np.ndarray:
        """Membership of ``nodes`` over the universe of ``kind`` in forward order."""
        return np.array([node in nodes for node in sets.sorted_nodes(self._universes[kind])])

    def _union(self, names: Iterable[str], kind: Kind) -> list[str]:
        union: set[str] = set()
        for name in names:
            union |= self.nodes(name, kind)
        return sets.sorted_nodes(union)

    def _ranked(self, name: str) -> list[str]:
        """Scored nodes of ``name`` by decreasing |score|, ties in forward order."""
        scores = self._scores[self._check_name(name)]
        if not scores:
            raise ValueError(
                f"circuit {name!r} has no node_scores, so it cannot be cut at top-k; "
                "discover it with a scoring method or pass node_scores= when building it"
            )
        return sorted(sets.sorted_nodes(scores), key=lambda node: -abs(scores[node]))

    def _stat(self, stat: Stat, a: str, b: str, kind: Kind) -> float:
        if stat == "edge_iou":
            value = self.edge_iou(a, b)
            return math.nan if value is None else value
        if stat == "shared":
            return float(len(self.shared(a, b, kind)))
        if stat == "p_adjusted":
            return self.p_value(a, b, kind, corrected=True)
        functions = {
            "jaccard": self.jaccard,
            "overlap": self.overlap_coefficient,
            "directional": self.directional,
            "p_value": self.p_value,
            "expected_jaccard": self.expected_jaccard,
        }
        return functions[stat](a, b, kind)
