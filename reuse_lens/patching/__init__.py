"""Patching: activation, path and attribution patching, all returning scores of nodes."""

from reuse_lens.patching.scores import NodeScores

__all__ = ["NodeScores"]
