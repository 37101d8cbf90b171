"""Base models and planted fine-tunes for the drift and cross-model tests.

A "fine-tune" here is the base model loaded a second time and edited in place: the bridge
reads its HF module's parameters, so an edit of ``model.original_model`` is what every
engine sees. Edits are planted, so the answer is known.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import reuse_lens as rl

HF_NAMES = {
    # family -> (layers, attention output projection, MLP node output module, head size)
    "gpt2": ("transformer.h", "attn.c_proj", "mlp"),
    "llama_gqa": ("model.layers", "self_attn.o_proj", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention.dense", "mlp"),
    # Gemma-2's MLP node is read after its post-norm (docs/models.md).
    "gemma2": ("model.layers", "self_attn.o_proj", "post_feedforward_layernorm"),
}


def edited(folder: Path, edit: Callable[[Any], None]) -> Any:
    """``folder``'s model loaded anew with ``edit(hf_model)`` applied to its parameters."""
    model = rl.load_model(folder)
    with torch.no_grad():
        edit(model.original_model)
    return model


def module(hf: Any, path: str) -> Any:
    out = hf
    for part in path.split("."):
        out = out[int(part)] if part.isdigit() else getattr(out, part)
    return out


_NOT_IN_A_NODE = ("embed", "wte", "wpe", "lm_head", "position", "shared")
"""Parameter names of the embeddings and the unembedding: matrices no head or MLP holds."""


def noise_everywhere(scale: float, seed: int) -> Callable[[Any], None]:
    """An edit that adds Gaussian noise of relative size ``scale`` to every head and MLP
    matrix (every matrix of the decoder layers, whatever the family calls it: ``c_attn``,
    ``fc1``, ``dense_h_to_4h``, an expert's stacked weights), nothing else: norms and
    biases are vectors, and the embeddings and unembedding are left alone."""

    def edit(hf: Any) -> None:
        gen = torch.Generator().manual_seed(seed)
        for name, p in hf.named_parameters():
            if p.dim() >= 2 and not any(k in name for k in _NOT_IN_A_NODE):
                noise = torch.randn(p.shape, generator=gen) * p.std() * scale
                p.add_(noise)

    return edit
