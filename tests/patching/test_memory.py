"""One memory budget: its parsing, the environment variable, and that chunking never
changes a result.

Every engine runs twice on the same task: under a budget of one byte (one item per chunk,
the finest chunking there is) and under a terabyte (everything in one chunk). Scores and
faithfulness must agree to float rounding; the batched matmuls of different chunk sizes
may round differently in the last bit, nothing more. The models: the native GPT-2-like
test model, a grouped-query family (llama_gqa) and a post-norm family (gemma2).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import pytest
import torch

import reuse_lens as rl
from reuse_lens._memory import (
    DEFAULT_CPU_BUDGET,
    ENV_VAR,
    HEADROOM,
    Shapes,
    chunk_items,
    edge_attribution_plan,
    parse_budget,
    resolve_budget,
)
from reuse_lens.circuits.measure import CircuitEvaluator
from reuse_lens.nodes import edges_of, shape_of
from reuse_lens.patching import _common
from reuse_lens.patching._attribution_functional import attribute_edges, functional_weights
from reuse_lens.patching._common import prepare
from reuse_lens.patching.ablation import AblationRunner, NodeMask
from reuse_lens.patching.edges import EdgeScores
from reuse_lens.patching.graph import GraphIndex
from reuse_lens.patching.scores import NodeScores
from reuse_lens.tasks.metrics import LogitDiff
from tests.archs import save_arch
from tests.patching.helpers import random_task, separable_task

TINY, HUGE = 1, "1TiB"
ATOL = 1e-5


# ---- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (2**31, 2**31),
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("512 mib", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("100KB", 100_000),
        ("3kib", 3072),
        ("1TiB", 2**40),
        ("4096", 4096),
        ("7B", 7),
        (" 2 GiB ", 2 * 2**30),
    ],
)
def test_parse_budget_reads_bytes_and_sizes(value: Any, expected: int) -> None:
    assert parse_budget(value) == expected


@pytest.mark.parametrize("value", [0, -5, "0", "0.1B", "", "GiB", "2 gigs", "2G", "1e9", True, 2.5])
def test_parse_budget_refuses_naming_value_and_forms(value: Any) -> None:
    with pytest.raises(ValueError, match="memory_budget") as error:
        parse_budget(value)
    assert repr(value) in str(error.value)
    assert "'2GiB'" in str(error.value) and "bytes" in str(error.value)


def test_environment_variable_sets_the_budget_and_the_argument_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_budget(None, "cpu") == DEFAULT_CPU_BUDGET
    monkeypatch.setenv(ENV_VAR, "256MiB")
    assert resolve_budget(None, "cpu") == 256 * 2**20
    assert resolve_budget("1GiB", "cpu") == 2**30
    assert resolve_budget(12345, "cpu") == 12345
    monkeypatch.setenv(ENV_VAR, "lots")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='lots'"):
        resolve_budget(None, "cpu")
    assert resolve_budget("1GiB", "cpu") == 2**30  # the argument is read first


def test_bad_budget_is_refused_by_every_entry_point(native_model: Any) -> None:
    task = random_task(native_model, n=4, width=6)
    circuit = rl.Circuit.from_nodes(["a0.h0", "m1"], shape_of(native_model))
    calls = [
        lambda: rl.activation_patching(native_model, task, memory_budget="x"),
        lambda: rl.path_patching(native_model, task, memory_budget="x"),
        lambda: rl.attribution_patching(native_model, task, memory_budget="x"),
        lambda: rl.faithfulness(native_model, task, circuit, memory_budget="x"),
        lambda: rl.random_baseline(native_model, task, circuit, memory_budget="x"),
        lambda: rl.discover_circuit(native_model, task, top_k=2, memory_budget="x"),
        lambda: CircuitEvaluator(native_model, task, memory_budget="x"),
        lambda: AblationRunner(native_model, task, memory_budget="x"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="memory_budget='x'"):
            call()


def test_env_budget_reaches_the_engines(
    native_model: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    task = random_task(native_model, n=4, width=6)
    monkeypatch.setenv(ENV_VAR, "1")
    with caplog.at_level(logging.WARNING, logger="reuse_lens._memory"):
        rl.activation_patching(native_model, task, nodes=["a0.h0"])
    assert "below what one row of a forward pass needs" in caplog.text


def test_chunk_items_counts_what_fits() -> None:
    # HEADROOM (a tenth) of the budget is kept free of chunks.
    assert chunk_items(1000, 100) == 9
    assert chunk_items(1000, 100, fixed=500) == 4
    assert chunk_items(10, 100) == 1  # one item at least, with a warning
    assert chunk_items(1000, 100, fixed=5000) == 1


def test_estimates_grow_with_the_shapes() -> None:
    small = Shapes(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, width=16
    )
    assert small.n_senders == 157 and small.n_receivers == 12 * 37 + 1
    wider = Shapes(**{**small.__dict__, "width": 32})
    for estimate in ("forward_row", "run_cache", "backward_prompt", "edge_backward_prompt"):
        assert getattr(wider, estimate)() > getattr(small, estimate)() > 0
    assert small.edge_backward_prompt(qk_norm=True) > small.edge_backward_prompt()


def test_edge_attribution_splits_prompts_then_receivers() -> None:
    shapes = Shapes(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, width=16
    )
    one = shapes.edge_backward_prompt()
    assert shapes.edge_backward_prompt(layers=1) < shapes.edge_backward_prompt(layers=6) < one

    def budget(usable: int, held: int = 0) -> int:  # the budget whose usable room is this
        return math.ceil((usable + held) / (1 - HEADROOM))

    # Whole prompts while one fits; then one prompt with as many layers as fit.
    assert edge_attribution_plan(budget(3 * one), shapes) == (3, 12)
    five = shapes.edge_backward_prompt(layers=5)
    assert edge_attribution_plan(budget(five), shapes) == (1, 5)
    # What the call holds (the weights copy) is not room for chunks.
    layer = five - shapes.edge_backward_prompt(layers=4)
    assert edge_attribution_plan(budget(five, layer), shapes, held=layer) == (1, 5)
    assert edge_attribution_plan(budget(five), shapes, held=layer) == (1, 4)
    # A fixed batch takes fewer layers a pass.
    assert edge_attribution_plan(budget(2 * five), shapes, batch_size=2) == (2, 5)
    assert edge_attribution_plan(1, shapes) == (1, 1)  # with a warning


# ---- chunking changes nothing -----------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> Any:
    root = tmp_path_factory.mktemp("memory_archs")
    models: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in models:
            models[name] = rl.load_model(save_arch(name, root / name, word_tokenizer))
        return models[name]

    return get


def _model(name: str, native_model: Any, family: Any) -> Any:
    return native_model if name == "native" else family(name)


def _same(a: NodeScores | EdgeScores, b: NodeScores | EdgeScores) -> None:
    if isinstance(a, EdgeScores):
        assert isinstance(b, EdgeScores)
        torch.testing.assert_close(a.scores, b.scores, atol=ATOL, rtol=0)
        return
    assert isinstance(b, NodeScores)
    torch.testing.assert_close(a.heads, b.heads, atol=ATOL, rtol=0, equal_nan=True)
    if a.mlps is not None:
        torch.testing.assert_close(a.mlps, b.mlps, atol=ATOL, rtol=0, equal_nan=True)
    if a.heads_by_pos is not None:
        torch.testing.assert_close(
            a.heads_by_pos, b.heads_by_pos, atol=ATOL, rtol=0, equal_nan=True
        )


MODELS = ["native", "llama_gqa", "gemma2"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("engine", ["functional", "hooks"])
def test_activation_patching_is_the_same_under_any_budget(
    name: str, engine: str, native_model: Any, family: Any
) -> None:
    model = _model(name, native_model, family)
    task = random_task(model, n=5, width=6)
    kw: dict[str, Any] = dict(per_position=engine == "functional", engine=engine)
    _same(
        rl.activation_patching(model, task, memory_budget=TINY, **kw),
        rl.activation_patching(model, task, memory_budget=HUGE, **kw),
    )


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("engine", ["functional", "hooks"])
def test_path_patching_is_the_same_under_any_budget(
    name: str, engine: str, native_model: Any, family: Any
) -> None:
    model = _model(name, native_model, family)
    task = random_task(model, n=5, width=6)
    for receivers in ("logits", ["a1.h1"]):
        kw: dict[str, Any] = dict(receivers=receivers, engine=engine)
        _same(
            rl.path_patching(model, task, memory_budget=TINY, **kw),
            rl.path_patching(model, task, memory_budget=HUGE, **kw),
        )


@pytest.mark.parametrize("name", MODELS)
def test_attribution_is_the_same_under_any_budget(
    name: str, native_model: Any, family: Any
) -> None:
    model = _model(name, native_model, family)
    task = random_task(model, n=5, width=6)
    _same(
        rl.attribution_patching(model, task, memory_budget=TINY),
        rl.attribution_patching(model, task, memory_budget=HUGE),
    )
    edge: dict[str, Any] = dict(method="eap-ig", level="edge", steps=3)
    _same(
        rl.attribution_patching(model, task, memory_budget=TINY, **edge),
        rl.attribution_patching(model, task, memory_budget=HUGE, **edge),
    )
    if name == "native":  # edges through hooks too
        _same(
            rl.attribution_patching(model, task, memory_budget=TINY, engine="hooks", **edge),
            rl.attribution_patching(model, task, memory_budget=HUGE, engine="hooks", **edge),
        )


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("engine", ["functional", "hooks"])
@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_ablation_is_the_same_under_any_budget(
    name: str, engine: str, ablation: str, native_model: Any, family: Any
) -> None:
    model = _model(name, native_model, family)
    task = random_task(model, n=5, width=6)
    shape = shape_of(model)
    g = torch.Generator().manual_seed(0)
    masks = [
        NodeMask(
            torch.rand(shape.n_layers, shape.n_heads, generator=g) > 0.5,
            torch.rand(shape.n_layers, generator=g) > 0.5 if shape.has_mlps else None,
        )
        for _ in range(3)
    ]
    index = GraphIndex(shape)
    keep = torch.rand(index.n_senders, index.n_receivers, generator=g) > 0.5
    runs = [
        AblationRunner(model, task, ablation=ablation, engine=engine, memory_budget=budget)  # type: ignore[arg-type]
        for budget in (TINY, HUGE)
    ]
    if engine == "functional" and ablation == "resample":
        # Under one byte, each chunk computes its prompts' corrupted runs; under a
        # terabyte, the runner holds those of every prompt.
        assert runs[0]._sources is None and runs[1]._sources is not None
    torch.testing.assert_close(runs[0].nodes(masks), runs[1].nodes(masks), atol=1e-6, rtol=0)
    if engine == "functional":  # edge circuits through hooks: tests/circuits/test_hook_edges.py
        assert abs(runs[0].edges(keep) - runs[1].edges(keep)) < 1e-6


def test_faithfulness_entry_points_are_the_same_under_any_budget(native_model: Any) -> None:
    task = random_task(native_model, n=6, width=6)
    shape = shape_of(native_model)
    nodes = rl.Circuit.from_nodes(["a0.h0", "a1.h2", "m0"], shape)
    graph = edges_of(shape)
    edges = rl.Circuit.from_edges([(e.sender.name, e.receiver_name) for e in graph[::3]], shape)
    for circuit in (nodes, edges):
        a = rl.faithfulness(native_model, task, circuit, memory_budget=TINY, check_task=False)
        b = rl.faithfulness(native_model, task, circuit, memory_budget=HUGE, check_task=False)
        assert abs(a - b) < 1e-5
    scores = rl.activation_patching(native_model, task)
    curves = [
        rl.faithfulness_curve(native_model, task, scores, fractions=(0.2, 0.5), memory_budget=b)
        for b in (TINY, HUGE)
    ]
    assert curves[0].faithfulness == pytest.approx(curves[1].faithfulness, abs=1e-5)
    baselines = [
        rl.random_baseline(native_model, task, nodes, n=3, memory_budget=b) for b in (TINY, HUGE)
    ]
    assert baselines[0].values == pytest.approx(baselines[1].values, abs=1e-5)
    done = separable_task(native_model, n=6, width=6)  # discovery wants a task the model does
    found = [
        rl.discover_circuit(native_model, done, top_k=3, memory_budget=b) for b in (TINY, HUGE)
    ]
    assert found[0].nodes == found[1].nodes


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("layers_per_pass", [1, 2])
def test_edge_attribution_split_over_receivers_changes_nothing(
    name: str, layers_per_pass: int, native_model: Any, family: Any
) -> None:
    model = _model(name, native_model, family)
    task = random_task(model, n=3, width=6)
    logit_diff = LogitDiff()
    w = functional_weights(model, task, logit_diff, "functional")
    assert w is not None
    whole, split = (
        attribute_edges(
            w, task, logit_diff, shape_of(model), n_steps=2, batch_size=3, layers_per_pass=k
        )
        for k in (None, layers_per_pass)
    )
    assert whole.matrix.abs().sum() > 0
    torch.testing.assert_close(whole.matrix, split.matrix, atol=ATOL, rtol=0)
    assert (whole.clean, whole.corrupted) == (split.clean, split.corrupted)


# ---- a call's prompts in parts ----------------------------------------------------------


def test_prepare_holds_the_runs_only_when_they_fit(native_model: Any) -> None:
    task = random_task(native_model, n=5, width=6)
    whole = prepare(native_model, task, None, budget=parse_budget(HUGE))
    split = prepare(native_model, task, None, budget=TINY)
    assert whole.spans() == [slice(0, 5)] and set(whole.runs) == {"clean", "corrupted"}
    assert whole.part_bytes == 0 and list(whole.parts()) == [whole]
    # One prompt a part: no run is held; the budget counts the runs of the part at hand.
    assert split.spans() == [slice(i, i + 1) for i in range(5)] and split.runs == {}
    assert split.part_bytes == 2 * Shapes.of(native_model, 6).run_cache()
    assert split.held_bytes == split.weights.own_bytes + split.part_bytes  # type: ignore[union-attr]
    # The bridge's logits (one prompt a pass) and the corrupted ones (part by part) agree.
    torch.testing.assert_close(split.clean_logits, whole.clean_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(split.corrupted_logits, whole.corrupted_logits, atol=1e-6, rtol=0)
    parts = list(split.parts())
    assert [p.n for p in parts] == [1] * 5
    # The hook engines work in the same parts; their caches are estimated, never in runs.
    hooks = prepare(native_model, task, None, engine="hooks", budget=TINY)
    assert hooks.spans() == split.spans() and hooks.runs == {}
    assert hooks.held_bytes == hooks.part_bytes == 2 * Shapes.of(native_model, 6).run_cache()
    whole_hooks = prepare(native_model, task, None, engine="hooks", budget=parse_budget(HUGE))
    assert whole_hooks.spans() == [slice(0, 5)] and whole_hooks.part_bytes == 5 * split.part_bytes
    assert torch.equal(torch.cat([p.clean for p in parts]), split.clean)
    assert torch.equal(parts[3].answer_pos, split.answer_pos[3:4])


def test_a_mean_over_parts_is_the_mean_over_every_prompt(native_model: Any) -> None:
    # Prompts of different lengths: padding must stay out of the mean in every part.
    task = random_task(native_model, lengths=[6, 3, 5, 2, 6], width=6)
    prep = prepare(native_model, task, None)
    lengths = prep.answer_pos + 1
    whole = prep.mean_run(lengths)
    parted = dataclasses.replace(prep, runs={}, part_size=2).mean_run(lengths)
    assert [name for name, _ in parted.items()] == [name for name, _ in whole.items()]
    for (name, a), (_, b) in zip(whole.items(), parted.items(), strict=True):
        assert a.shape[0] == 1, name
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["native", "llama_gqa"])
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
@pytest.mark.parametrize("engine", ["functional", "hooks"])
def test_activation_patching_in_parts_equals_one_part(
    name: str,
    ablation: str,
    engine: str,
    native_model: Any,
    family: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model(name, native_model, family)
    task = random_task(model, lengths=[6, 4, 5, 3, 6], width=6)
    directions = ["noising", "denoising"] if ablation == "resample" else ["noising"]
    settings: list[dict[str, Any]] = [
        dict(
            ablation=ablation,
            direction=d,
            per_position=engine == "functional",
            engine=engine,
            memory_budget=HUGE,
        )
        for d in directions
    ]
    whole = [rl.activation_patching(model, task, **kw) for kw in settings]
    monkeypatch.setattr(_common, "prompts_per_part", lambda *args, **kwargs: 2)
    for kw, expected in zip(settings, whole, strict=True):
        split = rl.activation_patching(model, task, **kw)
        assert split.heads.isfinite().all() and split.heads.abs().sum() > 0
        _same(split, expected)
        assert split.clean == expected.clean  # the bridge's logits, in one pass either way
        assert split.corrupted == pytest.approx(expected.corrupted, abs=1e-6)


@pytest.mark.parametrize("name", ["native", "llama_gqa"])
@pytest.mark.parametrize("engine", ["functional", "hooks"])
def test_path_patching_in_parts_equals_one_part(
    name: str, engine: str, native_model: Any, family: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(name, native_model, family)
    task = random_task(model, lengths=[6, 4, 5, 3, 6], width=6)
    settings: list[dict[str, Any]] = [
        dict(receivers="logits", engine=engine),
        dict(receivers=["a1.h1"], receiver_input="kv", positions="answer", engine=engine),
    ]
    whole = [rl.path_patching(model, task, memory_budget=HUGE, **kw) for kw in settings]
    monkeypatch.setattr(_common, "prompts_per_part", lambda *args, **kwargs: 2)
    for kw, expected in zip(settings, whole, strict=True):
        _same(rl.path_patching(model, task, memory_budget=HUGE, **kw), expected)


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
@pytest.mark.parametrize("input_node", ["embeddings", "tokens"])
def test_ablation_in_parts_equals_one_part(
    ablation: str, input_node: str, native_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = random_task(native_model, lengths=[6, 4, 5, 3, 6], width=6)
    shape = shape_of(native_model)
    g = torch.Generator().manual_seed(1)
    masks = [NodeMask(torch.rand(2, 4, generator=g) > 0.5, torch.rand(2, generator=g) > 0.5)]
    index = GraphIndex(shape)
    keep = torch.rand(index.n_senders, index.n_receivers, generator=g) > 0.5

    options: dict[str, Any] = dict(ablation=ablation, input_node=input_node, memory_budget=HUGE)

    def runner() -> AblationRunner:
        return AblationRunner(native_model, task, **options)

    whole = runner()
    monkeypatch.setattr(_common, "prompts_per_part", lambda *args, **kwargs: 2)
    split = runner()
    # The runner keeps the sources alone: no run of any prompt stays held.
    assert whole.prep.runs == {} and split.prep.runs == {}
    torch.testing.assert_close(split.nodes(masks), whole.nodes(masks), atol=1e-6, rtol=0)
    assert split.edges(keep) == pytest.approx(whole.edges(keep), abs=1e-6)
    # Under one byte: parts of two still, one item a chunk, resampling's sources per chunk.
    tiny = AblationRunner(native_model, task, **{**options, "memory_budget": TINY})
    torch.testing.assert_close(tiny.nodes(masks), whole.nodes(masks), atol=1e-6, rtol=0)
    assert tiny.edges(keep) == pytest.approx(whole.edges(keep), abs=1e-6)


def test_resampled_sources_go_when_an_edge_prompt_needs_their_room(native_model: Any) -> None:
    task = random_task(native_model, n=5, width=6)
    shapes = Shapes.of(native_model, 6)
    own = prepare(native_model, task, None).weights.own_bytes  # type: ignore[union-attr]
    sources = 5 * shapes.sender_outputs()
    assert shapes.edge_ablation_prompt() > sources + shapes.forward_row()
    # Room for the sources and node rows beside them, not for an edge circuit's prompt.
    room = max(2 * sources, sources + shapes.forward_row())
    budget = math.ceil((room + own) / (1 - HEADROOM)) + 1
    runner = AblationRunner(native_model, task, ablation="resample", memory_budget=budget)
    whole = AblationRunner(native_model, task, ablation="resample", memory_budget=HUGE)
    assert runner._sources is not None
    mask = NodeMask.full(shape_of(native_model))
    mask.heads[0, :2] = False
    torch.testing.assert_close(runner.nodes(mask), whole.nodes(mask), atol=1e-6, rtol=0)
    index = GraphIndex(shape_of(native_model))
    keep = (
        torch.rand(index.n_senders, index.n_receivers, generator=torch.Generator().manual_seed(2))
        > 0.3
    )
    assert runner.edges(keep) == pytest.approx(whole.edges(keep), abs=1e-6)
    assert runner._sources is None and whole._sources is not None
    torch.testing.assert_close(runner.nodes(mask), whole.nodes(mask), atol=1e-6, rtol=0)
