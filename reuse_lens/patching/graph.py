"""The senders and receivers of a model's edge graph, as rows and columns of a matrix.

Edge attribution (``attribution.py``) accumulates scores into a dense (sender, receiver)
matrix and edge ablation (``ablation.py``) reads a (sender, receiver) keep-mask; both use
this one index so that a row or column means the same node everywhere.
"""

from __future__ import annotations

import functools

import torch
from jaxtyping import Bool
from torch import Tensor

from reuse_lens.nodes import INPUT, LOGITS, MLP, AttentionHead, Edge, ModelShape

__all__ = ["GraphIndex"]


class GraphIndex:
    """Rows (senders) and columns (receivers) of the dense edge-score matrix.

    Senders are in forward order: ``input``, then per layer its heads and its MLP. A
    receiver reads a prefix of them (``ModelShape.senders_of``), so its deltas are
    ``deltas[:, :, :n]``.
    Receivers per layer: the q inputs of its heads, then the k inputs, then the v inputs,
    then its MLP; ``logits`` comes last.
    """

    def __init__(self, shape: ModelShape) -> None:
        self.shape = shape
        names = [INPUT.name]
        for layer in range(shape.n_layers):
            names += [AttentionHead(layer, h).name for h in range(shape.n_heads)]
            if shape.has_mlps:
                names.append(MLP(layer).name)
        self.sender = {name: i for i, name in enumerate(names)}
        receivers: list[str] = []
        for layer in range(shape.n_layers):
            for qkv in ("q", "k", "v"):
                receivers += [
                    Edge(INPUT, AttentionHead(layer, h), qkv).receiver_name  # type: ignore[arg-type]
                    for h in range(shape.n_heads)
                ]
            if shape.has_mlps:
                receivers.append(MLP(layer).name)
        receivers.append(LOGITS.name)
        self.receiver = {name: i for i, name in enumerate(receivers)}

    @property
    def n_senders(self) -> int:
        return len(self.sender)

    @property
    def n_receivers(self) -> int:
        return len(self.receiver)

    def senders_before_heads(self, layer: int) -> int:
        """How many senders the heads of ``layer`` read: input and all earlier layers."""
        return len(self.shape.senders_of(AttentionHead(layer, 0)))

    def senders_before_mlp(self, layer: int) -> int:
        """How many senders the MLP of ``layer`` reads: also that layer's heads, unless the
        block runs attention and MLP in parallel."""
        return len(self.shape.senders_of(MLP(layer)))

    def heads_columns(self, layer: int) -> slice:
        start = self.receiver[f"{AttentionHead(layer, 0).name}<q>"]
        return slice(start, start + 3 * self.shape.n_heads)

    @functools.cached_property
    def edges(self) -> Bool[Tensor, "sender receiver"]:
        """Which (sender, receiver) pairs are edges: each receiver reads the senders before
        it (a later sender's row is no edge, whatever a mask holds there)."""
        reads = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        for layer in range(self.shape.n_layers):
            reads[: self.senders_before_heads(layer), self.heads_columns(layer)] = True
            if self.shape.has_mlps:
                column = self.receiver[MLP(layer).name]
                reads[: self.senders_before_mlp(layer), column] = True
        reads[:, self.receiver[LOGITS.name]] = True
        return reads
