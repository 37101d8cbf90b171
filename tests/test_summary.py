"""results.md: it opens with the answer, marks corrected significance, and reads edge overlap."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace
from typing import Any

from reuse_lens.report import summary
from tests.test_report import EVIL, fake_study


def study(**changes: Any) -> Any:
    fake = fake_study()
    values = {f.name: getattr(fake, f.name) for f in fields(fake)}
    values["config"] = SimpleNamespace(**vars(fake.config), ablation="mean", n_random=20, n_boot=5)
    return SimpleNamespace(**{**values, **changes})


def test_results_open_with_the_answer() -> None:
    text = summary.markdown(study())
    answer = text.index("## Which tasks reuse which heads and MLPs, and is it significant?")
    assert answer < text.index("## Findings") < text.index("## How well each model")
    assert "- Heads: no pair of circuits shares more heads than chance after Holm" in text


def test_pair_table_has_corrected_p_and_significance() -> None:
    text = summary.markdown(study())
    header = next(line for line in text.splitlines() if line.startswith("| a | b | shared heads"))
    assert "| corrected | significant | p (heads) |" in header
    row = next(line for line in text.splitlines() if line.startswith(f"| ioi | {EVIL} | a0.h0"))
    assert "| no |" in row  # one pair, p = 0.6: not significant
    assert "after Holm correction over the 1 pairs" in text


def test_edge_tables_only_with_edge_overlap() -> None:
    text = summary.markdown(study())
    assert "## Edges the tasks share (EAP-IG edge circuits, base model)" in text
    # ioi reads a1.h0 through q, EVIL through k; both from a0.h1.
    assert f"| ioi | {EVIL} | a1.h0 | q | a0.h1 | – |" in text
    assert f"| ioi | {EVIL} | a1.h0 | k | – | a0.h1 |" in text
    without = study()
    del without.edge_overlap  # a StudyResult from before the field existed
    assert "## Edges the tasks share" not in summary.markdown(without)
