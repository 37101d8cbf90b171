"""``run_study``: a study's units of work planned, run by an executor, then compared.

The study loads its models here (the comparison stage needs them), evaluates each model
on each task, and plans its units: a discovery per (model, task, method) not saved
already, and one per bootstrap resample; then, once the circuits are in, a faithfulness
curve and random baseline per circuit. Results are gathered by key, not by arrival, so
the order an executor finishes them in changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from reuse_lens._io import remove_stale_temporaries
from reuse_lens._progress import hidden_bars
from reuse_lens._validate import check_out_entries, check_out_folder, folder_lock
from reuse_lens.circuits.circuit import Circuit
from reuse_lens.separation import Separation
from reuse_lens.study.compare import StudyRun, compare_circuits
from reuse_lens.study.config import FAITHFUL, StudyConfig
from reuse_lens.study.executors import Executor, executor_named
from reuse_lens.study.result import StudyResult, faithfulness_interval, scores_of
from reuse_lens.study.store import CIRCUITS, WORK, Store
from reuse_lens.study.units import (
    Discover,
    Found,
    Load,
    Measure,
    Measured,
    Models,
    Resample,
    TaskSpec,
    Unit,
)

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.compare.reuse import Stability
    from reuse_lens.tasks.task import Task

__all__ = ["run_study"]

logger = logging.getLogger(__name__)


def run_study(
    config: StudyConfig | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    executor: Executor | str = "local",
) -> StudyResult:
    """Run the whole study; circuits go to ``out/circuits`` as they are found (if given).

    Arguments:
        config: what to run; the zoo demo when None.
        out: the folder for the circuits (and, in ``out/work``, the finished resamples
            and measurements); a study stopped and run again with the same folder and
            settings reuses the work it finished.
        progress: show one progress bar for the whole study, naming the unit in hand.
        executor: ``"local"`` (this process, the default), ``"ray"`` (a Ray cluster; see
            ``RayExecutor`` for the address), or an executor object. Every executor
            writes the same circuit files, byte for byte.

    Raises:
        OutputPathError: at once, when ``out`` cannot be written or another run is
            writing to it (the folder is locked for the run).
        MissingExtraError: at once, for ``executor="ray"`` without Ray installed.
        ConnectionError: at once, when a Ray address is given and nothing answers there.
        ValueError: before the first discovery, for a fine-tune of another shape than
            the base model (the config itself refuses the rest when it is made).
    """
    config = config or StudyConfig()
    if isinstance(executor, str):
        executor = executor_named(executor)
    check = getattr(executor, "check", None)
    if callable(check):  # a cluster that does not answer is refused before any model loads
        check()
    if config.threads is None:  # fixed now, so that every executor's units use the same
        config = dataclasses.replace(config, threads=torch.get_num_threads())
    with _torch_threads(config.threads):
        if out is None:
            return _run_study(config, None, progress, executor)
        folder = check_out_folder(out, "out")
        check_out_entries(folder, folders=(CIRCUITS, WORK), arg="out")
        with folder_lock(folder, "out"):
            # Temporaries of writers killed in an earlier run (SIGKILL leaves them behind).
            for place in (folder, folder / "circuits", folder / WORK):
                remove_stale_temporaries(place)
            return _run_study(config, folder, progress, executor)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with torch on ``n`` CPU threads, then restore the count."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_study(
    config: StudyConfig, out: Path | None, progress: bool, executor: Executor
) -> StudyResult:
    start = time.perf_counter()
    jobs = _jobs(config)
    boot = config.tasks if config.n_boot >= 2 else ()
    edge_jobs = _edge_jobs(config)
    # One bar for the study: loading and evaluating, each discovery, resample and
    # measurement, and the comparisons. A skipped discovery takes its measurement off.
    total = 2 + 2 * len(jobs) + len(edge_jobs) + len(boot) * config.n_boot
    bar = tqdm(total=total, desc="study", disable=not progress)
    with bar:
        driver = _Driver(config, Store(out), executor, bar)
        circuits, skipped, found = driver.find([*jobs, *edge_jobs], boot)
        edge_circuits: dict[str, Circuit] = {}
        point_edges: dict[str, Circuit] = {}
        for key in edge_jobs:
            if key in circuits:
                model_label, task_name, _, _ = _parts(key)
                if model_label == "base":
                    edge_circuits[task_name] = circuits.pop(key)
                else:
                    point_edges[f"{model_label}/{task_name}"] = circuits.pop(key)
        measured = driver.measure(circuits)
        bar.set_postfix_str("comparing circuits")
        run = StudyRun(
            config=config, specs=config.models, models=driver.models, tasks=driver.tasks,
            evaluations=driver.evaluations, circuits=circuits, skipped=skipped,
            scores={key: scores_of(c) for key, c in circuits.items()},
            curves={key: measured[key].curve for key in circuits},
            rows=[_row(key, c, measured[key]) for key, c in circuits.items()],
            stability=_stability(config, boot, found), start=start,
            edge_circuits=edge_circuits, point_edges=point_edges,
            separations=driver.separations,
        )  # fmt: skip
        with hidden_bars():
            result = compare_circuits(run)
        bar.update()
        bar.set_postfix_str("done")
    result.files = tuple(sorted(set(driver.store.written)))
    result.other_files = tuple(driver.store.others())
    if result.other_files:
        shown = ", ".join(result.other_files[:5])
        more = f" and {len(result.other_files) - 5} more" if len(result.other_files) > 5 else ""
        logger.warning(
            "%s/%s also holds %d circuit file(s) that are not part of this study (an earlier "
            "study's, with other tasks, models or methods): %s%s. They are left as they are "
            "and are not in this study's results; remove them, or use a fresh folder",
            out, CIRCUITS, len(result.other_files), shown, more,
        )  # fmt: skip
    return result


class _Driver:
    """The study's own process: its models, its saved circuits, and the units it hands out."""

    def __init__(self, config: StudyConfig, store: Store, executor: Executor, bar: Any) -> None:
        from reuse_lens.models import load_model, weights_digest

        self.config, self.store, self.executor, self.bar = config, store, executor, bar
        self.loads = {label: Load(spec, config.device, config.dtype, config.threads)
                      for label, spec in config.models.items()}  # fmt: skip
        bar.set_postfix_str("loading models")
        with hidden_bars():
            self.models: dict[str, TransformerBridge] = {
                label: load_model(load.spec, device=load.device, dtype=load.dtype)
                for label, load in self.loads.items()
            }
        # A fine-tune of another shape would fail only when its circuit is compared with
        # the base model's, after every discovery: refused here, before any.
        _check_shapes(config, self.models)
        # Cached circuits are reused only for the weights they were found in, not for
        # whatever the same spec loads today (a retrained zoo, an overwritten folder).
        self.digests = {label: weights_digest(model) for label, model in self.models.items()}
        self.here = Models()
        for label, model in self.models.items():
            self.here.add(self.loads[label], model, self.digests[label])
        self.task_specs = {
            name: TaskSpec(name, config.n_prompts, config.seed, self.loads["base"])
            for name in dict.fromkeys([*config.tasks, *config.fine_tuned])
        }
        bar.set_postfix_str("evaluating models")
        with hidden_bars():
            self.tasks = {name: self.here.task(spec) for name, spec in self.task_specs.items()}
            self.evaluations, self.separations = _evaluations(self.models, self.tasks)
        bar.update()

    def refused(self, model_label: str, task_name: str) -> Separation | None:
        """The separation test that ``model_label`` failed on ``task_name``, if it did.

        A discovery would refuse the task with the same test on the same numbers: its
        units, and the resamples of a refused base task, are never run.
        """
        found = self.separations.get(f"{model_label}/{task_name}")
        return None if found is None or found.separates else found

    def find(
        self, jobs: Sequence[str], boot: Sequence[str]
    ) -> tuple[dict[str, Circuit], dict[str, str], dict[str, Found]]:
        """Every circuit (saved ones read back) and resample; what had none, and why."""
        config = self.config
        circuits: dict[str, Circuit] = {}
        units: list[Unit] = []
        refused: list[str] = []
        for key in jobs:
            model_label, task_name, method, level = _parts(key)
            if self.refused(model_label, task_name) is not None:
                refused.append(key)
                self.bar.total -= 2 if level == "node" else 1  # no discovery, no measurement
                continue
            if (circuit := self._saved(key)) is not None:
                circuits[key] = circuit
                self.bar.update()
                continue
            units.append(Discover(key, self.loads[model_label], self.task_specs[task_name],
                                  method, config.ablation, level,
                                  config.memory_budget))  # fmt: skip
        resampled = [t for t in boot if self.refused("base", t) is None]
        self.bar.total -= (len(boot) - len(resampled)) * config.n_boot
        self.bar.refresh()
        for task_name, index in itertools.product(resampled, range(config.n_boot)):
            units.append(Resample(f"stability/{task_name}/{index}", self.loads["base"],
                                  self.task_specs[task_name], config.methods[0],
                                  config.ablation, index, config.memory_budget))  # fmt: skip
        found: dict[str, Found] = {}
        for unit, result in self._run(units):
            assert isinstance(result, Found)
            found[unit.key] = result
            if isinstance(unit, Discover) and result.circuit is not None:
                # Saved at once, so a stopped study keeps every circuit it finished.
                model_label, task_name, _, _ = _parts(unit.key)
                circuit = Circuit.from_json(result.circuit).with_metadata(
                    corrupted_metric=_corrupted(self.evaluations, model_label, task_name),
                    weights=self.digests[model_label],
                )
                self.store.save(unit.key, circuit)
                circuits[unit.key] = circuit
            elif isinstance(unit, Discover) and unit.level == "node":
                self.bar.total -= 1  # no circuit, nothing to measure
                self.bar.refresh()
        skipped: dict[str, str] = {}
        for key in jobs:  # the study's order, whatever the order units finished in
            model_label, task_name, _, level = _parts(key)
            where = f"{model_label} on {task_name}" + (" (edges)" if level == "edge" else "")
            if key in refused:
                test = self.refused(model_label, task_name)
                assert test is not None
                skipped[key] = f"{where} does not do the task: {test.reason()}"
                continue
            result = found.get(key)
            if result is not None and result.skipped is not None:
                skipped[key] = f"{result.skipped} ({where})"
        return {key: circuits[key] for key in jobs if key in circuits}, skipped, found

    def _saved(self, key: str) -> Circuit | None:
        model_label, task_name, method, level = _parts(key)
        expected = {
            "model": self.config.models[model_label], "weights": self.digests[model_label],
            "task": task_name, "method": method, "n_prompts": self.config.n_prompts,
            "task_seed": self.config.seed,
        }  # fmt: skip
        circuit = self.store.load(key, expected)
        if (
            circuit is None
            or circuit.level != level
            or circuit.metadata.get("settings", {}).get("ablation") != self.config.ablation
        ):
            return None
        return circuit

    def measure(self, circuits: Mapping[str, Circuit]) -> dict[str, Measured]:
        """Each circuit's faithfulness curve and random baseline."""
        config = self.config
        units = [
            Measure(key, self.loads[key.split("/")[0]], self.task_specs[key.split("/")[1]],
                    circuit.to_json(), config.ablation, config.n_random, config.seed,
                    config.memory_budget)
            for key, circuit in circuits.items()
        ]  # fmt: skip
        measured: dict[str, Measured] = {}
        for unit, result in self._run(units):
            assert isinstance(result, Measured)
            measured[unit.key] = result
        return measured

    def _run(self, units: Sequence[Unit]) -> Iterator[tuple[Unit, Found | Measured]]:
        """The executor's results, each checked and ticking the study's bar; resamples
        and measurements a stopped run of the study finished are read back instead."""
        by_spec = {self.config.models[label]: d for label, d in self.digests.items()}
        todo: list[Unit] = []
        for unit in units:
            saved = None
            if isinstance(unit, Resample | Measure):
                saved = self.store.done(unit, by_spec[unit.model.spec])
            if saved is None:
                todo.append(unit)
                continue
            self.bar.update()
            yield unit, saved
        if not todo:
            return
        show: Callable[[str], None] = self.bar.set_postfix_str
        for unit, result in self.executor.map(todo, self.here, show):
            # A unit must have run on the weights loaded here (a worker reads its own disk).
            if result.weights != by_spec[unit.model.spec]:
                raise ValueError(
                    f"{unit.key} ran on other weights for {unit.model.spec!r} than this "
                    "machine loaded: every node of the cluster must load the same files for a spec"
                )
            if isinstance(unit, Resample | Measure):
                self.store.keep(unit, result)
            self.bar.update()
            yield unit, result


EDGES = "edges"
"""The first part of an edge circuit's key: ``edges/<task>`` for each base task's EAP-IG edge
circuit, which the study compares edge by edge (``StudyConfig.edge_overlap``), and
``edges/<task>/<model>`` for the task's edge circuit at a point of its fine-tuning run."""


def _edge_jobs(config: StudyConfig) -> list[str]:
    """The key of every edge circuit the study finds: each base task's and, for a task with
    checkpoints, the task's at each checkpoint and in its fine-tune (Wang et al. 2025 follow
    node and edge overlap along the run)."""
    if not config.edge_overlap:
        return []
    from reuse_lens.study.finetune import checkpoint_label

    jobs = [f"{EDGES}/{t}" for t in config.tasks]
    for task, specs in config.checkpoints.items():
        points = [checkpoint_label(task, spec, i) for i, spec in enumerate(specs, 1)]
        jobs += [f"{EDGES}/{task}/{label}" for label in [*points, f"ft-{task}"]]
    return jobs


def _check_shapes(config: StudyConfig, models: Mapping[str, TransformerBridge]) -> None:
    """ValueError unless every fine-tune has its base model's shape, width and vocabulary."""
    from reuse_lens.nodes import shape_of
    from reuse_lens.tasks.task import VocabSignature

    def described(model: TransformerBridge) -> tuple[Any, ...]:
        shape = shape_of(model)
        return (shape, int(model.cfg.d_model), VocabSignature.of(model))

    def text(model: TransformerBridge) -> str:
        shape = shape_of(model)
        mlps = "with MLPs" if shape.has_mlps else "attention-only"
        return (
            f"{shape.n_layers} layers of {shape.n_heads} heads ({mlps}), d_model "
            f"{int(model.cfg.d_model)}, a vocabulary of {int(model.cfg.d_vocab)} tokens"
        )

    base = models["base"]
    for label, model in models.items():
        if label != "base" and described(model) != described(base):
            raise ValueError(
                f"the fine-tuned model {label} ({config.models[label]}) has {text(model)}, but "
                f"the base model {config.base} has {text(base)}"
                f"{'' if text(model) != text(base) else ' and another tokenizer'}: a "
                "fine-tune must keep its base model's shape and tokenizer, so that their "
                "circuits name the same heads; give the model fine-tuned from the base"
            )


def _parts(key: str) -> tuple[str, str, str, str]:
    """A discovery's (model label, task, method, level) from its key."""
    first, *rest = key.split("/")
    if first == EDGES:
        return (rest[1] if len(rest) > 1 else "base"), rest[0], "eap-ig", "edge"
    return first, rest[0], rest[1], "node"


def _jobs(config: StudyConfig) -> list[str]:
    """The key ``model/task/method`` of every circuit the study finds, in its order."""
    labelled = [("base", t) for t in config.tasks] + [(f"ft-{t}", t) for t in config.fine_tuned]
    jobs = [f"{label}/{t}/{m}" for label, t in labelled for m in config.methods]
    if "ioi" in config.tasks:
        # Each fine-tune's IOI circuit too, to compare IOI with its own task inside it
        # (Merullo et al. compare tasks within one model).
        jobs += [f"ft-{t}/ioi/{config.methods[0]}" for t in config.fine_tuned if t != "ioi"]
    from reuse_lens.study.finetune import checkpoint_label

    for task, specs in config.checkpoints.items():
        # The task's circuit at each point of its fine-tuning run (Wang et al. 2025).
        jobs += [
            f"{checkpoint_label(task, spec, i)}/{task}/{config.methods[0]}"
            for i, spec in enumerate(specs, 1)
        ]
    return jobs


def _row(key: str, circuit: Circuit, measured: Measured) -> dict[str, Any]:
    model_label, task_name, method = key.split("/")
    faith = float(circuit.metadata["faithfulness"])
    row = {
        "key": key, "model": model_label, "task": task_name, "method": method,
        "n_nodes": len(circuit), "n_heads": len(circuit.heads),
        "n_mlps": len(circuit.mlps), "n_edges": len(circuit.edges),
        "faithfulness": faith, "random_mean": measured.random_mean,
        "random_std": measured.random_std, "faithful": faith >= FAITHFUL,
    }  # fmt: skip
    return row | faithfulness_interval(circuit)


def _stability(
    config: StudyConfig, boot: Sequence[str], found: Mapping[str, Found]
) -> dict[str, Stability | None]:
    """Each resampled task's Stability, None when a resample had no circuit."""
    from reuse_lens.compare.reuse import stability_of

    out: dict[str, Stability | None] = {}
    for task_name in boot:
        if f"stability/{task_name}/0" not in found:  # a refused task: never resampled
            out[task_name] = None
            continue
        results = [found[f"stability/{task_name}/{i}"] for i in range(config.n_boot)]
        texts = [r.circuit for r in results]
        if any(text is None for text in texts):
            out[task_name] = None
            continue
        circuits = [Circuit.from_json(text) for text in texts if text is not None]
        out[task_name] = stability_of(circuits, config.methods[0])
    return out


def _evaluations(
    models: Mapping[str, Any], tasks: Mapping[str, Task]
) -> tuple[pd.DataFrame, dict[str, Separation]]:
    """Every model on every task: the table, and each pair's separation test by
    ``model/task``."""
    import pandas as pd

    from reuse_lens.evaluation import evaluate

    rows, separations = [], {}
    for (label, model), (name, task) in itertools.product(models.items(), tasks.items()):
        scores = evaluate(model, task)
        test = Separation.of_scores(name, scores)
        separations[f"{label}/{name}"] = test
        rows.append(
            {
                "model": label, "task": name, "accuracy": scores["accuracy"],
                "logit_diff": scores["logit_diff"],
                "corrupted_accuracy": scores["corrupted_accuracy"],
                "corrupted_logit_diff": scores["corrupted_logit_diff"],
                "clean_metric": scores["clean_metric"],
                "corrupted_metric": scores["corrupted_metric"],
                "gap": test.gap, "gap_low": test.low, "gap_high": test.high,
                "effect": test.effect, "does_task": test.separates,
            }
        )  # fmt: skip
    return pd.DataFrame(rows), separations


def _corrupted(evaluations: pd.DataFrame, model: str, task: str) -> float:
    for row in evaluations.to_dict(orient="records"):
        if row["model"] == model and row["task"] == task:
            return float(row["corrupted_metric"])
    raise KeyError(f"no evaluation of {model} on {task}")
