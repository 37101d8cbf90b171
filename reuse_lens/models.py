"""Load any TransformerLens 4 model, offline where it can be, and fail fast where it cannot.

``load_model`` takes one spec and always returns a ``TransformerBridge`` in eval mode:

- ``"zoo:<name>"``: a model shipped with reuse_lens (see ``reuse_lens.zoo``);
- a local folder holding an HF ``config.json``, weights and a tokenizer;
- a hub id such as ``"gpt2"``: from the local HF cache, or the hub when it is reachable;
- a ``TransformerBridgeConfig`` or a dict of its fields: a randomly initialised native model;
- a ``TransformerBridge``: returned as it is, in eval mode.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    import torch
    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["ModelLoadError", "load_model", "model_spec", "weights_digest"]

_SPEC_ATTR = "_reuse_lens_spec"
_HUB_PROBE_SECONDS = 3.0


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message names the spec and why."""


def load_model(
    spec: str | os.PathLike[str] | TransformerBridge | TransformerBridgeConfig | dict[str, Any],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> TransformerBridge:
    """Load a model as a ``TransformerBridge`` in eval mode.

    Arguments:
        spec: ``"zoo:<name>"``, a local folder, a hub id, a ``TransformerBridgeConfig`` or
            dict of its fields, or a ``TransformerBridge``.
        device: where to put the model, e.g. ``"cpu"`` or ``"cuda"``; the loader's default
            when None.
        dtype: a torch dtype or its name (``"float32"``, ``"bfloat16"``); float32 when None.

    Returns:
        The model, in eval mode.

    Raises:
        ModelLoadError: at once, naming the spec, when it cannot be loaded.
    """
    torch_dtype = _as_dtype(dtype)
    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(spec, TransformerBridge):
        model = spec
        if device is not None:
            model = model.to(device)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        label = getattr(model, _SPEC_ATTR, None) or f"bridge:{model.cfg.model_name}"
    elif isinstance(spec, TransformerBridgeConfig | dict):
        model = _load_native(spec, device=device, dtype=torch_dtype)
        label = f"native:{model.cfg.model_name}"
    elif isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        if text.startswith("zoo:"):
            from reuse_lens import zoo

            return zoo.load(text.removeprefix("zoo:"), device=device, dtype=torch_dtype)
        if Path(text).expanduser().is_dir():
            model = _load_folder(Path(text).expanduser(), device=device, dtype=torch_dtype)
            label = str(text)
        else:
            model = _load_hub(text, device=device, dtype=torch_dtype)
            label = text
    else:
        raise ModelLoadError(
            f"cannot load a model from {spec!r} ({type(spec).__name__}): give 'zoo:<name>', a "
            "local folder, a hub id, a TransformerBridgeConfig or dict, or a TransformerBridge"
        )
    model.eval()
    setattr(model, _SPEC_ATTR, label)
    return model


def model_spec(model: TransformerBridge) -> str:
    """The spec a model was loaded from, for the metadata of circuits and reports."""
    return getattr(model, _SPEC_ATTR, None) or f"bridge:{model.cfg.model_name}"


def weights_digest(model: TransformerBridge) -> str:
    """The sha256 of a model's parameters (names, dtypes, shapes and values).

    A spec names a model, not its weights: ``"zoo:base"`` after a zoo retrain, or a local
    folder that was overwritten, loads other weights under the same name. Results cached
    by spec alone would then be reused for the wrong model; cache them by this digest too.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        data = param.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(param.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}: use e.g. 'float32' or 'bfloat16'")
    return resolved


def _load_native(
    config: TransformerBridgeConfig | dict[str, Any],
    *,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
) -> TransformerBridge:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        # boot_native is attached to TransformerBridge by its sources package at import.
        return TransformerBridge.boot_native(config, device=device, dtype=dtype)  # type: ignore[attr-defined]
    except Exception as error:
        raise ModelLoadError(
            f"cannot build a native model from config {config!r}: {error}"
        ) from error


def load_local_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder``, set up so that the bridge never asks the hub.

    TransformerBridge reads ``name_or_path`` to decide whether to fetch a tokenizer, and
    prepends BOS only when ``add_bos_token`` is set (DESIGN.md, facts about the stack).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(folder), local_files_only=True, add_bos_token=True, name_or_path=str(folder)
    )
    return tokenizer


def _load_folder(
    folder: Path, *, device: str | torch.device | None, dtype: torch.dtype | None
) -> TransformerBridge:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"cannot load model from folder {str(folder)!r}: it has no config.json. A model "
            "folder holds an HF config.json, the weights and the tokenizer (save_pretrained)."
        )
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    try:
        tokenizer = load_local_tokenizer(folder)
    except Exception as error:
        raise ModelLoadError(
            f"cannot load the tokenizer of model folder {str(folder)!r}: {error}. Save one "
            "there with tokenizer.save_pretrained(folder)."
        ) from error
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, attn_implementation="eager"
        )
        return TransformerBridge.boot_transformers(
            str(folder),
            hf_model=hf_model,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype if dtype is not None else _default_dtype(),
        )
    except Exception as error:
        raise ModelLoadError(f"cannot load model from folder {str(folder)!r}: {error}") from error


def _default_dtype() -> torch.dtype:
    import torch

    return torch.float32


def _hub_is_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return isinstance(found, str)


def _hub_is_reachable() -> bool:
    """One TCP connect with a short timeout, instead of the hub client's long retry loop."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=_HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def _load_hub(
    name: str, *, device: str | torch.device | None, dtype: torch.dtype | None
) -> TransformerBridge:
    from transformer_lens.model_bridge import TransformerBridge

    cached = _hub_is_cached(name)
    if not cached and not _hub_is_reachable():
        raise ModelLoadError(
            f"cannot load model {name!r}: it is not a local folder, not in the Hugging Face "
            "cache, and the hub cannot be reached (offline). Use a zoo model such as "
            "'zoo:base', a local folder saved with save_pretrained, or run where the hub is "
            "reachable."
        )
    try:
        return TransformerBridge.boot_transformers(
            name, device=device, dtype=dtype if dtype is not None else _default_dtype()
        )
    except Exception as error:
        raise ModelLoadError(f"cannot load model {name!r} from the hub: {error}") from error
