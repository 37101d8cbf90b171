"""A study's units of work: pure inputs in, serialisable results out.

Each unit names what it needs (model specs, a task's name, size and seed, a method, the
ablation) instead of holding loaded objects, so an executor can run it in this process
or in a Ray worker on another machine, which loads the models itself. Results are plain
data (a circuit's JSON text, numbers), and every unit draws its random numbers from its
own identity (the study's seed and, for a resample, its index), never from what ran
before it: the same study gives the same bytes whatever the order or place of its units.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reuse_lens._progress import hidden_bars
from reuse_lens.circuits.discovery import discover_circuit
from reuse_lens.tasks.metrics import MetricError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.circuits.measure import FaithfulnessCurve
    from reuse_lens.nodes import Ablation
    from reuse_lens.tasks.task import Task

__all__ = [
    "Discover",
    "Found",
    "Load",
    "Measure",
    "Measured",
    "Models",
    "Resample",
    "TaskSpec",
    "Unit",
    "run_in_worker",
    "run_unit",
]


@dataclass(frozen=True)
class Load:
    """How to load one model: ``rl.load_model(spec, device=device, dtype=dtype)``, and
    the torch threads a unit on it runs with (None: leave the process's count)."""

    spec: str
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: ``rl.tasks.load(name, <written_for's model>, n=n, seed=seed)``.

    A study writes every task for its base model's tokenizer, also when a fine-tune runs
    it; ``written_for`` says which model that is.
    """

    name: str
    n: int
    seed: int
    written_for: Load


class Models:
    """The models and tasks one process has loaded, by what loads them.

    A Ray worker keeps one of these for its lifetime, so units of the same model that
    land on it load the model once. It holds at most ``keep`` models besides those
    pinned with ``add`` (the driver's own, for the local executor): a unit needs two at
    most (its model, and the base model for its task's tokenizer), and a worker that
    kept every model of a study of 8B models would run out of memory.
    """

    def __init__(self, keep: int = 2, *, visible_gpu: bool = False) -> None:
        self._keep = keep
        # On Ray a GPU unit sees only the GPU it was given, as cuda:0.
        self._visible_gpu = visible_gpu
        self._pinned: dict[Load, tuple[TransformerBridge, str]] = {}
        self._loaded: OrderedDict[Load, tuple[TransformerBridge, str | None]] = OrderedDict()
        self._tasks: dict[TaskSpec, Task] = {}

    def add(self, load: Load, model: TransformerBridge, digest: str) -> None:
        """Pin a model this process has loaded already, with its weights digest."""
        self._pinned[load] = (model, digest)

    def model(self, load: Load) -> TransformerBridge:
        if load in self._pinned:
            return self._pinned[load][0]
        if load not in self._loaded:
            from reuse_lens.models import load_model

            device = load.device
            if self._visible_gpu and device is not None and device.startswith("cuda"):
                device = "cuda"
            while len(self._loaded) >= self._keep:
                self._loaded.popitem(last=False)
            self._loaded[load] = (load_model(load.spec, device=device, dtype=load.dtype), None)
        self._loaded.move_to_end(load)
        return self._loaded[load][0]

    def digest(self, load: Load) -> str:
        """The weights digest of the model ``load`` loads here (computed once)."""
        if load in self._pinned:
            return self._pinned[load][1]
        from reuse_lens.models import weights_digest

        model = self.model(load)
        known = self._loaded[load][1]
        if known is None:
            known = weights_digest(model)
            self._loaded[load] = (model, known)
        return known

    def task(self, spec: TaskSpec) -> Task:
        if spec not in self._tasks:
            from reuse_lens import tasks

            model = self.model(spec.written_for)
            self._tasks[spec] = tasks.load(spec.name, model, n=spec.n, seed=spec.seed)
        return self._tasks[spec]


@dataclass(frozen=True)
class Found:
    """A discovery's result: the circuit's JSON text, or why there is none.

    Attributes:
        key: the unit's key.
        circuit: the circuit as ``Circuit.to_json`` writes it; None when skipped.
        skipped: the MetricError's first sentence (what failed, with its numbers).
        weights: the weights digest of the model it was found in.
    """

    key: str
    circuit: str | None
    skipped: str | None
    weights: str


@dataclass(frozen=True)
class Measured:
    """A circuit's faithfulness curve and its random baseline (mean, std)."""

    key: str
    curve: FaithfulnessCurve
    random_mean: float
    random_std: float
    weights: str


@dataclass(frozen=True)
class Discover:
    """Find one circuit: ``discover_circuit(model, task, method=..., ablation=..., level=...)``."""

    key: str
    model: Load
    task: TaskSpec
    method: str
    ablation: Ablation
    level: str = "node"
    memory_budget: int | str | None = None

    def run(self, models: Models) -> Found:
        return _discover(
            self.key, models, self.model, self.task, self.method, self.ablation,
            level=self.level, memory_budget=self.memory_budget,
        )  # fmt: skip


@dataclass(frozen=True)
class Resample:
    """Find the circuit of bootstrap resample ``index`` of a task (stability)."""

    key: str
    model: Load
    task: TaskSpec
    method: str
    ablation: Ablation
    index: int
    memory_budget: int | str | None = None

    def run(self, models: Models) -> Found:
        from reuse_lens.compare.reuse import bootstrap_sample

        return _discover(
            self.key, models, self.model, self.task, self.method, self.ablation,
            sample=lambda n: bootstrap_sample(n, self.task.seed, self.index),
            memory_budget=self.memory_budget,
        )  # fmt: skip


@dataclass(frozen=True)
class Measure:
    """A circuit's faithfulness curve and the faithfulness of random circuits of its size.

    The random circuits are seeded with the study's seed, as ``random_baseline`` is.
    """

    key: str
    model: Load
    task: TaskSpec
    circuit: str
    ablation: Ablation
    n_random: int
    seed: int
    memory_budget: int | str | None = None

    def run(self, models: Models) -> Measured:
        from reuse_lens.circuits.circuit import Circuit
        from reuse_lens.circuits.measure import (
            CircuitEvaluator,
            faithfulness_curve,
            random_baseline,
        )
        from reuse_lens.study.result import scores_of

        model, task = models.model(self.model), models.task(self.task)
        circuit = Circuit.from_json(self.circuit)
        evaluator = CircuitEvaluator(
            model,
            task,
            ablation=self.ablation,
            memory_budget=self.memory_budget,
        )
        curve = faithfulness_curve(model, task, scores_of(circuit), evaluator=evaluator)
        baseline = random_baseline(
            model, task, circuit, n=self.n_random, seed=self.seed, evaluator=evaluator
        )
        return Measured(self.key, curve, baseline.mean, baseline.std, models.digest(self.model))


Unit = Discover | Resample | Measure
"""Any unit of work; ``unit.run(models)`` runs it, ``unit.key`` names it."""


def _discover(
    key: str,
    models: Models,
    load: Load,
    spec: TaskSpec,
    method: str,
    ablation: Ablation,
    *,
    sample: Any = None,
    level: str = "node",
    memory_budget: int | str | None = None,
) -> Found:
    model, task = models.model(load), models.task(spec)
    if sample is not None:
        task = task.select(sample(len(task)))
    try:
        circuit = discover_circuit(
            model, task, method=method, ablation=ablation, level=level,  # type: ignore[arg-type]
            memory_budget=memory_budget,
        )  # fmt: skip
    except MetricError as error:  # the model does not do this task: say so, go on
        # The first sentence: what failed, with its numbers; the advice that follows is
        # the same for every key.
        return Found(key, None, str(error).split(". ")[0], models.digest(load))
    return Found(key, circuit.to_json(), None, models.digest(load))


def run_unit(unit: Unit, models: Models) -> Found | Measured:
    """Run ``unit`` on ``models``, its own progress bars hidden: a study shows one bar for
    all its work, and the transient bars of each patching run under it would redraw the
    terminal dozens of times a second (and, on Ray, flood the driver's log)."""
    with hidden_bars():
        return unit.run(models)


_WORKER_MODELS: Models | None = None


def run_in_worker(unit: Unit) -> Found | Measured:
    """Run ``unit`` with this process's own models: what a Ray task calls.

    The models stay loaded between the units a worker process runs.
    """
    import torch

    global _WORKER_MODELS
    if _WORKER_MODELS is None:
        _WORKER_MODELS = Models(visible_gpu=True)
    if unit.model.threads is not None:
        torch.set_num_threads(unit.model.threads)
    return run_unit(unit, _WORKER_MODELS)
