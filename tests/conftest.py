"""Shared fixtures: seeded RNGs, small random models (native and HF-wrapped) and a tokenizer.

No test reaches a hub: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import reuse_lens as rl
from reuse_lens.tasks import generate, spec
from reuse_lens.tasks.words import WordPool, all_words
from reuse_lens.zoo.tokenizer import tokenizer_from_texts

# One thread, as every Ray worker of the study tests has (Ray sets OMP_NUM_THREADS=1 per
# CPU-task): CPU kernels round differently with the thread count, and the tests compare
# executors byte for byte. It also keeps timings steady on shared cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def task_texts(n_per_task: int = 200) -> list[str]:
    """Text of every built-in task, for a word-level vocabulary that covers them all."""
    texts = [f" {w}" for w in all_words()]
    pool = WordPool(None, text=True)
    for name in rl.tasks.names():
        for pair in generate(spec(name), pool, n_per_task, seed=123, split="all"):
            texts += [str(pair.clean), str(pair.corrupted), *map(str, pair.answers)]
    return texts


@pytest.fixture(scope="session")
def word_tokenizer() -> Any:
    """A word-level tokenizer whose vocabulary covers every built-in task."""
    return tokenizer_from_texts(task_texts())


def save_random_gpt2(
    folder: Path, tokenizer: Any, *, n_layer: int = 2, n_head: int = 4, n_embd: int = 32
) -> Path:
    """A randomly initialised HF GPT-2 with ``tokenizer``, saved as a loadable folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer.get_vocab()),
        n_positions=128,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> Path:
    return save_random_gpt2(tmp_path_factory.mktemp("gpt2"), word_tokenizer)


@pytest.fixture(scope="session")
def hf_model(gpt2_folder: Path) -> Any:
    """A random 2-layer HF GPT-2, loaded offline through rl.load_model(folder)."""
    return rl.load_model(gpt2_folder)


def native_config(**overrides: Any) -> dict[str, Any]:
    """A small native TransformerBridge config; override any field."""
    cfg: dict[str, Any] = dict(
        d_model=32,
        d_head=8,
        n_heads=4,
        n_layers=2,
        n_ctx=64,
        d_vocab=50,
        d_mlp=64,
        act_fn="gelu",
        seed=0,
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def native_model() -> Any:
    """A random 2-layer native model with LayerNorm and MLPs, and no tokenizer."""
    return rl.load_model(native_config())
