"""Every method runs in bfloat16 and float16, and agrees with float32 (docs/models.md).

The same weights are loaded in float32 and in half precision; every score, in metric
units, must lie within ``TOLERANCE[dtype]`` of the clean − corrupted gap of its float32
twin. Faithfulness is a ratio (m(C) − m(∅)) / (m(full) − m(∅)), so its tolerance is that
fraction of the gap divided by |m(full) − m(∅)|.

Models: a native GPT-2-style config and an HF GPT-2 folder (the functional engine), and
Llama and GPT-NeoX folders (the hook engine; NeoX runs attention and MLP in parallel, so
it has no edge-level methods).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import reuse_lens as rl
from reuse_lens.circuits.measure import CircuitEvaluator
from reuse_lens.nodes import Ablation
from tests.archs import save_arch
from tests.conftest import native_config
from tests.patching.helpers import separable_task

MODELS = ("native", "gpt2", "llama", "gpt_neox")

TOLERANCE = {"bfloat16": 0.03, "float16": 0.005}
"""Largest |half − float32| / |clean − corrupted| accepted. Measured on these models
(CPU): at most 0.010 in bfloat16 and 0.002 in float16."""

_ABLATIONS: tuple[Ablation, ...] = ("resample", "mean", "zero")
_NODES = ["a0.h0", "a1.h2", "m1"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("half")
    out: dict[str, Any] = {"native": native_config()}
    for name in MODELS[1:]:
        out[name] = save_arch(name, root / name, word_tokenizer)
    return out


def _has_edges(model: Any) -> bool:
    return not getattr(model.cfg, "parallel_attn_mlp", False)


def _edge_ablation(model: Any, task: rl.Task) -> bool:
    """Edge circuits are ablated only on the functional engine (patching/ablation.py)."""
    return CircuitEvaluator(model, task).runner.engine == "functional"


def _run_all(model: Any, task: rl.Task) -> dict[str, Any]:
    """Every method's result on ``model``: score tensors, and faithfulness floats."""
    out: dict[str, Any] = {}
    for ablation in _ABLATIONS:
        out[f"activation {ablation}"] = rl.activation_patching(model, task, ablation=ablation)
    out["activation pattern"] = rl.activation_patching(model, task, component="pattern")
    out["activation k by position"] = rl.activation_patching(
        model, task, component="k", per_position=True
    )
    out["path"] = rl.path_patching(model, task)
    levels = ("node", "edge") if _has_edges(model) else ("node",)
    for method in ("eap", "eap-ig"):
        for level in levels:
            out[f"{method} {level}"] = rl.attribution_patching(
                model, task, method=method, level=level, steps=3
            )
    circuit = rl.Circuit.from_nodes(_NODES, model)
    for ablation in _ABLATIONS:
        out[f"faithfulness {ablation}"] = rl.faithfulness(model, task, circuit, ablation=ablation)
    found = rl.discover_circuit(model, task, top_k=3)
    out["discover activation"] = found
    if _has_edges(model) and _edge_ablation(model, task):
        edges = rl.discover_circuit(model, task, method="eap", level="edge", top_k=20)
        out["discover eap edge"] = edges
        out["faithfulness edge"] = rl.faithfulness(model, task, edges, level="edge")
    return out


def _values(result: Any) -> torch.Tensor:
    if isinstance(result, float):
        return torch.tensor([result])
    if isinstance(result, rl.Circuit):
        return torch.tensor([float(result.metadata["faithfulness"])])
    if isinstance(result, rl.NodeScores):
        parts = [result.heads.flatten()]
        parts += [] if result.mlps is None else [result.mlps.flatten()]
        parts += [] if result.heads_by_pos is None else [result.heads_by_pos.flatten()]
        return torch.cat(parts)
    return result.scores.flatten()


def _faithfulness_scale(model: Any, task: rl.Task, key: str) -> float:
    """|m(full) − m(∅)| of the ablation behind a faithfulness result (float32 model)."""
    ablation: Ablation = "mean"  # discover_circuit's and faithfulness's default
    for each in _ABLATIONS:
        if key.endswith(each):
            ablation = each
    level = "edge" if "edge" in key else "node"
    evaluator = CircuitEvaluator(model, task, ablation=ablation)
    return abs(evaluator.full - evaluator.empty(level))


_REFERENCE: dict[str, tuple[Any, rl.Task, dict[str, Any]]] = {}


def _reference(name: str, spec: Any) -> tuple[Any, rl.Task, dict[str, Any]]:
    if name not in _REFERENCE:
        model = rl.load_model(spec, device="cpu")
        task = separable_task(model)
        _REFERENCE[name] = (model, task, _run_all(model, task))
    return _REFERENCE[name]


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("name", MODELS)
def test_every_method_in_half_precision_agrees_with_float32(
    name: str, dtype: str, specs: dict[str, Any]
) -> None:
    reference, task, expected = _reference(name, specs[name])
    model = rl.load_model(specs[name], dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    got = _run_all(model, task)
    assert got.keys() == expected.keys()
    first = expected["activation resample"]
    gap = abs(first.clean - first.corrupted)
    bad = []
    for key, want in expected.items():
        a, b = _values(want), _values(got[key])
        assert a.shape == b.shape, key
        assert not torch.isnan(b[~torch.isnan(a)]).any(), f"{key}: NaN in {dtype}"
        real = ~torch.isnan(a)
        diff = float((a[real] - b[real]).abs().max()) if real.any() else 0.0
        if key.startswith(("faithfulness", "discover")):
            diff *= _faithfulness_scale(reference, task, key)
        if diff > TOLERANCE[dtype] * gap:
            bad.append(f"{key}: {diff / gap:.4f} of the gap")
    assert not bad, f"{name} in {dtype} differs from float32 by more than {TOLERANCE[dtype]}: {bad}"
