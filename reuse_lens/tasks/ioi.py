"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild").

Template (ABBA and BABA orders of the first two names)::

    When Mary and John went to the store, John gave a bag to   ->  " Mary"

The answer is the indirect object (IO), the wrong answer the repeated subject (S).

Corruptions (option ``corruption``):

- ``"abc"`` (default): all three names replaced by fresh ones,
  ``When Alice and Bob went to the store, Carl gave a bag to``.
- ``"s2_io"``: the second mention of S becomes IO, which flips the answer to S
  (Merullo et al. 2024), ``When Mary and John went to the store, Mary gave a bag to``.

Metric: logit difference, logit(IO) − logit(S).
"""

from __future__ import annotations

import random
from typing import Any

from reuse_lens.tasks.base import PromptPair, TaskSpec, need
from reuse_lens.tasks.words import WordPool

TEMPLATES = (
    "When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "When {A} and {B} arrived at the {PLACE}, {S} handed a {OBJECT} to",
    "The {PLACE} was closed, so {A} and {B} went home, where {S} gave a {OBJECT} to",
)


def sample(pool: WordPool, rng: random.Random, *, corruption: str, **_: Any) -> PromptPair:
    need(pool.names, 5, "names", "ioi")
    io, s, a2, b2, c2 = rng.sample(pool.names, 5)
    t = rng.randrange(len(TEMPLATES))
    order = rng.choice(("ABBA", "BABA"))
    place, obj = rng.choice(pool.places), rng.choice(pool.objects)
    first, second = (io, s) if order == "ABBA" else (s, io)

    def fill(a: str, b: str, s2: str) -> str:
        return TEMPLATES[t].format(A=a, B=b, S=s2, PLACE=place, OBJECT=obj)

    clean = fill(first, second, s)
    corrupted = fill(a2, b2, c2) if corruption == "abc" else fill(first, second, io)
    key = f"{min(io, s)}|{max(io, s)}|{t}"
    return PromptPair(
        clean,
        corrupted,
        (f" {io}",),
        (f" {s}",),
        key,
        {"template": t, "order": order, "io": io, "s": s},
    )


SPEC = TaskSpec(
    name="ioi",
    sampler=sample,
    metric="logit_diff",
    paper="Wang et al. 2022, Interpretability in the Wild (arXiv:2211.00593)",
    options={"corruption": ("abc", "s2_io")},
)
