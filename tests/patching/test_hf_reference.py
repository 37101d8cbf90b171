"""Node methods on every architecture, against patching the plain HF model directly.

The reference never touches TransformerLens's hook points: it registers torch hooks on
the ``transformers`` modules themselves (each head's slice of the output projection's
input, which is that head's z; the MLP's output, or a mixture of experts' whole output,
after the MLP's post-norm where there is one) and calls the HF model. Activation patching, path patching to the logits and EAP node
scores, through every engine that runs the family (functional where an adapter reads
it, and hooks always), must equal it. A representative of each kind of block runs in the
default tier; the rest of the families with ``-m slow``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor

import reuse_lens as rl
from tests.archs import FUNCTIONAL, HOOKS_ONLY, load_arch
from tests.patching.helpers import random_task

FAST = ("gemma3", "mixtral", "gpt_oss", "granitemoe", "openai_gpt")
"""One of each kind of block: post-norms with per-layer rotary and grouped-query attention,
a mixture of experts, attention sinks, residual multipliers, post-LN through hooks."""

FAMILIES = [
    name if name in FAST else pytest.param(name, marks=pytest.mark.slow)
    for name in (*FUNCTIONAL, *HOOKS_ONLY)
]

ATOL = 1e-4


def _module(component: Any) -> Any:
    return getattr(component, "original_component", component)


class HFReference:
    """Runs of the plain HF model with heads' z and MLP outputs replaced by torch hooks."""

    def __init__(self, model: Any, task: rl.Task) -> None:
        self.model, self.task = model, task
        self.hf = model.original_model
        self.n_layers, self.n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
        self.o_proj = [_module(model.blocks[i].attn.o) for i in range(self.n_layers)]
        # What an MLP node is: a dense MLP's output linear, or a mixture of experts' whole
        # module; under a norm after the MLP (Gemma-2/3, OLMo-2/3), that norm's output
        # (docs/models.md: an MLP is read after its post-norm, a head before).
        self.mlps = [
            _module(getattr(block, "ln2_post", None) or getattr(block.mlp, "out", block.mlp))
            for block in model.blocks
        ]
        self.clean_z, self.clean_mlp = self._record(task.clean)
        self.corrupted_z, self.corrupted_mlp = self._record(task.corrupted)

    def _width(self) -> int:
        return self.clean_z[0].shape[-1] // self.n_heads

    @contextmanager
    def _hooks(
        self, z: Callable[[int, Tensor], Tensor | None], mlp: Callable[[int, Tensor], Tensor | None]
    ) -> Iterator[None]:
        handles = []
        for layer in range(self.n_layers):

            def pre(module: Any, args: tuple[Any, ...], layer: int = layer) -> Any:
                new = z(layer, args[0])
                return None if new is None else (new, *args[1:])

            def post(module: Any, args: Any, out: Any, layer: int = layer) -> Any:
                tensor = out[0] if isinstance(out, tuple) else out
                new = mlp(layer, tensor)
                if new is None:
                    return None
                return (new, *out[1:]) if isinstance(out, tuple) else new

            handles.append(self.o_proj[layer].register_forward_pre_hook(pre))
            handles.append(self.mlps[layer].register_forward_hook(post))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _record(self, tokens: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        zs: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}

        def keep_z(layer: int, x: Tensor) -> None:
            zs[layer] = x.detach().clone()

        def keep_mlp(layer: int, x: Tensor) -> None:
            outs[layer] = x.detach().clone()

        with torch.no_grad(), self._hooks(keep_z, keep_mlp):
            self.hf(input_ids=tokens)
        return [zs[i] for i in range(self.n_layers)], [outs[i] for i in range(self.n_layers)]

    def metric(self, logits: Tensor) -> Tensor:
        rows = torch.arange(len(self.task))
        return self.task.metric(
            logits[rows, self.task.answer_pos].float(), self.task.metric_inputs()
        )

    def run(
        self,
        z: Callable[[int, Tensor], Tensor | None],
        mlp: Callable[[int, Tensor], Tensor | None],
    ) -> float:
        with torch.no_grad(), self._hooks(z, mlp):
            return float(self.metric(self.hf(input_ids=self.task.clean).logits).mean())

    def _slice(self, head: int) -> slice:
        d = self._width()
        return slice(head * d, (head + 1) * d)

    def activation(self, node: str) -> float:
        """Noising: the node's corrupted value in the clean run."""
        layer, head = _parse(node)

        def z(lay: int, x: Tensor) -> Tensor | None:
            if head is None or lay != layer:
                return None
            x = x.clone()
            x[..., self._slice(head)] = self.corrupted_z[lay][..., self._slice(head)]
            return x

        def mlp(lay: int, x: Tensor) -> Tensor | None:
            return self.corrupted_mlp[lay] if head is None and lay == layer else None

        return self.run(z, mlp) - self.run(_keep, _keep)

    def path_to_logits(self, node: str) -> float:
        """Every head frozen at its clean z but the sender, corrupted; MLPs live."""
        layer, head = _parse(node)

        def z(lay: int, x: Tensor) -> Tensor:
            out = self.clean_z[lay].clone()
            if head is not None and lay == layer:
                out[..., self._slice(head)] = self.corrupted_z[lay][..., self._slice(head)]
            return out

        def mlp(lay: int, x: Tensor) -> Tensor | None:
            return self.corrupted_mlp[lay] if head is None and lay == layer else None

        return self.run(z, mlp) - self.run(_keep, _keep)

    def eap(self) -> dict[str, float]:
        """Δ(activation) · ∂metric/∂(activation) on the clean run, summed over positions."""
        zs: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}

        # A zero probe added to each activation: its gradient is the activation's, and
        # every path through later layers stays in the graph.
        def grad_z(layer: int, x: Tensor) -> Tensor:
            zs[layer] = torch.zeros_like(x, requires_grad=True)
            return x + zs[layer]

        def grad_mlp(layer: int, x: Tensor) -> Tensor:
            outs[layer] = torch.zeros_like(x, requires_grad=True)
            return x + outs[layer]

        with torch.enable_grad(), self._hooks(grad_z, grad_mlp):
            value = self.metric(self.hf(input_ids=self.task.clean).logits).mean()
            leaves = [zs[i] for i in range(self.n_layers)] + [outs[i] for i in range(self.n_layers)]
            grads = torch.autograd.grad(value, leaves)
        scores: dict[str, float] = {}
        for layer in range(self.n_layers):
            dz = (self.corrupted_z[layer] - self.clean_z[layer]) * grads[layer]
            for head in range(self.n_heads):
                scores[f"a{layer}.h{head}"] = float(dz[..., self._slice(head)].sum())
            dm = (self.corrupted_mlp[layer] - self.clean_mlp[layer]) * grads[self.n_layers + layer]
            scores[f"m{layer}"] = float(dm.sum())
        return scores


def _keep(layer: int, x: Tensor) -> None:
    return None


def _parse(node: str) -> tuple[int, int | None]:
    if node.startswith("m"):
        return int(node[1:]), None
    layer, head = node[1:].split(".h")
    return int(layer), int(head)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tmp_path_factory.mktemp("hf_reference")


@pytest.mark.parametrize("name", FAMILIES)
def test_node_methods_equal_patching_the_hf_model(
    name: str, root: Any, word_tokenizer: Any
) -> None:
    model = load_arch(name, root, word_tokenizer)
    task = random_task(model, lengths=[6, 5, 6], seed=7)
    reference = HFReference(model, task)
    nodes = [n.name for n in rl.nodes_of(model)]
    engines = ["hooks"] if name in HOOKS_ONLY else ["functional", "hooks"]
    expected_act = {node: reference.activation(node) for node in nodes}
    expected_path = {node: reference.path_to_logits(node) for node in nodes}
    assert max(abs(v) for v in expected_act.values()) > 1e-3  # not a test between zeros
    for engine in engines:
        act = rl.activation_patching(model, task, engine=engine).as_dict()  # type: ignore[arg-type]
        path = rl.path_patching(model, task, engine=engine).as_dict()  # type: ignore[arg-type]
        for node in nodes:
            assert act[node] == pytest.approx(expected_act[node], abs=ATOL), (engine, node)
            assert path[node] == pytest.approx(expected_path[node], abs=ATOL), (engine, node)
    expected_eap = reference.eap()
    eap = rl.attribution_patching(model, task, method="eap").as_dict()
    scale = max(1.0, max(abs(v) for v in expected_eap.values()))
    for node in nodes:
        assert eap[node] == pytest.approx(expected_eap[node], abs=1e-4 * scale), node


def test_edges_through_hooks_add_up_to_node_scores_without_an_adapter(
    root: Any, word_tokenizer: Any
) -> None:
    """XGLM has no adapter and multi-head attention: its edge attribution runs through
    hooks, and a sender's edges (every receiver's q, k, v and MLP input, and the logits)
    must add up to its node score."""
    model = load_arch("xglm", root, word_tokenizer)
    task = random_task(model, n=3, width=6, seed=8)
    nodes = rl.attribution_patching(model, task, method="eap-ig", steps=2)
    edges = rl.attribution_patching(model, task, method="eap-ig", steps=2, level="edge")
    assert isinstance(nodes, rl.NodeScores) and isinstance(edges, rl.EdgeScores)
    assert edges.settings["engine"] == "hooks"
    summed = edges.to_node_scores()
    scale = max(1.0, float(nodes.heads.abs().max()))
    torch.testing.assert_close(summed.heads, nodes.heads, atol=1e-5 * scale, rtol=1e-4)
    assert summed.mlps is not None and nodes.mlps is not None
    torch.testing.assert_close(summed.mlps, nodes.mlps, atol=1e-5 * scale, rtol=1e-4)
