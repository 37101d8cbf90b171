"""Activation patching: equal to TransformerLens, to the hook engine, and invariant."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformer_lens import patching as tl_patching

import reuse_lens as rl
from reuse_lens.arch.registry import extract as extract_weights
from reuse_lens.nodes import NodeNameError
from reuse_lens.patching.ablation import AblationRunner
from reuse_lens.patching.activation import _activation_patching
from reuse_lens.tasks.metrics import LogitDiff, MetricError, MetricInputs
from reuse_lens.tasks.task import TaskError
from tests.conftest import native_config
from tests.patching.handbuilt import DECOYS, PLANTED, build_model, build_task
from tests.patching.helpers import MODEL_KINDS, make_model, random_task

ATOL = 1e-4


@pytest.fixture(scope="module")
def models(hf_model: Any) -> dict[str, Any]:
    return {kind: make_model(kind, hf_model) for kind in MODEL_KINDS}


def _tl_metric(task: rl.Task):
    """TransformerLens's metric: the logit difference at the last position, averaged."""
    inputs = task.metric_inputs()

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return LogitDiff()(logits[:, -1].float(), inputs).mean()

    return metric


def _tl(model: Any, task: rl.Task, name: str) -> torch.Tensor:
    _, clean_cache = model.run_with_cache(task.clean)
    fn = getattr(tl_patching, name)
    with torch.no_grad():
        return fn(model, task.corrupted, clean_cache, _tl_metric(task)).detach().float()


def _denoise(model: Any, task: rl.Task, **kwargs: Any) -> rl.patching.NodeScores:
    return rl.activation_patching(model, task, direction="denoising", **kwargs)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_head_out_and_mlp_equal_transformer_lens(models: dict[str, Any], kind: str) -> None:
    model = models[kind]
    task = random_task(model, n=3, width=5)
    scores = _denoise(model, task, per_position=True)
    assert scores.settings["engine"] == ("hooks" if kind == "rotary_rms" else "functional")
    base = scores.corrupted  # TL reports the patched metric; we report its change
    all_pos = _tl(model, task, "get_act_patch_attn_head_out_all_pos")
    torch.testing.assert_close(scores.heads + base, all_pos, atol=ATOL, rtol=0)
    by_pos = _tl(model, task, "get_act_patch_attn_head_out_by_pos")  # (layer, pos, head)
    assert scores.heads_by_pos is not None
    torch.testing.assert_close(
        scores.heads_by_pos + base, by_pos.permute(1, 0, 2), atol=ATOL, rtol=0
    )
    if kind != "attn_only":
        mlp = _tl(model, task, "get_act_patch_mlp_out")  # (layer, pos)
        assert scores.mlps_by_pos is not None
        torch.testing.assert_close(scores.mlps_by_pos + base, mlp.T, atol=ATOL, rtol=0)
    assert (scores.heads.abs() > 1e-3).any()  # the comparison is not between zeros


@pytest.mark.parametrize("component", ["q", "k", "v", "pattern"])
def test_components_equal_transformer_lens(models: dict[str, Any], component: str) -> None:
    model = models["native_ln"]
    task = random_task(model, n=3, width=5, seed=1)
    scores = _denoise(model, task, per_position=True, component=component)
    base = scores.corrupted
    all_pos = _tl(model, task, f"get_act_patch_attn_head_{component}_all_pos")
    torch.testing.assert_close(scores.heads + base, all_pos, atol=ATOL, rtol=0)
    by_pos = _tl(model, task, f"get_act_patch_attn_head_{component}_by_pos")
    # TL orders by_pos as (layer, pos, head), except the pattern: (layer, head, dest_pos).
    order = (2, 0, 1) if component == "pattern" else (1, 0, 2)
    assert scores.heads_by_pos is not None
    torch.testing.assert_close(
        scores.heads_by_pos + base, by_pos.permute(*order), atol=ATOL, rtol=0
    )
    assert scores.mlps is not None and torch.isnan(scores.mlps).all()


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_fast_equals_hook_engine_with_ragged_prompts(models: dict[str, Any], ablation: str) -> None:
    model = models["native_ln"]
    task = random_task(model, lengths=[4, 6, 3, 6], seed=2)
    args = dict(
        nodes="all", ablation=ablation, direction="noising", per_position=True,
        component="out", metric=None, batch_size=None,
    )  # fmt: skip
    fast = _activation_patching(model, task, **args)  # type: ignore[arg-type]
    slow = _activation_patching(model, task, **args, engine="hooks")  # type: ignore[arg-type]
    assert (fast.settings["engine"], slow.settings["engine"]) == ("functional", "hooks")
    for a, b in [
        (fast.heads, slow.heads),
        (fast.mlps, slow.mlps),
        (fast.heads_by_pos, slow.heads_by_pos),
        (fast.mlps_by_pos, slow.mlps_by_pos),
    ]:
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_clean_equal_corrupted_gives_zero(models: dict[str, Any]) -> None:
    model = models["native_ln"]
    task = random_task(model, lengths=[5, 3], same=True)
    for component in ("out", "q", "k", "v", "pattern"):
        scores = rl.activation_patching(model, task, per_position=True, component=component)
        assert scores.heads.abs().max() < 1e-5
        assert scores.heads_by_pos is not None and scores.heads_by_pos.abs().max() < 1e-5
    scores = rl.activation_patching(model, task, nodes="mlps")
    assert scores.mlps is not None and scores.mlps.abs().max() < 1e-5


def test_patching_every_node_reproduces_the_corrupted_run(models: dict[str, Any]) -> None:
    model = models["native_ln"]
    task = random_task(model, lengths=[5, 4, 6], seed=3)
    weights = extract_weights(model)
    with torch.no_grad():
        corrupted = weights.run(task.corrupted)
        everything = torch.ones(2, 4, dtype=torch.bool)
        final = weights.run_patched(task.clean, corrupted, everything, torch.ones(2).bool())
        rows = torch.arange(len(task))
        logits = weights.logits(final[rows, task.answer_pos])
        expected = model(task.corrupted)[rows, task.answer_pos]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_single_node_effect_equals_a_plain_patched_run(models: dict[str, Any]) -> None:
    """The batched sweep against patching one node in a whole forward pass."""
    model = models["native_ln"]
    task = random_task(model, lengths=[5, 4, 6], seed=4)
    scores = rl.activation_patching(model, task)
    weights = extract_weights(model)
    rows = torch.arange(len(task))
    metric = task.metric
    with torch.no_grad():
        corrupted = weights.run(task.corrupted)
        clean_logits = weights.logits(weights.run(task.clean).final[rows, task.answer_pos])
        base = metric(clean_logits, task.metric_inputs()).mean()
        for node, layer, head in [("a1.h2", 1, 2), ("a0.h0", 0, 0), ("m0", 0, None)]:
            heads = torch.zeros(2, 4, dtype=torch.bool)
            mlps = torch.zeros(2, dtype=torch.bool)
            if head is None:
                mlps[layer] = True
            else:
                heads[layer, head] = True
            final = weights.run_patched(task.clean, corrupted, heads, mlps)
            logits = weights.logits(final[rows, task.answer_pos])
            effect = float(metric(logits, task.metric_inputs()).mean() - base)
            assert scores[node] == pytest.approx(effect, abs=1e-5)


def test_padding_invariance(models: dict[str, Any]) -> None:
    model = models["hf"]
    lengths = [6, 3, 5]
    task = random_task(model, lengths=lengths, seed=5)
    together = rl.activation_patching(model, task, per_position=True)
    alone = [rl.activation_patching(model, task.select([i]), per_position=True) for i in range(3)]
    torch.testing.assert_close(
        together.heads, torch.stack([s.heads for s in alone]).mean(0), atol=ATOL, rtol=0
    )
    assert together.mlps is not None
    torch.testing.assert_close(
        together.mlps,
        torch.stack([s.mlps for s in alone]).mean(0),
        atol=ATOL,
        rtol=0,  # type: ignore[misc]
    )
    by_pos = torch.zeros_like(together.heads_by_pos)  # type: ignore[arg-type]
    for s, length in zip(alone, lengths, strict=True):
        assert s.heads_by_pos is not None and s.heads_by_pos.shape[0] == length
        by_pos[:length] += s.heads_by_pos / 3  # positions a prompt lacks contribute 0
    torch.testing.assert_close(together.heads_by_pos, by_pos, atol=ATOL, rtol=0)


def test_deterministic_and_chunking_invariant(models: dict[str, Any]) -> None:
    model = models["native_noln"]
    task = random_task(model, lengths=[5, 4, 6], seed=6)
    first = rl.activation_patching(model, task, per_position=True)
    second = rl.activation_patching(model, task, per_position=True)
    tiny = rl.activation_patching(model, task, per_position=True, batch_size=2)
    assert torch.equal(first.heads, second.heads)
    assert torch.equal(first.heads_by_pos, second.heads_by_pos)  # type: ignore[arg-type]
    torch.testing.assert_close(first.heads, tiny.heads, atol=1e-5, rtol=0)
    torch.testing.assert_close(first.heads_by_pos, tiny.heads_by_pos, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hold", [False, True])
@pytest.mark.parametrize("budget", [None, "200KiB"])
def test_a_preparation_handed_on_gives_the_same_scores(
    models: dict[str, Any], budget: str | None, hold: bool
) -> None:
    """discover_circuit hands its evaluator's preparation to activation patching
    (``Prepared.renewed``), with the runs it holds for it (``hold_runs``); the scores are
    those of a preparation of their own, also when the call works in parts (a small
    budget), and the runs go when the runner releases them."""
    model = models["native_ln"]
    task = random_task(model, lengths=[5, 4, 6, 6], seed=8)
    runner = AblationRunner(model, task, ablation="mean", memory_budget=budget, hold_runs=hold)
    whole = budget is None
    assert bool(runner.prep.runs) == (hold and whole)  # held, or let go (none: in parts)
    assert (runner.prep.part_size is not None) == (budget is not None)  # parts, or whole
    renewed = runner.prep.renewed()
    if hold and whole:  # the held runs are handed on, not computed again
        assert all(renewed.runs[k] is runner.prep.runs[k] for k in ("clean", "corrupted"))
    handed = _activation_patching(
        model, task, "all", "mean", "noising", False, "out", None, None,
        memory_budget=budget, prep=renewed,
    )  # fmt: skip
    own = rl.activation_patching(model, task, ablation="mean", memory_budget=budget)
    assert torch.equal(handed.heads, own.heads)
    assert own.mlps is not None and handed.mlps is not None
    assert torch.equal(handed.mlps, own.mlps)
    assert handed.settings == own.settings
    runner.release_runs()
    assert not runner.prep.runs and runner.prep.part_bytes == 0


def test_node_subset_and_nan_for_unpatched(models: dict[str, Any]) -> None:
    model = models["native_ln"]
    task = random_task(model, seed=7)
    full = rl.activation_patching(model, task)
    some = rl.activation_patching(model, task, nodes=["a1.h3", "m0"])
    assert set(some.as_dict()) == {"a1.h3", "m0"}
    assert some["a1.h3"] == pytest.approx(full["a1.h3"], abs=1e-6)
    assert some["m0"] == pytest.approx(full["m0"], abs=1e-6)
    heads_only = rl.activation_patching(model, task, nodes="heads")
    assert heads_only.mlps is not None and torch.isnan(heads_only.mlps).all()


def test_normalized_noising_of_everything_in_one_layer_model() -> None:
    """In a one-layer attention-only model, noising all heads at once undoes the gap."""
    model = rl.load_model(native_config(n_layers=1, attn_only=True, n_heads=1))
    task = random_task(model, seed=8)
    scores = rl.activation_patching(model, task)
    # The only head carries everything the corruption changes except the direct path
    # from the embeddings, so its effect is the gap minus that direct path: compare it
    # to a plain hooked run.
    rows = torch.arange(len(task))
    _, cache = model.run_with_cache(task.corrupted)

    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        return cache["blocks.0.attn.hook_z"]

    with torch.no_grad():
        logits = model.run_with_hooks(task.clean, fwd_hooks=[("blocks.0.attn.hook_z", hook)])
    patched = float(task.metric(logits[rows, task.answer_pos], task.metric_inputs()).mean())
    assert scores["a0.h0"] == pytest.approx(patched - scores.clean, abs=1e-5)


# ---- errors ---------------------------------------------------------------------------------


def test_unknown_node_names_are_all_named(models: dict[str, Any]) -> None:
    model = models["native_ln"]
    task = random_task(model)
    with pytest.raises(NodeNameError, match=r"a9\.h0.*m7|m7.*a9\.h0"):
        rl.activation_patching(model, task, nodes=["a9.h0", "a0.h0", "m7"])
    with pytest.raises(NodeNameError, match="bogus"):
        rl.activation_patching(model, task, nodes=["bogus"])
    with pytest.raises(NodeNameError, match="attention-only"):
        rl.activation_patching(models["attn_only"], random_task(models["attn_only"]), nodes=["m0"])


def test_bad_options_fail_clearly(models: dict[str, Any]) -> None:
    model = models["native_ln"]
    task = random_task(model)
    with pytest.raises(ValueError, match="unknown component"):
        rl.activation_patching(model, task, component="resid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MLPs .*m1"):
        rl.activation_patching(model, task, nodes=["a0.h0", "m1"], component="q")
    with pytest.raises(ValueError, match="denoising"):
        rl.activation_patching(model, task, direction="denoising", ablation="mean")
    with pytest.raises(ValueError, match="unknown ablation"):
        rl.activation_patching(model, task, ablation="gaussian")  # type: ignore[arg-type]


def test_nan_metric_raises(models: dict[str, Any]) -> None:
    model = models["native_ln"]
    task = random_task(model)

    class NaNMetric:
        name = "nan"
        needs_clean_logits = False

        def __call__(self, logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
            return torch.full((logits.shape[0],), float("nan"))

    with pytest.raises(MetricError, match="non-finite"):
        rl.activation_patching(model, task, metric=NaNMetric())


def test_task_for_another_vocabulary_is_refused(models: dict[str, Any]) -> None:
    other = rl.load_model(native_config(d_vocab=60))
    task = random_task(other)
    with pytest.raises(TaskError, match="vocabulary"):
        rl.activation_patching(models["native_ln"], task)


def test_kl_metric_uses_clean_logits(models: dict[str, Any]) -> None:
    model = models["native_ln"]
    task = random_task(model, seed=9)
    scores = rl.activation_patching(model, task, metric="kl_div")
    assert scores.clean == pytest.approx(0.0, abs=1e-6)
    assert (scores.heads <= 1e-6).all()  # a patch can only move away from the clean output


# ---- the hand-built model with a known circuit ----------------------------------------------


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_handbuilt_circuit_is_found_exactly(ablation: str) -> None:
    model = build_model()
    task = build_task(model)
    scores = rl.activation_patching(model, task, ablation=ablation, per_position=True)
    gap = scores.clean - scores.corrupted
    assert gap > 5  # the task works: ~4 clean, ~-4 corrupted
    for node in PLANTED:
        if ablation == "resample":
            assert scores[node] == pytest.approx(-gap, abs=1e-3), node
        else:
            assert scores[node] < -1.0, node
    for node in DECOYS:
        assert abs(scores[node]) < 1e-5, node
    assert scores.heads_by_pos is not None
    assert scores.heads_by_pos[:, 0, 1].abs().max() < 1e-5  # a0.h1 is a decoy at every position
    denoised = rl.activation_patching(model, task, direction="denoising")
    for node in PLANTED:
        assert denoised[node] == pytest.approx(gap, abs=1e-3), node
    for node in DECOYS:
        assert abs(denoised[node]) < 1e-5, node
