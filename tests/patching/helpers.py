"""Small models and tasks for the patching tests."""

from __future__ import annotations

import dataclasses
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
    if not same:
        return rl.Task.from_pairs(model, clean, corrupted, answers, wrong, name="random")
    # from_pairs refuses pairs whose corruption changes nothing (they measure nothing);
    # the engines' own guards and the zero-effect invariant are tested on a task made
    # around it.
    other_first = [[(ids[0] + 1) % vocab, *ids[1:]] for ids in clean]
    task = rl.Task.from_pairs(model, clean, other_first, answers, wrong, name="random")
    return dataclasses.replace(task, corrupted=task.clean.clone())


def separable_task(model: Any, *, n: int = 6, width: int = 6, seed: int = 0) -> rl.Task:
    """Random prompt pairs that ``model`` tells apart: answers its own clean top token.

    The answer is the clean run's top token and the wrong answer the corrupted run's (its
    second when they agree), so logit_diff is >= 0 on clean and <= 0 on corrupted; of
    ``3 n`` random pairs the ``n`` with the largest clean − corrupted margin are kept, so
    that ``discover_circuit``'s separation check passes on a random model.
    """
    from reuse_lens.evaluation import answer_logits

    task = random_task(model, n=3 * n, width=width, seed=seed)
    clean = answer_logits(model, task.clean, task.answer_pos)
    corrupted = answer_logits(model, task.corrupted, task.answer_pos)
    right = clean.argmax(-1)
    wrong = corrupted.argmax(-1)
    wrong = torch.where(wrong == right, corrupted.topk(2).indices[:, 1], wrong)
    rows = torch.arange(len(right))
    margin = (clean[rows, right] - clean[rows, wrong]) - (
        corrupted[rows, right] - corrupted[rows, wrong]
    )
    keep = margin.topk(n).indices.sort().values.tolist()
    chosen = task.select(keep)
    return rl.Task.from_pairs(
        model,
        chosen.clean.tolist(),
        chosen.corrupted.tolist(),
        right[keep].tolist(),
        wrong[keep].tolist(),
        name="separable",
    )
