"""Which adapter reads which model: ``transformers`` ``model_type`` -> adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reuse_lens.arch.families import ADAPTERS
from reuse_lens.arch.legacy import extract_tl
from reuse_lens.patching._forward import Unsupported, Weights

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["TL_LAYOUT", "extract", "model_type"]

TL_LAYOUT = ("gpt2", "opt")
"""Read through TransformerLens's ``W_Q``/... properties (``legacy.py``), as are native
bridges; OPT's MLP and learned-position offset are hidden behind them."""


def model_type(model: TransformerBridge) -> str | None:
    """The ``transformers`` ``model_type`` behind a bridge; None for a native bridge."""
    config: Any = getattr(getattr(model, "original_model", None), "config", None)
    return getattr(config, "model_type", None)


def extract(model: TransformerBridge) -> Weights:
    """Read ``model``'s weights with its family's adapter, or raise ``Unsupported``."""
    kind = model_type(model)
    if kind is None or kind in TL_LAYOUT:
        return extract_tl(model)
    adapter = ADAPTERS.get(kind)
    if adapter is None:
        raise Unsupported(
            f"no adapter reads the {kind!r} architecture (reuse_lens/arch/README.md says how "
            "to add one)"
        )
    try:
        return adapter.extract(model)
    except Unsupported:
        raise
    except (AttributeError, RuntimeError, NotImplementedError, TypeError, KeyError) as error:
        raise Unsupported(f"its {kind} weights cannot be read ({error})") from error
