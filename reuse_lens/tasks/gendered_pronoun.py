"""Gendered pronouns (Mathwin et al. 2023; used by Conmy et al. 2023, ACDC).

Template::

    So Mary is a really great friend, isn't   ->  " she"   (wrong: " he")

Corruption: the name becomes one of the other gender, which flips the pronoun.

Metric: logit difference, logit(pronoun of the name's gender) − logit(the other pronoun).
"""

from __future__ import annotations

import random
from typing import Any

from reuse_lens.tasks.base import PromptPair, TaskSpec, need
from reuse_lens.tasks.words import ADJECTIVES, ROLES, WordPool

TEMPLATES = (
    "So {NAME} is a really {ADJ} {ROLE}, isn't",
    "Well, {NAME} is such a {ADJ} {ROLE}, isn't",
    "I think {NAME} is a very {ADJ} {ROLE}, isn't",
)


def sample(pool: WordPool, rng: random.Random, **_: Any) -> PromptPair:
    need(pool.male_names, 1, "male names", "gendered_pronoun")
    need(pool.female_names, 1, "female names", "gendered_pronoun")
    male, female = rng.choice(pool.male_names), rng.choice(pool.female_names)
    is_male = rng.random() < 0.5
    t = rng.randrange(len(TEMPLATES))
    adj, role = rng.choice(ADJECTIVES), rng.choice(ROLES)
    name, other = (male, female) if is_male else (female, male)
    right, wrong = ("he", "she") if is_male else ("she", "he")

    def fill(n: str) -> str:
        return TEMPLATES[t].format(NAME=n, ADJ=adj, ROLE=role)

    return PromptPair(
        fill(name),
        fill(other),
        (f" {right}",),
        (f" {wrong}",),
        f"{name}|{t}",
        {"name": name, "template": t},
    )


SPEC = TaskSpec(
    name="gendered_pronoun",
    sampler=sample,
    metric="logit_diff",
    paper="Mathwin et al. 2023, Identifying a Preliminary Circuit for Predicting Gendered Pronouns in GPT-2 Small",
)
