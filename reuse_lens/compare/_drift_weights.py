"""The weights ``component_drift`` compares, per head, MLP, layer and model.

Two readers give the same structure. Where an architecture adapter reads the model
(``reuse_lens.arch``), its ``Weights`` are sliced per head; elsewhere (families that run
through hooks) the bridge's own per-head matrices are read: ``W_Q``, ``W_K``, ``W_V``,
``W_O`` of each attention block, ``W_in``, ``W_gate``, ``W_out`` of each MLP, and the
block's norms. Under grouped-query attention both give a query head its group's key and
value slices. A test checks that the two readers agree on the families both cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from reuse_lens.compare._model_pair import label, read_weights
from reuse_lens.nodes import UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.patching._forward import Layer, Weights

__all__ = ["NORMS", "LayerParts", "NodeWeights", "node_weights"]

Pair = tuple[Tensor | None, ...]
"""A matrix and its bias (None where the architecture has none), or, for a mixture of
experts, every parameter of its router and experts."""

NORMS = ("ln1", "ln2", "attn_post", "mlp_post", "q_norm", "k_norm")
"""The per-layer norms a drift report compares, by their adapter names."""

_BRIDGE_NORMS = {"ln1": "ln1", "ln2": "ln2", "ln1_post": "attn_post", "ln2_post": "mlp_post"}
"""The bridge's names of a block's norms, and the adapter names they stand for."""


@dataclass(frozen=True)
class LayerParts:
    """One layer's weights: each query head's q, k, v, o; the MLP's in, gate, out (and, for
    a mixture of experts, ``experts``: its router's and experts' parameters, in place of
    in, gate and out); the norms' [weight, bias]; the attention output bias."""

    heads: list[dict[str, Pair]]
    mlp: dict[str, Pair]
    norms: dict[str, list[Tensor | None]]
    b_o: Tensor | None


@dataclass(frozen=True)
class NodeWeights:
    """A model's weights as drift compares them; ``source`` says which reader gave them."""

    layers: list[LayerParts]
    model: dict[str, list[Tensor | None]]
    n_kv_heads: int | None
    source: str


def node_weights(model: TransformerBridge, *, via: str = "auto") -> NodeWeights:
    """The model's weights per node: from its adapter (``via="adapter"``), from the bridge
    (``"bridge"``), or the adapter where one reads the model, else the bridge (``"auto"``)."""
    if via != "bridge":
        try:
            return _from_adapter(read_weights(model))
        except UnsupportedArchitectureError:
            if via == "adapter":
                raise
    return _from_bridge(model)


def _from_adapter(w: Weights) -> NodeWeights:
    layers = [
        LayerParts(
            heads=[_head_slices(layer, h, w.d_head) for h in range(layer.w_q.shape[1] // w.d_head)],
            mlp=_mlp_parts(layer),
            norms={name: _norm_pair(getattr(layer, name)) for name in NORMS},
            b_o=layer.b_o,
        )
        for layer in w.layers
    ]
    model = {
        "embed": [w.w_e],
        "positions": [w.w_pos],
        "final_norm": _norm_pair(w.ln_final),
        "unembed": [w.w_u, w.b_u],
    }
    return NodeWeights(layers, model, w.spec.n_kv_heads, "adapter")


def _mlp_parts(layer: Layer) -> dict[str, Pair]:
    parts: dict[str, Pair] = {
        "in": (layer.w_in, layer.b_in),
        "gate": (layer.w_gate, layer.b_gate),
        "out": (layer.w_out, layer.b_out),
    }
    if layer.w_in is None and isinstance(layer.mlp_module, torch.nn.Module):
        # A mixture of experts runs as the model's own module: its weights are the
        # router's and every expert's, compared together.
        parts["experts"] = tuple(p.detach() for p in layer.mlp_module.parameters())
    return parts


def _head_slices(layer: Layer, head: int, d_head: int) -> dict[str, Pair]:
    cols = slice(head * d_head, (head + 1) * d_head)
    return {
        "q": (layer.w_q[:, cols], layer.b_q[cols]),
        "k": (layer.w_k[:, cols], layer.b_k[cols]),
        "v": (layer.w_v[:, cols], layer.b_v[cols]),
        "o": (layer.w_o[cols, :], None),
    }


def _norm_pair(norm: Any) -> list[Tensor | None]:
    return [None, None] if norm is None else [norm.weight, norm.bias]


def _from_bridge(model: TransformerBridge) -> NodeWeights:
    n_heads = int(model.cfg.n_heads)
    n_kv = getattr(model.cfg, "n_key_value_heads", None)
    layers = []
    for index, block in enumerate(model.blocks):  # type: ignore[arg-type]
        attn = block.attn
        w_q, w_k, w_v, w_o = (_param(attn, n) for n in ("W_Q", "W_K", "W_V", "W_O"))
        if w_q is None or w_k is None or w_v is None or w_o is None:
            raise UnsupportedArchitectureError(
                f"the weights of {label(model)} cannot be read per head: layer {index}'s "
                "attention has no W_Q, W_K, W_V and W_O in TransformerLens's bridge, and no "
                "architecture adapter reads it (reuse_lens/arch/README.md says how to add one)"
            )
        b_q, b_k, b_v = (_param(attn, n) for n in ("b_Q", "b_K", "b_V"))
        group = n_heads // int(w_k.shape[0])  # query heads per key/value head
        heads = [
            {
                "q": (w_q[h], _row(b_q, h)),
                "k": (w_k[h // group], _row(b_k, h // group)),
                "v": (w_v[h // group], _row(b_v, h // group)),
                "o": (w_o[h], None),
            }
            for h in range(n_heads)
        ]
        mlp = getattr(block, "mlp", None)
        parts = {
            key: (_param(mlp, f"W_{key}"), _param(mlp, f"b_{key}")) for key in ("in", "gate", "out")
        }
        if mlp is not None and parts["in"][0] is None and parts["out"][0] is None:
            raise UnsupportedArchitectureError(
                f"the weights of {label(model)}'s MLPs cannot be read: layer {index}'s MLP "
                "has no W_in or W_out in TransformerLens's bridge (a mixture of experts?), "
                "and no architecture adapter reads it (reuse_lens/arch/README.md)"
            )
        norms: dict[str, list[Tensor | None]] = {name: [None, None] for name in NORMS}
        for bridge_name, name in _BRIDGE_NORMS.items():
            module = getattr(block, bridge_name, None)
            if module is not None:
                norms[name] = _module_pair(module)
        layers.append(LayerParts(heads, parts, norms, _param(attn, "b_O")))
    final = getattr(model, "ln_final", None)
    weights = {
        "embed": [_param(model, "W_E")],
        "positions": [_param(model, "W_pos")],
        "final_norm": [None, None] if final is None else _module_pair(final),
        "unembed": [_param(model, "W_U"), _param(model, "b_U")],
    }
    kv = None if n_kv is None else int(n_kv)
    return NodeWeights(layers, weights, kv, "bridge")


def _param(module: Any, name: str) -> Tensor | None:
    """``module.name`` detached, or None where the bridge has no such weight."""
    if module is None:
        return None
    try:
        value = getattr(module, name)
    except (AttributeError, KeyError, RuntimeError, NotImplementedError):
        return None
    return value.detach() if isinstance(value, Tensor) else None


def _row(bias: Tensor | None, index: int) -> Tensor | None:
    return None if bias is None else bias[index]


def _module_pair(module: Any) -> list[Tensor | None]:
    """A norm module's [weight, bias] (the bridge wraps the original module)."""
    params = dict(module.named_parameters())
    found: list[Tensor | None] = []
    for leaf in ("weight", "bias"):
        match = [p for name, p in params.items() if name.split(".")[-1] == leaf]
        found.append(match[0].detach() if match else None)
    return found
