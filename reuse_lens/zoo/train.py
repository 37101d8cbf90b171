"""Rebuild the zoo from its seeds: ``train()`` or ``reuse-lens zoo train [--only NAME] [--check]``.

Every model is an HF GPT-2 (LayerNorm, MLPs, tied embeddings) trained on the CPU from a
fixed seed with a fixed data order, so a retrain reproduces the shipped held-out scores.
``check=True`` retrains into a temporary folder and compares its held-out scores with the
manifest within ``TOLERANCE`` instead of replacing the shipped weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from reuse_lens.tasks import names as task_names
from reuse_lens.zoo.language import FILLER, LM_WEIGHT, encode, mixture, zoo_tokenizer

__all__ = [
    "EVAL_N",
    "EVAL_SEED",
    "SPECS",
    "TOLERANCE",
    "Arch",
    "ZooSpec",
    "evaluate_folder",
    "sha256",
    "table",
    "train",
    "train_model",
]

logger = logging.getLogger(__name__)

# The registry's order fixes the mixture's order, so retraining stays reproducible.
TASKS = tuple(task_names())
EVAL_N = 200
"""Held-out prompts per task in the manifest's evaluation."""
EVAL_SEED = 0
TOLERANCE = {"accuracy": 0.03, "logit_diff": 0.5}
"""How far a retrain's held-out scores may be from the manifest's and still count as
reproduced. A retrain on the same torch build and thread count is bit-identical; other
BLAS builds or thread counts change float summation order, which moves scores slightly."""
THREADS = 1
"""Training uses one thread: the float sums, hence the weights, then do not depend on the
machine's core count, and a 2-core machine keeps a core free."""


@dataclass(frozen=True)
class Arch:
    """The GPT-2 shape of a zoo model. ``attn_only`` zeroes and freezes every MLP."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    n_inner: int = 256
    n_positions: int = 80
    attn_only: bool = False


@dataclass(frozen=True)
class ZooSpec:
    """How one zoo model is trained: its shape (or parent), data mix, seed and schedule."""

    name: str
    mix: dict[str, float]
    steps: int
    seed: int
    arch: Arch = field(default_factory=Arch)
    parent: str | None = None
    """A zoo model to fine-tune from; its weights are the starting point."""
    lr: float = 3e-3
    batch_size: int = 64
    warmup: int = 100
    task: str | None = None
    """The one task a fine-tune specialises in (None for models trained on a mixture)."""
    attention_hints: tuple[tuple[str, int, int], ...] = ()
    """Colored Objects attention scaffold: ``(role, layer, head)`` with role ``"prev"``
    (each asked object attends to its colour), ``"move"`` (the answer position attends to
    the question's object) or ``"look"`` (the answer position attends to the asked object
    in the scene). Each adds -log(attention) on Colored Objects documents to the loss.
    Fine-tunes only (a spec with a parent): the parent is loaded with eager attention,
    the one implementation that returns attention patterns."""

    @property
    def trained_on(self) -> list[str]:
        return [t for t, w in self.mix.items() if t != FILLER and w > 0]


_MIX_ALL = {**{t: 1.0 for t in TASKS}, FILLER: 0.5}
# colored_objects and ioi are the hardest for a small model: give them more data.
_MIX_ALL["colored_objects"] = 1.5
_MIX_ALL["ioi"] = 1.5
# Induction heads form late in a mixture; more induction documents bring them sooner.
_MIX_ALL["induction"] = 2.0


def _finetune(task: str, seed: int) -> ZooSpec:
    # Mostly the one task, with a little of the full mixture against forgetting.
    mix = {t: 0.1 for t in TASKS} | {FILLER: 0.05, task: 3.0}
    return ZooSpec(
        name=f"ft-{task}",
        mix=mix,
        steps=300,
        seed=seed,
        parent="base",
        lr=1e-3,
        warmup=20,
        task=task,
    )


# With answer loss alone, the binding circuit Colored Objects needs (colour -> object ->
# question) never leaves its plateau (docs/zoo.md). Supervising the attention of three
# heads to the positions that circuit reads breaks it within about 750 steps; a fifth of
# IOI keeps IOI.
_FT_COLORED_OBJECTS = ZooSpec(
    name="ft-colored_objects",
    mix={"colored_objects": 0.8, "ioi": 0.2},
    steps=2000,
    seed=2,
    parent="base",
    lr=3e-3,
    warmup=100,
    task="colored_objects",
    attention_hints=(("prev", 0, 2), ("move", 1, 1), ("look", 2, 1)),
)


SPECS: dict[str, ZooSpec] = {
    spec.name: spec
    for spec in (
        ZooSpec(name="base", mix=_MIX_ALL, steps=12000, seed=0, batch_size=48, warmup=200),
        _finetune("ioi", 1),
        _FT_COLORED_OBJECTS,
        _finetune("entity_tracking", 3),
        ZooSpec(
            name="attn-only",
            mix={"induction": 2.0, "ioi": 1.0},
            steps=6000,
            seed=4,
            arch=Arch(n_layer=2, n_head=4, n_embd=64, n_inner=4, attn_only=True),
        ),
    )
}
"""Every shipped zoo model, in training order (a parent before its fine-tunes)."""


def sha256(path: Path) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _batches(
    spec: ZooSpec, tokenizer: Any
) -> list[tuple[Int[Tensor, "batch pos"], Float[Tensor, "batch pos"]]]:
    """The whole run's batches, in a fixed order: token ids and per-target loss weights.

    Documents are grouped by length within chunks of 16 batches, so a batch of short SVA
    prompts is not padded to the length of a Colored Objects prompt.
    """
    n_docs = spec.steps * spec.batch_size
    docs = encode(tokenizer, mixture(spec.mix, n_docs, seed=spec.seed))
    rng = random.Random(f"batches:{spec.seed}")
    pad = int(tokenizer.pad_token_id)
    chunk = spec.batch_size * 16
    out = []
    for start in range(0, len(docs), chunk):
        group = sorted(docs[start : start + chunk], key=lambda d: len(d[0]))
        for b in range(0, len(group), spec.batch_size):
            rows = group[b : b + spec.batch_size]
            width = max(len(ids) for ids, _ in rows)
            tokens = torch.full((len(rows), width), pad, dtype=torch.long)
            weights = torch.zeros((len(rows), width - 1))
            for i, (ids, targets) in enumerate(rows):
                tokens[i, : len(ids)] = torch.tensor(ids)
                # Weight of predicting token t+1 from position t: the answer (and, for
                # induction, the rest of the repeat) of a task document, or every token
                # of filler, lightly.
                if targets:
                    weights[i, [t - 1 for t in targets]] = 1.0
                else:
                    weights[i, : len(ids) - 1] = LM_WEIGHT
            out.append((tokens, weights))
    rng.shuffle(out)
    return out[: spec.steps]


def _binding_positions(
    tokens: Int[Tensor, "batch pos"], weights: Float[Tensor, "batch pos_1"], tokenizer: Any
) -> list[tuple[int, int, int, int]]:
    """``(row, answer position, question object, asked object in the scene)`` of each
    Colored Objects document of a batch, found by its ending ``the OBJ ?\\n A :`` and
    capitalised colour answer; the asked object is the last earlier occurrence of OBJ."""
    from reuse_lens.tasks.words import COLORS

    vocab = tokenizer.get_vocab()
    tail = [vocab["?"], vocab["\n"], vocab["A"], vocab[":"]]
    colours = {vocab[f" {c.capitalize()}"] for c in COLORS}
    out = []
    for row, answer_pos in (weights == 1.0).nonzero().tolist():
        ids = tokens[row].tolist()
        if ids[answer_pos + 1] not in colours or ids[answer_pos - 3 : answer_pos + 1] != tail:
            continue
        question = answer_pos - 4
        scene = [j for j in range(1, question) if ids[j] == ids[question]]
        if scene:
            out.append((row, answer_pos, question, scene[-1]))
    return out


def _hint_loss(
    spec: ZooSpec, attentions: Sequence[Tensor], found: list[tuple[int, int, int, int]]
) -> Tensor:
    """Summed -log attention of each hinted head to its target, per batch row (see
    ``ZooSpec.attention_hints``)."""
    rows, answer, question, scene = (torch.tensor(x) for x in zip(*found, strict=True))
    total = torch.zeros(())
    for role, layer, head in spec.attention_hints:
        pattern = attentions[layer][:, head]
        if role == "prev":
            weight = pattern[rows, scene, scene - 1]
        elif role == "move":
            weight = pattern[rows, answer, question]
        else:
            weight = pattern[rows, answer, scene]
        total = total - (weight + 1e-6).log().sum()
    return total


def _new_model(spec: ZooSpec, tokenizer: Any, parent: Path | None) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    if parent is not None:
        # Attention hints read the attention pattern, which only eager attention returns.
        implementation = "eager" if spec.attention_hints else None
        return GPT2LMHeadModel.from_pretrained(
            str(parent), local_files_only=True, attn_implementation=implementation
        )
    arch = spec.arch
    config = GPT2Config(
        vocab_size=len(tokenizer.get_vocab()),
        n_positions=arch.n_positions,
        n_embd=arch.n_embd,
        n_layer=arch.n_layer,
        n_head=arch.n_head,
        n_inner=arch.n_inner,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    if arch.attn_only:
        # Attention-only in function: every MLP writes exactly zero into the residual
        # stream, so the m{L} nodes carry no effect and all circuits run through heads.
        blocks: Any = model.transformer.h
        for block in blocks:
            for param in block.mlp.parameters():
                param.data.zero_()
                param.requires_grad_(False)
    return model


def _lr(spec: ZooSpec, step: int) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(spec: ZooSpec, out: Path, *, parent: Path | None = None) -> Path:
    """Train ``spec`` from its seed and save it (weights and tokenizer) to ``out``.

    Arguments:
        spec: the model to train.
        out: the folder to write; it is created.
        parent: the folder of ``spec.parent`` to fine-tune from, when it has one.

    Returns:
        ``out``.
    """
    torch.set_num_threads(THREADS)
    torch.manual_seed(spec.seed)
    tokenizer = zoo_tokenizer()
    batches = _batches(spec, tokenizer)
    model = _new_model(spec, tokenizer, parent)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    start = time.perf_counter()
    bar = tqdm(batches, desc=f"zoo:{spec.name}", mininterval=10, disable=None)
    recent: list[float] = []
    for step, (tokens, weights) in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = _lr(spec, step)
        mask = (tokens != tokenizer.pad_token_id).long()
        hints = bool(spec.attention_hints)
        output = model.transformer(tokens, attention_mask=mask, output_attentions=hints)
        hidden = output.last_hidden_state[:, :-1]
        # Unembed only the positions that carry loss: most task documents have one, and
        # the unembedding would otherwise be about a quarter of the compute.
        where = weights > 0
        logits = model.lm_head(hidden[where])
        losses = torch.nn.functional.cross_entropy(logits, tokens[:, 1:][where], reduction="none")
        loss = (losses * weights[where]).sum() / tokens.shape[0]
        found = _binding_positions(tokens, weights, tokenizer) if hints else []
        if found:
            loss = loss + _hint_loss(spec, output.attentions, found) / tokens.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        is_answer = weights[where] == 1.0
        if bool(is_answer.any()):
            right = logits.argmax(-1) == tokens[:, 1:][where]
            recent.append(right[is_answer].float().mean().item())
        if (step + 1) % 100 == 0 or step == len(batches) - 1:
            # Top-1 accuracy on the answers of the last 100 training batches.
            accuracy = sum(recent) / max(1, len(recent))
            recent.clear()
            bar.set_postfix(loss=f"{loss.item():.3f}", answer_acc=f"{accuracy:.2f}")
            logger.info("zoo:%s step %d answer accuracy %.3f", spec.name, step + 1, accuracy)
    logger.info("trained zoo:%s in %.0f s", spec.name, time.perf_counter() - start)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def evaluate_folder(
    folder: Path, tasks: Sequence[str] = TASKS, *, n: int = EVAL_N, seed: int = EVAL_SEED
) -> dict[str, dict[str, float]]:
    """Held-out accuracy and clean logit difference of the model in ``folder``, per task."""
    import reuse_lens as rl

    model = rl.load_model(folder)
    scores = {}
    for task in tasks:
        result = rl.evaluate(model, rl.tasks.load(task, model, n=n, seed=seed, split="test"))
        scores[task] = {
            "accuracy": round(result["accuracy"], 4),
            "logit_diff": round(result["logit_diff"], 4),
        }
    return scores


def _entry(spec: ZooSpec, folder: Path, seconds: float) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    keep = ("n_layer", "n_head", "n_embd", "n_inner", "n_positions", "vocab_size")
    return {
        "config": {k: config[k] for k in keep} | {"attn_only": spec.arch.attn_only},
        "seed": spec.seed,
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "parent": spec.parent,
        "task": spec.task,
        "mix": spec.mix,
        "trained_on": spec.trained_on,
        "train_seconds": round(seconds, 1),
        "eval": {"n": EVAL_N, "seed": EVAL_SEED, "split": "test"}
        | {"scores": evaluate_folder(folder)},
        "sha256": sha256(folder / "model.safetensors"),
    }


def _weights_dir() -> Path:
    from importlib import resources

    # Training writes into the package, so it needs a real folder (an editable install or
    # a checkout), not a zip; loading only reads through importlib.resources.
    return Path(str(resources.files("reuse_lens.zoo").joinpath("weights")))


def _compare(name: str, shipped: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    problems = []
    for task, scores in fresh["eval"]["scores"].items():
        old = shipped["eval"]["scores"].get(task, {})
        for metric, value in scores.items():
            diff = value - old.get(metric, float("nan"))
            line = f"zoo:{name} {task} {metric}: shipped {old.get(metric)} retrained {value} (diff {diff:+.4f})"
            logger.info(line)
            if not abs(diff) <= TOLERANCE[metric]:
                problems.append(line)
    return problems


def train(
    names: Sequence[str] | None = None, *, out: Path | None = None, check: bool = False
) -> dict[str, Any]:
    """Retrain zoo models from their seeds and write them with their manifest entries.

    Arguments:
        names: the models to train (default: all of ``SPECS``, in order). A fine-tune
            whose parent is not retrained in the same call starts from the shipped parent.
        out: the weights folder to write (default: the package's own ``zoo/weights``).
        check: retrain into a temporary folder and compare the held-out scores with the
            shipped manifest within ``TOLERANCE`` instead of writing anything.

    Returns:
        The manifest entries of the retrained models, plus ``"problems"``: the scores out of
        tolerance (always empty unless ``check``).
    """
    from reuse_lens import zoo

    todo = list(names) if names else list(SPECS)
    unknown = [n for n in todo if n not in SPECS]
    if unknown:
        raise zoo.ZooError(f"no zoo model(s) {unknown}: the zoo trains {list(SPECS)}")
    shipped_dir = _weights_dir()
    shipped = zoo.manifest().get("models", {})
    scratch = Path(tempfile.mkdtemp(prefix="reuse-lens-zoo-"))
    target = scratch if check else (out or shipped_dir)
    target.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {}
    problems: list[str] = []
    trained: dict[str, Path] = {}
    try:
        for name in todo:
            spec = SPECS[name]
            parent = None
            if spec.parent is not None:
                parent = trained.get(spec.parent) or zoo.shipped_folder(spec.parent)
            start = time.perf_counter()
            folder = train_model(spec, target / name, parent=parent)
            trained[name] = folder
            entries[name] = _entry(spec, folder, time.perf_counter() - start)
            if check:
                if name not in shipped:
                    problems.append(f"zoo:{name} is not in the shipped manifest")
                else:
                    problems += _compare(name, shipped[name], entries[name])
        if not check:
            path = target / zoo.MANIFEST
            current: dict[str, Any] = (
                json.loads(path.read_text()) if path.is_file() else {"models": {}}
            )
            current["models"].update(entries)
            current["tolerance"] = TOLERANCE
            current["torch"] = str(torch.__version__)
            current["threads"] = THREADS
            current["models"] = {k: current["models"][k] for k in SPECS if k in current["models"]}
            path.write_text(json.dumps(current, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"models": entries, "problems": problems}


def table(entries: dict[str, Any] | None = None) -> str:
    """The manifest's held-out scores as a markdown table: accuracy / logit diff per task.

    Scores on tasks a model was trained on are in bold; fine-tunes' other columns show
    what fine-tuning did to the rest of the mixture.
    """
    from reuse_lens import zoo

    if entries is None:
        entries = zoo.manifest().get("models", {})
    assert entries is not None
    head = "| model | " + " | ".join(TASKS) + " |"
    lines = [head, "|" + "---|" * (len(TASKS) + 1)]
    for name, entry in entries.items():
        cells = []
        for task in TASKS:
            score = entry["eval"]["scores"].get(task)
            if score is None:
                cells.append("")
                continue
            text = f"{score['accuracy']:.2f} / {score['logit_diff']:.1f}"
            cells.append(f"**{text}**" if task in entry["trained_on"] else text)
        lines.append(f"| zoo:{name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
