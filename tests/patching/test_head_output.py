"""A scalar between the attention and the residual stream (Granite's ``residual_multiplier``).

The hook engines read a head's output as ``hook_z @ W_O``; Granite adds
``residual_multiplier × o_proj(z)`` to the residual stream, and TransformerLens's ``W_O``
leaves the factor out. Every edge from a head came out scaled by ``1/residual_multiplier``
through hooks, without an error. The engines now measure the factor once per model
(``head_output_scale``) and use it; the functional forward, verified against the bridge's
logits, is the reference.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import reuse_lens as rl
from reuse_lens.nodes import edges_of, shape_of
from reuse_lens.patching.ablation import AblationRunner
from reuse_lens.patching.graph import GraphIndex
from tests.archs import load_arch
from tests.patching.helpers import random_task


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tmp_path_factory.mktemp("head_output")


@pytest.fixture(scope="module")
def granite(root: Any, word_tokenizer: Any) -> Any:
    # Multi-head, so that edges through hooks are not refused for grouped-query attention.
    return load_arch("granite", root, word_tokenizer, num_key_value_heads=4)


def test_the_scale_is_measured_once_per_model(granite: Any, root: Any, word_tokenizer: Any) -> None:
    from reuse_lens.patching._hook_geometry import head_output_scale

    assert head_output_scale(granite) == pytest.approx(0.5, rel=1e-5)
    assert head_output_scale(load_arch("llama", root, word_tokenizer)) == 1.0


def test_edge_attribution_through_hooks_equals_the_functional_engine(granite: Any) -> None:
    task = random_task(granite, n=3, width=6, seed=1)
    kwargs: dict[str, Any] = dict(method="eap-ig", steps=2, level="edge")
    fast = rl.attribution_patching(granite, task, engine="functional", **kwargs)
    slow = rl.attribution_patching(granite, task, engine="hooks", **kwargs)
    assert isinstance(fast, rl.EdgeScores) and isinstance(slow, rl.EdgeScores)
    scale = float(fast.scores.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(slow.scores, fast.scores, atol=1e-5 * max(1, scale), rtol=1e-4)
    # Edges out of a node add up to the node's score through hooks too.
    nodes = rl.attribution_patching(granite, task, method="eap-ig", steps=2)
    summed = slow.to_node_scores()
    torch.testing.assert_close(summed.heads, nodes.heads, atol=1e-5 * max(1, scale), rtol=1e-4)


def test_edge_circuits_through_hooks_equal_the_functional_engine(granite: Any) -> None:
    task = random_task(granite, lengths=[5, 4, 6], seed=2)
    fast = AblationRunner(granite, task, ablation="resample")
    slow = AblationRunner(granite, task, ablation="resample", engine="hooks")
    assert (fast.engine, slow.engine) == ("functional", "hooks")
    index = GraphIndex(shape_of(granite))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        keep = torch.rand(index.n_senders, index.n_receivers, generator=gen) < 0.6
        assert slow.edges(keep) == pytest.approx(fast.edges(keep), abs=1e-4)
    # Every edge out of a0.h3 removed is node a0.h3 removed.
    keep = torch.ones(index.n_senders, index.n_receivers, dtype=torch.bool)
    keep[index.sender["a0.h3"]] = False
    node = rl.Circuit.from_nodes(
        [n.name for n in rl.nodes_of(granite) if n.name != "a0.h3"], shape_of(granite)
    )
    by_node = rl.faithfulness(
        granite, task, node, ablation="resample", engine="hooks", check_task=False
    )
    edges = [e.name for e in edges_of(granite) if not e.name.startswith("a0.h3->")]
    by_edges = rl.faithfulness(
        granite,
        task,
        rl.Circuit.from_edges(edges, shape_of(granite)),
        ablation="resample",
        engine="hooks",
        check_task=False,  # a random model: the ratio is compared, not trusted
    )
    assert by_edges == pytest.approx(by_node, abs=1e-4)
