"""Attention scaffolds: the positions each step supervises, counted by hand, and the loss."""

from __future__ import annotations

import math

import pytest
import torch

from reuse_lens.zoo.hints import AttentionHint, hint_loss, hint_targets
from reuse_lens.zoo.language import Document, encode, zoo_tokenizer


def _targets(doc: Document) -> dict[str, list[tuple[int, int]]]:
    tokenizer = zoo_tokenizer()
    [(ids, targets)] = encode(tokenizer, [doc])
    return hint_targets(doc.source, ids, targets, tokenizer.get_vocab())


def test_colored_objects_steps() -> None:
    # BOS Q : On the desk , I see a red(14) pen , a blue cup(15) , and a black hat .
    # What color is the cup(26) ? \n A :(30) Blue
    doc = Document(
        "colored_objects",
        "Q: On the desk, I see a red pen, a blue cup, and a black hat. What color is the cup?\nA:",
        " Blue",
    )
    assert _targets(doc) == {"prev": [(15, 14)], "look": [(26, 15)], "move": [(30, 26)]}


def test_entity_tracking_steps() -> None:
    # BOS The cup is in box M , the pen(9) is in box G(13) . Box G(16) contains the(18) pen
    doc = Document(
        "entity_tracking", "The cup is in box M, the pen is in box G. Box G contains the", " pen"
    )
    assert _targets(doc) == {"prev": [(13, 9)], "look": [(16, 13)], "move": [(18, 16)]}


def test_induction_steps() -> None:
    # BOS pen lake(2) card(3) siege pen(5) lake(6) -> card: at the repeat's pen the
    # induction head reads lake, at its lake it reads card.
    doc = Document("induction", " pen lake card siege pen lake", " card")
    assert _targets(doc) == {"look": [(5, 2), (6, 3)], "prev": [(2, 1), (3, 2)]}


def test_a_document_of_another_shape_fails_loudly() -> None:
    doc = Document("colored_objects", "Q: What color is the sky? It is", " Blue")
    with pytest.raises(ValueError, match="does not end"):
        _targets(doc)


def test_unknown_step_is_refused() -> None:
    with pytest.raises(ValueError, match="no attention hint 'move' for task 'induction'"):
        AttentionHint("induction", "move", 0)


def _pattern(weights: list[list[float]]) -> torch.Tensor:
    """One layer's attention, (row, head, query 1, key 3): row r's head h puts
    ``weights[r][h]`` on key 1 (the target) and the rest on key 0."""
    pattern = torch.zeros(len(weights), len(weights[0]), 2, 3)
    for r, row in enumerate(weights):
        for h, w in enumerate(row):
            pattern[r, h, 1, 1] = w
            pattern[r, h, 1, 0] = 1 - w
    return pattern


def test_a_fixed_head_is_supervised() -> None:
    pattern = _pattern([[0.5, 0.25], [0.5, 1.0]])
    targets = {("induction", "look"): [(0, 1, 1), (1, 1, 1)]}
    loss = hint_loss([AttentionHint("induction", "look", 0, head=1)], [pattern], targets)
    assert loss.item() == pytest.approx(-math.log(0.25 + 1e-6) - math.log(1 + 1e-6), rel=1e-5)


def test_a_free_head_is_one_head_for_the_whole_batch() -> None:
    # Each row has some head on its target (per-row max: loss 0), but no one head does it
    # for both rows: the head that attends most on average (head 1) must learn the other.
    pattern = _pattern([[1.0, 0.5], [0.0, 1.0]])
    targets = {("induction", "look"): [(0, 1, 1), (1, 1, 1)]}
    loss = hint_loss([AttentionHint("induction", "look", 0)], [pattern], targets)
    assert loss.item() == pytest.approx(-math.log(0.5 + 1e-6) - math.log(1 + 1e-6), rel=1e-5)


def test_hints_of_absent_tasks_add_nothing() -> None:
    pattern = _pattern([[0.5, 0.5]])
    loss = hint_loss([AttentionHint("colored_objects", "look", 0)], [pattern], {})
    assert loss.item() == 0.0
