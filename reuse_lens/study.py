"""The main job: circuits of many tasks in a base model and its fine-tunes, compared.

``run_study`` is what ``reuse-lens demo`` runs on the zoo, and what produced the result
tables in docs/results.md. For each task it finds the circuit in the base model by every
method in the config, and in each fine-tuned model on that model's own task; it measures
each circuit's faithfulness against random circuits of the same size, how well methods
agree, how stable each circuit is under resampling, which nodes tasks and models share
(with significance), whether shared circuits do their work elsewhere (cross-task and
cross-model faithfulness, cross-task ablation), and runs Merullo et al.'s intervention.

Finished circuits are saved as JSON as they are found; a study stopped half-way and run
again with the same folder and settings reuses them.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from reuse_lens._io import remove_stale_temporaries
from reuse_lens._validate import check_count, check_out_folder, check_seed, folder_lock
from reuse_lens.circuits.circuit import Circuit, CircuitError
from reuse_lens.circuits.discovery import Method, discover_circuit
from reuse_lens.circuits.measure import (
    CircuitEvaluator,
    FaithfulnessCurve,
    faithfulness_curve,
    random_baseline,
)
from reuse_lens.nodes import Ablation
from reuse_lens.patching.scores import NodeScores
from reuse_lens.tasks.metrics import MetricError

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.overlap import OverlapReport
    from reuse_lens.tasks.task import Task

__all__ = ["StudyConfig", "StudyResult", "run_study", "scores_of"]

logger = logging.getLogger(__name__)

FAITHFUL = 0.8
"""Circuits below this faithfulness are reported as not faithful."""


@dataclass(frozen=True)
class StudyConfig:
    """What a study runs. The defaults are the zoo demo.

    Attributes:
        base: the base model's spec.
        tasks: built-in task names; each gets a circuit in the base model.
        fine_tuned: task name -> spec of a model fine-tuned on that task.
        methods: discovery methods; the first is the primary one, used for overlap.
        n_prompts, seed: the size and seed of every task.
        ablation: how faithfulness ablates everything outside a circuit.
        n_boot: bootstrap resamples for the stability ceiling (0 skips it).
        n_random: random circuits per circuit for the baseline.
    """

    base: str = "zoo:base"
    tasks: tuple[str, ...] = (
        "ioi",
        "colored_objects",
        "entity_tracking",
        "greater_than",
        "induction",
        "sva",
        "gendered_pronoun",
    )
    fine_tuned: Mapping[str, str] = field(
        default_factory=lambda: {
            "ioi": "zoo:ft-ioi",
            "colored_objects": "zoo:ft-colored_objects",
            "entity_tracking": "zoo:ft-entity_tracking",
        }
    )
    methods: tuple[Method, ...] = ("activation", "eap-ig")
    n_prompts: int = 64
    seed: int = 0
    ablation: Ablation = "mean"
    n_boot: int = 5
    n_random: int = 20

    def __post_init__(self) -> None:
        from reuse_lens import tasks
        from reuse_lens.circuits.discovery import METHODS

        if not self.tasks:
            raise ValueError("a study needs at least one task")
        if unknown := [t for t in (*self.tasks, *self.fine_tuned) if t not in tasks.names()]:
            raise ValueError(f"unknown tasks {unknown}: built-in tasks are {tasks.names()}")
        if bad := [m for m in self.methods if m not in METHODS or m == "path"]:
            raise ValueError(
                f"study methods must be among activation, eap, eap-ig (got {bad}); path "
                "circuits come from rl.discover_circuit(method='path') directly"
            )
        if not self.methods:
            raise ValueError("a study needs at least one method")
        check_count(self.n_prompts, "n_prompts")
        check_seed(self.seed)
        check_count(self.n_random, "n_random")
        if check_count(self.n_boot, "n_boot", minimum=0) == 1:
            raise ValueError(
                "n_boot must be 0 (no stability section) or at least 2: stability compares "
                "the circuits of two or more resamples, got 1"
            )


@dataclass
class StudyResult:
    """Everything a study found; ``reuse_lens.report.write`` renders it."""

    config: StudyConfig
    models: dict[str, str]
    evaluations: pd.DataFrame
    circuits: dict[str, Circuit]
    scores: dict[str, NodeScores]
    curves: dict[str, FaithfulnessCurve]
    circuit_table: pd.DataFrame
    method_agreement: pd.DataFrame
    task_overlap: OverlapReport
    model_overlap: dict[str, OverlapReport]
    within_model: dict[str, OverlapReport]
    stability: pd.DataFrame
    cross_task: pd.DataFrame
    cross_model: pd.DataFrame
    cross_ablation: pd.DataFrame
    interventions: list[dict[str, Any]]
    findings: list[str]
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)


def scores_of(circuit: Circuit) -> NodeScores:
    """The node scores a circuit was cut from, as NodeScores (NaN where unscored)."""
    meta = circuit.metadata
    return NodeScores.from_mapping(
        circuit.node_scores,
        circuit.shape,
        clean=float(meta.get("clean_metric", float("nan"))),
        corrupted=float(meta.get("corrupted_metric", float("nan"))),
        method=str(meta.get("method", "unknown")),
        settings=meta.get("settings", {}),
    )


class _Store:
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


def run_study(
    config: StudyConfig | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = True,
) -> StudyResult:
    """Run the whole study; circuits go to ``out/circuits`` as they are found (if given).

    Raises:
        OutputPathError: at once, when ``out`` cannot be written or another run is
            writing to it (the folder is locked for the run).
    """
    config = config or StudyConfig()
    if out is None:
        return _run_study(config, None, progress)
    folder = check_out_folder(out, "out")
    with folder_lock(folder, "out"):
        # Temporaries of writers killed in an earlier run (SIGKILL leaves them behind).
        for place in (folder, folder / "circuits"):
            remove_stale_temporaries(place)
        return _run_study(config, folder, progress)


def _run_study(config: StudyConfig, out: Path | None, progress: bool) -> StudyResult:
    from reuse_lens import tasks as task_lib
    from reuse_lens.models import load_model, weights_digest

    start = time.perf_counter()
    store = _Store(out)
    models: dict[str, TransformerBridge] = {"base": load_model(config.base)}
    specs = {"base": config.base}
    for task_name, spec in config.fine_tuned.items():
        models[f"ft-{task_name}"] = load_model(spec)
        specs[f"ft-{task_name}"] = spec
    # Cached circuits are reused only for the weights they were found in, not for
    # whatever the same spec loads today (a retrained zoo, an overwritten folder).
    digests = {label: weights_digest(model) for label, model in models.items()}
    base = models["base"]
    task_names = list(dict.fromkeys([*config.tasks, *config.fine_tuned]))
    tasks: dict[str, Task] = {
        name: task_lib.load(name, base, n=config.n_prompts, seed=config.seed) for name in task_names
    }
    labelled = [("base", t) for t in config.tasks] + [(f"ft-{t}", t) for t in config.fine_tuned]
    jobs = [(label, t, m) for label, t in labelled for m in config.methods]
    if "ioi" in config.tasks:
        # Each fine-tune's IOI circuit too, to compare IOI with its own task inside it
        # (Merullo et al. compare tasks within one model).
        jobs += [(f"ft-{t}", "ioi", config.methods[0]) for t in config.fine_tuned if t != "ioi"]

    evaluations = _evaluations(models, tasks)
    circuits: dict[str, Circuit] = {}
    skipped: dict[str, str] = {}
    evaluators: dict[tuple[str, str], CircuitEvaluator] = {}

    def evaluator(model_label: str, task_name: str) -> CircuitEvaluator:
        key = (model_label, task_name)
        if key not in evaluators:
            evaluators[key] = CircuitEvaluator(
                models[model_label],
                tasks[task_name],
                ablation=config.ablation,  # type: ignore[arg-type]
            )
        return evaluators[key]

    bar = tqdm(jobs, desc="circuits", disable=not progress)
    for model_label, task_name, method in bar:
        key = f"{model_label}/{task_name}/{method}"
        bar.set_postfix_str(key)
        expected = {
            "model": specs[model_label],
            "weights": digests[model_label],
            "task": task_name,
            "method": method,
            "n_prompts": config.n_prompts,
            "task_seed": config.seed,
        }
        circuit = store.load(key, expected)
        if (
            circuit is None
            or circuit.metadata.get("settings", {}).get("ablation") != config.ablation
        ):
            try:
                circuit = discover_circuit(
                    models[model_label],
                    tasks[task_name],
                    method=method,  # type: ignore[arg-type]
                    ablation=config.ablation,
                )
            except MetricError as error:  # the model does not do this task: say so, go on
                skipped[key] = str(error).split(":")[0] + f" ({model_label} on {task_name})"
                continue
            circuit = circuit.with_metadata(
                corrupted_metric=_corrupted(evaluations, model_label, task_name),
                weights=digests[model_label],
            )
            store.save(key, circuit)
        circuits[key] = circuit

    rows, curves, scores = [], {}, {}
    for key, circuit in tqdm(circuits.items(), desc="faithfulness", disable=not progress):
        model_label, task_name, method = key.split("/")
        ev = evaluator(model_label, task_name)
        scores[key] = scores_of(circuit)
        curves[key] = faithfulness_curve(
            models[model_label], tasks[task_name], scores[key], evaluator=ev
        )
        baseline = random_baseline(
            models[model_label], tasks[task_name], circuit, n=config.n_random,
            seed=config.seed, evaluator=ev,
        )  # fmt: skip
        faith = float(circuit.metadata["faithfulness"])
        rows.append(
            {
                "key": key, "model": model_label, "task": task_name, "method": method,
                "n_nodes": len(circuit), "n_heads": len(circuit.heads),
                "n_mlps": len(circuit.mlps), "n_edges": len(circuit.edges),
                "faithfulness": faith, "random_mean": baseline.mean,
                "random_std": baseline.std, "faithful": faith >= FAITHFUL,
            }
        )  # fmt: skip
    return _compare(
        _Run(config, specs, models, tasks, evaluations, circuits, skipped, scores, curves,
             rows, progress, start)
    )  # fmt: skip


def _evaluations(models: Mapping[str, Any], tasks: Mapping[str, Task]) -> pd.DataFrame:
    import pandas as pd

    from reuse_lens.evaluation import evaluate

    rows = []
    for (label, model), (name, task) in itertools.product(models.items(), tasks.items()):
        scores = evaluate(model, task)
        rows.append(
            {
                "model": label, "task": name, "accuracy": scores["accuracy"],
                "logit_diff": scores["logit_diff"],
                "corrupted_accuracy": scores["corrupted_accuracy"],
                "corrupted_logit_diff": scores["corrupted_logit_diff"],
                "clean_metric": scores["clean_metric"],
                "corrupted_metric": scores["corrupted_metric"],
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


def _corrupted(evaluations: pd.DataFrame, model: str, task: str) -> float:
    for row in evaluations.to_dict(orient="records"):
        if row["model"] == model and row["task"] == task:
            return float(row["corrupted_metric"])
    raise KeyError(f"no evaluation of {model} on {task}")


@dataclass
class _Run:
    """What the discovery stage of a study hands to the comparison stage."""

    config: StudyConfig
    specs: dict[str, str]
    models: dict[str, TransformerBridge]
    tasks: dict[str, Task]
    evaluations: pd.DataFrame
    circuits: dict[str, Circuit]
    skipped: dict[str, str]
    scores: dict[str, NodeScores]
    curves: dict[str, FaithfulnessCurve]
    rows: list[dict[str, Any]]
    progress: bool
    start: float

    def circuit(self, model: str, task: str) -> Circuit | None:
        """The primary method's circuit, if one was found."""
        return self.circuits.get(f"{model}/{task}/{self.config.methods[0]}")


def _agreement(run: _Run) -> pd.DataFrame:
    import pandas as pd

    from reuse_lens.overlap import compare

    rows = []
    pairs = sorted({tuple(k.split("/")[:2]) for k in run.circuits})
    for model_label, task_name in pairs:
        for a, b in itertools.combinations(run.config.methods, 2):
            ka, kb = f"{model_label}/{task_name}/{a}", f"{model_label}/{task_name}/{b}"
            if ka not in run.circuits or kb not in run.circuits:
                continue
            report = compare({a: run.circuits[ka], b: run.circuits[kb]})
            rows.append(
                {
                    "model": model_label, "task": task_name, "method_a": a, "method_b": b,
                    "jaccard": report.jaccard(a, b), "jaccard_heads": report.jaccard(a, b, "heads"),
                    "jaccard_mlps": report.jaccard(a, b, "mlps"),
                }
            )  # fmt: skip
    return pd.DataFrame(rows)


def _stability(run: _Run, task_names: list[str]) -> pd.DataFrame:
    import pandas as pd

    from reuse_lens.reuse import circuit_stability

    config, rows = run.config, []
    if config.n_boot >= 2:
        for task_name in tqdm(task_names, desc="stability", disable=not run.progress):
            try:
                result = circuit_stability(
                    run.models["base"], run.tasks[task_name], method=config.methods[0],
                    n_boot=config.n_boot, seed=config.seed, ablation=config.ablation,
                )  # fmt: skip
            except MetricError:  # a resample on which the model does not separate the task
                rows.append({"task": task_name, "mean_jaccard": math.nan,
                             "std_jaccard": math.nan, "n_boot": 0})  # fmt: skip
                continue
            rows.append(
                {"task": task_name, "mean_jaccard": result.mean_jaccard,
                 "std_jaccard": result.std_jaccard, "n_boot": result.n_boot}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=["task", "mean_jaccard", "std_jaccard", "n_boot"])


def _compare(run: _Run) -> StudyResult:
    import pandas as pd

    from reuse_lens.overlap import compare
    from reuse_lens.reuse import (
        cross_model_faithfulness,
        cross_task_ablation,
        cross_task_faithfulness,
    )

    config, base = run.config, run.models["base"]
    base_circuits = {t: c for t in config.tasks if (c := run.circuit("base", t)) is not None}
    if len(base_circuits) < 2:
        raise MetricError(
            f"only {len(base_circuits)} task(s) had a circuit in {config.base} "
            f"({'; '.join(run.skipped.values()) or 'none skipped'}): overlap needs two"
        )
    stability = _stability(run, list(base_circuits))
    task_overlap = compare(base_circuits)
    if len(stability):
        ceilings = {
            t: v
            for t, v in zip(stability["task"], stability["mean_jaccard"], strict=True)
            if not math.isnan(v)
        }
        task_overlap = task_overlap.with_stability(ceilings)
    model_overlap = {}
    for t in config.fine_tuned:
        pair = {"base": run.circuit("base", t), f"ft-{t}": run.circuit(f"ft-{t}", t)}
        if all(c is not None for c in pair.values()):
            model_overlap[t] = compare(pair)  # type: ignore[arg-type]
    within_model = {}
    for t in config.fine_tuned:
        pair = {"ioi": run.circuit(f"ft-{t}", "ioi"), t: run.circuit(f"ft-{t}", t)}
        if t != "ioi" and all(c is not None for c in pair.values()):
            within_model[f"ft-{t}"] = compare(pair)  # type: ignore[arg-type]
    base_tasks = {t: run.tasks[t] for t in base_circuits}
    ablation = config.ablation
    cross_task = cross_task_faithfulness(base, base_circuits, base_tasks, ablation=ablation)
    tuned = {t: base_circuits[t] for t in config.fine_tuned if t in base_circuits}
    cross_model = cross_model_faithfulness(
        tuned, run.models, {t: run.tasks[t] for t in tuned}, ablation=ablation
    )
    cross_ablation = cross_task_ablation(base, base_circuits, base_tasks, ablation=ablation)
    interventions = _interventions(config, base, run.tasks, task_overlap)
    interventions += _within_model_interventions(run, within_model)
    circuit_table = pd.DataFrame(run.rows)
    findings = [f"No circuit for {key}: {why}." for key, why in run.skipped.items()]
    findings += _findings(circuit_table, task_overlap, model_overlap, cross_model, interventions)
    findings += _within_findings(within_model)
    return StudyResult(
        config=config, models=run.specs, evaluations=run.evaluations, circuits=run.circuits,
        scores=run.scores, curves=run.curves, circuit_table=circuit_table,
        method_agreement=_agreement(run), task_overlap=task_overlap,
        model_overlap=model_overlap, within_model=within_model, stability=stability,
        cross_task=cross_task,
        cross_model=cross_model, cross_ablation=cross_ablation, interventions=interventions,
        findings=findings, seconds=time.perf_counter() - run.start, skipped=run.skipped,
    )  # fmt: skip


def _interventions(
    config: StudyConfig,
    model: TransformerBridge,
    tasks: Mapping[str, Task],
    overlap: OverlapReport,
) -> list[dict[str, Any]]:
    """Merullo et al.'s repair experiment, and the ablation of shared heads with a control."""
    from reuse_lens.interventions import ablate_heads

    out: list[dict[str, Any]] = []
    names = overlap.names
    if "ioi" in names and "colored_objects" in tasks:
        if "colored_objects" in names:
            heads = sorted(overlap.unique("ioi", "colored_objects", "heads"))
            which = "IOI-only heads (in the IOI circuit, not the Colored Objects one)"
        else:  # the model has no Colored Objects circuit: every IOI head is "IOI-only"
            heads = sorted(overlap.circuits["ioi"].heads)
            which = "the IOI circuit's heads (the model has no Colored Objects circuit)"
        if heads:
            out.append(_uniform_attention(model, tasks, heads, "uniform attention", which))
    for a, b in itertools.combinations(names, 2):
        shared = sorted(overlap.shared(a, b, "heads"))
        if not shared:
            continue
        for task_name in (a, b):
            result = ablate_heads(
                model, tasks[task_name], shared, ablation=config.ablation,
                n_random=config.n_random, seed=config.seed,
            )  # fmt: skip
            out.append(
                {
                    "name": "ablate shared heads", "task": task_name, "heads": shared,
                    "description": f"heads shared by {a} and {b} ablated, against "
                    f"{config.n_random} random sets of {len(shared)} heads",
                    **_result_fields(result.result),
                    "random_metric": result.random_metric,
                    "random_metric_std": result.random_metric_std,
                    "percentile": result.percentile,
                }
            )  # fmt: skip
        break  # the first pair with shared heads: the demo's second experiment
    return out


def _within_model_interventions(
    run: _Run, within_model: Mapping[str, OverlapReport]
) -> list[dict[str, Any]]:
    """Merullo et al.'s repair inside a model that has both an IOI and a Colored Objects circuit."""
    out = []
    for label, overlap in within_model.items():
        if "colored_objects" not in overlap.names:
            continue
        heads = sorted(overlap.unique("ioi", "colored_objects", "heads"))
        if heads:
            name, which = f"uniform attention in {label}", f"IOI-only heads of {label}"
            out.append(_uniform_attention(run.models[label], run.tasks, heads, name, which))
    return out


def _uniform_attention(
    model: TransformerBridge, tasks: Mapping[str, Task], heads: list[str], name: str, which: str
) -> dict[str, Any]:
    """One row of Merullo et al.'s repair: ``heads`` attend uniformly over the wrong colours."""
    from reuse_lens.interventions import uniform_attention

    result = uniform_attention(model, tasks["colored_objects"], heads, "wrong")
    return {
        "name": name, "task": "colored_objects", "heads": heads,
        "description": f"{which} attend uniformly over the wrong colours at the answer "
        "position (Merullo et al. 2024)",
        **_result_fields(result),
    }  # fmt: skip


def _within_findings(within_model: Mapping[str, OverlapReport]) -> list[str]:
    return [
        f"Inside {label}, {_sharing(overlap, *overlap.names[:2])}"
        for label, overlap in within_model.items()
    ]


def _sharing(overlap: OverlapReport, a: str, b: str) -> str:
    """The finding that a and b share N heads, with their Jaccard, chance and p-value."""
    shared = sorted(overlap.shared(a, b, "heads"))
    return (
        f"{a} and {b} share {len(shared)} heads ({', '.join(shared) or 'none'}): head Jaccard "
        f"{overlap.jaccard(a, b, 'heads'):.2f}, chance "
        f"{overlap.expected_jaccard(a, b, 'heads'):.2f}, p = {overlap.p_value(a, b, 'heads'):.3g}."
    )


def _result_fields(result: Any) -> dict[str, Any]:
    return {
        "accuracy_before": result.accuracy_before,
        "accuracy_after": result.accuracy_after,
        "metric_before": result.metric_before,
        "metric_after": result.metric_after,
    }


def _findings(
    circuits: pd.DataFrame,
    overlap: OverlapReport,
    model_overlap: Mapping[str, OverlapReport],
    cross_model: pd.DataFrame,
    interventions: list[dict[str, Any]],
) -> list[str]:
    """Plain sentences for the report's summary: what the numbers say, unfaithful ones included."""
    out = []
    weak = [r for r in circuits.to_dict(orient="records") if not r["faithful"]]
    if weak:
        listed = ", ".join(f"{r['key']} ({r['faithfulness']:.2f})" for r in weak)
        out.append(f"Below faithfulness {FAITHFUL}: {listed}. Read their overlap with care.")
    pairs = []
    for a, b in itertools.combinations(overlap.names, 2):
        pairs.append((overlap.jaccard(a, b, "heads"), a, b))
    pairs.sort(key=lambda p: -1 if p[0] != p[0] else -p[0])
    out += [_sharing(overlap, a, b) for _, a, b in pairs[:3]]
    for task_name, report in model_overlap.items():
        a, b = report.names
        out.append(
            f"{task_name}: the base and fine-tuned circuits have node Jaccard "
            f"{report.jaccard(a, b):.2f}; the base circuit keeps faithfulness "
            f"{cross_model.loc[task_name, b]:.2f} inside {b}."
        )
    for item in interventions:
        out.append(
            f"{item['name']} on {item['task']} ({', '.join(item['heads'])}): accuracy "
            f"{item['accuracy_before']:.0%} -> {item['accuracy_after']:.0%}."
        )
    return out


def save_summary(result: StudyResult, path: str | Path) -> None:
    """The study's tables as one JSON file (for docs and for comparing runs)."""
    doc = {
        "config": {**asdict(result.config), "fine_tuned": dict(result.config.fine_tuned)},
        "models": result.models,
        "seconds": result.seconds,
        "evaluations": result.evaluations.to_dict(orient="records"),
        "circuits": result.circuit_table.to_dict(orient="records"),
        "method_agreement": result.method_agreement.to_dict(orient="records"),
        "stability": result.stability.to_dict(orient="records"),
        "task_overlap": json.loads(result.task_overlap.to_json()),
        "within_model": {k: json.loads(r.to_json()) for k, r in result.within_model.items()},
        "cross_task": result.cross_task.to_dict(),
        "cross_model": result.cross_model.to_dict(),
        "cross_ablation": result.cross_ablation.to_dict(),
        "interventions": result.interventions,
        "findings": result.findings,
    }
    from reuse_lens._io import write_text_atomic

    write_text_atomic(path, json.dumps(doc, indent=2, default=float))
