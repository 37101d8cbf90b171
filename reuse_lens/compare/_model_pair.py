"""Two models that one comparison reads side by side: a base and its fine-tune.

``component_drift`` and ``cross_model_patching`` compare a model with a copy of it that
was trained further. Both need the two to have the same nodes, the same architecture and
the same vocabulary, and both read the weights through the architecture adapters
(``reuse_lens.arch``), so that "head 3's W_Q" means the same slice on every family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reuse_lens.models import check_model, model_spec
from reuse_lens.nodes import ModelShape, UnsupportedArchitectureError, shape_of

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.patching._forward import Weights

__all__ = ["ModelPairError", "check_pair_of_models", "label", "read_weights"]


class ModelPairError(ValueError):
    """Two models that cannot be compared node by node; the message says why."""


def label(model: TransformerBridge) -> str:
    """How a report names a model: its spec (``zoo:base``, a folder, a hub id)."""
    return model_spec(model)


def _architecture(model: TransformerBridge) -> str:
    from reuse_lens.arch.registry import model_type

    return model_type(model) or f"native {type(model.cfg).__name__}"


def check_pair_of_models(
    base: object, tuned: object, *, what: str = "the two models"
) -> tuple[TransformerBridge, TransformerBridge, ModelShape]:
    """The two models and their common shape, or ModelPairError naming the difference.

    A fine-tune and its base share the architecture, every node and the vocabulary; two
    models that differ in any of them have no node-by-node correspondence.
    """
    base_model = check_model(base, "base")
    tuned_model = check_model(tuned, "tuned")
    names = (label(base_model), label(tuned_model))
    arch = (_architecture(base_model), _architecture(tuned_model))
    if arch[0] != arch[1]:
        raise ModelPairError(
            f"{what} have different architectures ({names[0]}: {arch[0]}, {names[1]}: "
            f"{arch[1]}); compare a model with a fine-tune of the same architecture"
        )
    shapes = (shape_of(base_model), shape_of(tuned_model))
    if shapes[0] != shapes[1]:
        raise ModelPairError(
            f"{what} have different shapes ({names[0]}: {_shape_text(shapes[0])}; "
            f"{names[1]}: {_shape_text(shapes[1])}): their nodes do not correspond one to "
            "one. Compare a model with a fine-tune of it."
        )
    dims = []
    for key in ("d_model", "d_head", "d_vocab", "n_key_value_heads"):
        values = tuple(getattr(m.cfg, key, None) for m in (base_model, tuned_model))
        if values[0] != values[1]:
            dims.append(f"{key} {values[0]} vs {values[1]}")
    if dims:
        raise ModelPairError(
            f"{what} differ in size ({names[0]} vs {names[1]}: {', '.join(dims)}); compare a "
            "model with a fine-tune of it"
        )
    return base_model, tuned_model, shapes[0]


def _shape_text(shape: ModelShape) -> str:
    mlps = "with MLPs" if shape.has_mlps else "attention-only"
    return f"{shape.n_layers} layers x {shape.n_heads} heads, {mlps}"


def read_weights(model: TransformerBridge) -> Weights:
    """The model's weights as the functional engine reads them (heads' k/v repeated per
    query head under grouped-query attention), or UnsupportedArchitectureError."""
    from reuse_lens.arch.registry import extract
    from reuse_lens.patching._forward import Unsupported

    try:
        return extract(model)
    except Unsupported as error:
        raise UnsupportedArchitectureError(
            f"the weights of {label(model)} ({_architecture(model)}) cannot be read per head "
            f"and MLP: {error}. Component drift needs an architecture adapter "
            "(reuse_lens/arch/README.md says how to add one)."
        ) from error
