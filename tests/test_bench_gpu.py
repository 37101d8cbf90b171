"""``benchmarks/bench_gpu.py`` runs: its CPU smoke mode (tiny shapes) must finish cleanly.

The GPU run itself needs a GPU; this test fails when the script breaks (an API it calls
moved, a baseline changed its signature), so that the GPU run is ready when one is there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_runs_on_cpu() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ROOT / "benchmarks" / "bench_gpu.py"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for run in ("activation patching, every head", "EAP-IG (5 steps), edges", "1 edge circuit"):
        assert run in done.stdout
