"""The study pipeline: skipped tasks are reported, scores come back from circuits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import reuse_lens as rl
from reuse_lens import study
from reuse_lens.study import units
from reuse_lens.tasks.metrics import MetricError


def test_a_task_without_a_circuit_is_reported_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    original = units.discover_circuit

    def refuse_induction(model: Any, task: rl.Task, **kwargs: Any) -> rl.Circuit:
        if task.name == "induction":
            raise MetricError("the metric cannot separate the clean from the corrupted prompts")
        return original(model, task, **kwargs)

    monkeypatch.setattr(units, "discover_circuit", refuse_induction)
    config = study.StudyConfig(
        tasks=("ioi", "induction", "sva"), fine_tuned={}, methods=("activation",),
        n_prompts=12, n_boot=0, n_random=2,
    )  # fmt: skip
    result = study.run_study(config, progress=False)
    assert set(result.circuits) == {"base/ioi/activation", "base/sva/activation"}
    assert list(result.skipped) == ["base/induction/activation", "edges/induction"]
    assert result.findings[0].startswith("No circuit for base/induction/activation")
    assert result.task_overlap.names == ("ioi", "sva")
    assert result.edge_overlap is not None and result.edge_overlap.names == ("ioi", "sva")
    assert list(result.cross_task.columns) == ["ioi", "sva"]


def test_study_config_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="unknown tasks"):
        study.StudyConfig(tasks=("ioi", "nope"))
    with pytest.raises(ValueError, match="path"):
        study.StudyConfig(methods=("path",))  # type: ignore[arg-type]


def test_scores_of_a_circuit_round_trip_its_node_scores() -> None:
    shape = rl.nodes.ModelShape(2, 2, True)
    circuit = rl.Circuit.from_nodes(
        ["a0.h1", "m1"], shape, node_scores={"a0.h1": -0.5, "m1": 0.25, "a1.h0": 0.1},
        metadata={"method": "activation", "clean_metric": 2.0, "corrupted_metric": -1.0},
    )  # fmt: skip
    scores = study.scores_of(circuit)
    assert scores.as_dict() == {"a0.h1": -0.5, "a1.h0": pytest.approx(0.1), "m1": 0.25}
    assert torch.isnan(scores.heads[0, 0]) and scores.clean == 2.0 and scores.corrupted == -1.0


def test_saved_circuits_are_reused_only_for_the_same_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from reuse_lens import models

    calls: list[str] = []
    original = units.discover_circuit

    def counting(model: Any, task: rl.Task, **kwargs: Any) -> rl.Circuit:
        calls.append(f"{task.name}/{kwargs['level']}")
        return original(model, task, **kwargs)

    monkeypatch.setattr(units, "discover_circuit", counting)
    config = study.StudyConfig(
        tasks=("sva", "greater_than"), fine_tuned={}, methods=("activation",), n_prompts=12,
        n_boot=0, n_random=2,
    )  # fmt: skip
    found = ["sva/node", "greater_than/node", "sva/edge", "greater_than/edge"]
    first = study.run_study(config, out=tmp_path, progress=False)
    study.run_study(config, out=tmp_path, progress=False)
    assert calls == found  # the second run read the saved circuits, nodes and edges
    digest = models.weights_digest(rl.load_model("zoo:base"))
    assert first.circuits["base/sva/activation"].metadata["weights"] == digest

    # The same spec now loads other weights (a retrained zoo): the circuit is found again.
    monkeypatch.setattr(models, "weights_digest", lambda model: "other weights")
    study.run_study(config, out=tmp_path, progress=False)
    assert calls == found * 2


def test_weights_digest_tells_weights_apart() -> None:
    from reuse_lens.models import weights_digest

    base, tuned = rl.load_model("zoo:base"), rl.load_model("zoo:ft-ioi")
    assert weights_digest(base) == weights_digest(rl.load_model("zoo:base"))
    assert weights_digest(base) != weights_digest(tuned)


def test_ioi_is_compared_with_each_fine_tunes_own_task_inside_it(tmp_path: Any) -> None:
    import json

    config = study.StudyConfig(
        tasks=("ioi", "colored_objects"), fine_tuned={"colored_objects": "zoo:ft-colored_objects"},
        methods=("activation",), n_prompts=12, n_boot=0, n_random=2,
    )  # fmt: skip
    result = study.run_study(config, progress=False)
    assert {
        "ft-colored_objects/ioi/activation",
        "ft-colored_objects/colored_objects/activation",
    } <= set(result.circuits)
    overlap = result.within_model["ft-colored_objects"]
    assert overlap.names == ("ioi", "colored_objects")
    assert any(
        f.startswith("Inside ft-colored_objects, ioi and colored_objects share")
        for f in result.findings
    )
    assert any(i["name"] == "uniform attention in ft-colored_objects" for i in result.interventions)
    study.save_summary(result, tmp_path / "summary.json")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["within_model"] == {"ft-colored_objects": json.loads(overlap.to_json())}


def test_bootstrap_samples_are_the_draws_of_one_seeded_generator() -> None:
    import numpy as np

    from reuse_lens.compare.reuse import bootstrap_sample

    rng = np.random.default_rng(3)
    draws = [rng.integers(0, 10, size=10).tolist() for _ in range(4)]
    # In any order: resample i does not need resamples 0..i-1 to have run.
    assert [bootstrap_sample(10, 3, i) for i in (3, 1, 0, 2)] == [draws[i] for i in (3, 1, 0, 2)]


class _Backwards:
    """An executor that runs the units in reverse order: results must not change."""

    def map(self, work: Any, models: Any, show: Any) -> Any:
        for unit in reversed(work):
            yield unit, units.run_unit(unit, models)


def test_units_give_the_same_circuits_in_any_order(tmp_path: Any) -> None:
    config = study.StudyConfig(
        tasks=("sva", "greater_than"), fine_tuned={}, methods=("activation",), n_prompts=12,
        n_boot=2, n_random=2,
    )  # fmt: skip
    forwards = study.run_study(config, out=tmp_path / "a", progress=False)
    backwards = study.run_study(config, out=tmp_path / "b", progress=False, executor=_Backwards())
    files = sorted(p.name for p in (tmp_path / "a" / "circuits").iterdir())
    assert files == ["base__greater_than__activation.json", "base__sva__activation.json",
                     "edges__greater_than.json", "edges__sva.json"]  # fmt: skip
    for name in files:
        a, b = (tmp_path / side / "circuits" / name for side in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
    assert list(backwards.circuits) == list(forwards.circuits)  # the study's order
    assert forwards.stability.equals(backwards.stability)
    assert forwards.circuit_table.equals(backwards.circuit_table)


def test_the_local_executor_runs_units_in_order_and_names_each() -> None:
    from types import SimpleNamespace

    from reuse_lens._progress import progress_bar

    def unit(key: str) -> Any:
        # A unit's own progress bars are hidden under the study's one.
        return SimpleNamespace(
            key=key, run=lambda models: (key, progress_bar(range(3), desc=key).disable)
        )

    shown: list[str] = []
    done = list(study.LocalExecutor().map([unit("a"), unit("b")], None, shown.append))  # type: ignore[arg-type]
    assert shown == ["a", "b"]
    assert [result for _, result in done] == [("a", True), ("b", True)]
    assert progress_bar(range(3), desc="x").disable is False  # shown again after each unit


class _Recording:
    """The local executor, recording the keys of the units it is given."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def map(self, work: Any, models: Any, show: Any) -> Any:
        self.keys += [unit.key for unit in work]
        yield from study.LocalExecutor().map(work, models, show)


def test_a_stopped_study_keeps_its_resamples_and_measurements(tmp_path: Any) -> None:
    import dataclasses

    config = study.StudyConfig(
        tasks=("sva", "greater_than"), fine_tuned={}, methods=("activation",), n_prompts=12,
        n_boot=2, n_random=2, edge_overlap=False,
    )  # fmt: skip
    circuits = ["base/greater_than/activation", "base/sva/activation"]
    first = _Recording()
    a = study.run_study(config, out=tmp_path, progress=False, executor=first)
    assert sorted(first.keys) == sorted([*circuits, *circuits, "stability/greater_than/0",
        "stability/greater_than/1", "stability/sva/0", "stability/sva/1"])  # fmt: skip
    again = _Recording()
    b = study.run_study(config, out=tmp_path, progress=False, executor=again)
    assert again.keys == []  # circuits, resamples and measurements all read back
    assert a.stability.equals(b.stability) and a.circuit_table.equals(b.circuit_table)
    assert a.curves == b.curves
    # An unreadable result is run again, not trusted.
    (tmp_path / "work" / "stability__sva__0.json").write_text("{not json")
    broken = _Recording()
    study.run_study(config, out=tmp_path, progress=False, executor=broken)
    assert broken.keys == ["stability/sva/0"]
    # Other settings are other work: more random circuits measure the circuit again.
    more = _Recording()
    study.run_study(dataclasses.replace(config, n_random=3), out=tmp_path, progress=False,
                    executor=more)  # fmt: skip
    assert sorted(more.keys) == circuits


def test_study_threads_are_set_for_the_run_and_restored(tmp_path: Any) -> None:
    seen: list[int] = []

    class Watching:
        def map(self, work: Any, models: Any, show: Any) -> Any:
            seen.append(torch.get_num_threads())
            yield from study.LocalExecutor().map(work, models, show)

    before = torch.get_num_threads()
    config = study.StudyConfig(
        tasks=("sva", "greater_than"), fine_tuned={}, methods=("activation",), n_prompts=12,
        n_boot=0, n_random=2, edge_overlap=False, threads=2,
    )  # fmt: skip
    result = study.run_study(config, progress=False, executor=Watching())
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == before
    assert result.config.threads == 2
    with pytest.raises(ValueError, match="threads"):
        study.StudyConfig(threads=0)
