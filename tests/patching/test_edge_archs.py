"""Edge attribution on architectures beyond GPT-2: the residual graph each one has.

In a parallel block (GPT-NeoX, GPT-J, Phi, Falcon, Cohere) a layer's MLP reads the same
residual as its heads, so there is no edge from the heads into it. If the graph were
wrong, a node's outgoing edge scores would not sum to its node score.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from reuse_lens import EdgeScores, NodeScores, attribution_patching
from reuse_lens.nodes import MLP, edges_of, shape_of
from tests.archs import load_arch
from tests.patching.helpers import random_task

MHA = {"num_key_value_heads": 4}
ARCHS: dict[str, dict[str, Any]] = {
    "gpt_neox": {},  # parallel, its own ln2
    "gptj": {},  # parallel, one shared norm
    "phi": {},  # parallel, one shared norm, partial rotary
    "cohere": MHA,  # parallel, shared norm, GQA made multi-head
    "llama": {},
    "qwen3": MHA,  # q/k norms
    "opt": {},
    "bloom": {},
    "gpt_neo": {},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tmp_path_factory.mktemp("edge_archs")


@pytest.mark.parametrize("name", list(ARCHS))
def test_edges_sum_to_node_scores(name: str, root: Any, word_tokenizer: Any) -> None:
    model = load_arch(name, root, word_tokenizer, **ARCHS[name])
    shape = shape_of(model)
    assert shape.parallel == (name in ("gpt_neox", "gptj", "phi", "cohere"))
    task = random_task(model, n=3, width=6, seed=2)
    nodes = attribution_patching(model, task, method="eap-ig", steps=2)
    edges = attribution_patching(model, task, method="eap-ig", steps=2, level="edge")
    assert isinstance(nodes, NodeScores) and isinstance(edges, EdgeScores)
    assert [e.name for e in edges.edges] == [e.name for e in edges_of(model)]
    if shape.parallel:
        assert not any(e.name == "a1.h0->m1" for e in edges.edges)
    summed = edges.to_node_scores()
    scale = float(nodes.heads.abs().max())
    assert scale > 1e-4  # the scores are not all zero
    torch.testing.assert_close(summed.heads, nodes.heads, atol=1e-5 * max(1, scale), rtol=1e-4)
    assert summed.mlps is not None and nodes.mlps is not None
    torch.testing.assert_close(summed.mlps, nodes.mlps, atol=1e-5 * max(1, scale), rtol=1e-4)


def _mlp_input_derivative(model: Any, task: Any, layer: int, norm: str) -> float:
    """d metric / dε with the residual entering layer ``layer``'s MLP norm moved by
    ε·(corrupted − clean), for the MLP alone."""
    point = f"blocks.{layer}.{norm}.hook_in"
    with torch.no_grad():
        _, clean = model.run_with_cache(task.clean, names_filter=point)
        _, corrupted = model.run_with_cache(task.corrupted, names_filter=point)
    delta = corrupted[point] - clean[point]
    eps = torch.zeros((), requires_grad=True)
    seen: dict[str, torch.Tensor] = {}
    norm_module = getattr(model.blocks[layer], norm)

    def keep(x: torch.Tensor, hook: Any) -> None:
        seen["x"] = x

    def move(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return norm_module(seen["x"] + eps * delta)

    logits = model.run_with_hooks(
        task.clean, fwd_hooks=[(point, keep), (f"blocks.{layer}.mlp.hook_in", move)]
    )
    rows = torch.arange(len(task))
    metric = task.metric(logits[rows, task.answer_pos], task.metric_inputs()).mean()
    (derivative,) = torch.autograd.grad(metric, eps)
    return float(derivative)


@pytest.mark.parametrize("name", ["gpt_neox", "gptj"])
def test_mlp_receiver_scores_are_directional_derivatives(
    name: str, root: Any, word_tokenizer: Any
) -> None:
    """Σ over senders of edge(u → m_L) = d metric / dε (the MLP's input moved alone, not
    the heads' beside it, although a GPT-J block feeds both from one norm)."""
    model = load_arch(name, root, word_tokenizer, **ARCHS[name])
    task = random_task(model, n=3, width=6, seed=3)
    edges = attribution_patching(model, task, level="edge")
    assert isinstance(edges, EdgeScores)
    norm = "ln2" if "blocks.0.ln2.hook_in" in model.hook_dict else "ln1"
    for layer in range(int(model.cfg.n_layers)):
        derivative = _mlp_input_derivative(model, task, layer, norm)
        receiver = MLP(layer).name
        total = sum(v for e, v in edges.as_dict().items() if e.endswith(f"->{receiver}"))
        assert total == pytest.approx(derivative, abs=1e-5, rel=1e-4), receiver
        assert abs(derivative) > 1e-5


@pytest.mark.parametrize("name", list(ARCHS))
def test_functional_edges_equal_the_hook_edges(name: str, root: Any, word_tokenizer: Any) -> None:
    """Two derivations of each receiver's input gradient: autograd through one probe per
    receiver in the functional forward, and W_Q plus the norm's Jacobian at the hooks."""
    model = load_arch(name, root, word_tokenizer, **ARCHS[name])
    task = random_task(model, n=3, width=6, seed=4)
    kwargs: dict[str, Any] = dict(method="eap-ig", steps=2, level="edge")
    fast = attribution_patching(model, task, engine="functional", **kwargs)
    slow = attribution_patching(model, task, engine="hooks", **kwargs)
    assert isinstance(fast, EdgeScores) and isinstance(slow, EdgeScores)
    assert fast.settings["engine"] == "functional" and slow.settings["engine"] == "hooks"
    scale = float(slow.scores.abs().max())
    torch.testing.assert_close(fast.scores, slow.scores, atol=1e-5 * max(1, scale), rtol=1e-4)
    assert fast.clean == pytest.approx(slow.clean, abs=1e-4)


@pytest.mark.parametrize(
    ("name", "message"),
    [("llama_gqa", "grouped-query attention"), ("gemma2", "post-norms"), ("olmo2", "post-norms")],
)
def test_edges_are_refused_where_they_are_not_defined_yet(
    name: str, message: str, root: Any, word_tokenizer: Any
) -> None:
    overrides = {} if name == "llama_gqa" else MHA  # the post-norm refusal on its own
    model = load_arch(name, root, word_tokenizer, **overrides)
    task = random_task(model, n=2, width=5)
    with pytest.raises(NotImplementedError, match=message):
        attribution_patching(model, task, level="edge", engine="hooks")
    assert isinstance(attribution_patching(model, task), NodeScores)  # nodes still work
