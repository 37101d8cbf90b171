"""A study's fine-tuning analysis on the zoo's wide base and a fine-tune that teaches it a task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reuse_lens import study
from reuse_lens.report import write
from reuse_lens.report.summary import markdown, study_answer
from reuse_lens.study.finetune import checkpoint_label

FT = "zoo:wide-ft-gendered_pronoun"


@pytest.fixture(scope="module")
def result() -> Any:
    from reuse_lens import zoo

    steps = zoo.checkpoints(FT.removeprefix("zoo:"))
    config = study.StudyConfig(
        base="zoo:wide",
        tasks=("ioi", "sva", "gendered_pronoun"),
        fine_tuned={"gendered_pronoun": FT},
        # The first checkpoint does not do the task yet; the last does.
        checkpoints={"gendered_pronoun": (f"{FT}@{steps[0]}", f"{FT}@{steps[-1]}")},
        methods=("eap-ig",),
        n_prompts=16,
        n_boot=0,
        n_random=2,
        edge_overlap=True,
    )
    return study.run_study(config, progress=False)


def test_the_new_skill_is_refused_in_the_base_and_found_in_the_fine_tune(result: Any) -> None:
    assert "base/gendered_pronoun/eap-ig" not in result.circuits
    assert "ft-gendered_pronoun/gendered_pronoun/eap-ig" in result.circuits
    analysis = result.fine_tuning["ft-gendered_pronoun"]
    assert analysis.new_skill and analysis.accuracy_before < 0.6 <= 0.9 <= analysis.accuracy_after
    assert analysis.circuit == frozenset(
        result.circuits["ft-gendered_pronoun/gendered_pronoun/eap-ig"].nodes
    )


def test_the_analysis_holds_drift_cmap_reuse_survival_and_trajectory(result: Any) -> None:
    analysis = result.fine_tuning["ft-gendered_pronoun"]
    table = analysis.drift.table()
    assert len(table) == 6 * 8 + 6 and (table["weight"] > 0).all()
    assert table["in_circuit"].sum() == len(analysis.circuit)
    assert {t.name for t in analysis.drift.tests} == {"mlps_vs_heads", "circuit_vs_rest"}
    assert analysis.cmap is not None and analysis.cmap.method == "cmap"
    assert analysis.cmap_reverse is not None
    assert analysis.all_recovery is not None and analysis.circuit_recovery is not None
    assert set(analysis.weight_recovery) == {"unembed", "embed", "norms", "nodes+unembed"}
    # zoo:wide never saw " he" or " she": neither the fine-tune's nodes alone nor its
    # unembedding alone carry the gain into the base; together they do.
    assert analysis.all_recovery < 0.2 and analysis.weight_recovery["unembed"] < 0.2
    assert analysis.weight_recovery["nodes+unembed"] > 0.8
    assert "needs both its new node outputs and its new unembedding" in analysis.headline()
    # Reverting a node to the base inside the fine-tune: a positive share is gain taken
    # away, so the sentence names the nodes with the largest shares, not the smallest.
    reverse = analysis.cmap_reverse.as_dict()
    most = max(reverse, key=lambda n: reverse[n])
    assert reverse[most] > 0.1
    assert f"inside the fine-tune, {most} takes away {reverse[most]:.0%}" in analysis.sentences()[2]
    # The reuse table compares the new circuit with each base task's circuit, Holm over them.
    assert list(analysis.reuse["base_task"]) == ["ioi", "sva"]
    assert (analysis.reuse["p_adjusted"] >= analysis.reuse["p_value"]).all()
    # The same test over the heads after layer 0, which many circuits hold whatever the task.
    reuse = analysis.reuse.set_index("base_task")
    assert (reuse["p_later_adjusted"] >= reuse["p_later"]).all()
    assert (reuse["shared_later"] <= reuse["shared"]).all()
    for task, row in reuse.iterrows():
        later = [
            h for h in row["heads"].split(", ") if h.startswith("a") and not h.startswith("a0.")
        ]
        assert row["shared_later"] == len(later), task
    assert list(analysis.survival["task"]) == ["ioi", "sva"]
    trajectory = analysis.trajectory
    assert trajectory is not None
    assert (
        next(iter(trajectory["point"])) == "base"
        and list(trajectory["point"])[-1] == "ft-gendered_pronoun"
    )
    first = checkpoint_label(
        "gendered_pronoun", result.config.checkpoints["gendered_pronoun"][0], 1
    )
    row = trajectory.set_index("point").loc[first]
    assert row["accuracy"] < 0.6 and row["n_nodes"] != row["n_nodes"]  # no circuit yet: NaN
    assert trajectory.set_index("point").loc["ft-gendered_pronoun", "jaccard_final"] == 1.0
    # Edge circuits along the run too: none where the task is not done yet, the final one
    # against itself, and each point against the base tasks' edge circuits.
    last = checkpoint_label("gendered_pronoun", result.config.checkpoints["gendered_pronoun"][1], 2)
    assert set(result.point_edges) == {
        f"{last}/gendered_pronoun",
        "ft-gendered_pronoun/gendered_pronoun",
    }
    assert (
        row["n_edges"] != row["n_edges"] and row["edge_jaccard_final"] != row["edge_jaccard_final"]
    )
    final = trajectory.set_index("point").loc["ft-gendered_pronoun"]
    assert final["edge_jaccard_final"] == 1.0
    assert final["n_edges"] == len(result.point_edges["ft-gendered_pronoun/gendered_pronoun"].edges)
    ioi_edges = set(result.edge_circuits["ioi"].edges)
    gp_edges = set(result.point_edges["ft-gendered_pronoun/gendered_pronoun"].edges)
    assert final["edges_jaccard_ioi"] == len(ioi_edges & gp_edges) / len(ioi_edges | gp_edges)
    assert f"{first}/gendered_pronoun" in result.refused  # its edge circuit was never looked for
    assert len(result.claims) == 2 and "Heads are reused more than MLPs" in result.claims[0]


def test_the_answer_report_and_summary_carry_the_fine_tune(result: Any, tmp_path: Path) -> None:
    answer = study_answer(result)
    assert any(s.startswith("ft-gendered_pronoun learnt gendered_pronoun") for s in answer)
    path = write(tmp_path / "report.html", result)
    text = path.read_text()
    assert text.index("ft-gendered_pronoun learnt") < text.index("What fine-tuning changed")
    for figure in ("drift_grid", "cmap_grid", "circuit_trajectory"):
        assert f'data-figure="{figure}"' in text
    # results.md carries the same analysis as tables, the trajectory's edge columns included.
    md = markdown(result)
    section = md[md.index("## What fine-tuning changed") :]
    assert "### ft-gendered_pronoun" in section and "edge J. with final" in section
    assert "Holm p" in section and "inside ft-gendered_pronoun" in section
    study.save_summary(result, tmp_path / "summary.json")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["fine_tuning"]["ft-gendered_pronoun"]["new_skill"] is True
    assert saved["answer"] == answer
    assert saved["config"]["checkpoints"]["gendered_pronoun"] == list(
        result.config.checkpoints["gendered_pronoun"]
    )


def test_checkpoints_of_a_task_without_a_fine_tune_are_refused() -> None:
    with pytest.raises(ValueError, match="no fine-tuned model"):
        study.StudyConfig(
            base="zoo:wide",
            tasks=("ioi", "sva"),
            fine_tuned={},
            checkpoints={"sva": ("zoo:wide",)},
        )
