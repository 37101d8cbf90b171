"""Small models and tasks for the patching tests."""

from __future__ import annotations

from typing import Any

import torch

import reuse_lens as rl
from tests.conftest import native_config

MODEL_KINDS = ("native_ln", "native_noln", "attn_only", "hf", "rotary_rms")
"""``rotary_rms`` is outside what the fast forward covers: it is patched through hooks."""


def make_model(kind: str, hf_model: Any = None) -> Any:
    if kind == "hf":
        return hf_model
    overrides: dict[str, Any] = {
        "native_ln": {},
        "native_noln": {"normalization_type": None},
        "attn_only": {"attn_only": True},
        "rotary_rms": {
            "positional_embedding_type": "rotary",
            "rotary_dim": 8,
            "normalization_type": "RMS",
        },
    }[kind]
    return rl.load_model(native_config(**overrides))


def random_task(
    model: Any,
    *,
    n: int = 3,
    width: int = 5,
    lengths: list[int] | None = None,
    seed: int = 0,
    same: bool = False,
) -> rl.Task:
    """Random prompt pairs whose corrupted partners differ at one or two positions.

    ``lengths`` gives each prompt's own length (all ``width`` by default); ``same`` makes
    every corrupted prompt equal to its clean one.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.cfg.d_vocab)
    lengths = lengths or [width] * n
    clean, corrupted, answers, wrong = [], [], [], []
    for length in lengths:
        ids = torch.randint(1, vocab, (length,), generator=gen)
        other = ids.clone()
        if not same:
            for pos in {1 % length, (length // 2)}:
                other[pos] = (
                    ids[pos] + 1 + torch.randint(0, vocab - 2, (1,), generator=gen)
                ) % vocab
        clean.append(ids.tolist())
        corrupted.append(other.tolist())
        a, b = torch.randperm(vocab, generator=gen)[:2].tolist()
        answers.append(a)
        wrong.append(b)
    return rl.Task.from_pairs(model, clean, corrupted, answers, wrong, name="random")
