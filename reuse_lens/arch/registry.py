"""Which adapter reads which model: ``transformers`` ``model_type`` -> adapter."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from reuse_lens.arch.families import ADAPTERS
from reuse_lens.arch.legacy import extract_tl
from reuse_lens.patching._forward import Unsupported, Weights

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["TL_LAYOUT", "extract", "has_adapter", "model_type", "unshared_bytes"]

TL_LAYOUT = ("gpt2", "opt")
"""Read through TransformerLens's ``W_Q``/... properties (``legacy.py``), as are native
bridges; OPT's MLP and learned-position offset are hidden behind them."""


def model_type(model: TransformerBridge) -> str | None:
    """The ``transformers`` ``model_type`` behind a bridge; None for a native bridge."""
    config: Any = getattr(getattr(model, "original_model", None), "config", None)
    return getattr(config, "model_type", None)


def has_adapter(model: TransformerBridge) -> bool:
    """Whether an adapter is registered for the model's family (it may still refuse a
    variant, or fail the check against the bridge's logits)."""
    kind = model_type(model)
    return kind is None or kind in TL_LAYOUT or kind in ADAPTERS


def extract(model: TransformerBridge) -> Weights:
    """Read ``model``'s weights with its family's adapter, or raise ``Unsupported``.

    The result's ``own_bytes`` is set: what it holds that the model's parameters do not.
    """
    kind = model_type(model)
    if kind is None or kind in TL_LAYOUT:
        weights = extract_tl(model)
    else:
        adapter = ADAPTERS.get(kind)
        if adapter is None:
            raise Unsupported(
                f"no adapter reads the {kind!r} architecture (reuse_lens/arch/README.md says "
                "how to add one)"
            )
        try:
            weights = adapter.extract(model)
        except Unsupported:
            raise
        except (AttributeError, RuntimeError, NotImplementedError, TypeError, KeyError) as error:
            raise Unsupported(f"its {kind} weights cannot be read ({error})") from error
    return dataclasses.replace(weights, own_bytes=unshared_bytes(weights, model))


def unshared_bytes(weights: Weights, model: TransformerBridge) -> int:
    """Bytes of the tensors in ``weights`` whose storage is none of ``model``'s parameters'
    (each storage counted once)."""
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def visit(x: object) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in shared and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(x, list | tuple):
            for item in x:
                visit(item)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))

    visit(weights)
    return total
