"""Where a study keeps what it has finished, so that a stopped study resumes.

Circuits go to ``out/circuits/`` (the study's output, reused when their settings and
weights match); finished bootstrap resamples and measurements go to ``out/work/``, under a
digest of everything that decides their result. Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reuse_lens._io import write_text_atomic
from reuse_lens.circuits.circuit import Circuit, CircuitError
from reuse_lens.study.units import Found, Measure, Measured, Resample

__all__ = ["WORK", "Store"]

logger = logging.getLogger(__name__)


class Store:
    """Circuits saved under ``folder/circuits`` as they are found, reused when settings match."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = None if folder is None else Path(folder) / "circuits"
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key.replace('/', '__')}.json"

    def load(self, key: str, expected: Mapping[str, Any]) -> Circuit | None:
        path = self.path(key)
        if path is None or not path.exists():
            return None
        try:
            circuit = Circuit.from_json(path)
        except (CircuitError, OSError) as error:
            logger.warning("ignoring the unreadable circuit file %s: %s", path.name, error)
            return None
        meta = circuit.metadata
        if all(meta.get(k) == v for k, v in expected.items()):
            return circuit
        return None

    def save(self, key: str, circuit: Circuit) -> None:
        path = self.path(key)
        if path is not None:
            circuit.to_json(path)

    # ---- finished resamples and measurements --------------------------------------------

    def _work_path(self, key: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder.parent / WORK / f"{key.replace('/', '__')}.json"

    def done(self, unit: Resample | Measure, weights: str) -> Found | Measured | None:
        """``unit``'s saved result, when it was made by the same unit on these weights."""
        path = self._work_path(unit.key)
        if path is None or not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
            if saved.get("unit") != _identity(unit, weights):
                return None
            return _result_from_json(unit, saved["result"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring the unreadable result %s: %s", path.name, error)
            return None

    def keep(self, unit: Resample | Measure, result: Found | Measured) -> None:
        """Save a finished resample or measurement, so a stopped study keeps it."""
        path = self._work_path(unit.key)
        if path is None:
            return
        path.parent.mkdir(exist_ok=True)
        record = {"unit": _identity(unit, result.weights), "result": dataclasses.asdict(result)}
        write_text_atomic(path, json.dumps(record, indent=1) + "\n")


WORK = "work"
"""The folder beside ``circuits/`` where a study keeps its finished resamples and
measurements, so that a stopped study does not run them again."""


def _identity(unit: Resample | Measure, weights: str) -> str:
    """A digest of everything that decides a unit's result: its fields (less the memory
    budget, which changes no result) and the weights it runs on."""
    fields = dataclasses.asdict(unit)
    fields.pop("memory_budget", None)
    fields["kind"], fields["weights"] = type(unit).__name__, weights
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _result_from_json(unit: Resample | Measure, data: dict[str, Any]) -> Found | Measured:
    if isinstance(unit, Resample):
        return Found(**data)
    from reuse_lens.circuits.measure import FaithfulnessCurve

    c = data["curve"]
    curve = FaithfulnessCurve(
        fractions=tuple(c["fractions"]), sizes=tuple(c["sizes"]),
        faithfulness=tuple(c["faithfulness"]), level=c["level"], cpr=c["cpr"], cmd=c["cmd"],
        method=c["method"], task=c["task"],
    )  # fmt: skip
    return Measured(**{**data, "curve": curve})
