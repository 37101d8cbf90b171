"""Experts as nodes, against patching the HF experts directly.

The reference never calls the model's router or experts modules: it recomputes each
mixture of the plain HF model from its raw weights (softmax router, top-k, the experts'
SwiGLU, the shared expert behind its sigmoid gate), one expert at a time, in a forward
hook that replaces the block's output. It patches one expert's term with its value in
the corrupted run, keeping each prompt's clean routing (``frozen``) or routing what the
block reads (``recompute``), and takes EAP's gradients with a zero probe on every term.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import reuse_lens as rl
from reuse_lens.circuits.circuit import CircuitError
from reuse_lens.nodes import (
    Expert,
    NodeNameError,
    UnsupportedArchitectureError,
    parse_edge,
    parse_node,
    shape_of,
)
from reuse_lens.patching._experts import ExpertRuns
from reuse_lens.patching.ablation import AblationRunner, NodeMask
from tests.archs import load_arch
from tests.patching.helpers import random_task, separable_task

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe", "phimoe")
"""Every mixture-of-experts family in the architecture matrix."""

REFERENCE = ("mixtral", "qwen2_moe")
"""The families the hand-written reference covers: routed experts alone, and routed
experts beside a gated shared expert."""

ATOL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tmp_path_factory.mktemp("experts")


class ExpertReference:
    """Runs of the plain HF model whose mixtures are recomputed from their weights."""

    def __init__(self, model: Any, task: rl.Task) -> None:
        self.task = task
        self.hf = model.original_model
        self.config = self.hf.config
        # The transformers modules themselves (the bridge wraps each in a component).
        self.blocks = [_plain(layer.mlp) for layer in self.hf.model.layers]
        self.top_k = int(self.config.num_experts_per_tok)
        # Mixtral always renormalises the top-k weights; Qwen2-MoE when configured to.
        self.renormalise = bool(getattr(self.config, "norm_topk_prob", True))
        self.clean_routing: dict[int, tuple[Tensor, Tensor]] = {}
        self.corrupted_terms: dict[int, Tensor] = {}
        self._record(task.clean, routing=self.clean_routing)
        self._record(task.corrupted, terms=self.corrupted_terms)

    def route(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        probs = F.linear(x, self.blocks[layer].gate.weight).float().softmax(-1)
        weight, index = probs.topk(self.top_k, dim=-1)
        if self.renormalise:
            weight = weight / weight.sum(-1, keepdim=True)
        return weight.to(x.dtype), index

    def terms(self, layer: int, x: Tensor, routing: tuple[Tensor, Tensor]) -> Tensor:
        """``(batch, pos, column, d_model)``: each routed expert, then any shared one."""
        block, (weight, index) = self.blocks[layer], routing
        experts = block.experts
        columns = []
        for k in range(experts.gate_up_proj.shape[0]):
            gate, up = F.linear(x, experts.gate_up_proj[k]).chunk(2, dim=-1)
            out = F.linear(F.silu(gate) * up, experts.down_proj[k])
            columns.append((weight * (index == k)).sum(-1, keepdim=True) * out)
        shared = getattr(block, "shared_expert", None)
        if shared is not None:
            hidden = F.silu(shared.gate_proj(x)) * shared.up_proj(x)
            gate = torch.sigmoid(block.shared_expert_gate(x))
            columns.append(gate * shared.down_proj(hidden))
        return torch.stack(columns, dim=2)

    @contextmanager
    def _mixtures(self, replace: Callable[[int, Tensor], Tensor]) -> Iterator[None]:
        handles = []
        for layer, block in enumerate(self.blocks):

            def hook(module: Any, args: tuple[Any, ...], out: Any, layer: int = layer) -> Any:
                new = replace(layer, args[0])
                return (new, *out[1:]) if isinstance(out, tuple) else new

            handles.append(block.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _record(
        self,
        tokens: Tensor,
        routing: dict[int, tuple[Tensor, Tensor]] | None = None,
        terms: dict[int, Tensor] | None = None,
    ) -> None:
        def replace(layer: int, x: Tensor) -> Tensor:
            own = self.route(layer, x)
            out = self.terms(layer, x, own)
            if routing is not None:
                routing[layer] = own
            if terms is not None:
                terms[layer] = out.detach()
            return out.sum(2)

        with torch.no_grad(), self._mixtures(replace):
            self.hf(input_ids=tokens)

    def metric(self, logits: Tensor) -> Tensor:
        rows = torch.arange(len(self.task))
        return self.task.metric(
            logits[rows, self.task.answer_pos].float(), self.task.metric_inputs()
        )

    def _routing(self, layer: int, x: Tensor, frozen: bool) -> tuple[Tensor, Tensor]:
        return self.clean_routing[layer] if frozen else self.route(layer, x)

    def activation(self, expert: Expert, frozen: bool) -> float:
        """The metric with ``expert``'s term corrupted, minus the clean metric."""
        column = (
            len(self.corrupted_terms[expert.layer][0, 0]) - 1 if expert.shared else expert.index
        )

        def replace(layer: int, x: Tensor) -> Tensor:
            terms = self.terms(layer, x, self._routing(layer, x, frozen))
            if layer == expert.layer:
                terms = terms.clone()
                terms[:, :, column] = self.corrupted_terms[layer][:, :, column]
            return terms.sum(2)

        with torch.no_grad(), self._mixtures(replace):
            patched = self.metric(self.hf(input_ids=self.task.clean).logits).mean()
        with torch.no_grad():
            clean = self.metric(self.hf(input_ids=self.task.clean).logits).mean()
        return float(patched - clean)

    def eap(self, frozen: bool) -> dict[int, Tensor]:
        """Per layer, Δterm · ∂metric/∂term on the clean run, summed: ``(column,)``."""
        probes: dict[int, Tensor] = {}
        clean_terms: dict[int, Tensor] = {}

        def replace(layer: int, x: Tensor) -> Tensor:
            terms = self.terms(layer, x, self._routing(layer, x, frozen))
            clean_terms[layer] = terms.detach()
            probes[layer] = torch.zeros_like(terms, requires_grad=True)
            return (terms + probes[layer]).sum(2)

        with torch.enable_grad(), self._mixtures(replace):
            value = self.metric(self.hf(input_ids=self.task.clean).logits).sum() / len(self.task)
            layers = sorted(probes)
            grads = torch.autograd.grad(value, [probes[layer] for layer in layers])
        return {
            layer: ((self.corrupted_terms[layer] - clean_terms[layer]) * grad).sum(dim=(0, 1, 3))
            for layer, grad in zip(layers, grads, strict=True)
        }


def traces(fig: Any) -> list[Any]:
    return list(fig.data)


def _plain(module: Any) -> Any:
    return getattr(module, "original_component", module)


def _task(model: Any, same: bool = False) -> rl.Task:
    return random_task(model, lengths=[6, 5, 6, 4], seed=11, same=same)


@pytest.mark.parametrize("routing", ["frozen", "recompute"])
@pytest.mark.parametrize("name", REFERENCE)
def test_expert_patching_equals_patching_the_hf_experts(
    name: str, routing: str, root: Any, word_tokenizer: Any
) -> None:
    model = load_arch(name, root, word_tokenizer)
    task = _task(model)
    reference = ExpertReference(model, task)
    frozen = routing == "frozen"
    scores = rl.activation_patching(model, task, nodes="mlps", experts=True, routing=routing)  # type: ignore[arg-type]
    experts = [n for n in shape_of(model, experts=True).nodes() if isinstance(n, Expert)]
    expected = {e.name: reference.activation(e, frozen) for e in experts}
    assert max(abs(v) for v in expected.values()) > 1e-3  # not a test between zeros
    for expert in experts:
        assert scores[expert] == pytest.approx(expected[expert.name], abs=ATOL), expert.name
    eap = rl.attribution_patching(model, task, method="eap", experts=True, routing=routing)  # type: ignore[arg-type]
    assert isinstance(eap, rl.NodeScores)
    for layer, row in reference.eap(frozen).items():
        for expert in shape_of(model, experts=True).experts_of(layer):
            column = -1 if expert.shared else expert.index
            assert eap[expert] == pytest.approx(float(row[column]), abs=ATOL), expert.name


@pytest.mark.parametrize("name", MOE)
def test_every_mixture_adds_up_to_its_experts(name: str, root: Any, word_tokenizer: Any) -> None:
    """Each family's terms (its own router and experts, one expert at a time) add up to
    its block's output; with the routing recomputed, patching a head through the expert
    engine is patching it at MLP level."""
    model = load_arch(name, root, word_tokenizer)
    task = _task(model)
    runs = ExpertRuns(model, "recompute")
    runs.set_clean(task.clean)  # checks the sums (Mixture.mismatch)
    shape = shape_of(model, experts=True)
    assert shape.experts == (4,) * shape.n_layers
    assert [n.name for n in shape.nodes()][-1] == ("m1.shared" if name == "qwen2_moe" else "m1.e3")
    experts = rl.activation_patching(model, task, experts=True, routing="recompute")
    whole = rl.activation_patching(model, task, engine="hooks")
    torch.testing.assert_close(experts.heads, whole.heads, atol=ATOL, rtol=0)


def test_a_mixture_that_is_not_the_sum_of_its_experts_is_refused(
    root: Any, word_tokenizer: Any
) -> None:
    model = load_arch("mixtral", root, word_tokenizer)
    block = _plain(model.original_model.model.layers[1].mlp)
    handle = block.register_forward_hook(lambda module, args, out: out + 1.0)
    try:
        with pytest.raises(UnsupportedArchitectureError, match="layer 1.*does not add up"):
            rl.activation_patching(model, _task(model), experts=True)
    finally:
        handle.remove()


@pytest.mark.parametrize("routing", ["frozen", "recompute"])
def test_a_model_patched_into_itself_changes_nothing(
    routing: str, root: Any, word_tokenizer: Any
) -> None:
    model = load_arch("qwen2_moe", root, word_tokenizer)
    task = _task(model, same=True)
    for scores in (
        rl.activation_patching(model, task, experts=True, routing=routing),  # type: ignore[arg-type]
        rl.attribution_patching(model, task, method="eap-ig", experts=True, routing=routing),  # type: ignore[arg-type]
    ):
        values = torch.tensor(list(scores.as_dict().values()))
        assert len(values) == 18 and values.abs().max() < 1e-5


def test_expert_attribution_adds_up_to_the_mlp(root: Any, word_tokenizer: Any) -> None:
    """A block's output is the sum of its terms, so with the routing recomputed (the
    gradient MLP-level EAP takes) the experts' EAP-IG scores add up to the MLP's."""
    model = load_arch("qwen2_moe", root, word_tokenizer)
    task = _task(model)
    experts = rl.attribution_patching(
        model, task, method="eap-ig", steps=3, experts=True, routing="recompute"
    )
    whole = rl.attribution_patching(model, task, method="eap-ig", steps=3)
    assert isinstance(experts, rl.NodeScores) and isinstance(whole, rl.NodeScores)
    assert experts.experts is not None and whole.mlps is not None
    torch.testing.assert_close(experts.experts.sum(1), whole.mlps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(experts.heads, whole.heads, atol=1e-6, rtol=0)


@pytest.mark.parametrize("routing", ["frozen", "recompute"])
def test_expert_circuits(routing: str, root: Any, word_tokenizer: Any) -> None:
    model = load_arch("mixtral", root, word_tokenizer)
    task = _task(model)
    shape = shape_of(model, experts=True)
    every = [n.name for n in shape.nodes()]

    def faith(nodes: list[str], **options: Any) -> float:
        circuit = rl.Circuit.from_nodes(nodes, model)
        return float(
            rl.faithfulness(model, task, circuit, check_task=False, routing=routing, **options)  # type: ignore[arg-type]
        )

    assert faith(every) == pytest.approx(1.0, abs=1e-5)
    assert faith(["a0.h0"]) != pytest.approx(faith(["a0.h0", "m1.e2"]), abs=1e-6)
    if routing == "recompute":
        # Every expert of a layer kept is the layer's MLP kept.
        kept = ["a0.h1", "a1.h2", *(e.name for e in shape.experts_of(0))]
        whole = rl.faithfulness(
            model,
            task,
            rl.Circuit.from_nodes(["a0.h1", "a1.h2", "m0"], model),
            check_task=False,
            ablation="resample",
        )
        assert faith(kept, ablation="resample") == pytest.approx(float(whole), abs=1e-5)
    circuit = rl.Circuit.from_nodes(["a0.h1", "m0.e3", "m1.e0"], model)
    assert rl.Circuit.from_json(circuit.to_json()) == circuit
    circuit.check(model)


def test_expert_nodes_are_refused_where_they_have_no_meaning(
    root: Any, word_tokenizer: Any, gpt2_folder: Any
) -> None:
    model = load_arch("mixtral", root, word_tokenizer)
    task = _task(model)
    with pytest.raises(NodeNameError, match="analysed with experts=True"):
        rl.activation_patching(model, task, nodes=["m0.e1"])
    with pytest.raises(NodeNameError, match="split into its experts"):
        rl.activation_patching(model, task, nodes=["m0"], experts=True)
    with pytest.raises(NodeNameError, match="expert nodes have no edges"):
        parse_edge("m0.e1->a1.h0<q>")
    with pytest.raises(NodeNameError, match="expert nodes have no edges"):
        shape_of(model, experts=True).edges()
    with pytest.raises(ValueError, match="expert nodes have no edges"):
        rl.attribution_patching(model, task, level="edge", experts=True)
    with pytest.raises(ValueError, match="per_position=True"):
        rl.attribution_patching(model, task, per_position=True, experts=True)
    runner = AblationRunner(model, task, experts=True)
    with pytest.raises(NotImplementedError, match="expert nodes"):
        runner.edge_values(torch.ones(1, 3, 3, dtype=torch.bool))
    for option in (
        {"direction": "denoising"},
        {"per_position": True},
        {"component": "q"},
        {"engine": "functional"},
    ):
        with pytest.raises(ValueError, match="experts=True"):
            rl.activation_patching(model, task, experts=True, **option)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown routing"):
        rl.activation_patching(model, task, experts=True, routing="sticky")  # type: ignore[arg-type]
    with pytest.raises(CircuitError, match="m7.e0"):
        rl.Circuit.from_nodes(["m7.e0"], model)
    dense = rl.load_model(gpt2_folder)
    with pytest.raises(UnsupportedArchitectureError, match="needs a mixture-of-experts model"):
        rl.activation_patching(dense, random_task(dense), experts=True)


def test_expert_circuits_are_found_compared_and_drawn(root: Any, word_tokenizer: Any) -> None:
    """The whole path a user takes: discover expert circuits, compare them node by node,
    and draw them on the grid, whose columns after the heads are the experts."""
    model = load_arch("qwen2_moe", root, word_tokenizer)
    task = separable_task(model, n=12, width=6, seed=0)
    found = {
        method: rl.discover_circuit(
            model,
            task,
            method=method,
            experts=True,
            ablation="resample",  # type: ignore[arg-type]
        )
        for method in ("eap-ig", "activation")
    }
    for circuit in found.values():
        assert circuit.shape == shape_of(model, experts=True)
        assert any(isinstance(parse_node(n), Expert) for n in circuit.nodes)
        assert circuit.metadata["settings"]["routing"] == "frozen"
        assert circuit.metadata["faithfulness_interval"][0] >= 0.9 - 1e-6
        again = rl.faithfulness(model, task, circuit, ablation="resample")
        assert again == pytest.approx(circuit.metadata["faithfulness"], abs=1e-6)
    # Discovery scores with its evaluator's runner; the scores are a call's of its own.
    alone = rl.activation_patching(model, task, ablation="resample", experts=True).as_dict()
    assert dict(found["activation"].node_scores) == pytest.approx(alone, abs=1e-7)
    table = rl.cross_task_faithfulness(model, found, {"t": task}, ablation="resample")
    for name, circuit in found.items():
        assert table.loc[name, "t"] == pytest.approx(circuit.metadata["faithfulness"], abs=1e-6)
    baseline = rl.random_baseline(model, task, found["eap-ig"], n=3, ablation="resample")
    assert len(baseline.values) == 3
    report = rl.compare(found)
    assert report.shape.experts == (4, 4)
    shared = found["eap-ig"].nodes & found["activation"].nodes
    assert report.shared("eap-ig", "activation") == shared
    grid = rl.plot.overlap_grid(report)
    cells = {c for trace in traces(grid) for row in trace.customdata for c in row if c}
    assert {"m0.e0", "m1.shared", "a1.h3"} <= cells
    heatmap = rl.plot.patching_heatmap(rl.attribution_patching(model, task, experts=True))
    layout: Any = heatmap.layout
    assert list(layout.xaxis.ticktext) == [
        "0",
        "1",
        "2",
        "3",
        "e0",
        "e1",
        "e2",
        "e3",
        "shared",
    ]
    assert np.isfinite(np.asarray(traces(heatmap)[0].z, dtype=float)).all()
    rl.plot.circuit_diagram(found["eap-ig"])


def test_expert_circuits_have_no_mib_graph_and_need_an_expert_evaluation(
    root: Any, word_tokenizer: Any
) -> None:
    model = load_arch("mixtral", root, word_tokenizer)
    circuit = rl.Circuit.from_nodes(["a0.h1", "m0.e2"], model)
    assert "split into experts" in repr(circuit)
    with pytest.raises(CircuitError, match="no experts"):
        circuit.to_mib_json()
    evaluator = rl.circuits.CircuitEvaluator(model, _task(model))
    with pytest.raises(CircuitError, match="experts=True"):
        evaluator(circuit)


@pytest.mark.parametrize("ablation", ["mean", "resample", "zero"])
def test_the_experts_record_in_chunks_of_prompts_changes_nothing(
    ablation: str, root: Any, word_tokenizer: Any
) -> None:
    """Under a budget that holds two prompts of the record, the clean routing and the
    sources are made chunk by chunk, and every value is what one run of every prompt
    gives; what the set-up holds counts against the budget."""
    model = load_arch("qwen2_moe", root, word_tokenizer)
    task = random_task(model, lengths=[6, 5, 6, 4, 6], seed=12)
    whole = AblationRunner(model, task, ablation=ablation, experts=True)  # type: ignore[arg-type]
    assert whole._experts is not None
    from reuse_lens._memory import HEADROOM

    per_prompt = whole._expert_prompt()
    budget = int((whole._experts.held_bytes + 2.5 * per_prompt) / (1 - HEADROOM))
    chunked = AblationRunner(model, task, ablation=ablation, experts=True, memory_budget=budget)  # type: ignore[arg-type]
    assert chunked._experts is not None and chunked._experts.held_bytes > 0
    assert chunked._per_chunk(per_prompt, "prompt") < len(task)  # it did run in chunks
    assert chunked._held() >= chunked._experts.held_bytes
    for layer, routing in whole._experts.frozen.items():
        assert torch.equal(routing.index, chunked._experts.frozen[layer].index)
        torch.testing.assert_close(routing.weight, chunked._experts.frozen[layer].weight)
    assert whole._experts.shared_sources == chunked._experts.shared_sources
    for layer, source in whole._experts.sources.items():
        torch.testing.assert_close(source, chunked._experts.sources[layer], atol=1e-6, rtol=0)
    shape = shape_of(model, experts=True)
    experts = [n.name for n in shape.nodes() if isinstance(n, Expert)]
    masks = [NodeMask.of(shape, experts[:k]) for k in (0, 3, len(experts))]
    torch.testing.assert_close(
        chunked.node_values(masks), whole.node_values(masks), atol=1e-5, rtol=0
    )


def test_expert_attribution_counts_the_terms_in_its_chunks(
    root: Any, word_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk of expert attribution holds its prompts' clean and corrupted terms of
    every expert: the budget's chunks count them, and chunking changes no score."""
    import reuse_lens.patching.attribution as attribution
    from reuse_lens._memory import HEADROOM, Shapes

    model = load_arch("qwen2_moe", root, word_tokenizer)
    task = random_task(model, lengths=[6, 5, 6, 4, 6, 5], seed=13)
    whole = rl.attribution_patching(model, task, method="eap-ig", steps=2, experts=True)
    shapes = Shapes.of(model, int(task.clean.shape[1]))
    # Room for two prompts of the estimate without the terms, one with them.
    budget = int(2 * shapes.backward_prompt() / (1 - HEADROOM))
    chunks = []
    real = attribution._attribute_chunk
    monkeypatch.setattr(
        attribution, "_attribute_chunk", lambda *a, **k: chunks.append(1) or real(*a, **k)
    )
    chunked = rl.attribution_patching(
        model, task, method="eap-ig", steps=2, experts=True, memory_budget=budget
    )
    assert len(chunks) == len(task)  # one prompt a chunk: the terms were counted
    for name, value in whole.as_dict().items():
        assert chunked.as_dict()[name] == pytest.approx(value, abs=1e-5), name


def test_mixtures_upstream_of_every_patch_run_as_they_are(
    root: Any, word_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the routing frozen, a mixture before the first patched layer of a run reads
    its clean input, so it routes as the clean run did: it runs as it is, its terms not
    recomputed, and every score is what recomputing them gives."""
    model = load_arch("mixtral", root, word_tokenizer)
    task = _task(model)
    calls: list[int] = []
    real = ExpertRuns._terms

    def counted(self: ExpertRuns, layer: int, x: Tensor, *args: Any) -> Any:
        calls.append(len(x))  # the rows whose terms are computed
        return real(self, layer, x, *args)

    monkeypatch.setattr(ExpertRuns, "_terms", counted)
    skipping = rl.activation_patching(model, task, experts=True)
    skipped = sum(calls)
    calls.clear()
    monkeypatch.setattr(AblationRunner, "_first_patched", lambda self, keep_h, *a: None)
    everywhere = rl.activation_patching(model, task, experts=True)
    assert skipped < sum(calls)  # the rows before each patch ran as they are
    for name, value in everywhere.as_dict().items():
        assert skipping.as_dict()[name] == pytest.approx(value, abs=1e-5), name
