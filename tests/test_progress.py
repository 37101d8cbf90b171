"""The library's progress bars and the switch a study uses to hide them."""

from __future__ import annotations

import threading

import pytest
from transformers.utils import logging as hf_logging

from reuse_lens._progress import hidden_bars, progress_bar


def test_a_bar_shows_only_for_long_enough_work() -> None:
    assert not progress_bar(range(20), desc="x", show_from=20).disable
    assert progress_bar(range(19), desc="x", show_from=20).disable
    assert progress_bar(total=3, desc="x", show_from=8).disable


def test_hidden_bars_hides_ours_and_model_loadings_then_restores_them() -> None:
    assert hf_logging.is_progress_bar_enabled()
    with pytest.raises(RuntimeError), hidden_bars():
        assert progress_bar(range(100), desc="x").disable
        assert not hf_logging.is_progress_bar_enabled()
        raise RuntimeError("a unit fails")
    assert not progress_bar(range(100), desc="x").disable
    assert hf_logging.is_progress_bar_enabled()


def test_hiding_is_per_thread_not_global() -> None:
    seen: list[bool] = []
    with hidden_bars():
        worker = threading.Thread(
            target=lambda: seen.append(progress_bar(range(9), desc="x").disable)
        )
        worker.start()
        worker.join()
    assert seen == [False]
