"""What ``models.load_model`` needs to know about a family before TransformerLens boots it.

TransformerLens 4.3 picks its adapter by the architecture name in a model's config, and
spells some names otherwise than ``transformers`` saves them; and it fails on some
layouts with a bare tensor error from deep inside its weight conversion. Both are
answered here, from the ``transformers`` config alone, so that the loader can name the
family and the reason.
"""

from __future__ import annotations

from typing import Any

__all__ = ["boot_overrides", "unbootable_reason"]


def _architectures(config: Any) -> list[str]:
    return list(getattr(config, "architectures", None) or [])


def boot_overrides(config: Any) -> dict[str, Any]:
    """``hf_config_overrides`` for ``boot_transformers``: the architecture name as
    TransformerLens spells it, where the config's differs only in case.

    ``transformers`` saves PhiMoE as ``PhimoeForCausalLM``; TransformerLens registers
    ``PhiMoEForCausalLM`` and fails every PhiMoE folder with a list of 170 names. The
    name goes in as ``original_architecture``, which TransformerLens reads first.
    """
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    names = _architectures(config)
    if not names or any(name in SUPPORTED_ARCHITECTURES for name in names):
        return {}
    by_lower = {known.lower(): known for known in SUPPORTED_ARCHITECTURES}
    for name in names:
        known = by_lower.get(name.lower())
        if known is not None:
            return {"original_architecture": known}
    return {}


def unbootable_reason(config: Any) -> str | None:
    """Why TransformerLens 4.3 cannot build a bridge for this config, or None.

    Falcon's new decoder architecture with more than one key/value head (Falcon-40B and
    -180B): TransformerLens splits the fused ``query_key_value`` as ``[q | k | v]`` with
    one key/value head, while those models interleave each key/value group's queries,
    key and value; it fails with a ``split_with_sizes`` error.
    """
    name = next(iter(_architectures(config)), type(config).__name__)
    model_type = getattr(config, "model_type", None)
    if model_type == "falcon" and getattr(config, "new_decoder_architecture", False):
        n_kv = int(getattr(config, "num_kv_heads", 1) or 1)
        if n_kv > 1:
            return (
                f"{name} with new_decoder_architecture=True and num_kv_heads={n_kv} "
                "(the Falcon-40B/180B layout) cannot be loaded by TransformerLens 4.3: it "
                "splits the fused query_key_value as one key/value head's queries, key and "
                "value, while this layout interleaves a group of queries with its key and "
                f"value for each of the {n_kv} key/value heads. Falcon models with one "
                "key/value head (multi_query, Falcon-7B) load."
            )
    return None
