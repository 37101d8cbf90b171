"""Plotly figures of patching scores, circuits, their overlap and their faithfulness.

Every function returns a ``plotly.graph_objects.Figure`` and takes ``template=`` (a plotly
template name) and ``title=``; nothing sets global plotly state. Grid figures share one
layout (heads across, then an MLP column; layer 0 at the bottom), so the heatmap, the
circuit diagram and the overlap grid of one model line up cell for cell. Hover text gives
node names and scores.

Families: :func:`patching_heatmap` (scores); :func:`circuit_diagram` (one circuit);
:func:`overlap_grid`, :func:`jaccard_matrix`, :func:`upset`, :func:`threshold_sweep`
(several circuits); :func:`edge_jaccard_matrix` (edge circuits);
:func:`faithfulness_curves`, :func:`faithfulness_matrix`; :func:`drift_grid` and
:func:`cmap_grid` (what fine-tuning changed).
"""

from __future__ import annotations

from reuse_lens.plot._circuit import ColorBy, circuit_diagram
from reuse_lens.plot._drift import cmap_grid, drift_grid
from reuse_lens.plot._edge_overlap import edge_jaccard_matrix
from reuse_lens.plot._faithfulness import (
    MIB_FRACTIONS,
    CurveLike,
    faithfulness_curves,
    faithfulness_matrix,
)
from reuse_lens.plot._overlap import jaccard_matrix, overlap_grid, threshold_sweep, upset
from reuse_lens.plot._scores import patching_heatmap

__all__ = [
    "MIB_FRACTIONS",
    "ColorBy",
    "CurveLike",
    "circuit_diagram",
    "cmap_grid",
    "drift_grid",
    "edge_jaccard_matrix",
    "faithfulness_curves",
    "faithfulness_matrix",
    "jaccard_matrix",
    "overlap_grid",
    "patching_heatmap",
    "threshold_sweep",
    "upset",
]
