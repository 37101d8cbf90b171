"""The Ray executor writes what the local one writes, byte for byte, on a 2-CPU local cluster."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import reuse_lens
from reuse_lens import study

ray = pytest.importorskip(
    "ray",
    reason='the Ray executor is tested only where Ray is installed: pip install "reuse_lens[ray]"',
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local cluster of 2 CPUs whose workers import this checkout of reuse_lens."""
    root = str(Path(reuse_lens.__file__).parent.parent)
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1",
                                  "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )  # fmt: skip
    yield
    ray.shutdown()


def _summary(result: study.StudyResult, path: Path) -> dict[str, Any]:
    study.save_summary(result, path)
    doc = json.loads(path.read_text())
    doc.pop("seconds")
    return doc


def test_ray_writes_the_same_circuits_and_numbers_as_local(
    cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = study.StudyConfig(
        tasks=("ioi", "sva"), fine_tuned={"ioi": "zoo:ft-ioi"}, methods=("activation",),
        n_prompts=12, n_boot=2, n_random=2,
    )  # fmt: skip
    seconds = {}
    results = {}
    for name in ("local", "ray"):
        start = time.perf_counter()
        results[name] = study.run_study(config, out=tmp_path / name, executor=name, progress=False)
        seconds[name] = time.perf_counter() - start
    with capsys.disabled():
        print(
            f"\nstudy on local: {seconds['local']:.1f} s, on Ray (2 CPUs): {seconds['ray']:.1f} s"
        )
    files = sorted(p.name for p in (tmp_path / "local" / "circuits").iterdir())
    assert files == [
        "base__ioi__activation.json", "base__sva__activation.json", "edges__ioi.json",
        "edges__sva.json", "ft-ioi__ioi__activation.json",
    ]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "ray" / "circuits").iterdir()) == files
    for name in files:
        local, remote = (tmp_path / side / "circuits" / name for side in ("local", "ray"))
        assert local.read_bytes() == remote.read_bytes(), name
    assert _summary(results["local"], tmp_path / "l.json") == _summary(
        results["ray"], tmp_path / "r.json"
    )
    assert ray.is_initialized()  # a cluster the caller started is left running

    # Stopped after a few units (Ctrl-C), then run again: the same bytes, and the second
    # run does only what the first did not finish.
    stopped = _StopsAfter(3)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(config, out=tmp_path / "stopped", executor=stopped, progress=False)
    kept = [p for folder in ("circuits", "work") for p in (tmp_path / "stopped" / folder).glob("*")
            if p.name != "digests.json"]  # fmt: skip
    assert len(kept) == 3  # each finished unit: a circuit or a resample
    resumed = _Counting()
    again = study.run_study(config, out=tmp_path / "stopped", executor=resumed, progress=False)
    n_measures = 3  # one per node circuit
    assert resumed.count == stopped.sent - 3 + n_measures
    for name in files:
        local, remote = (tmp_path / side / "circuits" / name for side in ("local", "stopped"))
        assert local.read_bytes() == remote.read_bytes(), name
    assert _summary(again, tmp_path / "s.json") == _summary(results["local"], tmp_path / "l.json")


class _Counting(study.RayExecutor):
    """The Ray executor, counting the units it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def map(self, units: Any, models: Any, show: Any) -> Iterator[Any]:
        self.count += len(units)
        yield from super().map(units, models, show)


class _StopsAfter(study.RayExecutor):
    """The Ray executor, interrupted (as by Ctrl-C) once ``n`` results are in."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.done, self.sent = n, 0, 0

    def map(self, units: Any, models: Any, show: Any) -> Iterator[Any]:
        self.sent += len(units)
        with contextlib.closing(super().map(units, models, show)) as results:
            for item in results:
                if self.done == self.n:
                    raise KeyboardInterrupt
                self.done += 1
                yield item


def test_units_asking_more_cpus_than_any_node_has_are_refused(cluster: None) -> None:
    config = study.StudyConfig(
        tasks=("ioi", "sva"), fine_tuned={}, methods=("activation",), n_prompts=12,
        n_boot=0, n_random=2, edge_overlap=False, threads=3,
    )  # fmt: skip
    with pytest.raises(
        ValueError, match="no node of the cluster has more than 2: pass --threads 2"
    ):
        study.run_study(config, executor="ray", progress=False)
    assert ray.is_initialized()  # the caller's cluster is left running


def test_ray_executor_connects_to_the_address_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    class FakeRay:
        @staticmethod
        def is_initialized() -> bool:
            return False

        @staticmethod
        def init(**kwargs: Any) -> None:
            calls.append(kwargs)

    executor = study.RayExecutor("head:6379")
    assert executor._connect(FakeRay()) is True
    monkeypatch.setenv("RAY_ADDRESS", "other:6379")
    assert study.RayExecutor()._connect(FakeRay()) is True
    monkeypatch.delenv("RAY_ADDRESS")
    assert study.RayExecutor(num_cpus=2)._connect(FakeRay()) is True
    assert [c.get("address") for c in calls] == ["head:6379", "other:6379", None]
    assert calls[2]["num_cpus"] == 2 and "RAY_ADDRESS" not in os.environ
