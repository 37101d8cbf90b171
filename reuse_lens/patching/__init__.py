"""Patching: activation, path and attribution patching, all returning scores of nodes."""

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
