"""Scores of nodes: what every patching method returns.

An effect is the task metric with the patch minus the metric without it (DESIGN.md).
Heads sit in a (layer, head) tensor and MLPs in a (layer,) vector, so the scores can be
drawn as the usual patching heatmap; ``as_dict`` flattens them to MIB node names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from reuse_lens.nodes import (
    MLP,
    AttentionHead,
    Expert,
    ModelShape,
    Node,
    NodeNameError,
    parse_node,
)
from reuse_lens.tasks.metrics import MetricError

__all__ = ["NodeScores"]


@dataclass(frozen=True, eq=False)
class NodeScores:
    """Per-node effects of one patching method on one task.

    Attributes:
        heads: effect of each head, shape (layer, head_index); NaN where not patched.
        mlps: effect of each MLP, shape (layer,); None for attention-only models, NaN where
            not patched.
        clean: the metric on the unpatched clean run.
        corrupted: the metric on the unpatched corrupted run.
        method: how the scores were made, e.g. ``"activation"``, ``"eap-ig"``.
        heads_by_pos: per-position head effects, shape (pos, layer, head_index), when the
            method was asked for them; positions are absolute token positions.
        mlps_by_pos: per-position MLP effects, shape (pos, layer), likewise.
        settings: the options the method ran with, for the record.
        experts: effect of each expert node, shape (layer, column) in the columns of
            ``ModelShape.column`` (the shared expert after the routed ones), when the
            scores are expert by expert (``experts=True``); ``mlps`` is then NaN at the
            layers split into experts.
        expert_shape: the shape with expert nodes that ``experts`` follows.
    """

    heads: Float[Tensor, "layer head_index"]
    mlps: Float[Tensor, " layer"] | None
    clean: float
    corrupted: float
    method: str
    heads_by_pos: Float[Tensor, "pos layer head_index"] | None = None
    mlps_by_pos: Float[Tensor, "pos layer"] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    experts: Float[Tensor, "layer column"] | None = None
    expert_shape: ModelShape | None = None

    @classmethod
    def from_mapping(
        cls,
        scores: Mapping[str, float],
        shape: ModelShape,
        *,
        clean: float = float("nan"),
        corrupted: float = float("nan"),
        method: str = "unknown",
        settings: Mapping[str, Any] | None = None,
    ) -> NodeScores:
        """NodeScores from ``{node name: effect}`` (e.g. a Circuit's ``node_scores``); NaN
        where a node has no score."""
        heads = torch.full((shape.n_layers, shape.n_heads), float("nan"))
        mlps = torch.full((shape.n_layers,), float("nan")) if shape.has_mlps else None
        experts = (
            torch.full((shape.n_layers, shape.n_columns), float("nan")) if shape.experts else None
        )
        for name, value in scores.items():
            node = parse_node(name)
            shape.check(node)
            if isinstance(node, AttentionHead):
                heads[node.layer, node.head] = float(value)
            elif isinstance(node, MLP) and mlps is not None:
                mlps[node.layer] = float(value)
            elif isinstance(node, Expert) and experts is not None:
                experts[node.layer, shape.column(node)] = float(value)
        return cls(
            heads,
            mlps,
            clean,
            corrupted,
            method,
            settings=dict(settings or {}),
            experts=experts,
            expert_shape=shape if shape.experts else None,
        )

    @property
    def shape(self) -> ModelShape:
        if self.expert_shape is not None:
            return self.expert_shape
        n_layers, n_heads = self.heads.shape
        return ModelShape(int(n_layers), int(n_heads), self.mlps is not None)

    def nodes(self) -> list[Node]:
        """The scored nodes in forward order."""
        return [n for n in self.shape.nodes() if not torch.isnan(torch.tensor(self[n]))]

    def __getitem__(self, node: str | Node) -> float:
        parsed = parse_node(node)
        self.shape.check(parsed)
        if isinstance(parsed, AttentionHead):
            return float(self.heads[parsed.layer, parsed.head])
        if isinstance(parsed, MLP):
            assert self.mlps is not None  # shape.check refused MLPs of attention-only models
            return float(self.mlps[parsed.layer])
        if isinstance(parsed, Expert):
            assert self.experts is not None  # shape.check refused experts without a split
            return float(self.experts[parsed.layer, self.shape.column(parsed)])
        raise NodeNameError(f"{parsed.name!r} has no score: only heads and MLPs are scored")

    def as_dict(self) -> dict[str, float]:
        """``{node name: effect}`` for every scored node, in forward order."""
        return {n.name: self[n] for n in self.nodes()}

    def normalized(self) -> NodeScores:
        """Effects divided by (clean − corrupted): −1 means a patch undoes the whole gap.

        In noising (a corrupted value patched into the clean run) a node that carries the
        whole effect scores −1; in denoising it scores +1.
        """
        gap = self.clean - self.corrupted
        if abs(gap) < 1e-12:
            raise MetricError(
                f"cannot normalise: the clean ({self.clean:.4g}) and corrupted "
                f"({self.corrupted:.4g}) metrics are equal"
            )

        def scale(t: Tensor | None) -> Tensor | None:
            return None if t is None else t / gap

        return NodeScores(
            heads=self.heads / gap,
            mlps=scale(self.mlps),
            clean=self.clean,
            corrupted=self.corrupted,
            method=self.method,
            heads_by_pos=scale(self.heads_by_pos),
            mlps_by_pos=scale(self.mlps_by_pos),
            settings={**self.settings, "normalized": True},
            experts=scale(self.experts),
            expert_shape=self.expert_shape,
        )

    def top(self, k: int, *, by_abs: bool = True) -> list[tuple[str, float]]:
        """The ``k`` nodes with the largest (absolute) effects, largest first."""
        items = list(self.as_dict().items())
        items.sort(key=lambda kv: abs(kv[1]) if by_abs else kv[1], reverse=True)
        return items[:k]

    def __repr__(self) -> str:
        top = ", ".join(f"{n}={v:+.3f}" for n, v in self.top(3))
        return f"NodeScores(method={self.method!r}, n={len(self.as_dict())}, top: {top})"
