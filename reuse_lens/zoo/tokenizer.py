"""The zoo's word-level tokenizer: every word, with its leading space, is one token.

It is a ``tokenizers`` WordLevel model wrapped as ``PreTrainedTokenizerFast``, so the
code that loads it is the code that loads any HF tokenizer. Digits split in pairs, so
" 1732" is " 17" then "32", as in GPT-2, which greater-than relies on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["BOS", "PAD", "PATTERN", "UNK", "build_tokenizer", "pieces", "tokenizer_from_texts"]

BOS = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"
PATTERN = r" ?[A-Za-z]+| ?\d\d| ?\d| ?[^\sA-Za-z\d]|\n"
"""A word or digit pair with its leading space, a punctuation mark, or a newline."""


def _pre_tokenizer() -> Any:
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(PATTERN), behavior="isolated")


def pieces(text: str) -> list[str]:
    """``text`` split the way the tokenizer splits it, before the vocabulary lookup."""
    return [piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text) if piece.strip(" ")]


def build_tokenizer(vocabulary: Iterable[str], *, name_or_path: str = "reuse-lens-zoo") -> Any:
    """A ``PreTrainedTokenizerFast`` whose vocabulary is the specials plus ``vocabulary``.

    Arguments:
        vocabulary: pieces as ``pieces`` returns them (``" Mary"``, ``","``, ``"\\n"``).
        name_or_path: recorded on the tokenizer; TransformerBridge reads it, and a local
            name keeps it from asking the hub (DESIGN.md).
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, PAD: 1, UNK: 2}
    for piece in sorted(set(vocabulary)):
        vocab.setdefault(piece, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = _pre_tokenizer()
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=PAD,
        unk_token=UNK,
        name_or_path=name_or_path,
        add_bos_token=True,
        padding_side="right",
    )


def tokenizer_from_texts(texts: Iterable[str], **kwargs: Any) -> Any:
    """A tokenizer whose vocabulary is every piece of ``texts``."""
    vocabulary: set[str] = set()
    for text in texts:
        vocabulary.update(pieces(text))
    return build_tokenizer(vocabulary, **kwargs)
