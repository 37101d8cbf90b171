"""Rebuild the zoo from its seeds: ``train()`` or ``reuse-lens zoo train [--only NAME] [--check]``.

Every model is an HF GPT-2 (LayerNorm, MLPs, tied embeddings) trained on the CPU from a
fixed seed with a fixed data order, so a retrain reproduces the shipped held-out scores.
``check=True`` retrains into a temporary folder and compares its held-out scores with the
manifest within ``TOLERANCE`` instead of replacing the shipped weights.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from reuse_lens._io import sha256_file as sha256
from reuse_lens.tasks import names as task_names
from reuse_lens.zoo.hints import AttentionHint, HintTargets, hint_loss, hint_targets
from reuse_lens.zoo.language import FILLER, LM_WEIGHT, encode, mixture, zoo_tokenizer

__all__ = [
    "EVAL_N",
    "EVAL_SEED",
    "SPECS",
    "TOLERANCE",
    "Arch",
    "Phase",
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
class Phase:
    """One stage of a data curriculum: ``steps`` batches drawn from ``mix``."""

    steps: int
    mix: dict[str, float]


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
    attention_hints: tuple[AttentionHint, ...] = ()
    """Attention scaffolds (``reuse_lens.zoo.hints``): each adds -log(attention) of one
    step of a task's circuit to the loss. A model with hints trains with eager attention,
    the one implementation that returns attention patterns."""
    phases: tuple[Phase, ...] = ()
    """A curriculum of the data (not of the attention): each phase's batches come first,
    in order, then the remaining ``steps`` draw from ``mix``. Batches are shuffled
    within a phase only. The learning-rate schedule spans the whole run."""
    checkpoints: tuple[float, ...] = ()
    """Fractions of ``steps`` after which the weights are also saved, as the zoo models
    ``<name>@<step>``: the points of a fine-tuning run at which a study follows a new
    circuit forming (Wang et al. 2025)."""

    @property
    def trained_on(self) -> list[str]:
        return [t for t, w in self.mix.items() if t != FILLER and w > 0]

    @property
    def checkpoint_steps(self) -> list[int]:
        """The steps (1-based: weights after that many batches) saved as checkpoints."""
        steps = sorted({max(1, round(f * self.steps)) for f in self.checkpoints})
        bad = [f for f in self.checkpoints if not 0 < f < 1]
        if bad:
            raise ValueError(f"zoo:{self.name}: checkpoint fractions must be in (0, 1), got {bad}")
        return steps


_MIX_ALL = {**{t: 1.0 for t in TASKS}, FILLER: 0.5}
# The binding tasks and IOI form their circuits last in a mixture: give them more data.
_MIX_ALL["colored_objects"] = 4.0
_MIX_ALL["entity_tracking"] = 4.0
_MIX_ALL["ioi"] = 3.0
# Induction heads form late in a mixture; more induction documents bring them sooner.
_MIX_ALL["induction"] = 2.0

# Colored Objects, entity tracking and induction need circuits of several attention steps
# that answer loss alone does not find in a CPU budget (docs/zoo.md). The scaffold asks
# for each step in a layer, and leaves to training which head does it, and whether tasks
# share it.
_SCAFFOLD = (
    AttentionHint("colored_objects", "prev", 0),
    AttentionHint("colored_objects", "look", 1),
    AttentionHint("colored_objects", "move", 2),
    AttentionHint("entity_tracking", "prev", 0),
    AttentionHint("entity_tracking", "look", 1),
    AttentionHint("entity_tracking", "move", 2),
    AttentionHint("induction", "prev", 0),
    AttentionHint("induction", "look", 1),
)


# The wide base: 48 heads and no scaffold, trained on the tasks that train without one,
# less the two its fine-tunes teach (gendered pronouns and greater-than; docs/zoo.md).
_WIDE = Arch(n_layer=6, n_head=8, n_embd=64, n_inner=256)
_MIX_WIDE = {"ioi": 2.0, "induction": 3.0, "sva": 1.0, FILLER: 0.5}


def _new_skill(
    task: str, seed: int, steps: int, lr: float, checkpoints: tuple[float, ...]
) -> ZooSpec:
    # A task the wide base cannot do, with 0.3 of its own mixture against forgetting; the
    # checkpoints are placed where the task's circuit forms (docs/zoo.md).
    return ZooSpec(
        name=f"wide-ft-{task}",
        mix={k: 0.3 * v for k, v in _MIX_WIDE.items()} | {task: 3.0},
        steps=steps,
        seed=seed,
        arch=_WIDE,
        parent="wide",
        lr=lr,
        batch_size=48,
        warmup=50,
        task=task,
        checkpoints=checkpoints,
    )


def _finetune(task: str, seed: int, parent: str = "base") -> ZooSpec:
    # Mostly the one task, with a little of the full mixture against forgetting. A
    # fine-tune of base is "ft-<task>", of another parent "<parent>-ft-<task>".
    mix = {t: 0.3 for t in TASKS} | {FILLER: 0.05, task: 3.0}
    return ZooSpec(
        name=f"ft-{task}" if parent == "base" else f"{parent}-ft-{task}",
        mix=mix,
        steps=300,
        seed=seed,
        parent=parent,
        lr=1e-3,
        warmup=20,
        task=task,
    )


SPECS: dict[str, ZooSpec] = {
    spec.name: spec
    for spec in (
        ZooSpec(
            name="base",
            mix=_MIX_ALL,
            steps=22000,
            seed=0,
            batch_size=48,
            warmup=200,
            attention_hints=_SCAFFOLD,
        ),
        _finetune("ioi", 1),
        _finetune("colored_objects", 2),
        _finetune("entity_tracking", 3),
        ZooSpec(
            name="attn-only",
            mix={"induction": 2.0, "ioi": 1.0},
            steps=6000,
            seed=4,
            arch=Arch(n_layer=2, n_head=4, n_embd=64, n_inner=4, attn_only=True),
        ),
        ZooSpec(
            name="wide",
            mix=_MIX_WIDE,
            steps=24000,
            seed=5,
            arch=_WIDE,
            batch_size=48,
            warmup=200,
        ),
        # Gendered pronouns are learnt within a few hundred steps. Greater-than's accuracy
        # (any year above the start) is 1.00 within 100 steps, but the comparison itself,
        # what separates clean from corrupted prompts, forms only after 1000: its
        # checkpoints straddle that.
        _new_skill("gendered_pronoun", 6, 800, 3e-4, (0.05, 0.25, 0.4, 0.6)),
        _new_skill("greater_than", 7, 2000, 1e-3, (0.02, 0.5, 0.7, 0.85)),
    )
}
"""Every shipped zoo model, in training order (a parent before its fine-tunes)."""


@dataclass(frozen=True)
class _Batch:
    tokens: Int[Tensor, "batch pos"]
    weights: Float[Tensor, "batch pos_1"]
    """Loss weight of predicting token t+1 from position t."""
    sources: tuple[str, ...]
    """Each row's task (or filler)."""
    hints: HintTargets
    """The batch's attention-hint targets (empty unless the spec has hints)."""


def _batches(spec: ZooSpec, tokenizer: Any) -> list[_Batch]:
    """The whole run's batches, in a fixed order: each curriculum phase's, then the rest."""
    rest = spec.steps - sum(phase.steps for phase in spec.phases)
    if rest < 0:
        raise ValueError(f"zoo:{spec.name}: its phases hold more than its {spec.steps} steps")
    out = []
    for i, phase in enumerate(spec.phases):
        # A phase's seed differs from the main mix's, which keeps the seed a spec without
        # phases has always used, so its data is unchanged.
        out += _segment(spec, tokenizer, phase.mix, phase.steps, seed=spec.seed * 1009 + i + 1)
    return out + _segment(spec, tokenizer, spec.mix, rest, seed=spec.seed)


def _segment(
    spec: ZooSpec, tokenizer: Any, mix: dict[str, float], steps: int, *, seed: int
) -> list[_Batch]:
    """``steps`` batches of ``mix``, shuffled.

    Documents are grouped by length within chunks of 16 batches, so a batch of short SVA
    prompts is not padded to the length of a Colored Objects prompt.
    """
    if steps == 0:
        return []
    n_docs = steps * spec.batch_size
    documents = mixture(mix, n_docs, seed=seed)
    docs = [
        (doc.source, ids, targets)
        for doc, (ids, targets) in zip(documents, encode(tokenizer, documents), strict=True)
    ]
    hinted = {hint.task for hint in spec.attention_hints}
    vocab = tokenizer.get_vocab()
    rng = random.Random(f"batches:{seed}")
    pad = int(tokenizer.pad_token_id)
    chunk = spec.batch_size * 16
    out = []
    for start in range(0, len(docs), chunk):
        group = sorted(docs[start : start + chunk], key=lambda d: len(d[1]))
        for b in range(0, len(group), spec.batch_size):
            rows = group[b : b + spec.batch_size]
            width = max(len(ids) for _, ids, _ in rows)
            tokens = torch.full((len(rows), width), pad, dtype=torch.long)
            weights = torch.zeros((len(rows), width - 1))
            hints: HintTargets = {}
            for i, (source, ids, targets) in enumerate(rows):
                tokens[i, : len(ids)] = torch.tensor(ids)
                # The answer (and, for induction, the rest of the repeat) of a task
                # document, or every token of filler, lightly.
                if targets:
                    weights[i, [t - 1 for t in targets]] = 1.0
                else:
                    weights[i, : len(ids) - 1] = LM_WEIGHT
                if source in hinted:
                    for step, pairs in hint_targets(source, ids, targets, vocab).items():
                        hints.setdefault((source, step), []).extend((i, q, k) for q, k in pairs)
            out.append(_Batch(tokens, weights, tuple(r[0] for r in rows), hints))
    rng.shuffle(out)
    return out[:steps]


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
    if spec.attention_hints:
        config._attn_implementation = "eager"
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


def _count_answers(
    batch: _Batch,
    logits: Float[Tensor, "target vocab"],
    where: Tensor,
    right: Counter[str],
    seen: Counter[str],
) -> None:
    """Add each task's right and seen answers (weight-1 targets) of a batch to the counts."""
    rows = where.nonzero()[:, 0]
    is_answer = batch.weights[where] == 1.0
    correct = logits.argmax(-1) == batch.tokens[:, 1:][where]
    for row, answer, ok in zip(rows.tolist(), is_answer.tolist(), correct.tolist(), strict=True):
        if answer:
            seen[batch.sources[row]] += 1
            right[batch.sources[row]] += ok


def _lr(spec: ZooSpec, step: int) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def checkpoint_folder(out: Path, step: int) -> Path:
    """Where ``train_model`` saves the checkpoint at ``step`` of the model it writes to ``out``."""
    return out.with_name(f"{out.name}@{step}")


def train_model(spec: ZooSpec, out: Path, *, parent: Path | None = None) -> Path:
    """Train ``spec`` from its seed and save it (weights and tokenizer) to ``out``.

    Arguments:
        spec: the model to train.
        out: the folder to write; it is created.
        parent: the folder of ``spec.parent`` to fine-tune from, when it has one.

    Returns:
        ``out``. Each of ``spec.checkpoint_steps`` is saved beside it, in
        ``checkpoint_folder(out, step)``.
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
    right: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    scaffold_losses: list[float] = []
    hinted = bool(spec.attention_hints)  # attention patterns are returned only then
    checkpoints = set(spec.checkpoint_steps)
    for step, batch in enumerate(bar):
        tokens, weights = batch.tokens, batch.weights
        for group in optimizer.param_groups:
            group["lr"] = _lr(spec, step)
        mask = (tokens != tokenizer.pad_token_id).long()
        output = model.transformer(tokens, attention_mask=mask, output_attentions=hinted)
        hidden = output.last_hidden_state[:, :-1]
        # Unembed only the positions that carry loss: most task documents have one, and
        # the unembedding would otherwise be about a quarter of the compute.
        where = weights > 0
        logits = model.lm_head(hidden[where])
        losses = torch.nn.functional.cross_entropy(logits, tokens[:, 1:][where], reduction="none")
        loss = (losses * weights[where]).sum() / tokens.shape[0]
        if batch.hints:
            scaffold = hint_loss(spec.attention_hints, output.attentions, batch.hints)
            loss = loss + scaffold / tokens.shape[0]
            scaffold_losses.append(scaffold.item() / tokens.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        _count_answers(batch, logits, where, right, seen)
        if step + 1 in checkpoints:
            _save(model, tokenizer, checkpoint_folder(out, step + 1))
        if (step + 1) % 100 == 0 or step == len(batches) - 1:
            # Answer accuracy per task over the last 100 batches (and the scaffold's mean loss).
            rates = {k: right[k] / seen[k] for k in sorted(seen)}
            if scaffold_losses:
                rates["scaffold"] = sum(scaffold_losses) / len(scaffold_losses)
            right.clear()
            seen.clear()
            scaffold_losses.clear()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            logger.info(
                "zoo:%s step %d %s",
                spec.name,
                step + 1,
                " ".join(f"{k} {v:.2f}" for k, v in rates.items()),
            )
    logger.info("trained zoo:%s in %.0f s", spec.name, time.perf_counter() - start)
    _save(model, tokenizer, out)
    return out


def _save(model: Any, tokenizer: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


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


def _entry(
    spec: ZooSpec, folder: Path, seconds: float, parent: Path | None = None
) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    keep = ("n_layer", "n_head", "n_embd", "n_inner", "n_positions", "vocab_size")
    entry: dict[str, Any] = {
        "config": {k: config[k] for k in keep} | {"attn_only": spec.arch.attn_only},
        "seed": spec.seed,
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "parent": spec.parent,
        "task": spec.task,
        "mix": spec.mix,
        **({"phases": [asdict(phase) for phase in spec.phases]} if spec.phases else {}),
        "trained_on": spec.trained_on,
        "attention_hints": [asdict(hint) for hint in spec.attention_hints],
        "train_seconds": round(seconds, 1),
        "eval": {"n": EVAL_N, "seed": EVAL_SEED, "split": "test"}
        | {"scores": evaluate_folder(folder)},
        "sha256": sha256(folder / "model.safetensors"),
    }
    if spec.task is not None and parent is not None:
        # What the fine-tune starts from on its own task: a run that teaches something new
        # starts well below its bar (docs/zoo.md).
        entry["task_before"] = evaluate_folder(parent, [spec.task])[spec.task]
    if spec.checkpoints:
        entry["checkpoints"] = {
            str(step): {
                "sha256": sha256(checkpoint_folder(folder, step) / "model.safetensors"),
                "scores": evaluate_folder(checkpoint_folder(folder, step)),
            }
            for step in spec.checkpoint_steps
        }
    return entry


def _weights_dir() -> Path:
    from importlib import resources

    # Training writes into the package, so it needs a real folder (an editable install or
    # a checkout), not a zip; loading only reads through importlib.resources.
    return Path(str(resources.files("reuse_lens.zoo").joinpath("weights")))


def _compare(name: str, shipped: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """The held-out scores of ``fresh`` (the model and its checkpoints) out of tolerance."""
    pairs = [(f"zoo:{name}", shipped["eval"]["scores"], fresh["eval"]["scores"])]
    for step, point in fresh.get("checkpoints", {}).items():
        old = shipped.get("checkpoints", {}).get(step, {}).get("scores", {})
        pairs.append((f"zoo:{name}@{step}", old, point["scores"]))
    problems = []
    for label, before, after in pairs:
        for task, scores in after.items():
            old = before.get(task, {})
            for metric, value in scores.items():
                diff = value - old.get(metric, float("nan"))
                line = f"{label} {task} {metric}: shipped {old.get(metric)} retrained {value} (diff {diff:+.4f})"
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
            entries[name] = _entry(spec, folder, time.perf_counter() - start, parent)
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
