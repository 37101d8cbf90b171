"""Grouped-query attention: a GQA model and its multi-head twin compute the same function.

The twin repeats each key/value head once per query head of its group, so every method
must score both the same. The twin has the classic one-k-and-v-per-head layout, whose
results the other tests check against TransformerLens and slow references.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import reuse_lens as rl
from tests.archs import expand_kv, save_arch
from tests.patching.helpers import random_task


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> tuple[Any, Any]:
    root = tmp_path_factory.mktemp("gqa")
    gqa = save_arch("llama_gqa", root / "gqa", word_tokenizer, num_hidden_layers=3)
    mha = expand_kv(gqa, root / "mha")
    return rl.load_model(gqa), rl.load_model(mha)


@pytest.fixture(scope="module")
def task(twins: tuple[Any, Any]) -> rl.Task:
    return random_task(twins[0], n=3, width=6, lengths=[6, 5, 6], seed=1)


def _close(a: rl.NodeScores, b: rl.NodeScores) -> None:
    assert a.heads.shape == b.heads.shape
    torch.testing.assert_close(a.heads, b.heads, atol=2e-5, rtol=1e-4, equal_nan=True)
    if a.mlps is not None or b.mlps is not None:
        assert a.mlps is not None and b.mlps is not None
        torch.testing.assert_close(a.mlps, b.mlps, atol=2e-5, rtol=1e-4, equal_nan=True)


def test_the_twins_compute_the_same_function(twins: tuple[Any, Any], task: rl.Task) -> None:
    gqa, mha = twins
    assert gqa.cfg.n_key_value_heads == 2 and mha.cfg.n_key_value_heads in (None, 4)
    torch.testing.assert_close(gqa(task.clean), mha(task.clean), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("engine", ["functional", "hooks"])
@pytest.mark.parametrize("receiver_input", ["q", "k", "v", "kv", "qkv"])
def test_path_patching_into_heads_matches_the_multi_head_twin(
    twins: tuple[Any, Any], task: rl.Task, receiver_input: str, engine: str
) -> None:
    gqa, mha = twins
    # Receivers in two layers, with h >= n_kv (an IndexError before) and two heads that
    # share one key/value head (a1.h2 and a1.h3), one of them not a receiver's sibling.
    receivers = ["a1.h1", "a1.h3", "a2.h0", "a2.h2"]
    kwargs: dict[str, Any] = dict(receivers=receivers, receiver_input=receiver_input)
    a = rl.path_patching(gqa, task, engine=engine, **kwargs)  # type: ignore[arg-type]
    b = rl.path_patching(mha, task, engine="hooks", **kwargs)  # the classic layout
    assert a.settings["engine"] == engine
    _close(a, b)
    assert torch.isfinite(a.heads[:2]).all()  # senders before the last receiver layer
    assert float(a.heads[0].abs().max()) > 1e-3  # the test measures something


@pytest.mark.parametrize("engine", ["functional", "hooks"])
def test_node_methods_match_the_multi_head_twin(
    twins: tuple[Any, Any], task: rl.Task, engine: str
) -> None:
    gqa, mha = twins
    for ablation in ("resample", "mean"):
        _close(
            rl.activation_patching(gqa, task, ablation=ablation, engine=engine),  # type: ignore[arg-type]
            rl.activation_patching(mha, task, ablation=ablation),
        )
    _close(rl.path_patching(gqa, task), rl.path_patching(mha, task))
    for method in ("eap", "eap-ig"):
        a = rl.attribution_patching(gqa, task, method=method)
        b = rl.attribution_patching(mha, task, method=method)
        assert isinstance(a, rl.NodeScores) and isinstance(b, rl.NodeScores)
        _close(a, b)
    circuit = rl.Circuit.from_nodes(["a0.h1", "a1.h3", "a2.h2", "m1"], gqa)
    if engine == "functional":  # edges of a GQA model: the functional forward's alone
        a = rl.attribution_patching(gqa, task, method="eap-ig", steps=2, level="edge")
        b = rl.attribution_patching(mha, task, method="eap-ig", steps=2, level="edge")
        assert isinstance(a, rl.EdgeScores) and isinstance(b, rl.EdgeScores)
        assert a.settings["engine"] == "functional"
        torch.testing.assert_close(a.scores, b.scores, atol=2e-5, rtol=1e-4)
        edges = rl.Circuit.from_edges([e.name for e in a.edges if abs(a[e]) > 1e-3], gqa)
        assert 0 < len(edges.edges) < len(a.edges)
        assert rl.faithfulness(gqa, task, edges, check_task=False) == pytest.approx(
            rl.faithfulness(mha, task, edges, check_task=False), abs=1e-4
        )
    for ablation in ("resample", "mean", "zero"):
        assert rl.faithfulness(
            gqa,
            task,
            circuit,
            ablation=ablation,
            engine=engine,  # type: ignore[arg-type]
            check_task=False,
        ) == pytest.approx(
            rl.faithfulness(mha, task, circuit, ablation=ablation, check_task=False), abs=1e-4
        )


def test_the_twin_is_built_from_separate_projections(tmp_path: Path, word_tokenizer: Any) -> None:
    folder = save_arch("phi3", tmp_path / "phi3", word_tokenizer)  # fused qkv_proj
    with pytest.raises(ValueError, match="no separate k_proj"):
        expand_kv(folder, tmp_path / "out")


@pytest.mark.parametrize("component", ["k", "v"])
def test_patching_one_query_heads_key_or_value(
    twins: tuple[Any, Any], task: rl.Task, component: str
) -> None:
    """The functional engine gives each query head its own k and v, as the twin has; the
    hook engine, whose hook_k holds the shared kv heads, refuses with the way out."""
    gqa, mha = twins
    kwargs: dict[str, Any] = dict(nodes="heads", component=component)
    a = rl.activation_patching(gqa, task, **kwargs)
    assert a.settings["engine"] == "functional"
    _close(a, rl.activation_patching(mha, task, **kwargs))
    with pytest.raises(ValueError, match="grouped-query attention.*receiver_input"):
        rl.activation_patching(gqa, task, nodes="heads", component=component, engine="hooks")  # type: ignore[arg-type]
