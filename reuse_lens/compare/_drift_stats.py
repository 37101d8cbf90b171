"""The statistics of a ``DriftReport``: one-sided permutation tests over nodes.

``mlps_vs_heads`` asks whether MLPs changed more than heads (node kind permuted over all
nodes); ``circuit_vs_rest`` whether a circuit's members changed more than the other nodes
of their kind (membership permuted within heads and within MLPs, each node centred on its
kind's mean). Each test reports its effect size, the rank-biserial correlation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from reuse_lens.nodes import ModelShape

__all__ = ["DriftTest", "drift_tests"]


@dataclass(frozen=True)
class DriftTest:
    """One permutation test of a ``DriftReport``: does ``group`` change more than ``rest``?

    Attributes:
        name: ``"mlps_vs_heads"`` or ``"circuit_vs_rest"``.
        measure: the column of ``DriftReport.table()`` tested (``"weight"``, ...).
        group / rest: what is compared, in words.
        n_group / n_rest: how many nodes each side has.
        mean_group / mean_rest: the measure's mean on each side.
        difference: the test's statistic: ``mean_group - mean_rest``, of values centred
            on their kind's mean when the test is within kinds (``circuit_vs_rest``).
        rank_biserial: the effect size, in [-1, 1]: the probability that a node of the
            group changed more than a node of the rest, minus the reverse (ties count half).
        p_value: the one-sided permutation p-value, ``(1 + #{perm >= observed}) / (1 + n)``.
        p_adjusted: ``p_value`` after the report's correction over all its tests.
        null: the null hypothesis and how it was sampled.
    """

    name: str
    measure: str
    group: str
    rest: str
    n_group: int
    n_rest: int
    mean_group: float
    mean_rest: float
    difference: float
    rank_biserial: float
    p_value: float
    p_adjusted: float
    null: str

    def sentence(self, correction: str) -> str:
        """The test in plain words, with its numbers."""
        verb = "change more than" if self.difference > 0 else "do not change more than"
        return (
            f"{self.group} {verb} {self.rest} by {_measure_words(self.measure)} "
            f"(mean {self.mean_group:.3g} vs {self.mean_rest:.3g}, rank-biserial "
            f"{self.rank_biserial:+.2f}, permutation p = {self.p_value:.3g}, "
            f"{correction}-corrected {self.p_adjusted:.3g})"
        )


def _measure_words(measure: str) -> str:
    return {
        "weight": "relative weight change",
        "act_l2_answer": "relative change of their output at the answer position",
        "act_cos_answer": "1 - cosine of their output at the answer position",
        "act_l2_all": "relative change of their output over all positions",
        "act_cos_all": "1 - cosine of their output over all positions",
        "attn_tv": "change of attention pattern",
    }.get(measure, measure)


def drift_tests(
    rows: list[dict[str, Any]],
    members: frozenset[str] | None,
    shape: ModelShape,
    n_permutations: int,
    seed: int,
    *,
    has_task: bool,
) -> list[DriftTest]:
    measures = ["weight", *(["act_l2_answer"] if has_task else [])]
    kinds = np.array([row["kind"] for row in rows])
    tests: list[DriftTest] = []
    rng = np.random.default_rng(seed)
    for measure in measures:
        values = np.array([row[measure] for row in rows], dtype=float)
        if shape.has_mlps:
            is_mlp = kinds == "mlp"
            tests.append(
                _permutation_test(
                    "mlps_vs_heads",
                    measure,
                    values,
                    is_mlp,
                    None,
                    n_permutations,
                    rng,
                    group="MLPs",
                    rest="attention heads",
                    null="node kind is exchangeable: the head/MLP labels permuted over all nodes",
                )
            )
        if members is not None:
            inside = np.array([row["node"] in members for row in rows])
            tests.append(
                _permutation_test(
                    "circuit_vs_rest",
                    measure,
                    values,
                    inside,
                    kinds,
                    n_permutations,
                    rng,
                    group="the circuit's nodes",
                    rest="the other nodes of their kind",
                    null=(
                        "circuit membership is exchangeable within each kind: members "
                        "permuted among heads and among MLPs separately"
                    ),
                )
            )
    return tests


def _permutation_test(
    name: str,
    measure: str,
    values: np.ndarray,
    in_group: np.ndarray,
    strata: np.ndarray | None,
    n_permutations: int,
    rng: np.random.Generator,
    *,
    group: str,
    rest: str,
    null: str,
) -> DriftTest:
    """One-sided: is the group's mean larger than the rest's? Labels permuted within strata."""
    keep = np.isfinite(values)
    values, in_group = values[keep], in_group[keep]
    strata = None if strata is None else strata[keep]
    n_group, n_rest = int(in_group.sum()), int((~in_group).sum())
    if n_group == 0 or n_rest == 0:
        mean_g = float(values[in_group].mean()) if n_group else math.nan
        mean_r = float(values[~in_group].mean()) if n_rest else math.nan
        return DriftTest(
            name,
            measure,
            group,
            rest,
            n_group,
            n_rest,
            mean_g,
            mean_r,
            math.nan,
            math.nan,
            math.nan,
            math.nan,
            null,
        )

    raw = values
    if strata is not None:
        # Within-kind differences only: each node is centred on its kind's mean, so that
        # MLPs changing more than heads does not count as the circuit changing more.
        values = values.copy()
        for stratum in np.unique(strata):
            values[strata == stratum] -= values[strata == stratum].mean()

    def statistic(labels: np.ndarray) -> np.ndarray:
        # labels: (perm, node) bool; the mean difference of each row
        g = labels.sum(1)
        return (labels @ values) / g - ((~labels) @ values) / (len(values) - g)

    observed = float(statistic(in_group[None, :])[0])
    hits = 0
    done = 0
    while done < n_permutations:
        count = min(2048, n_permutations - done)
        labels = np.repeat(in_group[None, :], count, axis=0)
        for stratum in [None] if strata is None else np.unique(strata):
            cols = np.arange(len(values)) if stratum is None else np.flatnonzero(strata == stratum)
            keys = rng.random((count, len(cols)))
            order = np.argsort(keys, axis=1)
            labels[:, cols] = in_group[cols][order]
        hits += int(np.count_nonzero(statistic(labels) >= observed - 1e-12))
        done += count
    p = (1 + hits) / (1 + n_permutations)
    from scipy.stats import mannwhitneyu

    u = float(mannwhitneyu(values[in_group], values[~in_group], alternative="two-sided").statistic)
    rank_biserial = 2 * u / (n_group * n_rest) - 1
    return DriftTest(
        name=name,
        measure=measure,
        group=group,
        rest=rest,
        n_group=n_group,
        n_rest=n_rest,
        mean_group=float(raw[in_group].mean()),
        mean_rest=float(raw[~in_group].mean()),
        difference=observed,
        rank_biserial=rank_biserial,
        p_value=p,
        p_adjusted=p,
        null=f"{null}; {n_permutations} permutations, one-sided",
    )
