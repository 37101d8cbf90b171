"""Task construction from pairs: tensors, padding, metrics and every bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import reuse_lens as rl
from reuse_lens.evaluation import answer_logits, normalized_metric
from reuse_lens.tasks import MetricError, MetricInputs, TaskError, get_metric
from reuse_lens.tasks.metrics import Accuracy, KLFromClean, LogitDiff, NormalizedLogitDiff, ProbDiff
from tests.conftest import native_config

CLEAN = [
    "When Mary and John went to the store, John gave a bag to",
    "When Alice and Tom went home, Tom gave it to",
]
CORRUPTED = [
    "When Emma and Paul went to the store, Carl gave a bag to",
    "When Grace and Ryan went home, Adam gave it to",
]


def test_from_pairs_tensors(hf_model) -> None:
    task = rl.Task.from_pairs(hf_model, CLEAN, CORRUPTED, [" Mary", " Alice"], [" John", " Tom"])
    bos = hf_model.tokenizer.bos_token_id
    assert task.clean.shape == task.corrupted.shape
    assert (task.clean[:, 0] == bos).all()
    lengths = [len(hf_model.to_tokens(p)[0]) for p in CLEAN]
    assert task.answer_pos.tolist() == [n - 1 for n in lengths]
    assert task.lengths.tolist() == lengths
    assert task.answers.shape == (2, 1)
    assert task.answers[0, 0] == hf_model.tokenizer.convert_tokens_to_ids(" Mary")
    assert task.metric.name == "logit_diff"
    assert task.prompts["clean"] == CLEAN


def test_padding_does_not_change_answer_logits(hf_model) -> None:
    """A right-padded prompt gives the same answer-position logits as the prompt alone."""
    task = rl.Task.from_pairs(hf_model, CLEAN, CORRUPTED, [" Mary", " Alice"], [" John", " Tom"])
    assert task.lengths[0] != task.lengths[1]
    batched = answer_logits(hf_model, task.clean, task.answer_pos)
    for i, prompt in enumerate(CLEAN):
        alone = hf_model(hf_model.to_tokens(prompt))[0, -1]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)


def test_token_id_prompts_need_no_tokenizer(native_model) -> None:
    task = rl.Task.from_pairs(native_model, [[0, 3, 4, 5]], [[0, 6, 4, 5]], [7], [8])
    assert task.clean.tolist() == [[0, 3, 4, 5]]
    scores = rl.evaluate(native_model, task)
    assert set(scores) >= {"logit_diff", "accuracy", "corrupted_logit_diff", "prob_diff"}


def test_length_mismatch_names_the_pair(hf_model) -> None:
    with pytest.raises(
        TaskError, match=r"pair 1 .* is \d+ tokens but its corrupted partner .* is \d+"
    ):
        rl.Task.from_pairs(
            hf_model,
            CLEAN,
            [CORRUPTED[0], CORRUPTED[1] + " it"],
            [" Mary", " Alice"],
            [" John", " Tom"],
        )


def test_multi_token_answer_is_named(hf_model) -> None:
    with pytest.raises(TaskError, match=r"answer of prompt 1 ' Alice Tom' is 2 tokens"):
        rl.Task.from_pairs(hf_model, CLEAN, CORRUPTED, [" Mary", " Alice Tom"], [" John", " Tom"])


def test_answer_without_space_gets_a_hint(hf_model) -> None:
    with pytest.raises(TaskError, match="leading space"):
        rl.Task.from_pairs(hf_model, CLEAN[:1], CORRUPTED[:1], ["Mary John"], [" John"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(clean=[], corrupted=[], answers=[], wrong=[]), "has no prompts"),
        (
            dict(clean=CLEAN, corrupted=CORRUPTED[:1], answers=[" Mary"] * 2, wrong=[" John"] * 2),
            "1 corrupted",
        ),
        (
            dict(clean=CLEAN, corrupted=CORRUPTED, answers=[[], [" Mary"]], wrong=[" John"] * 2),
            "is empty",
        ),
    ],
)
def test_bad_shapes(hf_model, kwargs, message) -> None:
    with pytest.raises(TaskError, match=message):
        rl.Task.from_pairs(hf_model, **kwargs)


def test_text_prompts_need_a_tokenizer(native_model) -> None:
    with pytest.raises(TaskError, match="no tokenizer"):
        rl.Task.from_pairs(native_model, ["hello"], ["world"], [1], [2])


def test_out_of_vocabulary_ids(native_model) -> None:
    with pytest.raises(TaskError, match="outside the model's vocabulary"):
        rl.Task.from_pairs(native_model, [[0, 999]], [[0, 1]], [1], [2])


def test_task_for_another_vocabulary_is_refused(hf_model) -> None:
    task = rl.Task.from_pairs(hf_model, CLEAN, CORRUPTED, [" Mary", " Alice"], [" John", " Tom"])
    other = rl.load_model(native_config(d_vocab=37))
    with pytest.raises(TaskError, match="vocabulary of"):
        rl.evaluate(other, task)


def test_prompts_round_trip_through_jsonl(hf_model, tmp_path: Path) -> None:
    task = rl.tasks.load("ioi", hf_model, n=6, seed=3)
    path = tmp_path / "ioi.jsonl"
    task.prompts.to_json(path)
    again = rl.Task.from_dataset(hf_model, Dataset.from_json(str(path)), name="ioi")
    assert torch.equal(again.clean, task.clean)
    assert torch.equal(again.corrupted, task.corrupted)
    assert torch.equal(again.answers, task.answers)
    assert again.prompts["template"] == task.prompts["template"]


def test_from_dataset_needs_the_core_columns(hf_model) -> None:
    with pytest.raises(TaskError, match="lacks the column"):
        rl.Task.from_dataset(hf_model, Dataset.from_dict({"clean": ["a"]}))


def test_select_keeps_rows_aligned(hf_model) -> None:
    task = rl.tasks.load("ioi", hf_model, n=6, seed=0)
    sub = task.select([4, 1])
    assert sub.prompts["clean"] == [task.prompts["clean"][4], task.prompts["clean"][1]]
    assert torch.equal(sub.answers, task.answers[[4, 1]])
    assert sub.clean.shape[1] == int(sub.answer_pos.max()) + 1
    with pytest.raises(TaskError, match="empty subset"):
        task.select([])


# ---- metrics ------------------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 0.0, 0.0]])
INPUTS = MetricInputs(
    answers=torch.tensor([[0, -1], [1, 2]]), wrong=torch.tensor([[2, 3], [0, -1]])
)


def test_logit_diff_by_hand() -> None:
    # Row 0: 2 - mean(1, -1) = 2. Row 1: mean(3, 0) - 0 = 1.5.
    assert LogitDiff()(LOGITS, INPUTS).tolist() == [2.0, 1.5]


def test_prob_diff_by_hand() -> None:
    p = LOGITS.softmax(-1)
    expected = [p[0, 0] - p[0, 2] - p[0, 3], p[1, 1] + p[1, 2] - p[1, 0]]
    torch.testing.assert_close(ProbDiff()(LOGITS, INPUTS), torch.stack(expected))


def test_accuracy_is_top1_in_answers() -> None:
    assert Accuracy()(LOGITS, INPUTS).tolist() == [1.0, 1.0]
    flipped = MetricInputs(answers=torch.tensor([[3], [0]]), wrong=torch.tensor([[0], [1]]))
    assert Accuracy()(LOGITS, flipped).tolist() == [0.0, 0.0]


def test_kl_is_zero_at_clean_and_negative_elsewhere() -> None:
    with_clean = MetricInputs(INPUTS.answers, INPUTS.wrong, clean_logits=LOGITS)
    assert KLFromClean()(LOGITS, with_clean).abs().max() < 1e-6
    assert (KLFromClean()(LOGITS.flip(-1), with_clean) < 0).all()
    with pytest.raises(MetricError, match="needs the clean run"):
        KLFromClean()(LOGITS, INPUTS)


def test_normalized_logit_diff() -> None:
    metric = NormalizedLogitDiff.for_baselines(clean=2.0, corrupted=-2.0)
    assert metric(LOGITS, INPUTS).tolist() == [1.0, 0.875]
    with pytest.raises(MetricError, match="cannot tell clean"):
        NormalizedLogitDiff.for_baselines(clean=1.0, corrupted=1.0)
    with pytest.raises(MetricError, match="cannot tell clean"):
        NormalizedLogitDiff.for_baselines(clean=math.nan, corrupted=1.0)


def test_normalized_metric_refuses_identical_prompts(hf_model) -> None:
    import dataclasses

    # from_pairs refuses such pairs itself; normalized_metric must too, for a task made
    # around it.
    task = rl.Task.from_pairs(hf_model, CLEAN, CORRUPTED, [" Mary", " Alice"], [" John", " Tom"])
    task = dataclasses.replace(task, corrupted=task.clean.clone())
    with pytest.raises(MetricError, match="cannot tell clean"):
        normalized_metric(hf_model, task)


def test_unknown_metric_name() -> None:
    with pytest.raises(MetricError, match="unknown metric 'bleu'"):
        get_metric("bleu")


def test_nan_metric_is_caught(hf_model) -> None:
    class Broken:
        name = "broken"
        needs_clean_logits = False

        def __call__(self, logits, inputs):
            return torch.full((logits.shape[0],), float("nan"))

    task = rl.Task.from_pairs(hf_model, CLEAN, CORRUPTED, [" Mary", " Alice"], [" John", " Tom"])
    with pytest.raises(MetricError, match="non-finite"):
        rl.evaluate(hf_model, task.with_metric(Broken()))


def test_evaluate_reports_clean_and_corrupted(hf_model) -> None:
    task = rl.tasks.load("ioi", hf_model, n=4, seed=0)
    scores = rl.evaluate(hf_model, task)
    clean = answer_logits(hf_model, task.clean, task.answer_pos)
    assert scores["logit_diff"] == pytest.approx(
        float(LogitDiff()(clean, task.metric_inputs()).mean())
    )
    assert scores["clean_metric"] == scores["logit_diff"]
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["n"] == 4
