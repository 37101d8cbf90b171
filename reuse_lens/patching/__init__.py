"""Patching: activation, path and attribution patching, all returning scores of nodes.

The names are imported on first use, so that importing one module of this package (the
functional forward, say, from ``reuse_lens.arch``) does not import every engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reuse_lens.patching.activation import activation_patching
    from reuse_lens.patching.attribution import attribution_patching
    from reuse_lens.patching.edges import EdgeScores
    from reuse_lens.patching.path import path_patching
    from reuse_lens.patching.scores import NodeScores

__all__ = [
    "EdgeScores",
    "NodeScores",
    "activation_patching",
    "attribution_patching",
    "path_patching",
]

_LAZY = {
    "EdgeScores": "reuse_lens.patching.edges",
    "NodeScores": "reuse_lens.patching.scores",
    "activation_patching": "reuse_lens.patching.activation",
    "attribution_patching": "reuse_lens.patching.attribution",
    "path_patching": "reuse_lens.patching.path",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'reuse_lens.patching' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
