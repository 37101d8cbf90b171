"""Tasks: clean/corrupted prompt pairs with answers and a metric, built-in or your own.

>>> task = rl.tasks.load("ioi", model, n=64, seed=0)
>>> task = rl.Task.from_pairs(model, clean, corrupted, answers, wrong, name="custom")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reuse_lens.models import check_model
from reuse_lens.tasks import (
    colored_objects,
    entity_tracking,
    gendered_pronoun,
    greater_than,
    induction,
    ioi,
    sva,
)
from reuse_lens.tasks.base import PromptPair, Split, TaskSpec, build, generate, split_of
from reuse_lens.tasks.errors import TaskWarning
from reuse_lens.tasks.metrics import (
    Accuracy,
    KLFromClean,
    LogitDiff,
    Metric,
    MetricError,
    MetricInputs,
    NormalizedLogitDiff,
    ProbDiff,
    get_metric,
)
from reuse_lens.tasks.task import Task, TaskError, VocabSignature

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = [
    "Accuracy",
    "KLFromClean",
    "LogitDiff",
    "Metric",
    "MetricError",
    "MetricInputs",
    "NormalizedLogitDiff",
    "ProbDiff",
    "PromptPair",
    "Split",
    "Task",
    "TaskError",
    "TaskSpec",
    "TaskWarning",
    "VocabSignature",
    "describe",
    "generate",
    "get_metric",
    "load",
    "names",
    "spec",
    "split_of",
]

_SPECS: dict[str, TaskSpec] = {
    module.SPEC.name: module.SPEC
    for module in (
        ioi,
        colored_objects,
        greater_than,
        induction,
        sva,
        entity_tracking,
        gendered_pronoun,
    )
}


def names() -> list[str]:
    """The names of the built-in tasks."""
    return list(_SPECS)


def describe(name: str) -> str:
    """One line on built-in task ``name``: what it is, its source and its metric.

    >>> rl.tasks.describe("ioi")
    'Indirect object identification (Wang et al. 2022, "Interpretability in the Wild"). Metric: logit_diff.'
    """
    import sys

    found = spec(name)
    doc = sys.modules[found.sampler.__module__].__doc__ or name
    first = " ".join(doc.strip().split("\n\n", 1)[0].split())
    return f"{first} Metric: {found.metric}."


def spec(name: str) -> TaskSpec:
    """The generator behind built-in task ``name``."""
    if name not in _SPECS:
        raise TaskError(f"unknown task {name!r}: the built-in tasks are {names()}")
    return _SPECS[name]


def load(
    name: str,
    model: TransformerBridge,
    n: int = 64,
    seed: int = 0,
    *,
    split: Split = "test",
    **options: Any,
) -> Task:
    """Generate ``n`` prompt pairs of built-in task ``name`` for ``model``.

    Arguments:
        name: one of ``names()``.
        model: the model whose tokenizer the prompts are written for.
        n: the number of prompt pairs.
        seed: the same seed gives the same prompts.
        split: ``"test"`` (default) draws only combinations held out of zoo training,
            ``"train"`` only the others, ``"all"`` either.
        options: task options, e.g. ``corruption="s2_io"`` for ``ioi``.

    Raises:
        TaskError: for an unknown name or option, or ``n`` outside 1..``MAX_PROMPTS``.
        TypeError: for a model that is not loaded (a spec string), or an ``n`` or
            ``seed`` that is not a whole number.

    Warns:
        TaskWarning: when more than a tenth of the pairs repeat, because ``n`` is past
            the task's distinct combinations (docs/tasks.md lists each task's limit).
    """
    chosen = spec(name)
    return build(chosen, check_model(model), n=n, seed=seed, split=split, **options)
