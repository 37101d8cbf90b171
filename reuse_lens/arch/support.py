"""Which bridges have the nodes reuse_lens analyses, and why the others do not.

Every node and edge method reads a model's attention heads one by one (``hook_z`` holds
one slice per head, which ``W_O`` maps to the residual stream) and its MLPs, and treats
everything else in the residual stream as the sum of those nodes' outputs. A block that
adds something that is neither (a state-space or convolution mixer beside or instead of
attention), attention whose heads are not fixed (a mixture of attention heads), or heads
whose value width differs from what the bridge's hooks are laid out by (multi-head latent
attention) breaks that reading. ``unsupported_reason`` names the case from the bridge's
hook points and the attention's output projection, without a forward pass; ``nodes.
shape_of`` raises it for every method at once.

This module imports neither torch nor TransformerLens.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

__all__ = ["NODE_PARTS", "unsupported_reason"]

NODE_PARTS = frozenset({"attn", "mlp", "ln1", "ln2", "ln1_post", "ln2_post"})
"""The parts of a block that the nodes and the residual graph account for: the attention
(heads), the MLP, and the norms in front of and after them."""

_MIXERS = {
    "mamba": "a Mamba state-space mixer",
    "mixer": "a state-space mixer",
    "conv": "a gated short convolution",
    "linear_attn": "linear attention (a recurrent state)",
}

_WHAT_STILL_WORKS = (
    "patching, attribution, circuits and interventions cannot run on it. "
    "rl.evaluate(model, task) still scores it"
)


def _layers(cfg: Any) -> range:
    return range(int(getattr(cfg, "n_layers", 0) or 0))


def _parts(hooks: Any) -> dict[int, set[str]]:
    """Per block: the named parts that have hook points of their own (``blocks.3.attn.q.
    hook_in`` makes ``attn`` a part of block 3), in one pass over the hook names."""
    parts: dict[int, set[str]] = {}
    for name in hooks:
        pieces = name.split(".")
        if len(pieces) >= 4 and pieces[0] == "blocks" and pieces[1].isdigit():
            parts.setdefault(int(pieces[1]), set()).add(pieces[2])
    return parts


def _layer_list(layers: list[int]) -> str:
    """``layer 1``, ``layers 0, 2``; ``no layer`` for none."""
    if not layers:
        return "no layer"
    return f"layer{'s' if len(layers) > 1 else ''} {', '.join(str(i) for i in layers)}"


_REASONS: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()
"""Per model: ``unsupported_reason``'s answer (every method asks it, through ``shape_of``)."""


def unsupported_reason(model: Any, arch: str) -> str | None:
    """Why ``model`` has no nodes reuse_lens can analyse exactly, or None when it has.

    ``arch`` is the architecture's name, for the message. The cases: no attention in any
    layer (Mamba); attention in some layers and another mixer in others, or beside it
    (Jamba, LFM2, Qwen3-Next, Falcon-H1, ...); a mixture of attention heads (JetMoE);
    multi-head latent attention (DeepSeek-V2/V3) or any value width other than the
    query/key head width the bridge lays its hooks out by.
    """
    try:
        return _REASONS[model]
    except (KeyError, TypeError):
        pass
    reason = _reason(model, arch)
    # A stand-in that cannot be weakly referred to is asked again next time.
    with contextlib.suppress(TypeError):
        _REASONS[model] = reason
    return reason


def _reason(model: Any, arch: str) -> str | None:
    cfg = model.cfg
    hooks = getattr(model, "hook_dict", None)
    if hooks is None:  # a plain config: nothing to check
        return None
    layers = list(_layers(cfg))
    parts = _parts(hooks)
    attention = [i for i in layers if f"blocks.{i}.attn.hook_z" in hooks]
    routed = [i for i in layers if "attn" in parts.get(i, set()) and i not in attention]
    if routed:
        experts = any(f"blocks.{i}.attn.experts.hook_in" in hooks for i in routed)
        how = (
            "a mixture of attention heads (a router picks each token's query heads among "
            "attention experts)"
            if experts
            else "attention without per-head outputs"
        )
        return (
            f"model architecture {arch} uses {how} in {_layer_list(routed)}: it has "
            "no fixed heads whose output (hook_z) could be patched one by one, and "
            f"reuse_lens's nodes are fixed attention heads and MLPs, so {_WHAT_STILL_WORKS}; "
            "use a model with fixed attention heads for circuit discovery."
        )
    if not attention:
        return (
            f"model architecture {arch} has no attention heads that TransformerLens exposes "
            "one by one (no layer has an attn.hook_z: its blocks are state-space, recurrent "
            "or other mixers), and reuse_lens's methods analyse attention heads and MLPs: "
            f"{_WHAT_STILL_WORKS}; use a transformer for circuit discovery."
        )
    others = {i: sorted(parts.get(i, set()) - NODE_PARTS) for i in layers}
    mixed = [i for i in layers if others[i] or i not in attention]
    if mixed or bool(getattr(cfg, "is_stateful", False)):
        kinds = sorted({part for i in mixed for part in others[i]})
        described = [f"{_MIXERS[k]} ({k})" for k in kinds if k in _MIXERS]
        described += [f"a part named {k!r}" for k in kinds if k not in _MIXERS]
        return (
            f"model architecture {arch} is a hybrid: attention heads in "
            f"{_layer_list(attention)}, and {', '.join(described) or 'other mixers'} in "
            f"{_layer_list(mixed)}. reuse_lens's nodes are attention heads and MLPs, and "
            "what those parts add to the residual stream belongs to no node, so no node "
            f"set, edge graph or ablation would account for it: {_WHAT_STILL_WORKS}; use a "
            "transformer without other mixers for circuit discovery."
        )
    width = _value_width(model)
    n_heads, d_head = int(getattr(cfg, "n_heads", 0)), int(getattr(cfg, "d_head", 0))
    if any(f"blocks.{i}.attn.hook_kv_latent" in hooks for i in layers):
        return (
            f"model architecture {arch} uses multi-head latent attention (MLA: each head's "
            "q, k and v are decompressed from low-rank latents shared by every head). "
            "TransformerLens 4.3 lays its hook_q, hook_k and hook_v out with the heads "
            f"before the positions, and its hook_z in slices of d_head={d_head} channels "
            f"({width} value channels for {n_heads} heads), so no hook point holds one "
            f"slice per head where the engines read it: {_WHAT_STILL_WORKS}; use a model "
            "with multi-head or grouped-query attention for circuit discovery."
        )
    if width is not None and n_heads and d_head and width != n_heads * d_head:
        return (
            f"model architecture {arch} gives its heads values of another width than their "
            f"queries and keys: the attention output projection reads {width} channels, "
            f"not {n_heads} heads × {d_head}, and TransformerLens lays hook_z out by "
            f"{d_head} channels a head, so its slices are not the heads: "
            f"{_WHAT_STILL_WORKS}; use a model whose heads have one width for circuit "
            "discovery."
        )
    return None


def _value_width(model: Any) -> int | None:
    """The input width of layer 0's attention output projection, where it is a linear."""
    try:
        o = model.blocks[0].attn.o
    except (AttributeError, IndexError, TypeError):
        return None
    module = getattr(o, "original_component", o)
    width = getattr(module, "in_features", None)
    if width is None and type(module).__name__ == "Conv1D":  # GPT-2's (d_in, d_out)
        weight = getattr(module, "weight", None)
        width = None if weight is None else int(weight.shape[0])
    return None if width is None else int(width)
