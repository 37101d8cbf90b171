"""Scores of edges: what edge-level attribution patching returns.

An edge runs from a sender's output (``input``, a head, an MLP) to a receiver's input (a
head's q, k or v input, an MLP, or ``logits``). Edges are named as MIB names them (Mueller
et al. 2025) and as ``reuse_lens.nodes.Edge`` writes them: ``a0.h1->a2.h3<q>``,
``input->m0``, ``m1->logits``. An edge's effect follows the node convention: the metric
with the sender's corrupted output patched into that one receiver's input, minus the
metric without the patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from reuse_lens.nodes import MLP, AttentionHead, Edge, ModelShape, NodeNameError, parse_edge
from reuse_lens.patching.scores import NodeScores
from reuse_lens.tasks.metrics import MetricError

__all__ = ["EdgeScores"]


@dataclass(frozen=True, eq=False)
class EdgeScores:
    """Per-edge effects of one attribution method on one task.

    Attributes:
        edges: every edge of the model's graph, in ``reuse_lens.nodes.edges_of`` order.
        scores: the effect of each edge, shape (edge,), aligned with ``edges``.
        shape: the layers, heads and MLPs of the model the scores belong to.
        clean: the metric on the unpatched clean run.
        corrupted: the metric on the unpatched corrupted run.
        method: how the scores were made, e.g. ``"eap"``, ``"eap-ig"``.
        settings: the options the method ran with, for the record.
    """

    edges: tuple[Edge, ...]
    scores: Float[Tensor, " edge"]
    shape: ModelShape
    clean: float
    corrupted: float
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.scores.shape != (len(self.edges),):
            raise ValueError(
                f"EdgeScores needs one score per edge: {len(self.edges)} edges, scores of "
                f"shape {tuple(self.scores.shape)}"
            )
        object.__setattr__(self, "_index", {e.name: i for i, e in enumerate(self.edges)})

    def __len__(self) -> int:
        return len(self.edges)

    def __getitem__(self, edge: str | Edge) -> float:
        """The effect of one edge, by name (``"a0.h1->a2.h3<q>"``) or Edge."""
        name = edge.name if isinstance(edge, Edge) else parse_edge(edge).name
        if name not in self._index:
            raise NodeNameError(f"edge {name!r} is not an edge of this model's graph")
        return float(self.scores[self._index[name]])

    def as_dict(self) -> dict[str, float]:
        """``{edge name: effect}`` for every edge, in ``edges_of`` order."""
        values = self.scores.tolist()
        return {e.name: float(v) for e, v in zip(self.edges, values, strict=True)}

    def top(self, k: int, *, by_abs: bool = True) -> list[tuple[str, float]]:
        """The ``k`` edges with the largest (absolute) effects, largest first."""
        key = self.scores.abs() if by_abs else self.scores
        order = torch.argsort(key, descending=True, stable=True)[:k].tolist()
        return [(self.edges[i].name, float(self.scores[i])) for i in order]

    def normalized(self) -> EdgeScores:
        """Effects divided by (clean − corrupted), as ``NodeScores.normalized`` does."""
        gap = self.clean - self.corrupted
        if abs(gap) < 1e-12:
            raise MetricError(
                f"cannot normalise: the clean ({self.clean:.4g}) and corrupted "
                f"({self.corrupted:.4g}) metrics are equal"
            )
        return EdgeScores(
            edges=self.edges,
            scores=self.scores / gap,
            shape=self.shape,
            clean=self.clean,
            corrupted=self.corrupted,
            method=self.method,
            settings={**self.settings, "normalized": True},
        )

    def to_node_scores(self) -> NodeScores:
        """Each head's and MLP's score as the sum of its outgoing edges' scores.

        With edge and node scores from the same gradients this sum is the node's own
        attribution score: the gradient at a node's output is the sum of the gradients at
        the inputs of every receiver downstream of it, because the residual stream is a
        sum (docs/attribution.md). ``input``'s outgoing edges are not part of any node.
        """
        layers, n_heads = self.shape.n_layers, self.shape.n_heads
        # A slot per head, then per MLP, then one for input's edges (left out): one sum
        # over the edges, not a tensor write per edge (GPT-2 small has 32,000).
        slots = [
            e.sender.layer * n_heads + e.sender.head
            if isinstance(e.sender, AttentionHead)
            else layers * n_heads + e.sender.layer
            if isinstance(e.sender, MLP)
            else layers * (n_heads + 1)
            for e in self.edges
        ]
        sums = torch.zeros(layers * (n_heads + 1) + 1, dtype=self.scores.dtype)
        sums.index_add_(0, torch.tensor(slots, dtype=torch.long), self.scores.cpu())
        heads = sums[: layers * n_heads].view(layers, n_heads).clone()
        mlps = sums[layers * n_heads : -1].clone() if self.shape.has_mlps else None
        return NodeScores(
            heads=heads,
            mlps=mlps,
            clean=self.clean,
            corrupted=self.corrupted,
            method=self.method,
            settings={**self.settings, "from_edges": True},
        )

    def __repr__(self) -> str:
        top = ", ".join(f"{n}={v:+.3f}" for n, v in self.top(3))
        return f"EdgeScores(method={self.method!r}, n={len(self)}, top: {top})"
