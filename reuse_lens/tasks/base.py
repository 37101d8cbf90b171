"""What a built-in task generator is, and how its prompts become a Task.

A generator draws one ``PromptPair`` at a time from a seeded ``random.Random`` and a
``WordPool`` of single-token words. Every pair has a *combination key* (its names,
objects, template ...). A stable hash of the key puts the pair in the ``train`` or the
``test`` split, so the zoo trains on one set of combinations and is evaluated on
combinations it never saw. ``load`` draws from the ``test`` split by default.
"""

from __future__ import annotations

import random
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from reuse_lens._progress import progress_bar
from reuse_lens._validate import check_count, check_seed
from reuse_lens.tasks.errors import TaskWarning
from reuse_lens.tasks.task import Task, TaskError
from reuse_lens.tasks.words import WordPool

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["MAX_PROMPTS", "PromptPair", "Split", "TaskSpec", "generate", "split_of"]

Split = Literal["train", "test", "all"]

MAX_PROMPTS = 100_000
"""The most prompt pairs ``load`` draws; the largest built-in task has fewer distinct ones."""

PROGRESS_FROM = 10_000
"""From this many prompt pairs on, drawing them shows a progress bar."""

REPEAT_WARN_SHARE = 0.1
"""``load`` warns when more than this share of the drawn pairs repeat earlier ones."""

TEST_FRACTION_PERCENT = 20
"""The share of combination keys held out of zoo training, in percent."""


@dataclass(frozen=True)
class PromptPair:
    """One clean prompt, its corrupted partner and their answers, before tokenization.

    ``clean`` and ``corrupted`` are text, or token-id lists where the model has no
    tokenizer (only induction can do that). ``key`` is the combination that decides the
    split; ``fields`` are kept as columns of ``task.prompts``.
    """

    clean: str | list[int]
    corrupted: str | list[int]
    answers: tuple[str, ...] | tuple[int, ...]
    wrong: tuple[str, ...] | tuple[int, ...]
    key: str
    fields: dict[str, Any] = field(default_factory=dict)


Sampler = Callable[..., PromptPair]
"""``sampler(pool, rng, d_vocab=..., **options) -> PromptPair``."""


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its sampler, default metric, corruption options and source paper."""

    name: str
    sampler: Sampler
    metric: str
    paper: str
    options: dict[str, Sequence[Any]] = field(default_factory=dict)
    """Each option's allowed values; the first is the default."""

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        resolved = {key: values[0] for key, values in self.options.items()}
        for key, value in options.items():
            if key not in self.options:
                allowed = ", ".join(sorted(self.options)) or "none"
                raise TaskError(f"task {self.name!r} has no option {key!r}; its options: {allowed}")
            if value not in self.options[key]:
                raise TaskError(
                    f"task {self.name!r}: {key}={value!r} is not one of {list(self.options[key])}"
                )
            resolved[key] = value
        return resolved


def split_of(key: str) -> Literal["train", "test"]:
    """The split of a combination key: a stable hash, the same on every machine and run."""
    return "test" if zlib.crc32(key.encode()) % 100 < TEST_FRACTION_PERCENT else "train"


def generate(
    spec: TaskSpec,
    pool: WordPool,
    n: int,
    *,
    seed: int,
    split: Split = "test",
    d_vocab: int | None = None,
    **options: Any,
) -> list[PromptPair]:
    """Draw ``n`` prompt pairs of ``split`` from ``spec``'s sampler, deterministically.

    A progress bar shows on stderr from ``PROGRESS_FROM`` pairs on; ``n`` above
    ``MAX_PROMPTS`` is refused, since no task has that many distinct pairs.
    """
    try:
        n = check_count(n, "n", maximum=MAX_PROMPTS)
    except ValueError as error:
        why = (
            "a task needs at least one prompt"
            if n < 1
            else "no built-in task has more than a few thousand distinct pairs (docs/tasks.md)"
        )
        raise TaskError(f"{error}: n is the number of prompt pairs; {why}") from None
    seed = check_seed(seed)
    if split not in ("train", "test", "all"):
        raise TaskError(f"split must be 'train', 'test' or 'all', got {split!r}")
    resolved = spec.check_options(options)
    rng = random.Random(f"{spec.name}:{seed}")
    pairs: list[PromptPair] = []
    max_draws = 200 * n + 1000
    bar = progress_bar(total=n, desc=f"{spec.name} prompts", show_from=PROGRESS_FROM)
    with bar:
        for _ in range(max_draws):
            pair = spec.sampler(pool, rng, d_vocab=d_vocab, **resolved)
            if split == "all" or split_of(pair.key) == split:
                pairs.append(pair)
                bar.update(1)
                if len(pairs) == n:
                    return pairs
    raise TaskError(
        f"could draw only {len(pairs)} of {n} {split!r} prompts for task {spec.name!r} in "
        f"{max_draws} tries; the tokenizer may keep too few of its words as single tokens"
    )


def build(
    spec: TaskSpec,
    model: TransformerBridge,
    *,
    n: int,
    seed: int,
    split: Split,
    **options: Any,
) -> Task:
    """Generate ``spec``'s prompts for ``model`` and tokenize them into a Task."""
    pool = WordPool(getattr(model, "tokenizer", None))
    pairs = generate(
        spec, pool, n, seed=seed, split=split, d_vocab=int(model.cfg.d_vocab), **options
    )
    _warn_repeats(pairs, spec.name, split)
    field_names = sorted({k for p in pairs for k in p.fields})
    extra = {k: [p.fields.get(k) for p in pairs] for k in field_names}
    extra["key"] = [p.key for p in pairs]
    task = Task.from_pairs(
        model,
        [p.clean for p in pairs],
        [p.corrupted for p in pairs],
        [list(p.answers) for p in pairs],
        [list(p.wrong) for p in pairs],
        name=spec.name,
        metric=spec.metric,
        seed=seed,
        extra=extra,
    )
    task.options.update(spec.check_options(options), split=split)
    return task


def _warn_repeats(pairs: Sequence[PromptPair], task: str, split: str) -> None:
    """TaskWarning when ``n`` is past what the task has: many pairs are drawn twice.

    A few repeats are the birthday effect of drawing at random (63 distinct among sva's
    default 64); past ``REPEAT_WARN_SHARE`` the prompts stop being independent samples
    and statistics over them overstate their precision.
    """
    distinct = len({_identity(p) for p in pairs})
    if len(pairs) - distinct > REPEAT_WARN_SHARE * len(pairs):
        warnings.warn(
            f"task {task!r} has only {distinct} distinct prompt pairs among the n={len(pairs)} "
            f"drawn from its {split!r} split; the rest repeat them. Use n of at most about "
            f"{distinct} (docs/tasks.md lists each task's limit)",
            TaskWarning,
            stacklevel=4,
        )


def _identity(pair: PromptPair) -> tuple[Any, ...]:
    # The order of several right answers is not part of a pair: the metric averages them.
    return (
        str(pair.clean),
        str(pair.corrupted),
        frozenset(pair.answers),
        frozenset(pair.wrong),
    )


def need(words: Sequence[Any], count: int, what: str, task: str) -> None:
    """Raise TaskError if fewer than ``count`` single-token ``what`` are left for ``task``."""
    if len(words) < count:
        raise TaskError(
            f"task {task!r} needs at least {count} {what} that are single tokens under this "
            f"tokenizer, but only {len(words)} are: {list(words)[:10]}"
        )
