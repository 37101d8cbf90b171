"""Measure the separation test on random-weight models and on the zoo: where the floor goes.

    .venv/bin/python scripts/separation_floor.py > floor.md

``reuse_lens.separation`` refuses a task unless the clean − corrupted gap's bootstrap
interval excludes 0 and the gap is at least ``MIN_EFFECT`` spreads of the metric (Cohen's
d). This prints that effect, and how often the interval alone would have passed, for:

- GPT-2-architecture models with random weights, built from ``transformers`` configs with
  a word-level tokenizer that covers every task: ``tests/archs.py``'s (2 layers, d_model
  64, weights scaled ×8 so that heads differ), the same scaled at 4 layers and d_model 128,
  and 4 layers, d_model 128 at ``transformers``' own initialisation; 24 seeds each;
- 24 random native models (the tests' ``native_config``) on random token tasks;
- the zoo's models;

on every built-in task, with 8, 16 and 64 prompts. docs/methods.md keeps the table.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

import reuse_lens as rl
from reuse_lens.evaluation import task_separation
from reuse_lens.separation import MIN_EFFECT, Separation
from tests.archs import save_arch
from tests.conftest import native_config, task_texts
from tests.patching.helpers import random_task

SIZES = (8, 16, 64)
SEEDS = range(24)
ZOO_SEEDS = {8: range(6), 16: range(6), 64: range(3)}


def _unscaled_gpt2(folder: Path, tokenizer: Any, seed: int) -> Path:
    """A GPT-2 of 4 layers and d_model 128 at ``transformers``' own initialisation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer.get_vocab()), n_positions=128, n_embd=128, n_layer=4,
        n_head=4, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _random_models(root: Path, tokenizer: Any) -> dict[str, list[Separation]]:
    builds = {
        "GPT-2 2L d64 ×8 (tests/archs.py)": lambda f, s: save_arch("gpt2", f, tokenizer, seed=s),
        "GPT-2 4L d128 ×8": lambda f, s: save_arch(
            "gpt2", f, tokenizer, seed=s, n_layer=4, n_embd=128
        ),
        "GPT-2 4L d128": lambda f, s: _unscaled_gpt2(f, tokenizer, s),
    }
    out: dict[str, list[Separation]] = {}
    for label, build in builds.items():
        rows = out.setdefault(label, [])
        for seed in SEEDS:
            model = rl.load_model(build(root / f"{label[:12]}-{seed}".replace(" ", "_"), seed))
            for name in rl.tasks.names():
                for n in SIZES:
                    rows.append(task_separation(model, rl.tasks.load(name, model, n=n, seed=seed)))
    rows = out.setdefault("native 2L d32 (random tokens)", [])
    for seed in SEEDS:
        model = rl.load_model(native_config(seed=seed))
        for n in SIZES:
            rows.append(task_separation(model, random_task(model, n=n, seed=seed)))
    return out


def _zoo() -> dict[str, list[Separation]]:
    out: dict[str, list[Separation]] = {}
    for name in rl.zoo.available():
        model = rl.load_model(f"zoo:{name}")
        for task_name in rl.tasks.names():
            for n, seeds in ZOO_SEEDS.items():
                for seed in seeds:
                    task = rl.tasks.load(task_name, model, n=n, seed=seed)
                    out.setdefault(f"zoo:{name} {task_name}", []).append(
                        task_separation(model, task)
                    )
    return out


def _row(label: str, rows: list[Separation]) -> str:
    effects = np.array([r.effect for r in rows])
    passing = [r.effect for r in rows if r.low > 0]
    accuracy = np.mean([r.accuracy or 0.0 for r in rows])
    refused = sum(not r.separates for r in rows)
    return (
        f"| {label} | {len(rows)} | {accuracy:.2f} | {effects.min():.2f} | "
        f"{np.median(effects):.2f} | {effects.max():.2f} | {len(passing)} | "
        f"{max(passing, default=float('nan')):.2f} | {refused} |"
    )


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from reuse_lens.zoo.tokenizer import tokenizer_from_texts

    header = (
        "| models | cases | mean accuracy | min effect | median | max effect | interval "
        f"excludes 0 | max effect there | refused at {MIN_EFFECT:g} |\n|---|---|---|---|---|---|---|---|---|"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tokenizer_from_texts(task_texts())
        for label, rows in _random_models(Path(tmp), tokenizer).items():
            print(_row(label, rows), flush=True)
    for label, rows in _zoo().items():
        print(_row(label, rows), flush=True)


if __name__ == "__main__":
    main()
