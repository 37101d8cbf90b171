"""The reuse-lens command on the zoo: discover, compare, evaluate, demo, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import reuse_lens as rl
from reuse_lens import study
from reuse_lens.cli import build_parser, main


@pytest.mark.parametrize("command", ["demo", "discover", "compare", "evaluate", "zoo"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: reuse-lens" in capsys.readouterr().out


def test_top_level_help_lists_the_commands() -> None:
    text = build_parser().format_help()
    for command in ("discover", "compare", "evaluate", "demo", "zoo"):
        assert command in text


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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["demo", "--out", str(tmp_path), "--tasks", "ioi", "induction", "--n", "12",
            "--n-boot", "2", "--n-random", "3"]  # fmt: skip
    assert main(argv) == 0
    files = sorted(p.name for p in (tmp_path / "circuits").iterdir())
    assert files == [
        "base__induction__activation.json", "base__induction__eap-ig.json",
        "base__ioi__activation.json", "base__ioi__eap-ig.json",
        "ft-ioi__ioi__activation.json", "ft-ioi__ioi__eap-ig.json",
    ]  # fmt: skip
    html = (tmp_path / "report.html").read_text()
    assert html.count('data-figure="overlap_grid"') >= 1
    results = (tmp_path / "results.md").read_text()
    assert "| base/ioi/activation |" in results and "## Interventions" in results
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {row["key"] for row in summary["circuits"]} == {
        f.removesuffix(".json").replace("__", "/") for f in files
    }

    calls: list[str] = []
    original = study.discover_circuit

    def counting(*args: object, **kwargs: object) -> rl.Circuit:
        calls.append(str(kwargs.get("method")))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(study, "discover_circuit", counting)
    (tmp_path / "circuits" / "base__ioi__eap-ig.json").unlink()  # as if stopped before it
    assert main(argv) == 0
    assert calls == ["eap-ig"]  # only the missing circuit is found again
