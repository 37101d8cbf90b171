"""The library's own progress bars, and one switch that hides them.

Long work (prompt generation, patching sweeps, attribution chunks) shows a transient tqdm
bar when it has enough steps to be worth one. A caller that shows its own bar over many
such calls (a study) hides theirs with ``hidden_bars()``: a context variable that every
bar here reads when it is made, so nothing is patched and each thread or Ray worker
decides for itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar, cast

from tqdm import tqdm

__all__ = ["hidden_bars", "progress_bar"]

T = TypeVar("T")

_HIDDEN: ContextVar[bool] = ContextVar("reuse_lens_bars_hidden", default=False)


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    show_from: int = 1,
    **kwargs: Any,
) -> tqdm[T]:
    """A transient tqdm bar over ``iterable`` (or ``total`` steps), shown when the work has
    at least ``show_from`` steps and no caller has hidden the library's bars."""
    length = total if total is not None else len(iterable)  # type: ignore[arg-type]
    if _HIDDEN.get() or length < show_from:
        kwargs["disable"] = True  # otherwise tqdm's default, which TQDM_DISABLE=1 sets
    bar = tqdm(iterable, desc=desc, total=total, leave=False, **kwargs)
    return cast("tqdm[T]", bar)


@contextlib.contextmanager
def hidden_bars() -> Iterator[None]:
    """Hide the progress bars made inside: the library's own, and model loading's
    (``transformers``' and ``huggingface_hub``'s, through their own switches)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from huggingface_hub.utils import enable_progress_bars as enable_hub
    from transformers.utils import logging as hf_logging

    token = _HIDDEN.set(True)
    hub_was_on = not are_progress_bars_disabled()
    hf_was_on = hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        _HIDDEN.reset(token)
        if hub_was_on:
            enable_hub()
        if hf_was_on:
            hf_logging.enable_progress_bar()
