"""Circuits: what a task uses in a model, how they are found, measured and saved.

``Circuit`` and its file formats import no torch, so circuits can be read without a
model; discovery and faithfulness load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reuse_lens.circuits.circuit import (
    CIRCUIT_FORMAT,
    CIRCUIT_FORMAT_VERSION,
    Circuit,
    CircuitError,
)

if TYPE_CHECKING:
    from reuse_lens.circuits.discovery import METHODS, discover_circuit
    from reuse_lens.circuits.measure import (
        MIB_FRACTIONS,
        CircuitEvaluator,
        FaithfulnessCurve,
        FaithfulnessInterval,
        RandomBaseline,
        faithfulness,
        faithfulness_curve,
        random_baseline,
    )

__all__ = [
    "CIRCUIT_FORMAT",
    "CIRCUIT_FORMAT_VERSION",
    "METHODS",
    "MIB_FRACTIONS",
    "Circuit",
    "CircuitError",
    "CircuitEvaluator",
    "FaithfulnessCurve",
    "FaithfulnessInterval",
    "RandomBaseline",
    "discover_circuit",
    "faithfulness",
    "faithfulness_curve",
    "random_baseline",
]

_LAZY = {
    "METHODS": "reuse_lens.circuits.discovery",
    "discover_circuit": "reuse_lens.circuits.discovery",
    "MIB_FRACTIONS": "reuse_lens.circuits.measure",
    "CircuitEvaluator": "reuse_lens.circuits.measure",
    "FaithfulnessCurve": "reuse_lens.circuits.measure",
    "FaithfulnessInterval": "reuse_lens.circuits.interval",
    "RandomBaseline": "reuse_lens.circuits.measure",
    "faithfulness": "reuse_lens.circuits.measure",
    "faithfulness_curve": "reuse_lens.circuits.measure",
    "random_baseline": "reuse_lens.circuits.measure",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'reuse_lens.circuits' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
