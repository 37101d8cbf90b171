"""The Task: clean and corrupted prompts turned into the token tensors that patching reads.

Prompts of one task may differ in length. They are right-padded into one tensor, and
each is read at its own answer position (its last real token). Under causal attention a
position never sees the padding after it, so padding changes no logit that a metric
reads; ``tests/tasks/test_task.py`` checks this. Merullo et al.'s code read some prompts
at a padding token; reading each at its own position avoids that (DESIGN.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from reuse_lens.models import check_model
from reuse_lens.tasks._checks import check_pairs, check_spacing, positions
from reuse_lens.tasks.errors import TaskError
from reuse_lens.tasks.metrics import PAD_ANSWER, Metric, MetricInputs, get_metric
from reuse_lens.tasks.tokenize import TaskTokenizer

if TYPE_CHECKING:
    from datasets import Dataset
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["Task", "TaskError", "VocabSignature"]

Prompt = str | Sequence[int]
Answer = str | int | Sequence[str] | Sequence[int] | Sequence[str | int]


@dataclass(frozen=True)
class VocabSignature:
    """Identifies the token vocabulary a task was built for.

    Two models with the same signature (a base model and its fine-tunes) can run the same
    task; a model with another signature would read the token ids as other words.
    """

    d_vocab: int
    tokenizer_hash: str | None

    @classmethod
    def of(cls, model: TransformerBridge) -> VocabSignature:
        tokenizer = getattr(model, "tokenizer", None)
        digest = None
        if tokenizer is not None:
            vocab = sorted(tokenizer.get_vocab().items())
            digest = hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]
        return cls(d_vocab=int(model.cfg.d_vocab), tokenizer_hash=digest)


@dataclass(frozen=True, eq=False)
class Task:
    """Pairs of clean and corrupted prompts with their answers and a metric.

    Attributes:
        name: the task's name, e.g. ``"ioi"``.
        clean: clean prompts, shape (batch, pos), right-padded with ``pad_id``.
        corrupted: corrupted partners, shape (batch, pos); each has its clean prompt's length.
        answers: right answers, shape (batch, n_answers), padded with -1.
        wrong: wrong answers, shape (batch, n_wrong), padded with -1.
        answer_pos: the position whose logits predict the answer, shape (batch,).
        metric: the per-prompt score patching measures; ``logit_diff`` by default.
        prompts: the prompts as text (or token ids), answers and generator fields.
        pad_id: the token that pads prompts; it is never read.
        vocab: the vocabulary the ids belong to.
        seed: the seed a built-in generator used, or None.
    """

    name: str
    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    answers: Int[Tensor, "batch n_answers"]
    wrong: Int[Tensor, "batch n_wrong"]
    answer_pos: Int[Tensor, " batch"]
    metric: Metric
    prompts: Dataset
    pad_id: int
    vocab: VocabSignature
    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, n={len(self)}, max_len={self.clean.shape[1]}, "
            f"metric={self.metric.name!r})"
        )

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """The real (unpadded) token length of each prompt."""
        return self.answer_pos + 1

    def metric_inputs(self) -> MetricInputs:
        return MetricInputs(answers=self.answers, wrong=self.wrong)

    def select(self, index: Sequence[int] | Sequence[bool] | Tensor) -> Task:
        """The sub-task of the prompts at ``index`` (e.g. a bootstrap resample or a chunk).

        ``index`` holds prompt positions (negative ones count from the end), or is a
        boolean mask with one value per prompt. Floats are refused, not truncated.
        """
        idx = positions(index, len(self), self.name)
        if idx.numel() == 0:
            raise TaskError(f"cannot select an empty subset of task {self.name!r}")
        n = len(self)
        if bool(((idx < -n) | (idx >= n)).any()):
            bad = sorted({int(i) for i in idx if not -n <= int(i) < n})
            raise TaskError(
                f"index {bad[:5]} out of range for task {self.name!r} of {n} prompts: "
                f"positions go from 0 to {n - 1}"
            )
        idx = idx % n  # negative positions count from the end, as in a list
        width = int(self.answer_pos[idx].max()) + 1
        return replace(
            self,
            clean=self.clean[idx, :width],
            corrupted=self.corrupted[idx, :width],
            answers=self.answers[idx],
            wrong=self.wrong[idx],
            answer_pos=self.answer_pos[idx],
            prompts=self.prompts.select(idx.tolist()),
        )

    def with_metric(self, metric: str | Metric) -> Task:
        """The same prompts scored by another metric."""
        return replace(self, metric=get_metric(metric))

    def to(self, device: str | torch.device) -> Task:
        """The task with its tensors on ``device``."""
        return replace(
            self,
            clean=self.clean.to(device),
            corrupted=self.corrupted.to(device),
            answers=self.answers.to(device),
            wrong=self.wrong.to(device),
            answer_pos=self.answer_pos.to(device),
        )

    def check_model(self, model: TransformerBridge) -> None:
        """Raise TaskError unless ``model`` reads this task's token ids as the same words."""
        theirs = VocabSignature.of(model)
        ours = self.vocab
        same_tokenizer = (
            ours.tokenizer_hash is None
            or theirs.tokenizer_hash is None
            or ours.tokenizer_hash == theirs.tokenizer_hash
        )
        if theirs.d_vocab != ours.d_vocab or not same_tokenizer:
            raise TaskError(
                f"task {self.name!r} was built for a model with a vocabulary of {ours.d_vocab} "
                f"tokens (tokenizer {ours.tokenizer_hash}), but this model has {theirs.d_vocab} "
                f"(tokenizer {theirs.tokenizer_hash}). Build the task again with "
                "rl.tasks.load(name, model) for this model."
            )

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_pairs(
        cls,
        model: TransformerBridge,
        clean: Sequence[Prompt],
        corrupted: Sequence[Prompt],
        answers: Sequence[Answer],
        wrong: Sequence[Answer],
        *,
        name: str = "custom",
        metric: str | Metric = "logit_diff",
        seed: int | None = None,
        extra: Mapping[str, Sequence[Any]] | None = None,
    ) -> Task:
        """Build a task from clean and corrupted prompts and their answers.

        Arguments:
            model: the model whose tokenizer and vocabulary the task is for.
            clean: prompts as strings, or as lists of token ids (BOS included).
            corrupted: one partner per clean prompt, of the same token length.
            answers: each prompt's right answer: a string, a token id, or a list of either
                for tasks with several right answers. Each must be a single token;
                strings usually need their leading space (``" Mary"``).
            wrong: each prompt's wrong answer(s), in the same forms.
            name: the task's name.
            metric: a metric name or a Metric.
            seed: the seed that generated the prompts, for the record.
            extra: more columns to keep in ``task.prompts``, one value per prompt.

        Raises:
            TaskError: naming the prompt, for an empty task, prompts of different counts,
                a clean/corrupted pair of different token lengths, a word the tokenizer
                does not know, an answer that is not a single token, a prompt longer than
                the model's context, a corrupted prompt equal to its clean one, or a right
                answer that is also among the wrong ones.

        Warns:
            TaskWarning: for word answers without the leading space that the vocabulary's
                word form has (``"Mary"`` where it has ``" Mary"``).
        """
        check_model(model)
        for label, column in (
            ("clean", clean),
            ("corrupted", corrupted),
            ("answers", answers),
            ("wrong", wrong),
        ):
            _check_column(column, label, name)
        n = len(clean)
        if n == 0:
            raise TaskError(f"task {name!r} has no prompts: give at least one clean prompt")
        for label, column in (("corrupted", corrupted), ("answers", answers), ("wrong", wrong)):
            if len(column) != n:
                raise TaskError(
                    f"task {name!r} has {n} clean prompts but {len(column)} {label}: give one "
                    "per clean prompt"
                )
        tok = TaskTokenizer(model)
        clean_ids = [tok.prompt(p, f"clean prompt {i}") for i, p in enumerate(clean)]
        corrupted_ids = [tok.prompt(p, f"corrupted prompt {i}") for i, p in enumerate(corrupted)]
        for i, (a, b) in enumerate(zip(clean_ids, corrupted_ids, strict=True)):
            if len(a) != len(b):
                raise TaskError(
                    f"pair {i} of task {name!r}: the clean prompt {clean[i]!r} is {len(a)} tokens "
                    f"but its corrupted partner {corrupted[i]!r} is {len(b)}. Clean and "
                    "corrupted prompts must have the same token length so that positions align."
                )
        answer_ids = [tok.answers(a, f"answer of prompt {i}") for i, a in enumerate(answers)]
        wrong_ids = [tok.answers(w, f"wrong answer of prompt {i}") for i, w in enumerate(wrong)]
        n_ctx = getattr(model.cfg, "n_ctx", None)
        check_pairs(
            name, clean, clean_ids, corrupted_ids, answers, answer_ids, wrong, wrong_ids,
            int(n_ctx) if isinstance(n_ctx, int) and n_ctx > 0 else None,
        )  # fmt: skip
        check_spacing(name, tok, clean, answers, wrong)

        columns: dict[str, list[Any]] = {
            "clean": [_as_column(p) for p in clean],
            "corrupted": [_as_column(p) for p in corrupted],
            "answers": [_as_list_column(a) for a in answers],
            "wrong": [_as_list_column(w) for w in wrong],
        }
        for key, values in (extra or {}).items():
            if len(values) != n:
                raise TaskError(f"extra column {key!r} has {len(values)} values for {n} prompts")
            columns[key] = list(values)
        from datasets import Dataset

        return cls(
            name=name,
            clean=_pad(clean_ids, tok.pad_id),
            corrupted=_pad(corrupted_ids, tok.pad_id),
            answers=_pad(answer_ids, PAD_ANSWER),
            wrong=_pad(wrong_ids, PAD_ANSWER),
            answer_pos=torch.tensor([len(ids) - 1 for ids in clean_ids], dtype=torch.long),
            metric=get_metric(metric),
            prompts=Dataset.from_dict(columns),
            pad_id=tok.pad_id,
            vocab=VocabSignature.of(model),
            seed=seed,
        )

    @classmethod
    def from_dataset(
        cls,
        model: TransformerBridge,
        prompts: Dataset,
        *,
        name: str = "custom",
        metric: str | Metric = "logit_diff",
        seed: int | None = None,
    ) -> Task:
        """Rebuild a task from its ``prompts`` (e.g. after ``task.prompts.to_json(path)``).

        The dataset needs the columns ``clean``, ``corrupted``, ``answers`` and ``wrong``;
        any other columns are kept.
        """
        missing = {"clean", "corrupted", "answers", "wrong"} - set(prompts.column_names)
        if missing:
            raise TaskError(
                f"the prompts dataset lacks the column(s) {sorted(missing)}; it needs clean, "
                "corrupted, answers and wrong"
            )
        core = ("clean", "corrupted", "answers", "wrong")
        extra = {key: prompts[key] for key in prompts.column_names if key not in core}
        return cls.from_pairs(
            model,
            prompts["clean"],
            prompts["corrupted"],
            prompts["answers"],
            prompts["wrong"],
            name=name,
            metric=metric,
            seed=seed,
            extra=extra,
        )


def _check_column(column: object, label: str, name: str) -> None:
    """TaskError unless ``column`` is a list with one item per prompt.

    A bare string is a sequence too, of characters; taken as a column it would make one
    prompt per character, so it is refused by name.
    """
    if isinstance(column, str):
        raise TaskError(
            f"{label} of task {name!r} is one string ({column!r:.60}), but it takes one item "
            f"per prompt: wrap it in a list, {label}=[{column!r:.40}]"
        )
    if not isinstance(column, Sequence):
        raise TaskError(
            f"{label} of task {name!r} must be a list with one item per prompt, got "
            f"{type(column).__name__}"
        )


def _as_column(prompt: Prompt) -> Any:
    return prompt if isinstance(prompt, str) else [int(t) for t in prompt]


def _as_list_column(answer: Answer) -> list[Any]:
    if isinstance(answer, str | int):
        return [answer]
    return list(answer)


def _pad(rows: list[list[int]], value: int) -> Int[Tensor, "batch width"]:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
