"""Load any TransformerLens 4 model, offline where it can be, and fail fast where it cannot.

``load_model`` takes one spec and always returns a ``TransformerBridge`` in eval mode:

- ``"zoo:<name>"``: a model shipped with reuse_lens (see ``reuse_lens.zoo``);
- a local folder holding an HF ``config.json``, weights and a tokenizer;
- a hub id such as ``"gpt2"``: from the local HF cache, or the hub when it is reachable;
- a ``TransformerBridgeConfig`` or a dict of its fields: a randomly initialised native model;
- a ``TransformerBridge``: returned in eval mode, moved and cast in place when asked.

Whatever the spec, the parameters, ``cfg.device`` and ``cfg.dtype`` end up on the device and
in the dtype asked for; a device this machine lacks is refused before anything is loaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from reuse_lens._model_checks import (
    check_finite_weights,
    check_loading_info,
    check_zoo_config,
    non_finite_message,
)

if TYPE_CHECKING:
    import torch
    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

__all__ = [
    "ModelLoadError",
    "available_devices",
    "check_model",
    "describe",
    "load_model",
    "model_spec",
    "reachable",
    "weights_digest",
]

_SPEC_ATTR = "_reuse_lens_spec"
_HUB_PROBE_SECONDS = 3.0


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message names the spec and why."""


def load_model(
    spec: str | os.PathLike[str] | TransformerBridge | TransformerBridgeConfig | dict[str, Any],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
) -> TransformerBridge:
    """Load a model as a ``TransformerBridge`` in eval mode.

    Arguments:
        spec: ``"zoo:<name>"`` (``"zoo:<name>@<step>"`` for a checkpoint of a zoo
            fine-tune), a local folder, a hub id, a ``TransformerBridgeConfig`` or dict of
            its fields, or a ``TransformerBridge``.
        device: where to put the model, e.g. ``"cpu"``, ``"cuda"`` or ``"cuda:1"``; when
            None, TransformerLens's default (CUDA when available, else the CPU), or where
            the parameters of a given ``TransformerBridge`` already are.
        dtype: a torch dtype or its name (``"float32"``, ``"bfloat16"``); when None, float32
            (the dtype of a given ``TransformerBridge``'s parameters).
        revision: a checkpoint of the model: a hub revision (a branch, tag or commit, such
            as Pythia's ``"step1000"``), or for a zoo fine-tune the step of one of its
            shipped checkpoints (``revision="150"`` is ``"zoo:<name>@150"``).

    Returns:
        The model, in eval mode, with every parameter, ``cfg.device`` and ``cfg.dtype`` on
        the device and in the dtype asked for, whatever the kind of spec.

    Raises:
        ModelLoadError: at once, naming the spec, when it cannot be loaded, and before
            anything is loaded for a device this machine does not have (the message lists
            those it has) or a dtype that is not a floating-point torch dtype.
    """
    _check_spec(spec)
    spec = _with_revision(spec, revision)
    torch_dtype = _as_dtype(dtype)
    device = _check_device(device)
    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(spec, TransformerBridge):
        model = spec
        label = getattr(model, _SPEC_ATTR, None) or f"bridge:{model.cfg.model_name}"
    elif isinstance(spec, TransformerBridgeConfig | dict):
        model = _load_native(spec, device=device, dtype=torch_dtype)
        label = f"native:{model.cfg.model_name}"
    elif isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        if text.startswith("zoo:"):
            from reuse_lens import zoo

            with zoo.model_folder(text.removeprefix("zoo:")) as folder:
                model = _load_folder(folder, device=device, dtype=torch_dtype)
            label = text
        elif Path(text).expanduser().is_dir():
            model = _load_folder(Path(text).expanduser(), device=device, dtype=torch_dtype)
            label = str(text)
        else:
            model = _load_hub(text, device=device, dtype=torch_dtype, revision=revision)
            label = text if revision is None else f"{text}@{revision}"
    else:
        raise ModelLoadError(
            f"cannot load a model from {spec!r} ({type(spec).__name__}): give 'zoo:<name>', a "
            "local folder, a hub id, a TransformerBridgeConfig or dict, or a TransformerBridge"
        )
    _place(model, device, torch_dtype)
    if bad := check_finite_weights(model.named_parameters()):
        raise ModelLoadError(non_finite_message(f"model {label!r}", bad))
    model.eval()
    setattr(model, _SPEC_ATTR, label)
    return model


# A hub id is "name" or "owner/name" of letters, digits, '-', '_' and '.', as the hub
# itself requires; anything else can only be meant as a local folder.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


def _with_revision(spec: Any, revision: str | None) -> Any:
    """The spec with a zoo revision folded in (``zoo:<name>@<step>``); hub revisions go to
    the hub loader, and any other spec refuses one."""
    if revision is None:
        return spec
    if not isinstance(revision, str) or not revision.strip():
        raise ModelLoadError(
            f"revision must be a non-empty string such as 'step1000', got {describe(revision)}"
        )
    text = os.fspath(spec) if isinstance(spec, str | os.PathLike) else None
    if text is not None and text.startswith("zoo:"):
        if "@" in text:
            raise ModelLoadError(
                f"{text!r} already names a checkpoint: drop revision={revision!r} or the '@'"
            )
        return f"{text}@{revision.removeprefix('step')}"
    if text is None or Path(text).expanduser().exists():
        raise ModelLoadError(
            f"revision={revision!r} applies to hub ids and zoo fine-tunes, not to "
            f"{describe(spec) if text is None else repr(text)}: load the checkpoint's own "
            "folder instead"
        )
    return spec


def _check_spec(spec: object) -> None:
    """ModelLoadError for a spec that names a folder that is missing or lacks a tokenizer.

    Without this, a missing folder reaches the hub loader and comes back as an invalid hub
    id, and a folder without a tokenizer loads an empty one that fails much later.
    """
    if not isinstance(spec, str | os.PathLike):
        return  # configs and loaded models are checked by the loader
    text = os.fspath(spec)
    if text.startswith("zoo:"):
        return
    path = Path(text).expanduser()
    if path.is_file():
        raise ModelLoadError(
            f"model {text!r} is a file, not a model folder: give the folder that holds "
            "config.json, the weights and the tokenizer, a zoo:<name> spec or a hub id"
        )
    if not path.is_dir():
        if (
            isinstance(spec, os.PathLike)
            or not _HUB_ID.match(text)
            or ".." in text
            or _names_a_local_folder(path)
        ):
            raise ModelLoadError(
                f"there is no model folder {text!r}: give an existing folder (made with "
                "save_pretrained), a zoo:<name> spec (see `reuse-lens zoo list`) or a hub id "
                "such as 'gpt2'"
            )
        return
    if (path / "config.json").is_file() and not any(
        (path / name).is_file() for name in _TOKENIZER_FILES
    ):
        raise ModelLoadError(
            f"model folder {text!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): "
            "save one there with tokenizer.save_pretrained(folder)"
        )


def _names_a_local_folder(path: Path) -> bool:
    """Whether ``owner/name`` starts at a folder that exists here (``models/x`` beside a
    ``models`` folder): then it is a path with a typo, not a hub id, and asking the hub
    would only wait for a network that is not the problem."""
    parts = path.parts
    return len(parts) > 1 and Path(parts[0]).is_dir()


def describe(value: object) -> str:
    """A value as an error message names it: ``None``, ``the string 'gpt2'``, ``a list``."""
    if value is None:
        return "None"
    if isinstance(value, str):
        return f"the string {value!r:.60}"
    return f"a {type(value).__name__}"


def check_model(model: object, arg: str = "model") -> TransformerBridge:
    """The model itself, or TypeError when ``model`` is not a loaded model.

    A model is anything with a TransformerLens ``cfg`` that can be called; a spec string
    is the most common mistake, so the message says how to load it.
    """
    if isinstance(model, str | os.PathLike):
        raise TypeError(
            f"{arg} must be a loaded model, got {describe(model)}: load it first with "
            f"model = rl.load_model({os.fspath(model)!r})"
        )
    if model is None or not hasattr(model, "cfg") or not callable(model):
        raise TypeError(
            f"{arg} must be a loaded model (a TransformerBridge from rl.load_model), got "
            f"{describe(model)}"
        )
    return model  # type: ignore[return-value]


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

    if dtype is None:
        return None
    resolved = (
        dtype
        if isinstance(dtype, torch.dtype)
        else getattr(torch, str(dtype).removeprefix("torch."), None)
    )
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}: use e.g. 'float32' or 'bfloat16'")
    if not resolved.is_floating_point:
        raise ModelLoadError(
            f"dtype {dtype!r} is not a floating-point dtype: use 'float32', 'bfloat16' or 'float16'"
        )
    return resolved


def available_devices() -> list[str]:
    """The devices this machine can put a model on: ``cpu``, then each accelerator."""
    import torch

    found = ["cpu"]
    found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    for kind in ("xpu", "npu"):
        module = getattr(torch, kind, None)
        if module is not None and module.is_available():
            found += [f"{kind}:{i}" for i in range(module.device_count())]
    return found


def _check_device(device: str | torch.device | None) -> str | None:
    """The device as a string that TransformerLens keeps in ``cfg.device``, or a clear error.

    torch accepts ``"cuda"`` or ``"cuda:7"`` as names and only fails at the first tensor
    moved there; the HF loaders then fall back to the CPU while ``cfg`` keeps the name.
    Checking here makes a missing device an error at load time.
    """
    import torch

    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelLoadError(
            f"unknown device {device!r}: {error}. This machine has "
            f"{', '.join(available_devices())}."
        ) from error
    if parsed.type == "cpu":
        return str(device)
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        present = torch.cuda.is_available() and (parsed.index is None or parsed.index < count)
    elif parsed.type == "mps":
        present = torch.backends.mps.is_available()
    else:
        module: Any = getattr(torch, parsed.type, None)
        try:  # torch.xpu, torch.npu, ...: the same interface as torch.cuda
            present = bool(module.is_available())
            if present and parsed.index is not None:
                present = parsed.index < int(module.device_count())
        except AttributeError:
            present = False
    if not present:
        raise ModelLoadError(
            f"device {str(device)!r} is not available: this machine has "
            f"{', '.join(available_devices())}. Pass one of them as device=, or "
            "device=None for the default."
        )
    return str(device)


def _place(model: TransformerBridge, device: str | None, dtype: torch.dtype | None) -> None:
    """Put every parameter on ``device`` in ``dtype``, and make ``model.cfg`` say so.

    TransformerBridge leaves a pre-loaded HF model where it is and records the device and
    dtype it was asked for in ``cfg`` all the same; the patching engines build their
    inputs from ``cfg.device`` and ``cfg.dtype``, so the two must agree. When ``device``
    or ``dtype`` is None, the parameters decide.
    """
    import torch

    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        return
    split = int(getattr(model.cfg, "n_devices", 1) or 1) > 1

    def all_on(name: str) -> bool:
        target = torch.device(name)
        return all(
            p.device.type == target.type and target.index in (None, p.device.index) for p in params
        )

    if device is None:
        named = getattr(model.cfg, "device", None)
        device = str(named) if named is not None and all_on(str(named)) else str(params[0].device)
    if dtype is None:
        dtype = params[0].dtype
    if not split and not all_on(device):
        model.to(device, print_details=False)
    if any(p.dtype != dtype for p in params):
        model.to(dtype, print_details=False)
    if not split:
        model.cfg.device = device
    model.cfg.dtype = dtype


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
    folder: Path, *, device: str | None, dtype: torch.dtype | None
) -> TransformerBridge:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"cannot load model from folder {str(folder)!r}: it has no config.json. A model "
            "folder holds an HF config.json, the weights and the tokenizer (save_pretrained)."
        )
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    from reuse_lens.arch.loading import boot_overrides, unbootable_reason

    try:
        tokenizer = load_local_tokenizer(folder)
    except Exception as error:
        raise ModelLoadError(
            f"cannot load the tokenizer of model folder {str(folder)!r}: {error}. Save one "
            "there with tokenizer.save_pretrained(folder)."
        ) from error
    dtype = dtype if dtype is not None else _default_dtype()
    device = device if device is not None else _default_device()
    try:
        # Loaded in the asked dtype and moved here: the bridge takes a pre-loaded model as
        # it is, whatever device and dtype it is told. Resized tensors are listed rather
        # than raised about, and transformers' own load report is kept quiet: the message
        # below names every disagreement (the report is not always printed).
        with _quiet_transformers():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, attn_implementation="eager", dtype=dtype,
                output_loading_info=True, ignore_mismatched_sizes=True,
            )  # fmt: skip
            hf_model, info = loaded
    except Exception as error:
        raise ModelLoadError(f"cannot load model from folder {str(folder)!r}: {error}") from error
    _check_folder_weights(folder, hf_model, info)
    reason = unbootable_reason(hf_model.config)
    if reason is not None:
        raise ModelLoadError(f"cannot load model from folder {str(folder)!r}: {reason}")
    try:
        hf_model = hf_model.to(device)
        return TransformerBridge.boot_transformers(
            str(folder),
            hf_config_overrides=boot_overrides(hf_model.config),
            hf_model=hf_model,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
        )
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"cannot load model from folder {str(folder)!r}: {error}") from error


def _check_folder_weights(folder: Path, hf_model: Any, info: dict[str, Any]) -> None:
    """ModelLoadError unless the weights in ``folder`` are exactly the model its
    config.json describes, every value finite (``reuse_lens._model_checks``)."""
    config = hf_model.config
    problems = check_loading_info(info, getattr(config, "num_hidden_layers", None))
    if problems:
        raise ModelLoadError(
            f"config.json of model folder {str(folder)!r} disagrees with its weights: "
            f"{'; '.join(problems)}. config.json must describe the model the weights were "
            "saved from: restore it, or save the model again with save_pretrained(folder)"
        )
    if zoo_copy := check_zoo_config(folder, config):
        raise ModelLoadError(f"config.json of model folder {str(folder)!r}: {zoo_copy}")
    if bad := check_finite_weights(hf_model.named_parameters()):
        raise ModelLoadError(non_finite_message(f"model folder {str(folder)!r}", bad))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level for one load, then as it was."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _default_dtype() -> torch.dtype:
    import torch

    return torch.float32


def _default_device() -> str:
    from transformer_lens.utilities import get_device

    return str(get_device())


def _hub_is_cached(name: str, revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json", revision=revision)
    return isinstance(found, str)


def _hub_is_reachable() -> bool:
    """One TCP connect with a short timeout, instead of the hub client's long retry loop.

    The name lookup has no timeout of its own (a resolver without a network can take a
    minute), so the whole probe runs in a thread that is given up on after the timeout.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    return reachable(url.hostname or "", port, _HUB_PROBE_SECONDS)


def reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds, name
    lookup included."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="reuse-lens-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _load_hub(
    name: str, *, device: str | None, dtype: torch.dtype | None, revision: str | None = None
) -> TransformerBridge:
    from transformer_lens.model_bridge import TransformerBridge

    cached = _hub_is_cached(name, revision)
    what = repr(name) if revision is None else f"revision {revision!r} of {name!r}"
    if not cached and not _hub_is_reachable():
        raise ModelLoadError(
            f"cannot load {what}: there is no local folder of that name, it is not "
            "in the Hugging Face cache, and the hub cannot be reached. Fix the path if it "
            "names a folder; or use a zoo model such as "
            "'zoo:base', a local folder saved with save_pretrained, or run where the hub is "
            "reachable."
        )
    try:
        return TransformerBridge.boot_transformers(
            name,
            device=device,
            dtype=dtype if dtype is not None else _default_dtype(),
            revision=revision,
        )
    except Exception as error:
        raise ModelLoadError(f"cannot load {what} from the hub: {error}") from error
