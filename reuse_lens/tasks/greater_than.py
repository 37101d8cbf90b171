"""Greater-than (Hanna, Liu and Variengien 2023, "How does GPT-2 compute greater-than?").

Template::

    The war lasted from the year 1732 to the year 17   ->  any of "33" ... "99"

The right answers are every two-digit year above the start (YY); the wrong ones, every
year up to it. Years are kept only where the tokenizer splits " 17YY" into " 17" and
"YY", so the answer is one token.

Corruption: the start year's last two digits become 01 (``from the year 1701``).

Metric: probability difference, P(year > YY) − P(year ≤ YY).
"""

from __future__ import annotations

import random
from functools import cache
from typing import Any

from reuse_lens.tasks.base import PromptPair, TaskSpec, need
from reuse_lens.tasks.words import CENTURIES, WordPool

TEMPLATE = "The {EVENT} lasted from the year {CC}{YY} to the year {CC}"


@cache
def _years(pool: WordPool, century: str) -> tuple[str, ...]:
    tok = pool.tokenizer
    out = []
    for y in range(100):
        yy = f"{y:02d}"
        if tok is None:
            out.append(yy)
            continue
        whole = tok(f" {century}{yy}", add_special_tokens=False)["input_ids"]
        head = tok(f" {century}", add_special_tokens=False)["input_ids"]
        tail = tok(yy, add_special_tokens=False)["input_ids"]
        # A word-level vocabulary splits an unknown year into " 17" and <unk>: that year
        # would be an answer no model can name, so it is left out like any other.
        known = tok.unk_token_id is None or tok.unk_token_id not in tail
        if len(head) == 1 and len(tail) == 1 and whole == head + tail and known:
            out.append(yy)
    return tuple(out)


def sample(pool: WordPool, rng: random.Random, **_: Any) -> PromptPair:
    need(pool.events, 1, "event nouns", "greater_than")
    century = rng.choice(CENTURIES)
    years = _years(pool, century)
    need(years, 50, f"two-digit years after ' {century}'", "greater_than")
    # Hanna et al. draw start years 02..98 so that both answer sets are non-empty.
    starts = [y for y in years if 2 <= int(y) <= 98]
    start = rng.choice(starts)
    event = rng.choice(pool.events)
    clean = TEMPLATE.format(EVENT=event, CC=century, YY=start)
    corrupted = TEMPLATE.format(EVENT=event, CC=century, YY="01")
    above = tuple(y for y in years if int(y) > int(start))
    below = tuple(y for y in years if int(y) <= int(start))
    return PromptPair(clean, corrupted, above, below, f"{event}|{start}", {"start": int(start)})


SPEC = TaskSpec(
    name="greater_than",
    sampler=sample,
    metric="prob_diff",
    paper="Hanna, Liu and Variengien 2023, How does GPT-2 compute greater-than? (NeurIPS)",
)
