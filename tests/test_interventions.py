"""Interventions: uniform attention against a hand-written forward pass, ablation controls."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import reuse_lens as rl
from reuse_lens.arch.registry import extract as extract_weights
from reuse_lens.interventions import ablate_heads, token_positions, uniform_attention
from tests.conftest import native_config
from tests.patching.handbuilt import build_model, build_task
from tests.patching.helpers import random_task


@torch.no_grad()
def reference_logits(
    model: Any, task: rl.Task, heads: dict[int, list[int]], positions: list[list[int]]
) -> torch.Tensor:
    """The forward pass written out, with the answer query's pattern replaced by hand."""
    w = extract_weights(model)
    tokens = task.clean
    resid = w.embed(tokens)
    pos = torch.arange(tokens.shape[1])
    for layer in range(w.n_layers):
        q, k, v = w.qkv(layer, resid)
        pattern = w.pattern(q, k, pos).clone()
        for head in heads.get(layer, []):
            for i, row in enumerate(positions):
                a = int(task.answer_pos[i])
                pattern[i, head, a] = 0.0
                pattern[i, head, a, row] = 1.0 / len(row)
        resid = resid + w.attn_out(layer, w.mix(pattern, v))
        resid = resid + w.mlp_out(layer, resid)
    rows = torch.arange(len(task))
    return w.logits(resid[rows, task.answer_pos])


def _metric(task: rl.Task, logits: torch.Tensor) -> float:
    return float(task.metric(logits, task.metric_inputs()).mean())


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_uniform_attention_equals_the_hand_written_forward(kind: str, hf_model: Any) -> None:
    model = rl.load_model(native_config()) if kind == "native" else hf_model
    task = random_task(model, n=3, lengths=[6, 5, 6], seed=2)
    positions = [[1, 2], [0, 3], [4]]
    result = uniform_attention(model, task, ["a0.h1", "a1.h2", "a1.h3"], positions)
    expected = reference_logits(model, task, {0: [1], 1: [2, 3]}, positions)
    assert result.metric_after == pytest.approx(_metric(task, expected), abs=1e-4)
    assert result.metric_before == pytest.approx(rl.evaluate(model, task)["clean_metric"], abs=1e-5)
    assert result.heads == ("a0.h1", "a1.h2", "a1.h3")


def test_uniform_attention_on_the_planted_mover_breaks_or_keeps_the_answer() -> None:
    model = build_model()
    task = build_task(model)
    # a0.h0 copies the token at position 1. Spreading it over BOS and position 1 halves
    # what it copies; moving it to BOS alone removes the answer entirely.
    kept = uniform_attention(model, task, ["a0.h0"], [1])
    assert kept.metric_after == pytest.approx(kept.metric_before, rel=1e-3)
    assert kept.accuracy_after == 1.0
    moved = uniform_attention(model, task, ["a0.h1"], [0])  # a decoy: nothing changes
    assert moved.metric_after == pytest.approx(moved.metric_before, rel=1e-3)


def test_token_positions_finds_the_wrong_answers() -> None:
    model = build_model()
    task = build_task(model)
    # Prompts are [BOS, X, f, ...]; the wrong answer Y is not in the clean prompt, X is.
    assert token_positions(task, "answers") == [[1]] * len(task)
    with pytest.raises(ValueError, match="no position to attend to"):
        uniform_attention(model, task, ["a0.h0"], "wrong")


def test_bad_intervention_inputs_are_named() -> None:
    model = build_model()
    task = build_task(model)
    with pytest.raises(rl.nodes.NodeNameError, match="only attention heads"):
        uniform_attention(model, task, ["m0"], [1])
    with pytest.raises(ValueError, match="before its answer position"):
        uniform_attention(model, task, ["a0.h0"], [7])
    with pytest.raises(ValueError, match="4 prompts|has 4"):
        uniform_attention(model, task, ["a0.h0"], [[1], [1]])


def test_ablating_planted_heads_beats_random_sets() -> None:
    model = build_model()
    task = build_task(model)
    result = ablate_heads(model, task, ["a0.h0", "a1.h0"], ablation="resample", n_random=5, seed=0)
    # Resampling the planted heads turns the clean run into the corrupted one.
    assert result.result.metric_after == pytest.approx(-result.result.metric_before, rel=1e-3)
    assert result.result.accuracy_before == 1.0 and result.result.accuracy_after == 0.0
    # There are 6 pairs of 4 heads; the only pair that leaves the answer alone is the decoys'.
    assert result.n_random == 5
    again = ablate_heads(model, task, ["a0.h0", "a1.h0"], ablation="resample", n_random=5, seed=0)
    assert again == result
