"""scripts/zoo_probe.py: the scene-size override of entity-tracking documents."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

import reuse_lens.zoo.language as language
from reuse_lens.tasks import split_of

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "zoo_probe.py"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("zoo_probe", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entity_tracking_scenes_of_chosen_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(language, "task_documents", language.task_documents)  # restored after
    _script()._entity_tracking_sizes([2])
    docs = language.mixture({"entity_tracking": 1.0, "sva": 1.0}, 40, seed=0)
    tracking = [d for d in docs if d.source == "entity_tracking"]
    assert len(tracking) == 20 and len(docs) == 40
    assert all(d.prompt.count(" is in box ") == 2 for d in tracking)
    assert all(split_of(d.key) == "train" for d in tracking)
