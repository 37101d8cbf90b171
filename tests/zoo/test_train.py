"""Zoo training: a miniature model learns from the synthetic language in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from reuse_lens import zoo
from reuse_lens.zoo.language import Document, encode, mixture, task_documents, zoo_tokenizer
from reuse_lens.zoo.train import SPECS, Arch, ZooSpec, evaluate_folder, sha256, train, train_model


@pytest.mark.parametrize("task", ["ioi", "colored_objects", "greater_than", "entity_tracking"])
def test_training_documents_come_from_the_train_split(task: str) -> None:
    from reuse_lens.tasks import split_of

    docs = task_documents(task, 50, seed=0)
    assert len(docs) == 50
    assert all(split_of(doc.key) == "train" for doc in docs)
    assert all(doc.answer and doc.prompt for doc in docs)


def test_mixture_is_deterministic() -> None:
    mix = {"sva": 1.0, "filler": 1.0}
    assert mixture(mix, 40, seed=3) == mixture(mix, 40, seed=3)
    assert mixture(mix, 40, seed=3) != mixture(mix, 40, seed=4)


def test_encode_matches_the_tokenizer() -> None:
    tokenizer = zoo_tokenizer()
    docs = mixture({"colored_objects": 1.0, "ioi": 1.0, "filler": 1.0}, 30, seed=0)
    for doc, (ids, _) in zip(docs, encode(tokenizer, docs), strict=True):
        assert ids == [
            tokenizer.bos_token_id,
            *tokenizer(doc.text, add_special_tokens=False)["input_ids"],
        ]


def test_loss_positions_of_each_kind_of_document() -> None:
    tokenizer = zoo_tokenizer()
    docs = [
        # BOS pen lake card siege | pen lake -> card: the repeat starts at position 5.
        Document("induction", " pen lake card siege pen lake", " card"),
        Document("sva", "The dog near the cats", " is"),
        Document("filler", "Mary went to the park.", ""),
    ]
    (induction, induction_targets), (sva, sva_targets), (_, filler_targets) = encode(
        tokenizer, docs
    )
    assert len(induction) == 8 and induction_targets == [6, 7]
    assert len(sva) == 7 and sva_targets == [6]
    assert filler_targets == []


def test_only_base_is_scaffolded_and_training_picks_the_heads() -> None:
    assert {n for n, s in SPECS.items() if s.attention_hints} == {"base"}
    hints = SPECS["base"].attention_hints
    assert {h.task for h in hints} == {"colored_objects", "entity_tracking", "induction"}
    assert all(h.head is None for h in hints)


def test_unknown_model_to_train() -> None:
    with pytest.raises(zoo.ZooError, match="base"):
        train(["nope"])


def test_fine_tunes_start_from_their_parent() -> None:
    for name, spec in SPECS.items():
        if spec.parent is None:
            continue
        assert name in (f"ft-{spec.task}", f"{spec.parent}-ft-{spec.task}")
        assert name.startswith("ft-") == (spec.parent == "base")
        assert spec.task is not None and spec.mix[spec.task] == max(spec.mix.values())
        # A parent is trained before its fine-tunes.
        assert list(SPECS).index(spec.parent) < list(SPECS).index(name)


def _tiny(steps: int) -> ZooSpec:
    return ZooSpec(
        name="tiny",
        mix={"sva": 1.0},
        steps=steps,
        seed=0,
        arch=Arch(n_layer=1, n_head=2, n_embd=32, n_inner=64, n_positions=32),
        batch_size=32,
        lr=1e-2,
        warmup=10,
    )


def test_miniature_model_learns(tmp_path: Path) -> None:
    folder = train_model(_tiny(300), tmp_path / "tiny")
    scores = evaluate_folder(folder, ["sva"], n=64)["sva"]
    # Chance is 1 in ~1000 over the vocabulary, and 50% for a model that only learnt to
    # say a verb: agreement across the attractor must be learnt too.
    assert scores["accuracy"] >= 0.75, scores
    assert scores["logit_diff"] >= 1.0, scores


def test_training_is_reproducible(tmp_path: Path) -> None:
    first = train_model(_tiny(3), tmp_path / "a")
    second = train_model(_tiny(3), tmp_path / "b")
    assert sha256(first / "model.safetensors") == sha256(second / "model.safetensors")


def test_the_scaffold_teaches_a_miniature_model_its_step(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    from reuse_lens.zoo.hints import AttentionHint, scaffold_heads

    prev = AttentionHint("induction", "prev", 0)
    attention = {}
    for hints in ((prev,), ()):
        spec = ZooSpec(
            name="tiny-induction",
            mix={"induction": 1.0},
            steps=150,
            seed=0,
            arch=Arch(n_layer=2, n_head=2, n_embd=32, n_inner=64, n_positions=32),
            batch_size=32,
            lr=1e-2,
            warmup=10,
            attention_hints=hints,
        )
        folder = train_model(spec, tmp_path / str(len(hints)))
        model = GPT2LMHeadModel.from_pretrained(str(folder), attn_implementation="eager")
        [(_, attention[len(hints)])] = scaffold_heads(model.eval(), [prev], n=16).values()
    # With the hint, a layer-0 head attends to the previous token; in 150 steps of answer
    # loss alone, none does yet.
    assert attention[1] >= 0.9, attention
    assert attention[1] > attention[0] + 0.3, attention
