"""Where a study keeps what it has finished, so that a stopped study resumes.

Circuits go to ``out/circuits/`` (the study's output, reused when their settings and
weights match); finished bootstrap resamples and measurements go to ``out/work/``, under a
digest of everything that decides their result. Every file is written atomically.

The store also records the sha256 of every file it writes (``out/work/digests.json``) and
reuses a stored file only while it matches: a circuit with a node removed by hand, or a
measurement whose faithfulness was edited, is valid JSON and would otherwise be reported
as if the study had found it. A file that does not match (edited, garbled, or not written
by the store) is found again, with one log line naming it.
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

__all__ = ["CIRCUITS", "DIGESTS", "WORK", "Store"]

logger = logging.getLogger(__name__)

CIRCUITS = "circuits"
"""The folder of a study's circuit files, one per discovery."""

WORK = "work"
"""The folder beside ``circuits/`` where a study keeps its finished resamples and
measurements, so that a stopped study does not run them again."""

DIGESTS = "digests.json"
"""The store's record, in ``work/``: each file it wrote (path under the study's folder) ->
the sha256 of its bytes."""


class Store:
    """Circuits saved under ``folder/circuits`` as they are found, reused when settings match
    and their bytes are the ones the store wrote."""

    def __init__(self, folder: Path | None) -> None:
        self.root = None if folder is None else Path(folder)
        self.folder = None if self.root is None else self.root / CIRCUITS
        self.written: list[str] = []  # the circuit files of this study, in the order met
        self._digests: dict[str, str] = {}
        if self.root is not None:
            assert self.folder is not None
            self.folder.mkdir(parents=True, exist_ok=True)
            self._digests = self._read_digests()

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key.replace('/', '__')}.json"

    # ---- the record of what the store wrote ---------------------------------------------

    def _read_digests(self) -> dict[str, str]:
        assert self.root is not None
        record = self.root / WORK / DIGESTS
        if not record.exists():
            return {}
        try:
            doc = json.loads(record.read_text())
            if not isinstance(doc, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in doc.items()
            ):
                raise ValueError("not a mapping of file names to digests")
            return dict(doc)
        except (OSError, ValueError) as error:
            logger.warning(
                "%s/%s is unreadable (%s): every stored file is found again",
                WORK, DIGESTS, error,
            )  # fmt: skip
            return {}

    def _name(self, path: Path) -> str:
        assert self.root is not None
        return path.relative_to(self.root).as_posix()

    def _matches(self, path: Path) -> bool:
        """Whether ``path`` holds the bytes the store wrote there; if not, one line says so."""
        name = self._name(path)
        recorded = self._digests.get(name)
        if recorded is None:
            logger.warning(
                "%s has no digest in %s/%s (not written by this study's store, or written "
                "before it kept digests): finding it again", name, WORK, DIGESTS,
            )  # fmt: skip
            return False
        try:
            found = _sha256(path.read_bytes())
        except OSError as error:
            logger.warning("%s is unreadable (%s): finding it again", name, error)
            return False
        if found != recorded:
            logger.warning(
                "%s was edited or damaged since the study wrote it (its sha256 differs from "
                "the one recorded in %s/%s): finding it again", name, WORK, DIGESTS,
            )  # fmt: skip
            return False
        return True

    def _record(self, path: Path) -> None:
        """Record the sha256 of the file just written at ``path``."""
        assert self.root is not None
        self._digests[self._name(path)] = _sha256(path.read_bytes())
        text = json.dumps(dict(sorted(self._digests.items())), indent=1) + "\n"
        write_text_atomic(self.root / WORK / DIGESTS, text)

    def _forget(self, path: Path) -> None:
        self._digests.pop(self._name(path), None)

    # ---- circuits -----------------------------------------------------------------------

    def load(self, key: str, expected: Mapping[str, Any]) -> Circuit | None:
        """The circuit saved for ``key``, if the store wrote it and its metadata has every
        ``expected`` value; else None (the caller finds it again)."""
        path = self.path(key)
        if path is None or not path.exists():
            return None
        if not self._matches(path):
            self._forget(path)
            return None
        try:
            circuit = Circuit.from_json(path)
        except (CircuitError, OSError) as error:
            logger.warning("ignoring the unreadable circuit file %s: %s", path.name, error)
            return None
        meta = circuit.metadata
        if all(meta.get(k) == v for k, v in expected.items()):
            self.written.append(path.name)
            return circuit
        return None

    def save(self, key: str, circuit: Circuit) -> None:
        path = self.path(key)
        if path is not None:
            circuit.to_json(path)
            self._record(path)
            self.written.append(path.name)

    def others(self) -> list[str]:
        """The circuit files in ``circuits/`` that are not this study's (an earlier study's
        into the same folder, with other tasks, models or methods), by name."""
        if self.folder is None:
            return []
        mine = set(self.written)
        return sorted(p.name for p in self.folder.glob("*.json") if p.name not in mine)

    # ---- finished resamples and measurements --------------------------------------------

    def _work_path(self, key: str) -> Path | None:
        if self.root is None:
            return None
        return self.root / WORK / f"{key.replace('/', '__')}.json"

    def done(self, unit: Resample | Measure, weights: str) -> Found | Measured | None:
        """``unit``'s saved result, when it was made by the same unit on these weights and
        the file is the one the store wrote."""
        path = self._work_path(unit.key)
        if path is None or not path.exists():
            return None
        if not self._matches(path):
            self._forget(path)
            return None
        try:
            saved = json.loads(path.read_text())
            if saved.get("unit") != _identity(unit, weights):
                return None
            result = _result_from_json(unit, saved["result"])
            if isinstance(result, Found) and result.circuit is not None:
                Circuit.from_json(result.circuit)  # read back only what can be read
            return result
        except (OSError, ValueError, KeyError, TypeError, CircuitError) as error:
            logger.warning("%s is unreadable (%s): finding it again", self._name(path), error)
            return None

    def keep(self, unit: Resample | Measure, result: Found | Measured) -> None:
        """Save a finished resample or measurement, so a stopped study keeps it."""
        path = self._work_path(unit.key)
        if path is None:
            return
        path.parent.mkdir(exist_ok=True)
        record = {"unit": _identity(unit, result.weights), "result": dataclasses.asdict(result)}
        write_text_atomic(path, json.dumps(record, indent=1) + "\n")
        self._record(path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
