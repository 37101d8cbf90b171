"""The short answer a report opens with: which circuits reuse which nodes, and is it significant.

``answer(overlap)`` turns an :class:`~reuse_lens.compare.overlap.OverlapReport` (and optionally an
:class:`~reuse_lens.compare.edges.EdgeOverlapReport`) into a few plain sentences, generated
from the numbers: the pairs whose overlap survives the report's multiple-comparison
correction, said plainly when none does, the nodes most circuits use, and, at edge level,
where a shared head is read differently. The HTML report and results.md both lead with it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from reuse_lens.compare._sets import sorted_nodes
from reuse_lens.separation import MIN_EFFECT

if TYPE_CHECKING:
    from reuse_lens.compare.edges import EdgeOverlapReport
    from reuse_lens.compare.overlap import Kind, OverlapReport
    from reuse_lens.separation import Separation

__all__ = ["CORRECTION_NAMES", "answer", "node_counts", "study_answer"]

CORRECTION_NAMES = {
    "holm": "Holm",
    "bh": "Benjamini-Hochberg",
    "bonferroni": "Bonferroni",
    "none": "no",
}
"""How sentences name each correction."""

_MOST_LISTED = 8  # nodes named in the "used by most circuits" sentence
_PAIRS_LISTED = 5  # significant pairs named in one sentence; the rest are counted


def answer(
    overlap: OverlapReport,
    edges: EdgeOverlapReport | None = None,
    *,
    alpha: float = 0.05,
) -> list[str]:
    """Plain sentences on what the circuits share and whether it beats chance.

    Arguments:
        overlap: the node overlap of the circuits (e.g. a study's ``task_overlap``).
        edges: their edge overlap, when edge circuits were compared.
        alpha: the level at which a corrected p-value counts as significant.

    Returns:
        Sentences, most important first; one sentence when there is no pair to compare.
    """
    n = len(overlap.names)
    if n < 2:
        return [f"Only one circuit ({', '.join(overlap.names)}): there is no pair to compare."]
    out = [_kind_sentence(overlap, "heads", alpha)]
    if beyond := _beyond_first_layer(overlap, alpha):
        out.append(beyond)
    if overlap.shape.has_mlps:
        out.append(_kind_sentence(overlap, "mlps", alpha))
    if most := _most_used(overlap):
        out.append(most)
    if edges is not None and len(edges.names) >= 2:
        out += _edge_sentences(edges, alpha)
    return out


def study_answer(
    overlap: OverlapReport | None,
    edges: EdgeOverlapReport | None = None,
    *,
    refused: Mapping[str, Separation] | None = None,
    base: str = "the base model",
    alpha: float = 0.05,
) -> list[str]:
    """The answer a study opens with, in its report, its results.md and on the terminal.

    Sentences, most important first: on the tasks (``answer``: which pairs share more
    heads and MLPs than chance, corrected p-values first, and plainly when no pair
    survives the correction), or, when fewer than two tasks had a circuit, that no tasks
    could be compared and why; then the tasks the models do not do, with their numbers.

    Arguments:
        overlap: the study's task overlap; None when fewer than two tasks had a circuit.
        edges: the edge overlap of the tasks' edge circuits, when compared.
        refused: the failed separation tests by ``model/task`` (``StudyResult.refused``).
        base: the base model's name, for sentences.
        alpha: the level at which a corrected p-value counts as significant.
    """
    refused = dict(refused or {})
    if overlap is not None:
        out = answer(overlap, edges, alpha=alpha)
    else:
        tasks = [key.split("/", 1)[1] for key in refused if key.startswith("base/")]
        out = [
            f"No tasks could be compared: fewer than two tasks had a circuit in {base}"
            + (f" ({', '.join(tasks)} refused: the model does not do them)." if tasks else ".")
        ]
    if refused:
        listed = "; ".join(
            f"{test.task} in {key.split('/', 1)[0]} ({test.brief()})"
            for key, test in refused.items()
        )
        out.append(
            "Refused, because the model does not do the task (the clean − corrupted gap's "
            f"95% interval must exclude 0 and the gap reach {MIN_EFFECT:g} spread of the "
            f"metric): {listed}."
        )
    return out


def node_counts(overlap: OverlapReport) -> dict[str, list[str]]:
    """``{node: [circuits using it]}`` for every node some circuit uses, in forward order."""
    used = sorted_nodes({node for name in overlap.names for node in overlap.nodes(name)})
    return {node: [name for name in overlap.names if node in overlap.nodes(name)] for node in used}


# ------------------------------------------------------------------- sentences


def _kind_sentence(overlap: OverlapReport, kind: Kind, alpha: float) -> str:
    word = "heads" if kind == "heads" else "MLPs"
    label = "Heads" if kind == "heads" else "MLPs"
    n_pairs = len(overlap.names) * (len(overlap.names) - 1) // 2
    pairs = "the pair" if n_pairs == 1 else f"the {n_pairs} pairs"
    how = _correction_phrase(overlap.correction, alpha)
    adjusted = overlap.adjusted_p_values(kind)
    tested = {pair: p for pair, p in adjusted.items() if not math.isnan(p)}
    if not tested:
        return f"{label}: no pair could be tested (the universe has no {word})."
    survivors = overlap.significant_pairs(kind, alpha)
    if survivors:
        listed = "; ".join(_pair_detail(overlap, a, b, kind) for a, b in survivors[:_PAIRS_LISTED])
        listed += _more(len(survivors))
        count = "one pair shares" if len(survivors) == 1 else f"{len(survivors)} pairs share"
        return f"{label}: of {pairs}, {count} more than chance {how}: {listed}."
    a, b = min(tested, key=lambda pair: (tested[pair], overlap.p_value(*pair, kind)))
    return (
        f"{label}: no pair of circuits shares more {word} than chance {how}, "
        f"across {pairs}. The strongest is {_pair_detail(overlap, a, b, kind)}."
    )


def _beyond_first_layer(overlap: OverlapReport, alpha: float) -> str | None:
    """Where pairs share more heads than chance and most of their shared heads are in layer
    0, the same test over the heads of the later layers.

    Layer 0's heads mix token identity and position for everything downstream, and many
    circuits hold them; a significant pair can rest on that alone. This says whether the
    overlap survives without it, with the same correction over the same pairs.
    """
    from reuse_lens.compare.overlap import compare_after_layer_0

    survivors = overlap.significant_pairs("heads", alpha)
    restricted = len(overlap.universe("all")) != len(overlap.shape.nodes())
    if not survivors or restricted or overlap.shape.n_layers < 2:
        return None
    shared = [overlap.shared(a, b, "heads") for a, b in survivors]
    first = sum(1 for nodes in shared for node in nodes if node.startswith("a0."))
    total = sum(len(nodes) for nodes in shared)
    if 2 * first <= total:
        return None
    rest = compare_after_layer_0(overlap.circuits, correction=overlap.correction)
    kept = [pair for pair in rest.significant_pairs("heads", alpha) if pair in survivors]
    head = (
        f"Most heads those pairs share are in layer 0 ({first} of {total}). Over the heads of "
        f"layers 1 to {overlap.shape.n_layers - 1} only, "
    )
    if kept:
        listed = "; ".join(_pair_detail(rest, a, b, "heads") for a, b in kept[:_PAIRS_LISTED])
        count = (
            "it still does"
            if len(survivors) == 1
            else f"{len(kept)} of those {len(survivors)} pairs still do"
        )
        return head + f"{count}: {listed}{_more(len(kept))}."
    tested = {pair: rest.p_value(*pair, "heads", corrected=True) for pair in survivors}
    a, b = min(tested, key=lambda pair: (math.isnan(tested[pair]), tested[pair]))
    if math.isnan(rest.jaccard(a, b, "heads")):
        return head + f"none still does: {a} and {b} hold no head there."
    return head + f"none still does; the strongest is {_pair_detail(rest, a, b, 'heads')}."


def _pair_detail(overlap: OverlapReport, a: str, b: str, kind: Kind) -> str:
    """A pair's shared nodes and Jaccard, its corrected p-value first (the one to read)."""
    shared = sorted_nodes(overlap.shared(a, b, kind))
    return (
        f"{a} and {b} (shared {', '.join(shared) or 'none'}; Jaccard "
        f"{overlap.jaccard(a, b, kind):.2f} against {overlap.expected_jaccard(a, b, kind):.2f} "
        f"by chance; corrected p = {_p(overlap.p_value(a, b, kind, corrected=True))}, "
        f"uncorrected {_p(overlap.p_value(a, b, kind))})"
    )


def _most_used(overlap: OverlapReport) -> str | None:
    """The nodes used by more than half of the circuits (all of them, for two circuits)."""
    n = len(overlap.names)
    counts = {node: len(users) for node, users in node_counts(overlap).items()}
    common = [node for node, k in counts.items() if k > n / 2 and k >= 2]
    if not common:
        return f"No head or MLP is used by more than half of the {n} circuits."
    common.sort(key=lambda node: -counts[node])  # stable: forward order within a count
    listed = ", ".join(f"{node} ({counts[node]} of {n})" for node in common[:_MOST_LISTED])
    more = f" and {len(common) - _MOST_LISTED} more" if len(common) > _MOST_LISTED else ""
    return f"Used by more than half of the {n} circuits: {listed}{more}."


def _edge_sentences(edges: EdgeOverlapReport, alpha: float) -> list[str]:
    how = _correction_phrase(edges.correction, alpha)
    survivors = edges.significant_pairs(alpha)
    n_pairs = len(edges.names) * (len(edges.names) - 1) // 2
    if survivors:
        listed = "; ".join(
            f"{a} and {b} (edge Jaccard {edges.jaccard(a, b):.2f} against "
            f"{edges.expected_jaccard(a, b):.2f} by chance, corrected p = "
            f"{_p(edges.p_value(a, b, corrected=True))})"
            for a, b in survivors[:_PAIRS_LISTED]
        ) + _more(len(survivors))
        first = (
            f"Edges: {_count_of(len(survivors), n_pairs)} share more edges "
            f"than random edge sets of their sizes {how}: {listed}."
        )
    else:
        across = "the pair" if n_pairs == 1 else f"the {n_pairs} pairs"
        first = (
            f"Edges: no pair of edge circuits shares more edges than random edge sets of "
            f"their sizes {how}, across {across}."
        )
    strict = edges.significant_pairs(alpha, "receivers")
    first += (
        f" Keeping which inputs each circuit reads and redrawing only their senders, "
        f"{len(strict)} of {n_pairs} pairs still do"
        + (f" ({', '.join(f'{a} and {b}' for a, b in strict[:_PAIRS_LISTED])}"
           f"{_more(len(strict)).replace('; and', ', and')})." if strict else ".")
    )  # fmt: skip
    other_inputs, other_senders, shared = 0, 0, 0
    examples: list[str] = []
    for a, b in itertools.combinations(edges.names, 2):
        usage = edges.head_usage(a, b)
        shared += sum(len(heads) for heads in usage.values())
        other_inputs += len(usage["other_inputs"])
        other_senders += len(usage["other_senders"])
        if usage["other_inputs"] and len(examples) < 3:
            head = usage["other_inputs"][0]
            examples.append(
                f"{head} in {a} ({_used(edges, a, head)}) and {b} ({_used(edges, b, head)})"
            )
    if shared == 0:
        return [first, "No head is fed by both circuits of any pair."]
    second = (
        f"Of {shared} (pair, head) cases where both circuits feed the same head, "
        f"{other_inputs} read it through other q/k/v inputs and {other_senders} through the "
        "same inputs from other senders"
    )
    second += f", e.g. {'; '.join(examples)}." if examples else "."
    return [first, second]


def _count_of(k: int, n_pairs: int) -> str:
    if n_pairs == 1:
        return "the two edge circuits"
    return f"{k} of {n_pairs} pairs of edge circuits"


def _more(n_listed: int) -> str:
    extra = n_listed - _PAIRS_LISTED
    return f"; and {extra} more" if extra > 0 else ""


def _used(edges: EdgeOverlapReport, name: str, head: str) -> str:
    return "+".join(put for put, senders in edges.inputs(name, head).items() if senders) or "none"


def _correction_phrase(correction: str, alpha: float) -> str:
    if correction == "none":
        return f"at p ≤ {alpha:g} (uncorrected)"
    return f"after {CORRECTION_NAMES.get(correction, correction)} correction (α = {alpha:g})"


def _p(value: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.1e}"
