"""A MIB circuit-track leaderboard submission, laid out as MIB's README asks.

MIB's circuit track (Mueller et al. 2025) takes, per method, one folder per (task, model)
named ``{task}_{model}`` (e.g. ``ioi_gpt2``), each holding either

- **importance scores**: one ``.json`` or ``.pt`` graph file with a floating-point score for
  every edge (``importances.json`` / ``importances.pt``, the name MIB's own scripts use), or
- **circuits**: nine graph files with binary ``in_graph`` membership, one circuit with no
  more than each of 0.1, 0.2, 0.5, 1, 2, 5, 10, 20 and 50 % of the model's edges,

for at least two models and two tasks. ``write_submission`` writes that folder from edge
scores; ``reuse-lens export-mib`` runs attribution and calls it. The layout follows the
README of MIB's circuit-track repository ("Submitting to the MIB Leaderboard") and the
paths of its ``run_evaluation.py``; the circuit files' names are ours (MIB's README does not
fix them): ``circuit_{percent}pct.json``. docs/circuit_format.md says more.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from reuse_lens.circuits.circuit import Circuit
from reuse_lens.circuits.mib import MIB_SIGN, ScoreSign

if TYPE_CHECKING:
    from reuse_lens.patching.edges import EdgeScores

__all__ = [
    "MIB_SUBMISSION_PERCENTS",
    "SubmissionKind",
    "mib_folder_name",
    "submission_circuits",
    "write_submission",
]

MIB_SUBMISSION_PERCENTS: tuple[float, ...] = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)
"""The nine circuit sizes of a MIB submission, in percent of the model's edges (at most).

MIB's faithfulness curve also has the 100 % point, the full model, which needs no file."""

SubmissionKind = Literal["scores", "circuits"]
FileFormat = Literal["json", "pt"]

_NAME = re.compile(r"[^A-Za-z0-9.\-]+")


def mib_folder_name(task: str, model: str) -> str:
    """``{task}_{model}``, the folder MIB expects; the underscore separates the two, so
    each part keeps letters, digits, ``.`` and ``-`` only (``colored_objects`` becomes
    ``colored-objects``, as MIB's scripts write ``arc_easy`` as ``arc-easy``)."""
    parts = []
    for what, value in (("task", task), ("model", model)):
        cleaned = _NAME.sub("-", value).strip("-")
        if not cleaned:
            raise ValueError(f"the {what} name {value!r} has no letter or digit to name a folder")
        parts.append(cleaned)
    return "_".join(parts)


def submission_circuits(
    scores: EdgeScores,
    *,
    percents: tuple[float, ...] = MIB_SUBMISSION_PERCENTS,
    metadata: Mapping[str, Any] | None = None,
) -> dict[float, Circuit]:
    """The top-|score| edge circuit with at most ``p`` % of the edges, for each ``p``.

    A circuit keeps ``floor(p / 100 · N)`` of the ``N`` edges, as MIB's evaluation
    (``int(p · N)``), so none exceeds its size; on a small model the smallest may be empty.
    Every circuit carries all the edge scores, so MIB can re-rank if it wants to.
    """
    from reuse_lens.circuits.measure import ranked

    if any(not 0 < p <= 100 for p in percents):
        raise ValueError(f"percents must be in (0, 100], got {list(percents)}")
    order = ranked(scores)
    all_scores = {
        (e.sender.name, e.receiver_name): float(v)
        for e, v in zip(scores.edges, scores.scores.tolist(), strict=True)
    }
    base = {"level": "edge", "method": scores.method, **(metadata or {})}
    out = {}
    for p in percents:
        k = math.floor(p / 100 * len(order) + 1e-9)  # the float p/100·N must not lose an edge
        out[p] = Circuit.from_edges(
            order[:k],  # type: ignore[arg-type]
            scores.shape,
            edge_scores=all_scores,
            metadata={**base, "mib_percent": p},
        )
    return out


def write_submission(
    out: str | Path,
    scores: Mapping[tuple[str, str], EdgeScores],
    *,
    kind: SubmissionKind = "scores",
    file_format: FileFormat = "json",
    d_model: Mapping[str, int] | None = None,
    metadata: Mapping[str, Any] | None = None,
    sign: ScoreSign = MIB_SIGN,
) -> list[Path]:
    """Write a MIB submission folder: one ``{task}_{model}`` folder per (task, model).

    Arguments:
        out: the method's folder (what MIB asks to be uploaded); created if missing.
        scores: edge scores by ``(task, model)`` name; the names make the folder names
            (see ``mib_folder_name``).
        kind: ``scores`` (one ``importances`` file per folder) or ``circuits`` (nine
            circuits at ``MIB_SUBMISSION_PERCENTS``).
        file_format: ``json`` or ``pt`` (EAP-IG's ``Graph.to_pt`` form).
        d_model: each model's width by model name, for MIB's cfg.
        metadata: recorded in every file's ``reuse_lens`` block.
        sign: the scores' sign in the files; MIB's (positive = important) by default.

    Returns:
        The files written, in order.

    Raises:
        ValueError: for an unknown kind or format, or two (task, model) pairs that give
            the same folder name.
    """
    if kind not in ("scores", "circuits"):
        raise ValueError(f"unknown submission kind {kind!r}: choose 'scores' or 'circuits'")
    if file_format not in ("json", "pt"):
        raise ValueError(f"unknown file format {file_format!r}: choose 'json' or 'pt'")
    folders: dict[str, tuple[str, str]] = {}
    for task, model in scores:
        name = mib_folder_name(task, model)
        if name in folders:
            raise ValueError(
                f"{folders[name]} and {(task, model)} would share the folder {name!r}: "
                "give the models or tasks names that differ in letters or digits"
            )
        folders[name] = (task, model)
    root = Path(out)
    written: list[Path] = []
    for name, (task, model) in folders.items():
        edge_scores = scores[(task, model)]
        width = (d_model or {}).get(model)
        info = {**(metadata or {}), "task": task, "model": model}
        if kind == "scores":
            # Every edge in the graph, with its score: MIB thresholds the scores itself.
            everything = submission_circuits(edge_scores, percents=(100,), metadata=info)[100]
            files = {"importances": everything}
        else:
            files = {
                f"circuit_{_percent(p)}pct": c
                for p, c in submission_circuits(edge_scores, metadata=info).items()
            }
        for stem, circuit in files.items():
            path = root / name / f"{stem}.{file_format}"
            if file_format == "json":
                circuit.to_mib_json(path, d_model=width, sign=sign)
            else:
                circuit.to_mib_pt(path, d_model=width, sign=sign)
            written.append(path)
    return written


def _percent(p: float) -> str:
    return f"{p:g}"
