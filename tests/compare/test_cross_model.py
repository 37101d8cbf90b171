"""``cross_model_patching`` against a slow two-model loop on the plain HF modules.

The reference runs the target's HF model with a forward hook on one module per node: for
a head, the attention output projection's output gains z_src,h · W_O,src,h −
z_tgt,h · W_O,tgt,h (each model's z read from that projection's input in its own run);
for an MLP, the module whose output is the MLP node (after the post-norm on Gemma-2)
returns the source model's output. Nothing of reuse_lens is used but the task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import reuse_lens as rl
from reuse_lens._memory import resolve_budget
from reuse_lens.compare._model_pair import ModelPairError
from reuse_lens.patching._common import prepare
from reuse_lens.tasks.metrics import MetricError
from tests.archs import save_arch
from tests.compare.fine_tuned import HF_NAMES, edited, module, noise_everywhere
from tests.patching.helpers import random_task

ATOL = 1e-5
FAMILIES = list(HF_NAMES)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> Any:
    """family -> (base, tuned): a tiny random model and a noisy copy of its heads and MLPs."""
    root = tmp_path_factory.mktemp("cmap")
    cache: dict[str, tuple[Any, Any]] = {}

    def get(name: str) -> tuple[Any, Any]:
        if name not in cache:
            folder = save_arch(name, root / name, word_tokenizer)
            cache[name] = (rl.load_model(folder), edited(folder, noise_everywhere(0.3, 7)))
        return cache[name]

    return get


def _hf_run(hf: Any, tokens: torch.Tensor, hooks: list[tuple[Any, Any]]) -> torch.Tensor:
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        with torch.no_grad():
            return hf(tokens).logits
    finally:
        for handle in handles:
            handle.remove()


def _capture(hf: Any, tokens: torch.Tensor, family: str, n_layers: int) -> dict[str, Any]:
    """Each layer's attention-projection input (z) and MLP-node output, in one run."""
    layers, proj, mlp = HF_NAMES[family]
    seen: dict[str, Any] = {}
    hooks = []
    for layer in range(n_layers):
        block = module(hf, f"{layers}.{layer}")

        def keep_in(m: Any, args: Any, out: Any, key: str = f"z{layer}") -> None:
            seen[key] = args[0].detach()

        def keep_out(m: Any, args: Any, out: Any, key: str = f"m{layer}") -> None:
            seen[key] = out.detach()

        hooks += [(module(block, proj), keep_in), (module(block, mlp), keep_out)]
    _hf_run(hf, tokens, hooks)
    return seen


def _w_o(hf: Any, family: str, layer: int, head: int, d_head: int) -> torch.Tensor:
    """(d_head, d_model): head ``head``'s slice of the output projection, x @ W convention."""
    layers, proj, _ = HF_NAMES[family]
    weight = module(hf, f"{layers}.{layer}.{proj}").weight.detach()
    if family == "gpt2":  # Conv1D stores (in, out)
        return weight[head * d_head : (head + 1) * d_head]
    return weight[:, head * d_head : (head + 1) * d_head].T


def _metric(logits: torch.Tensor, task: rl.Task) -> torch.Tensor:
    rows = torch.arange(logits.shape[0])
    at = logits[rows, task.answer_pos]
    inputs = task.metric_inputs()
    return at[rows, inputs.answers[:, 0]] - at[rows, inputs.wrong[:, 0]]


def reference(target: Any, source: Any, task: rl.Task, family: str) -> dict[str, float]:
    """Every node's raw effect: mean metric(target with the node from source) − metric(target)."""
    t_hf, s_hf = target.original_model, source.original_model
    n_layers, n_heads = int(target.cfg.n_layers), int(target.cfg.n_heads)
    d_head = int(target.cfg.d_head)
    tokens = task.clean
    t_seen = _capture(t_hf, tokens, family, n_layers)
    s_seen = _capture(s_hf, tokens, family, n_layers)
    base = _metric(_hf_run(t_hf, tokens, []), task)
    layers, proj, mlp = HF_NAMES[family]
    out: dict[str, float] = {}
    for layer in range(n_layers):
        block = module(t_hf, f"{layers}.{layer}")
        for head in range(n_heads):
            cols = slice(head * d_head, (head + 1) * d_head)
            delta = s_seen[f"z{layer}"][..., cols] @ _w_o(s_hf, family, layer, head, d_head)
            delta = delta - t_seen[f"z{layer}"][..., cols] @ _w_o(t_hf, family, layer, head, d_head)
            hook = (module(block, proj), lambda m, a, o, d=delta: o + d)
            out[f"a{layer}.h{head}"] = float(
                (_metric(_hf_run(t_hf, tokens, [hook]), task) - base).mean()
            )
        hook = (module(block, mlp), lambda m, a, o, s=s_seen[f"m{layer}"]: s)
        out[f"m{layer}"] = float((_metric(_hf_run(t_hf, tokens, [hook]), task) - base).mean())
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("engine", ["functional", "hooks"])
def test_cross_model_patching_equals_the_two_model_hook_loop(
    pairs: Any, family: str, engine: str
) -> None:
    base, tuned = pairs(family)
    task = random_task(base, n=4, width=6)
    expected = reference(base, tuned, task, family)
    # Through hooks, Gemma-2's post-norm sits between the heads and hook_attn_out: the
    # heads' sum is read at the output projection's own hook instead.
    scores = rl.cross_model_patching(base, tuned, task, normalize=False, engine=engine)  # type: ignore[arg-type]
    assert scores.settings["engine"] == engine
    got = scores.as_dict()
    for node, value in expected.items():
        assert got[node] == pytest.approx(value, abs=ATOL), node
    back = rl.cross_model_patching(
        base,
        tuned,
        task,
        normalize=False,
        engine=engine,
        direction="base_into_tuned",  # type: ignore[arg-type]
    )
    assert back.as_dict() == pytest.approx(reference(tuned, base, task, family), abs=ATOL)


def test_a_model_patched_into_itself_changes_nothing(pairs: Any) -> None:
    base, _ = pairs("llama_gqa")
    task = random_task(base, n=4, width=6)
    scores = rl.cross_model_patching(base, base, task, normalize=False, per_position=True)
    assert float(scores.heads.abs().max()) < 1e-6
    assert scores.mlps is not None and float(scores.mlps.abs().max()) < 1e-6
    assert (
        scores.heads_by_pos is not None
        and float(scores.heads_by_pos.nan_to_num().abs().max()) < 1e-6
    )
    with pytest.raises(MetricError, match="do not differ"):
        rl.cross_model_patching(base, base, task)


def _separating(base: Any, tuned: Any, n: int = 8) -> rl.Task:
    """Random prompts answered by the tuned model's top token against the base's."""
    from reuse_lens.evaluation import answer_logits

    probe = random_task(base, n=n, width=6, seed=3)
    right = answer_logits(tuned, probe.clean, probe.answer_pos).argmax(-1)
    wrong = answer_logits(base, probe.clean, probe.answer_pos).argmax(-1)
    keep = [i for i in range(n) if right[i] != wrong[i]]
    return rl.Task.from_pairs(
        base,
        [probe.clean[i, : int(probe.answer_pos[i]) + 1].tolist() for i in keep],
        [probe.corrupted[i, : int(probe.answer_pos[i]) + 1].tolist() for i in keep],
        [int(right[i]) for i in keep],
        [int(wrong[i]) for i in keep],
        name="tuned-vs-base",
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_every_head_and_mlp_recovers_the_whole_gain(pairs: Any, family: str) -> None:
    base, tuned = pairs(family)
    task = _separating(base, tuned)
    every = [n.name for n in rl.nodes_of(base)]
    assert rl.cross_model_recovery(base, tuned, task, every) == pytest.approx(1.0, abs=1e-4)
    assert rl.cross_model_recovery(base, tuned, task, every, direction="base_into_tuned") == (
        pytest.approx(1.0, abs=1e-4)
    )
    assert rl.cross_model_recovery(base, tuned, task, []) == pytest.approx(0.0, abs=1e-6)
    if family != "gemma2":
        hooks = rl.cross_model_recovery(base, tuned, task, every[:3], engine="hooks")
        assert hooks == pytest.approx(
            rl.cross_model_recovery(base, tuned, task, every[:3]), abs=1e-4
        )


def test_per_position_effects_are_each_positions_own(pairs: Any) -> None:
    base, tuned = pairs("gpt2")
    task = random_task(base, n=3, width=5)
    fast = rl.cross_model_patching(
        base, tuned, task, normalize=False, per_position=True, nodes=["a1.h2", "m0"]
    )
    hooks = rl.cross_model_patching(
        base, tuned, task, normalize=False, per_position=True, nodes=["a1.h2", "m0"], engine="hooks"
    )
    assert fast.heads_by_pos is not None and hooks.heads_by_pos is not None
    np.testing.assert_allclose(
        fast.heads_by_pos.nan_to_num().numpy(), hooks.heads_by_pos.nan_to_num().numpy(), atol=ATOL
    )
    assert fast.mlps_by_pos is not None and hooks.mlps_by_pos is not None
    np.testing.assert_allclose(
        fast.mlps_by_pos.nan_to_num().numpy(), hooks.mlps_by_pos.nan_to_num().numpy(), atol=ATOL
    )
    assert np.isnan(fast.heads.numpy()).sum() == 7  # only a1.h2 of the 8 heads was patched


def test_bad_pairs_are_refused(pairs: Any, tmp_path: Path, word_tokenizer: Any) -> None:
    base, _ = pairs("gpt2")
    other_vocab = rl.load_model("zoo:attn-only")
    task = random_task(base, n=3)
    with pytest.raises(ModelPairError):
        rl.cross_model_patching(base, other_vocab, task)
    with pytest.raises(ValueError, match="direction"):
        rl.cross_model_patching(base, base, task, direction="sideways")  # type: ignore[arg-type]
    zoo_task = rl.tasks.load("ioi", rl.load_model("zoo:base"), n=4)
    with pytest.raises(Exception, match="vocabulary|tokenizer"):
        rl.cross_model_patching(base, base, zoo_task, normalize=False)


def _noise_on_everything(hf: Any) -> None:
    gen = torch.Generator().manual_seed(11)
    for p in hf.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * (p.std() if p.numel() > 1 else 0.1) * 0.2)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_every_node_and_every_other_weight_make_the_source_exactly(
    tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any, family: str
) -> None:
    folder = save_arch(family, tmp_path_factory.mktemp("swap") / family, word_tokenizer)
    base, tuned = rl.load_model(folder), edited(folder, _noise_on_everything)
    task = _separating(base, tuned)
    every = [n.name for n in rl.nodes_of(base)]
    # Norms, embeddings and biases changed too: nodes alone do not make the source ...
    nodes_only = rl.cross_model_recovery(base, tuned, task, every)
    assert abs(nodes_only - 1.0) > 1e-3
    # ... with every weight no node holds, the target computes exactly what the source does.
    whole = rl.cross_model_recovery(base, tuned, task, every, weights=["embed", "unembed", "norms"])
    assert whole == pytest.approx(1.0, abs=1e-4)
    readout = rl.cross_model_recovery(base, tuned, task, [], weights=["unembed"])
    assert -10 < readout < 10  # a share, finite
    with pytest.raises(ValueError, match="weights must be"):
        rl.cross_model_recovery(base, tuned, task, [], weights=["heads"])  # type: ignore[list-item]


@pytest.mark.parametrize("engine", ["functional", "hooks"])
def test_prompts_taken_in_parts_give_the_same_numbers(pairs: Any, engine: str) -> None:
    # A budget that holds the runs of half the prompts: both models are taken part by
    # part together (paired_parts), and every sum over prompts comes out the same.
    base, tuned = pairs("gpt2")
    task = random_task(base, n=6, width=6)
    half = resolve_budget("1MiB", "cpu") // 2  # each model's share, as the calls split it
    assert len(prepare(base, task, None, engine=engine, budget=half).spans()) > 1  # type: ignore[arg-type]
    whole = rl.cross_model_patching(base, tuned, task, normalize=False, engine=engine)  # type: ignore[arg-type]
    parts = rl.cross_model_patching(
        base,
        tuned,
        task,
        normalize=False,
        engine=engine,
        memory_budget="1MiB",  # type: ignore[arg-type]
    )
    got, want = parts.as_dict(), whole.as_dict()
    assert got == pytest.approx(want, abs=1e-5)
    nodes = ["a0.h1", "m1"]
    assert rl.cross_model_recovery(base, tuned, task, nodes, memory_budget="1MiB") == pytest.approx(
        rl.cross_model_recovery(base, tuned, task, nodes), abs=1e-5
    )
    drift_whole = rl.component_drift(base, tuned, task, engine=engine).table()  # type: ignore[arg-type]
    drift_parts = rl.component_drift(base, tuned, task, engine=engine, memory_budget="1MiB").table()  # type: ignore[arg-type]
    columns = ["act_cos_answer", "act_l2_answer", "act_cos_all", "act_l2_all", "attn_tv"]
    np.testing.assert_allclose(
        drift_parts[columns].to_numpy(float), drift_whole[columns].to_numpy(float), rtol=1e-5
    )
