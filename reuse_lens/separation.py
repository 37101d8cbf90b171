"""Does the model do the task? One test, shared by discovery, faithfulness and the study.

A circuit is only worth finding for a task the model does: its metric must be higher on
the clean prompts than on their corrupted partners, by more than noise and by a margin
that matters. Every circuit found in a model that only guesses is a circuit of noise, and
a faithfulness divided by a gap of noise can take any value at all.

The test reads the metric of each prompt on the clean run and on the other run (the
corrupted partner; or the run with everything ablated, for a faithfulness's baseline) and
asks two things of the per-prompt gaps ``clean − other``:

1. **The gap is real.** Its 95% bootstrap interval (percentile bootstrap of the mean over
   prompts, ``N_BOOT`` resamples from a fixed seed, so the same values give the same
   interval) lies above 0.
2. **The gap is large.** The mean gap is at least ``MIN_EFFECT`` times the metric's spread:
   the standard deviation of the metric over prompts, pooled within the clean and the
   other run (Cohen's d). It is scale-free, so it reads a logit difference, a probability
   difference and a custom metric alike.

The floor comes from data (``scripts/separation_floor.py``; docs/methods.md has the
table). On 1,584 models with random weights (GPT-2 architecture at 3 sizes × 24 seeds ×
the 7 built-in tasks × 8, 16 and 64 prompts, and 24 native models on random tokens × 3
sizes), the effect was at most 0.77, and at most 0.51 in the 108 cases (6.8%) where the
interval alone excluded 0. The zoo's attention-only model, on the 5 tasks it does not do
(accuracy ≤ 0.03), reached 0.43. On every task a zoo model does (accuracy ≥ 0.88; 30
model-task pairs × 15 prompt sets of 8 to 64 prompts) it was at least 1.20 (greater-than,
a probability difference; IOI's least is 1.50). A floor of 1.0 refuses all 1,659 cases
of a model that does not do the task and accepts all 450 of one that does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from reuse_lens.tasks.metrics import MetricError, MetricInputs

__all__ = [
    "CONFIDENCE",
    "MIN_EFFECT",
    "N_BOOT",
    "Separation",
    "accuracy_of",
    "check_separation",
    "separation",
]

MIN_EFFECT = 1.0
"""The smallest clean − other gap, in units of the metric's spread over prompts, that
counts as doing the task (module docstring: random models reach 0.77, the zoo 1.20)."""

CONFIDENCE = 0.95
"""The level of the bootstrap interval on the gap."""

N_BOOT = 2000
"""Bootstrap resamples of the prompts for the interval."""

_SEED = 0  # a fixed seed: the same per-prompt values always give the same interval
_CHUNK = 1 << 22  # resampled indices drawn at once (32 MiB of int64), for large tasks

Against = Literal["corrupted", "ablated"]


@dataclass(frozen=True)
class Separation:
    """How clearly a model's metric tells the clean prompts from the other run.

    Attributes:
        task: the task's name.
        n: the number of prompts.
        clean: the mean metric on the clean prompts.
        other: the mean metric on the other run (``against``).
        gap: ``clean − other``, the mean over prompts of the per-prompt gaps.
        low, high: the ``CONFIDENCE`` bootstrap interval of ``gap``.
        spread: the metric's standard deviation over prompts, pooled within the clean
            and the other run; NaN for one prompt.
        effect: ``gap / spread`` (inf when the spread is 0 and the gap positive).
        accuracy: the model's accuracy on the clean prompts, when known.
        against: ``corrupted`` (does the model do the task?) or ``ablated`` (does
            ablating everything change the metric?).
    """

    task: str
    n: int
    clean: float
    other: float
    gap: float
    low: float
    high: float
    spread: float
    effect: float
    accuracy: float | None = None
    against: Against = "corrupted"

    @property
    def separates(self) -> bool:
        """The interval lies above 0 and the effect reaches ``MIN_EFFECT``."""
        return self.n >= 2 and self.low > 0 and self.effect >= MIN_EFFECT

    def numbers(self) -> str:
        """The numbers behind the verdict, e.g. ``accuracy 0.00, gap −0.0007 [...]``."""
        parts = [] if self.accuracy is None else [f"accuracy {self.accuracy:.2f}"]
        parts += [
            f"clean − {self.against} gap {_g(self.gap)} "
            f"({CONFIDENCE:.0%} interval {_g(self.low)} to {_g(self.high)})",
            f"effect {_g(self.effect)} (the gap over the metric's spread across prompts; "
            f"needs {MIN_EFFECT:g})",
            f"{self.n} prompts",
        ]
        return ", ".join(parts)

    def reason(self) -> str:
        """Why the test fails, in a few words; empty when it passes."""
        if self.n < 2:
            return "one prompt gives no interval"
        if not self.low > 0:
            return "the gap's interval does not exclude 0" if self.high > 0 else "no gap"
        if not self.effect >= MIN_EFFECT:
            return "the gap is small next to the metric's spread"
        return ""

    def brief(self) -> str:
        """The numbers in short: ``accuracy 0.00, gap −0.0007 [−0.002, 0.001], effect 0.05
        (needs 1)``; the gap's interval in brackets."""
        accuracy = "" if self.accuracy is None else f"accuracy {self.accuracy:.2f}, "
        return (
            f"{accuracy}gap {_g(self.gap)} [{_g(self.low)}, {_g(self.high)}], effect "
            f"{_g(self.effect)} (needs {MIN_EFFECT:g})"
        )

    def line(self) -> str:
        """One short line for a terminal: ``ioi: refused, accuracy 0.00, gap ...``."""
        return f"{self.task}: {'does the task' if self.separates else 'refused'}, {self.brief()}"

    @classmethod
    def of_scores(cls, task: str, scores: Mapping[str, float]) -> Separation:
        """The separation ``rl.evaluate`` reported in ``scores`` (its ``gap``, ``gap_low``,
        ``gap_high``, ``effect``, ``n`` and ``accuracy``), without running anything again."""
        effect = float(scores["effect"])
        gap = float(scores["gap"])
        return cls(
            task=task, n=int(scores["n"]), clean=float(scores["clean_metric"]),
            other=float(scores["corrupted_metric"]), gap=gap, low=float(scores["gap_low"]),
            high=float(scores["gap_high"]),
            spread=gap / effect if effect and math.isfinite(effect) else math.nan,
            effect=effect, accuracy=float(scores["accuracy"]),
        )  # fmt: skip


def separation(
    clean: Float[Tensor, " batch"],
    other: Float[Tensor, " batch"],
    task: str,
    *,
    accuracy: float | None = None,
    against: Against = "corrupted",
) -> Separation:
    """The separation of per-prompt metric values ``clean`` from ``other``.

    Arguments:
        clean: the metric of each prompt on the clean run.
        other: the metric of the same prompts on the corrupted (or ablated) run.
        task: the task's name, for messages.
        accuracy: the clean accuracy, reported beside the gap when given.
        against: what ``other`` is: ``corrupted`` or ``ablated``.

    Returns:
        A ``Separation``; its ``separates`` says whether the test passes.
    """
    a = torch.as_tensor(clean).detach().double().cpu().numpy().reshape(-1)
    b = torch.as_tensor(other).detach().double().cpu().numpy().reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"clean and {against} must hold one value per prompt each, got {a.size} and {b.size}"
        )
    diff = a - b
    n = int(diff.size)
    gap = float(diff.mean())
    low, high = _interval(diff)
    if n >= 2:
        spread = math.sqrt((float(a.var(ddof=1)) + float(b.var(ddof=1))) / 2)
        effect = gap / spread if spread > 0 else math.copysign(math.inf, gap) if gap else 0.0
    else:
        spread, effect = math.nan, math.nan
    return Separation(
        task=task, n=n, clean=float(a.mean()), other=float(b.mean()), gap=gap, low=low,
        high=high, spread=spread, effect=effect, accuracy=accuracy, against=against,
    )  # fmt: skip


def check_separation(
    clean: Float[Tensor, " batch"],
    other: Float[Tensor, " batch"],
    task: str,
    *,
    accuracy: float | None = None,
    against: Against = "corrupted",
) -> Separation:
    """``separation(...)``, or MetricError with its numbers when the test fails.

    Raises:
        MetricError: when the gap's interval does not exclude 0, or the gap is below
            ``MIN_EFFECT`` spreads of the metric: the model does not do the task (or,
            ``against="ablated"``, ablating everything changes nothing that counts).
    """
    result = separation(clean, other, task, accuracy=accuracy, against=against)
    if not result.separates:
        raise MetricError(refusal(result))
    return result


def refusal(result: Separation) -> str:
    """The message of a failed test: what fails, the numbers, and what to do."""
    if result.against == "ablated":
        what = (
            f"the metric cannot separate the full model from the model with everything "
            f"ablated on task {result.task!r}"
        )
        then = "so faithfulness would divide by noise"
    else:
        what = (
            f"the metric cannot separate the clean from the corrupted prompts of task "
            f"{result.task!r}"
        )
        then = (
            "The model does not do this task (or the corruption changes nothing), so no "
            "circuit can be found"
        )
    return (
        f"{what}: {result.reason()} ({result.numbers()}). {then}: check "
        "rl.evaluate(model, task), or use more prompts."
    )


def accuracy_of(logits: Float[Tensor, "batch d_vocab"], inputs: MetricInputs) -> float:
    """The share of prompts whose top-1 token over the vocabulary is a right answer."""
    from reuse_lens.tasks.metrics import Accuracy

    return float(Accuracy()(logits, inputs).mean())


def _interval(diff: np.ndarray) -> tuple[float, float]:
    """The percentile bootstrap interval of ``diff.mean()`` at ``CONFIDENCE``."""
    n = diff.size
    if n < 2:
        return float(diff.mean()), float(diff.mean())
    rng = np.random.default_rng(_SEED)
    means = np.empty(N_BOOT)
    step = max(1, _CHUNK // n)
    for start in range(0, N_BOOT, step):
        rows = min(step, N_BOOT - start)
        means[start : start + rows] = diff[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def _g(value: float) -> str:
    """A number to three significant digits, with a real minus sign."""
    if math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.3g}".replace("-", "−")
