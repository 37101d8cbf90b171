"""The functional forward on every architecture family, against the bridge and TransformerLens.

Each family's tiny random model (``tests/archs.py``) is built once per session. For every
family an adapter covers: its logits equal the bridge's, activation patching equals
TransformerLens's ``transformer_lens.patching`` and runs on the functional engine, path
patching equals a slow reference, and node and edge ablation agree. A grouped-query
model and its multi-head twin get the same scores from every method. Every family's
logits are checked in the default tier; the per-family sweeps of the families that share
their block with a swept one run in the slow tier (``tests.archs.SWEPT_SLOWLY``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformer_lens import patching as tl_patching

import reuse_lens as rl
from reuse_lens.arch.registry import extract as extract_weights
from reuse_lens.nodes import edges_of, shape_of
from reuse_lens.patching._forward import RunCache, Weights
from reuse_lens.patching.ablation import AblationRunner, NodeMask
from tests.archs import FUNCTIONAL, expand_kv, family_params, save_arch
from tests.circuits.test_faithfulness import _edge_mask_keeping_nodes
from tests.patching.helpers import random_task

ATOL = 1e-4

COVERED = list(FUNCTIONAL)
SWEPT = family_params(COVERED)
"""Every family's sweep; those that share their block with another in the slow tier."""


@pytest.fixture(scope="session")
def arch_folders(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> dict[str, Path]:
    """Architecture name -> its saved folder, built on first use."""
    root = tmp_path_factory.mktemp("archs")
    return _LazyFolders(root, word_tokenizer)


class _LazyFolders(dict):  # type: ignore[type-arg]
    def __init__(self, root: Path, tokenizer: Any) -> None:
        super().__init__()
        self.root, self.tokenizer = root, tokenizer

    def __missing__(self, name: str) -> Path:
        if name == "llama_gqa_mha":
            folder = expand_kv(self["llama_gqa"], self.root / name)
        else:
            folder = save_arch(name, self.root / name, self.tokenizer)
        self[name] = folder
        return folder


@pytest.fixture(scope="session")
def load(arch_folders: dict[str, Path]) -> Any:
    """``load(name)``: the architecture's bridge, loaded once per session."""
    models: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in models:
            models[name] = rl.load_model(arch_folders[name])
        return models[name]

    return get


# ---- (a) the forward pass ---------------------------------------------------------------


@pytest.mark.parametrize("name", COVERED)
def test_functional_logits_equal_the_bridge(load: Any, name: str) -> None:
    model = load(name)
    tokens = torch.randint(
        1, int(model.cfg.d_vocab), (3, 9), generator=torch.Generator().manual_seed(0)
    )
    w = extract_weights(model)
    with torch.no_grad():
        expected = model(tokens, return_type="logits")
        got = w.logits(w.run(tokens).final)
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= 1e-4 * scale


def test_a_family_without_adapter_falls_back_to_hooks_with_a_reason(
    load: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reuse_lens.arch import families

    monkeypatch.delitem(families.ADAPTERS, "gptj")
    model = load("gptj")
    scores = rl.activation_patching(model, random_task(model, n=2, width=4), nodes=["a1.h0"])
    assert scores.settings["engine"] == "hooks"
    assert "no adapter reads the 'gptj' architecture" in scores.settings["fallback_reason"]


# ---- (b) activation patching against TransformerLens -----------------------------------


def _tl(model: Any, task: rl.Task, name: str) -> torch.Tensor:
    from reuse_lens.tasks.metrics import LogitDiff

    inputs = task.metric_inputs()

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return LogitDiff()(logits[:, -1].float(), inputs).mean()

    _, clean_cache = model.run_with_cache(task.clean)
    with torch.no_grad():
        fn = getattr(tl_patching, name)
        return fn(model, task.corrupted, clean_cache, metric).detach().float()


@pytest.mark.parametrize("name", SWEPT)
def test_activation_patching_equals_transformer_lens(load: Any, name: str) -> None:
    model = load(name)
    task = random_task(model, n=3, width=5, seed=1)
    scores = rl.activation_patching(model, task, direction="denoising", per_position=True)
    assert scores.settings["engine"] == "functional", scores.settings["fallback_reason"]
    base = scores.corrupted  # TL reports the patched metric; we report its change
    all_pos = _tl(model, task, "get_act_patch_attn_head_out_all_pos")
    torch.testing.assert_close(scores.heads + base, all_pos, atol=ATOL, rtol=0)
    by_pos = _tl(model, task, "get_act_patch_attn_head_out_by_pos")  # (layer, pos, head)
    assert scores.heads_by_pos is not None and scores.mlps_by_pos is not None
    torch.testing.assert_close(
        scores.heads_by_pos + base, by_pos.permute(1, 0, 2), atol=ATOL, rtol=0
    )
    mlp = _tl(model, task, "get_act_patch_mlp_out")  # (layer, pos)
    torch.testing.assert_close(scores.mlps_by_pos + base, mlp.T, atol=ATOL, rtol=0)
    assert (scores.heads.abs() > 1e-3).any()  # the comparison is not between zeros


# ---- (c) path patching against a slow reference ----------------------------------------


@torch.no_grad()
def reference_path_patching(
    w: Weights, task: rl.Task, receivers: list[tuple[int, int]], inputs: str
) -> dict[str, float]:
    """Wang et al.'s four steps as whole forward passes, one sender at a time.

    Heads are frozen by replacing every z with its clean value, except the sender's,
    which takes its corrupted value; the receivers' q/k/v are recorded and then patched
    into a clean run. Nothing is restricted to positions or layers.
    """
    rows = torch.arange(len(task))
    clean, corrupted = w.run(task.clean), w.run(task.corrupted)

    def metric(final: torch.Tensor) -> float:
        logits = w.logits(final[rows, task.answer_pos])
        return float(task.metric(logits, task.metric_inputs()).mean())

    base = metric(clean.final)
    out: dict[str, float] = {}
    for layer in range(max(layer for layer, _ in receivers)):
        for head in [*range(w.n_heads), None]:
            recorded = _record(w, task, clean, corrupted, layer, head, receivers, inputs)
            resid = w.embed(task.clean)
            for i in range(w.n_layers):
                resid = w.block(i, resid, edit_qkv=_replace(recorded, i))
            name = f"a{layer}.h{head}" if head is not None else f"m{layer}"
            out[name] = metric(resid) - base
    return out


def _record(
    w: Weights,
    task: rl.Task,
    clean: RunCache,
    corrupted: RunCache,
    layer: int,
    head: int | None,
    receivers: list[tuple[int, int]],
    inputs: str,
) -> dict[tuple[int, int, str], torch.Tensor]:
    """Steps 1-3: the receivers' q/k/v with the sender corrupted and every head clean."""
    recorded: dict[tuple[int, int, str], torch.Tensor] = {}
    resid = w.embed(task.clean)
    for i in range(w.n_layers):
        z = clean.z[i].clone()
        if i == layer and head is not None:
            z[:, :, head] = corrupted.z[i][:, :, head]
        mlp = corrupted.mlp_out[i] if i == layer and head is None else None
        store: dict[str, torch.Tensor] = {}
        resid = w.block(
            i,
            resid,
            edit_z=lambda _, z=z: z,
            edit_mlp=None if mlp is None else (lambda _, m=mlp: m),
            record=store,
        )
        for r_layer, r_head in receivers:
            if r_layer == i:
                for c in inputs:
                    recorded[(i, r_head, c)] = store[c][:, :, r_head].clone()
    return recorded


def _replace(recorded: dict[tuple[int, int, str], torch.Tensor], layer: int):
    """Step 4: the receivers' recorded q/k/v in place of their own."""

    def edit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        found = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        for (lay, head, c), value in recorded.items():
            if lay == layer:
                found[c][:, :, head] = value
        return found["q"], found["k"], found["v"]

    return edit


@pytest.mark.parametrize("name", SWEPT)
@pytest.mark.parametrize("inputs", ["q", "k", "v"])
def test_path_patching_equals_the_reference(load: Any, name: str, inputs: str) -> None:
    model = load(name)
    task = random_task(model, lengths=[5, 4, 6], seed=2)
    receivers = ["a1.h0", "a1.h3"]
    fast = rl.path_patching(model, task, receivers=receivers, receiver_input=inputs)
    assert fast.settings["engine"] == "functional"
    expected = reference_path_patching(extract_weights(model), task, [(1, 0), (1, 3)], inputs)
    got = fast.as_dict()
    assert set(got) == set(expected)
    for node, value in expected.items():
        assert got[node] == pytest.approx(value, abs=ATOL), node
    assert max(abs(v) for v in expected.values()) > 1e-3


# ---- node and edge ablation -------------------------------------------------------------


def _masks(model: Any, count: int, seed: int) -> list[NodeMask]:
    gen = torch.Generator().manual_seed(seed)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    return [
        NodeMask(
            torch.rand(n_layers, n_heads, generator=gen) < 0.5,
            torch.rand(n_layers, generator=gen) < 0.5,
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize("name", SWEPT)
def test_node_ablation_equals_hooks_and_edges(load: Any, name: str) -> None:
    model = load(name)
    task = random_task(model, lengths=[5, 4, 6], seed=3)
    fast = AblationRunner(model, task, ablation="resample")
    slow = AblationRunner(model, task, ablation="resample", engine="hooks")
    assert (fast.engine, slow.engine) == ("functional", "hooks")
    masks = _masks(model, 4, seed=0)
    by_nodes = fast.nodes(masks)
    torch.testing.assert_close(by_nodes, slow.nodes(masks), atol=ATOL, rtol=0)
    w = fast.prep.weights
    assert w is not None
    if w.spec.edge_unsupported() is not None:
        with pytest.raises(NotImplementedError, match="node circuit"):
            fast.edges(_edge_mask_keeping_nodes(fast.shape, masks[0]))
        return
    for mask, value in zip(masks, by_nodes, strict=True):
        assert fast.edges(_edge_mask_keeping_nodes(fast.shape, mask)) == pytest.approx(
            float(value), abs=ATOL
        )


# ---- (d) a grouped-query model and its multi-head twin ---------------------------------


def test_grouped_query_model_scores_equal_its_multi_head_twin(load: Any) -> None:
    gqa, mha = load("llama_gqa"), load("llama_gqa_mha")
    assert int(mha.cfg.n_key_value_heads or mha.cfg.n_heads) == int(mha.cfg.n_heads)
    task = random_task(gqa, lengths=[5, 4, 6], seed=4)
    twin = task  # the same token ids: the twins share one tokenizer

    def same(a: rl.patching.NodeScores, b: rl.patching.NodeScores) -> None:
        assert a.settings["engine"] == b.settings["engine"] == "functional"
        torch.testing.assert_close(a.heads, b.heads, atol=ATOL, rtol=0, equal_nan=True)
        torch.testing.assert_close(a.mlps, b.mlps, atol=ATOL, rtol=0, equal_nan=True)

    same(
        rl.activation_patching(gqa, task, per_position=True),
        rl.activation_patching(mha, twin, per_position=True),
    )
    for component in ("k", "v"):
        same(
            rl.activation_patching(gqa, task, component=component),
            rl.activation_patching(mha, twin, component=component),
        )
    for inputs in ("q", "k", "v"):
        same(
            rl.path_patching(gqa, task, receivers=["a1.h1", "a1.h2"], receiver_input=inputs),
            rl.path_patching(mha, twin, receivers=["a1.h1", "a1.h2"], receiver_input=inputs),
        )
    masks = _masks(gqa, 4, seed=1)
    runners = [AblationRunner(m, t, ablation="mean") for m, t in ((gqa, task), (mha, twin))]
    torch.testing.assert_close(runners[0].nodes(masks), runners[1].nodes(masks), atol=ATOL, rtol=0)
    edge = _edge_mask_keeping_nodes(runners[0].shape, masks[0])
    edge[torch.rand(edge.shape, generator=torch.Generator().manual_seed(5)) < 0.3] = False
    assert runners[0].edges(edge) == pytest.approx(runners[1].edges(edge), abs=ATOL)


# ---- (e) edges and half precision on every architecture ---------------------------------


@pytest.mark.parametrize("name", SWEPT)
def test_edges_on_every_architecture(load: Any, name: str) -> None:
    """Keeping every edge is the full model (faithfulness 1), keeping none is everything
    ablated (0); a node's outgoing EAP edge scores add up to its node score. Models whose
    heads do not add up in the residual stream refuse, naming why."""
    model = load(name)
    task = random_task(model, lengths=[5, 4, 6], seed=5)
    shape = shape_of(model)
    everything = rl.Circuit.from_edges([e.name for e in edges_of(shape)], shape)
    nothing = rl.Circuit.from_edges([], shape)
    w = AblationRunner(model, task, ablation="resample").prep.weights
    assert w is not None
    if w.spec.edge_unsupported() is not None:
        with pytest.raises(NotImplementedError, match="normalis"):
            rl.faithfulness(model, task, everything, ablation="resample", check_task=False)
        with pytest.raises(NotImplementedError, match="normalis"):
            rl.attribution_patching(model, task, level="edge")
        return
    assert rl.faithfulness(
        model, task, everything, ablation="resample", check_task=False
    ) == pytest.approx(1.0, abs=1e-3)
    assert rl.faithfulness(
        model, task, nothing, ablation="resample", check_task=False
    ) == pytest.approx(0.0, abs=1e-3)
    nodes = rl.attribution_patching(model, task, method="eap-ig", steps=2)
    edges = rl.attribution_patching(model, task, method="eap-ig", steps=2, level="edge")
    assert isinstance(nodes, rl.NodeScores) and isinstance(edges, rl.EdgeScores)
    summed = edges.to_node_scores()
    scale = max(1.0, float(nodes.heads.abs().max()))
    torch.testing.assert_close(summed.heads, nodes.heads, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("name", SWEPT)
def test_bfloat16_agrees_with_float32(load: Any, arch_folders: dict[str, Path], name: str) -> None:
    """Head patching in bfloat16 agrees with float32 within 8% of the scores' scale (the
    gap or the largest effect; docs/models.md), on the functional engine."""
    model = load(name)
    task = random_task(model, lengths=[5, 4, 6], seed=6)
    full = rl.activation_patching(model, task, nodes="heads")
    try:
        half_model = rl.load_model(arch_folders[name], dtype="bfloat16")
        half = rl.activation_patching(half_model, task, nodes="heads")
    except RuntimeError as error:  # TransformerLens 4.3's own OLMo-2 forward, in bf16
        assert "Load the model in another dtype" in str(error)
        return
    assert half.settings["engine"] == "functional"
    scale = max(abs(full.clean - full.corrupted), float(full.heads.abs().max()))
    error = float((half.heads - full.heads).abs().max()) / scale
    assert error <= 0.08
