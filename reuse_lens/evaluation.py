"""How well a model does a task: metrics on the clean and on the corrupted prompts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from reuse_lens._validate import check_pair
from reuse_lens.separation import Separation, accuracy_of, separation
from reuse_lens.tasks.metrics import (
    Accuracy,
    LogitDiff,
    MetricInputs,
    NormalizedLogitDiff,
    ProbDiff,
    check_finite,
    check_logits,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.tasks.task import Task

__all__ = ["answer_logits", "evaluate", "normalized_metric", "task_separation"]


@torch.no_grad()
def answer_logits(
    model: TransformerBridge,
    tokens: Int[Tensor, "batch pos"],
    answer_pos: Int[Tensor, " batch"],
    *,
    batch_size: int = 64,
) -> Float[Tensor, "batch d_vocab"]:
    """The logits at each prompt's own answer position, in batches of ``batch_size``.

    Raises:
        NonFiniteLogitsError: when any of them is NaN or +inf (a broken model, whose
            scores would mean nothing however finite some of them look).
    """
    device = model.cfg.device
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start : start + batch_size].to(device)
        pos = answer_pos[start : start + batch_size].to(device)
        logits = model(chunk, return_type="logits")
        out.append(logits[torch.arange(chunk.shape[0], device=device), pos].float())
    result = torch.cat(out)
    check_logits(result)
    return result


def evaluate(model: TransformerBridge, task: Task) -> dict[str, float]:
    """Score ``model`` on ``task``'s clean and corrupted prompts.

    Returns:
        ``logit_diff``, ``prob_diff`` and ``accuracy`` on the clean prompts; the same on the
        corrupted prompts with a ``corrupted_`` prefix; the task's own metric as
        ``clean_metric`` and ``corrupted_metric``; ``n``, the number of prompts; and
        whether the model does the task (``reuse_lens.separation``): ``gap`` (clean −
        corrupted metric), ``gap_low`` and ``gap_high`` (its 95% bootstrap interval) and
        ``effect`` (the gap in spreads of the metric; the task is done when the interval
        excludes 0 and the effect is at least ``MIN_EFFECT``, 1.0).
    """
    model, task = check_pair(model, task)
    clean = answer_logits(model, task.clean, task.answer_pos)
    corrupted = answer_logits(model, task.corrupted, task.answer_pos)
    inputs = task.metric_inputs()
    with_clean = MetricInputs(inputs.answers, inputs.wrong, clean)
    result: dict[str, float] = {}
    for metric in (LogitDiff(), ProbDiff(), Accuracy()):
        result[metric.name] = float(metric(clean, inputs).mean())
        result[f"corrupted_{metric.name}"] = float(metric(corrupted, inputs).mean())
    clean_values = check_finite(task.metric(clean, with_clean), task.metric, clean)
    corrupted_values = check_finite(task.metric(corrupted, with_clean), task.metric, corrupted)
    result["clean_metric"] = float(clean_values.mean())
    result["corrupted_metric"] = float(corrupted_values.mean())
    result["n"] = float(len(task))
    found = separation(clean_values, corrupted_values, task.name)
    result.update(gap=found.gap, gap_low=found.low, gap_high=found.high, effect=found.effect)
    return result


def normalized_metric(model: TransformerBridge, task: Task) -> NormalizedLogitDiff:
    """The normalised logit difference of ``task`` on ``model``: 1 = clean, 0 = corrupted.

    Raises:
        MetricError: when the clean and corrupted logit differences cannot be told apart.
    """
    scores = evaluate(model, task)
    return NormalizedLogitDiff.for_baselines(scores["logit_diff"], scores["corrupted_logit_diff"])


@torch.no_grad()
def task_separation(model: TransformerBridge, task: Task) -> Separation:
    """Whether ``model`` does ``task``, by the task's own metric, with its accuracy.

    Two forward passes (clean and corrupted prompts); what a study checks before it
    looks for any circuit, and what ``rl.evaluate`` reports.
    """
    clean = answer_logits(model, task.clean, task.answer_pos)
    corrupted = answer_logits(model, task.corrupted, task.answer_pos)
    inputs = task.metric_inputs()
    with_clean = MetricInputs(inputs.answers, inputs.wrong, clean)
    return separation(
        check_finite(task.metric(clean, with_clean), task.metric),
        check_finite(task.metric(corrupted, with_clean), task.metric),
        task.name,
        accuracy=accuracy_of(clean, inputs),
    )
