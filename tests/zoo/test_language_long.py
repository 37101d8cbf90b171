"""Long training runs draw more task pairs than one generate() call allows."""

from __future__ import annotations

import pytest

from reuse_lens.tasks import base
from reuse_lens.zoo import language


def _limit(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    # A small limit stands in for MAX_PROMPTS, which a 30000-step run of the mix exceeds.
    monkeypatch.setattr(base, "MAX_PROMPTS", n)
    monkeypatch.setattr(language, "MAX_PROMPTS", n)


def test_a_long_run_draws_its_pairs_in_chunks_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _limit(monkeypatch, 7)  # sva: 40 documents are 20 pairs, drawn as 7 + 7 + 6
    docs = language.task_documents("sva", 40, seed=3)
    assert len(docs) == 40
    # Chunks with one seed would repeat the first 7 pairs: at most 14 distinct documents.
    assert len({d.prompt for d in docs}) > 14


def test_a_run_within_the_limit_keeps_its_data(monkeypatch: pytest.MonkeyPatch) -> None:
    before = language.task_documents("sva", 40, seed=3)
    _limit(monkeypatch, 20)  # exactly one chunk: the seed shorter runs have always used
    assert language.task_documents("sva", 40, seed=3) == before
