"""Turning prompt and answer text into token ids for one model, with errors that name the item."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from reuse_lens.tasks.errors import TaskError, TaskWarning

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["TaskTokenizer", "single_token_words"]


class TaskTokenizer:
    """Tokenizes prompts (with BOS) and single-token answers for ``model``.

    Prompts given as token ids pass through unchanged, after a range check, so tasks can be
    built for models with no tokenizer at all.
    """

    def __init__(self, model: TransformerBridge) -> None:
        self.tokenizer: Any = getattr(model, "tokenizer", None)
        self.d_vocab = int(model.cfg.d_vocab)
        self.prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
        tok = self.tokenizer
        pad = (
            None
            if tok is None
            else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        )
        self.pad_id = int(pad) if pad is not None else 0

    def _need_tokenizer(self, what: str, value: object) -> Any:
        if self.tokenizer is None:
            raise TaskError(
                f"{what} is text ({value!r}) but the model has no tokenizer: give token ids "
                "instead, or load a model that has one"
            )
        return self.tokenizer

    def _check_ids(self, ids: list[int], what: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.d_vocab]
        if bad:
            raise TaskError(
                f"{what} has token id(s) {bad} outside the model's vocabulary [0, {self.d_vocab})"
            )
        return ids

    def encode(self, text: str, what: str = "a prompt") -> list[int]:
        """Token ids of ``text`` without special tokens; TaskError where a word is unknown."""
        ids = self._raw(text, what)
        self._check_known(text, ids, what)
        return ids

    def _raw(self, text: str, what: str) -> list[int]:
        tokenizer = self._need_tokenizer(what, text)
        return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]

    def _check_known(self, text: str, ids: list[int], what: str) -> None:
        """Refuse text the tokenizer cannot represent, or warn where it cannot tell.

        A word-level tokenizer maps a word outside its vocabulary to its unknown token, so
        the model would read another text than the user wrote: that is refused, naming the
        words. A tokenizer without an unknown token cannot say so; where its ids do not
        decode back to the text, a TaskWarning shows what the model will read.
        """
        tokenizer = self.tokenizer
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and unk in ids and str(tokenizer.unk_token) not in text:
            unknown = self._unknown_words(text, unk)
            # A word-level vocabulary may hold a word only with its leading space, which a
            # word at the start of a text, or after punctuation, lacks.
            spaced = [w for w in unknown if w[:1] != " " and self.is_word(f" {w}")]
            hint = (
                f" ({', '.join(repr(w) for w in spaced)} is known only with a leading space, "
                "as after another word)"
                if spaced
                else ""
            )
            raise TaskError(
                f"{what} {text!r} has words the tokenizer does not know: {unknown or [text]} "
                f"would be read as {tokenizer.unk_token!r}{hint}. Use words of the model's "
                "vocabulary (rl.tasks.words lists the ones the built-in tasks use)"
            )
        if unk is None and ids:
            decoded = tokenizer.decode(ids)
            if "".join(decoded.split()) != "".join(text.split()):
                warnings.warn(
                    f"{what} {text!r} is read by the model as {decoded!r}: the tokenizer "
                    "does not reproduce it; check the spelling and characters",
                    TaskWarning,
                    stacklevel=5,
                )

    def is_word(self, text: str) -> bool:
        """Whether ``text`` is one known token of the vocabulary."""
        ids = self._ids(text)
        return len(ids) == 1 and ids[0] != getattr(self.tokenizer, "unk_token_id", None)

    def _unknown_words(self, text: str, unk: int) -> list[str]:
        """The pieces of ``text`` read as the unknown token, as the user wrote them.

        Found through the tokenizer's offsets where it gives them (a word glued to
        punctuation, "store.Zyzzyx", is then named alone), else word by word.
        """
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            spans = [
                text[a:b].strip() or text[a:b]  # a lone space is named as itself
                for t, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
                if int(t) == unk
            ]
            if spans and all(spans):
                return list(dict.fromkeys(spans))
        except (TypeError, ValueError, KeyError, NotImplementedError):
            pass  # a slow tokenizer without offsets
        return [w for w in text.split() if unk in self._ids(w) and unk in self._ids(f" {w}")]

    def _ids(self, word: str) -> list[int]:
        tokenizer = self.tokenizer
        return [int(t) for t in tokenizer(word, add_special_tokens=False)["input_ids"]]

    def prompt(self, prompt: str | Sequence[int], what: str) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encode(prompt, what) if prompt.strip() else []
            if not ids:
                raise TaskError(
                    f"{what} is empty ({prompt!r}): a prompt needs at least one token of text "
                    "before the answer"
                )
            bos = getattr(self._need_tokenizer(what, prompt), "bos_token_id", None)
            if self.prepend_bos and bos is not None:
                ids = [int(bos), *ids]
        else:
            ids = self._check_ids(_token_ids(prompt, what), what)
        if not ids:
            raise TaskError(f"{what} is empty")
        return ids

    def answer(self, answer: str | int, what: str) -> int:
        if isinstance(answer, int) and not isinstance(answer, bool):
            return self._check_ids([answer], what)[0]
        if not isinstance(answer, str):
            raise TaskError(f"{what} must be a string or a token id, got {answer!r}")
        ids = self._raw(answer, what)
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([t]) for t in ids]
            hint = "" if answer.startswith(" ") else "; answers usually need a leading space"
            raise TaskError(
                f"{what} {answer!r} is {len(ids)} tokens {pieces}, but answers must be single "
                f"tokens{hint}"
            )
        self._check_known(answer, ids, what)
        return ids[0]

    def answers(
        self, answers: str | int | Sequence[str | int] | Sequence[str] | Sequence[int], what: str
    ) -> list[int]:
        items = [answers] if isinstance(answers, str | int) else list(answers)
        if not items:
            raise TaskError(f"{what} is empty: give at least one answer")
        return [self.answer(a, what) for a in items]


def _token_ids(prompt: object, what: str) -> list[int]:
    """A prompt given as token ids, or TaskError for anything that is neither text nor ids."""
    problem = TaskError(
        f"{what} must be text or a list of token ids, got {type(prompt).__name__} {prompt!r:.80}"
    )
    if isinstance(prompt, bytes) or not isinstance(prompt, Sequence):
        raise problem
    ids = []
    for token in prompt:
        if isinstance(token, bool):
            raise problem
        try:
            ids.append(operator.index(token))
        except TypeError:
            raise problem from None
    return ids


def single_token_words(tokenizer: Any, words: Sequence[str], *, prefix: str = " ") -> list[str]:
    """The words of ``words`` that are one token when written after ``prefix``.

    Generators draw only from these, so that every answer is a single token and clean and
    corrupted prompts keep the same length under any tokenizer. Order is kept, so the
    same seed draws the same words.
    """
    if tokenizer is None:
        return list(words)
    keep = []
    for word in words:
        ids = tokenizer(prefix + word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and tokenizer.unk_token_id not in ids:
            keep.append(word)
    return keep
