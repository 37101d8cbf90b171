"""Path patching: the fast version against a plain per-sender loop over hooks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import reuse_lens as rl
from reuse_lens.nodes import MLP, AttentionHead, NodeNameError, nodes_of, parse_node
from tests.conftest import native_config
from tests.patching.handbuilt import DECOYS, build_model, build_task
from tests.patching.helpers import random_task

ATOL = 1e-4


@torch.no_grad()
def reference_path_patching(
    model: Any,
    task: rl.Task,
    *,
    senders: list[str],
    receivers: str | list[str] = "logits",
    receiver_input: str = "qkv",
    freeze_mlps: bool = False,
    positions: str | list[int] | None = None,
) -> dict[str, float]:
    """The algorithm as written in Wang et al. 2022, one sender at a time, with hooks."""
    n_layers = model.cfg.n_layers
    has_mlps = not model.cfg.attn_only
    rows = torch.arange(len(task))
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    _, clean = model.run_with_cache(task.clean)
    _, corrupted = model.run_with_cache(task.corrupted)

    def metric(logits: torch.Tensor) -> float:
        return float(task.metric(logits[rows, task.answer_pos], task.metric_inputs()).mean())

    clean_metric = metric(model(task.clean))
    width = task.clean.shape[1]
    where = torch.zeros(len(task), width, dtype=torch.bool)
    for i, pos in enumerate(task.answer_pos.tolist()):
        if positions is None:
            where[i, : pos + 1] = True
        elif positions == "answer":
            where[i, pos] = True
        else:
            for p in positions:
                where[i, p] = p <= pos

    def set_to(value: torch.Tensor):
        return lambda act, hook: value

    def record(store: dict[str, torch.Tensor], key: str):
        def hook(act: torch.Tensor, hook: Any) -> None:
            store[key] = act.clone()

        return hook

    def set_head(value: torch.Tensor, head: int):
        # Only the receiver's slice: the layer's other heads run on normally.
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act = act.clone()
            act[:, :, head] = value[:, :, head]
            return act

        return hook

    out = {}
    for name in senders:
        sender = parse_node(name)
        hooks = []
        # Steps 1 and 2: the sender from the corrupted run, every other head clean.
        for layer in range(n_layers):
            z = clean[f"blocks.{layer}.attn.hook_z"].clone()
            if isinstance(sender, AttentionHead) and sender.layer == layer:
                bad = corrupted[f"blocks.{layer}.attn.hook_z"]
                for i in range(len(task)):
                    z[i, where[i], sender.head] = bad[i, where[i], sender.head]
            hooks.append((f"blocks.{layer}.attn.hook_z", set_to(z)))
            if has_mlps:
                mlp = clean[f"blocks.{layer}.hook_mlp_out"].clone()
                if isinstance(sender, MLP) and sender.layer == layer:
                    bad = corrupted[f"blocks.{layer}.hook_mlp_out"]
                    for i in range(len(task)):
                        mlp[i, where[i]] = bad[i, where[i]]
                    hooks.append((f"blocks.{layer}.hook_mlp_out", set_to(mlp)))
                elif freeze_mlps:
                    hooks.append((f"blocks.{layer}.hook_mlp_out", set_to(mlp)))
        # Step 3: record the receivers' inputs.
        recorded: dict[str, torch.Tensor] = {}

        if receivers in ("logits", "resid"):
            names = [last]
        else:
            names = [
                f"blocks.{parse_node(r).layer}.attn.hook_{c}"  # type: ignore[union-attr]
                for r in receivers
                for c in receiver_input
            ]
        with torch.no_grad():
            model.run_with_hooks(
                task.clean, fwd_hooks=hooks + [(n, record(recorded, n)) for n in names]
            )
        # Step 4: patch the recorded inputs into a clean run.
        if receivers in ("logits", "resid"):
            patch = [(last, set_to(recorded[last]))]
        else:
            patch = []
            for r in receivers:
                head = parse_node(r)
                assert isinstance(head, AttentionHead)
                for c in receiver_input:
                    key = f"blocks.{head.layer}.attn.hook_{c}"
                    patch.append((key, set_head(recorded[key], head.head)))
        with torch.no_grad():
            out[name] = metric(model.run_with_hooks(task.clean, fwd_hooks=patch)) - clean_metric
    return out


@pytest.fixture(scope="module")
def three_layer() -> Any:
    return rl.load_model(native_config(n_layers=3, n_heads=3))


CASES = [
    {},
    {"freeze_mlps": True},
    {"receivers": ["a2.h0", "a2.h1", "a1.h2"]},
    {"receivers": ["a2.h1"], "receiver_input": "q"},
    {"receivers": ["a1.h0", "a2.h2"], "receiver_input": "kv", "freeze_mlps": True},
    {"receivers": ["a2.h0"], "positions": "answer"},
    {"receivers": ["a2.h0"], "receiver_input": "v", "positions": [1, 3]},
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_fast_equals_reference(three_layer: Any, case: dict[str, Any]) -> None:
    task = random_task(three_layer, lengths=[5, 4, 6], seed=11)
    fast = rl.path_patching(three_layer, task, **case)
    assert fast.settings["engine"] == "functional"
    senders = list(fast.as_dict())
    expected = reference_path_patching(three_layer, task, senders=senders, **case)
    got = fast.as_dict()
    for name in senders:
        assert got[name] == pytest.approx(expected[name], abs=ATOL), name
    assert max(abs(v) for v in expected.values()) > 1e-3  # not a comparison of zeros


@pytest.mark.parametrize("kind", ["hf", "attn_only"])
def test_fast_equals_reference_other_models(hf_model: Any, kind: str) -> None:
    model = hf_model if kind == "hf" else rl.load_model(native_config(attn_only=True))
    task = random_task(model, lengths=[5, 6], seed=12)
    for case in ({}, {"receivers": ["a1.h0", "a1.h3"]}):
        fast = rl.path_patching(model, task, **case)  # type: ignore[arg-type]
        expected = reference_path_patching(model, task, senders=list(fast.as_dict()), **case)  # type: ignore[arg-type]
        for name, value in fast.as_dict().items():
            assert value == pytest.approx(expected[name], abs=ATOL), name


def test_hook_fallback_equals_fast(three_layer: Any) -> None:
    task = random_task(three_layer, lengths=[5, 4, 6], seed=13)
    case = {"receivers": ["a2.h0", "a1.h1"], "receiver_input": "qk"}
    fast = rl.path_patching(three_layer, task, engine="functional", **case)  # type: ignore[arg-type]
    slow = rl.path_patching(three_layer, task, engine="hooks", **case)  # type: ignore[arg-type]
    assert slow.settings["engine"] == "hooks"
    torch.testing.assert_close(fast.heads, slow.heads, atol=ATOL, rtol=0, equal_nan=True)


def test_last_layer_direct_effect_equals_activation_patching(three_layer: Any) -> None:
    """A last-layer node reaches the logits only directly, so both methods agree."""
    task = random_task(three_layer, lengths=[5, 4, 6], seed=14)
    last = ["a2.h0", "a2.h1", "a2.h2", "m2"]
    path = rl.path_patching(three_layer, task, senders=last)
    act = rl.activation_patching(three_layer, task, nodes=last)
    for name in last:
        assert path[name] == pytest.approx(act[name], abs=1e-5)


def test_default_senders_and_zero_when_clean_equals_corrupted(three_layer: Any) -> None:
    task = random_task(three_layer, lengths=[5, 3], same=True)
    scores = rl.path_patching(three_layer, task, receivers=["a2.h1"])
    assert set(scores.as_dict()) == {n.name for n in nodes_of(three_layer) if n.layer < 2}
    assert max(abs(v) for v in scores.as_dict().values()) < 1e-5


def test_bad_arguments(three_layer: Any) -> None:
    task = random_task(three_layer)
    with pytest.raises(ValueError, match="subset of 'qkv'"):
        rl.path_patching(three_layer, task, receivers=["a2.h0"], receiver_input="qx")
    with pytest.raises(NodeNameError, match="receivers must be heads"):
        rl.path_patching(three_layer, task, receivers=["m1"])
    with pytest.raises(NodeNameError, match="a7.h0"):
        rl.path_patching(three_layer, task, senders=["a7.h0"])
    with pytest.raises(ValueError, match="outside the prompts"):
        rl.path_patching(three_layer, task, positions=[99])


def test_handbuilt_paths_are_found_exactly() -> None:
    model = build_model()
    task = build_task(model)
    gap = rl.evaluate(model, task)["logit_diff"] - rl.evaluate(model, task)["corrupted_logit_diff"]

    def check(scores: Any, planted: set[str]) -> None:
        for node, value in scores.as_dict().items():
            if node in planted:
                assert value == pytest.approx(-gap, abs=1e-3), node
            else:
                assert abs(value) < 1e-5, node

    check(rl.path_patching(model, task), {"a1.h0"})  # only a1.h0 writes what W_U reads
    into_v = rl.path_patching(model, task, receivers=["a1.h0"], receiver_input="v")
    check(into_v, {"a0.h0", "m0"})
    frozen = rl.path_patching(
        model, task, receivers=["a1.h0"], receiver_input="v", freeze_mlps=True
    )
    check(frozen, {"m0"})  # a0.h0 reaches a1.h0 only through m0
    check(rl.path_patching(model, task, receivers=["a1.h0"], receiver_input="qk"), set())
    assert set(DECOYS) & set(into_v.as_dict()) == {"a0.h1"}
