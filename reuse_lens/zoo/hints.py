"""Attention scaffolds: a loss on where chosen layers attend, for the circuits a small
model does not find from its answers alone.

Colored Objects, entity tracking and induction each need a circuit of several attention
steps, and answer loss rewards none of the steps until all of them exist: a small model
sits on a long plateau (docs/zoo.md has the probes). An :class:`AttentionHint` names one
step of one task's circuit and a layer; on each document of that task, training adds
``-log(attention)`` from the step's query position to its key position. With
``head=None`` the layer's head that already attends there most, over the batch, is the
one supervised, so training, not the hint, decides which head does the step (and
whether tasks share it); with a head number, that head is chosen.

The steps, on the token positions of a document (``ids``: BOS, prompt, answer):

- Colored Objects (``... a blue cup , ... What color is the cup ? \\n A : Blue``):
  ``prev`` the asked object in the scene -> its colour; ``look`` the question's object
  -> the same object in the scene (a duplicate-token match, which carries the colour
  over); ``move`` the answer position -> the question's object.
- Entity tracking (``... the card is in box V , ... Box V contains the card``):
  ``prev`` the asked box letter in the scene -> its object, four tokens back; ``look``
  the question's letter -> the same letter in the scene; ``move`` the answer position
  -> the question's letter.
- Induction (``w1 .. wL w1 .. wk``): at each position of the repeat, ``look`` (the
  induction head) -> the token after that word's first occurrence, and ``prev`` (the
  previous-token head) from there -> the first occurrence.

In the two binding tasks ``look`` reads from the question's word, not from the answer position: matching a token
with an earlier copy of itself is what duplicate-token heads do, and a small model
learns it quickly; matching the answer position's moved copy of the word against the
scene stayed at chance (attention spread evenly over the scene's objects) in our probes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "STEPS",
    "AttentionHint",
    "HintTargets",
    "hint_loss",
    "hint_targets",
    "scaffold_heads",
]

Step = Literal["prev", "move", "look"]
STEPS: dict[str, tuple[Step, ...]] = {
    "colored_objects": ("prev", "look", "move"),
    "entity_tracking": ("prev", "look", "move"),
    "induction": ("prev", "look"),
}
"""The steps a hint can supervise, per task."""

HintTargets = dict[tuple[str, str], list[tuple[int, int, int]]]
"""``(task, step) -> [(row, query position, key position), ...]`` of one batch."""


@dataclass(frozen=True)
class AttentionHint:
    """Supervise one step of one task's circuit in ``layer`` (see the module docstring)."""

    task: str
    step: Step
    layer: int
    head: int | None = None
    """The head that must do the step; None: the layer's head that attends most to the
    batch's targets, on average, so training decides which head it is."""

    def __post_init__(self) -> None:
        if self.step not in STEPS.get(self.task, ()):
            raise ValueError(
                f"no attention hint {self.step!r} for task {self.task!r}: hints exist for "
                + ", ".join(f"{t} ({'/'.join(s)})" for t, s in STEPS.items())
            )


def _earlier(ids: Sequence[int], pos: int) -> int:
    """The last position before ``pos`` holding the token at ``pos``."""
    for j in range(pos - 1, 0, -1):
        if ids[j] == ids[pos]:
            return j
    raise ValueError(f"token {ids[pos]} at position {pos} has no earlier occurrence")


def hint_targets(
    task: str, ids: Sequence[int], targets: Sequence[int], vocab: Mapping[str, int]
) -> dict[str, list[tuple[int, int]]]:
    """``step -> [(query position, key position), ...]`` of one document of ``task``.

    ``targets`` are the positions of the supervised tokens (``encode``'s second element);
    a document whose shape is not the task's fails loudly rather than being skipped, so
    a change of a task's template cannot silently switch its scaffold off.
    """
    if task == "induction":
        start = targets[0] - 1  # the repeat's first token; the copy is one word behind
        offset = start - 1
        looks = [(t, t - offset + 1) for t in range(start, targets[-1])]
        return {"look": looks, "prev": [(k, k - 1) for _, k in looks]}
    answer = targets[0] - 1  # the position that predicts the answer
    if task == "colored_objects":
        tail = [vocab["?"], vocab["\n"], vocab["A"], vocab[":"]]
        if list(ids[answer - 3 : answer + 1]) != tail:
            raise ValueError("a Colored Objects document does not end 'OBJ?\\nA:'")
        question = answer - 4
        bound = 1  # the colour is right before its object
    elif task == "entity_tracking":
        if ids[answer - 1] != vocab[" contains"]:
            raise ValueError("an entity tracking document does not end 'Box X contains the'")
        question = answer - 2
        bound = 4  # "the card is in box V": the object is four tokens before V
    else:
        raise ValueError(f"no attention hints for task {task!r}")
    scene = _earlier(ids, question)
    return {
        "prev": [(scene, scene - bound)],
        "look": [(question, scene)],
        "move": [(answer, question)],
    }


def hint_loss(
    hints: Sequence[AttentionHint],
    attentions: Sequence[Float[Tensor, "batch head query key"]],
    targets: HintTargets,
) -> Float[Tensor, ""]:
    """Summed ``-log`` attention of each hint's head (or its layer's head most attentive
    to the batch's targets) from each target's query position to its key position."""
    total = torch.zeros(())
    for hint in hints:
        found = targets.get((hint.task, hint.step))
        if not found:
            continue
        rows, queries, keys = torch.tensor(found).T
        weight = attentions[hint.layer][rows, :, queries, keys]  # (targets, head)
        # One head for the whole batch, not the most attentive one per target: per
        # target, a layer satisfies "some head attends to the asked object" by giving
        # each scene slot its own head, without ever binding anything.
        head = int(weight.detach().mean(0).argmax()) if hint.head is None else hint.head
        weight = weight[:, head]
        total = total - (weight + 1e-6).log().sum()
    return total


def scaffold_heads(
    model: Any, hints: Sequence[AttentionHint], *, n: int = 64, seed: int = 1
) -> dict[AttentionHint, tuple[int, float]]:
    """Which head of its layer does each hinted step, and how much it attends there.

    Arguments:
        model: an HF GPT-2 of the zoo loaded with ``attn_implementation="eager"``.
        hints: the steps to look up (``ZooSpec.attention_hints``).
        n: documents per task.
        seed: of the documents (``task_documents``; seed 0 is close to the training data).

    Returns:
        ``hint -> (head, mean attention of that head to the step's key position)``, the
        head being the hint's own or, for a free hint, its layer's most attentive one.
    """
    from reuse_lens.zoo.language import encode, task_documents, zoo_tokenizer

    tokenizer = zoo_tokenizer()
    vocab = tokenizer.get_vocab()
    sums: dict[AttentionHint, Tensor] = {}
    counts: Counter[AttentionHint] = Counter()
    for task in sorted({hint.task for hint in hints}):
        docs = task_documents(task, n, seed=seed)
        for ids, targets in encode(tokenizer, docs):
            with torch.no_grad():
                attentions = model.transformer(
                    torch.tensor([ids]), output_attentions=True
                ).attentions
            steps = hint_targets(task, ids, targets, vocab)
            for hint in (h for h in hints if h.task == task):
                for query, key in steps[hint.step]:
                    row = attentions[hint.layer][0, :, query, key]
                    sums[hint] = sums.get(hint, torch.zeros_like(row)) + row
                    counts[hint] += 1
    out = {}
    for hint, total in sums.items():
        mean = total / counts[hint]
        head = int(mean.argmax()) if hint.head is None else hint.head
        out[hint] = (head, float(mean[head]))
    return out
