"""Metrics: one number per prompt, read from the logits at that prompt's answer position.

Every metric takes the answer-position logits, shape ``(batch, d_vocab)``, and returns a
value per prompt, shape ``(batch,)``. A task's score is the mean over its prompts; because
every metric here is a per-prompt mean, scores of chunks of prompts can be averaged.

Answer and wrong-answer sets are stored as ``(batch, n)`` id tensors padded with -1, so
that a task such as greater-than, with many right answers per prompt, fits the same shape
as IOI, with one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "METRICS",
    "Accuracy",
    "KLFromClean",
    "LogitDiff",
    "Metric",
    "MetricError",
    "MetricInputs",
    "NonFiniteLogitsError",
    "NormalizedLogitDiff",
    "ProbDiff",
    "check_finite",
    "check_logits",
    "get_metric",
]

PAD_ANSWER = -1
"""Fills the answer and wrong-answer rows of prompts with fewer answers than the widest."""


class MetricError(ValueError):
    """A metric that cannot be computed or cannot tell clean from corrupted."""


@dataclass(frozen=True)
class MetricInputs:
    """What a metric reads besides the logits, for one batch of prompts.

    Attributes:
        answers: right answers, shape (batch, n_answers), padded with -1.
        wrong: wrong answers, shape (batch, n_wrong), padded with -1.
        clean_logits: the unpatched clean run's answer-position logits, shape
            (batch, d_vocab); only metrics with ``needs_clean_logits`` read it.
    """

    answers: Int[Tensor, "batch n_answers"]
    wrong: Int[Tensor, "batch n_wrong"]
    clean_logits: Float[Tensor, "batch d_vocab"] | None = None

    def select(self, index: Tensor | slice) -> MetricInputs:
        clean = None if self.clean_logits is None else self.clean_logits[index]
        return MetricInputs(self.answers[index], self.wrong[index], clean)


@runtime_checkable
class Metric(Protocol):
    """A per-prompt score of answer-position logits. Higher means more like the clean run."""

    @property
    def name(self) -> str: ...

    @property
    def needs_clean_logits(self) -> bool: ...

    def __call__(
        self, logits: Float[Tensor, "batch d_vocab"], inputs: MetricInputs
    ) -> Float[Tensor, " batch"]: ...


def _masked_gather(
    values: Float[Tensor, "batch d_vocab"], ids: Int[Tensor, "batch n"]
) -> tuple[Float[Tensor, "batch n"], Float[Tensor, "batch n"]]:
    mask = (ids != PAD_ANSWER).to(values.dtype)
    gathered = values.gather(-1, ids.clamp(min=0).to(values.device))
    return gathered, mask.to(values.device)


def _masked_mean(values: Float[Tensor, "batch d_vocab"], ids: Int[Tensor, "batch n"]) -> Tensor:
    gathered, mask = _masked_gather(values, ids)
    return (gathered * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _masked_sum(values: Float[Tensor, "batch d_vocab"], ids: Int[Tensor, "batch n"]) -> Tensor:
    gathered, mask = _masked_gather(values, ids)
    return (gathered * mask).sum(-1)


@dataclass(frozen=True)
class LogitDiff:
    """Mean logit of the right answers minus mean logit of the wrong ones (Wang et al. 2022)."""

    name: str = "logit_diff"
    needs_clean_logits: bool = False

    def __call__(
        self, logits: Float[Tensor, "batch d_vocab"], inputs: MetricInputs
    ) -> Float[Tensor, " batch"]:
        return _masked_mean(logits, inputs.answers) - _masked_mean(logits, inputs.wrong)


@dataclass(frozen=True)
class ProbDiff:
    """Total probability of the right answers minus that of the wrong ones.

    Hanna et al. 2023 use it for greater-than, where every year above the start is right.
    """

    name: str = "prob_diff"
    needs_clean_logits: bool = False

    def __call__(
        self, logits: Float[Tensor, "batch d_vocab"], inputs: MetricInputs
    ) -> Float[Tensor, " batch"]:
        probs = logits.float().softmax(-1)
        return _masked_sum(probs, inputs.answers) - _masked_sum(probs, inputs.wrong)


@dataclass(frozen=True)
class Accuracy:
    """1.0 where the top-1 prediction over the whole vocabulary is a right answer, else 0.0."""

    name: str = "accuracy"
    needs_clean_logits: bool = False

    def __call__(
        self, logits: Float[Tensor, "batch d_vocab"], inputs: MetricInputs
    ) -> Float[Tensor, " batch"]:
        top = logits.argmax(-1, keepdim=True)
        answers = inputs.answers.to(top.device)
        return (answers == top).any(-1).to(logits.dtype)


@dataclass(frozen=True)
class KLFromClean:
    """Negative KL(clean ‖ patched) of the answer-position distributions.

    The sign is flipped so that, like every other metric here, higher means more like the
    clean run: it is 0 for the clean run itself and falls as a patch moves the output.
    """

    name: str = "kl_div"
    needs_clean_logits: bool = True

    def __call__(
        self, logits: Float[Tensor, "batch d_vocab"], inputs: MetricInputs
    ) -> Float[Tensor, " batch"]:
        if inputs.clean_logits is None:
            raise MetricError("the kl_div metric needs the clean run's logits; none were given")
        log_p = inputs.clean_logits.float().log_softmax(-1)
        log_q = logits.float().log_softmax(-1)
        return -(log_p.exp() * (log_p - log_q)).sum(-1)


@dataclass(frozen=True)
class NormalizedLogitDiff:
    """(patched − corrupt) / (clean − corrupt) of the logit difference.

    1.0 is the clean run and 0.0 the corrupted one. Build it with ``for_baselines``, which
    refuses baselines too close to tell apart, because dividing by their gap would turn
    noise into arbitrarily large scores.
    """

    clean: float
    corrupted: float
    name: str = "normalized_logit_diff"
    needs_clean_logits: bool = False

    @classmethod
    def for_baselines(
        cls, clean: float, corrupted: float, *, min_gap: float = 1e-3
    ) -> NormalizedLogitDiff:
        gap = clean - corrupted
        if not math.isfinite(gap) or abs(gap) < min_gap:
            raise MetricError(
                f"the logit difference cannot tell clean ({clean:.4g}) from corrupted "
                f"({corrupted:.4g}) prompts: their gap {gap:.2g} is below {min_gap:g}, so "
                "the normalised score would divide by ~0. Check that the corruption changes "
                "the answer, or that the model can do the task."
            )
        return cls(clean=clean, corrupted=corrupted)

    def __call__(
        self, logits: Float[Tensor, "batch d_vocab"], inputs: MetricInputs
    ) -> Float[Tensor, " batch"]:
        raw = LogitDiff()(logits, inputs)
        return (raw - self.corrupted) / (self.clean - self.corrupted)


METRICS: dict[str, Metric] = {
    "logit_diff": LogitDiff(),
    "prob_diff": ProbDiff(),
    "accuracy": Accuracy(),
    "kl_div": KLFromClean(),
}
"""The metrics that need no baselines, by name. ``normalized_logit_diff`` is built from
baselines by ``reuse_lens.tasks.normalized_metric``."""


def get_metric(metric: str | Metric) -> Metric:
    """A metric by name (``logit_diff``, ``prob_diff``, ``accuracy``, ``kl_div``), or as given."""
    if isinstance(metric, str):
        if metric not in METRICS:
            raise MetricError(
                f"unknown metric {metric!r}: choose one of {sorted(METRICS)}, or pass a "
                "callable (logits, MetricInputs) -> per-prompt tensor"
            )
        return METRICS[metric]
    if not callable(metric):
        raise MetricError(f"a metric must be a name or a callable, got {metric!r}")
    return metric


class NonFiniteLogitsError(ValueError):
    """The model itself gives NaN (or +inf) logits: no metric of them means anything."""


def check_logits(logits: Float[Tensor, "batch d_vocab"], what: str = "prompts") -> None:
    """NonFiniteLogitsError when any logit is NaN or +inf, naming the prompts.

    A NaN in one row of a tied embedding makes that token's logit NaN on every prompt:
    a logit difference of other tokens stays finite, while argmax picks the NaN, so
    accuracy reads 0. Any such logit means the model is broken, not the metric.
    """
    bad = torch.isnan(logits) | torch.isposinf(logits)
    if bool(bad.any()):
        rows = bad.any(-1).nonzero().reshape(-1).tolist()
        tokens = bad.any(0).nonzero().reshape(-1).tolist()
        raise NonFiniteLogitsError(
            f"the model gives NaN or infinite logits on {len(rows)} of {logits.shape[0]} "
            f"{what} (prompt {rows[0]}; token id(s) {tokens[:5]}{' ...' if len(tokens) > 5 else ''})"
            ": its weights hold NaN or inf, or its dtype overflows. rl.load_model refuses "
            "such weights: reload the model, or load it in float32"
        )


def check_finite(
    values: object, metric: Metric, logits: Float[Tensor, "batch d_vocab"] | None = None
) -> Float[Tensor, " batch"]:
    """``values`` as a float tensor, or MetricError unless it is one finite number per prompt.

    The one check of a metric's output that every engine runs. A metric that returns a
    scalar (a mean over prompts) would be broadcast over the prompts and give each the
    batch's score, and one value too many would be averaged in: both are refused, given
    the ``logits`` the metric read (which say how many prompts there are). Whole-number
    and boolean values (a count, a hit) are taken as floats. Non-finite values are blamed
    on the model when its logits are non-finite too (NonFiniteLogitsError), else on the
    metric.
    """
    name = getattr(metric, "name", getattr(metric, "__name__", metric))
    try:
        values = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as error:
        raise MetricError(
            f"metric {name!r} returned {type(values).__name__}; a metric returns a tensor of "
            "one value per prompt, shape (batch,)"
        ) from error
    if values.is_complex() or not (values.is_floating_point() or _whole_dtype(values.dtype)):
        raise MetricError(
            f"metric {name!r} returned values of dtype {values.dtype}; a metric returns real "
            "numbers, one per prompt"
        )
    if not values.is_floating_point():
        values = values.to(torch.float32)  # an int-valued metric: counts, hits
    if values.ndim != 1:
        raise MetricError(
            f"metric {name!r} returned a tensor of shape {tuple(values.shape)}; a metric returns "
            "one value per prompt, shape (batch,): return the per-prompt values, not their mean"
        )
    if logits is not None and values.shape[0] != logits.shape[0]:
        raise MetricError(
            f"metric {name!r} returned {values.shape[0]} values for {logits.shape[0]} prompts; "
            "a metric returns exactly one value per prompt (row of the logits it is given)"
        )
    if not torch.isfinite(values).all():
        if logits is not None:
            check_logits(logits.detach())
        bad = int((~torch.isfinite(values)).sum())
        source = " from finite logits" if logits is not None else ""
        raise MetricError(
            f"metric {name!r} returned {bad} non-finite value(s) (NaN or inf){source}. Check "
            "the metric for divisions by zero or log of zero."
        )
    return values


def _whole_dtype(dtype: torch.dtype) -> bool:
    return dtype == torch.bool or not (dtype.is_floating_point or dtype.is_complex)
