"""The MIB circuit track's circuit file (Mueller et al. 2025), read and written.

MIB's files are what EAP-IG's ``Graph.to_json`` writes (Hanna et al. 2024): every node and
edge of the model with an ``in_graph`` flag, so that MIB's evaluation can read our circuits
and we can read theirs. Our own fields (stages, metadata, which edge scores are real) travel
in an extra ``"reuse_lens"`` block that MIB's loaders ignore. The format is described in
docs/circuit_format.md; ``Circuit.to_mib_json`` and ``Circuit.from_mib_json`` call this
module.

Like ``circuit.py``, this module imports neither torch nor TransformerLens.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from reuse_lens.circuits._checks import (
    CIRCUIT_FORMAT,
    CIRCUIT_FORMAT_VERSION,
    CircuitError,
    as_shape,
    check_edge,
    check_node,
    count_field,
    edge_key,
    node_ends,
    require,
    write_atomic,
)
from reuse_lens.nodes import Edge, ModelShape, edges_of

if TYPE_CHECKING:
    from collections.abc import Iterable

    from reuse_lens.circuits.circuit import Circuit

__all__ = [
    "MIB_EVALUATION",
    "MIB_SIGN",
    "ScoreSign",
    "mib_fields",
    "prune_edges",
    "to_mib_dict",
    "to_mib_json",
]

_MIB_EXTRA = "reuse_lens"  # our block inside a MIB file; MIB's loaders read only cfg/nodes/edges

ScoreSign = Literal["mib", "reuse_lens"]
"""Which way a file's scores point. ``"reuse_lens"``: the metric change when the node or
edge is noised, so an important component of a higher-is-better metric scores negative.
``"mib"``: the opposite sign, EAP-IG's (it differentiates a loss, the negated metric), so
important components score positive, as MIB's evaluation expects when it ranks by signed
score (without ``--absolute``)."""

MIB_SIGN: ScoreSign = "mib"
"""The sign MIB files are written in by default: MIB's own."""

_SIGNS = ("mib", "reuse_lens")


def _check_sign(sign: object) -> ScoreSign:
    if sign not in _SIGNS:
        raise CircuitError(
            f"unknown score sign {sign!r}: choose 'mib' (positive = important, MIB's and "
            "EAP-IG's convention) or 'reuse_lens' (the metric change when noised)"
        )
    return sign  # type: ignore[return-value]


def _signed(value: float, flip: bool) -> float:
    """``value`` with its sign flipped when ``flip``; 0.0 stays 0.0 (never ``-0.0``)."""
    return -value if flip and value else value


def to_mib_dict(
    circuit: Circuit, *, d_model: int | None = None, sign: ScoreSign = MIB_SIGN
) -> dict[str, Any]:
    """``circuit`` as a MIB circuit-track graph: every node and edge, with ``in_graph``.

    Edge scores come from ``edge_scores``; edges without one get 0.0, as EAP-IG's graphs
    start from zeros and MIB's loaders expect a number (``scored_edges`` in our block says
    which are real). A node-level circuit marks its nodes and every edge among them and
    ``input``/``logits`` (all three q/k/v inputs). ``d_model`` (which MIB reads only for
    neuron-level circuits) comes from the argument, else ``metadata["d_model"]``, else the
    cfg of a MIB file the circuit was read from, else 0.

    ``sign="mib"`` (the default) writes node and edge scores with MIB's sign, positive =
    important for the metric, so that MIB's signed ranking (without ``--absolute``) puts
    them first; with ``--absolute`` MIB ranks by |score| as ``faithfulness_curve`` does.
    ``sign="reuse_lens"`` writes them as the circuit holds them. Our block records which.
    """
    if circuit.shape.experts:
        raise CircuitError(
            "MIB's circuit format has one node per MLP and no experts: this circuit has "
            "expert nodes (m3.e5); save it with to_json, or find it with experts=False"
        )
    flip = _check_sign(sign) == "mib"
    kept = circuit.nodes | {"input", "logits"}
    all_edges = edges_of(circuit.shape)
    keys = [edge_key(e) for e in all_edges]
    # An edge circuit marks its edges; so does an empty one recorded as edge-level (the
    # smallest circuit of a MIB submission), which must not become the node rule's graph.
    if circuit.edges or circuit.metadata.get("level") == "edge":
        in_graph = [key in circuit.edges for key in keys]
    else:
        in_graph = [e.sender.name in kept and e.receiver.name in kept for e in all_edges]
    from_input = (g for k, g in zip(keys, in_graph, strict=True) if k[0] == "input")
    nodes: dict[str, dict[str, Any]] = {"input": {"in_graph": any(from_input)}}
    for node in circuit.shape.nodes():
        nodes[node.name] = {"in_graph": node.name in circuit.nodes}
        if node.name in circuit.node_scores:
            nodes[node.name]["score"] = _signed(circuit.node_scores[node.name], flip)
    nodes["logits"] = {"in_graph": True}  # MIB's logits node is always in the graph
    edges = {
        f"{s}->{r}": {"score": _signed(circuit.edge_scores.get((s, r), 0.0), flip), "in_graph": g}
        for (s, r), g in zip(keys, in_graph, strict=True)
    }
    scored: str | list[str] = (
        "all"
        if len(circuit.edge_scores) == len(keys)
        else [f"{s}->{r}" for s, r in circuit.edge_scores]
    )
    extra = {
        "format_version": CIRCUIT_FORMAT_VERSION,
        "level": circuit.level,
        "scored_edges": scored,
        "score_sign": sign,
        "stages": dict(circuit.stages),
        "metadata": dict(circuit.metadata),
    }
    cfg = {
        "n_layers": circuit.shape.n_layers,
        "n_heads": circuit.shape.n_heads,
        "parallel_attn_mlp": circuit.shape.parallel,
        "d_model": _d_model(circuit, d_model),
        "attn_only": not circuit.shape.has_mlps,
    }
    return {"cfg": cfg, "nodes": nodes, "edges": edges, _MIB_EXTRA: extra}


def _d_model(circuit: Circuit, d_model: int | None) -> int:
    if d_model is not None:
        return int(d_model)
    mib_cfg = circuit.metadata.get("mib_cfg")
    for value in (
        circuit.metadata.get("d_model"),
        mib_cfg.get("d_model") if isinstance(mib_cfg, dict) else None,
    ):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def to_mib_json(
    circuit: Circuit,
    path: str | os.PathLike[str] | None = None,
    *,
    d_model: int | None = None,
    sign: ScoreSign = MIB_SIGN,
) -> str:
    """``circuit`` as MIB circuit-track JSON (see ``to_mib_dict``); written atomically."""
    text = json.dumps(to_mib_dict(circuit, d_model=d_model, sign=sign), allow_nan=False)
    if path is not None:
        write_atomic(Path(path), text)
    return text


MIB_EVALUATION: dict[str, Any] = {
    "input_node": "tokens",
    "sizes": "mib",
    "prune": True,
    "mean_positions": "padded",
    "node_empty": "edges",
}
"""The options under which ``faithfulness_curve`` computes what MIB's evaluation computes
(EAP-IG's ``evaluate_graph`` inside MIB's ``evaluate_area_under_curve``), for
``faithfulness_curve(model, task, scores, ablation=..., **MIB_EVALUATION)``:
``input`` is the token embedding alone, a fraction ``p`` keeps ``int(p · N)`` edges, edges
off every input-to-logits path are ablated, and ``mean`` ablation averages padded
positions in. ``faithfulness`` and ``CircuitEvaluator`` take the same options but
``sizes``. docs/circuit_format.md gives the measured agreement."""


def prune_edges(edges: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The edges that EAP-IG's ``Graph.prune`` keeps, which MIB's evaluation runs.

    Repeatedly drops every node without a kept outgoing edge or (but ``input``) without a
    kept incoming edge, and every edge whose sender or receiving node was dropped
    (``logits`` always stays), until nothing changes. What is left lies on a path from
    ``input`` to ``logits``. Edges are (sender, receiver) pairs as in ``Circuit.edges``
    (receivers of heads as ``a1.h2<q>``); their order is kept.

    Under ``resample`` ablation pruning changes no number: a node whose inputs are all
    ablated computes its corrupted output, which is its ablated value. Under ``mean`` and
    ``zero`` ablation it does: such a node computes from ablated inputs, not the mean (or
    zero) of its output, and MIB ablates its edges.
    """
    kept = list(dict.fromkeys((str(s), str(r)) for s, r in edges))

    def node_of(receiver: str) -> str:
        return receiver.split("<", 1)[0]

    while True:
        senders = {s for s, _ in kept}
        fed = {node_of(r) for _, r in kept} | {"input"}
        alive = senders & fed
        pruned = [(s, r) for s, r in kept if s in alive and (r == "logits" or node_of(r) in alive)]
        if len(pruned) == len(kept):
            return pruned
        kept = pruned


def mib_fields(
    doc: object,
    shape: ModelShape | Any | None = None,
    *,
    source: str = "the MIB document",
    sign: ScoreSign | None = None,
) -> dict[str, Any]:
    """The Circuit fields (constructor keywords) of a parsed MIB circuit-track document.

    The circuit is what the document marks ``in_graph``: the edges, and the heads and MLPs
    marked or at an in-graph edge's end. A document that marks only nodes gives a node-level
    circuit. ``shape``, when given, must agree with the document's cfg. The caller builds
    the Circuit, so that ``Circuit.from_mib_dict`` keeps building its own class.

    Scores come back in reuse_lens's sign. ``sign`` is the sign the document's scores are
    in; by default the one our block records, else ``"reuse_lens"`` for a file of ours
    that predates the record, else ``"mib"`` (a file MIB's or EAP-IG's tools wrote).
    """
    data: dict[str, Any] = require(doc, dict, "the document", source)
    if data.get("format") == CIRCUIT_FORMAT:
        raise CircuitError(f"{source} is in reuse_lens's own format: use Circuit.from_json")
    cfg = require(data.get("cfg"), dict, "'cfg'", source)
    node_infos = require(data.get("nodes"), dict, "'nodes'", source)
    edge_infos = require(data.get("edges"), dict, "'edges'", source)
    extra = data.get(_MIB_EXTRA)
    extra = extra if isinstance(extra, dict) else None
    shape = _mib_shape(cfg, node_infos, shape, source)
    if sign is None:
        recorded = extra.get("score_sign", "reuse_lens") if extra else "mib"
        sign = _check_sign(recorded)
    flip = _check_sign(sign) == "mib"

    nodes: set[str] = set()
    node_scores: dict[str, float] = {}
    for name, info in node_infos.items():
        if name in ("input", "logits"):
            continue
        info = require(info, dict, f"'nodes'[{name!r}]", source)
        node = check_node(name, shape, f"node in {source}").name
        if _flag(info, f"'nodes'[{name!r}]", source):
            nodes.add(node)
        if _is_number(info.get("score")):  # NaN marks an unscored node in EAP-IG
            node_scores[node] = _signed(float(info["score"]), flip)
        if isinstance(info.get("neurons"), list) and not all(info["neurons"]):
            warnings.warn(
                f"{source}: node {name} keeps only some neurons; reuse_lens circuits are "
                "node-level, so the whole node is read as in_graph",
                UserWarning,
                stacklevel=4,  # past this function and Circuit.from_mib_dict/from_mib_json
            )

    edges: set[Edge] = set()  # Edge objects, so that the constructor need not re-parse
    edge_scores: dict[Edge, float] = {}
    for name, info in edge_infos.items():
        info = require(info, dict, f"'edges'[{name!r}]", source)
        edge = check_edge(name, shape, f"edge in {source}")
        if _flag(info, f"'edges'[{name!r}]", source):
            edges.add(edge)
        if _is_number(info.get("score")):
            edge_scores[edge] = _signed(float(info["score"]), flip)
    edge_scores = _known_edge_scores(edge_scores, extra, shape, source)

    if extra and extra.get("level") == "node":  # from a node circuit: its edges were implied
        edges = set()
    return {
        "nodes": frozenset(nodes | node_ends(edges)),
        "shape": shape,
        "edges": frozenset(edges),  # Edges are canonicalised to key tuples by the Circuit
        "node_scores": node_scores,
        "edge_scores": edge_scores,
        **_mib_rest(extra, cfg),
    }


def _mib_shape(
    cfg: dict[str, Any], node_infos: dict[str, Any], shape: object, source: str
) -> ModelShape:
    """The shape a MIB file describes, checked against ``shape`` when one is given."""
    n_layers = count_field(cfg.get("n_layers"), "'cfg.n_layers'", source)
    n_heads = count_field(cfg.get("n_heads"), "'cfg.n_heads'", source)
    stated = "attn_only" in cfg  # our files say so; MIB's own graphs always have MLPs
    has_mlps = not cfg["attn_only"] if stated else any(n.startswith("m") for n in node_infos)
    # EAP-IG builds its edge graph from this flag (no MLP edges from the same layer's heads).
    parallel = cfg.get("parallel_attn_mlp", False)
    if not isinstance(parallel, bool):
        raise CircuitError(f"{source}: 'cfg.parallel_attn_mlp' must be true or false")
    if shape is None:
        return ModelShape(n_layers, n_heads, bool(has_mlps), parallel)
    given = as_shape(shape)
    if (
        (given.n_layers, given.n_heads) != (n_layers, n_heads)
        or (stated and given.has_mlps != has_mlps)
        or given.parallel != parallel
    ):
        raise CircuitError(
            f"{source} describes a model of {n_layers} layers x {n_heads} heads"
            f"{'' if has_mlps else ' (attention-only)'}{' (parallel)' if parallel else ''}, "
            f"but the shape given is {given.n_layers} x {given.n_heads}"
            f"{'' if given.has_mlps else ' (attention-only)'}"
            f"{' (parallel)' if given.parallel else ''}"
        )
    return given


def _flag(info: dict[str, Any], what: str, source: str) -> bool:
    value = info.get("in_graph")
    if value not in (True, False):  # also accepts 0 and 1
        raise CircuitError(f"{source}: {what}.in_graph must be true or false, got {value!r}")
    return bool(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _known_edge_scores(
    scores: dict[Edge, float], extra: dict[str, Any] | None, shape: ModelShape, source: str
) -> dict[Edge, float]:
    """The edge scores that are real, not MIB's 0.0 placeholders."""
    scored = extra.get("scored_edges") if extra else None
    if scored == "all":
        return scores
    if isinstance(scored, list):
        wanted = {check_edge(name, shape, f"scored edge in {source}") for name in scored}
        return {edge: value for edge, value in scores.items() if edge in wanted}
    # a plain MIB file: all zeros means unscored (EAP-IG's graphs start from zeros)
    return scores if any(v != 0.0 for v in scores.values()) else {}


def _mib_rest(extra: dict[str, Any] | None, cfg: dict[str, Any]) -> dict[str, Any]:
    """Stages and metadata: ours when the file has our block, else a note of MIB's cfg."""
    if extra is None:
        return {"metadata": {"source_format": "mib", "mib_cfg": cfg}}
    return {"stages": extra.get("stages") or {}, "metadata": extra.get("metadata") or {}}
