"""The error every task builder raises, in a module of its own so that ``task.py`` and
``tokenize.py`` share it without importing each other."""

from __future__ import annotations

__all__ = ["TaskError"]


class TaskError(ValueError):
    """Prompts or answers that cannot make a task; the message names the bad item."""
