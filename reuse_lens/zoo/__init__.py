"""The zoo: small models trained on a synthetic task language and shipped with reuse_lens.

``rl.load_model("zoo:<name>")`` resolves here. Each model is an HF GPT-2 folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``) under ``zoo/weights/<name>``,
read through ``importlib.resources`` and booted by the same ``boot_transformers`` path as
any local folder. ``weights/manifest.json`` records each model's config, seed, steps,
data mix, held-out scores and the sha256 of its weights; loading checks the sha256.
Rebuild the zoo with ``reuse_lens.zoo.train`` (``reuse-lens zoo train``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

from reuse_lens._io import sha256_file

__all__ = [
    "ZooError",
    "available",
    "checkpoints",
    "manifest",
    "model_folder",
    "shipped_folder",
    "status",
    "verify",
]

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


class ZooError(RuntimeError):
    """A zoo model that does not exist, is not shipped yet, or fails its checksum."""


def _weights() -> Traversable:
    return resources.files("reuse_lens.zoo").joinpath("weights")


def manifest() -> dict[str, Any]:
    """The shipped manifest: one entry per model under ``"models"``, or {} when none ship."""
    path = _weights().joinpath(MANIFEST)
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def available() -> list[str]:
    """The names of the shipped zoo models."""
    return sorted(manifest().get("models", {}))


def checkpoints(name: str) -> list[int]:
    """The steps of zoo model ``name``'s shipped checkpoints, in order (``zoo:<name>@<step>``).

    A fine-tune that teaches a new task keeps a few points of its run, so that a study can
    follow the new circuit forming; its step 0 is its parent, and its last step is itself.
    """
    return sorted(int(step) for step in _entry(name).get("checkpoints", {}))


def status() -> str:
    """One honest paragraph on what the zoo holds now."""
    entries = manifest().get("models", {})
    if not entries:
        return (
            "The zoo ships no trained models yet: its synthetic task language and tokenizer "
            "exist, but the trained models are still to be added."
        )
    lines = ["Zoo models (held-out accuracy / logit diff on the tasks each was trained on):"]
    for name, entry in sorted(entries.items()):
        scores = entry["eval"]["scores"]
        trained = ", ".join(
            f"{t} {scores[t]['accuracy']:.2f}/{scores[t]['logit_diff']:.1f}"
            for t in entry["trained_on"]
            if t in scores
        )
        cfg = entry["config"]
        shape = f"{cfg['n_layer']}L {cfg['n_head']}H d{cfg['n_embd']}"
        kind = " attn-only" if cfg.get("attn_only") else ""
        lines.append(f"  zoo:{name} ({shape}{kind}): {trained}")
    return "\n".join(lines)


def shipped_folder(name: str) -> Path:
    """The folder of shipped zoo model ``name`` on disk, after checking its checksum.

    ``boot_transformers`` needs a real folder; an installed wheel unpacks to one.
    """
    entry = _entry(name)
    folder = _weights().joinpath(name)
    if not isinstance(folder, Path):
        raise ZooError(
            f"zoo model 'zoo:{name}' is not on the file system (a zipped install?); "
            "install reuse_lens unzipped to fine-tune from it"
        )
    _verify(folder, entry, label=f"zoo:{name}")
    return folder


def _entry(name: str) -> dict[str, Any]:
    """The manifest entry of ``name``, or of checkpoint ``<model>@<step>`` (its sha256)."""
    model, _, step = name.partition("@")
    entries = manifest().get("models", {})
    if model not in entries:
        shipped = ", ".join(f"zoo:{n}" for n in sorted(entries)) or "none yet"
        raise ZooError(f"no zoo model 'zoo:{model}': the shipped zoo models are {shipped}")
    if not step:
        return entries[model]
    points = entries[model].get("checkpoints", {})
    if step not in points:
        kept = ", ".join(f"zoo:{model}@{s}" for s in sorted(points, key=int)) or "none"
        raise ZooError(
            f"zoo model 'zoo:{model}' has no checkpoint at step {step!r}: it keeps {kept}"
        )
    return points[step]


def _verify(folder: Path, entry: dict[str, Any], *, label: str) -> None:
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ZooError(f"zoo model {label!r} has no weights file {str(weights)!r}")
    found, expected = sha256_file(weights), entry["sha256"]
    if found != expected:
        raise ZooError(
            f"zoo model {label!r} fails its checksum: {str(weights)!r} has sha256 {found}, "
            f"but the manifest records {expected}. The file is corrupted or was replaced; "
            "reinstall reuse_lens, or rebuild the zoo with `reuse-lens zoo train`."
        )


@contextmanager
def model_folder(name: str) -> Iterator[Path]:
    """The folder of zoo model ``name`` (no ``zoo:`` prefix), checksum verified, while the
    ``with`` block runs; ``rl.load_model("zoo:<name>")`` loads it from there.

    Raises:
        ZooError: for a name that is not shipped (the message lists those that are), or
            weights whose sha256 differs from the manifest's.
    """
    entry = _entry(name)
    with resources.as_file(_weights().joinpath(name)) as path:
        verify(Path(path), entry, name=name)
        yield Path(path)


def verify(folder: Path, entry: dict[str, Any], *, name: str) -> None:
    """Check the weights in ``folder`` against manifest ``entry`` of zoo model ``name``."""
    _verify(folder, entry, label=f"zoo:{name}")
