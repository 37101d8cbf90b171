"""Architectures that reuse_lens cannot analyse, or only in part, are refused clearly.

Mamba has no attention heads; Jamba, Bamba, LFM2, Qwen3-Next, Falcon-H1 and
Granite-MoE-Hybrid add other mixers beside or instead of attention; JetMoE routes tokens
to attention experts; DeepSeek-V2/V3 use multi-head latent attention. Every node and edge
method refuses them in ``shape_of``, naming the architecture and the reason, while
``rl.evaluate`` still scores them. On OPT, GPT-J and GPT-Neo, TransformerLens 4.3 drops
edits of ``hook_pattern``: pattern patching and ``uniform_attention`` refuse there instead
of returning zeros, and work on GPT-2 and Llama.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import reuse_lens as rl
from reuse_lens.interventions import ablate_heads, uniform_attention
from reuse_lens.nodes import ModelShape, UnsupportedArchitectureError, edges_of, nodes_of, shape_of
from reuse_lens.patching._hooks import PatternEditsDropped, pattern_edits_reach_logits
from reuse_lens.patching.activation import _activation_patching
from tests.archs import REFUSED, load_arch, save_arch
from tests.patching.helpers import random_task


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    names = ("mamba", "opt", "gptj", "gpt_neo", "gpt2", "llama")
    return {name: save_arch(name, root / name, word_tokenizer) for name in names}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("refused")


# ---- no attention ---------------------------------------------------------------------------

_NODE_METHODS: dict[str, Callable[[Any, rl.Task], object]] = {
    "nodes_of": lambda m, t: nodes_of(m),
    "activation_patching": lambda m, t: rl.activation_patching(m, t),
    "path_patching": lambda m, t: rl.path_patching(m, t),
    "eap nodes": lambda m, t: rl.attribution_patching(m, t),
    "eap edges": lambda m, t: rl.attribution_patching(m, t, level="edge"),
    "faithfulness": lambda m, t: rl.faithfulness(
        m, t, rl.Circuit.from_nodes(["m0"], ModelShape(2, 1, True))
    ),
    "discover_circuit": lambda m, t: rl.discover_circuit(m, t, top_k=1),
    "uniform_attention": lambda m, t: uniform_attention(m, t, ["a0.h0"], [0]),
    "ablate_heads": lambda m, t: ablate_heads(m, t, ["a0.h0"], n_random=1),
    "circuit": lambda m, t: rl.Circuit.from_nodes(["a0.h0"], m),
}


@pytest.fixture(scope="module")
def mamba(folders: dict[str, Path]) -> Any:
    return rl.load_model(folders["mamba"])


@pytest.mark.parametrize("method", list(_NODE_METHODS))
def test_a_model_without_attention_is_refused_by_every_method(mamba: Any, method: str) -> None:
    task = random_task(mamba, n=2, width=5)
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"MambaForCausalLM has no attention heads.*analyse attention heads and MLPs",
    ):
        _NODE_METHODS[method](mamba, task)


def test_a_model_without_attention_can_still_be_evaluated(mamba: Any) -> None:
    result = rl.evaluate(mamba, random_task(mamba, n=2, width=5))
    assert result["n"] == 2


_REASONS = {
    "mamba": r"has no attention heads that TransformerLens exposes one by one",
    "jamba": r"is a hybrid: attention heads in layer 1, and a state-space mixer \(mixer\) "
    r"in layer 0",
    "bamba": r"is a hybrid: attention heads in layer 1, and a state-space mixer",
    "lfm2": r"is a hybrid: attention heads in layer 1, and a gated short convolution",
    "qwen3_next": r"is a hybrid: .* linear attention",
    "falcon_h1": r"is a hybrid: attention heads in layers 0, 1, and a Mamba state-space "
    r"mixer \(mamba\) in layers 0, 1",
    "granitemoehybrid": r"is a hybrid: attention heads in layer 1",
    "jetmoe": r"uses a mixture of attention heads .* no fixed heads",
    "deepseek_v2": r"uses multi-head latent attention .*\(64 value channels for 4 heads\)",
    "deepseek_v3": r"uses multi-head latent attention",
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_every_method_refuses_a_model_without_fixed_heads_naming_why(
    name: str, root: Path, word_tokenizer: Any
) -> None:
    """Not a KeyError deep inside an engine, nor a wrong reason: the architecture, what it
    has instead of heads and MLPs alone, and that rl.evaluate still works."""
    model = load_arch(name, root, word_tokenizer)
    task = random_task(model, n=2, width=5)
    arch = type(model.original_model).__name__
    for method, run in _NODE_METHODS.items():
        with pytest.raises(UnsupportedArchitectureError) as error:
            run(model, task)
        assert str(error.value).startswith(f"model architecture {arch} "), method
        assert re.search(_REASONS[name], str(error.value)), (method, str(error.value))
        assert "rl.evaluate(model, task) still scores it" in str(error.value)
    assert rl.evaluate(model, task)["n"] == 2


# ---- dropped pattern edits ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["opt", "gptj", "gpt_neo"])
def test_pattern_edits_that_transformer_lens_drops_are_refused(
    name: str, folders: dict[str, Path]
) -> None:
    model = rl.load_model(folders[name])
    task = random_task(model, n=2, width=5)
    assert not pattern_edits_reach_logits(model)
    expected = r"TransformerLens drops edits of hook_pattern.*component='out'"
    with pytest.raises(PatternEditsDropped, match=rf"architecture \w+For\w+.*{expected}"):
        _activation_patching(
            model,
            task,
            "heads",
            "resample",
            "noising",
            False,
            "pattern",
            None,
            None,
            engine="hooks",
        )
    with pytest.raises(PatternEditsDropped, match=rf"uniform_attention.*{expected}"):
        uniform_attention(model, task, ["a0.h0"], [0])
    # The public call refuses too, unless the fast forward (which computes the pattern
    # itself, verified against the bridge's logits) runs the model: OPT's does.
    try:
        scores = rl.activation_patching(model, task, component="pattern")
    except PatternEditsDropped:
        assert name != "opt"
    else:
        assert scores.settings["engine"] == "functional"
        assert scores.heads.abs().sum() > 0
    # The other components still work there.
    scores = rl.activation_patching(model, task, component="out", nodes="heads")
    assert not torch.isnan(scores.heads).any()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_pattern_edits_work_where_they_reach_the_logits(
    name: str, folders: dict[str, Path]
) -> None:
    model = rl.load_model(folders[name])
    task = random_task(model, n=2, width=5)
    assert pattern_edits_reach_logits(model)
    scores = rl.activation_patching(model, task, component="pattern")
    assert scores.heads.abs().sum() > 0
    result = uniform_attention(model, task, ["a1.h0", "a1.h1"], [0])
    assert result.metric_after != result.metric_before


def test_the_pattern_check_runs_once_per_model(folders: dict[str, Path]) -> None:
    model = rl.load_model(folders["opt"])
    calls = 0
    forward = model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return forward(*args, **kwargs)

    model.forward = counting  # type: ignore[method-assign]
    assert not pattern_edits_reach_logits(model)
    assert not pattern_edits_reach_logits(model)
    assert calls == 2  # one plain and one edited run, then the cached answer


# ---- refusals and crashes of single methods -------------------------------------------------


def test_post_ln_models_patch_nodes_and_refuse_edges_naming_why(
    root: Path, word_tokenizer: Any
) -> None:
    """The original GPT normalises the residual stream after each sublayer and never fires
    its blocks' hook_resid_post: path patching to the logits reads what the unembedding
    reads instead (a KeyError before), and edges are refused as post-LN (a KeyError, or a
    reason about split inputs, before)."""
    model = load_arch("openai_gpt", root, word_tokenizer)
    task = random_task(model, n=3, width=5, seed=1)
    path = rl.path_patching(model, task)
    # A last-layer head reaches the logits only directly (through its own block's MLP and
    # norms, which path patching leaves live): its path effect is its patching effect.
    patched = rl.activation_patching(model, task, nodes=["a1.h0", "a1.h2"])
    for node in ("a1.h0", "a1.h2"):
        assert path.as_dict()[node] == pytest.approx(patched.as_dict()[node], abs=1e-5)
    assert max(abs(v) for v in path.as_dict().values()) > 1e-3
    shape = shape_of(model)
    everything = rl.Circuit.from_edges([e.name for e in edges_of(shape)], shape)
    with pytest.raises(NotImplementedError, match=r"OpenAIGPTLMHeadModel .*\(post-LN"):
        rl.attribution_patching(model, task, level="edge")
    with pytest.raises(NotImplementedError, match=r"OpenAIGPTLMHeadModel .*\(post-LN"):
        rl.faithfulness(model, task, everything, check_task=False)


def test_edges_are_refused_where_split_inputs_never_fire(root: Path, word_tokenizer: Any) -> None:
    """MPT's bridge accepts split q/k/v inputs and ignores them (a KeyError before)."""
    model = load_arch("mpt", root, word_tokenizer)
    task = random_task(model, n=2, width=5)
    shape = shape_of(model)
    everything = rl.Circuit.from_edges([e.name for e in edges_of(shape)], shape)
    with pytest.raises(NotImplementedError, match=r"MptForCausalLM .* never computes them"):
        rl.faithfulness(model, task, everything, engine="hooks", check_task=False)
    # The functional engine (the MPT adapter) gives every head its own inputs.
    assert rl.faithfulness(model, task, everything, check_task=False) == pytest.approx(
        1.0, abs=1e-4
    )
    nodes = rl.Circuit.from_nodes(rl.nodes_of(model), model)
    assert rl.faithfulness(model, task, nodes, engine="hooks", check_task=False) == pytest.approx(
        1.0, abs=1e-4
    )


def test_the_grouped_query_refusal_advises_the_functional_engine_only_where_it_runs(
    root: Path, word_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reuse_lens.arch import families

    model = load_arch("llama_gqa", root, word_tokenizer)
    task = random_task(model, n=2, width=5)
    with pytest.raises(NotImplementedError, match=r"grouped-query .*engine='auto'"):
        rl.attribution_patching(model, task, level="edge", engine="hooks")
    monkeypatch.delitem(families.ADAPTERS, "llama")
    with pytest.raises(NotImplementedError, match=r"grouped-query .*no functional adapter") as e:
        rl.attribution_patching(model, task, level="edge")
    assert "engine='auto'" not in str(e.value)


def test_phimoe_folders_load_under_transformer_lens_spelling(
    root: Path, word_tokenizer: Any
) -> None:
    """transformers saves PhimoeForCausalLM, TransformerLens registers PhiMoEForCausalLM:
    every PhiMoE folder failed with a list of 170 architectures."""
    model = load_arch("phimoe", root, word_tokenizer)
    assert type(model.original_model).__name__ == "PhimoeForCausalLM"
    task = random_task(model, n=2, width=5)
    scores = rl.activation_patching(model, task, nodes=["a1.h0", "m1"])
    assert abs(scores.as_dict()["a1.h0"]) > 0


def test_falcon_layouts_transformer_lens_cannot_load_are_named(
    root: Path, word_tokenizer: Any
) -> None:
    with pytest.raises(
        rl.ModelLoadError,
        match=r"FalconForCausalLM with new_decoder_architecture=True and num_kv_heads=2 .*"
        r"TransformerLens 4\.3.*Falcon models with one key/value head .* load",
    ):
        load_arch("falcon_new", root, word_tokenizer, num_kv_heads=2)
    assert load_arch("falcon_new", root, word_tokenizer).cfg.n_heads == 4
