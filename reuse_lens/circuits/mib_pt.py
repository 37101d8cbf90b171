"""MIB's circuit files in their ``.pt`` form (EAP-IG's ``Graph.to_pt`` / ``Graph.from_pt``).

MIB's evaluation takes a circuit as JSON (``reuse_lens.circuits.mib``) or as a ``.pt`` file:
a ``torch.save``-d dict of the graph's matrices, far smaller than the JSON for big models.
The dict holds (docs/circuit_format.md has the full description):

- ``cfg``: ``n_layers``, ``n_heads``, ``parallel_attn_mlp``, ``d_model`` (and our
  ``attn_only``, which MIB ignores);
- ``src_nodes``: the senders in forward order, ``input``, then each layer's heads and MLP;
- ``dst_nodes``: the receivers, each layer's q inputs, k inputs, v inputs and MLP, then
  ``logits``;
- ``edges_scores`` (float) and ``edges_in_graph`` (bool), ``(len(src_nodes),
  len(dst_nodes))``, indexed by sender row and receiver column; a pair that is not an edge
  of the graph is 0.0 and False;
- ``nodes_in_graph`` (bool, one per sender) and, when any node is scored, ``nodes_scores``
  (NaN for an unscored node, as in EAP-IG);
- ``reuse_lens``: our block, as in the JSON form; MIB's loader ignores it.

The matrices always have MIB's layout, MLP rows and columns included, so MIB's loader
accepts the file; an attention-only model's MLP entries are all False and 0.0.

torch is imported inside the functions, so that ``reuse_lens.circuits`` stays importable
without it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reuse_lens.circuits._checks import CircuitError
from reuse_lens.circuits.mib import MIB_SIGN, ScoreSign, mib_fields, to_mib_dict
from reuse_lens.nodes import ModelShape

if TYPE_CHECKING:
    from reuse_lens.circuits.circuit import Circuit

__all__ = ["mib_pt_dict", "mib_pt_fields", "read_mib_pt", "to_mib_pt"]

_REQUIRED = ("cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph")
_EXTRA = "reuse_lens"


def _src_nodes(n_layers: int, n_heads: int) -> list[str]:
    names = ["input"]
    for layer in range(n_layers):
        names += [f"a{layer}.h{head}" for head in range(n_heads)] + [f"m{layer}"]
    return names


def _dst_nodes(n_layers: int, n_heads: int) -> list[str]:
    names = []
    for layer in range(n_layers):
        for letter in "qkv":
            names += [f"a{layer}.h{head}<{letter}>" for head in range(n_heads)]
        names.append(f"m{layer}")
    return [*names, "logits"]


def mib_pt_dict(
    circuit: Circuit, *, d_model: int | None = None, sign: ScoreSign = MIB_SIGN
) -> dict[str, Any]:
    """``circuit`` as the dict MIB's ``.pt`` files hold (see the module docstring)."""
    import torch

    doc = to_mib_dict(circuit, d_model=d_model, sign=sign)
    shape = circuit.shape
    src = _src_nodes(shape.n_layers, shape.n_heads)
    dst = _dst_nodes(shape.n_layers, shape.n_heads)
    row = {name: i for i, name in enumerate(src)}
    col = {name: i for i, name in enumerate(dst)}
    scores = torch.zeros(len(src), len(dst))
    in_graph = torch.zeros(len(src), len(dst), dtype=torch.bool)
    for name, info in doc["edges"].items():
        sender, receiver = name.split("->")
        scores[row[sender], col[receiver]] = info["score"]
        in_graph[row[sender], col[receiver]] = info["in_graph"]
    nodes_in_graph = torch.zeros(len(src), dtype=torch.bool)
    nodes_scores = torch.full((len(src),), math.nan)
    for name, info in doc["nodes"].items():
        if name in row:  # logits is no sender: MIB keeps it in the graph always
            nodes_in_graph[row[name]] = info["in_graph"]
            if "score" in info:
                nodes_scores[row[name]] = info["score"]
    out: dict[str, Any] = {
        "cfg": doc["cfg"],
        "src_nodes": src,
        "dst_nodes": dst,
        "edges_scores": scores,
        "edges_in_graph": in_graph,
        "nodes_in_graph": nodes_in_graph,
    }
    if circuit.node_scores:  # EAP-IG writes node scores only for node-scored graphs
        out["nodes_scores"] = nodes_scores
    out[_EXTRA] = doc[_EXTRA]
    return out


def to_mib_pt(
    circuit: Circuit,
    path: str | os.PathLike[str],
    *,
    d_model: int | None = None,
    sign: ScoreSign = MIB_SIGN,
) -> Path:
    """Write ``circuit`` as a MIB ``.pt`` circuit file; returns the path.

    Written through a temporary file in the same folder and ``os.replace``, like the JSON
    forms, so a reader never sees half a file.
    """
    import torch

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        torch.save(mib_pt_dict(circuit, d_model=d_model, sign=sign), partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def read_mib_pt(data: object, *, source: str = "the MIB .pt document") -> dict[str, Any]:
    """The JSON form (``cfg``/``nodes``/``edges``, and our block) of a loaded ``.pt`` dict.

    Every check of the JSON reader then applies to it: names against the cfg's shape,
    edges against the graph. A pair of the matrices that is not an edge of the graph must
    be out of the graph.
    """
    import torch

    if not isinstance(data, dict):
        raise CircuitError(f"{source} must hold a dict, got {type(data).__name__}")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise CircuitError(
            f"{source} lacks {', '.join(missing)}: a MIB .pt circuit holds "
            f"{', '.join(_REQUIRED)} (what EAP-IG's Graph.to_pt writes)"
        )
    cfg, src, dst = data["cfg"], data["src_nodes"], data["dst_nodes"]
    if not isinstance(cfg, dict):
        raise CircuitError(f"{source}: 'cfg' must be a dict, got {type(cfg).__name__}")
    if not (isinstance(src, list | tuple) and isinstance(dst, list | tuple)):
        raise CircuitError(f"{source}: 'src_nodes' and 'dst_nodes' must be lists of names")
    scores = _matrix(data["edges_scores"], "edges_scores", (len(src), len(dst)), source)
    in_graph = _matrix(data["edges_in_graph"], "edges_in_graph", (len(src), len(dst)), source)
    nodes_in = _matrix(data["nodes_in_graph"], "nodes_in_graph", (len(src),), source)
    node_scores = data.get("nodes_scores")
    if node_scores is not None:
        node_scores = _matrix(node_scores, "nodes_scores", (len(src),), source)
    attn_only = cfg.get("attn_only") is True
    in_graph = in_graph.bool()
    seen = torch.zeros_like(in_graph)

    nodes: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(src):
        if attn_only and str(name).startswith("m"):
            continue  # our attention-only files keep MLP rows only for MIB's layout
        nodes[str(name)] = {"in_graph": bool(nodes_in[i])}
        if node_scores is not None and math.isfinite(float(node_scores[i])):
            nodes[str(name)]["score"] = float(node_scores[i])
    nodes["logits"] = {"in_graph": True}

    row = {str(name): i for i, name in enumerate(src)}
    col = {str(name): i for i, name in enumerate(dst)}
    edges: dict[str, dict[str, Any]] = {}
    shape = _shape(cfg, attn_only, source)
    from reuse_lens.nodes import edges_of

    for edge in edges_of(shape):
        s, r = edge.sender.name, edge.receiver_name
        if s not in row or r not in col:
            raise CircuitError(
                f"{source}: the edge {edge.name} of the cfg's graph has no "
                f"{'row' if s not in row else 'column'} in src_nodes/dst_nodes"
            )
        i, j = row[s], col[r]
        seen[i, j] = True
        edges[edge.name] = {"score": float(scores[i, j]), "in_graph": bool(in_graph[i, j])}
    stray = in_graph & ~seen
    if bool(stray.any()):
        i, j = (int(x) for x in stray.nonzero()[0])
        raise CircuitError(
            f"{source}: {src[i]}->{dst[j]} is marked in the graph but is not an edge of "
            "the model's graph"
        )
    doc: dict[str, Any] = {"cfg": cfg, "nodes": nodes, "edges": edges}
    if isinstance(data.get(_EXTRA), dict):
        doc[_EXTRA] = data[_EXTRA]
    return doc


def _shape(cfg: dict[str, Any], attn_only: bool, source: str) -> ModelShape:
    """The shape of the cfg, for enumerating its edges; mib_fields checks it again."""
    n_layers, n_heads = cfg.get("n_layers"), cfg.get("n_heads")
    for what, value in (("n_layers", n_layers), ("n_heads", n_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CircuitError(
                f"{source}: 'cfg.{what}' must be a positive whole number, got {value!r}"
            )
    parallel = cfg.get("parallel_attn_mlp", False)
    if not isinstance(parallel, bool):
        raise CircuitError(f"{source}: 'cfg.parallel_attn_mlp' must be true or false")
    return ModelShape(int(n_layers), int(n_heads), not attn_only, parallel)  # type: ignore[arg-type]


def _matrix(value: object, what: str, shape: tuple[int, ...], source: str) -> Any:
    import torch

    if not isinstance(value, torch.Tensor):
        raise CircuitError(f"{source}: '{what}' must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise CircuitError(
            f"{source}: '{what}' has shape {tuple(value.shape)}, but src_nodes and dst_nodes "
            f"give {shape}"
        )
    return value.detach().cpu()


def mib_pt_fields(
    path: str | os.PathLike[str],
    shape: ModelShape | Any | None = None,
    *,
    sign: ScoreSign | None = None,
) -> dict[str, Any]:
    """The Circuit fields of a MIB ``.pt`` circuit file (see ``mib.mib_fields``).

    The file is loaded with ``weights_only=True``: it holds tensors, names and numbers
    only, and nothing in it is run.
    """
    import torch

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no MIB .pt circuit file {str(file)!r}")
    source = f"MIB circuit file {file}"
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle error, a truncated zip, a foreign object
        raise CircuitError(f"{source} is not a readable .pt file: {error}") from error
    return mib_fields(read_mib_pt(data, source=source), shape, source=source, sign=sign)
