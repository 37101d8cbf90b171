"""The HTML report: self-contained, escaped, atomically written, every figure present."""

from __future__ import annotations

import html
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field, fields
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch

from reuse_lens import report
from reuse_lens.circuits import Circuit
from reuse_lens.compare.edges import EdgeOverlapReport, compare_edges
from reuse_lens.compare.overlap import OverlapReport, compare
from reuse_lens.nodes import ModelShape
from reuse_lens.patching.scores import NodeScores

SHAPE = ModelShape(n_layers=2, n_heads=3, has_mlps=True)
EVIL = "<script>alert(1)</script>"  # a task name that must come out as text, never as markup
TASKS = ("ioi", EVIL)


@dataclass(frozen=True)
class Curve:
    """A stand-in for FaithfulnessCurve: the report only reads these fields."""

    task: str
    method: str = "activation"
    fractions: tuple[float, ...] = (0.1, 0.5, 1.0)
    sizes: tuple[int, ...] = (1, 4, 8)
    faithfulness: tuple[float, ...] = (0.2, 0.7, 1.0)
    level: str = "node"
    cpr: float = 0.6
    cmd: float = 0.4


@dataclass
class Config:
    base: str = "zoo:base"
    tasks: tuple[str, ...] = TASKS
    fine_tuned: dict[str, str] = field(default_factory=lambda: {"ioi": "zoo:ft-ioi"})
    methods: tuple[str, ...] = ("activation", "eap-ig")
    n_prompts: int = 16
    seed: int = 0


@dataclass
class FakeStudy:
    """Has every attribute of StudyResult that the report reads, built from real objects."""

    config: Config
    models: dict[str, str]
    evaluations: pd.DataFrame
    circuits: dict[str, Circuit]
    scores: dict[str, NodeScores]
    curves: dict[str, Curve]
    circuit_table: pd.DataFrame
    method_agreement: pd.DataFrame
    task_overlap: OverlapReport
    model_overlap: dict[str, OverlapReport]
    within_model: dict[str, OverlapReport]
    stability: pd.DataFrame
    cross_task: pd.DataFrame
    cross_model: pd.DataFrame
    cross_ablation: pd.DataFrame
    interventions: list[dict[str, Any]]
    findings: list[str]
    seconds: float
    edge_overlap: EdgeOverlapReport | None = None  # optional: the report reads it by getattr


def scores(shift: float) -> NodeScores:
    heads = torch.tensor([[0.5, -0.25, 0.0], [1.0, -0.42, 0.125]]) + shift
    return NodeScores(heads, torch.tensor([0.3, -0.7]), clean=2.0, corrupted=0.0, method="act")


def circuit(nodes: list[str], task: str, ranked: NodeScores | None = None) -> Circuit:
    node_scores = {} if ranked is None else ranked.as_dict()
    return Circuit.from_nodes(nodes, SHAPE, node_scores=node_scores, metadata={"task": task})


def fake_study() -> FakeStudy:
    """Two tasks (one named like an XSS payload), a fine-tune, and an edge circuit."""
    circuits = {
        "base/ioi/activation": circuit(["a0.h0", "a1.h0", "m1"], "ioi", scores(0.0)),
        f"base/{EVIL}/activation": circuit(["a0.h0", "a1.h2"], EVIL, scores(0.1)),
        "ft-ioi/ioi/activation": circuit(["a0.h0", "a1.h0"], "ioi", scores(0.2)),
        "base/ioi/eap-ig": Circuit.from_edges(
            [("input", "a0.h1<v>"), ("a0.h1", "a1.h0<q>"), ("a1.h0", "logits")], SHAPE
        ),
    }
    keys = list(circuits)
    # A second edge circuit, for the edge overlap section: it reads a1.h0 through k, not q.
    evil_edges = Circuit.from_edges(
        [("input", "a0.h1<v>"), ("a0.h1", "a1.h0<k>"), ("a1.h0", "logits")], SHAPE
    )
    # No scores for the edge circuit: it gets a diagram but no heatmap.
    node_scores = {key: scores(0.1 * i) for i, key in enumerate(keys[:3])}
    circuit_table = pd.DataFrame(
        {
            "key": keys,
            "n_nodes": [len(c) for c in circuits.values()],
            "faithfulness": [0.93, 0.41, 0.88, 0.85],
            "random_mean": [0.12, 0.05, 0.1, 0.2],
            "random_std": [0.03, 0.02, 0.04, 0.05],
        }
    )
    task_overlap = compare({t: circuits[f"base/{t}/activation"] for t in TASKS})
    task_overlap = task_overlap.with_stability({"ioi": 0.9, EVIL: 0.75})
    model_overlap = {
        "ioi": compare(
            {"base": circuits["base/ioi/activation"], "ft-ioi": circuits["ft-ioi/ioi/activation"]}
        )
    }
    square = pd.DataFrame([[0.9, 0.3], [0.2, 0.8]], index=list(TASKS), columns=list(TASKS))
    return FakeStudy(
        config=Config(),
        models={"base": "zoo:base", "ft-ioi": "zoo:ft-ioi"},
        evaluations=pd.DataFrame(
            {"model": ["base", "base"], "task": list(TASKS), "accuracy": [0.96875, 0.5]}
        ),
        circuits=circuits,
        scores=node_scores,
        curves={
            keys[0]: Curve("ioi"),
            keys[1]: Curve(EVIL),
            keys[3]: Curve("ioi", method="eap-ig", level="edge"),
        },
        circuit_table=circuit_table,
        method_agreement=pd.DataFrame(
            {"task": ["ioi"], "method_a": ["activation"], "method_b": ["eap-ig"], "jaccard": [0.2]}
        ),
        task_overlap=task_overlap,
        model_overlap=model_overlap,
        within_model={
            "ft-ioi": compare(
                {
                    "ioi": circuits["ft-ioi/ioi/activation"],
                    EVIL: circuits[f"base/{EVIL}/activation"],
                }
            )
        },
        stability=pd.DataFrame({"task": list(TASKS), "mean_jaccard": [0.9, 0.75]}),
        cross_task=square,
        cross_model=pd.DataFrame([[0.9, 0.85]], index=["ioi"], columns=["base", "ft-ioi"]),
        cross_ablation=1.0 - square,
        interventions=[
            {
                "name": "uniform inhibition",
                "task": EVIL,
                "heads": ["a1.h0", "a1.h2"],
                "accuracy_before": 0.496,
                "accuracy_after": 0.937,
            }
        ],
        findings=[f"The {EVIL} circuit reuses 1 of 2 heads of ioi.", "Fine-tuning keeps it."],
        seconds=3725.0,
        edge_overlap=compare_edges({"ioi": circuits["base/ioi/eap-ig"], EVIL: evil_edges}),
    )


# How many figures of each kind fake_study's report has, counted by hand:
EXPECTED_FIGURES = {
    "patching_heatmap": 3,  # one per scored circuit; the edge circuit has no scores
    "circuit_diagram": 4,  # one per circuit
    "faithfulness_curves": 2,  # one per task
    "overlap_grid": 3,  # task overlap, model overlap on ioi, tasks inside ft-ioi
    "jaccard_matrix": 1,  # the answer's, at the top; every figure appears once
    "edge_jaccard_matrix": 1,
    "upset": 1,
    "threshold_sweep": 1,  # both task circuits have node scores
    "faithfulness_matrix": 3,  # cross-task, cross-model, cross-ablation
}


class Collector(HTMLParser):
    """Records tags, attributes, inline script bodies and text, to check the markup."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.starts: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []
        self.scripts: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts.append((tag, dict(attrs)))
        if tag not in {"meta", "br", "link", "wbr"}:  # void elements: no end tag
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "script":
            self.scripts.append(data)
        else:
            self.text.append(data)


def parse(text: str) -> Collector:
    parser = Collector()
    parser.feed(text)
    parser.close()
    assert parser.stack == [], f"unclosed tags: {parser.stack}"
    return parser


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    out = report.write(path, fake_study(), title="Study & <friends>")
    return out, out.read_text(encoding="utf-8")


def test_write_returns_the_path_and_leaves_no_temporary_file(written: tuple[Path, str]) -> None:
    path, _ = written
    assert path.name == "report.html" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600


def test_plotly_js_is_embedded_exactly_once_in_head(written: tuple[Path, str]) -> None:
    from plotly.offline import get_plotlyjs

    _, text = written
    plotly_js = get_plotlyjs()
    assert text.count(plotly_js) == 1
    assert text.index(plotly_js) < text.index("</head>")
    # config, library, and the redraw of figures in folded parts when opened
    assert text.count("<script") - text.count("Plotly.newPlot(") == 3


def test_no_external_resource_is_referenced(written: tuple[Path, str]) -> None:
    _, text = written
    parser = parse(text)
    for tag, attrs in parser.starts:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not re.search(r"https?://|cdn\.|^//", value), (tag, name, value)
        if tag == "link":
            pytest.fail(f"external stylesheet or font: {attrs}")
    links = [a.get("href") for t, a in parser.starts if t == "a"]
    ids = {a.get("id") for _, a in parser.starts}
    assert links and all(h and h.startswith("#") and h[1:] in ids for h in links)


def test_every_figure_is_present(written: tuple[Path, str]) -> None:
    _, text = written
    starts = parse(text).starts
    figures = Counter(a["data-figure"] for t, a in starts if t == "div" and "data-figure" in a)
    assert dict(figures) == EXPECTED_FIGURES
    assert text.count("Plotly.newPlot(") == sum(EXPECTED_FIGURES.values())
    keys = [a.get("data-key") for t, a in starts if a.get("data-figure") == "patching_heatmap"]
    assert keys == ["base/ioi/activation", f"base/{EVIL}/activation", "ft-ioi/ioi/activation"]


def test_overlap_grid_is_the_first_figure_of_the_overlap_section(
    written: tuple[Path, str],
) -> None:
    _, text = written
    section = text[text.index('id="task-overlap"') :]
    first = re.search(r'data-figure="([a-z_]+)"', section)
    assert first is not None and first.group(1) == "overlap_grid"


def test_the_report_leads_with_the_answer(written: tuple[Path, str]) -> None:
    _, text = written
    body = text[text.index("<body>") :]
    answer = body.index('<ul class="answer">')
    matrix = body.index('data-figure="jaccard_matrix"')
    contents = body.index('<nav class="toc">')
    summary = body.index('id="summary"')
    assert answer < matrix < contents < summary  # answer, marked matrix, contents, tables
    first_heading = re.search(r"<h2 [^>]*>([^<]*)</h2>", body)
    assert first_heading is not None
    assert (
        first_heading.group(1) == "Which tasks reuse which heads and MLPs, and is it significant?"
    )
    visible = " ".join("".join(parse(body[answer:matrix]).text).split())
    # 6 heads; ioi {a0.h0, a1.h0} vs EVIL {a0.h0, a1.h2}: one pair, nothing significant.
    assert (
        "Heads: no pair of circuits shares more heads than chance after Holm correction" in visible
    )
    assert f"The strongest is ioi and {EVIL} (shared a0.h0;" in visible  # escaped, as text
    # Two of ioi's three edges are EVIL's too, out of the graph's 75: significant.
    assert "Edges: the two edge circuits share more edges than random edge sets" in visible


def test_edge_overlap_section(written: tuple[Path, str]) -> None:
    _, text = written
    section = text[text.index('id="edge-overlap"') : text.index('id="model-overlap"')]
    assert 'data-figure="edge_jaccard_matrix"' in section
    for column in ("corrected p", "corrected p, senders redrawn", "heads through other inputs"):
        assert f"<th>{column}</th>" in section
    tables = section[section.index('<div class="table">') :]
    visible = " ".join(re.sub(r"<[^>]+>", " ", tables.replace("<wbr>", "")).split())
    # Both feed a1.h0: ioi through q from a0.h1, EVIL through k from a0.h1.
    assert "a1.h0 other inputs q: a0.h1 k: a0.h1" in visible


def test_a_study_without_edge_overlap_has_no_edge_section(tmp_path: Path) -> None:
    full = fake_study()  # as a StudyResult from before the field existed:
    study = SimpleNamespace(**{f.name: getattr(full, f.name) for f in fields(full)})
    del study.edge_overlap
    text = report.write(tmp_path / "r.html", study).read_text(encoding="utf-8")
    assert 'id="edge-overlap"' not in text and "edge_jaccard_matrix" not in text


def test_user_text_is_escaped(written: tuple[Path, str]) -> None:
    _, text = written
    assert EVIL not in text  # neither in markup nor inside the figures' JSON
    assert html.escape(EVIL) in text
    assert "<title>Study &amp; &lt;friends&gt;</title>" in text
    parser = parse(text)
    assert not any(tag == "script" and "alert" in str(attrs) for tag, attrs in parser.starts)
    visible = "".join(parser.text)
    assert f"The {EVIL} circuit reuses 1 of 2 heads of ioi." in visible  # shown as text


def test_summary_tables_and_flags(written: tuple[Path, str]) -> None:
    _, text = written
    visible = " ".join("".join(parse(text).text).split())
    assert "1 h 2 min 5 s" in visible  # 3725 s
    assert "ioi: zoo:ft-ioi" in visible
    assert "0.969" in visible  # accuracy 0.96875 to three digits
    assert "a1.h0, a1.h2" in visible  # intervention heads as a list
    # Exactly one circuit is below 0.8 (the EVIL one, 0.41); it is flagged, the others not.
    assert text.count('class="flag"') == 1
    assert "faithfulness 0.410 vs random circuits of the same size 0.050 ± 0.020" in visible
    assert text.count('class="ok"') == 3
    assert "3 nodes (2 heads, 1 MLP), 0 edges" in visible
    assert "2 nodes (2 heads, 0 MLPs), 3 edges" in visible  # the edge circuit


def test_pairwise_table_has_p_values_chance_and_ceiling(written: tuple[Path, str]) -> None:
    _, text = written
    section = text[text.index('id="task-overlap"') : text.index('id="model-overlap"')]
    for column in ("corrected p (heads)", "uncorrected p", "by chance", "stability ceiling"):
        assert f"<th>{column}</th>" in section
    # Ceiling = min(0.9, 0.75); ioi {a0.h0, a1.h0, m1} vs EVIL {a0.h0, a1.h2}: Jaccard 1/4.
    cells = re.findall(r"<td>([^<]*)</td>", section)
    assert "0.75" in cells and "0.25" in cells


def test_format_cell() -> None:
    fmt = report.html._format_cell
    assert [fmt(0.96875), fmt(2e-9), fmt(0.0), fmt(float("nan")), fmt(3), fmt(True)] == [
        "0.969",
        "2.00e-09",
        "0",
        "–",
        "3",
        "yes",
    ]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    path.write_text("old", encoding="utf-8")
    broken = fake_study()
    broken.cross_task = pd.DataFrame([["x"]], index=["ioi"], columns=["ioi"])
    with pytest.raises(ValueError, match="faithfulness_matrix needs numbers"):
        report.write(path, broken)
    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_write_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a folder; pass a file path"):
        report.write(tmp_path, fake_study())


def test_write_comparison(tmp_path: Path) -> None:
    study = fake_study()
    out = report.write_comparison(tmp_path / "compare.html", study.task_overlap)
    text = out.read_text(encoding="utf-8")
    starts = parse(text).starts
    figures = Counter(a["data-figure"] for t, a in starts if t == "div" and "data-figure" in a)
    assert dict(figures) == {
        "overlap_grid": 1,
        "jaccard_matrix": 1,
        "upset": 1,
        "threshold_sweep": 1,
        "circuit_diagram": 2,
    }
    assert EVIL not in text and html.escape(EVIL) in text
    assert [p.name for p in tmp_path.iterdir()] == ["compare.html"]


def test_write_comparison_without_scores_has_no_sweep(tmp_path: Path) -> None:
    plain = compare(
        {"x": Circuit.from_nodes(["a0.h0"], SHAPE), "y": Circuit.from_nodes(["a0.h1"], SHAPE)}
    )
    text = report.write_comparison(tmp_path / "c.html", plain).read_text(encoding="utf-8")
    assert 'data-figure="threshold_sweep"' not in text
    assert text.count('data-figure="circuit_diagram"') == 2


def test_a_study_with_one_task_and_nothing_else(tmp_path: Path) -> None:
    """One circuit, no scores, curves, fine-tunes or matrices: every section says so."""
    study = fake_study()
    only = {"base/ioi/activation": study.circuits["base/ioi/activation"]}
    empty = pd.DataFrame()
    study.config.tasks, study.config.fine_tuned = ("ioi",), {}
    study.circuits, study.scores, study.curves = only, {}, {}
    study.circuit_table = study.method_agreement = study.stability = empty
    study.cross_task = study.cross_model = study.cross_ablation = empty
    study.task_overlap, study.model_overlap = compare({"ioi": only["base/ioi/activation"]}), {}
    study.within_model, study.edge_overlap = {}, None
    study.interventions, study.findings = [], []
    text = report.write(tmp_path / "r.html", study).read_text(encoding="utf-8")
    figures = Counter(a["data-figure"] for t, a in parse(text).starts if "data-figure" in a)
    assert dict(figures) == {"circuit_diagram": 1}
    for note in (
        "No findings were recorded.",
        "No faithfulness curves were computed.",
        "Only one circuit: there is no pair to compare.",
        "No fine-tuned models were compared.",
        "Faithfulness of each task&#x27;s circuit on each task: not computed.",
        '<p class="caption">Targeted ablations.</p><p class="empty">No rows.</p>',
    ):
        assert note in text
    assert 'class="flag"' not in text and 'class="ok"' not in text  # no faithfulness known


def test_write_comparison_with_edges_leads_with_the_answer(tmp_path: Path) -> None:
    study = fake_study()
    out = report.write_comparison(
        tmp_path / "compare.html", study.task_overlap, edges=study.edge_overlap
    )
    text = out.read_text(encoding="utf-8")
    body = text[text.index("<body>") :]
    assert body.index('<ul class="answer">') < body.index('<nav class="toc">')
    assert "Which circuits reuse which heads and MLPs, and is it significant?" in body
    assert body.count('data-figure="edge_jaccard_matrix"') == 1


# --- what a reader sees: names, order, colours, intervals, a partial study ------------------


def test_tables_use_human_column_names(written: tuple[Path, str]) -> None:
    _, text = written
    # The configuration lists the StudyConfig's own field names; every other table is read.
    config = text.index("<summary>Configuration</summary>")
    rest = text[:config] + text[text.index("</details>", config) :]
    headers = re.findall(r"<th>([^<]*)</th>", rest)
    assert headers and [h for h in headers if "_" in h] == []


def test_long_tables_show_key_columns_and_fold_the_rest(written: tuple[Path, str]) -> None:
    _, text = written
    section = text[text.index('id="task-overlap"') : text.index('id="model-overlap"')]
    short, full = section.split("<details><summary>All ", 1)
    pair_header = re.findall(r"<th>([^<]*)</th>", short)[-8:]
    assert pair_header == ["a", "b", "shared nodes", "Jaccard (heads)", "by chance",
                           "corrected p (heads)", "uncorrected p", "stability ceiling"]  # fmt: skip
    assert "<th>share of a in b</th>" in full and "<th>share of a in b</th>" not in short


def test_comparisons_come_before_the_circuits_which_are_folded(written: tuple[Path, str]) -> None:
    _, text = written
    order = [text.index(f'id="{anchor}"') for anchor in
             ("summary", "model-evaluations", "task-overlap", "model-overlap", "interventions",
              "circuits", "method-agreement")]  # fmt: skip
    assert order == sorted(order)
    circuits = text[text.index('id="circuits"') : text.index('id="method-agreement"')]
    assert circuits.count("<details><summary>Circuit ") == 4
    assert 'data-figure="patching_heatmap"' not in text[: text.index('id="circuits"')]


def test_every_heatmap_says_what_its_colours_mean(written: tuple[Path, str]) -> None:
    _, text = written
    for name in ("patching_heatmap", "faithfulness_matrix", "jaccard_matrix", "overlap_grid",
                 "edge_jaccard_matrix"):  # fmt: skip
        for match in re.finditer(f'data-figure="{name}"', text):
            caption = re.search(r'<p class="caption">([^<]*)</p>', text[match.end() :])
            assert caption is not None and "olour" in caption.group(1), name


def test_faithfulness_intervals_show_where_circuits_have_them(tmp_path: Path) -> None:
    from reuse_lens.study.result import faithfulness_interval

    study = fake_study()
    key = "base/ioi/activation"
    study.circuits[key] = study.circuits[key].with_metadata(faithfulness_interval=[0.9, 0.95])
    rows = study.circuit_table.to_dict("records")
    for row in rows:
        row.update(faithfulness_interval(study.circuits[row["key"]]))
    study.circuit_table = pd.DataFrame(rows)
    text = report.write(tmp_path / "r.html", study).read_text(encoding="utf-8")
    visible = " ".join("".join(parse(text).text).split())
    assert "faithfulness 0.930 (95% interval 0.900 to 0.950) vs random circuits" in visible
    assert "<th>95% interval</th>" in text and "<td>[0.9, 0.95]</td>" in text
    # A circuit without one gets no interval, and a study without any gets no column.
    assert "faithfulness 0.410 vs random circuits" in visible
    plain = report.write(tmp_path / "p.html", fake_study()).read_text(encoding="utf-8")
    circuits = plain[plain.index('id="circuits"') :]
    assert "95% interval" not in circuits


def test_a_study_that_could_not_compare_tasks_says_why(tmp_path: Path) -> None:
    from reuse_lens.separation import separation

    study = fake_study()
    refused = separation(torch.tensor([0.1, -0.2, 0.15, 0.0]), torch.tensor([0.0, 0.1, 0.1, 0.05]),
                         EVIL, accuracy=0.0)  # fmt: skip
    study.task_overlap, study.edge_overlap = None, None
    study.interventions = []
    study.refused = {f"base/{EVIL}": refused}  # type: ignore[attr-defined]
    text = report.write(tmp_path / "r.html", study).read_text(encoding="utf-8")
    visible = " ".join("".join(parse(text).text).split())
    assert "No tasks could be compared: fewer than two tasks had a circuit in zoo:base" in visible
    assert f"base on {EVIL}: refused, accuracy 0.00, gap" in visible
    assert "Not compared: fewer than two tasks had a circuit" in visible
    assert 'data-figure="jaccard_matrix"' not in text


def test_the_comparison_report_shows_faithfulness_and_its_interval(tmp_path: Path) -> None:
    a = Circuit.from_nodes(["a0.h0"], SHAPE, metadata={"faithfulness": 0.93,
                                                      "faithfulness_interval": [0.9, 0.95]})  # fmt: skip
    b = Circuit.from_nodes(["a0.h1"], SHAPE, metadata={"faithfulness": 0.88})
    text = report.write_comparison(tmp_path / "c.html", compare({"a": a, "b": b}))
    html_text = text.read_text(encoding="utf-8")
    assert "<th>95% interval</th>" in html_text and "<td>[0.9, 0.95]</td>" in html_text
    plain = report.write_comparison(tmp_path / "p.html", compare({"b": b, "c": b}))
    assert "95% interval" not in plain.read_text(encoding="utf-8")
