"""What ``load_model`` checks about the weights it loaded, before anything runs on them.

A model folder whose ``config.json`` disagrees with its weights loads without a word in
transformers: a smaller ``n_layer`` drops layers, a larger one initialises new ones at
random, and a config of other sizes stops with "see the report above" where no report
may be printed. A NaN anywhere in the weights (even in an embedding row no prompt uses)
turns some logits into NaN, and every number computed after it into nonsense. Each is
refused here, naming the tensors, so that nothing is ever measured on a model that is
not the one that was trained.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reuse_lens._io import sha256_file

if TYPE_CHECKING:
    import torch

__all__ = [
    "check_finite_weights",
    "check_loading_info",
    "check_zoo_config",
    "non_finite_message",
]

_LAYER = re.compile(r"\.(?:h|layers|layer|blocks|block|decoder_layers)\.(\d+)\.")
_SHOWN = 4  # tensor names listed in a message; the rest are counted
_FINITE_BLOCK = 1 << 24  # elements checked at a time: the check holds one bool per element


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"{shown}{more}"


def _layers(names: Iterable[str]) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := _LAYER.search(f".{n}"))})


def check_loading_info(info: Mapping[str, Any], n_layers: int | None) -> list[str]:
    """The problems transformers' loading ``info`` reports, as sentences (empty if none).

    Arguments:
        info: ``from_pretrained(..., output_loading_info=True)``'s second value, loaded
            with ``ignore_mismatched_sizes=True`` so that resized tensors are listed, not
            raised about.
        n_layers: the layer count ``config.json`` gives, for the hint on layers.

    Returns:
        One sentence per kind of disagreement: missing, unexpected and resized tensors.
    """
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda item: str(item[0]))
    problems = []
    if missing:
        hint = ""
        if (layers := _layers(missing)) and n_layers is not None:
            hint = f" (the weights hold {layers[0]} layers; config.json says {n_layers})"
        problems.append(
            f"the model config.json describes has {len(missing)} tensor(s) the weights lack, "
            f"which would be random: {_listing(missing)}{hint}"
        )
    if unexpected:
        hint = ""
        if (layers := _layers(unexpected)) and n_layers is not None:
            hint = f" (the weights hold {layers[-1] + 1} layers; config.json says {n_layers})"
        problems.append(
            f"the weights have {len(unexpected)} tensor(s) the model config.json describes "
            f"has no place for, which would be dropped: {_listing(unexpected)}{hint}"
        )
    if mismatched:
        sizes = [
            f"{name} is {list(saved)} in the weights but {list(wanted)} by config.json"
            for name, saved, wanted in mismatched
        ]
        problems.append(
            f"{len(mismatched)} tensor(s) have other sizes than config.json gives them: "
            f"{'; '.join(sizes[:_SHOWN])}"
            f"{f' and {len(sizes) - _SHOWN} more' if len(sizes) > _SHOWN else ''}"
        )
    return problems


def check_finite_weights(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int]]:
    """``(tensor name, count)`` for each parameter holding NaN or infinite values."""
    import torch

    bad: list[tuple[str, int]] = []
    with torch.no_grad():
        for name, tensor in named:
            if not tensor.is_floating_point():
                continue
            flat = tensor.detach().reshape(-1)
            count = 0
            for start in range(0, flat.numel(), _FINITE_BLOCK):
                block = flat[start : start + _FINITE_BLOCK]
                count += int(block.numel() - torch.isfinite(block).sum())
            if count:
                bad.append((name, count))
    return bad


def non_finite_message(label: str, bad: Sequence[tuple[str, int]]) -> str:
    listed = ", ".join(f"{name} ({count} value{'s' if count > 1 else ''})" for name, count in bad)
    return (
        f"the weights of {label} hold NaN or infinite values in {len(bad)} tensor(s): "
        f"{listed[:400]}. A model with such weights gives NaN logits, and every score "
        "measured on it would be meaningless: the file is damaged, or the training "
        "diverged; restore the weights"
    )


_ZOO_HASH_LIMIT = 64 << 20  # zoo weights are about a megabyte; larger files are no zoo copy


def check_zoo_config(folder: Path, config: Any) -> str | None:
    """A sentence when ``folder`` holds a zoo model's weights under another config.

    GPT-2's attention weights have the same sizes whatever the head count (q, k and v
    of every head side by side), so ``n_head: 8`` over a 4-head model loads 8 heads of
    half the size without any tensor disagreeing. No weights file records its head count;
    for the zoo's own weights (recognised by their sha256, in any folder) the manifest
    does, and the config is checked against it.
    """
    from reuse_lens import zoo

    weights = folder / zoo.WEIGHTS
    if not weights.is_file() or weights.stat().st_size > _ZOO_HASH_LIMIT:
        return None
    entries = zoo.manifest().get("models", {})
    if not entries:
        return None
    found = sha256_file(weights)
    for name, entry in entries.items():
        if entry.get("sha256") != found:
            continue
        wrong = [
            f"{key}={getattr(config, key)!r} (trained with {value!r})"
            for key, value in entry.get("config", {}).items()
            if hasattr(config, key) and getattr(config, key) != value
        ]
        if wrong:
            return (
                f"its weights are those of zoo:{name}, but config.json gives "
                f"{', '.join(wrong)}; the weights' sizes cannot show a head count, so the "
                f"model would be split into other heads than were trained. Restore "
                f"config.json, or load 'zoo:{name}' itself"
            )
    return None
