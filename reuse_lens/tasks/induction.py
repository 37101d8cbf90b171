"""Induction (Olsson et al. 2022, "In-context Learning and Induction Heads").

A random sequence of words, then its start repeated::

    pen lake card siege blue ... pen lake card   ->  " siege"

Corruption: in the first copy, the word after the repeated prefix's last word is
replaced by a fresh one (``pen lake card cup blue ... pen lake card`` -> " cup"), so an
induction head copies a different token.

Metric: logit difference, logit(copied word) − logit(the corrupted copy's word).

Without a tokenizer, the sequence is random token ids from the model's vocabulary.
"""

from __future__ import annotations

import random
from typing import Any

from reuse_lens.tasks.base import PromptPair, TaskSpec, need
from reuse_lens.tasks.words import WordPool

MIN_LEN, MAX_LEN = 6, 10


def sample(
    pool: WordPool, rng: random.Random, *, d_vocab: int | None = None, **_: Any
) -> PromptPair:
    length = rng.randint(MIN_LEN, MAX_LEN)
    prefix = rng.randint(2, length - 1)
    if not pool.text:
        if d_vocab is None or d_vocab < length + 3:
            need([], length + 1, "token ids", "induction")
        ids = rng.sample(range(1, int(d_vocab or 0)), length + 1)
        seq, fresh = ids[:length], ids[length]
        corrupted_seq = [*seq[:prefix], fresh, *seq[prefix + 1 :]]
        return PromptPair(
            [0, *seq, *seq[:prefix]],
            [0, *corrupted_seq, *seq[:prefix]],
            (seq[prefix],),
            (fresh,),
            "|".join(map(str, seq)),
            {"length": length},
        )
    need(pool.induction_words, length + 1, "words", "induction")
    words = rng.sample(pool.induction_words, length + 1)
    seq, fresh = words[:length], words[length]
    corrupted_seq = [*seq[:prefix], fresh, *seq[prefix + 1 :]]
    # Every word keeps its leading space, the form WordPool checked to be one token.
    clean = "".join(f" {w}" for w in [*seq, *seq[:prefix]])
    corrupted = "".join(f" {w}" for w in [*corrupted_seq, *seq[:prefix]])
    return PromptPair(
        clean,
        corrupted,
        (f" {seq[prefix]}",),
        (f" {fresh}",),
        "|".join(seq),
        {"length": length},
    )


SPEC = TaskSpec(
    name="induction",
    sampler=sample,
    metric="logit_diff",
    paper="Olsson et al. 2022, In-context Learning and Induction Heads (Transformer Circuits)",
)
