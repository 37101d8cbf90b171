"""The adapter for GPT-2-style bridges, read through TransformerLens's weight properties.

Native TransformerLens bridges (no ``transformers`` model behind them), GPT-2 and OPT
expose ``W_Q``/``W_K``/... in TransformerLens's layout; this adapter reads those. It
covers exactly the plain architecture (learned positions, LayerNorm or none, multi-head
attention, an ungated MLP) and refuses every other switch with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reuse_lens.arch.spec import ArchSpec
from reuse_lens.patching._forward import Layer, Norm, Unsupported, Weights

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["extract_tl"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def _original(component: Any) -> Any:
    return getattr(component, "original_component", component)


def _get_norm(component: Any, label: str) -> Norm | None:
    module = _original(component)
    if module is None or isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.LayerNorm):
        return Norm(module.weight, module.bias, float(module.eps))
    raise Unsupported(f"{label} is a {type(module).__name__}, not a LayerNorm")


_UNSUPPORTED_FLAGS = (
    ("parallel_attn_mlp", "parallel attention and MLP"),
    ("gated_mlp", "a gated MLP"),
    ("use_local_attn", "local attention"),
    ("scale_attn_by_inverse_layer_idx", "attention scaled by the inverse layer index"),
    ("final_rms", "a final RMSNorm"),
    ("post_embedding_ln", "a LayerNorm after the embedding"),
    ("use_normalization_before_and_after", "normalisation before and after blocks"),
    ("use_qk_norm", "q/k normalisation"),
    ("is_multimodal", "multimodal inputs"),
)


def _layer(model: TransformerBridge, i: int, n_heads: int, attn_only: bool) -> Layer:
    """Block ``i``'s weights, read from the block itself: its ``W_Q``... are views of the
    model's parameters, where the model-level ``model.W_Q`` stacks a copy of every layer."""
    block = model.blocks[i]
    attn = block.attn
    W_Q, W_K, W_V, W_O = (w.detach() for w in (attn.W_Q, attn.W_K, attn.W_V, attn.W_O))
    if W_Q.shape[0] != n_heads or W_K.shape != W_Q.shape:
        raise Unsupported(f"unexpected W_Q/W_K shapes {tuple(W_Q.shape)} in block {i}")
    d_model = W_Q.shape[1]

    def flat(w: Tensor) -> Tensor:  # (head, d_model, d_head) -> (d_model, head*d_head), a view
        return w.permute(1, 0, 2).reshape(d_model, -1)

    def bias(b: Tensor | None) -> Tensor:  # a missing bias (GPT-Neo's q/k/v) is a zero one
        return W_Q.new_zeros(W_Q.shape[0] * W_Q.shape[2]) if b is None else b.reshape(-1)

    def detached(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach()

    b_O = detached(attn.b_O)
    mlp = None if attn_only else block.mlp
    return Layer.fused(
        ln1=_get_norm(getattr(block, "ln1", None), f"blocks.{i}.ln1"),
        w_q=flat(W_Q),
        b_q=bias(attn.b_Q),
        w_k=flat(W_K),
        b_k=bias(attn.b_K),
        w_v=flat(W_V),
        b_v=bias(attn.b_V),
        w_o=W_O.reshape(-1, W_O.shape[-1]),
        b_o=W_O.new_zeros(W_O.shape[-1]) if b_O is None else b_O,
        ln2=None if attn_only else _get_norm(getattr(block, "ln2", None), f"blocks.{i}.ln2"),
        w_in=None if mlp is None else detached(mlp.W_in),
        b_in=None if mlp is None else detached(mlp.b_in),
        w_out=None if mlp is None else detached(mlp.W_out),
        b_out=None if mlp is None else detached(mlp.b_out),
    )


def extract_tl(model: TransformerBridge) -> Weights:
    """Read a GPT-2-style bridge's weights into a ``Weights``, or raise ``Unsupported``."""
    cfg = model.cfg
    for flag, what in _UNSUPPORTED_FLAGS:
        if getattr(cfg, flag, False):
            raise Unsupported(f"the model uses {what}")
    if (getattr(cfg, "positional_embedding_type", "standard") or "standard") != "standard":
        raise Unsupported(f"positional embeddings are {cfg.positional_embedding_type!r}")
    if cfg.n_key_value_heads not in (None, cfg.n_heads):
        raise Unsupported("the model uses grouped-query attention")
    if getattr(cfg, "attention_dir", "causal") != "causal":
        raise Unsupported("attention is not causal")
    for cap in ("attn_scores_soft_cap", "output_logits_soft_cap"):
        if float(getattr(cfg, cap, -1.0) or -1.0) > 0:
            raise Unsupported(f"the model uses {cap}")
    norm_type = cfg.normalization_type
    if norm_type is not None and norm_type.upper() not in ("LN", "LNPRE"):
        raise Unsupported(f"normalization_type is {norm_type!r}")
    attn_only = bool(getattr(cfg, "attn_only", False))
    act = None
    if not attn_only:
        act = _ACTIVATIONS.get(str(cfg.act_fn).lower())
        if act is None:
            raise Unsupported(f"activation function {cfg.act_fn!r}")
    try:
        with torch.no_grad():
            n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
            layers = [_layer(model, i, n_heads, attn_only) for i in range(n_layers)]
            d_head = int(model.blocks[0].attn.W_Q.shape[-1])
            b_u = getattr(model, "b_U", None)
            if cfg.use_attn_scale and float(cfg.attn_scale) > 0:
                scale = float(cfg.attn_scale)
            elif cfg.use_attn_scale:
                scale = math.sqrt(d_head)
            else:
                scale = 1.0
            return Weights(
                w_e=model.W_E.detach(),
                w_pos=model.W_pos.detach(),
                layers=layers,
                ln_final=_get_norm(getattr(model, "ln_final", None), "ln_final"),
                w_u=model.W_U.detach(),
                b_u=None if b_u is None else b_u.detach(),
                act=act or F.relu,
                n_heads=n_heads,
                d_head=d_head,
                scale=scale,
                spec=ArchSpec(
                    family="tl",
                    norm="none" if cfg.normalization_type is None else "ln",
                    n_kv_heads=n_heads,
                    attn_scale=scale,
                ),
            )
    except Unsupported:
        raise
    except (AttributeError, RuntimeError, NotImplementedError, TypeError) as error:
        raise Unsupported(f"its weights cannot be read ({error})") from error
