"""One page over several studies: each study's answer first, then a link to its report.

``reuse-lens demo`` runs two studies of the zoo (``zoo:base`` and ``zoo:wide``) into two
folders; ``write_index`` writes the page that opens with both answers. The answers are
read back from each study's ``summary.json`` (the same sentences its report opens with),
so the page is a view of the studies' own files and says nothing they do not.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reuse_lens._io import write_text_atomic

__all__ = ["study_answer", "write_index"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1200px;padding:1rem 2rem;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.3rem}
ul.answer li{margin:.3rem 0}
"""


def study_answer(summary: Mapping[str, Any]) -> list[str]:
    """The sentences a study's report opens with, from its ``summary.json``."""
    return list(summary.get("answer", []))


def write_index(path: str | os.PathLike[str], studies: Mapping[str, Path]) -> Path:
    """Write the page over ``studies`` ({name: the study's output folder}) to ``path``.

    Each study's folder must hold its ``summary.json`` and ``report.html``; the links are
    relative, so the folder can be moved or archived as a whole.
    """
    path = Path(path)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>reuse_lens demo</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>reuse_lens demo: circuit reuse in the zoo</h1>",
    ]
    for name, folder in studies.items():
        summary = json.loads((folder / "summary.json").read_text())
        base = summary.get("config", {}).get("base", name)
        link = os.path.relpath(folder / "report.html", path.parent)
        parts.append(f'<h2 id="{html.escape(name)}">{html.escape(str(base))}</h2>')
        items = "".join(f"<li>{html.escape(s)}</li>" for s in study_answer(summary))
        parts.append(f'<ul class="answer">{items}</ul>')
        parts.append(
            f'<p><a href="{html.escape(link)}">The full report of {html.escape(str(base))}</a> '
            f"(circuits, overlap, faithfulness, {'fine-tuning, ' if summary.get('fine_tuning') else ''}"
            "interventions).</p>"
        )
    parts.append("</body></html>")
    return write_text_atomic(path, "\n".join(parts) + "\n")
