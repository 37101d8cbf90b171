"""The main job: circuits of many tasks in a base model and its fine-tunes, compared.

``run_study`` is what ``reuse-lens study`` runs for any model and ``reuse-lens demo`` on
the zoo, and what produced the result tables in docs/results.md. For each task it finds
the circuit in the base model by every method in the config, and in each fine-tuned
model on that model's own task; it measures each circuit's faithfulness against random
circuits of the same size, how well methods agree, how stable each circuit is under
resampling, which nodes tasks and models share (with significance), whether shared
circuits do their work elsewhere (cross-task and cross-model faithfulness, cross-task
ablation), and runs Merullo et al.'s intervention.

The work is split into units (``units``: each discovery, bootstrap resample and
faithfulness measurement) that an executor runs (``executors``: in this process, or on a
Ray cluster); the comparisons (``compare``) run here. Finished circuits are saved as
JSON as they are found; a study stopped half-way and run again with the same folder and
settings reuses them.
"""

from reuse_lens.study.config import FAITHFUL, StudyConfig, wide_demo_config
from reuse_lens.study.executors import (
    Executor,
    LocalExecutor,
    MissingExtraError,
    RayExecutor,
    executor_named,
)
from reuse_lens.study.result import StudyResult, save_summary, scores_of
from reuse_lens.study.run import run_study

__all__ = [
    "FAITHFUL",
    "Executor",
    "LocalExecutor",
    "MissingExtraError",
    "RayExecutor",
    "StudyConfig",
    "StudyResult",
    "executor_named",
    "run_study",
    "save_summary",
    "scores_of",
    "wide_demo_config",
]
