"""The zoo: small models trained on a synthetic task language and shipped with reuse_lens.

``rl.load_model("zoo:<name>")`` resolves here. The models themselves are added by the
zoo issue; until their manifest ships, every name fails with a clear error.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["ZooError", "available", "load", "manifest", "status"]

MANIFEST = "manifest.json"


class ZooError(RuntimeError):
    """A zoo model that does not exist, is not shipped yet, or fails its checksum."""


def manifest() -> dict[str, Any]:
    """The shipped manifest: one entry per model, or {} when no models ship yet."""
    path = resources.files("reuse_lens.zoo").joinpath("weights", MANIFEST)
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def available() -> list[str]:
    """The names of the shipped zoo models."""
    return sorted(manifest().get("models", {}))


def status() -> str:
    """One honest paragraph on what the zoo holds now."""
    names = available()
    if not names:
        return (
            "The zoo ships no trained models yet: its synthetic task language and tokenizer "
            "exist, but the trained models (zoo:base, zoo:ft-<task>) are still to be added, "
            "so there is no demo to run on them."
        )
    return "Zoo models: " + ", ".join(f"zoo:{n}" for n in names)


def load(
    name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> TransformerBridge:
    """Load zoo model ``name`` (without the ``zoo:`` prefix)."""
    names = available()
    if name not in names:
        shipped = ", ".join(f"zoo:{n}" for n in names) or "none yet"
        raise ZooError(f"no zoo model 'zoo:{name}': the shipped zoo models are {shipped}")
    raise ZooError(f"zoo model 'zoo:{name}' is listed but loading is not implemented")
