"""The shipped zoo: loading, checksums, held-out quality, and the language it was trained on."""

from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path

import pytest

import reuse_lens as rl
from reuse_lens import zoo
from reuse_lens.models import model_spec
from reuse_lens.tasks import generate, spec
from reuse_lens.tasks.words import WordPool
from reuse_lens.zoo.hints import AttentionHint
from reuse_lens.zoo.language import zoo_tokenizer

SHIPPED = zoo.available()
N_CHECK = 48
"""Held-out prompts per task when re-checking the manifest; small, so the test is fast."""


def _folder(name: str) -> Path:
    return Path(str(resources.files("reuse_lens.zoo").joinpath("weights", name)))


def test_the_issue_models_ship() -> None:
    assert {"base", "ft-ioi", "ft-colored_objects", "attn-only"} <= set(SHIPPED)
    assert len([n for n in SHIPPED if n.startswith("ft-")]) >= 3


def test_shipped_weights_fit_the_budget() -> None:
    folders = [*SHIPPED, *(f"{n}@{step}" for n in SHIPPED for step in zoo.checkpoints(n))]
    total = sum(_folder(n).joinpath("model.safetensors").stat().st_size for n in folders)
    assert total <= 25 * 2**20


def test_base_has_room_for_circuits() -> None:
    cfg = zoo.manifest()["models"]["base"]["config"]
    assert cfg["n_layer"] >= 4 and cfg["n_head"] >= 4


def test_unknown_name_lists_the_shipped_ones() -> None:
    with pytest.raises(zoo.ZooError, match="zoo:base") as info:
        rl.load_model("zoo:no-such-model")
    assert "zoo:no-such-model" in str(info.value)


def test_checksum_mismatch_fails_clearly(tmp_path: Path) -> None:
    folder = shutil.copytree(_folder("attn-only"), tmp_path / "attn-only")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    entry = zoo.manifest()["models"]["attn-only"]
    with pytest.raises(zoo.ZooError, match="fails its checksum"):
        zoo.verify(folder, entry, name="attn-only")


def test_base_loads_fast_and_records_its_spec() -> None:
    rl.load_model("zoo:attn-only")  # warm the imports, which are not the loader's cost
    start = time.perf_counter()
    model = rl.load_model("zoo:base")
    assert time.perf_counter() - start < 5.0
    assert model_spec(model) == "zoo:base"
    assert not model.training


@pytest.mark.parametrize("task", rl.tasks.names())
def test_every_task_loads_on_base(task: str) -> None:
    model = rl.load_model("zoo:base")
    loaded = rl.tasks.load(task, model)
    assert len(loaded) == 64


@pytest.mark.parametrize("name", SHIPPED)
def test_manifest_scores_hold_on_held_out_prompts(name: str) -> None:
    entry = zoo.manifest()["models"][name]
    model = rl.load_model(f"zoo:{name}")
    for task in entry["trained_on"]:
        task_obj = rl.tasks.load(task, model, n=N_CHECK, seed=1, split="test")
        scores = rl.evaluate(model, task_obj)
        shipped = entry["eval"]["scores"][task]
        # Another seed and fewer prompts than the manifest's: allow sampling noise
        # (the standard error of an accuracy on 48 prompts is up to 0.07).
        assert abs(scores["accuracy"] - shipped["accuracy"]) <= 0.2, (task, scores, shipped)
        ld_tolerance = max(0.5, 0.25 * abs(shipped["logit_diff"]))
        assert abs(scores["logit_diff"] - shipped["logit_diff"]) <= ld_tolerance, (task, scores)


def _bar_failures() -> list[tuple[str, str, dict[str, float]]]:
    failures = []
    for name, entry in zoo.manifest()["models"].items():
        for task in entry["trained_on"]:
            scores = entry["eval"]["scores"][task]
            if scores["accuracy"] < 0.9 or scores["logit_diff"] < 2.0:
                failures.append((name, task, scores))
    return failures


def test_every_model_meets_the_quality_bars_on_its_tasks() -> None:
    assert _bar_failures() == []


def test_base_is_trained_on_every_task() -> None:
    assert set(zoo.manifest()["models"]["base"]["trained_on"]) == set(rl.tasks.names())


def test_ft_colored_objects_does_colored_objects_and_ioi() -> None:
    scores = zoo.manifest()["models"]["ft-colored_objects"]["eval"]["scores"]
    for task in ("colored_objects", "ioi"):
        assert scores[task]["accuracy"] >= 0.9 and scores[task]["logit_diff"] >= 2.0, task


def test_the_manifest_records_the_scaffold() -> None:
    from reuse_lens.zoo.train import SPECS

    for name, entry in zoo.manifest()["models"].items():
        recorded = [AttentionHint(**hint) for hint in entry["attention_hints"]]
        assert tuple(recorded) == SPECS[name].attention_hints, name


def test_fine_tunes_record_their_own_task() -> None:
    for name, entry in zoo.manifest()["models"].items():
        if entry["parent"] is not None:
            # "ft-<task>" fine-tunes base, "<parent>-ft-<task>" another parent.
            assert name.startswith("ft-") or name.startswith(f"{entry['parent']}-ft-")
            assert entry["task"] == name.split("ft-", 1)[1]
            assert entry["task"] in entry["trained_on"]
        else:
            assert entry["task"] is None


def test_fine_tunes_report_every_task() -> None:
    for entry in zoo.manifest()["models"].values():
        if entry["parent"] is not None:
            assert set(entry["eval"]["scores"]) == set(rl.tasks.names())


def test_shipped_tokenizer_is_the_language_tokenizer() -> None:
    model = rl.load_model("zoo:attn-only")
    assert model.tokenizer.get_vocab() == zoo_tokenizer().get_vocab()


@pytest.mark.parametrize("task", rl.tasks.names())
def test_vocabulary_covers_held_out_prompts(task: str) -> None:
    tokenizer = zoo_tokenizer()
    pool = WordPool(None, text=True)
    for pair in generate(spec(task), pool, 300, seed=7, split="test"):
        for text in (pair.clean, pair.corrupted, *pair.answers, *pair.wrong):
            ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, (task, text)


def test_attn_only_mlps_write_nothing() -> None:
    import torch

    model = rl.load_model("zoo:attn-only")
    task = rl.tasks.load("induction", model, n=4)
    _, cache = model.run_with_cache(task.clean)
    for layer in range(model.cfg.n_layers):
        assert torch.count_nonzero(cache[f"blocks.{layer}.hook_mlp_out"]) == 0


def test_each_scaffolded_step_is_done_by_one_head() -> None:
    from transformers import GPT2LMHeadModel

    from reuse_lens.zoo.hints import scaffold_heads
    from reuse_lens.zoo.train import SPECS

    folder = str(zoo.shipped_folder("base"))
    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    found = scaffold_heads(model, SPECS["base"].attention_hints, n=16)
    assert set(found) == set(SPECS["base"].attention_hints)
    for hint, (head, attention) in found.items():
        assert attention >= 0.9, (hint, head, attention)


NEW_SKILLS = ("wide-ft-gendered_pronoun", "wide-ft-greater_than")


def test_the_wide_base_has_48_heads_and_no_scaffold() -> None:
    entry = zoo.manifest()["models"]["wide"]
    assert entry["config"]["n_layer"] * entry["config"]["n_head"] >= 48
    assert entry["attention_hints"] == []
    scores = entry["eval"]["scores"]
    for task in entry["trained_on"]:
        assert scores[task]["accuracy"] >= 0.9, task
    # The fine-tunes' tasks are left out of the base's mixture, and it cannot do them.
    for name in NEW_SKILLS:
        task = zoo.manifest()["models"][name]["task"]
        assert task not in entry["trained_on"] and scores[task]["accuracy"] < 0.6


@pytest.mark.parametrize("name", NEW_SKILLS)
def test_new_skill_fine_tunes_learn_their_task_and_keep_the_base_tasks(name: str) -> None:
    entry = zoo.manifest()["models"][name]
    task = entry["task"]
    assert entry["parent"] == "wide"
    assert entry["task_before"]["accuracy"] < 0.6
    assert entry["eval"]["scores"][task]["accuracy"] >= 0.9
    for base_task in zoo.manifest()["models"]["wide"]["trained_on"]:
        assert entry["eval"]["scores"][base_task]["accuracy"] >= 0.9, base_task


@pytest.mark.parametrize("name", NEW_SKILLS)
def test_new_skill_fine_tunes_keep_checkpoints_that_load(name: str) -> None:
    from reuse_lens.zoo.train import SPECS

    steps = zoo.checkpoints(name)
    assert len(steps) >= 3 and steps == SPECS[name].checkpoint_steps
    entry = zoo.manifest()["models"][name]
    task = entry["task"]
    # The run passes through the task: some checkpoint is still below the final accuracy.
    accuracies = [entry["checkpoints"][str(s)]["scores"][task]["accuracy"] for s in steps]
    assert min(accuracies) < entry["eval"]["scores"][task]["accuracy"]
    model = rl.load_model(f"zoo:{name}@{steps[0]}")
    assert model_spec(model) == f"zoo:{name}@{steps[0]}"
    same = rl.load_model(f"zoo:{name}", revision=str(steps[0]))
    assert model_spec(same) == f"zoo:{name}@{steps[0]}"


def test_unknown_checkpoints_and_revisions_are_refused() -> None:
    with pytest.raises(zoo.ZooError, match="keeps zoo:wide-ft-greater_than@40"):
        rl.load_model("zoo:wide-ft-greater_than@41")
    with pytest.raises(zoo.ZooError, match="keeps none"):
        rl.load_model("zoo:base@5")
    with pytest.raises(rl.ModelLoadError, match="already names a checkpoint"):
        rl.load_model("zoo:wide-ft-greater_than@40", revision="1000")
    with pytest.raises(rl.ModelLoadError, match="applies to hub ids and zoo fine-tunes"):
        rl.load_model(_folder("base"), revision="step1")
