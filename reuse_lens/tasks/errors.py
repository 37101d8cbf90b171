"""The error and the warning every task builder raises, in a module of their own so that
``task.py`` and ``tokenize.py`` share them without importing each other."""

from __future__ import annotations

__all__ = ["TaskError", "TaskWarning"]


class TaskError(ValueError):
    """Prompts or answers that cannot make a task; the message names the bad item."""


class TaskWarning(UserWarning):
    """A task that was built but may not be what was meant (repeated prompts, text the
    tokenizer may not reproduce); the message says what to change."""
