"""The reuse-lens command on the zoo: discover, compare, evaluate, demo, and its errors."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

import reuse_lens as rl
from reuse_lens.cli import build_parser, main
from reuse_lens.study import units


@pytest.mark.parametrize(
    "command", ["demo", "study", "discover", "compare", "evaluate", "export-mib", "tasks", "zoo"]
)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: reuse-lens" in capsys.readouterr().out


def test_top_level_help_lists_the_commands() -> None:
    text = build_parser().format_help()
    for command in ("discover", "compare", "evaluate", "demo", "study", "tasks", "zoo"):
        assert command in text


def test_every_option_says_its_default() -> None:
    """An option that is not required says what happens without it."""
    import argparse

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not action.option_strings or action.required or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            if "default" not in (action.help or ""):
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []


def test_tasks_lists_every_task_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == rl.tasks.names()
    assert lines[0].split(None, 1)[1].startswith("Indirect object identification (Wang et al.")
    assert all("Metric: " in line for line in lines)


def test_discover_says_what_it_writes() -> None:
    parser = build_parser()
    help_text = " ".join(
        next(a for a in parser._actions if a.dest == "command")
        .choices["discover"]
        .format_help()
        .split()  # type: ignore[union-attr]
    )
    assert "the circuit as --out (JSON) and, beside it with the suffix .html" in help_text


def test_discover_compare_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ioi, induction = tmp_path / "ioi.json", tmp_path / "induction.json"
    common = ["--model", "zoo:base", "--n", "16"]
    assert main(["discover", *common, "--task", "ioi", "--out", str(ioi)]) == 0
    assert main(["discover", *common, "--task", "induction", "--method", "eap",
                 "--top-k", "3", "--out", str(induction)]) == 0  # fmt: skip
    circuit = rl.Circuit.from_json(ioi)
    assert circuit.metadata["task"] == "ioi" and circuit.metadata["model"] == "zoo:base"
    assert len(rl.Circuit.from_json(induction)) == 3
    assert "plotly" in ioi.with_suffix(".html").read_text()
    assert main(["compare", str(ioi), str(induction), "--out", str(tmp_path / "cmp")]) == 0
    overlap = json.loads((tmp_path / "cmp" / "overlap.json").read_text())
    assert overlap["names"] == ["ioi", "induction"]
    assert (tmp_path / "cmp" / "report.html").exists()
    capsys.readouterr()
    assert main(["evaluate", *common, "--task", "ioi", "--circuit", str(ioi)]) == 0
    out = capsys.readouterr().out
    expected = circuit.metadata["faithfulness"]
    line = next(x for x in out.splitlines() if x.strip().startswith("faithfulness"))
    assert float(line.split()[1]) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["discover", "--model", "zoo:base", "--task", "nope", "--out", "x.json"], "unknown task"),
        (["discover", "--model", "zoo:nope", "--task", "ioi", "--out", "x.json"], "nope"),
        (["compare", "a.json", "b.json", "--out", "o"], "no circuit file"),
        (["discover", "--model", "zoo:base", "--task", "ioi", "--top-k", "0", "--out", "x"],
         "positive integer"),
        (["discover", "--model", "zoo:base", "--task", "ioi", "--method", "acdc", "--out", "x"],
         "invalid choice"),
        (["discover", "--model", "zoo:base", "--task", "ioi", "--experts", "--out", "x.json"],
         "needs a mixture-of-experts model"),
        (["study", "--model", "zoo:base", "--tasks", "ioi", "sva", "--fine-tuned", "ioi",
          "--out", "o"], "must be TASK=SPEC"),
        (["study", "--model", "zoo:base", "--tasks", "ioi", "nope", "--out", "o"],
         "unknown tasks ['nope']"),
        (["study", "--model", "zoo:base", "--tasks", "ioi", "sva", "--fine-tuned", "ioi=zoo:a",
          "ioi=zoo:b", "--out", "o"], "names task 'ioi' twice"),
        (["study", "--model", "zoo:base", "--tasks", "ioi", "sva", "--methods", "path",
          "--out", "o"], "invalid choice"),
        (["study", "--model", "zoo:base", "--tasks", "ioi", "sva", "--address", "head:6379",
          "--out", "o"], "--address is for --executor ray"),
        (["study", "--model", "zoo:base", "--tasks", "ioi", "sva", "--dtype", "int8",
          "--out", "o"], "dtype"),
    ],
)  # fmt: skip
def test_bad_arguments_give_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_demo_writes_a_report_and_reuses_finished_circuits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--studies", "base", "--out", str(tmp_path), "--tasks", "ioi", "induction",
            "--n", "12", "--n-boot", "2", "--n-random", "3"]  # fmt: skip
    assert main(argv) == 0
    # The terminal opens with the report's answer, corrected p-values first; it counts
    # every circuit file, edge circuits too.
    out = capsys.readouterr().out.splitlines()
    start = out.index("Which tasks reuse which heads and MLPs, and is it significant?")
    assert out[start + 1].startswith("  - Heads: ")
    assert "corrected p = " in out[start + 1] and out[start + 1].index("corrected p = ") < out[
        start + 1
    ].index("uncorrected")
    assert start < out.index("Findings:")
    assert any(line.endswith("(8 files of this study)") for line in out)
    files = sorted(p.name for p in (tmp_path / "circuits").iterdir())
    assert files == [
        "base__induction__activation.json", "base__induction__eap-ig.json",
        "base__ioi__activation.json", "base__ioi__eap-ig.json",
        "edges__induction.json", "edges__ioi.json",
        "ft-ioi__ioi__activation.json", "ft-ioi__ioi__eap-ig.json",
    ]  # fmt: skip
    html = (tmp_path / "report.html").read_text()
    assert html.count('data-figure="overlap_grid"') >= 1
    results = (tmp_path / "results.md").read_text()
    assert "| base/ioi/activation |" in results and "## Interventions" in results
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {row["key"] for row in summary["circuits"]} == {
        f.removesuffix(".json").replace("__", "/") for f in files if not f.startswith("edges")
    }
    # Each base task's edge circuit, compared edge by edge.
    assert summary["edge_overlap"]["names"] == ["ioi", "induction"]
    assert rl.Circuit.from_json(tmp_path / "circuits" / "edges__ioi.json").level == "edge"

    calls: list[str] = []
    original = units.discover_circuit

    def counting(*args: object, **kwargs: object) -> rl.Circuit:
        calls.append(str(kwargs.get("method")))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(units, "discover_circuit", counting)
    (tmp_path / "circuits" / "base__ioi__eap-ig.json").unlink()  # as if stopped before it
    assert main(argv) == 0
    # Only the missing circuit is found again: the saved circuits, edge circuits and
    # resamples for stability (out/work) are read back.
    assert calls == ["eap-ig"]


def test_study_without_ray_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    argv = ["study", "--model", "zoo:base", "--tasks", "ioi", "sva", "--executor", "ray",
            "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().endswith('the ray executor needs Ray: pip install "ray>=2.40,<3"')
    assert "Traceback" not in err


def test_study_runs_any_model_without_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # the local executor never imports it
    argv = ["study", "--model", "zoo:attn-only", "--tasks", "ioi", "induction",
            "--methods", "activation", "--n", "12", "--n-boot", "0", "--n-random", "2",
            "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert "zoo:attn-only" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "circuits").iterdir())
    assert files == ["base__induction__activation.json", "base__ioi__activation.json",
                     "edges__induction.json", "edges__ioi.json"]  # fmt: skip
    assert rl.Circuit.from_json(tmp_path / "circuits" / files[0]).metadata["model"] == (
        "zoo:attn-only"
    )
    results = (tmp_path / "results.md").read_text()
    assert results.startswith("# Results of the study of zoo:attn-only\n")
    assert "Produced by `reuse-lens study`" in results
    assert "reuse_lens study of zoo:attn-only" in (tmp_path / "report.html").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["device"] == "cpu" and summary["config"]["base"] == "zoo:attn-only"


# --- export-mib: a MIB leaderboard submission ------------------------------------------------

MIB_PERCENTS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)  # MIB's README: nine circuits, at most these


def check_mib_submission(root: Path) -> dict[str, str]:
    """MIB's documented submission layout, checked without reuse_lens: one folder per
    task/model named ``{task}_{model}``; each holds one scores file (.json or .pt) or nine
    circuits of at most 0.1 ... 50 % of the edges; at least 2 models and 2 tasks. Returns
    each folder's kind."""
    import torch

    from tests.circuits.test_mib_interop import mib_edge_names

    kinds: dict[str, str] = {}
    models, tasks = set(), set()
    for folder in sorted(root.iterdir()):
        assert folder.is_dir(), f"{folder.name}: only task_model folders belong in a submission"
        task, sep, model = folder.name.partition("_")
        assert sep and task and model and "_" not in model, folder.name
        tasks.add(task)
        models.add(model)
        files = sorted(folder.iterdir())
        assert all(f.suffix in (".json", ".pt") for f in files), files
        fractions, scored = [], []
        for file in files:
            if file.suffix == ".json":
                doc = json.loads(file.read_text())
                cfg, edges = doc["cfg"], doc["edges"]
                flags = [bool(e["in_graph"]) for e in edges.values()]
                scores = [e["score"] for e in edges.values()]
            else:
                doc = torch.load(file, weights_only=True)
                cfg = doc["cfg"]
                flags = doc["edges_in_graph"].flatten().tolist()
                scores = doc["edges_scores"].flatten().tolist()
            assert {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"} <= set(cfg)
            assert cfg["d_model"] > 0
            n_edges = len(mib_edge_names(cfg["n_layers"], cfg["n_heads"], cfg["parallel_attn_mlp"]))
            if file.suffix == ".json":
                assert len(edges) == n_edges
            fractions.append(sum(flags) / n_edges)
            scored.append(any(s != 0.0 for s in scores))
        if len(files) == 1:
            assert scored[0], f"{folder.name}: an importances file needs real scores"
            kinds[folder.name] = "scores"
        else:
            assert len(files) == 9, f"{folder.name}: {len(files)} circuit files, MIB asks for 9"
            for fraction, percent in zip(sorted(fractions), MIB_PERCENTS, strict=True):
                assert fraction <= percent / 100 + 1e-12, (folder.name, fraction, percent)
            kinds[folder.name] = "circuits"
    assert len(models) >= 2 and len(tasks) >= 2, (models, tasks)
    return kinds


@pytest.mark.parametrize(("kind", "file_format"), [("scores", "json"), ("circuits", "pt")])
def test_export_mib_writes_a_submission_in_mibs_layout(
    tmp_path: Path, kind: str, file_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eap-ig_patching_edge"
    argv = ["export-mib", "--model", "zoo:base", "zoo:ft-ioi", "--tasks", "ioi", "induction",
            "--n", "8", "--kind", kind, "--format", file_format, "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "4 folders" in capsys.readouterr().out
    kinds = check_mib_submission(out)
    assert sorted(kinds) == ["induction_base", "induction_ft-ioi", "ioi_base", "ioi_ft-ioi"]
    assert set(kinds.values()) == {kind}
    # what MIB reads is what we scored: MIB's sign, and the circuits nest by size
    if kind == "scores":
        back = rl.Circuit.from_mib_json(out / "ioi_base" / "importances.json")
        doc = json.loads((out / "ioi_base" / "importances.json").read_text())
        name, info = next((n, i) for n, i in doc["edges"].items() if i["score"] != 0.0)
        sender, receiver = name.split("->")
        assert back.edge_scores[(sender, receiver)] == pytest.approx(-info["score"])
        assert doc["reuse_lens"]["score_sign"] == "mib"
    else:
        circuits = [rl.Circuit.from_mib_pt(f) for f in sorted((out / "ioi_base").iterdir())]
        sizes = sorted(len(c.edges) for c in circuits)
        assert sizes[0] == 0 and sizes[-1] == int(0.5 * len(circuits[0].edge_scores))
        by_size = sorted(circuits, key=lambda c: len(c.edges))
        assert all(a.edges <= b.edges for a, b in itertools.pairwise(by_size))


def test_export_mib_refuses_names_that_collide(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export-mib", "--model", "zoo:base", "zoo:base", "--tasks", "ioi", "induction",
              "--n", "4", "--out", str(tmp_path)])  # fmt: skip
    assert info.value.code == 2
    assert not list(tmp_path.iterdir())  # refused before any model is run


def test_demo_runs_both_studies_side_by_side_and_opens_with_both_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--out", str(tmp_path), "--tasks", "ioi", "induction", "--n", "8",
            "--n-boot", "0", "--n-random", "2", "--no-edges"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    # The wide study ran in a child process; its terminal output follows the first's.
    assert "5 tasks in zoo:wide" in out and out.index("zoo:base") < out.index("zoo:wide")
    for name in ("base", "wide"):
        assert (tmp_path / name / "report.html").is_file()
        assert (tmp_path / name / "summary.json").is_file()
    index = (tmp_path / "report.html").read_text()
    wide = json.loads((tmp_path / "wide" / "summary.json").read_text())
    assert "fine_tuning" in wide and wide["config"]["checkpoints"]
    # The page opens with each study's answer, the wide one's fine-tune sentences included.
    assert any("learnt gendered_pronoun" in line for line in wide["answer"])
    assert index.index("zoo:base") < index.index("zoo:wide")
    assert 'href="wide/report.html"' in index and "learnt gendered_pronoun" in index
