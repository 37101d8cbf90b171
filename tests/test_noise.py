"""A model with random weights does no task: no circuit, no faithfulness, under any seed.

The sweep is 24 seeds of GPT-2-architecture models with random weights (``tests/archs.py``:
2 layers, d_model 64, weights scaled ×8 so that heads differ, the random models whose
effects came closest to the floor), each on a built-in task with its own prompt seed.
Through the API, ``reuse-lens discover`` and a study, every one is refused with the
numbers. The default tier uses 16 prompts; ``slow`` repeats it with 64 and runs the study
on every seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import reuse_lens as rl
from reuse_lens import study
from reuse_lens.cli import main
from reuse_lens.study import units
from reuse_lens.tasks.metrics import MetricError
from tests.archs import save_arch

SEEDS = range(24)


@pytest.fixture(scope="module")
def random_folders(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> list[Path]:
    root = tmp_path_factory.mktemp("noise")
    return [save_arch("gpt2", root / f"gpt2-{seed}", word_tokenizer, seed=seed) for seed in SEEDS]


def _task_of(seed: int) -> str:
    names = rl.tasks.names()
    return names[seed % len(names)]


def _sweep_api(folders: list[Path], n: int) -> None:
    shape = None
    for seed, folder in zip(SEEDS, folders, strict=True):
        model = rl.load_model(folder)
        task = rl.tasks.load(_task_of(seed), model, n=n, seed=seed)
        assert not rl.evaluate(model, task)["effect"] >= 1.0
        for method in ("activation", "eap-ig"):
            with pytest.raises(MetricError, match=r"cannot separate.*accuracy .*gap .*interval"):
                rl.discover_circuit(model, task, method=method)  # type: ignore[arg-type]
        shape = shape or rl.nodes.shape_of(model)
        circuit = rl.Circuit.from_nodes(["a0.h0", "m1"], shape)
        with pytest.raises(MetricError, match="cannot separate"):
            rl.faithfulness(model, task, circuit)


def test_no_circuit_from_noise_through_the_api(random_folders: list[Path]) -> None:
    _sweep_api(random_folders, n=16)


@pytest.mark.slow
def test_no_circuit_from_noise_through_the_api_with_64_prompts(
    random_folders: list[Path],
) -> None:
    _sweep_api(random_folders, n=64)


def test_no_circuit_from_noise_through_discover(
    random_folders: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for seed, folder in zip(SEEDS, random_folders, strict=True):
        out = tmp_path / f"c{seed}.json"
        argv = ["discover", "--model", str(folder), "--task", _task_of(seed), "--seed",
                str(seed), "--n", "16", "--out", str(out)]  # fmt: skip
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "does not do this task" in err and "accuracy" in err and "interval" in err
        assert not out.exists() and not out.with_suffix(".html").exists()


def _noise_study(folder: Path, seed: int, out: Path) -> tuple[int, str, str]:
    """``reuse-lens study`` on a random model: exit status, stdout and stderr."""
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["study", "--model", str(folder), "--tasks", "ioi", "sva", "--n", "12",
            "--seed", str(seed), "--n-boot", "2", "--n-random", "2", "--out", str(out)]  # fmt: skip
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def test_no_circuit_from_noise_in_a_study(
    random_folders: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    original = units.discover_circuit

    def counting(model: Any, task: rl.Task, **kwargs: Any) -> rl.Circuit:
        calls.append(task.name)
        return original(model, task, **kwargs)

    monkeypatch.setattr(units, "discover_circuit", counting)
    code, out, err = _noise_study(random_folders[6], 6, tmp_path)
    assert code == 1
    assert "fewer than two tasks had a circuit" in err
    assert calls == []  # refused before any discovery, and no resample of a refused task
    assert not list((tmp_path / "circuits").glob("*.json"))
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").iterdir())
    # The answer first, then one short line per refused task, with its numbers.
    lines = out.splitlines()
    answer = lines.index("Which tasks reuse which heads and MLPs, and is it significant?")
    assert lines[answer + 1].startswith("  - No tasks could be compared")
    refused = [line for line in lines if line.startswith("  - base on ")]
    assert [line.split()[3] for line in refused] == ["ioi:", "sva:"]
    assert all("refused, accuracy" in line and len(line) < 120 for line in refused)
    assert max(map(len, lines)) < 400
    # The report, results.md and summary.json are written, and say why.
    results = (tmp_path / "results.md").read_text()
    assert "| base | ioi |" in results and "does the task" in results
    assert "Refused, because the model does not do the task" in results
    report = (tmp_path / "report.html").read_text()
    assert "No tasks could be compared" in report and "refused, accuracy" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task_overlap"] is None and set(summary["refused"]) == {"base/ioi", "base/sva"}
    assert [row["does_task"] for row in summary["evaluations"]] == [False, False]


@pytest.mark.slow
def test_no_circuit_from_noise_in_a_study_under_any_seed(
    random_folders: list[Path], tmp_path: Path
) -> None:
    for seed, folder in zip(SEEDS, random_folders, strict=True):
        code, _, _ = _noise_study(folder, seed, tmp_path / str(seed))
        assert code == 1
        assert not list((tmp_path / str(seed) / "circuits").glob("*.json"))


def test_the_study_api_returns_what_it_could_compare(random_folders: list[Path]) -> None:
    config = study.StudyConfig(
        base=str(random_folders[0]), tasks=("ioi", "sva"), fine_tuned={},
        methods=("activation",), n_prompts=12, n_boot=2, n_random=2,
    )  # fmt: skip
    result = study.run_study(config, progress=False)
    assert result.circuits == {} and result.task_overlap is None
    assert set(result.refused) == {"base/ioi", "base/sva"}
    assert list(result.skipped) == [
        "base/ioi/activation", "base/sva/activation", "edges/ioi", "edges/sva",
    ]  # fmt: skip
    assert result.findings[0].startswith("No circuit of ioi in base: the model does not do")
