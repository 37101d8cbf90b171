"""The benchmark scripts run: each one's quick mode (tiny shapes, on the CPU) must finish
cleanly, so that a script cannot break silently between the runs that record its numbers
(an API it calls moved, a baseline changed its signature). ``bench_gpu.py`` needs a GPU
for its real run; this keeps it ready for one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    """The script's standard output; the test fails with its error if it exits non-zero."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_gpu_smoke_runs_on_cpu() -> None:
    out = _run("bench_gpu.py", "--device", "cpu", "--quick")
    for run in ("activation patching, every head", "EAP-IG (5 steps), edges", "1 edge circuit"):
        assert run in out


def test_bench_memory_runs_every_engine_under_each_budget() -> None:
    out = _run("bench_memory.py", "--quick")
    rows = [line for line in out.splitlines() if line.startswith("| tiny |") and "MiB |" in line]
    engines = {row.split("|")[2].strip() for row in rows}
    assert len(engines) == 6 and len(rows) == 12, out  # six engines, two budgets each
    for row in rows:
        assert re.search(r"\| [\d.]+ (B|KiB|MiB) \|", row), row  # a peak was measured


def test_bench_attribution_agrees_with_transformer_lens() -> None:
    out = _run("bench_attribution.py", "--quick")
    match = re.search(r"largest \|ours - TL\| over node scores: (\S+)", out)
    assert match is not None, out
    assert float(match.group(1)) < 1e-6


def test_bench_cross_model_agrees_with_the_hook_loop() -> None:
    out = _run("bench_cross_model.py", "--quick", "--cases", "gpt2")
    rows = [line.split() for line in out.splitlines() if line.startswith("gpt2")]
    assert [row[0] for row in rows] == ["gpt2"], out
    for row in rows:
        assert float(row[-1]) < 1e-4, row  # max |functional - hooks|


def test_bench_study_times_every_stage_of_a_study() -> None:
    out = _run("bench_study.py", "--quick")
    rows = dict(re.findall(r"^\| (\w[\w -]*) \| ([\d.]+) \|", out, flags=re.MULTILINE))
    stages = ("load", "evaluation", "set-up", "scoring", "size rule", "faithfulness",
              "curves and baselines", "resamples", "comparison", "report", "other")  # fmt: skip
    assert set(stages) <= set(rows), out
    total = float(re.search(r"\*\*total\*\* \| \*\*([\d.]+)\*\*", out).group(1))  # type: ignore[union-attr]
    # Each stage's own time: together they are the whole run (rounded to 0.1 s each).
    assert abs(sum(float(rows[s]) for s in stages) - total) <= 0.1 * len(stages), out
    for busy in ("load", "scoring", "size rule", "resamples", "report"):
        assert float(rows[busy]) > 0, out


def test_bench_discovery_times_each_stage_of_a_discovery() -> None:
    out = _run("bench_discovery.py", "--quick")
    rows = [line for line in out.splitlines() if line.startswith(("| activation", "| eap-ig"))]
    assert [row.split("|")[1:3] for row in rows] == [
        [" activation ", " node "], [" eap-ig ", " node "], [" eap-ig ", " edge "]
    ], out  # fmt: skip
    for row in rows:
        chosen, of = re.search(r"\| (\d+) of (\d+) \|$", row).groups()  # type: ignore[union-attr]
        assert 0 < int(chosen) <= int(of), row


@pytest.mark.slow
def test_the_zoo_at_gpt2_small_shape_computes_what_the_zoo_computes(tmp_path: Path) -> None:
    """bench_study's GPT-2-small-shaped model: the zoo's base model, embedded."""
    import torch

    import reuse_lens as rl

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_study import GPT2_SMALL, embed_zoo

    big = rl.load_model(embed_zoo(tmp_path / "big"))
    zoo = rl.load_model("zoo:base")
    assert (big.cfg.n_layers, big.cfg.n_heads, big.cfg.d_model, big.cfg.d_mlp) == (
        GPT2_SMALL["n_layer"], GPT2_SMALL["n_head"], GPT2_SMALL["n_embd"], GPT2_SMALL["n_inner"]
    )  # fmt: skip
    task = rl.tasks.load("ioi", zoo, n=8, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(big(task.clean), zoo(task.clean), atol=1e-4, rtol=1e-4)
