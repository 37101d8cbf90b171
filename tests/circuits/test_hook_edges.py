"""Edge circuits through hooks, for the models the functional forward does not run.

The hook engine must equal the functional engine where both run (HF GPT-2), and on every
other architecture satisfy what no implementation can fake: keeping every edge is the
full model, dropping every edge (resampled) is the corrupted run, and dropping every edge
out of some nodes is ablating those nodes (the node engine, checked against
TransformerLens's patching elsewhere).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import reuse_lens as rl
from reuse_lens.nodes import shape_of
from reuse_lens.patching.ablation import AblationRunner
from reuse_lens.patching.graph import GraphIndex
from tests.archs import load_arch
from tests.circuits.test_faithfulness import _edge_mask_keeping_nodes, _random_masks
from tests.patching.helpers import random_task

ATOL = 1e-4
MHA = {"num_key_value_heads": 4}
ARCHS: dict[str, dict[str, Any]] = {
    "gpt_neox": {},
    "phi": {},
    "cohere": MHA,
    "llama": {},
    "qwen3": MHA,
    "stablelm": MHA,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tmp_path_factory.mktemp("hook_edges")


def _random_edge_masks(shape: Any, count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    index = GraphIndex(shape)
    return [
        torch.rand(index.n_senders, index.n_receivers, generator=gen) < 0.7 for _ in range(count)
    ]


@pytest.mark.parametrize("ablation", ["mean", "resample", "zero"])
def test_hook_edges_equal_the_functional_engine(hf_model: Any, ablation: str) -> None:
    task = random_task(hf_model, n=3, lengths=[7, 6, 7], seed=5)
    fast = AblationRunner(hf_model, task, ablation=ablation)  # type: ignore[arg-type]
    slow = AblationRunner(hf_model, task, ablation=ablation, engine="hooks")  # type: ignore[arg-type]
    assert fast.engine == "functional" and slow.engine == "hooks"
    for keep in _random_edge_masks(shape_of(hf_model), 3, seed=6):
        assert slow.edges(keep) == pytest.approx(fast.edges(keep), abs=ATOL)
    assert not hf_model.cfg.use_split_qkv_input  # the setting is restored


@pytest.mark.parametrize("name", list(ARCHS))
def test_hook_edges_on_every_architecture(name: str, root: Any, word_tokenizer: Any) -> None:
    model = load_arch(name, root, word_tokenizer, **ARCHS[name])
    task = random_task(model, n=3, lengths=[6, 5, 6], seed=7)
    shape = shape_of(model)
    index = GraphIndex(shape)
    everything = torch.ones(index.n_senders, index.n_receivers, dtype=torch.bool)
    runner = AblationRunner(model, task, ablation="resample", engine="hooks")
    assert runner.edges(everything) == pytest.approx(runner.full, abs=ATOL)
    corrupted = float(runner.prep.corrupted_metric.mean())
    assert runner.edges(~everything) == pytest.approx(corrupted, abs=ATOL)
    assert abs(runner.full - corrupted) > 1e-3  # the extremes differ: the test can fail
    mean = AblationRunner(model, task, ablation="mean", engine="hooks")
    for mask in _random_masks(shape, 2, seed=8):
        by_nodes = float(mean.nodes(mask)[0])
        assert mean.edges(_edge_mask_keeping_nodes(shape, mask)) == pytest.approx(
            by_nodes, abs=ATOL
        )
    # Two independent implementations of edge ablation agree on random edge circuits.
    fast = AblationRunner(model, task, ablation="mean", engine="functional")
    for keep in _random_edge_masks(shape, 2, seed=9):
        assert mean.edges(keep) == pytest.approx(fast.edges(keep), abs=ATOL)
    edges = rl.Circuit.from_edges([e.name for e in rl.nodes.edges_of(shape)], shape)
    for engine in ("hooks", "functional"):
        kept = rl.faithfulness(
            model, task, edges, ablation="resample", engine=engine, check_task=False
        )  # type: ignore[arg-type]
        assert kept == pytest.approx(1.0, abs=1e-3)
        empty = rl.Circuit.from_edges([], shape)
        none = rl.faithfulness(
            model, task, empty, ablation="resample", engine=engine, check_task=False
        )  # type: ignore[arg-type]
        assert none == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("gptj", {}, "cannot split"),
        ("gpt_neo", {}, "cannot split"),
        ("bloom", {}, "not the residual entering ln1"),
        ("llama_gqa", {}, "grouped-query attention"),
        ("gemma2", MHA, "post-norms"),
    ],
)
def test_hook_edges_are_refused_with_the_reason(
    name: str, overrides: dict[str, Any], message: str, root: Any, word_tokenizer: Any
) -> None:
    model = load_arch(name, root, word_tokenizer, **overrides)
    task = random_task(model, n=2, width=5)
    circuit = rl.Circuit.from_edges(["a0.h1->logits"], shape_of(model))
    with pytest.raises(NotImplementedError, match=f"{message}.*node circuit"):
        rl.faithfulness(model, task, circuit, ablation="resample", engine="hooks", check_task=False)
