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
    out = _run("bench_cross_model.py", "--quick", "--cases", "zoo", "gpt2")
    rows = [line.split() for line in out.splitlines() if line.startswith(("zoo", "gpt2"))]
    assert [row[0] for row in rows] == ["zoo", "gpt2"], out
    for row in rows:
        assert float(row[-1]) < 1e-4, row  # max |functional - hooks|
