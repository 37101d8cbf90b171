"""The zoo's synthetic task language: training documents, filler sentences and the vocabulary.

A *task document* is a prompt of a built-in task followed by its right answer, drawn
from the ``train`` split only, so that evaluation on the ``test`` split (the default of
``rl.tasks.load``) sees combinations of names, objects and templates the model never saw.
Where the corrupted prompt of a pair has a defined answer (it flips the answer to the
clean prompt's wrong one), it is a document too; IOI's ``abc`` corruption has none.

*Filler* documents are sentences from a small grammar over the same words, so that the
words also occur outside the task templates.

Training loss is on the answer token of task documents only (weight 1), plus a light
language-model loss (``LM_WEIGHT``) on every token of filler documents.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from reuse_lens.tasks import generate, names, spec
from reuse_lens.tasks.base import MAX_PROMPTS, PromptPair
from reuse_lens.tasks.words import (
    ADJECTIVES,
    COLORS,
    EVENTS,
    NAMES,
    NOUN_NUMBER,
    OBJECTS,
    PLACES,
    PREPOSITIONS,
    ROLES,
    VERB_NUMBER,
    WordPool,
    all_words,
)
from reuse_lens.zoo.tokenizer import PATTERN, build_tokenizer

__all__ = [
    "FILLER",
    "LM_WEIGHT",
    "STEPS",
    "Document",
    "encode",
    "filler",
    "mixture",
    "step_documents",
    "task_documents",
    "vocabulary",
    "zoo_tokenizer",
]

LM_WEIGHT = 0.1
"""Loss weight of each filler token: a light language-model signal."""

FILLER = "filler"
"""The name of the filler grammar in a data mix."""

_VOCAB_SAMPLES = 1000
"""Prompt pairs per task (both splits) whose pieces seed the vocabulary with template words."""


@dataclass(frozen=True)
class Document:
    """One training sequence: ``prompt`` then ``answer`` (empty for filler).

    ``answer`` is one piece with its leading space (``" Mary"``); the prompt's BOS is added
    at tokenization.
    """

    source: str
    prompt: str
    answer: str
    key: str = ""
    """The task pair's combination key (always of the ``train`` split); "" for filler."""

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def _answer_text(answer: str | int) -> str:
    return str(answer)


def _pair_documents(task: str, pair: PromptPair, rng: random.Random) -> list[Document]:
    clean, corrupted = str(pair.clean), str(pair.corrupted)
    if task == "greater_than":
        # Every year above the start is right (Hanna et al. 2023): sample one, so the model
        # learns the whole set. The corrupted prompt starts at 01, so 02..99 are right.
        above = [str(a) for a in pair.answers]
        below_and_start = [str(w) for w in pair.wrong]
        docs = [Document(task, clean, rng.choice(above), pair.key)]
        from_01 = [y for y in (*above, *below_and_start) if int(y) > 1]
        docs.append(Document(task, corrupted, rng.choice(from_01), pair.key))
        return docs
    docs = [Document(task, clean, _answer_text(pair.answers[0]), pair.key)]
    if task != "ioi":
        # The corruption flips the answer to the clean prompt's wrong one; IOI's abc
        # corruption has three fresh names and no defined answer.
        docs.append(Document(task, corrupted, _answer_text(pair.wrong[0]), pair.key))
    return docs


_CHUNK_SEED_STRIDE = 1_000_003
"""Seed offset between the chunks of one task's pairs (a prime, so no chunk's seed meets
another task option's)."""


def task_documents(task: str, n: int, *, seed: int) -> list[Document]:
    """About ``n`` documents of built-in ``task`` from its ``train`` split, deterministically."""
    pool = WordPool(None, text=True)
    rng = random.Random(f"docs:{task}:{seed}")
    per_pair = 1 if task == "ioi" else 2
    n_pairs = max(1, -(-n // per_pair))
    options: list[dict[str, Any]] = [{}]
    if task == "entity_tracking":
        # Vary the scene size for variety; evaluation uses the default of 3 objects.
        options = [{"n_objects": k} for k in (2, 3, 4, 5)]
    docs: list[Document] = []
    share = -(-n_pairs // len(options))
    for i, opts in enumerate(options):
        # generate() refuses more than MAX_PROMPTS pairs (a user asking for that many has
        # made a mistake); a long training run draws its pairs in chunks of that size, the
        # first with the seed every shorter run uses, so their data stays as it was.
        for j, start in enumerate(range(0, share, MAX_PROMPTS)):
            size = min(MAX_PROMPTS, share - start)
            chunk_seed = seed * 101 + i + _CHUNK_SEED_STRIDE * j
            for pair in generate(spec(task), pool, size, seed=chunk_seed, split="train", **opts):
                docs += _pair_documents(task, pair, rng)
    rng.shuffle(docs)
    return docs[:n]


STEPS = "/steps"
"""The suffix of a binding task's *step* documents in a data mix: ``"colored_objects/steps"``."""

_STEP_CUTS = {
    # task: (the end of its prompt after the question's key word, how the answer is written)
    "colored_objects": ("?\nA:", str.lower),  # "... is the bowl" -> " green", as in the scene
    "entity_tracking": (" contains the", str),  # "... Box M" -> " cup"
}


def step_documents(task: str, n: int, *, seed: int) -> list[Document]:
    """About ``n`` documents that reward a binding task's binding step on its own.

    Each is a document of ``task`` cut right after the question's key word (the asked
    object, the asked box) and answered with what the scene binds to it, as the scene
    writes it: ``... What color is the bowl`` -> `` green``, ``... Box M`` -> `` cup``.
    Answering it takes two attention steps (find the key word's earlier copy, which has
    read its colour or object), like induction, instead of the task's three: the third
    step, bringing that answer to the task's answer position, then has a gradient of
    its own. Data only: nothing here supervises attention.
    """
    if task not in _STEP_CUTS:
        raise ValueError(f"no step documents for {task!r}: only for {sorted(_STEP_CUTS)}")
    cut, write = _STEP_CUTS[task]
    docs = []
    for doc in task_documents(task, n, seed=seed):
        if not doc.prompt.endswith(cut):
            raise ValueError(f"a {task} prompt does not end with {cut!r}: {doc.prompt!r}")
        docs.append(
            Document(task + STEPS, doc.prompt.removesuffix(cut), write(doc.answer), doc.key)
        )
    return docs


_FILLER_TEMPLATES = (
    "{NAME} went to the {PLACE}.",
    "{NAME} and {NAME2} saw a {COLOR} {OBJECT} at the {PLACE}.",
    "The {SUBJ_S} {VERB_S} {PREP} the {PLACE}.",
    "The {SUBJ_P} {VERB_P} {PREP} the {PLACE}.",
    "{NAME} is a {ADJ} {ROLE}.",
    "The {EVENT} was long, and {NAME} was at the {PLACE}.",
    "{NAME} gave the {OBJECT} to {NAME2} at the {PLACE}.",
    "The {OBJECT} is {COLOR}, and the {OBJECT2} is in the {PLACE}.",
)


def filler(n: int, *, seed: int) -> list[Document]:
    """``n`` filler sentences (one or two per document) from a small grammar of task words."""
    rng = random.Random(f"filler:{seed}")
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 2)):
            verb_s, verb_p = rng.choice(VERB_NUMBER)
            subj_s, subj_p = rng.choice(NOUN_NUMBER)
            name, name2 = rng.sample(NAMES, 2)
            obj, obj2 = rng.sample(OBJECTS, 2)
            sentences.append(
                rng.choice(_FILLER_TEMPLATES).format(
                    NAME=name,
                    NAME2=name2,
                    PLACE=rng.choice(PLACES),
                    COLOR=rng.choice(COLORS),
                    OBJECT=obj,
                    OBJECT2=obj2,
                    SUBJ_S=subj_s,
                    SUBJ_P=subj_p,
                    VERB_S=verb_s,
                    VERB_P=verb_p,
                    PREP=rng.choice(PREPOSITIONS),
                    ADJ=rng.choice(ADJECTIVES),
                    ROLE=rng.choice(ROLES),
                    EVENT=rng.choice(EVENTS),
                )
            )
        docs.append(Document(FILLER, " ".join(sentences), ""))
    return docs


def mixture(mix: dict[str, float], n: int, *, seed: int) -> list[Document]:
    """``n`` documents drawn from ``mix`` ({task name, a binding task's step documents
    ``<task>/steps``, or FILLER: weight}), shuffled."""
    total = sum(mix.values())
    docs: list[Document] = []
    for i, (source, weight) in enumerate(sorted(mix.items())):
        count = round(n * weight / total)
        if count == 0:
            continue
        if source == FILLER:
            docs += filler(count, seed=seed * 7 + i)
        elif source.endswith(STEPS):
            docs += step_documents(source.removesuffix(STEPS), count, seed=seed * 7 + i)
        else:
            docs += task_documents(source, count, seed=seed * 7 + i)
    random.Random(f"mix:{seed}").shuffle(docs)
    return docs


def _vocabulary_texts() -> Iterable[str]:
    for word in all_words():
        # Every word with and without its leading space: a word can open a prompt
        # (induction sequences, "Box") or follow a space.
        yield f" {word}"
        yield word
    for word in (*ADJECTIVES, *ROLES, *PREPOSITIONS, *EVENTS):
        yield word.capitalize()
    pool = WordPool(None, text=True)
    for task in names():
        options: list[dict[str, Any]] = [{}]
        if task == "entity_tracking":
            options = [{"n_objects": k} for k in (2, 3, 4, 5)]
        for opts in options:
            for pair in generate(spec(task), pool, _VOCAB_SAMPLES, seed=0, split="all", **opts):
                yield str(pair.clean)
                yield str(pair.corrupted)
                yield from (str(a) for a in (*pair.answers, *pair.wrong))
    for doc in filler(2000, seed=0):
        yield doc.text


@cache
def vocabulary() -> tuple[str, ...]:
    """Every piece the zoo's tokenizer knows, sorted: words, template words, digits, marks."""
    # The tokenizer's own split regex, run by ``re``: ``tokenizer.pieces`` builds a
    # pre-tokenizer per call, too slow for the ~50k texts here.
    split = re.compile(PATTERN)
    found: set[str] = set()
    for text in _vocabulary_texts():
        found.update(piece for piece in split.findall(text) if piece.strip(" "))
    return tuple(sorted(found))


def zoo_tokenizer(name_or_path: str = "reuse-lens-zoo") -> Any:
    """The word-level tokenizer of every zoo model (all share one vocabulary)."""
    return build_tokenizer(vocabulary(), name_or_path=name_or_path)


def _fast_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of ``texts``, as ``tokenizer`` gives them, by the split regex and a dict.

    A WordLevel model is a lookup after the split, so this is exact, and about 15 times
    faster than the tokenizer on the ~10^5 documents of a run.
    """
    vocab = tokenizer.get_vocab()
    unk = int(tokenizer.unk_token_id)
    split = re.compile(PATTERN)
    return [[vocab.get(p, unk) for p in split.findall(t) if p.strip(" ")] for t in texts]


def _repeat_targets(ids: Sequence[int]) -> list[int]:
    """Positions an induction head can predict: each token of the repeat after its first.

    An induction document is ``BOS w1 .. wL w1 .. wk`` then its answer ``w(k+1)``; the
    words are distinct, so the repeat starts at the second occurrence of ``w1``.
    """
    start = list(ids).index(ids[1], 2)
    return list(range(start + 1, len(ids)))


def encode(tokenizer: Any, docs: Sequence[Document]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each document (BOS first) and the positions whose token carries loss.

    A task document's last position is its answer; an induction document also supervises
    every other predictable token of its repeat (an induction head predicts them all, so
    one sequence teaches several copies). Filler has no such positions (it gets the
    light language-model loss instead).
    """
    prompts = _fast_ids(tokenizer, [d.prompt for d in docs])
    answers = _fast_ids(tokenizer, [d.answer for d in docs])
    bos = int(tokenizer.bos_token_id)
    out = []
    for doc, prompt, answer in zip(docs, prompts, answers, strict=True):
        ids = [bos, *prompt, *answer]
        if not answer:
            targets = []
        elif doc.source == "induction":
            targets = _repeat_targets(ids)
        else:
            targets = [len(prompt) + 1]
        out.append((ids, targets))
    return out
