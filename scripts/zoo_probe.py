"""Train one zoo recipe as a probe, logging each task's answer accuracy every 100 steps.

    OMP_NUM_THREADS=1 python scripts/zoo_probe.py '{"arch": {"n_layer": 6, "n_head": 8,
        "n_embd": 64, "n_inner": 256}, "steps": 6500, "seed": 5, "batch_size": 48,
        "warmup": 200, "lr": 0.003, "out": "probe-out"}' > probe.log

The JSON holds ``ZooSpec`` fields (``arch`` as ``Arch`` fields; ``mix`` entries replace
those of the full mixture that ``zoo:base`` uses, a weight of 0 drops a source; ``phases``
is a list of ``{"steps": N, "mix": {...}}`` curriculum phases, their mixes given the
same way) plus
``out``, the folder to write, and optionally ``entity_tracking_objects``: a list of scene
sizes for entity-tracking documents (by default 2 to 5, as every zoo model). At the end it
prints the held-out scores of ``reuse_lens.zoo.train.evaluate_folder``. A probe trains
exactly as ``reuse-lens zoo train`` does (one thread, same data order), so a recipe that
works can be added to ``SPECS`` as it is. docs/zoo.md records the probes run so far.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

import reuse_lens.zoo.language as language
from reuse_lens.tasks import generate
from reuse_lens.tasks import spec as task_spec
from reuse_lens.tasks.words import WordPool
from reuse_lens.zoo.train import (
    _MIX_ALL,
    THREADS,
    Arch,
    Phase,
    ZooSpec,
    evaluate_folder,
    train_model,
)


def _entity_tracking_sizes(sizes: list[int]) -> None:
    """Make the language's entity-tracking documents use scenes of ``sizes`` objects only."""
    original = language.task_documents

    def task_documents(task: str, n: int, *, seed: int) -> list[language.Document]:
        if task != "entity_tracking":
            return original(task, n, seed=seed)
        pool = WordPool(None, text=True)
        rng = random.Random(f"docs:{task}:{seed}")
        n_pairs = -(-n // 2)  # two documents per pair (clean and corrupted)
        share = -(-n_pairs // len(sizes))
        docs: list[language.Document] = []
        for i, k in enumerate(sizes):
            pairs = generate(
                task_spec(task), pool, share, seed=seed * 101 + i, split="train", n_objects=k
            )
            for pair in pairs:
                docs += language._pair_documents(task, pair, rng)
        rng.shuffle(docs)
        return docs[:n]

    language.task_documents = task_documents  # mixture() looks it up at call time


def _mix(overrides: dict[str, float]) -> dict[str, float]:
    """The full mixture with ``overrides`` applied; a weight of 0 drops a source."""
    return {k: v for k, v in (dict(_MIX_ALL) | overrides).items() if v > 0}


def main(argv: list[str]) -> int:
    torch.set_num_threads(THREADS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    cfg: dict[str, Any] = json.loads(argv[0])
    if "entity_tracking_objects" in cfg:
        _entity_tracking_sizes(list(cfg.pop("entity_tracking_objects")))
    mix = _mix(cfg.pop("mix", {}))
    phases = tuple(Phase(p["steps"], _mix(p["mix"])) for p in cfg.pop("phases", []))
    arch = Arch(**cfg.pop("arch", {}))
    out = Path(cfg.pop("out"))
    spec = ZooSpec(name=cfg.pop("name", "probe"), mix=mix, arch=arch, phases=phases, **cfg)
    print(spec, flush=True)
    start = time.perf_counter()
    train_model(spec, out)
    print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
    print(json.dumps(evaluate_folder(out)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
