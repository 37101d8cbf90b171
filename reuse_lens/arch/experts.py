"""Mixture-of-experts MLPs read expert by expert.

``transformers`` 5 builds every sparse mixture-of-experts block from the same parts
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS, Granite-MoE, PhiMoE): a router that
returns ``(logits, top-k weights, top-k expert indices)`` per token, an ``experts``
module called as ``experts(x, indices, weights)`` that adds up each token's weighted
expert outputs, and, in Qwen2-MoE, a shared expert behind a sigmoid gate. ``Mixture``
calls those parts, so an expert's term is what the model's own code computes, whatever
the expert's activation (SwiGLU, GPT-OSS's clamped variant) or the router's rule
(softmax then top-k, top-k then softmax, sparsemixer).

An expert's *term* is its share of the block's output: the routing weight times the
expert's output at the tokens routed to it, zero at the others. The terms of a block
add up to its output, which ``Mixture.mismatch`` tests on real activations before any
engine relies on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from reuse_lens.arch.hf import original

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["Mixture", "NoMixture", "Routing", "expert_counts", "mixtures"]


class NoMixture(ValueError):
    """A model without a mixture of experts that reuse_lens can read expert by expert
    (``nodes.shape_of`` says so as an ``UnsupportedArchitectureError``)."""


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to, and with what weight (the router's top-k)."""

    index: Int[Tensor, "tokens top_k"]
    weight: Float[Tensor, "tokens top_k"]

    def select(self, rows: Int[Tensor, " rows"]) -> Routing:
        return Routing(self.index[rows], self.weight[rows])


@dataclass(frozen=True)
class Mixture:
    """One block's mixture-of-experts MLP, through its own router and experts.

    Attributes:
        layer: the block.
        module: the ``transformers`` module (its forward output is what the block adds,
            before any residual multiplier of the decoder layer).
        router: returns ``(logits, weights, indices)``.
        experts: ``experts(x, indices, weights)``, the weighted sum of the routed experts.
        n_experts: routed experts.
        shared_expert: the expert every token goes through, or None.
        shared_gate: its sigmoid gate (one logit per token), or None.
    """

    layer: int
    module: nn.Module
    router: nn.Module
    experts: nn.Module
    n_experts: int
    shared_expert: nn.Module | None = None
    shared_gate: nn.Module | None = None

    @property
    def n_columns(self) -> int:
        """Routed experts, plus one for the shared expert."""
        return self.n_experts + int(self.shared_expert is not None)

    def route(self, x: Float[Tensor, "tokens d_model"]) -> Routing:
        _, weight, index = self.router(x)
        return Routing(index, weight)

    def terms(
        self, x: Float[Tensor, "tokens d_model"], routing: Routing
    ) -> Float[Tensor, "tokens column d_model"]:
        """Each expert's term at each token, routed experts in order, the shared one last.

        Each routed expert runs once, on the tokens routed to it, through the model's
        own ``experts`` module given that one expert per token: the cost of the block.
        """
        tokens, width = x.shape
        columns: list[Tensor] = []
        for k in range(self.n_experts):
            token, slot = (routing.index == k).nonzero(as_tuple=True)
            column = x.new_zeros(tokens, width)
            if token.numel():
                out = self.experts(
                    x[token], routing.index[token, slot, None], routing.weight[token, slot, None]
                )
                column = column.index_put((token,), out.to(x.dtype))
            columns.append(column)
        if self.shared_expert is not None:
            out = self.shared_expert(x)
            if self.shared_gate is not None:
                out = torch.sigmoid(self.shared_gate(x)) * out
            columns.append(out.to(x.dtype))
        return torch.stack(columns, dim=1)

    def mismatch(self, total: Float[Tensor, "... d_model"], output: Tensor) -> str | None:
        """Why ``total``, the sum of the terms of the input that gave the block's
        ``output`` (routed as the block routed it), is not that output, or None."""
        got = output.reshape(total.shape).float()
        scale = max(float(got.abs().max()), 1e-6)
        error = float((total.float() - got).abs().max())
        tolerance = 1e-4 if total.dtype == torch.float32 else 2e-2
        if error <= tolerance * scale:
            return None
        return (
            f"the mixture-of-experts MLP of layer {self.layer} ({type(self.module).__name__}) "
            f"does not add up to the sum of its experts' terms (largest difference "
            f"{error:.3g} on a scale of {scale:.3g}), so its experts cannot be nodes; "
            "analyse its MLPs whole (experts=False)"
        )


def _mixture(layer: int, mlp: Any) -> Mixture | None:
    module = original(mlp)
    experts = getattr(module, "experts", None)
    if experts is None:
        return None
    router = getattr(module, "router", None) or getattr(module, "gate", None)
    n_experts = getattr(experts, "num_experts", None) or getattr(router, "num_experts", None)
    if not isinstance(router, nn.Module) or not isinstance(n_experts, int):
        return None
    return Mixture(
        layer,
        module,
        router,
        experts,
        n_experts,
        getattr(module, "shared_expert", None),
        getattr(module, "shared_expert_gate", None),
    )


def mixtures(model: TransformerBridge) -> dict[int, Mixture]:
    """The mixture-of-experts MLP of every block that has one, by layer.

    Raises:
        NoMixture: for a model with none, or whose mixtures do not have
            ``transformers``' common router/experts parts.
    """
    found: dict[int, Mixture] = {}
    for layer, block in enumerate(model.blocks):
        mlp = getattr(block, "mlp", None)
        module = None if mlp is None else original(mlp)
        if module is None or getattr(module, "experts", None) is None:
            continue
        mixture = _mixture(layer, mlp)
        if mixture is None:
            raise NoMixture(
                f"the mixture-of-experts MLP of layer {layer} ({type(module).__name__}) "
                "lacks the router and experts that reuse_lens reads expert by expert; "
                "analyse its MLPs whole (experts=False)"
            )
        found[layer] = mixture
    if not found:
        raise NoMixture(
            "experts=True needs a mixture-of-experts model, and this one has dense MLPs "
            "only. Leave experts=False: each MLP is one node m{layer}."
        )
    return found


def expert_counts(model: Any) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Routed experts per layer (0 where the MLP is dense) and which layers have a shared
    expert: what ``ModelShape`` records of expert nodes."""
    found = mixtures(model)
    n_layers = int(model.cfg.n_layers)
    routed = tuple(found[layer].n_experts if layer in found else 0 for layer in range(n_layers))
    shared = tuple(
        layer in found and found[layer].shared_expert is not None for layer in range(n_layers)
    )
    return routed, shared
