"""The checks ``Task.from_pairs`` and ``Task.select`` run on what they are handed.

Each refuses a task that could measure nothing, or a selection that would silently pick
other prompts than meant: a clean prompt that is its own corruption gives every patch an
effect of 0; a right answer that is also a wrong one gives a logit difference of 0 on
every prompt (so ``evaluate`` reports accuracy 1.0 while measuring nothing); a prompt
longer than the model's context fails deep inside its position embedding.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from reuse_lens.tasks.errors import TaskError, TaskWarning

if TYPE_CHECKING:
    from reuse_lens.tasks.tokenize import TaskTokenizer

__all__ = ["check_pairs", "check_spacing", "positions"]

_SHOWN = 5


def _which(indices: Sequence[int], n: int) -> str:
    listed = ", ".join(str(i) for i in indices[:_SHOWN])
    more = " ..." if len(indices) > _SHOWN else ""
    return (
        f"pair {listed}" if len(indices) == 1 else f"pairs {listed}{more} ({len(indices)} of {n})"
    )


def check_pairs(
    name: str,
    clean: Sequence[Any],
    clean_ids: Sequence[list[int]],
    corrupted_ids: Sequence[list[int]],
    answers: Sequence[Any],
    answer_ids: Sequence[list[int]],
    wrong: Sequence[Any],
    wrong_ids: Sequence[list[int]],
    n_ctx: int | None,
) -> None:
    """TaskError for pairs that measure nothing, or prompts the model cannot read."""
    n = len(clean_ids)
    if n_ctx is not None:
        long = [i for i, ids in enumerate(clean_ids) if len(ids) > n_ctx]
        if long:
            i = long[0]
            raise TaskError(
                f"clean prompt {i} of task {name!r} ({clean[i]!r:.60}) is {len(clean_ids[i])} "
                f"tokens (BOS included), but the model reads at most {n_ctx} (its n_ctx)"
                f"{f'; {len(long)} prompts are too long' if len(long) > 1 else ''}: shorten them"
            )
    same = [i for i, (a, b) in enumerate(zip(clean_ids, corrupted_ids, strict=True)) if a == b]
    if same:
        i = same[0]
        raise TaskError(
            f"{_which(same, n)} of task {name!r}: the corrupted prompt is the clean prompt "
            f"itself ({clean[i]!r:.60}), so patching changes nothing and every effect would "
            "be 0. A corrupted prompt changes what the answer depends on (e.g. the name "
            "that is repeated)"
        )
    both = [
        i for i, (a, w) in enumerate(zip(answer_ids, wrong_ids, strict=True)) if set(a) & set(w)
    ]
    if both:
        i = both[0]
        raise TaskError(
            f"{_which(both, n)} of task {name!r}: the right answer is also a wrong one "
            f"(answers {answers[i]!r}, wrong {wrong[i]!r}, token ids {answer_ids[i]} and "
            f"{wrong_ids[i]}), so the metric compares the answer with itself and measures "
            "nothing. Give wrong answers that differ from the right ones"
        )


def check_spacing(
    name: str,
    tok: TaskTokenizer,
    clean: Sequence[Any],
    answers: Sequence[Any],
    wrong: Sequence[Any],
) -> None:
    """TaskWarning for word answers that lack the leading space a word after a word has.

    After "... gave a bag to" the model's next token is " Mary", not "Mary": where the
    vocabulary has both, an answer written "Mary" reads the logit of a token the model
    never puts there. Only text prompts that end in a non-space character and answers
    that start with a letter are checked (a number that continues a number, such as the
    "45" after "17" of greater-than, is written without its space on purpose).
    """
    if tok.tokenizer is None:
        return
    found: dict[str, str] = {}
    for prompt, *columns in zip(clean, answers, wrong, strict=True):
        if not isinstance(prompt, str) or not prompt[-1:] or prompt[-1:].isspace():
            continue
        for column in columns:
            for answer in [column] if isinstance(column, str | int) else column:
                if (
                    isinstance(answer, str)
                    and answer[:1].isalpha()
                    and answer not in found
                    and tok.is_word(f" {answer}")
                ):
                    found[answer] = f" {answer}"
    if found:
        listed = ", ".join(f"{a!r} (the vocabulary has {s!r})" for a, s in list(found.items())[:3])
        warnings.warn(
            f"answers of task {name!r} lack the leading space of a word that follows "
            f"another: {listed}{' ...' if len(found) > 3 else ''}. After a word the model "
            "predicts the spaced form, so the metric would read another token: write "
            "answers with their space, e.g. ' Mary'",
            TaskWarning,
            stacklevel=4,
        )


def positions(index: object, n: int, name: str) -> Int[Tensor, " k"]:
    """``index`` as prompt positions of a task of ``n`` prompts, or TaskError.

    A boolean mask of ``n`` values selects the prompts where it is True (as in numpy and
    torch); taken as integers it would mean positions 0 and 1. Floats are refused, not
    truncated: 1.7 names no prompt.
    """
    if isinstance(index, Tensor):
        if index.dtype == torch.bool:
            return _mask(index.reshape(-1).tolist(), n, name)
        if index.is_floating_point() or index.is_complex():
            raise TaskError(
                f"index must be prompt positions (whole numbers), got a tensor of {index.dtype}"
                ": pass a tensor of dtype long, or a boolean mask"
            )
        return index.reshape(-1).to(torch.long)
    try:
        import numpy as np

        if isinstance(index, np.ndarray):
            return positions(torch.from_numpy(np.ascontiguousarray(index)), n, name)
    except TypeError as error:  # an array of objects
        raise TaskError(
            f"index must be prompt positions (whole numbers), got {index!r:.80}"
        ) from error
    if isinstance(index, str | bytes) or not isinstance(index, Sequence | range):
        raise TaskError(
            f"index must be a list of prompt positions (whole numbers), got {index!r:.80}"
        )
    items = list(index)
    flags = [isinstance(i, bool) for i in items]
    if items and all(flags):
        return _mask(items, n, name)
    out = []
    for item in items:
        if isinstance(item, bool):
            raise TaskError(
                f"index mixes True/False with numbers ({index!r:.80}): give positions, or a "
                f"boolean mask of one value per prompt ({n})"
            )
        try:
            out.append(operator.index(item))
        except TypeError:
            what = f"the float {item!r}" if isinstance(item, float) else f"{item!r:.40}"
            raise TaskError(
                f"index must be a list of prompt positions (whole numbers), got {what} in "
                f"{index!r:.80}"
            ) from None
    return torch.tensor(out, dtype=torch.long)


def _mask(values: Sequence[object], n: int, name: str) -> Int[Tensor, " k"]:
    if len(values) != n:
        raise TaskError(
            f"a boolean mask selects prompts of task {name!r} where it is True, so it needs "
            f"one value per prompt ({n}), got {len(values)}"
        )
    return torch.tensor([i for i, keep in enumerate(values) if keep], dtype=torch.long)
