"""How sure a faithfulness is: a bootstrap interval over the task's prompts.

Faithfulness is a ratio of means over prompts (``measure.py``)::

    f(C) = (mean_p m_C(p) − mean_p m_∅(p)) / (mean_p m_full(p) − mean_p m_∅(p))

With few prompts, or a small full − empty gap, it moves a lot with the prompts drawn: a
model that does not do the task can give any value at all (issue 24's "circuit from
noise"). The interval here is the percentile bootstrap (Efron and Tibshirani 1993, ch.
13): draw the prompts ``n_boot`` times with replacement, recompute the whole ratio on
each draw (the three means from the same prompts, so their correlation is kept), and
take the ``(1 − confidence) / 2`` and ``(1 + confidence) / 2`` quantiles as order
statistics (``inverted_cdf``). A draw whose full − empty gap is not positive has no
faithfulness (the ratio's sign or size means nothing there; "positive" is the sign of the
whole sample's gap): it counts as −∞ for the
lower bound and +∞ for the upper one, so an interval is unbounded on a side when more
than its tail of draws are such. The draws come from ``numpy.random.default_rng(seed)``
and every circuit evaluated on the same task reads the same draws, so an interval is
the same bytes for the same seed, and the intervals of a ranking's prefixes are compared
on common draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float

from reuse_lens._validate import check_count, check_seed

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_N_BOOT",
    "FaithfulnessInterval",
    "Resamples",
    "check_confidence",
]

DEFAULT_CONFIDENCE = 0.95
"""The interval's coverage unless told otherwise."""

DEFAULT_N_BOOT = 1000
"""Bootstrap draws unless told otherwise: the 2.5% quantile is then the 25th of 1000."""


@dataclass(frozen=True)
class FaithfulnessInterval:
    """A faithfulness with its bootstrap interval over prompts.

    Attributes:
        value: the faithfulness itself, as ``rl.faithfulness`` returns it.
        low, high: the interval's ends; ``-inf``/``inf`` where too many draws have no
            positive full − empty gap (see the module's docstring).
        confidence: the interval's coverage, e.g. 0.95.
        n_boot: bootstrap draws.
        seed: the seed of the draws.
    """

    value: float
    low: float
    high: float
    confidence: float
    n_boot: int
    seed: int

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    @property
    def bounds(self) -> list[float | None]:
        """``[low, high]`` for JSON: an unbounded end is ``None`` (JSON has no infinity)."""
        return [x if math.isfinite(x) else None for x in (self.low, self.high)]


def check_confidence(confidence: object) -> float:
    """``confidence`` as a float in (0, 1), or a ValueError/TypeError naming it."""
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        raise TypeError(f"confidence must be a number in (0, 1) such as 0.95, got {confidence!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), such as 0.95, got {confidence!r}")
    return float(confidence)


class Resamples:
    """The bootstrap draws of one task's prompts, shared by every circuit evaluated on it.

    Arguments:
        n_prompts: the task's prompts.
        confidence: the interval's coverage, in (0, 1).
        n_boot: draws (at least 1).
        seed: the draws' seed.
    """

    def __init__(
        self,
        n_prompts: int,
        *,
        confidence: float = DEFAULT_CONFIDENCE,
        n_boot: int = DEFAULT_N_BOOT,
        seed: int = 0,
    ) -> None:
        self.confidence = check_confidence(confidence)
        self.n_boot = check_count(n_boot, "n_boot")
        self.seed = check_seed(seed)
        rng = np.random.default_rng(self.seed)
        drawn = rng.integers(0, n_prompts, size=(self.n_boot, n_prompts))
        # weights[b, p] = how often draw b took prompt p, over n: a draw's mean is weights @ x.
        weights = np.zeros((self.n_boot, n_prompts))
        np.add.at(weights, (np.repeat(np.arange(self.n_boot), n_prompts), drawn.ravel()), 1.0)
        self.weights = weights / n_prompts

    def bounds(
        self,
        circuits: Float[np.ndarray, "circuit prompt"],
        full: Float[np.ndarray, " prompt"],
        empty: Float[np.ndarray, " prompt"],
    ) -> tuple[Float[np.ndarray, " circuit"], Float[np.ndarray, " circuit"]]:
        """The interval's low and high end for each circuit's per-prompt metric values."""
        w = self.weights
        full, empty = np.asarray(full, dtype=np.float64), np.asarray(empty, dtype=np.float64)
        drawn_empty = w @ empty
        gap = w @ full - drawn_empty
        kept = w @ np.asarray(circuits, dtype=np.float64).T - drawn_empty[:, None]
        # A draw has a faithfulness when its gap has the whole sample's sign.
        defined = gap * np.sign(full.mean() - empty.mean()) > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = kept / np.where(defined, gap, 1.0)[:, None]
        undefined = ~defined[:, None]
        tail = (1 - self.confidence) / 2
        low = np.quantile(np.where(undefined, -np.inf, ratio), tail, axis=0, method="inverted_cdf")
        high = np.quantile(
            np.where(undefined, np.inf, ratio), 1 - tail, axis=0, method="inverted_cdf"
        )
        return low, high

    def intervals(
        self,
        values: list[float],
        circuits: Float[np.ndarray, "circuit prompt"],
        full: Float[np.ndarray, " prompt"],
        empty: Float[np.ndarray, " prompt"],
    ) -> list[FaithfulnessInterval]:
        """One ``FaithfulnessInterval`` per circuit, around its faithfulness ``values``."""
        low, high = self.bounds(circuits, full, empty)
        return [
            FaithfulnessInterval(
                value=float(v),
                low=float(lo),
                high=float(hi),
                confidence=self.confidence,
                n_boot=self.n_boot,
                seed=self.seed,
            )
            for v, lo, hi in zip(values, low, high, strict=True)
        ]
