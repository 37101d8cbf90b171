"""A q/k norm over the whole projection (OLMo-2): head i's statistic from its own input.

docs/models.md defines head i's query as the normed projection of head i's *own* input,
read at head i (``Weights.qkv_per_head``). Through hooks, path patching wrote a
receiver's slice into ``hook_q``/``hook_k`` in front of the shared norm, whose statistic
then carried the sender's effect into the other heads of the layer (13% to 75% off).
The hook engines now read and write q and k after the norm (``hook_rot_q``/``hook_rot_k``);
edge ablation and edge attribution through hooks take each head's statistic from its own
input (``_qk_norm_hooks``), where the bridge's split inputs norm the heads' slices
together. Both engines must give the same numbers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import reuse_lens as rl
from tests.archs import load_arch
from tests.patching.helpers import random_task


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tmp_path_factory.mktemp("qk_norm")


@pytest.fixture(scope="module")
def olmo2(root: Any, word_tokenizer: Any) -> Any:
    return load_arch("olmo2", root, word_tokenizer)


@pytest.fixture(scope="module")
def olmo2_mha(root: Any, word_tokenizer: Any) -> Any:
    """Multi-head: one query head's k can be patched through hooks alone."""
    return load_arch("olmo2", root, word_tokenizer, num_key_value_heads=4)


def _same(a: rl.NodeScores, b: rl.NodeScores) -> None:
    assert (a.settings["engine"], b.settings["engine"]) == ("functional", "hooks")
    torch.testing.assert_close(b.heads, a.heads, atol=1e-4, rtol=0, equal_nan=True)
    if a.mlps is not None:
        torch.testing.assert_close(b.mlps, a.mlps, atol=1e-4, rtol=0, equal_nan=True)
    assert float(a.heads.nan_to_num().abs().max()) > 1e-3


@pytest.mark.parametrize("receiver_input", ["q", "k", "v", "qkv"])
def test_path_patching_into_heads_is_the_same_through_hooks(
    olmo2: Any, receiver_input: str
) -> None:
    task = random_task(olmo2, lengths=[5, 4, 6], seed=2)
    # Two heads of one key/value group: the other group keeps its clean k.
    kwargs: dict[str, Any] = dict(receivers=["a1.h0", "a1.h1"], receiver_input=receiver_input)
    _same(
        rl.path_patching(olmo2, task, engine="functional", **kwargs),
        rl.path_patching(olmo2, task, engine="hooks", **kwargs),
    )


@pytest.mark.parametrize("component", ["q", "k"])
def test_activation_patching_of_q_and_k_is_the_same_through_hooks(
    olmo2_mha: Any, component: str
) -> None:
    task = random_task(olmo2_mha, lengths=[5, 4, 6], seed=3)
    kwargs: dict[str, Any] = dict(component=component, per_position=True)
    _same(
        rl.activation_patching(olmo2_mha, task, engine="functional", **kwargs),
        rl.activation_patching(olmo2_mha, task, engine="hooks", **kwargs),
    )


@pytest.fixture(scope="module")
def olmoe_mha(root: Any, word_tokenizer: Any) -> Any:
    """OLMoE without post-norms or grouped heads: edges through hooks are not refused."""
    return load_arch("olmoe", root, word_tokenizer, num_key_value_heads=4)


def test_edge_attribution_is_the_same_through_hooks(olmoe_mha: Any) -> None:
    """A q (k) edge's gradient passes through the norm's Jacobian with only head i's
    slice of the upstream gradient, at the projection of head i's own input."""
    task = random_task(olmoe_mha, n=3, width=6, seed=4)
    kwargs: dict[str, Any] = dict(method="eap-ig", steps=2, level="edge")
    fast = rl.attribution_patching(olmoe_mha, task, engine="functional", **kwargs)
    slow = rl.attribution_patching(olmoe_mha, task, engine="hooks", **kwargs)
    assert isinstance(fast, rl.EdgeScores) and isinstance(slow, rl.EdgeScores)
    scale = float(fast.scores.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(slow.scores, fast.scores, atol=1e-5 * max(1, scale), rtol=1e-4)


def test_edge_circuits_are_the_same_through_hooks(olmoe_mha: Any) -> None:
    from reuse_lens.nodes import shape_of
    from reuse_lens.patching.ablation import AblationRunner
    from reuse_lens.patching.graph import GraphIndex

    task = random_task(olmoe_mha, lengths=[5, 4, 6], seed=5)
    fast = AblationRunner(olmoe_mha, task, ablation="resample")
    slow = AblationRunner(olmoe_mha, task, ablation="resample", engine="hooks")
    assert (fast.engine, slow.engine) == ("functional", "hooks")
    index = GraphIndex(shape_of(olmoe_mha))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        keep = torch.rand(index.n_senders, index.n_receivers, generator=gen) < 0.6
        assert slow.edges(keep) == pytest.approx(fast.edges(keep), abs=1e-4)
