"""What a study runs: ``StudyConfig``, checked when it is made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reuse_lens._validate import check_count, check_seed
from reuse_lens.circuits.discovery import Method
from reuse_lens.nodes import Ablation

__all__ = ["FAITHFUL", "WIDE_FINE_TUNES", "WIDE_TASKS", "StudyConfig", "wide_demo_config"]

FAITHFUL = 0.8
"""Circuits below this faithfulness are reported as not faithful."""


_ZOO_FINE_TUNES = {
    "ioi": "zoo:ft-ioi",
    "colored_objects": "zoo:ft-colored_objects",
    "entity_tracking": "zoo:ft-entity_tracking",
}


@dataclass(frozen=True)
class StudyConfig:
    """What a study runs. The defaults are the zoo demo.

    Attributes:
        base: the base model's spec.
        tasks: built-in task names, at least two; each gets a circuit in the base model.
        fine_tuned: task name -> spec of a model fine-tuned on that task, one of ``tasks``.
        methods: distinct discovery methods; the first is the primary one, used for overlap.
        n_prompts, seed: the size (at least 2) and seed (at least 0) of every task.
        ablation: how faithfulness ablates everything outside a circuit.
        n_boot: bootstrap resamples for the stability ceiling (0 skips it).
        n_random: random circuits per circuit for the baseline (at least 2).
        device: where every model is loaded (``"cpu"``, ``"cuda"``); None is
            ``rl.load_model``'s default. On Ray, a ``cuda`` device gives each unit of
            work one GPU.
        dtype: the models' dtype (``"float32"``, ``"bfloat16"``); None is float32.
        memory_budget: bytes or a size such as ``"8GiB"`` that every unit's engines
            chunk their work under (``rl.faithfulness``'s ``memory_budget``); None reads
            ``REUSE_LENS_MEMORY_BUDGET``, else the default. It changes no result.
        edge_overlap: also find an EAP-IG edge circuit for each base task and compare
            them edge by edge (``rl.compare_edges``): whether tasks that share a head
            read it through the same q/k/v inputs and from the same senders.
        threads: torch's CPU threads for every unit of work, in this process and on
            each Ray worker (which asks Ray for that many CPUs). CPU kernels round
            differently with the thread count, so this is what keeps the executors'
            results byte-identical. None: this process's count when the study starts.
        checkpoints: task -> specs of checkpoints of that task's fine-tuning run, in
            training order (the fine-tune in ``fine_tuned`` is the run's end). The task's
            circuit is found at each, to follow it forming (Wang et al. 2025).
        fine_tuning: for each fine-tune, measure what fine-tuning changed (component
            drift, cross-model patching) and what its task's circuit reuses.
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
    fine_tuned: Mapping[str, str] = field(default_factory=lambda: dict(_ZOO_FINE_TUNES))
    methods: tuple[Method, ...] = ("activation", "eap-ig")
    n_prompts: int = 64
    seed: int = 0
    ablation: Ablation = "mean"
    n_boot: int = 5
    n_random: int = 20
    device: str | None = None
    dtype: str | None = None
    memory_budget: int | str | None = None
    edge_overlap: bool = True
    threads: int | None = None
    checkpoints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    fine_tuning: bool = True

    def __post_init__(self) -> None:
        from reuse_lens import tasks
        from reuse_lens.circuits.discovery import METHODS

        # Everything a study could only find out after its discoveries is refused here.
        if isinstance(self.tasks, str) or isinstance(self.methods, str):
            raise TypeError("tasks and methods must be tuples of names, e.g. ('ioi', 'sva')")
        if unknown := [t for t in (*self.tasks, *self.fine_tuned) if t not in tasks.names()]:
            raise ValueError(f"unknown tasks {unknown}: built-in tasks are {tasks.names()}")
        if repeated := _repeated(self.tasks):
            raise ValueError(f"tasks name {repeated!r} twice: give each task once")
        if len(self.tasks) < 2:
            raise ValueError(
                f"a study compares the circuits of tasks, so it needs at least two, got "
                f"{list(self.tasks)}: add another (e.g. --tasks {' '.join(self.tasks)} sva), or "
                "find one circuit with rl.discover_circuit (reuse-lens discover)"
            )
        if outside := [t for t in self.fine_tuned if t not in self.tasks]:
            default = dict(self.fine_tuned) == _ZOO_FINE_TUNES
            raise ValueError(
                f"fine-tuned task(s) {outside} are not among the study's tasks {list(self.tasks)}"
                ": a fine-tune is studied on its own task, beside the base model's circuit "
                "of it; add them to the tasks, or leave out their fine-tunes"
                + (" (fine_tuned defaults to the zoo's three: pass fine_tuned={} or the ones "
                   "you mean)" if default else "")
            )  # fmt: skip
        if bad := [m for m in self.methods if m not in METHODS or m == "path"]:
            raise ValueError(
                f"study methods must be among activation, eap, eap-ig (got {bad}); path "
                "circuits come from rl.discover_circuit(method='path') directly"
            )
        if not self.methods:
            raise ValueError("a study needs at least one method")
        if repeated := _repeated(self.methods):
            raise ValueError(
                f"methods name {repeated!r} twice: each method finds each circuit once, and "
                "method agreement compares different methods"
            )
        if check_count(self.n_prompts, "n_prompts") < 2:
            raise ValueError(
                "n_prompts must be at least 2, got 1: the mean over one prompt is that "
                "prompt's own activation, so mean ablation would change nothing, and every "
                "resample of one prompt is that prompt"
            )
        check_seed(self.seed)
        if check_count(self.n_random, "n_random") < 2:
            raise ValueError(
                "n_random must be at least 2, got 1: the random baseline reports a mean and "
                "a standard deviation, and one random circuit's standard deviation is 0"
            )
        if check_count(self.n_boot, "n_boot", minimum=0) == 1:
            raise ValueError(
                "n_boot must be 0 (no stability section) or at least 2: stability compares "
                "the circuits of two or more resamples, got 1"
            )
        if self.memory_budget is not None:
            from reuse_lens._memory import parse_budget

            parse_budget(self.memory_budget)  # a bad budget fails here, not in a worker
        if not isinstance(self.edge_overlap, bool):
            raise TypeError(f"edge_overlap must be True or False, got {self.edge_overlap!r}")
        if self.threads is not None:
            check_count(self.threads, "threads")
        if stray := [t for t in self.checkpoints if t not in self.fine_tuned]:
            raise ValueError(
                f"checkpoints are given for {stray}, which have no fine-tuned model: "
                "checkpoints follow the run of a model in fine_tuned (TASK=SPEC)"
            )
        for task, specs in self.checkpoints.items():
            if isinstance(specs, str) or not all(isinstance(s, str) and s for s in specs):
                raise TypeError(
                    f"checkpoints[{task!r}] must be a tuple of model specs, got {specs!r}"
                )
        if not isinstance(self.fine_tuning, bool):
            raise TypeError(f"fine_tuning must be True or False, got {self.fine_tuning!r}")
        for name in ("device", "dtype"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string such as 'cpu' or None, got {value!r}")

    @property
    def models(self) -> dict[str, str]:
        """Each model's label in the study (``base``, ``ft-<task>``, ``ft-<task>@<step>``
        for a checkpoint) -> its spec."""
        from reuse_lens.study.finetune import checkpoint_label

        out = {"base": self.base, **{f"ft-{t}": s for t, s in self.fine_tuned.items()}}
        for task, specs in self.checkpoints.items():
            for index, spec in enumerate(specs, 1):
                out[checkpoint_label(task, spec, index)] = spec
        return out

    @property
    def uses_gpu(self) -> bool:
        """Whether the study asks for a GPU device (each Ray unit then takes one GPU)."""
        return self.device is not None and self.device.startswith("cuda")


def _repeated(names: tuple[str, ...]) -> str | None:
    """The first name given twice, if any."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


WIDE_TASKS = ("ioi", "induction", "sva", "gendered_pronoun", "greater_than")
"""The wide demo's tasks: zoo:wide's three, and the two its fine-tunes teach it."""
WIDE_FINE_TUNES = {
    "gendered_pronoun": "zoo:wide-ft-gendered_pronoun",
    "greater_than": "zoo:wide-ft-greater_than",
}


def wide_demo_config(**options: Any) -> StudyConfig:
    """The demo's second study: zoo:wide (48 heads, no scaffold) and the fine-tunes that
    teach it a task it cannot do, with every checkpoint the zoo keeps of their runs."""
    from reuse_lens import zoo

    checkpoints = {
        task: tuple(f"{spec}@{step}" for step in zoo.checkpoints(spec.removeprefix("zoo:")))
        for task, spec in WIDE_FINE_TUNES.items()
    }
    return StudyConfig(
        base="zoo:wide",
        tasks=WIDE_TASKS,
        fine_tuned=dict(WIDE_FINE_TUNES),
        checkpoints=checkpoints,
        **options,
    )
