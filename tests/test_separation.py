"""Does the model do the task? The separation test on hand-made values and on models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import reuse_lens as rl
from reuse_lens.evaluation import task_separation
from reuse_lens.separation import (
    MIN_EFFECT,
    Separation,
    check_separation,
    refusal,
    separation,
)
from reuse_lens.tasks.metrics import MetricError


def values(xs: list[float]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def test_a_clear_gap_separates() -> None:
    result = separation(values([3.0, 2.0, 4.0, 3.5]), values([0.0, 0.5, -1.0, 0.2]), "t")
    assert result.separates and result.reason() == ""
    assert result.gap == pytest.approx(3.2)
    assert result.low <= result.gap <= result.high and result.low > 0
    assert result.n == 4 and result.clean == pytest.approx(3.125)


@pytest.mark.parametrize(
    ("clean", "other", "reason"),
    [
        ([0.1, -0.2, 0.15, 0.0], [0.0, 0.1, 0.1, 0.05], "does not exclude 0"),  # noise
        ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], "no gap"),  # the wrong answer wins every time
        ([0.0, 0.0], [0.0, 0.0], "no gap"),  # the corruption changes nothing
        ([1.0], [0.0], "one prompt"),  # no interval from one prompt
    ],
)
def test_what_does_not_separate_and_why(
    clean: list[float], other: list[float], reason: str
) -> None:
    result = separation(values(clean), values(other), "t")
    assert not result.separates
    assert reason in result.reason()


def test_a_consistent_but_tiny_gap_is_refused_by_the_floor() -> None:
    """Every prompt 0.01 higher on clean: the interval excludes 0, but the metric varies by
    about 1 from prompt to prompt, so the gap is noise next to what the metric measures."""
    spread = values(np.random.default_rng(0).normal(0, 1, 64).tolist())
    result = separation(spread + 0.01, spread, "t")
    assert result.low > 0  # the gap is real...
    assert result.effect == pytest.approx(0.01 / float(spread.std()), rel=1e-6)
    assert not result.separates  # ...and far below a spread
    assert "small next to the metric's spread" in result.reason()


def test_the_effect_does_not_depend_on_the_metric_scale() -> None:
    rng = np.random.default_rng(1)
    clean, other = values(rng.normal(2, 1, 32).tolist()), values(rng.normal(0, 1, 32).tolist())
    first = separation(clean, other, "t")
    scaled = separation(clean * 1e-4 + 100, other * 1e-4 + 100, "t")
    assert scaled.effect == pytest.approx(first.effect, rel=1e-9)
    assert scaled.separates == first.separates


def test_the_interval_is_a_bootstrap_of_the_mean_and_deterministic() -> None:
    rng = np.random.default_rng(2)
    diff = rng.normal(1.0, 2.0, 400)
    result = separation(values(diff.tolist()), values([0.0] * 400), "t")
    # For a large sample the percentile interval is about mean ± 1.96 standard errors.
    half = 1.96 * diff.std(ddof=1) / math.sqrt(400)
    assert result.low == pytest.approx(diff.mean() - half, abs=0.2 * half)
    assert result.high == pytest.approx(diff.mean() + half, abs=0.2 * half)
    again = separation(values(diff.tolist()), values([0.0] * 400), "t")
    assert (again.low, again.high) == (result.low, result.high)  # same values, same bytes


def test_a_refusal_gives_the_numbers() -> None:
    with pytest.raises(MetricError) as info:
        check_separation(values([0.1, -0.2, 0.15, 0.0]), values([0.0, 0.1, 0.1, 0.05]), "ioi",
                         accuracy=0.0)  # fmt: skip
    message = str(info.value)
    assert message.startswith(
        "the metric cannot separate the clean from the corrupted prompts of task 'ioi': "
        "the gap's interval does not exclude 0 (accuracy 0.00, clean − corrupted gap "
    )
    assert "95% interval" in message and f"needs {MIN_EFFECT:g}" in message
    assert "4 prompts" in message and "rl.evaluate(model, task)" in message


def test_against_the_ablated_run_says_so() -> None:
    result = separation(values([1.0, 1.1, 0.9]), values([1.0, 1.1, 0.9]), "ioi", against="ablated")
    assert "full model from the model with everything ablated" in refusal(result)
    assert "clean − ablated gap" in result.numbers()


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="one value per prompt each, got 3 and 2"):
        separation(values([1.0, 2.0, 3.0]), values([0.0, 0.0]), "t")


def test_one_line_per_task() -> None:
    result = separation(values([0.1, -0.2, 0.15, 0.0]), values([0.0, 0.1, 0.1, 0.05]), "ioi",
                        accuracy=0.0)  # fmt: skip
    line = result.line()
    assert line.startswith("ioi: refused, accuracy 0.00, gap ") and len(line) < 100


def test_evaluate_reports_the_same_test(native_model: object) -> None:
    from tests.patching.helpers import random_task, separable_task

    for task in (random_task(native_model, n=8, seed=5), separable_task(native_model)):
        scores = rl.evaluate(native_model, task)  # type: ignore[arg-type]
        direct = task_separation(native_model, task)  # type: ignore[arg-type]
        assert Separation.of_scores(task.name, scores).separates == direct.separates
        for field in ("gap", "low", "high", "effect", "accuracy"):
            assert getattr(Separation.of_scores(task.name, scores), field) == pytest.approx(
                getattr(direct, field), rel=1e-5, abs=1e-7
            )
    assert not task_separation(native_model, random_task(native_model, n=8, seed=5)).separates
    assert task_separation(native_model, separable_task(native_model)).separates  # type: ignore[arg-type]


def test_the_zoo_does_its_tasks() -> None:
    model = rl.load_model("zoo:base")
    for name in rl.tasks.names():
        result = task_separation(model, rl.tasks.load(name, model, n=16, seed=0))
        assert result.separates, result.line()
