"""The built-in task generators: every task runs, deterministically, under any tokenizer."""

from __future__ import annotations

import pytest
import torch

import reuse_lens as rl
from reuse_lens.tasks import TaskError, split_of

ALL = [
    "ioi",
    "colored_objects",
    "greater_than",
    "induction",
    "sva",
    "entity_tracking",
    "gendered_pronoun",
]


def test_names_lists_the_seven() -> None:
    assert set(ALL) <= set(rl.tasks.names())


@pytest.mark.parametrize("name", ALL)
def test_every_task_runs_on_an_offline_hf_model(hf_model, name: str) -> None:
    task = rl.tasks.load(name, hf_model, n=8, seed=0)
    assert len(task) == 8 and task.name == name
    assert task.clean.shape == task.corrupted.shape
    # Pairs differ somewhere but have the same length, and every answer is one known token.
    assert (task.clean != task.corrupted).any(dim=1).all()
    unk = hf_model.tokenizer.unk_token_id
    assert not (task.clean == unk).any() and not (task.corrupted == unk).any()
    assert ((task.answers >= 0).sum(1) >= 1).all()
    for answers, wrong in zip(task.answers.tolist(), task.wrong.tolist(), strict=True):
        assert not ({a for a in answers if a >= 0} & {w for w in wrong if w >= 0})
    scores = rl.evaluate(hf_model, task)
    assert all(torch.isfinite(torch.tensor(v)) for v in scores.values())


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_prompts(hf_model, name: str) -> None:
    a = rl.tasks.load(name, hf_model, n=5, seed=7)
    b = rl.tasks.load(name, hf_model, n=5, seed=7)
    c = rl.tasks.load(name, hf_model, n=5, seed=8)
    assert a.prompts["clean"] == b.prompts["clean"]
    assert torch.equal(a.clean, b.clean) and torch.equal(a.answers, b.answers)
    assert a.prompts["clean"] != c.prompts["clean"]


@pytest.mark.parametrize("name", ALL)
def test_splits_are_disjoint_by_combination(hf_model, name: str) -> None:
    test = rl.tasks.load(name, hf_model, n=10, seed=0, split="test")
    train = rl.tasks.load(name, hf_model, n=10, seed=0, split="train")
    assert {split_of(k) for k in test.prompts["key"]} == {"test"}
    assert {split_of(k) for k in train.prompts["key"]} == {"train"}


def test_ioi_corruptions(hf_model) -> None:
    abc = rl.tasks.load("ioi", hf_model, n=4, seed=0)
    flip = rl.tasks.load("ioi", hf_model, n=4, seed=0, corruption="s2_io")
    assert abc.prompts["clean"] == flip.prompts["clean"]
    for row in flip.prompts:
        # Merullo's flip: the second mention of S becomes IO.
        assert row["corrupted"].count(row["io"]) == 2 and row["corrupted"].count(row["s"]) == 1
    for row in abc.prompts:
        assert row["io"] not in row["corrupted"] and row["s"] not in row["corrupted"]


def test_colored_objects_format(hf_model) -> None:
    row = rl.tasks.load("colored_objects", hf_model, n=1, seed=0).prompts[0]
    assert row["clean"].count("Q: On the") == 2 and row["clean"].endswith("?\nA:")
    assert row["answers"][0][1].isupper()  # the answer is the capitalised colour
    question = row["clean"].rsplit("\n\n", 1)[1]
    assert f" {row['color']} {row['object']}" in question


def test_greater_than_answer_sets(hf_model) -> None:
    task = rl.tasks.load("greater_than", hf_model, n=3, seed=0)
    assert task.metric.name == "prob_diff"
    for row in task.prompts:
        assert all(int(y) > row["start"] for y in row["answers"])
        assert all(int(y) <= row["start"] for y in row["wrong"])
        assert "year 1" in row["corrupted"] and f"{row['start']:02d} to" not in row["corrupted"]


def test_induction_without_a_tokenizer(native_model) -> None:
    task = rl.tasks.load("induction", native_model, n=4, seed=0)
    assert len(task) == 4
    for i in range(4):
        n = int(task.lengths[i])
        assert task.clean[i, :n].max() < native_model.cfg.d_vocab


def test_text_tasks_without_a_tokenizer_are_clear(native_model) -> None:
    with pytest.raises(TaskError, match="no tokenizer"):
        rl.tasks.load("ioi", native_model, n=2)


def test_unknown_task_and_option(hf_model) -> None:
    with pytest.raises(TaskError, match="unknown task 'ioj'"):
        rl.tasks.load("ioj", hf_model)
    with pytest.raises(TaskError, match="has no option 'colour'"):
        rl.tasks.load("ioi", hf_model, colour="red")
    with pytest.raises(TaskError, match="is not one of"):
        rl.tasks.load("ioi", hf_model, corruption="xyz")
    with pytest.raises(TaskError, match="at least one prompt"):
        rl.tasks.load("ioi", hf_model, n=0)


def test_tokenizer_that_lacks_words_is_clear() -> None:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.zoo.tokenizer import build_tokenizer
    from tests.conftest import native_config

    tokenizer = build_tokenizer([" When", " and", " went", " to", " the", ",", " gave", " a"])
    cfg = native_config(d_vocab=len(tokenizer.get_vocab()))
    model = TransformerBridge.boot_native(cfg, tokenizer=tokenizer).eval()
    with pytest.raises(TaskError, match="needs at least 5 names that are single tokens"):
        rl.tasks.load("ioi", model, n=2)
