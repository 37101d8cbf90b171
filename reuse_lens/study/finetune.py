"""A study's fine-tuning analysis: what each fine-tune changed, and what its new circuit reuses.

For each fine-tuned model (``StudyConfig.fine_tuned``: task -> model trained on it) the
comparison stage asks four questions, with the numbers behind each answer:

- **Did fine-tuning teach something new?** The base's held-out accuracy on the task
  before (a new skill starts below ``NEW_SKILL``) and the fine-tune's after.
- **What did it change?** ``component_drift``: every head's and MLP's weight and output
  change on the task, whether MLPs changed more than heads, and whether the fine-tune's
  circuit changed more than the other nodes of its kind.
- **Which changes carry the gain?** Cross-model activation patching (Prakash et al.
  2024): each node's fine-tuned output patched into the base, as a share of the gain; and
  the share the whole circuit carries at once.
- **What does the new circuit reuse?** Its overlap with each base task's circuit in the
  base model, heads only, against the hypergeometric null over the base's heads, Holm-
  corrected over those pairs (Merullo et al. 2024); whether each base task's circuit stays
  faithful inside the fine-tune (Prakash et al. 2024); and, with checkpoints, how the
  circuit forms along the run (Wang et al. 2025).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reuse_lens.compare._stats import adjust_p_values
from reuse_lens.tasks.metrics import MetricError

if TYPE_CHECKING:
    import pandas as pd

    from reuse_lens.circuits.circuit import Circuit
    from reuse_lens.compare.drift import DriftReport
    from reuse_lens.patching.scores import NodeScores
    from reuse_lens.study.compare import StudyRun

__all__ = ["NEW_SKILL", "FineTuneAnalysis", "analyse_fine_tunes", "checkpoint_label", "claims"]

logger = logging.getLogger(__name__)

NEW_SKILL = 0.6
"""A fine-tune teaches a new skill when the base's held-out accuracy on its task is below this."""
TOP_CHANGED = 5
"""How many most-changed nodes the sentences and tables name."""


def checkpoint_label(task: str, spec: str, index: int) -> str:
    """A checkpoint's model label in a study: ``ft-<task>@<step>`` when the spec ends in
    ``@<step>`` (the zoo's checkpoints), else ``ft-<task>@<index>`` (1-based)."""
    found = re.search(r"@(\d+)$", spec)
    return f"ft-{task}@{found.group(1) if found else index}"


@dataclass
class FineTuneAnalysis:
    """What one fine-tune changed, and what its task's circuit reuses.

    Attributes:
        label / task: the fine-tune's label in the study (``ft-<task>``) and its task.
        accuracy_before / accuracy_after: held-out accuracy on the task, base and fine-tune.
        drift: per-node weight and output change on the task (``component_drift``).
        cmap: each node's share of the gain (cross-model patching, its fine-tuned output
            into the base), or None with ``cmap_reason`` when there is no gain beyond
            chance to share.
        cmap_reverse: each node's base output into the fine-tune: the share of the gain
            its reverting takes away (what the fine-tune's readout needs of the node).
        circuit_recovery: the share of the gain the fine-tune's circuit carries at once.
        all_recovery: the share every head and MLP carries at once; what it leaves is in
            the weights no node holds (embeddings, unembedding, norms).
        weight_recovery: the share each of those (``"embed"``, ``"unembed"``, ``"norms"``)
            carries alone, the fine-tune's copy swapped into the base; ``"nodes+unembed"``:
            every head and MLP together with the unembedding (the gain may need both).
        reuse: one row per base task with a circuit: the heads the fine-tune's circuit
            shares with it, head Jaccard, its chance level, p-value and Holm-adjusted p.
        survival: faithfulness of each base task's circuit in the base and inside the
            fine-tune, on its own task.
        trajectory: one row per point of the run (base, checkpoints, fine-tune): accuracy,
            circuit size and faithfulness, Jaccard with the final circuit and, per base
            task, head Jaccard with the base's circuit.
    """

    label: str
    task: str
    accuracy_before: float
    accuracy_after: float
    drift: DriftReport
    cmap: NodeScores | None
    cmap_reason: str | None
    circuit: frozenset[str] | None
    circuit_recovery: float | None
    reuse: pd.DataFrame
    survival: pd.DataFrame
    trajectory: pd.DataFrame | None = None
    cmap_reverse: NodeScores | None = None
    all_recovery: float | None = None
    weight_recovery: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def new_skill(self) -> bool:
        return self.accuracy_before < NEW_SKILL

    def changed_in_circuit(self, k: int = TOP_CHANGED) -> tuple[list[str], list[str]]:
        """The ``k`` nodes whose weights changed most, and those of them in the circuit."""
        top = self.drift.most_changed(k)
        return top, [n for n in top if self.circuit is not None and n in self.circuit]

    def _needs_both(self) -> bool:
        """Whether neither the nodes' outputs nor the unembedding carry the gain alone, but
        together they do (a skill whose answer tokens the base never had to predict)."""
        both = self.weight_recovery.get("nodes+unembed")
        if both is None or self.all_recovery is None:
            return False
        return max(self.all_recovery, self.weight_recovery.get("unembed", 0.0)) < 0.5 <= both

    def headline(self) -> str:
        """One sentence for the report's opening answer."""
        if self.new_skill:
            head = (
                f"{self.label} learnt {self.task} (accuracy {self.accuracy_before:.2f} -> "
                f"{self.accuracy_after:.2f})"
            )
        else:
            head = (
                f"{self.label} was fine-tuned on {self.task}, which the base already did "
                f"(accuracy {self.accuracy_before:.2f} -> {self.accuracy_after:.2f})"
            )
        parts = []
        if self.circuit is not None and len(self.reuse):
            rows = self.reuse.to_dict(orient="records")
            reused = [r for r in rows if r["p_adjusted"] <= 0.05]
            parts.append(
                "its circuit reuses the heads of the base's "
                + ", ".join(
                    f"{r['base_task']} circuit (Holm p = {r['p_adjusted']:.2g})" for r in reused
                )
                if reused
                else "its circuit shares no more heads with any base task's circuit than chance "
                "(Holm-corrected)"
            )
            parts[-1] += self._later_clause(rows)
        test = self.drift.test("mlps_vs_heads")
        if test is not None and math.isfinite(test.p_adjusted):
            parts.append(
                "fine-tuning changed MLPs "
                + (
                    "more than"
                    if test.p_adjusted <= 0.05 and test.difference > 0
                    else "no more than"
                )
                + f" heads (Holm p = {test.p_adjusted:.2g})"
            )
        if self.circuit_recovery is not None and self.all_recovery is not None:
            parts.append(
                f"patched into the base, its circuit carries {self.circuit_recovery:.0%} of "
                f"the gain and every head and MLP together {self.all_recovery:.0%}"
                + (
                    f"; the gain needs both its new node outputs and its new unembedding "
                    f"(the unembedding alone {self.weight_recovery['unembed']:.0%}, with every "
                    f"head and MLP {self.weight_recovery['nodes+unembed']:.0%})"
                    if self._needs_both()
                    else ""
                )
            )
        return head + ("; " + "; ".join(parts) if parts else "") + "."

    def sentences(self) -> list[str]:
        """The fine-tune's answer, generated from the numbers."""
        out = []
        learnt = (
            f"{self.label} learnt {self.task} (held-out accuracy {self.accuracy_before:.2f} in "
            f"the base, {self.accuracy_after:.2f} after fine-tuning)"
            if self.new_skill
            else f"{self.label} was fine-tuned on {self.task}, which the base already did "
            f"(accuracy {self.accuracy_before:.2f} -> {self.accuracy_after:.2f})"
        )
        if self.circuit is None:
            out.append(learnt + ", but no circuit was found for it in the fine-tune.")
        else:
            rows = self.reuse.to_dict(orient="records")
            significant = [r for r in rows if r["p_adjusted"] <= 0.05]
            if significant:
                parts = [
                    f"{r['base_task']} ({r['shared']} heads: {r['heads']}; Holm p = "
                    f"{r['p_adjusted']:.2g})"
                    for r in significant
                ]
                reuse = "its circuit reuses heads of the base's " + ", ".join(parts)
            elif rows:
                best = min(rows, key=lambda r: r["p_value"])
                reuse = (
                    "its circuit's head overlap with no base task's circuit survives Holm "
                    f"correction (closest: {best['base_task']}, {best['shared']} shared heads, "
                    f"p = {best['p_value']:.2g}, Holm {best['p_adjusted']:.2g})"
                )
            else:
                reuse = "the base has no circuit of another task to compare with"
            out.append(f"{learnt}; {reuse}{self._later_clause(rows)}.")
        top, inside = self.changed_in_circuit()
        drift_test = self.drift.test("mlps_vs_heads")
        where = f"The nodes whose weights changed most are {', '.join(top)}" + (
            f"; {len(inside)} of them ({', '.join(inside)}) are in its circuit"
            if self.circuit is not None
            else ""
        )
        if drift_test is not None and math.isfinite(drift_test.p_adjusted):
            verdict = "more" if drift_test.p_adjusted <= 0.05 else "not significantly more"
            where += (
                f"; MLPs changed {verdict} than heads (mean {drift_test.mean_group:.1%} vs "
                f"{drift_test.mean_rest:.1%}, permutation p = {drift_test.p_value:.2g}, "
                f"Holm {drift_test.p_adjusted:.2g})"
            )
        out.append(where + ".")
        if self.cmap is not None:
            out.append(self._cmap_sentence())
        elif self.cmap_reason:
            out.append(f"Cross-model patching: {self.cmap_reason}")
        if len(self.survival):
            kept = [
                f"{r['task']} {r['inside']:.2f}"
                for r in self.survival.to_dict(orient="records")
                if r["task"] != self.task
            ]
            if kept:
                out.append(
                    "The base tasks' circuits keep faithfulness inside it: " + ", ".join(kept) + "."
                )
        return out

    @staticmethod
    def _later_clause(rows: list[dict[str, Any]]) -> str:
        """Which reuse holds over the heads after layer 0, where that differs."""
        if not rows or any(math.isnan(r.get("p_later_adjusted", math.nan)) for r in rows):
            return ""
        whole = {r["base_task"] for r in rows if r["p_adjusted"] <= 0.05}
        later = [r for r in rows if r["p_later_adjusted"] <= 0.05]
        if {r["base_task"] for r in later} == whole:
            return ""
        if not later:
            return "; over the heads after layer 0 no base task's circuit's overlap survives"
        listed = ", ".join(
            f"{r['base_task']} ({r['shared_later']} heads, Holm p = {r['p_later_adjusted']:.2g})"
            for r in later
        )
        return f"; over the heads after layer 0 only, it reuses those of {listed}"

    def _cmap_sentence(self) -> str:
        assert self.cmap is not None
        ranked = sorted(self.cmap.as_dict().items(), key=lambda kv: -kv[1])[:3]
        text = "Patched one at a time from the fine-tune into the base, " + ", ".join(
            f"{n} recovers {v:.0%}" for n, v in ranked
        )
        text += " of the gain"
        if self.circuit_recovery is not None:
            text += f"; its whole circuit at once {self.circuit_recovery:.0%}"
        if self.all_recovery is not None:
            text += f"; every head and MLP at once {self.all_recovery:.0%}"
        if self.weight_recovery:
            names = {"unembed": "unembedding", "embed": "token embeddings", "norms": "norms"}
            text += "; swapped into the base alone, its " + ", its ".join(
                f"{names[k]} {v:.0%}" for k, v in self.weight_recovery.items() if k in names
            )
            both = self.weight_recovery.get("nodes+unembed")
            if both is not None:
                text += f"; every head and MLP together with its unembedding {both:.0%}"
                if self._needs_both():
                    text += " (the gain needs the new node outputs and the new readout together)"
        elif self.all_recovery is not None and self.all_recovery < 0.5:
            # On the hook engine no weight can be swapped: say where the change is instead.
            embed = self.drift.model.get("embed", math.nan)
            heads = max(
                (float(r["weight"]) for r in self.drift.rows if r["kind"] == "head"),
                default=math.nan,
            )
            if math.isfinite(embed):
                text += (
                    ", so most of the gain lies in weights no node holds (the token "
                    f"embeddings changed {embed:.1%}, the most changed head {heads:.1%})"
                )
        if self.cmap_reverse is not None:
            # base_into_tuned: a positive share moves the fine-tune back towards the base,
            # so the largest shares are the nodes whose change carries the gain.
            lost = sorted(self.cmap_reverse.as_dict().items(), key=lambda kv: -kv[1])[:3]
            text += (
                ". Reverted one at a time to the base inside the fine-tune, "
                + ", ".join(f"{n} takes away {v:.0%}" for n, v in lost)
                + " of the gain"
            )
        return text + "."

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types for summary.json."""
        from reuse_lens.compare._stats import plain

        return plain(
            {
                "label": self.label,
                "task": self.task,
                "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after,
                "new_skill": self.new_skill,
                "drift": self.drift.to_dict(),
                "cmap": None if self.cmap is None else self.cmap.as_dict(),
                "cmap_reason": self.cmap_reason,
                "circuit": None if self.circuit is None else sorted(self.circuit),
                "circuit_recovery": self.circuit_recovery,
                "all_recovery": self.all_recovery,
                "weight_recovery": self.weight_recovery,
                "cmap_reverse": None if self.cmap_reverse is None else self.cmap_reverse.as_dict(),
                "reuse": self.reuse.to_dict(orient="records"),
                "survival": self.survival.to_dict(orient="records"),
                "trajectory": None
                if self.trajectory is None
                else self.trajectory.to_dict(orient="records"),
                "sentences": self.sentences(),
            }
        )


def analyse_fine_tunes(
    run: StudyRun, base_circuits: Mapping[str, Circuit]
) -> dict[str, FineTuneAnalysis]:
    """Each fine-tune's analysis, keyed by its label (``ft-<task>``)."""
    out = {}
    for task in run.config.fine_tuned:
        label = f"ft-{task}"
        out[label] = _analyse(run, label, task, base_circuits)
    return out


def _accuracy(run: StudyRun, model: str, task: str) -> float:
    for row in run.evaluations.to_dict(orient="records"):
        if row["model"] == model and row["task"] == task:
            return float(row["accuracy"])
    return math.nan


def _analyse(
    run: StudyRun, label: str, task: str, base_circuits: Mapping[str, Circuit]
) -> FineTuneAnalysis:
    from reuse_lens.compare.cross_model import cross_model_patching, cross_model_recovery
    from reuse_lens.compare.drift import component_drift

    config = run.config
    base, tuned = run.models["base"], run.models[label]
    circuit = run.circuit(label, task)
    budget = config.memory_budget
    drift = component_drift(
        base, tuned, run.tasks[task], circuit=circuit, seed=config.seed, memory_budget=budget
    )
    cmap = reverse = reason = recovery = every = None
    swapped: dict[str, float] = {}
    task_obj = run.tasks[task]
    try:
        cmap = cross_model_patching(base, tuned, task_obj, memory_budget=budget)
        reverse = cross_model_patching(
            base, tuned, task_obj, direction="base_into_tuned", memory_budget=budget
        )
        nodes = [node.name for node in drift.shape.nodes()]
        every = cross_model_recovery(base, tuned, task_obj, nodes, memory_budget=budget)
        if cmap.settings["engine"] == "functional":
            # Weights no node holds can be swapped on the functional engine only; the gain
            # may need the fine-tune's nodes and its readout together.
            swapped = {
                name: cross_model_recovery(
                    base, tuned, task_obj, [], weights=[name], memory_budget=budget
                )
                for name in ("unembed", "embed", "norms")
            }
            swapped["nodes+unembed"] = cross_model_recovery(
                base, tuned, task_obj, nodes, weights=["unembed"], memory_budget=budget
            )
        if circuit is not None:
            recovery = cross_model_recovery(
                base, tuned, task_obj, sorted(circuit.nodes), memory_budget=budget
            )
    except MetricError as error:
        reason = str(error)
    others = {t: c for t, c in base_circuits.items() if t != task}
    return FineTuneAnalysis(
        label=label,
        task=task,
        accuracy_before=_accuracy(run, "base", task),
        accuracy_after=_accuracy(run, label, task),
        drift=drift,
        cmap=cmap,
        cmap_reason=reason,
        circuit=None if circuit is None else frozenset(circuit.nodes),
        circuit_recovery=recovery,
        cmap_reverse=reverse,
        all_recovery=every,
        weight_recovery=swapped,
        reuse=_reuse(circuit, others),
        survival=_survival(run, label, base_circuits),
        trajectory=_trajectory(run, label, task, circuit, others),
    )


def _reuse(circuit: Circuit | None, base_circuits: Mapping[str, Circuit]) -> pd.DataFrame:
    """The fine-tune's circuit against each base task's circuit: heads, hypergeometric null
    over the model's heads, Holm over these pairs only; and the same over the heads after
    layer 0 (``*_later``), whose heads many circuits hold whatever their task."""
    import pandas as pd

    from reuse_lens.compare.overlap import compare, compare_after_layer_0

    columns = [
        "base_task",
        "shared",
        "heads",
        "jaccard",
        "expected_jaccard",
        "p_value",
        "p_adjusted",
        "shared_later",
        "p_later",
        "p_later_adjusted",
    ]
    if circuit is None or not base_circuits:
        return pd.DataFrame(columns=columns)
    rows = []
    for name, other in base_circuits.items():
        report = compare({"new": circuit, name: other})
        shared = sorted(report.shared("new", name, "heads"))
        row = {
            "base_task": name,
            "shared": len(shared),
            "heads": ", ".join(shared) or "none",
            "jaccard": report.jaccard("new", name, "heads"),
            "expected_jaccard": report.expected_jaccard("new", name, "heads"),
            "p_value": report.p_value("new", name, "heads"),
            "shared_later": math.nan,
            "p_later": math.nan,
        }
        if circuit.shape.n_layers >= 2:
            rest = compare_after_layer_0({"new": circuit, name: other})
            row["shared_later"] = len(rest.shared("new", name, "heads"))
            row["p_later"] = rest.p_value("new", name, "heads")
        rows.append(row)
    for key in ("p_value", "p_later"):
        values = [r[key] for r in rows]
        adjusted = (
            adjust_p_values(values, "holm")
            if not any(math.isnan(v) for v in values)
            else [math.nan] * len(rows)
        )
        target = "p_adjusted" if key == "p_value" else "p_later_adjusted"
        for row, p in zip(rows, adjusted, strict=True):
            row[target] = p
    return pd.DataFrame(rows, columns=columns)


def _survival(run: StudyRun, label: str, base_circuits: Mapping[str, Circuit]) -> pd.DataFrame:
    """Each base task's circuit, faithfulness in the base and inside the fine-tune."""
    import pandas as pd

    from reuse_lens.compare.reuse import cross_model_faithfulness

    columns = ["task", "base", "inside"]
    if not base_circuits:
        return pd.DataFrame(columns=columns)
    table = cross_model_faithfulness(
        base_circuits,
        {"base": run.models["base"], label: run.models[label]},
        {t: run.tasks[t] for t in base_circuits},
        ablation=run.config.ablation,
        memory_budget=run.config.memory_budget,
    )
    return pd.DataFrame(
        [
            {"task": t, "base": float(table.loc[t, "base"]), "inside": float(table.loc[t, label])}
            for t in base_circuits
        ],
        columns=columns,
    )


def _jaccard(a: frozenset[Any], b: frozenset[Any]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else math.nan


def _trajectory(
    run: StudyRun,
    label: str,
    task: str,
    final: Circuit | None,
    base_circuits: Mapping[str, Circuit],
) -> pd.DataFrame | None:
    """The run's points in order: the base (step 0), each checkpoint, the fine-tune."""
    import pandas as pd

    specs = run.config.checkpoints.get(task, ())
    if not specs:
        return None
    points = [("base", "base")] + [
        (checkpoint_label(task, spec, i), spec) for i, spec in enumerate(specs, 1)
    ]
    points.append((label, run.config.fine_tuned[task]))
    final_nodes = None if final is None else frozenset(final.nodes)
    final_edges = _edges(run.point_edges.get(f"{label}/{task}"))
    base_edges = {t: _edges(c) for t, c in run.edge_circuits.items() if t in base_circuits}
    rows = []
    faith = {row["key"]: row["faithfulness"] for row in run.rows}
    for point, spec in points:
        circuit = run.circuit(point, task)
        nodes = None if circuit is None else frozenset(circuit.nodes)
        heads = None if circuit is None else frozenset(circuit.heads)
        row: dict[str, Any] = {
            "point": point,
            "model": spec,
            "accuracy": _accuracy(run, point, task),
            "n_nodes": math.nan if nodes is None else len(nodes),
            "faithfulness": faith.get(f"{point}/{task}/{run.config.methods[0]}", math.nan),
            "jaccard_final": _jaccard_or_nan(nodes, final_nodes),
        }
        for name, other in base_circuits.items():
            row[f"heads_jaccard_{name}"] = _jaccard_or_nan(heads, frozenset(other.heads))
        if run.config.edge_overlap:
            # Edge circuits (EAP-IG) of the same points, against the final one and the
            # base tasks' edge circuits: a shared head can be wired in differently.
            edges = _edges(run.point_edges.get(f"{point}/{task}"))
            row["n_edges"] = math.nan if edges is None else len(edges)
            row["edge_jaccard_final"] = _jaccard_or_nan(edges, final_edges)
            for name, other_edges in base_edges.items():
                row[f"edges_jaccard_{name}"] = _jaccard_or_nan(edges, other_edges)
        rows.append(row)
    return pd.DataFrame(rows)


def _edges(circuit: Circuit | None) -> frozenset[Any] | None:
    return None if circuit is None else frozenset(circuit.edges)


def _jaccard_or_nan(a: frozenset[Any] | None, b: frozenset[Any] | None) -> float:
    """Jaccard of two sets; NaN where either point had no circuit (it did not do the task)."""
    return math.nan if a is None or b is None else _jaccard(a, b)


def claims(
    analyses: Mapping[str, FineTuneAnalysis], base_circuits: Mapping[str, Circuit]
) -> list[str]:
    """The two claims of the fine-tuning literature, tested on this study's fine-tunes.

    *Heads are reused more than MLPs*: of the nodes in the fine-tunes' circuits, is a head
    more often in some base task's circuit than an MLP is (Fisher's exact test, one-sided)?
    *Fine-tuning modifies MLPs more than heads*: each fine-tune's permutation test.
    """
    from scipy.stats import fisher_exact

    out = []
    in_base = (
        frozenset().union(*(c.nodes for c in base_circuits.values()))
        if base_circuits
        else frozenset()
    )
    counts = {"heads": [0, 0], "mlps": [0, 0]}  # [reused, not reused]
    for analysis in analyses.values():
        if analysis.circuit is None:
            continue
        for node in analysis.circuit:
            kind = "mlps" if node.startswith("m") else "heads"
            counts[kind][0 if node in in_base else 1] += 1
    h, m = counts["heads"], counts["mlps"]
    if sum(h) and sum(m):
        result: Any = fisher_exact([h, m], alternative="greater")
        p = float(result.pvalue)
        rate_h, rate_m = h[0] / sum(h), m[0] / sum(m)
        verdict = "supported" if p <= 0.05 else "not supported at 0.05"
        out.append(
            f"Heads are reused more than MLPs: {verdict}. Of the fine-tunes' circuit nodes, "
            f"{h[0]} of {sum(h)} heads ({rate_h:.0%}) and {m[0]} of {sum(m)} MLPs "
            f"({rate_m:.0%}) are also in a base task's circuit (Fisher's exact test, "
            f"one-sided, p = {p:.2g})."
        )
    else:
        out.append(
            "Heads are reused more than MLPs: not testable here (the fine-tunes' circuits "
            "hold no " + ("heads" if not sum(h) else "MLPs") + ")."
        )
    tested = [a for a in analyses.values() if a.drift.test("mlps_vs_heads") is not None]
    if tested:
        parts = []
        supported = 0
        for a in tested:
            t = a.drift.test("mlps_vs_heads")
            assert t is not None
            supported += t.p_adjusted <= 0.05 and t.difference > 0
            parts.append(
                f"{a.label}: MLPs {t.mean_group:.1%} vs heads {t.mean_rest:.1%}, "
                f"Holm p = {t.p_adjusted:.2g}"
            )
        out.append(
            f"Fine-tuning modifies MLPs more than heads: supported in {supported} of "
            f"{len(tested)} fine-tunes (relative weight change; " + "; ".join(parts) + ")."
        )
    return out
