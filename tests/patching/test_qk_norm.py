"""A q/k norm over the whole projection (OLMo-2): head i's statistic from its own input.

docs/models.md defines head i's query as the normed projection of head i's *own* input,
read at head i (``Weights.qkv_per_head``). Through hooks, path patching wrote a
receiver's slice into ``hook_q``/``hook_k`` in front of the shared norm, whose statistic
then carried the sender's effect into the other heads of the layer (13% to 75% off).
The hook engines now read and write q and k after the norm (``hook_rot_q``/``hook_rot_k``),
and both engines must give the same numbers.
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
