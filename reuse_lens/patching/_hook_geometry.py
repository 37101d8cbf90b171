"""What a bridge's hooks compute around its heads, measured once per model.

The hook engines read a head's output as ``hook_z @ W_O`` and assume that each block adds
its heads' and MLP's outputs to a residual stream it does not otherwise change. Two
forward-pass checks on a few tokens (cached per model) say where a bridge departs from
that: a scalar between the attention and the residual stream (``head_output_scale``),
and a norm of the residual stream itself after the sum (``post_ln``).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["head_output_scale", "post_ln"]


def _probe_tokens(model: TransformerBridge) -> Tensor:
    device = torch.device(model.cfg.device or "cpu")
    return (torch.arange(1, 7, device=device) % int(model.cfg.d_vocab)).unsqueeze(0)


_HEAD_OUTPUT_SCALE: weakref.WeakKeyDictionary[TransformerBridge, float | None] = (
    weakref.WeakKeyDictionary()
)
"""Per model: the scalar between the heads' ``z @ W_O`` and the residual stream, or None."""

_SCALE_RTOL = 1e-4


@torch.no_grad()
def head_output_scale(model: TransformerBridge) -> float | None:
    """The scalar ``c`` with ``hook_attn_out = c · (Σ_h z_h @ W_O[h] + b_O)`` in every
    layer, measured once per model on a few tokens; None where no one scalar fits.

    The hook engines take a head's output as ``z @ W_O``, but some blocks scale the
    attention output before adding it to the residual stream (Granite and Granite-MoE by
    ``residual_multiplier``), and TransformerLens's ``W_O`` does not include that factor
    while its ``hook_attn_out`` does. An edge from a head would then be scaled by ``1/c``
    without an error, and edge scores would not add up to node scores. The engines
    multiply ``W_O`` by ``c``; where no scalar fits (a norm after the attention, a model
    without ``hook_attn_out``), edges through hooks are refused (``edge_refusal``).
    """
    if model in _HEAD_OUTPUT_SCALE:
        return _HEAD_OUTPUT_SCALE[model]
    n_layers = int(model.cfg.n_layers)
    names = [f"blocks.{layer}.{point}" for layer in range(n_layers) for point in _SCALE_POINTS]
    scale: float | None = None
    if all(name in model.hook_dict for name in names):
        _, cache = model.run_with_cache(
            _probe_tokens(model), names_filter=lambda name: name in names
        )
        if all(name in cache.cache_dict for name in names):
            try:
                scale = _fit_scale(model, cache, n_layers)
            except (NotImplementedError, AttributeError, RuntimeError):
                scale = None  # no W_O to read: refused as no scalar fits
    _HEAD_OUTPUT_SCALE[model] = scale
    return scale


def _fit_scale(model: TransformerBridge, cache: Any, n_layers: int) -> float | None:
    """The one least-squares scalar of every layer's ``hook_attn_out`` on its heads'
    ``z @ W_O + b_O``, or None where a layer's fit leaves a residual or the layers differ."""
    dtype = cache[f"blocks.0.{_SCALE_POINTS[0]}"].dtype
    tolerance = max(_SCALE_RTOL, 8 * torch.finfo(dtype).eps)
    scales = []
    for layer in range(n_layers):
        attn = model.blocks[layer].attn
        z = cache[f"blocks.{layer}.attn.hook_z"].float()
        out = cache[f"blocks.{layer}.hook_attn_out"].float()
        w_o = attn.W_O.detach().float()
        if z.dim() != 4 or tuple(w_o.shape[:2]) != tuple(z.shape[2:]):
            return None
        ours = torch.einsum("bphe,hed->bpd", z, w_o)
        b_o = getattr(attn, "b_O", None)
        if b_o is not None:
            ours = ours + b_o.detach().float()
        c = float((ours * out).sum() / (ours * ours).sum().clamp(min=1e-30))
        if float((c * ours - out).abs().max()) > tolerance * float(out.abs().max()):
            return None
        scales.append(c)
    if max(scales) - min(scales) > tolerance * max(abs(c) for c in scales):
        return None
    scale = sum(scales) / len(scales)
    return 1.0 if abs(scale - 1.0) <= tolerance else scale


_SCALE_POINTS = ("attn.hook_z", "hook_attn_out")


_POST_LN: weakref.WeakKeyDictionary[TransformerBridge, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def post_ln(model: TransformerBridge) -> bool:
    """Whether ``ln1`` reads something other than the block's input: the block normalises
    the residual stream after adding the attention's output (post-LN: the original GPT,
    BERT), measured once per model.

    In a pre-LN block ``ln1`` reads the block's input (``hook_resid_pre``); a parallel
    block's too. A model without ``ln1`` is not post-LN in this sense (OLMo-2's norms
    after each sublayer are ``ln1_post``/``ln2_post``).
    """
    if model in _POST_LN:
        return _POST_LN[model]
    names = ("blocks.0.hook_resid_pre", "blocks.0.ln1.hook_in")
    found = False
    if all(name in model.hook_dict for name in names):
        _, cache = model.run_with_cache(
            _probe_tokens(model), names_filter=lambda name: name in names
        )
        if all(name in cache.cache_dict for name in names):
            before, ln_in = (cache[name].float() for name in names)
            scale = max(1.0, float(before.abs().max()))
            found = before.shape != ln_in.shape or not torch.allclose(
                before, ln_in, atol=1e-5 * scale, rtol=1e-4
            )
    _POST_LN[model] = found
    return found
