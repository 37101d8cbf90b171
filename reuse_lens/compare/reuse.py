"""Functional reuse: does a shared component do the same work elsewhere?

Node overlap (``overlap.py``) says which heads two circuits share. These functions ask
whether the sharing matters:

- ``circuit_stability``: rediscover a task's circuit on bootstrap resamples of its prompts.
  The mean Jaccard between resamples is the *ceiling* for overlap between tasks: two tasks
  cannot be expected to share more than one task shares with itself.
- ``cross_task_faithfulness``: the circuit of task A, evaluated on task B with everything
  else ablated (rows: circuits, columns: tasks).
- ``cross_model_faithfulness``: a circuit found in one model, evaluated in others of the
  same shape, e.g. a base model's circuit inside its fine-tunes (Prakash et al. 2024).
- ``cross_task_ablation``: ablate circuit A's heads (or nodes) and keep everything else;
  the damage on task B is ``1 − faithfulness(complement)`` (0 = no harm, 1 = as if
  everything were ablated).

Every faithfulness here ablates nodes (``level="node"``), the level at which circuits of
different methods and tasks are comparable.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from reuse_lens._validate import check_count, check_mapping, check_pair, check_seed
from reuse_lens.circuits.circuit import Circuit
from reuse_lens.circuits.discovery import discover_circuit
from reuse_lens.circuits.measure import CircuitEvaluator

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens._memory import MemoryBudget
    from reuse_lens.nodes import Ablation
    from reuse_lens.tasks.task import Task

__all__ = [
    "Stability",
    "bootstrap_sample",
    "circuit_stability",
    "cross_model_faithfulness",
    "cross_task_ablation",
    "cross_task_faithfulness",
    "stability_of",
]


@dataclass(frozen=True)
class Stability:
    """How much a task's circuit changes when its prompts are resampled.

    Attributes:
        mean_jaccard: mean node Jaccard over all pairs of bootstrap circuits (the ceiling).
        std_jaccard: their standard deviation.
        jaccards: every pairwise Jaccard.
        circuits: the bootstrap circuits.
        method: the discovery method.
    """

    mean_jaccard: float
    std_jaccard: float
    jaccards: tuple[float, ...]
    circuits: tuple[Circuit, ...]
    method: str

    @property
    def n_boot(self) -> int:
        return len(self.circuits)

    def __str__(self) -> str:
        return f"stability {self.mean_jaccard:.2f} ± {self.std_jaccard:.2f} (n_boot={self.n_boot})"


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def circuit_stability(
    model: TransformerBridge,
    task: Task,
    *,
    method: str = "activation",
    n_boot: int = 10,
    seed: int = 0,
    **discover_options: Any,
) -> Stability:
    """Rediscover the circuit on ``n_boot`` bootstrap resamples of the prompts.

    ``discover_options`` go to ``discover_circuit`` (e.g. ``ablation``, ``top_k``). Two
    empty circuits count as identical (Jaccard 1).
    """
    model, task = check_pair(model, task)
    n_boot = check_count(n_boot, "n_boot", minimum=2)
    seed = check_seed(seed)
    circuits = [
        discover_circuit(
            model, task.select(bootstrap_sample(len(task), seed, i)), method=method,  # type: ignore[arg-type]
            **discover_options,
        )
        for i in range(n_boot)
    ]  # fmt: skip
    return stability_of(circuits, method)


def bootstrap_sample(size: int, seed: int, index: int) -> list[int]:
    """The prompt indices of resample ``index`` of ``circuit_stability(..., seed=seed)``.

    Resample i is the i-th draw of one generator seeded with ``seed``, replayed here, so
    each resample can be found on its own (a study runs them as separate units of work,
    in any order) and still be the one ``circuit_stability`` finds.
    """
    rng = np.random.default_rng(check_seed(seed))
    sample: list[int] = []
    for _ in range(check_count(index, "index", minimum=0) + 1):
        sample = rng.integers(0, size, size=size).tolist()
    return sample


def stability_of(circuits: Sequence[Circuit], method: str) -> Stability:
    """The Stability of circuits found on resamples of one task (at least two)."""
    if len(circuits) < 2:
        raise ValueError(f"stability compares two or more circuits, got {len(circuits)}")
    values = [_jaccard(a.nodes, b.nodes) for a, b in itertools.combinations(circuits, 2)]
    return Stability(
        mean_jaccard=float(np.mean(values)),
        std_jaccard=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        jaccards=tuple(values),
        circuits=tuple(circuits),
        method=method,
    )


def _frame(rows: dict[str, dict[str, float]]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame.from_dict(rows, orient="index")


def _check_maps(circuits: object, tasks: object) -> None:
    check_mapping(circuits, "circuits", "Circuits")
    check_mapping(tasks, "tasks", "Tasks")


def cross_task_faithfulness(
    model: TransformerBridge,
    circuits: Mapping[str, Circuit],
    tasks: Mapping[str, Task],
    *,
    ablation: Ablation = "mean",
    memory_budget: MemoryBudget = None,
) -> pd.DataFrame:
    """Faithfulness of every circuit (rows) on every task (columns), in one model.

    ``memory_budget`` bounds each evaluation's chunks, as in ``rl.faithfulness``.
    """
    _check_maps(circuits, tasks)
    evaluators = _evaluators(model, circuits, tasks, ablation, memory_budget)
    rows = {
        c_name: {t_name: ev(circuit, "node") for t_name, ev in evaluators.items()}
        for c_name, circuit in circuits.items()
    }
    return _frame(rows)


def cross_model_faithfulness(
    circuits: Mapping[str, Circuit],
    models: Mapping[str, TransformerBridge],
    tasks: Mapping[str, Task],
    *,
    ablation: Ablation = "mean",
    memory_budget: MemoryBudget = None,
) -> pd.DataFrame:
    """Faithfulness of each circuit (rows) inside each model (columns), on its task.

    ``tasks`` maps each circuit's name to the task it is evaluated on; the models must
    share the circuits' shape (a base model and its fine-tunes).
    """
    _check_maps(circuits, tasks)
    check_mapping(models, "models", "loaded models")
    if missing := sorted(set(circuits) - set(tasks)):
        raise ValueError(f"no task given for circuits {missing}: map every circuit to a task")
    rows: dict[str, dict[str, float]] = {}
    for c_name, circuit in circuits.items():
        rows[c_name] = {
            m_name: CircuitEvaluator(
                model,
                tasks[c_name],
                ablation=ablation,
                memory_budget=memory_budget,
                experts=bool(circuit.shape.experts),
            )(circuit, "node")
            for m_name, model in models.items()
        }
    return _frame(rows)


def cross_task_ablation(
    model: TransformerBridge,
    circuits: Mapping[str, Circuit],
    tasks: Mapping[str, Task],
    *,
    ablation: Ablation = "mean",
    kind: Literal["heads", "all"] = "heads",
    memory_budget: MemoryBudget = None,
) -> pd.DataFrame:
    """Damage to each task (columns) when each circuit's heads (rows) are ablated.

    Damage = 1 − faithfulness of every node *except* the circuit's: 0 when the task does
    not need those nodes, 1 when losing them is as bad as losing everything, above 1 when
    the model without them scores below the model with every node ablated. By default
    only the circuit's heads are ablated (``kind="heads"``): in small models MLP 0 acts as
    part of the embedding and sits in nearly every circuit, so ablating it would mark
    every task as damaged by every circuit and hide which *heads* are reused.
    """
    _check_maps(circuits, tasks)
    if kind not in ("heads", "all"):
        raise ValueError(f"kind must be 'heads' or 'all', got {kind!r}")
    evaluators = _evaluators(model, circuits, tasks, ablation, memory_budget)
    rows: dict[str, dict[str, float]] = {}
    for c_name, circuit in circuits.items():
        for evaluator in evaluators.values():
            evaluator.check(circuit, f"circuit {c_name!r}")
        everything = {n.name for n in circuit.shape.nodes()}
        removed = circuit.heads if kind == "heads" else circuit.nodes
        rest = sorted(everything - removed)
        rows[c_name] = {t_name: 1.0 - ev.nodes([rest])[0] for t_name, ev in evaluators.items()}
    return _frame(rows)


def _evaluators(
    model: TransformerBridge,
    circuits: Mapping[str, Circuit],
    tasks: Mapping[str, Task],
    ablation: Ablation,
    memory_budget: MemoryBudget,
) -> dict[str, CircuitEvaluator]:
    """One evaluator per task, with expert nodes where the circuits have them."""
    experts = any(circuit.shape.experts for circuit in circuits.values())
    return {
        name: CircuitEvaluator(
            model, task, ablation=ablation, memory_budget=memory_budget, experts=experts
        )
        for name, task in tasks.items()
    }
