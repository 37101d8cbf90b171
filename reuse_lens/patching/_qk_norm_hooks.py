"""A q/k norm over the whole projection, through hooks: each head's statistic from its own input.

OLMo-2, OLMo-3 and OLMoE normalise the query (key) projection of every head at once.
docs/models.md defines head i's query, when heads read different inputs (edges), as the
normed projection of head i's *own* input, read at head i: the functional engine's
``Weights.qkv_per_head``. TransformerLens's split q/k/v inputs project each head's copy
and then norm the heads' slices together, which mixes the inputs; and a gradient read in
front of the norm carries every head's slice. The edge engines through hooks use these
two helpers instead:

- ``own_input_normed``: the normed q (k) of every head from its own input copy, to replace
  what the bridge computed (edge ablation);
- ``own_input_grads``: the gradient at each head's own input, from the gradient after the
  norm, through the norm's Jacobian with only that head's slice (edge attribution).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["normed_hook", "own_input_grads", "own_input_normed"]


def normed_hook(layer: int, part: str) -> str:
    """The hook on layer ``layer``'s normed q or k projection, ``(batch, pos, head*d_head)``."""
    return f"blocks.{layer}.attn.hook_{part}_normed"


def _module(component: Any) -> Any:
    return getattr(component, "original_component", component)


def _projection(
    model: TransformerBridge, layer: int, part: str
) -> tuple[Float[Tensor, "d_model width"], Float[Tensor, " width"] | None]:
    """Layer ``layer``'s q or k projection of every head, ``(d_model, head*d_head)``."""
    attn = model.blocks[layer].attn
    w = getattr(attn, f"W_{part.upper()}").detach()  # (head, d_model, d_head)
    b = getattr(attn, f"b_{part.upper()}", None)
    flat = w.permute(1, 0, 2).reshape(w.shape[1], -1)
    return flat, None if b is None else b.detach().reshape(-1)


def own_input_normed(
    model: TransformerBridge,
    layer: int,
    part: str,
    inputs: Float[Tensor, "batch pos head d_model"],
) -> Float[Tensor, "batch pos width"]:
    """Every head's normed q (k), each from the projection of its own input copy
    (``hook_{q,k}_input``, in front of ``ln1``), laid out as the norm's output."""
    block = model.blocks[layer]
    x = _module(block.ln1)(inputs)
    w, b = _projection(model, layer, part)
    every = torch.einsum("bphd,de->bphe", x, w.to(x.dtype))  # head i's input, every head
    if b is not None:
        every = every + b.to(x.dtype)
    normed = _module(getattr(block.attn, f"{part}_norm"))(every)
    n_heads = inputs.shape[2]
    own = normed.unflatten(-1, (n_heads, -1)).diagonal(dim1=2, dim2=3)  # (b, p, d, head i)
    return own.movedim(-1, -2).flatten(-2)


def own_input_grads(
    model: TransformerBridge,
    layer: int,
    part: str,
    projected: Float[Tensor, "batch pos width"],
    grad_normed: Float[Tensor, "batch pos width"],
    n_heads: int,
) -> Float[Tensor, "batch pos head d_model"]:
    """The gradient at each head's q (k) input, after ``ln1``, from the gradient after the
    norm: head i's slice alone goes back through the norm's Jacobian at the projection
    (``projected``, in front of the norm), then through every head's projection."""
    norm = _module(getattr(model.blocks[layer].attn, f"{part}_norm"))
    width = projected.shape[-1]
    eye = torch.eye(n_heads, device=projected.device, dtype=torch.bool)
    mask = eye.repeat_interleave(width // n_heads, dim=1)  # (head i, width): i's slice
    upstream = grad_normed.float().unsqueeze(2) * mask  # (b, p, head i, width)
    with torch.enable_grad():
        point = projected.detach().unsqueeze(2).expand(-1, -1, n_heads, -1).clone()
        point.requires_grad_(True)
        out = norm(point)
        (back,) = torch.autograd.grad(out, point, grad_outputs=upstream.to(out.dtype))
    w, _ = _projection(model, layer, part)
    return torch.einsum("bphe,de->bphd", back.float(), w.float().to(back.device))
