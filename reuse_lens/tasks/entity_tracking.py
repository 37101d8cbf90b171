"""Entity tracking (Kim and Schuster 2023; Prakash et al. 2024, "Fine-Tuning Enhances
Existing Mechanisms").

Template::

    The apple is in box F, the pen is in box Q, the cup is in box X. Box F contains the
                                                                        ->  " apple"

Corruption: the question names another box of the same scene (``Box Q contains the`` ->
" pen"), whose object is the clean prompt's wrong answer.

Metric: logit difference, logit(object in the asked box) − logit(the other box's object).
"""

from __future__ import annotations

import random
from typing import Any

from reuse_lens.tasks.base import PromptPair, TaskSpec, need
from reuse_lens.tasks.words import WordPool


def sample(pool: WordPool, rng: random.Random, *, n_objects: int, **_: Any) -> PromptPair:
    need(pool.objects, n_objects, "objects", "entity_tracking")
    need(pool.box_labels, n_objects, "box labels", "entity_tracking")
    objects = rng.sample(pool.objects, n_objects)
    boxes = rng.sample(pool.box_labels, n_objects)
    ask, other = rng.sample(range(n_objects), 2)
    facts = ", ".join(f"the {o} is in box {b}" for o, b in zip(objects, boxes, strict=True))
    context = facts[:1].upper() + facts[1:] + "."
    clean = f"{context} Box {boxes[ask]} contains the"
    corrupted = f"{context} Box {boxes[other]} contains the"
    return PromptPair(
        clean,
        corrupted,
        (f" {objects[ask]}",),
        (f" {objects[other]}",),
        f"{objects[ask]}|{boxes[ask]}",
        {"n_objects": n_objects},
    )


SPEC = TaskSpec(
    name="entity_tracking",
    sampler=sample,
    metric="logit_diff",
    paper="Prakash et al. 2024, Fine-Tuning Enhances Existing Mechanisms (ICLR)",
    options={"n_objects": (3, 2, 4, 5)},
)
