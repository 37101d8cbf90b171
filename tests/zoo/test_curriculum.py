"""Data curricula for the zoo: step documents of the binding tasks, and ordered phases."""

from __future__ import annotations

import pytest

from reuse_lens.tasks import split_of
from reuse_lens.zoo import train as zoo_train
from reuse_lens.zoo.language import STEPS, encode, mixture, step_documents, zoo_tokenizer
from reuse_lens.zoo.train import Arch, Phase, ZooSpec


def test_step_documents_stop_at_the_key_word_and_answer_with_what_the_scene_binds() -> None:
    colours = step_documents("colored_objects", 20, seed=0)
    assert len(colours) == 20 and all(d.source == "colored_objects" + STEPS for d in colours)
    for doc in colours:
        asked = doc.prompt.rsplit(" ", 1)[1]  # "... What color is the bowl" -> bowl
        scene = doc.prompt.rsplit("Q: ", 1)[1]  # the last question's scene
        assert f"{doc.answer} {asked}," in scene or f"{doc.answer} {asked}." in scene
        assert split_of(doc.key) == "train"
    boxes = step_documents("entity_tracking", 20, seed=0)
    for doc in boxes:
        letter = doc.prompt.rsplit(" ", 1)[1]  # "... Box M" -> M
        assert f"The{doc.answer} is in box {letter}" in doc.prompt or (
            f"the{doc.answer} is in box {letter}" in doc.prompt
        )
    # Every word is in the zoo's vocabulary, and the loss is on the answer.
    tokenizer = zoo_tokenizer()
    for ids, targets in encode(tokenizer, colours + boxes):
        assert tokenizer.unk_token_id not in ids and targets == [len(ids) - 1]


def test_step_documents_only_for_binding_tasks() -> None:
    with pytest.raises(ValueError, match="only for"):
        step_documents("ioi", 4, seed=0)
    docs = mixture({"colored_objects/steps": 1.0, "sva": 1.0}, 20, seed=0)
    assert {d.source for d in docs} == {"colored_objects/steps", "sva"}


def test_phases_come_first_in_order_and_leave_the_main_mix_as_it_was() -> None:
    tokenizer = zoo_tokenizer()
    plain = ZooSpec(name="t", mix={"sva": 1.0}, steps=6, seed=0, batch_size=4, arch=Arch())
    staged = ZooSpec(
        name="t", mix={"sva": 1.0}, steps=10, seed=0, batch_size=4, arch=Arch(),
        phases=(Phase(2, {"induction": 1.0}), Phase(2, {"greater_than": 1.0})),
    )  # fmt: skip
    batches = zoo_train._batches(staged, tokenizer)
    assert [set(b.sources) for b in batches[:4]] == [{"induction"}] * 2 + [{"greater_than"}] * 2
    # The main mix's batches are those of a spec without phases and the same seed.
    rest = zoo_train._batches(plain, tokenizer)
    assert all(a.tokens.equal(b.tokens) for a, b in zip(batches[4:], rest, strict=True))
    with pytest.raises(ValueError, match="phases hold more"):
        zoo_train._batches(
            ZooSpec(name="t", mix={"sva": 1.0}, steps=1, seed=0, phases=(Phase(2, {"sva": 1}),)),
            tokenizer,
        )
