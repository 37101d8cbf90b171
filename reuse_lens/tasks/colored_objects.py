"""Colored Objects (Merullo et al. 2024, from BIG-bench's reasoning_about_colored_objects).

One worked example, then a scene of three objects in three of eight plain colours and a
question about one object; the answer is the capitalised colour::

    Q: On the desk, I see a red pen, a blue cup, and a black hat. What color is the cup?
    A: Blue

    Q: On the table, I see a green key, a white box, and a purple lamp. What color is the box?
    A:                                                                  ->  " White"

Corruption: the question asks about a different object of the same scene, so the answer
becomes that object's colour (the wrong answer of the clean prompt).

Metric: logit difference, logit(colour asked) − logit(colour of the corrupted question).
"""

from __future__ import annotations

import random
from typing import Any

from reuse_lens.tasks.base import PromptPair, TaskSpec, need
from reuse_lens.tasks.words import WordPool, capitalize

N_OBJECTS = 3


def _scene(pool: WordPool, rng: random.Random) -> tuple[str, list[str], list[str]]:
    objects = rng.sample(pool.scene_objects, N_OBJECTS)
    colors = rng.sample(pool.colors, N_OBJECTS)
    return rng.choice(pool.surfaces), objects, colors


def _question(surface: str, objects: list[str], colors: list[str], ask: int) -> str:
    items = [f"a {c} {o}" for c, o in zip(colors, objects, strict=True)]
    listed = ", ".join(items[:-1]) + f", and {items[-1]}"
    return f"Q: On the {surface}, I see {listed}. What color is the {objects[ask]}?\nA:"


def sample(pool: WordPool, rng: random.Random, **_: Any) -> PromptPair:
    need(pool.colors, N_OBJECTS, "colours", "colored_objects")
    need(pool.scene_objects, N_OBJECTS, "objects", "colored_objects")
    example = _scene(pool, rng)
    shown = rng.randrange(N_OBJECTS)
    worked = _question(*example, shown) + f" {capitalize(example[2][shown])}\n\n"
    surface, objects, colors = _scene(pool, rng)
    ask, other = rng.sample(range(N_OBJECTS), 2)
    clean = worked + _question(surface, objects, colors, ask)
    corrupted = worked + _question(surface, objects, colors, other)
    key = f"{objects[ask]}|{colors[ask]}|{surface}"
    return PromptPair(
        clean,
        corrupted,
        (f" {capitalize(colors[ask])}",),
        (f" {capitalize(colors[other])}",),
        key,
        {"object": objects[ask], "color": colors[ask]},
    )


SPEC = TaskSpec(
    name="colored_objects",
    sampler=sample,
    metric="logit_diff",
    paper="Merullo, Eickhoff and Pavlick 2024, Circuit Component Reuse Across Tasks (ICLR)",
)
