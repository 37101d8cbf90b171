"""Subject–verb agreement (Linzen et al. 2016; Finlayson et al. 2021).

Template, with an attractor noun of the other number between subject and verb::

    The key near the cabinets   ->  " is", " was", " has"   (wrong: " are", " were", " have")

Corruption: the subject's number is flipped (``The keys near the cabinets`` -> " are").

Metric: logit difference, mean logit of the verbs agreeing with the subject − mean logit
of the other forms.
"""

from __future__ import annotations

import random
from typing import Any

from reuse_lens.tasks.base import PromptPair, TaskSpec, need
from reuse_lens.tasks.words import PREPOSITIONS, VERB_NUMBER, WordPool

TEMPLATES = (
    "The {SUBJ} {PREP} the {ATTR}",
    "The {SUBJ} that the {ATTR} liked",
    "The {SUBJ} who saw the {ATTR}",
)


def sample(pool: WordPool, rng: random.Random, **_: Any) -> PromptPair:
    need(pool.noun_number, 2, "singular/plural noun pairs", "sva")
    (subj_s, subj_p), (attr_s, attr_p) = rng.sample(pool.noun_number, 2)
    plural = rng.random() < 0.5
    t = rng.randrange(len(TEMPLATES))
    prep = rng.choice(PREPOSITIONS)
    verb_s, verb_p = rng.choice(VERB_NUMBER)
    # The attractor takes the other number, so a model must skip it to agree.
    attr = attr_s if plural else attr_p

    def fill(subj: str) -> str:
        return TEMPLATES[t].format(SUBJ=subj, PREP=prep, ATTR=attr)

    subj, other = (subj_p, subj_s) if plural else (subj_s, subj_p)
    right, wrong = (verb_p, verb_s) if plural else (verb_s, verb_p)
    # The prompt does not say which verb comes next, so every verb of the subject's number
    # is right (the drawn one first) and every verb of the other number wrong; otherwise
    # top-1 accuracy could not exceed one in len(VERB_NUMBER).
    rights = [right, *(p if plural else s for s, p in VERB_NUMBER if right not in (s, p))]
    wrongs = [wrong, *(s if plural else p for s, p in VERB_NUMBER if wrong not in (s, p))]
    return PromptPair(
        fill(subj),
        fill(other),
        tuple(f" {v}" for v in rights),
        tuple(f" {v}" for v in wrongs),
        f"{subj_s}|{attr_s}|{t}",
        {"plural": plural, "template": t},
    )


SPEC = TaskSpec(
    name="sva",
    sampler=sample,
    metric="logit_diff",
    paper="Finlayson et al. 2021, Causal Analysis of Syntactic Agreement Mechanisms (ACL)",
)
