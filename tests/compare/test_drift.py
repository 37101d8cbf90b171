"""``component_drift``: planted changes are found exactly, and nothing else moves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import reuse_lens as rl
from reuse_lens.compare._model_pair import ModelPairError
from tests.archs import FUNCTIONAL, HOOKS_ONLY, REFUSED, expand_kv, save_arch
from tests.compare.fine_tuned import edited, module, noise_everywhere
from tests.patching.helpers import random_task

D_HEAD = 64 // 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drift")
    out = {name: save_arch(name, root / name, word_tokenizer) for name in ("gpt2", "llama_gqa")}
    out["llama_mha"] = expand_kv(out["llama_gqa"], root / "llama_mha")
    return out


def _plant_gpt2(hf: Any) -> None:
    """Head a1.h2's W_V (with its bias) times 1.1; known noise on m0's input matrix."""
    attn = hf.transformer.h[1].attn.c_attn
    d = attn.weight.shape[0]
    cols = slice(2 * d + 2 * D_HEAD, 2 * d + 3 * D_HEAD)
    attn.weight[:, cols] *= 1.1
    attn.bias[cols] *= 1.1
    fc = hf.transformer.h[0].mlp.c_fc
    gen = torch.Generator().manual_seed(3)
    fc.weight.add_(torch.randn(fc.weight.shape, generator=gen) * 0.05)


def test_planted_changes_are_found_exactly_and_nothing_else_moves(folders: dict[str, Path]) -> None:
    base = rl.load_model(folders["gpt2"])
    tuned = edited(folders["gpt2"], _plant_gpt2)
    report = rl.component_drift(base, tuned)
    table = report.table().set_index("node")
    assert table.loc["a1.h2", "weight_v"] == pytest.approx(0.1, abs=1e-6)
    for column in ("weight_q", "weight_k", "weight_o"):
        assert table.loc["a1.h2", column] == 0.0
    # The MLP's change is the noise's norm over the norm of its input matrix and bias.
    fc = base.original_model.transformer.h[0].mlp.c_fc
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(fc.weight.shape, generator=gen) * 0.05
    size = math.sqrt(
        float(fc.weight.detach().double().pow(2).sum() + fc.bias.detach().double().pow(2).sum())
    )
    assert table.loc["m0", "weight_in"] == pytest.approx(
        float(noise.double().norm()) / size, rel=1e-6
    )
    assert table.loc["m0", "weight_out"] == 0.0
    moved = set(table.index[table["weight"] > 0])
    assert moved == {"a1.h2", "m0"}
    assert all(v == 0.0 for row in report.layers for v in row.values() if not math.isnan(v))
    assert report.model["embed"] == 0.0 and report.model["unembed"] == 0.0
    assert report.most_changed(2) == ["a1.h2", "m0"] or report.most_changed(2) == ["m0", "a1.h2"]


def test_identical_models_give_exactly_zero(folders: dict[str, Path], word_tokenizer: Any) -> None:
    base = rl.load_model(folders["gpt2"])
    task = random_task(base, n=4, width=6)
    report = rl.component_drift(base, base, task)
    numbers = report.table().drop(columns=["node", "kind", "layer", "head", "in_circuit"])
    values = numbers.to_numpy(dtype=float)
    assert np.all((values == 0) | np.isnan(values))
    assert not np.isnan(report.table()["act_l2_answer"]).any()
    assert all(t.p_value == 1.0 or t.difference == 0 for t in report.tests)


def test_activation_drift_follows_the_planted_head(folders: dict[str, Path]) -> None:
    base = rl.load_model(folders["gpt2"])
    tuned = edited(folders["gpt2"], _plant_gpt2)
    task = random_task(base, n=4, width=6)
    table = rl.component_drift(base, tuned, task).table().set_index("node")
    # Layer 0's heads read the unchanged embeddings: their outputs do not move at all.
    assert (table.loc[[f"a0.h{h}" for h in range(4)], "act_l2_all"] == 0).all()
    # a1.h2's values are scaled by 1.1 and its pattern is unchanged (W_Q, W_K untouched,
    # and layer 1 reads a residual stream that m0's change moved, hence not exactly 0.1).
    assert table.loc["a1.h2", "act_l2_all"] > 0.05
    assert (table["act_cos_answer"] >= 0).all() and (table["attn_tv"].dropna() <= 1 + 1e-9).all()


def _plant_llama(kv_heads: list[int], group: int) -> Any:
    """kv head 0's v_proj rows (read by query heads 0 and 1) times 1.1; head 2's W_O slice
    times 0.9. ``kv_heads``: the stored kv heads that hold kv head 0."""

    def edit(hf: Any) -> None:
        layer = hf.model.layers[0].self_attn
        for kv in kv_heads:
            layer.v_proj.weight[kv * D_HEAD : (kv + 1) * D_HEAD] *= 1.1
        layer.o_proj.weight[:, 2 * D_HEAD : 3 * D_HEAD] *= 0.9

    return edit


def test_a_grouped_query_model_and_its_multi_head_twin_agree_per_query_head(
    folders: dict[str, Path],
) -> None:
    gqa, mha = folders["llama_gqa"], folders["llama_mha"]
    base_g, base_m = rl.load_model(gqa), rl.load_model(mha)
    tuned_g = edited(gqa, _plant_llama([0], 2))
    tuned_m = edited(mha, _plant_llama([0, 1], 1))
    task = random_task(base_g, n=4, width=6)
    a = rl.component_drift(base_g, tuned_g, task)
    b = rl.component_drift(base_m, tuned_m, task)
    ta, tb = a.table(), b.table()
    numeric = [c for c in ta.columns if c not in ("node", "kind", "head", "in_circuit")]
    np.testing.assert_allclose(
        ta[numeric].to_numpy(dtype=float), tb[numeric].to_numpy(dtype=float), atol=1e-6
    )
    heads = ta.set_index("node")
    assert heads.loc["a0.h0", "weight_v"] == pytest.approx(0.1, abs=1e-6)
    assert heads.loc["a0.h1", "weight_v"] == pytest.approx(0.1, abs=1e-6)
    assert heads.loc["a0.h2", "weight_o"] == pytest.approx(0.1, abs=1e-6)
    assert any("Grouped-query" in note for note in a.notes)
    assert not b.notes


def test_statistics_find_mlps_that_changed_more(folders: dict[str, Path]) -> None:
    def mlps_only(hf: Any) -> None:
        for block in hf.transformer.h:
            block.mlp.c_fc.weight.mul_(1.2)

    base = rl.load_model(folders["gpt2"])
    tuned = edited(folders["gpt2"], mlps_only)
    report = rl.component_drift(base, tuned, circuit=["m0", "a0.h1"], n_permutations=999)
    test = report.test("mlps_vs_heads")
    assert test is not None and test.difference > 0 and test.rank_biserial == 1.0
    # 2 MLPs of 10 nodes: the smallest p a permutation test can give is 1/C(10, 2) = 1/45.
    assert test.p_value == pytest.approx(1 / 45, abs=0.02)
    inside = report.test("circuit_vs_rest")
    assert inside is not None and inside.n_group == 2
    # Within MLPs, m0 and m1 changed alike (their unscaled biases differ a little); within
    # heads nothing changed: no effect of membership once kinds are apart.
    assert inside.difference == pytest.approx(0.0, abs=1e-3) and inside.p_value > 0.3
    assert all(t.p_adjusted >= t.p_value for t in report.tests)
    same = rl.component_drift(base, tuned, circuit=["m0", "a0.h1"], n_permutations=999)
    assert [t.p_value for t in same.tests] == [t.p_value for t in report.tests]


def test_the_report_round_trips_through_json(folders: dict[str, Path], tmp_path: Path) -> None:
    base = rl.load_model(folders["gpt2"])
    tuned = edited(folders["gpt2"], noise_everywhere(0.1, 0))
    report = rl.component_drift(base, tuned, random_task(base, n=3), circuit=["a1.h0"])
    path = report.to_json(tmp_path / "drift.json")
    back = rl.DriftReport.from_json(path)
    assert back.table().equals(report.table())
    assert back.tests == report.tests and back.layers == report.layers
    text = path.read_text()
    assert '"version": 1' in text and "NaN" not in text
    fig = rl.plot.drift_grid(report)
    assert fig.data[0].z.shape == (2, 5) and fig.data[1].name == "circuit"


def test_models_of_another_shape_or_vocabulary_are_refused(
    folders: dict[str, Path], tmp_path: Path, word_tokenizer: Any
) -> None:
    base = rl.load_model(folders["gpt2"])
    other = rl.load_model(save_arch("gpt2", tmp_path / "deep", word_tokenizer, n_layer=3))
    with pytest.raises(ModelPairError, match="different shapes"):
        rl.component_drift(base, other)
    llama = rl.load_model(folders["llama_gqa"])
    with pytest.raises(ModelPairError, match="different architectures"):
        rl.component_drift(base, llama)
    zoo = rl.load_model("zoo:attn-only")
    with pytest.raises(ModelPairError):
        rl.component_drift(base, zoo)
    with pytest.raises(TypeError, match="base"):
        rl.component_drift("gpt2", base)  # type: ignore[arg-type]


def _drift_both_ways(folder: Path, seed: int = 1) -> tuple[Any, Any]:
    """One planted fine-tune's report through the adapter and the functional forward, and
    through the bridge's weights and hooks."""
    base = rl.load_model(folder)
    tuned = edited(folder, noise_everywhere(0.1, seed))
    task = random_task(base, n=3, width=5)
    reports = [
        rl.component_drift(base, tuned, task, circuit=["a0.h1", "m1"], engine=engine)
        for engine in ("functional", "hooks")
    ]
    return reports[0], reports[1]


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "gpt_neox"])
def test_the_bridge_reader_and_hooks_equal_the_adapter_and_functional_forward(
    tmp_path: Path, word_tokenizer: Any, name: str
) -> None:
    # Families no adapter reads go through the bridge's per-head weights and hooks; where
    # both paths exist they must give the same report, weights exactly.
    fast, slow = _drift_both_ways(save_arch(name, tmp_path / name, word_tokenizer))
    assert fast.settings["weights"] == "adapter" and slow.settings["weights"] == "bridge"
    a, b = fast.table(), slow.table()
    weights = [c for c in a.columns if c.startswith("weight")]
    np.testing.assert_allclose(a[weights].to_numpy(float), b[weights].to_numpy(float), rtol=1e-6)
    activations = ["act_cos_answer", "act_l2_answer", "act_cos_all", "act_l2_all", "attn_tv"]
    np.testing.assert_allclose(
        a[activations].to_numpy(float), b[activations].to_numpy(float), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        fast.layer_table().to_numpy(float), slow.layer_table().to_numpy(float), rtol=1e-6
    )
    assert dict(fast.model) == pytest.approx(dict(slow.model), rel=1e-6, nan_ok=True)
    assert (
        fast.notes == slow.notes[: len(fast.notes)] and "No architecture adapter" in slow.notes[-1]
    )


def _runs_and_is_zero_on_itself(folder: Path) -> None:
    base = rl.load_model(folder)
    tuned = edited(folder, noise_everywhere(0.1, 1))
    task = random_task(base, n=3, width=5)
    table = rl.component_drift(base, tuned, task).table()
    assert (table["weight"] > 0).all() and np.isfinite(table["act_l2_answer"]).all()
    assert (table["act_l2_answer"] > 0).all()
    same = rl.component_drift(base, base, task).table()
    assert (same["weight"] == 0).all() and (same["act_l2_answer"] == 0).all()


def test_drift_runs_through_the_bridge_on_a_family_no_adapter_reads(
    tmp_path: Path, word_tokenizer: Any
) -> None:
    folder = save_arch("glm", tmp_path / "glm", word_tokenizer)
    _runs_and_is_zero_on_itself(folder)
    base = rl.load_model(folder)
    with pytest.raises(rl.UnsupportedArchitectureError, match="adapter"):
        rl.component_drift(base, base, engine="functional")


@pytest.mark.slow
@pytest.mark.parametrize("name", [*FUNCTIONAL, *HOOKS_ONLY])
def test_drift_runs_on_every_family(tmp_path: Path, word_tokenizer: Any, name: str) -> None:
    _runs_and_is_zero_on_itself(save_arch(name, tmp_path / name, word_tokenizer))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_drift_refuses_what_no_method_covers(
    tmp_path: Path, word_tokenizer: Any, name: str
) -> None:
    folder = save_arch(name, tmp_path / name, word_tokenizer)
    base = rl.load_model(folder)
    with pytest.raises(rl.UnsupportedArchitectureError):
        rl.component_drift(base, base)


def test_zoo_fine_tune_drifts_little_and_uniformly() -> None:
    base, tuned = rl.load_model("zoo:base"), rl.load_model("zoo:ft-ioi")
    report = rl.component_drift(base, tuned)
    weights = report.table()["weight"]
    # Weight decay and a short run move every weight a few percent (the hand count).
    assert weights.between(0.01, 0.1).all()
    assert module(base.original_model, "transformer.h.0") is not None
