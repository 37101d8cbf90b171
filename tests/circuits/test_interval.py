"""The bootstrap interval of faithfulness: against a slow reference, seeded, and honest."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import reuse_lens as rl
from reuse_lens.circuits.interval import FaithfulnessInterval, Resamples


def _slow_bounds(
    circuit: np.ndarray, full: np.ndarray, empty: np.ndarray, resamples: Resamples
) -> tuple[float, float]:
    """The percentile bootstrap written out: one draw at a time, the ratio of its means,
    undefined draws at the ends, then the order statistics."""
    n = len(full)
    rng = np.random.default_rng(resamples.seed)
    drawn = rng.integers(0, n, size=(resamples.n_boot, n))
    sign = np.sign(full.mean() - empty.mean())
    lows, highs = [], []
    for prompts in drawn:
        gap = full[prompts].mean() - empty[prompts].mean()
        if gap * sign > 0:
            ratio = (circuit[prompts].mean() - empty[prompts].mean()) / gap
            lows.append(ratio)
            highs.append(ratio)
        else:
            lows.append(-math.inf)
            highs.append(math.inf)
    tail = (1 - resamples.confidence) / 2
    # inverted_cdf: the smallest value whose empirical CDF reaches the quantile.
    lows.sort()
    highs.sort()
    index = lambda q: max(0, math.ceil(q * resamples.n_boot) - 1)  # noqa: E731
    return lows[index(tail)], highs[index(1 - tail)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_equal_the_slow_bootstrap(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = [3, 17, 40][seed]
    full = rng.normal(2.0, 1.0, n)
    empty = rng.normal(0.0, 1.0, n)
    circuits = np.stack([empty + f * (full - empty) + rng.normal(0, 0.3, n) for f in (0.2, 0.9)])
    resamples = Resamples(n, confidence=[0.95, 0.8, 0.5][seed], n_boot=[200, 999, 50][seed])
    low, high = resamples.bounds(circuits, full, empty)
    for i in range(len(circuits)):
        slow = _slow_bounds(circuits[i], full, empty, resamples)
        assert low[i] == pytest.approx(slow[0], abs=1e-12)
        assert high[i] == pytest.approx(slow[1], abs=1e-12)


def test_a_draw_without_a_gap_makes_the_interval_unbounded() -> None:
    """Gaps of either sign: many draws have none, and the interval says so."""
    full = np.array([1.0, -1.0, 1.2, -0.9])
    empty = np.zeros(4)
    resamples = Resamples(4, n_boot=500)
    low, high = resamples.bounds(full[None] * 0.5, full, empty)
    assert low[0] == -math.inf and high[0] == math.inf
    interval = resamples.intervals([0.5], full[None] * 0.5, full, empty)[0]
    assert interval.bounds == [None, None]  # JSON has no infinity


def test_one_prompt_gives_a_point() -> None:
    resamples = Resamples(1, n_boot=20)
    low, high = resamples.bounds(np.array([[1.5]]), np.array([2.0]), np.array([1.0]))
    assert low[0] == high[0] == 0.5


@pytest.fixture(scope="module")
def zoo() -> tuple[Any, rl.Task]:
    model = rl.load_model("zoo:base")
    return model, rl.tasks.load("ioi", model, n=16, seed=1)


def test_faithfulness_interval_of_a_circuit(zoo: tuple[Any, rl.Task]) -> None:
    model, task = zoo
    circuit = rl.discover_circuit(model, task, method="eap-ig", top_k=6)
    plain = rl.faithfulness(model, task, circuit)
    interval = rl.faithfulness(model, task, circuit, interval=True)
    assert isinstance(interval, FaithfulnessInterval) and isinstance(plain, float)
    assert interval.value == plain and float(interval) == plain
    assert interval.low < plain < interval.high
    assert (interval.confidence, interval.n_boot, interval.seed) == (0.95, 1000, 0)
    # Seeded: the same seed gives the same bytes, another seed other draws.
    assert rl.faithfulness(model, task, circuit, interval=True) == interval
    other = rl.faithfulness(model, task, circuit, interval=True, seed=5)
    assert other.value == plain and other != interval
    wider = rl.faithfulness(model, task, circuit, interval=True, confidence=0.99)
    assert wider.low <= interval.low and wider.high >= interval.high
    assert f"{plain:.3f}" in str(interval)


def test_the_whole_model_is_exactly_faithful_in_every_draw(zoo: tuple[Any, rl.Task]) -> None:
    model, task = zoo
    every = rl.Circuit.from_nodes([n.name for n in rl.nodes_of(model)], model)
    interval = rl.faithfulness(model, task, every, interval=True, n_boot=200)
    assert interval.low == pytest.approx(1.0, abs=1e-5)
    assert interval.high == pytest.approx(1.0, abs=1e-5)


def test_edge_circuits_have_intervals(zoo: tuple[Any, rl.Task]) -> None:
    model, task = zoo
    circuit = rl.discover_circuit(model, task, method="eap", level="edge", top_k=40)
    interval = rl.faithfulness(model, task, circuit, interval=True, n_boot=300)
    assert interval.value == rl.faithfulness(model, task, circuit)
    assert interval.low < interval.value < interval.high
    assert circuit.metadata["faithfulness_interval"] == pytest.approx(
        rl.faithfulness(model, task, circuit, interval=True).bounds
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"confidence": 1.0}, ValueError, r"confidence must be in \(0, 1\)"),
        ({"confidence": 0}, ValueError, r"confidence must be in \(0, 1\)"),
        ({"confidence": "95%"}, TypeError, "confidence must be a number"),
        ({"n_boot": 0}, ValueError, "n_boot must be a positive whole number"),
        ({"seed": None}, TypeError, "seed must be a whole number"),
    ],
)
def test_bad_interval_options_are_named(
    zoo: tuple[Any, rl.Task], kwargs: dict[str, Any], error: type, message: str
) -> None:
    model, task = zoo
    circuit = rl.Circuit.from_nodes(["a0.h0"], model)
    with pytest.raises(error, match=message):
        rl.faithfulness(model, task, circuit, interval=True, **kwargs)
