"""The HTML report: one self-contained file that opens offline, in any browser.

plotly.js is embedded once in ``<head>`` and every figure is a ``<div>`` that calls it,
so the file needs no network (no CDN, no web fonts) and can be mailed or archived as is.
Every piece of text is HTML-escaped, because task and model names come from users.

:func:`write` renders a study (the main job's results); :func:`write_comparison` renders
the overlap of a plain set of circuits (``reuse-lens compare``). Both are built with
:class:`HtmlReport`, which can also assemble custom reports.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from reuse_lens import plot
from reuse_lens._io import write_text_atomic
from reuse_lens.report import _finetune as finetune
from reuse_lens.report import _overlap as sections

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from reuse_lens.circuits.circuit import Circuit
    from reuse_lens.compare.edges import EdgeOverlapReport
    from reuse_lens.compare.overlap import OverlapReport

__all__ = ["FAITHFUL", "HtmlReport", "StudyLike", "write", "write_comparison"]

FAITHFUL = 0.8
"""Faithfulness below which a circuit is flagged: it explains too little of the model."""

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1200px;padding:1rem 2rem;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.3rem}
h2{margin-top:2.5rem;border-bottom:1px solid #eee}
nav.toc{background:#f7f7f9;border:1px solid #e3e3e8;padding:.5rem 1.5rem;margin:1rem 0}
nav.toc ol{margin:.2rem 0;padding-left:1.2rem}
table.data{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem;max-width:100%}
.table{overflow-x:auto;max-width:100%}
table.data th,table.data td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;
font-variant-numeric:tabular-nums;overflow-wrap:break-word;vertical-align:top}
details{margin:.5rem 0 1rem}
details table.data{font-size:.78rem}
details table.data th,details table.data td{padding:.2rem .35rem}
details>summary{cursor:pointer;color:#2c6fbb}
.refused{color:#b00020}
table.data th{background:#f0f0f4}
.figure{margin:1rem 0;min-height:300px}
.caption{color:#555;font-size:.9rem}
.flag{color:#b00020;font-weight:bold}
.ok{color:#1b7f3b}
.empty{color:#777;font-style:italic}
ul.answer{font-size:1.05rem;background:#f3f7fc;border-left:4px solid #2c6fbb;
padding:.6rem 1rem .6rem 2rem}
"""


# A figure drawn inside a closed <details> has no width; redraw it to the page's when the
# reader opens it.
_RESIZE_OPENED = (
    "document.addEventListener('toggle', function (e) {"
    " if (!e.target.open) return;"
    " e.target.querySelectorAll('.js-plotly-plot').forEach(function (div) {"
    " Plotly.Plots.resize(div); }); }, true);"
)


class StudyLike(Protocol):
    """What :func:`write` reads from a study result (``reuse_lens.study.StudyResult``)."""

    @property
    def config(self) -> Any: ...
    @property
    def models(self) -> Mapping[str, str]: ...
    @property
    def evaluations(self) -> pd.DataFrame: ...
    @property
    def circuits(self) -> Mapping[str, Circuit]: ...
    @property
    def scores(self) -> Mapping[str, Any]: ...
    @property
    def curves(self) -> Mapping[str, plot.CurveLike]: ...
    @property
    def circuit_table(self) -> pd.DataFrame: ...
    @property
    def method_agreement(self) -> pd.DataFrame: ...
    @property
    def task_overlap(self) -> OverlapReport | None: ...
    @property
    def model_overlap(self) -> Mapping[str, OverlapReport]: ...
    @property
    def within_model(self) -> Mapping[str, OverlapReport]: ...
    @property
    def stability(self) -> pd.DataFrame: ...
    @property
    def cross_task(self) -> pd.DataFrame: ...
    @property
    def cross_model(self) -> pd.DataFrame: ...
    @property
    def cross_ablation(self) -> pd.DataFrame: ...
    @property
    def interventions(self) -> Sequence[Mapping[str, Any]]: ...
    @property
    def findings(self) -> Sequence[str]: ...
    @property
    def seconds(self) -> float: ...


class HtmlReport:
    """An HTML document built section by section; :meth:`render` adds the table of contents.

    Every ``add_*`` method escapes the text it is given (except :meth:`add_raw`); figures
    are plotly figures, drawn with whatever template they were made with.
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self._body: list[str] = []
        self._toc: list[tuple[int, str, str]] = []  # (level, anchor, text)
        self._anchors: set[str] = set()
        self._n_figures = 0
        self._contents_at = 0  # the contents list goes before this many body parts

    def add_heading(self, text: str, *, level: int = 2, anchor: str | None = None) -> str:
        """Add an ``<h2>`` (or ``<h3>``) listed in the table of contents; returns its anchor."""
        if level not in (2, 3):
            raise ValueError(f"heading level must be 2 (section) or 3 (subsection), got {level}")
        anchor = self._unique_anchor(anchor or text)
        self._toc.append((level, anchor, text))
        self._body.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')
        return anchor

    def add_text(self, text: str, *, css_class: str | None = None) -> None:
        """Add a paragraph of plain text (escaped)."""
        cls = f' class="{html.escape(css_class)}"' if css_class else ""
        self._body.append(f"<p{cls}>{html.escape(text)}</p>")

    def add_list(self, items: Sequence[str]) -> None:
        """Add a bullet list of plain-text items (escaped)."""
        rows = "".join(f"<li>{html.escape(str(item))}</li>" for item in items)
        self._body.append(f"<ul>{rows}</ul>")

    def add_table(
        self,
        df: pd.DataFrame,
        *,
        caption: str | None = None,
        index: bool = False,
        names: Mapping[str, str] | None = None,
        key: Sequence[str] | None = None,
    ) -> None:
        """Add a DataFrame as a table: cells escaped, floats to three significant digits.

        Values under 1e-3 keep scientific notation, since a p-value of 1e-9 and one of
        1e-4 say different things. Long cells wrap, so a table fits the page's column.

        Arguments:
            df: the table.
            caption: a line above it.
            index: show the index as a first column.
            names: column names as a reader sees them, by the frame's names (columns
                not named keep theirs).
            key: the columns (the frame's names) of a short table shown first; the whole
                table then follows, folded, under "All columns". None: the whole table.
        """
        cap = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""
        if df.empty:
            self._body.append(f'{cap}<p class="empty">No rows.</p>')
            return
        short = [c for c in key if c in df.columns] if key is not None else []
        if short and len(short) < len(df.columns):
            full = _html_table(df, index, names)
            self._body.append(
                f"{cap}{_html_table(df.loc[:, short], index, names)}<details><summary>All "
                f"{len(df.columns)} columns</summary>{full}</details>"
            )
            return
        self._body.append(cap + _html_table(df, index, names))

    def add_folded(self, summary: str) -> None:
        """Open a folded part (``<details>``) whose line reads ``summary``; what is added
        next is inside it until :meth:`end_folded`. Figures inside are drawn when opened."""
        self._body.append(f"<details><summary>{html.escape(summary)}</summary>")

    def end_folded(self) -> None:
        """Close the folded part :meth:`add_folded` opened."""
        self._body.append("</details>")

    def add_figure(
        self, fig: go.Figure, *, name: str, key: str | None = None, caption: str | None = None
    ) -> None:
        """Add a plotly figure in ``<div class="figure" data-figure=name data-key=key>``.

        The figure's JavaScript calls the plotly.js that :meth:`render` embeds once.
        """
        self._n_figures += 1
        body = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"figure-{self._n_figures}",
            default_height="480px",
        )
        attrs = f'class="figure" data-figure="{html.escape(name)}"'
        if key is not None:
            attrs += f' data-key="{html.escape(key)}"'
        cap = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""
        self._body.append(f"<div {attrs}>{body}{cap}</div>")

    def add_contents(self) -> None:
        """Put the table of contents here, rather than straight after the title.

        A report that leads with its answer calls this after the answer.
        """
        self._contents_at = len(self._body)

    def add_raw(self, markup: str) -> None:
        """Add markup as is; the caller escapes any text inside it."""
        self._body.append(markup)

    def render(self) -> str:
        """The whole document: head with CSS and plotly.js, title, contents, body."""
        from plotly.offline import get_plotlyjs

        title = html.escape(self.title)
        return "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en">',
                "<head>",
                '<meta charset="utf-8">',
                '<meta name="viewport" content="width=device-width, initial-scale=1">',
                f"<title>{title}</title>",
                f"<style>{_CSS}</style>",
                # MathJax stays off: plotly would otherwise look for it on a CDN.
                "<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>",
                f'<script type="text/javascript">{get_plotlyjs()}</script>',
                f"<script>{_RESIZE_OPENED}</script>",
                "</head>",
                "<body>",
                f"<h1>{title}</h1>",
                *self._body[: self._contents_at],
                self._render_toc(),
                *self._body[self._contents_at :],
                "</body>",
                "</html>",
                "",
            ]
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Render to ``path`` atomically: a reader never sees a half-written report."""
        return _atomic_write(Path(path), self.render())

    def _render_toc(self) -> str:
        items: list[str] = []
        open_sub = False
        for level, anchor, text in self._toc:
            link = f'<a href="#{anchor}">{html.escape(text)}</a>'
            if level == 2 or not items:  # a subsection before any section is listed as one
                items.append("</ol></li>" if open_sub else "</li>" if items else "")
                items.append(f"<li>{link}")
                open_sub = False
            else:
                items.append("" if open_sub else "<ol>")
                items.append(f"<li>{link}</li>")
                open_sub = True
        if items:
            items.append("</ol></li>" if open_sub else "</li>")
        return f'<nav class="toc"><strong>Contents</strong><ol>{"".join(items)}</ol></nav>'

    def _unique_anchor(self, text: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
        anchor, n = base, 1
        while anchor in self._anchors:
            n += 1
            anchor = f"{base}-{n}"
        self._anchors.add(anchor)
        return anchor


def write(
    path: str | os.PathLike[str],
    study: StudyLike,
    *,
    title: str | None = None,
) -> Path:
    """Write the report of a study as one self-contained HTML file.

    The report opens with the answer (``reuse_lens.report.summary.study_answer``, the
    same sentences as results.md and the terminal): which tasks reuse which heads and
    MLPs, whether that survives the correction for testing every pair, and which tasks
    the models do not do; then the Jaccard matrix of the tasks with the significant
    pairs marked. The contents list follows, then: summary and findings, whether each
    model does each task, the comparisons (task overlap, edge overlap when the study has
    ``edge_overlap``, model overlap per task, tasks inside each fine-tune, cross-task /
    cross-model / cross-ablation matrices, interventions), and last the circuits: their
    table, faithfulness curves, and each circuit's heatmap and diagram, folded.

    A study whose ``task_overlap`` is None (fewer than two tasks had a circuit) gets
    every section it has data for, and says why the tasks were not compared.

    Arguments:
        path: the file to write; missing parent folders are created.
        study: a ``StudyResult`` (anything with its attributes, see :class:`StudyLike`).
        title: the page title; by default it names the base model.

    Returns:
        The path written.
    """
    from reuse_lens.report.summary import study_answer

    path = _check_target(path)
    base = str(getattr(study.config, "base", "") or study.models.get("base", "model"))
    report = HtmlReport(title or f"reuse_lens study of {base}")
    edges: EdgeOverlapReport | None = getattr(study, "edge_overlap", None)
    analyses = getattr(study, "fine_tuning", None) or {}
    claims = getattr(study, "claims", None) or []
    overlap = study.task_overlap
    sections.answer_section(report, overlap, edges, what="tasks", sentences=study_answer(study))
    report.add_contents()
    if analyses:
        finetune.fine_tuning_section(report, analyses, claims)
    _summary(report, study, base)
    _evaluations(report, study)
    report.add_heading("Task overlap")
    if overlap is None:
        report.add_text(
            "Not compared: fewer than two tasks had a circuit in the base model (see "
            "Model evaluations for why).",
            css_class="empty",
        )
    else:
        sections.overlap_section(report, overlap, key="tasks")
    report.add_table(
        study.stability, names=_STABILITY_NAMES,
        caption="Within-task stability: the mean Jaccard of circuits found on bootstrap "
        "resamples of a task's prompts, the ceiling for its overlap with other tasks.",
    )  # fmt: skip
    if edges is not None:
        sections.edge_overlap_section(report, edges)
    sections.model_overlap_section(report, study.model_overlap)
    if study.within_model:
        sections.model_overlap_section(
            report, study.within_model, title="Tasks inside each fine-tuned model",
            heading="IOI and the fine-tune's own task, inside {}",
        )  # fmt: skip
    _matrices(report, study)
    report.add_heading("Interventions")
    report.add_table(
        _interventions(study.interventions), names=_INTERVENTION_NAMES,
        key=["name", "task", "heads", "accuracy_before", "accuracy_after"],
        caption="Targeted ablations.",
    )  # fmt: skip
    _circuits(report, study)
    report.add_heading("Method agreement")
    report.add_table(
        study.method_agreement, names=_AGREEMENT_NAMES,
        caption="Jaccard of circuits found by two methods.",
    )  # fmt: skip
    return report.write(path)


def write_comparison(
    path: str | os.PathLike[str],
    report: OverlapReport,
    *,
    edges: EdgeOverlapReport | None = None,
    title: str | None = None,
) -> Path:
    """Write the overlap of a set of circuits (``reuse-lens compare``) as one HTML file.

    Opens with the answer (what the circuits share, and whether it survives correction)
    and the Jaccard matrix; then the contents, the overlap grid, Jaccard matrices, UpSet
    plot, threshold sweep (when every circuit has node scores), the pairwise statistics,
    the edge overlap when ``edges`` is given, and a diagram of each circuit.
    """
    path = _check_target(path)
    doc = HtmlReport(title or "Circuit overlap: " + ", ".join(report.names))
    sections.answer_section(doc, report, edges, what="circuits")
    doc.add_contents()
    doc.add_heading("Circuits")
    doc.add_table(_circuit_sizes(report.circuits))
    doc.add_heading("Overlap")
    sections.overlap_section(doc, report, key="circuits")
    if edges is not None:
        sections.edge_overlap_section(doc, edges)
    doc.add_heading("Circuit diagrams")
    for name, circuit in report.circuits.items():
        doc.add_heading(name, level=3)
        doc.add_figure(plot.circuit_diagram(circuit), name="circuit_diagram", key=name)
    return doc.write(path)


# ------------------------------------------------------------------- sections


def _summary(report: HtmlReport, study: StudyLike, base: str) -> None:
    report.add_heading("Summary")
    tasks = getattr(study.config, "tasks", ()) or ()
    fine_tuned = getattr(study.config, "fine_tuned", {}) or {}
    rows = [
        ("model", base),
        ("tasks", ", ".join(map(str, tasks)) or "–"),
        ("fine-tuned models", ", ".join(f"{t}: {m}" for t, m in fine_tuned.items()) or "–"),
        ("runtime", _duration(study.seconds)),
    ]
    report.add_raw(_key_value_table(rows))
    report.add_heading("Findings", level=3)
    if study.findings:
        report.add_list(list(study.findings))
    else:
        report.add_text("No findings were recorded.", css_class="empty")
    report.add_folded("Configuration")
    report.add_raw(_key_value_table(_config_items(study.config)))
    report.end_folded()


def _evaluations(report: HtmlReport, study: StudyLike) -> None:
    """Every model on every task, whether it does the task, and why refused tasks were."""
    import pandas as pd

    from reuse_lens.report.summary import evaluation_rows

    report.add_heading("Model evaluations")
    refused = getattr(study, "refused", None) or {}
    if refused:
        report.add_text(
            "No circuit was looked for where the model does not do the task: the clean − "
            "corrupted gap's 95% interval must exclude 0 and the gap reach 1 standard "
            "deviation of the metric over prompts.",
            css_class="refused",
        )
        report.add_list([f"{key.split('/')[0]} on {test.line()}" for key, test in refused.items()])
    rows = pd.DataFrame(evaluation_rows(study.evaluations))
    report.add_table(
        rows,
        key=["model", "task", "accuracy", "gap (clean − corrupted metric)", "95% interval",
             "effect (spreads)", "does the task"],
        caption="Accuracy (the answer is the top-1 token) and logit difference of each "
        "model on each task; gap: the task's metric on clean minus corrupted prompts, with "
        "its 95% bootstrap interval; effect: the gap in standard deviations of the metric.",
    )  # fmt: skip


def _circuits(report: HtmlReport, study: StudyLike) -> None:
    import pandas as pd

    from reuse_lens.report.summary import circuit_rows

    report.add_heading("Circuits")
    if not study.circuits:
        report.add_text("The study found no circuits.", css_class="empty")
        return
    table = pd.DataFrame(circuit_rows(study.circuit_table))
    interval = " (with its 95% interval over prompts)" if "95% interval" in table.columns else ""
    report.add_table(
        table,
        caption=f"Every circuit, its size and faithfulness{interval}, against random "
        "circuits of the same size.",
    )
    _curves(report, study.curves)
    report.add_heading("Each circuit", level=3)
    report.add_text(
        "Each circuit's patching heatmap and diagram, folded: click a circuit to open it.",
        css_class="caption",
    )
    rows = _rows_by_key(study.circuit_table)
    for key, circuit in study.circuits.items():
        report.add_folded(f"Circuit {key}: {_plain_line(circuit, rows.get(key))}")
        report.add_raw(_circuit_line(circuit, rows.get(key)))
        if key in study.scores:
            report.add_figure(
                plot.patching_heatmap(study.scores[key]), name="patching_heatmap", key=key,
                caption=HEATMAP_CAPTION,
            )  # fmt: skip
        report.add_figure(plot.circuit_diagram(circuit), name="circuit_diagram", key=key)
        report.end_folded()


HEATMAP_CAPTION = (
    "Colour: each node's patching effect, the metric with the node patched minus without. "
    "Red: patching it lowers the metric (the task needs the node); blue: raises it; "
    "white: no effect."
)
"""What the colours of a patching heatmap mean, under every one in the report."""


def _curves(report: HtmlReport, curves: Mapping[str, plot.CurveLike]) -> None:
    report.add_heading("Faithfulness curves", level=3)
    if not curves:
        report.add_text("No faithfulness curves were computed.", css_class="empty")
        return
    by_task: dict[str, dict[str, plot.CurveLike]] = {}
    for key, curve in curves.items():
        by_task.setdefault(str(curve.task), {})[key] = curve
    for task, group in by_task.items():
        report.add_figure(plot.faithfulness_curves(group), name="faithfulness_curves", key=task)


def _matrices(report: HtmlReport, study: StudyLike) -> None:
    report.add_heading("Cross-task and cross-model faithfulness")
    matrices = (
        ("cross_task", study.cross_task, "task's circuit", "evaluated on task", "faithfulness"),
        ("cross_model", study.cross_model, "task's base circuit", "model", "faithfulness"),
        ("cross_ablation", study.cross_ablation, "ablated circuit", "damaged task", "damage"),
    )
    titles = {
        "cross_task": "Faithfulness of each task's circuit on each task",
        "cross_model": "Faithfulness of each base circuit in each model",
        "cross_ablation": "Damage to each task when a circuit is ablated "
        "(1 − faithfulness of the rest of the model; above 1: worse than ablating everything)",
    }
    for key, df, rows, columns, value_name in matrices:
        if df.empty:
            report.add_text(f"{titles[key]}: not computed.", css_class="empty")
            continue
        named = df.rename_axis(index=df.index.name or rows, columns=df.columns.name or columns)
        fig = plot.faithfulness_matrix(named, title=titles[key], value_name=value_name)
        report.add_figure(fig, name="faithfulness_matrix", key=key, caption=_MATRIX_CAPTIONS[key])


_MATRIX_CAPTIONS = {
    "cross_task": "Colour: darker blue is a higher faithfulness; 1 = the row's circuit "
    "alone does all of the column's task, 0 = no more than with everything ablated.",
    "cross_model": "Colour: darker blue is a higher faithfulness of the base circuit inside "
    "the column's model; 1 = it does all of the task there.",
    "cross_ablation": "Colour: darker blue is more damage; 0 = ablating the row's circuit "
    "leaves the column's task intact, 1 = as bad as ablating every node.",
}

_STABILITY_NAMES = {"mean_jaccard": "mean Jaccard", "std_jaccard": "std", "n_boot": "resamples"}
_AGREEMENT_NAMES = {
    "method_a": "method a", "method_b": "method b", "jaccard": "Jaccard",
    "jaccard_heads": "Jaccard heads", "jaccard_mlps": "Jaccard MLPs",
}  # fmt: skip
_INTERVENTION_NAMES = {
    "accuracy_before": "accuracy before", "accuracy_after": "accuracy after",
    "metric_before": "metric before", "metric_after": "metric after",
    "random_metric": "random heads' metric", "random_metric_std": "random std",
}  # fmt: skip


# ------------------------------------------------------------------- helpers


def _html_table(df: pd.DataFrame, index: bool, names: Mapping[str, str] | None) -> str:
    if names:
        df = df.rename(columns={c: names[c] for c in df.columns if c in names})
    formatters: dict[Any, Callable[[Any], str]] = {col: _format_cell for col in df.columns}
    table = df.to_html(
        escape=True,
        index=index,
        border=0,
        classes="data",
        na_rep="–",
        formatters=formatters,  # type: ignore[arg-type]
    )
    return f'<div class="table">{_break_after(table)}</div>'


def _break_after(markup: str) -> str:
    """Let long names wrap after ``_``, ``/`` and ``.`` (``colored_<wbr>objects``), so
    that tables narrow to the page without cutting words at random letters."""
    return re.sub(
        r">([^<]+)<",
        lambda m: ">" + re.sub(r"([_/](?=\w)|\.(?=[A-Za-z]))", r"\1<wbr>", m.group(1)) + "<",
        markup,
    )


def _plain_line(circuit: Circuit, row: Mapping[str, Any] | None) -> str:
    """The folded circuit's one line: its size and faithfulness, as plain text."""
    text = f"{_count(len(circuit), 'node')}"
    faith = _float(row.get("faithfulness")) if row else math.nan
    if not math.isnan(faith):
        text += f", faithfulness {faith:.2f}" + (" (below 0.8)" if faith < FAITHFUL else "")
    return text


def _circuit_line(circuit: Circuit, row: Mapping[str, Any] | None) -> str:
    """Size, and faithfulness against the random baseline, flagged below ``FAITHFUL``."""
    size = (
        f"{_count(len(circuit), 'node')} ({_count(len(circuit.heads), 'head')}, "
        f"{_count(len(circuit.mlps), 'MLP')}), {_count(len(circuit.edges), 'edge')}"
    )
    parts = [html.escape(size)]
    faith = _float(row.get("faithfulness")) if row else math.nan
    if not math.isnan(faith):
        mean = _float(row.get("random_mean")) if row else math.nan
        std = _float(row.get("random_std")) if row else math.nan
        low = _float(row.get("faithfulness_low")) if row else math.nan
        high = _float(row.get("faithfulness_high")) if row else math.nan
        interval = "" if math.isnan(low) else f" (95% interval {low:.3f} to {high:.3f})"
        text = (
            f"faithfulness {faith:.3f}{interval} vs random circuits of the same size "
            f"{mean:.3f} ± {std:.3f}"
        )
        if faith < FAITHFUL:
            parts.append(
                f'<span class="flag">{html.escape(text)} — below {FAITHFUL}: '
                "this circuit does not explain the task</span>"
            )
        else:
            parts.append(f'<span class="ok">{html.escape(text)}</span>')
    return '<p class="circuit">' + "; ".join(parts) + "</p>"


def _rows_by_key(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    if "key" not in table.columns:
        return {}
    return {str(row["key"]): row for row in table.to_dict("records")}


def _circuit_sizes(circuits: Mapping[str, Circuit]) -> pd.DataFrame:
    """Each circuit's task, method and size, and its faithfulness (with its interval)
    where its metadata records them."""
    import pandas as pd

    rows = []
    for name, c in circuits.items():
        row: dict[str, Any] = {
            "circuit": name,
            "task": str(c.metadata.get("task", "–")),
            "method": str(c.metadata.get("method", "–")),
            "nodes": len(c),
            "heads": len(c.heads),
            "MLPs": len(c.mlps),
            "edges": len(c.edges),
        }
        if "faithfulness" in c.metadata:
            row["faithfulness"] = float(c.metadata["faithfulness"])
        if (interval := c.metadata.get("faithfulness_interval")) is not None:
            low, high = (_format_cell(float(v)) for v in interval)
            row["95% interval"] = f"[{low}, {high}]"
        rows.append(row)
    return pd.DataFrame(rows)


def _interventions(interventions: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    rows = [
        {k: ", ".join(map(str, v)) if isinstance(v, list | tuple) else v for k, v in i.items()}
        for i in interventions
    ]
    return pd.DataFrame(rows)


def _config_items(config: Any) -> list[tuple[str, str]]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        items = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping):
        items = dict(config)
    else:
        items = dict(vars(config)) if hasattr(config, "__dict__") else {"config": config}
    return [(str(k), _plain(v)) for k, v in items.items()]


def _plain(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "–"
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(map(str, value)) or "–"
    return str(value)


def _key_value_table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<div class="table"><table class="data">{body}</table></div>'


def _format_cell(value: Any) -> str:
    """Floats to three significant digits (tiny ones in scientific notation); yes or no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, float | int):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "–"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.3g}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _duration(seconds: float) -> str:
    total = round(float(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min {secs} s"
    return f"{minutes} min {secs} s" if minutes else f"{float(seconds):.1f} s"


def _check_target(path: str | os.PathLike[str]) -> Path:
    """Refuse a folder before any work is done, rather than after rendering."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{target} is a folder; pass a file path such as {target / 'report.html'}")
    return target


def _atomic_write(path: Path, text: str) -> Path:
    return write_text_atomic(_check_target(path), text)
