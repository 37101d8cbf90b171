"""Circuit: the heads, MLPs and edges a task uses, and the two files it is saved as.

A circuit belongs to one model shape (layers, heads, MLPs) and is checked against it when
it is made, so a circuit that exists is valid. It is frozen: its mappings are read-only
copies, and two circuits are equal when their content is.

Two JSON formats (both described in docs/circuit_format.md):

- ours, ``{"format": "reuse_lens.circuit", "format_version": 1, ...}``, which keeps
  everything: scores, path-patching stages and metadata;
- the MIB circuit track's (Mueller et al. 2025), as written by EAP-IG's ``Graph.to_json``
  (Hanna et al. 2024): every node and edge of the model with an ``in_graph`` flag, so MIB's
  evaluation can read our circuits and we can read theirs. It lives in
  ``reuse_lens.circuits.mib``, which the ``Circuit.*mib*`` methods call.

This module imports neither torch nor TransformerLens: circuits can be read without a model.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from reuse_lens.circuits import mib
from reuse_lens.circuits._checks import (
    CIRCUIT_FORMAT,
    CIRCUIT_FORMAT_VERSION,
    CircuitError,
    EdgeKey,
    as_shape,
    check_edge,
    check_node,
    count_field,
    edge_ends,
    edge_key,
    edge_ranks,
    node_ends,
    require,
    write_atomic,
)
from reuse_lens.nodes import (
    Edge,
    Endpoint,
    Expert,
    ModelShape,
    Node,
    NodeNameError,
    forward_order,
    parse_edge,
    parse_node,
)

__all__ = ["CIRCUIT_FORMAT", "CIRCUIT_FORMAT_VERSION", "Circuit", "CircuitError"]

EdgeLike = tuple[str, str] | Edge | str
"""Anything that names an edge: a key tuple, an Edge, or a name like ``"a0.h1->a2.h3<q>"``."""

# --- names, order and validation ---------------------------------------------------------


def _node_order(node: Endpoint) -> tuple[int, int, int]:
    """Forward order: ``input``, then each layer's heads and MLP, then ``logits``."""
    return forward_order(node)


def _edge_order(edge: Edge) -> tuple[tuple[int, int, int], int, tuple[int, int, int]]:
    """The order of ``nodes.edges_of``: by receiver, then its q/k/v input, then sender."""
    qkv = "qkv".index(edge.receiver_input) if edge.receiver_input else 0
    return (_node_order(edge.receiver), qkv, _node_order(edge.sender))


def _sorted_nodes(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda name: _node_order(parse_node(name)))


def _sorted_edges(keys: Iterable[EdgeKey]) -> list[EdgeKey]:
    return sorted(keys, key=lambda key: _edge_order(parse_edge(f"{key[0]}->{key[1]}")))


def _collection(value: object, name: str) -> Iterable[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise CircuitError(
            f"{name} must be a collection of names, got {type(value).__name__} {value!r}"
        )
    return value


def _score(value: object, what: str) -> float:
    if isinstance(value, bool | str | bytes) or value is None:
        raise CircuitError(f"{what} is {value!r}: scores must be numbers")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise CircuitError(f"{what} is {value!r}: scores must be numbers") from error
    if not math.isfinite(number):
        raise CircuitError(f"{what} is {number}: scores must be finite numbers")
    return number


def _stage(value: object, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        stage = operator.index(value)  # type: ignore[arg-type]
    except TypeError as error:
        raise CircuitError(f"{what} is {value!r}: stages are whole numbers") from error
    if stage < 0:
        raise CircuitError(f"{what} is {stage}: stages start at 0 (direct senders to logits)")
    return stage


def _unserialisable(value: object, path: str) -> str | None:
    """Where in ``value`` JSON fails: ``"metadata['a'][0] is a set"``, or None."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value} (JSON has no NaN or inf)"
    if isinstance(value, list | tuple):
        return next(
            (f for i, v in enumerate(value) if (f := _unserialisable(v, f"{path}[{i}]"))), None
        )
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{path} has the key {k!r} of type {type(k).__name__} (keys must be str)"
            if found := _unserialisable(v, f"{path}[{k!r}]"):
                return found
        return None
    return f"{path} is a {type(value).__name__}: {value!r}"


def _json_copy(metadata: object) -> dict[str, Any]:
    """A deep copy of ``metadata`` in its JSON form, or a CircuitError saying what is not JSON."""
    if not isinstance(metadata, Mapping):
        raise CircuitError(f"metadata must be a mapping, got {type(metadata).__name__}")
    if problem := _unserialisable(metadata, "metadata"):
        raise CircuitError(
            f"metadata must be JSON-serialisable (str-keyed dicts, lists, str, int, finite "
            f"float, bool, None), but {problem}; convert it first, e.g. with str(), float() "
            "or .tolist()"
        )
    return json.loads(json.dumps(dict(metadata), allow_nan=False))


def _with_width(shape: object, metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    """``metadata`` with the model's ``d_model`` when ``shape`` is a model, not a ModelShape.

    A MIB file records the width of its model; a circuit built from a model knows it,
    and one built from a ModelShape alone does not (its MIB files then write 0).
    """
    cfg = getattr(shape, "cfg", None)
    width = getattr(cfg, "d_model", None)
    if (
        isinstance(shape, ModelShape)
        or not isinstance(metadata, Mapping)
        or "d_model" in metadata
        or not isinstance(width, int)
    ):
        return metadata
    return {**metadata, "d_model": int(width)}


def _frozen(mapping: dict[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(mapping)


# --- the circuit -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Circuit:
    """A set of heads and MLPs (and, for edge-level methods, edges) of one model.

    Attributes:
        nodes: head names ``a{layer}.h{head}`` and MLP names ``m{layer}``; never
            ``input``/``logits``, which every path has anyway.
        shape: the layers, heads and MLPs of the model the circuit belongs to.
        edges: ``(sender, receiver_name)`` pairs such as ``("a0.h1", "a2.h3<q>")``,
            ``("input", "m0")``, ``("m1", "logits")``; empty for node-level circuits. Every
            head or MLP at an edge's end is in ``nodes``.
        node_scores: read-only scores by node name; may cover every scored node of the
            model, not only the circuit's, so that the circuit can be re-thresholded.
        edge_scores: likewise, keyed like ``edges``.
        stages: the path-patching stage of circuit nodes (0 = direct senders to the logits).
        metadata: read-only, JSON-serialisable record of how the circuit was made (model,
            task, method, settings, seed, library version, ...), stored in its JSON form.

    Names are canonicalised (``" a0.h1"`` becomes ``"a0.h1"``; Edge objects and edge names
    become key tuples) and checked against ``shape``; anything invalid raises CircuitError.
    """

    nodes: frozenset[str]
    shape: ModelShape
    edges: frozenset[EdgeKey] = frozenset()
    node_scores: Mapping[str, float] = field(default_factory=dict)
    edge_scores: Mapping[EdgeKey, float] = field(default_factory=dict)
    stages: Mapping[str, int] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        metadata = _with_width(self.shape, self.metadata)
        shape = as_shape(self.shape)
        nodes = frozenset(check_node(n, shape).name for n in _collection(self.nodes, "nodes"))
        parsed = [check_edge(e, shape) for e in _collection(self.edges, "edges")]
        edges = frozenset(edge_key(e) for e in parsed)
        loose = _sorted_nodes(node_ends(parsed) - nodes)
        if loose:
            raise CircuitError(
                f"edges end at nodes that are not in the circuit: {', '.join(loose[:8])}"
                f"{' ...' if len(loose) > 8 else ''}; add them to nodes, or build the circuit "
                "with Circuit.from_edges, which derives the nodes from the edges"
            )
        node_scores = {
            check_node(k, shape, "node_scores key").name: _score(v, f"node_scores[{k!r}]")
            for k, v in self._mapping(self.node_scores, "node_scores").items()
        }
        given = self._mapping(self.edge_scores, "edge_scores")
        scored_edges = [  # parsed once, for both the check and the order
            (check_edge(k, shape, "edge_scores key"), _score(v, f"edge_scores[{k!r}]"))
            for k, v in given.items()
        ]
        ranks = {} if shape.experts else edge_ranks(shape)
        if all(k in ranks for k in given):  # keys of the graph: its order, looked up
            order = [ranks[k] for k in given]
            scored_edges = [
                scored_edges[i] for i in sorted(range(len(order)), key=order.__getitem__)
            ]
        else:
            scored_edges.sort(key=lambda pair: _edge_order(pair[0]))
        stages = {
            check_node(k, shape, "stages key").name: _stage(v, f"stages[{k!r}]")
            for k, v in self._mapping(self.stages, "stages").items()
        }
        if outside := sorted(set(stages) - nodes):
            raise CircuitError(
                f"stages are given for nodes outside the circuit: {', '.join(outside)}; "
                "stages describe circuit nodes only"
            )
        values = {
            "shape": shape,
            "nodes": nodes,
            "edges": edges,
            "node_scores": _frozen({k: node_scores[k] for k in _sorted_nodes(node_scores)}),
            "edge_scores": _frozen({edge_key(e): v for e, v in scored_edges}),
            "stages": _frozen({k: stages[k] for k in _sorted_nodes(stages)}),
            "metadata": _frozen(_json_copy(metadata)),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @staticmethod
    def _mapping(value: object, name: str) -> Mapping[Any, Any]:
        if not isinstance(value, Mapping):
            raise CircuitError(f"{name} must be a mapping, got {type(value).__name__}")
        return value

    # --- construction ---

    @classmethod
    def from_nodes(
        cls, names: Iterable[str | Node], shape: ModelShape | Any, **kwargs: Any
    ) -> Circuit:
        """A circuit of the named heads and MLPs; ``kwargs`` are the other fields.

        Given a model for ``shape``, its width is kept as ``metadata["d_model"]`` (which
        MIB files record), as with every way of building a circuit from a model.
        """
        kwargs["metadata"] = _with_width(shape, kwargs.get("metadata") or {})
        names = list(_collection(names, "names"))
        shape = as_shape(shape, experts=_names_experts(names))
        nodes = frozenset(check_node(n, shape).name for n in names)
        return cls(nodes=nodes, shape=shape, **kwargs)

    @classmethod
    def from_edges(
        cls, edges: Iterable[EdgeLike], shape: ModelShape | Any, **kwargs: Any
    ) -> Circuit:
        """A circuit of ``edges``, whose nodes are the heads and MLPs at the edges' ends
        (a model for ``shape`` records its ``d_model``, as in ``from_nodes``)."""
        kwargs["metadata"] = _with_width(shape, kwargs.get("metadata") or {})
        shape = as_shape(shape)
        parsed = [check_edge(e, shape) for e in _collection(edges, "edges")]
        keys = frozenset(edge_key(e) for e in parsed)
        return cls(nodes=frozenset(node_ends(parsed)), shape=shape, edges=keys, **kwargs)

    def with_metadata(self, **updates: Any) -> Circuit:
        """The same circuit with ``updates`` merged into its metadata.

        Only the metadata is checked again: the rest was checked when this circuit was
        made, and checking the scores of every edge again costs a discovery of GPT-2
        small's 32,000 edges seconds.
        """
        circuit = object.__new__(Circuit)
        for name, value in vars(self).items():  # the checked, frozen fields as they are
            object.__setattr__(circuit, name, value)
        metadata = _frozen(_json_copy({**self.metadata, **updates}))
        object.__setattr__(circuit, "metadata", metadata)
        return circuit

    # --- derived views ---

    @property
    def heads(self) -> frozenset[str]:
        """The attention heads among the nodes."""
        return frozenset(n for n in self.nodes if n.startswith("a"))

    @property
    def mlps(self) -> frozenset[str]:
        """The MLPs among the nodes (and the experts, in a circuit of expert nodes)."""
        return frozenset(n for n in self.nodes if n.startswith("m"))

    @property
    def level(self) -> Literal["node", "edge"]:
        """How the circuit is ablated: ``metadata["level"]`` when set, else ``"edge"`` when it
        has edges and ``"node"`` when not.

        Path-patching circuits record ``"node"``: their edges name the input each sender was
        found through, possibly by way of MLPs, so they are paths, not a complete edge graph.
        """
        recorded = self.metadata.get("level")
        if recorded in ("node", "edge") and (recorded == "node" or self.edges):
            return recorded
        return "edge" if self.edges else "node"

    def nodes_in_order(self) -> list[str]:
        """The nodes in forward order (a layer's heads, then its MLP)."""
        return _sorted_nodes(self.nodes)

    def edges_in_order(self) -> list[EdgeKey]:
        """The edges in ``reuse_lens.nodes.edges_of`` order."""
        return _sorted_edges(self.edges)

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, item: object) -> bool:
        """Node membership for node names and Nodes; edge membership for edges."""
        try:
            if isinstance(item, Edge | tuple) or (isinstance(item, str) and "->" in item):
                return edge_key(check_edge(item, self.shape)) in self.edges
            return check_node(item, self.shape).name in self.nodes
        except CircuitError:
            return False

    def _content(self) -> tuple[Any, ...]:
        return (
            self.nodes,
            self.edges,
            self.shape,
            dict(self.node_scores),
            dict(self.edge_scores),
            dict(self.stages),
            dict(self.metadata),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Circuit):
            return NotImplemented
        return self._content() == other._content()

    def __hash__(self) -> int:
        # mappings are left out (metadata holds dicts); equal circuits still hash equal
        return hash((self.nodes, self.edges, self.shape))

    def __reduce__(self) -> tuple[Any, ...]:
        # MappingProxyType cannot be pickled or deep-copied: rebuild from plain dicts
        return (Circuit, (self.nodes, self.shape, self.edges, *self._content()[3:]))

    def __repr__(self) -> str:
        shown = self.nodes_in_order()
        names = ", ".join(shown[:6]) + (", ..." if len(shown) > 6 else "")
        mlps = "MLPs" if self.shape.has_mlps else "no MLPs"
        mlps += " split into experts" if self.shape.experts else ""
        task = f", task={self.metadata['task']!r}" if "task" in self.metadata else ""
        return (
            f"Circuit({self.level}, {len(self.nodes)} nodes [{names}], {len(self.edges)} "
            f"edges, model {self.shape.n_layers} layers x {self.shape.n_heads} heads, "
            f"{mlps}{task})"
        )

    def check(self, model_or_shape: ModelShape | Any) -> None:
        """Raise CircuitError naming the circuit's nodes that ``model_or_shape`` lacks.

        Edges need no check of their own: whether an edge exists depends only on its ends'
        layers, so a model that has both ends has the edge.
        """
        other = as_shape(model_or_shape, experts=bool(self.shape.experts))
        missing = []
        for name in self.nodes_in_order():
            try:
                other.check(parse_node(name))
            except NodeNameError:
                missing.append(name)
        if missing:
            mlps = "with MLPs" if other.has_mlps else "attention-only"
            raise CircuitError(
                f"the model lacks {len(missing)} of the circuit's {len(self.nodes)} nodes: "
                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; it has "
                f"{other.n_layers} layers of {other.n_heads} heads ({mlps}), the circuit's "
                f"model {self.shape.n_layers} layers of {self.shape.n_heads} heads"
            )
        absent = [
            f"{s}->{r}" for s, r in self.edges_in_order() if not other.feeds(*edge_ends(s, r))
        ]
        if absent:
            raise CircuitError(
                f"the model's residual graph lacks {len(absent)} of the circuit's edges "
                f"({', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}): its attention "
                f"and MLP run {'in parallel' if other.parallel else 'one after the other'}, "
                "unlike the circuit's model"
            )

    # --- our format ---

    def to_dict(self) -> dict[str, Any]:
        """The circuit as our file's JSON document (see docs/circuit_format.md)."""
        return {
            "format": CIRCUIT_FORMAT,
            "format_version": CIRCUIT_FORMAT_VERSION,
            "shape": _shape_dict(self.shape),
            "nodes": self.nodes_in_order(),
            "edges": [list(key) for key in self.edges_in_order()],
            "node_scores": dict(self.node_scores),
            "edge_scores": {f"{s}->{r}": v for (s, r), v in self.edge_scores.items()},
            "stages": dict(self.stages),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, doc: object, *, source: str = "the circuit document") -> Circuit:
        """Read our JSON document; CircuitError names a missing or garbled field."""
        data: dict[str, Any] = require(doc, dict, "the document", source)
        fmt = data.get("format")
        if fmt != CIRCUIT_FORMAT:
            hint = " (it looks like a MIB file: use Circuit.from_mib_json)" if "cfg" in data else ""
            raise CircuitError(
                f"{source} is not a reuse_lens circuit: its 'format' is {fmt!r}, expected "
                f"{CIRCUIT_FORMAT!r}{hint}"
            )
        version = data.get("format_version")
        if version is None:
            raise CircuitError(
                f"{source} lacks the field 'format_version' (this reuse_lens reads "
                f"format_version {CIRCUIT_FORMAT_VERSION})"
            )
        if type(version) is not int or version != CIRCUIT_FORMAT_VERSION:
            raise CircuitError(
                f"{source} has format_version {version!r}, but this reuse_lens reads "
                f"format_version {CIRCUIT_FORMAT_VERSION} only; a file from a newer "
                "reuse_lens needs that newer version to read it"
            )
        shape = _shape_from(require(data.get("shape"), dict, "'shape'", source), source)
        nodes = require(data.get("nodes"), list, "'nodes'", source)
        edges = require(data.get("edges", []), list, "'edges'", source)
        for pair in edges:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise CircuitError(
                    f"{source}: 'edges' holds {pair!r}; each edge is [sender, receiver], "
                    'e.g. ["a0.h1", "a2.h3<q>"]'
                )
        return cls(
            nodes=frozenset(nodes),
            shape=shape,
            edges=frozenset(tuple(pair) for pair in edges),
            node_scores=require(data.get("node_scores", {}), dict, "'node_scores'", source),
            edge_scores=require(data.get("edge_scores", {}), dict, "'edge_scores'", source),
            stages=require(data.get("stages", {}), dict, "'stages'", source),
            metadata=require(data.get("metadata", {}), dict, "'metadata'", source),
        )

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The circuit as our JSON text; written atomically to ``path`` when given."""
        text = _render(self.to_dict())
        if path is not None:
            write_atomic(Path(path), text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike[str]) -> Circuit:
        """Read our format from a file path or from the JSON text itself."""
        doc, source = _load(path_or_text)
        return cls.from_dict(doc, source=source)

    # --- MIB's format (reuse_lens.circuits.mib) ---

    def to_mib_dict(
        self, *, d_model: int | None = None, sign: mib.ScoreSign = mib.MIB_SIGN
    ) -> dict[str, Any]:
        """The circuit as a MIB circuit-track graph: every node and edge, with ``in_graph``.

        Scores are written with MIB's sign (positive = important) unless
        ``sign="reuse_lens"``. See ``reuse_lens.circuits.mib.to_mib_dict`` for the scores
        and ``d_model`` it writes; a circuit of expert nodes has no MIB graph.
        """
        return mib.to_mib_dict(self, d_model=d_model, sign=sign)

    def to_mib_json(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        d_model: int | None = None,
        sign: mib.ScoreSign = mib.MIB_SIGN,
    ) -> str:
        """The circuit as MIB circuit-track JSON (see ``to_mib_dict``); written atomically."""

        return mib.to_mib_json(self, path, d_model=d_model, sign=sign)

    @classmethod
    def from_mib_json(
        cls,
        path_or_text: str | os.PathLike[str],
        shape: ModelShape | Any | None = None,
        *,
        sign: mib.ScoreSign | None = None,
    ) -> Circuit:
        """Read a MIB circuit-track graph (a file path or the JSON text).

        The circuit is what the file marks ``in_graph``: the edges, and the heads and MLPs
        marked or at an in-graph edge's end. A file that marks only nodes gives a node-level
        circuit. ``shape``, when given, must agree with the file's cfg. Scores come back in
        reuse_lens's sign; ``sign`` says which sign the file is in when our block does not
        (a file from MIB's own tools is ``"mib"``, the default for such files).
        """
        doc, source = _load(path_or_text)
        return cls.from_mib_dict(doc, shape, source=source, sign=sign)

    @classmethod
    def from_mib_dict(
        cls,
        doc: object,
        shape: ModelShape | Any | None = None,
        *,
        source: str = "the MIB document",
        sign: mib.ScoreSign | None = None,
    ) -> Circuit:
        """Read a parsed MIB circuit-track document; see ``from_mib_json``."""

        return cls(**mib.mib_fields(doc, shape, source=source, sign=sign))

    def to_mib_pt(
        self,
        path: str | os.PathLike[str],
        *,
        d_model: int | None = None,
        sign: mib.ScoreSign = mib.MIB_SIGN,
    ) -> Path:
        """Write the circuit as a MIB ``.pt`` file (EAP-IG's ``Graph.to_pt``); needs torch.

        See ``reuse_lens.circuits.mib_pt``; the content is that of ``to_mib_json``.
        """
        from reuse_lens.circuits import mib_pt  # imports torch, which circuit.py does not

        return mib_pt.to_mib_pt(self, path, d_model=d_model, sign=sign)

    @classmethod
    def from_mib_pt(
        cls,
        path: str | os.PathLike[str],
        shape: ModelShape | Any | None = None,
        *,
        sign: mib.ScoreSign | None = None,
    ) -> Circuit:
        """Read a MIB ``.pt`` circuit file (EAP-IG's ``Graph.from_pt`` form); needs torch.

        Read as ``from_mib_json`` reads the JSON form, with the same checks.
        """
        from reuse_lens.circuits import mib_pt

        return cls(**mib_pt.mib_pt_fields(path, shape, sign=sign))


# --- file helpers ------------------------------------------------------------------------


def _shape_dict(shape: ModelShape) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n_layers": shape.n_layers,
        "n_heads": shape.n_heads,
        "has_mlps": shape.has_mlps,
    }
    if shape.parallel:  # written only when true, so sequential models' files are unchanged
        out["parallel_attn_mlp"] = True
    if shape.experts:  # likewise only for circuits of expert nodes
        out["experts"] = list(shape.experts)
        out["shared_experts"] = list(shape.shared)
    return out


def _shape_from(doc: dict[str, Any], source: str) -> ModelShape:
    has_mlps = doc.get("has_mlps")
    if not isinstance(has_mlps, bool):
        raise CircuitError(f"{source}: 'shape.has_mlps' must be true or false, got {has_mlps!r}")
    parallel = doc.get("parallel_attn_mlp", False)
    if not isinstance(parallel, bool):
        raise CircuitError(
            f"{source}: 'shape.parallel_attn_mlp' must be true or false, got {parallel!r}"
        )
    n_layers = count_field(doc.get("n_layers"), "'shape.n_layers'", source)
    experts, shared = doc.get("experts", []), doc.get("shared_experts", [])
    if not (
        isinstance(experts, list)
        and isinstance(shared, list)
        and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in experts)
        and all(isinstance(s, bool) for s in shared)
        and len(experts) == len(shared) in (0, n_layers)
    ):
        raise CircuitError(
            f"{source}: 'shape.experts' and 'shape.shared_experts' must be lists of "
            f"{n_layers} expert counts and true/false, got {experts!r} and {shared!r}"
        )
    return ModelShape(
        n_layers=n_layers,
        n_heads=count_field(doc.get("n_heads"), "'shape.n_heads'", source),
        has_mlps=has_mlps,
        parallel=parallel,
        experts=tuple(experts),
        shared=tuple(shared),
    )


def _names_experts(names: list[Any]) -> bool:
    """Whether any of ``names`` is an expert node (``m3.e5``), so that a model given as
    the shape is read with its experts as nodes."""
    for name in names:
        try:
            if isinstance(parse_node(name), Expert):
                return True
        except (NodeNameError, TypeError):
            continue  # check_node names the bad one
    return False


def _load(path_or_text: object) -> tuple[Any, str]:
    """Parse JSON from a path or from the text itself; returns the document and its source."""
    if isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{"):
        text, source = path_or_text, "the JSON text"
    elif isinstance(path_or_text, str | os.PathLike):
        path = Path(path_or_text)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as error:
            raise CircuitError(f"no circuit file at {path}") from error
        except (OSError, UnicodeDecodeError) as error:
            raise CircuitError(f"cannot read the circuit file {path}: {error}") from error
    else:
        raise CircuitError(f"expected a file path or JSON text, got {type(path_or_text).__name__}")
    try:
        return json.loads(text), source
    except json.JSONDecodeError as error:
        raise CircuitError(f"{source} is not valid JSON: {error}") from error


def _render(doc: dict[str, Any]) -> str:
    """Our document as JSON that reads well and diffs well: one edge or score per line."""
    listed = ("edges", "node_scores", "edge_scores", "stages")
    lines = []
    for key, value in doc.items():
        if key in listed and value:
            items = (
                [json.dumps(v) for v in value]
                if isinstance(value, list)
                else [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
            )
            opening, closing = ("[", "]") if isinstance(value, list) else ("{", "}")
            body = ",\n".join(f"    {item}" for item in items)
            text = f"{opening}\n{body}\n  {closing}"
        else:
            text = json.dumps(value, indent=2 if key == "metadata" else None, allow_nan=False)
            text = text.replace("\n", "\n  ")
        lines.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"
