"""Our MIB files against files built independently from MIB's documented format.

MIB's circuit track reads what EAP-IG's ``Graph.to_json`` and ``Graph.to_pt`` write. The
helpers below build such files from the format's documented fields only (a graph of
``input``, heads, MLPs and ``logits``; a sender's forward index and a receiver's backward
index; ``cfg``/``nodes``/``edges`` in JSON, ``src_nodes``/``dst_nodes`` and the
``edges_scores``/``edges_in_graph``/``nodes_in_graph`` matrices in ``.pt``), without
reuse_lens code and without MIB's, so that the two implementations check each other.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from reuse_lens.circuits import Circuit, CircuitError
from reuse_lens.nodes import ModelShape, edges_of

# --- an independent writer of MIB's format ---------------------------------------------------


def forward_index(name: str, n_heads: int) -> int:
    """A sender's row: input 0, then per layer its heads and its MLP."""
    if name == "input":
        return 0
    if name.startswith("m"):
        return 1 + int(name[1:]) * (n_heads + 1) + n_heads
    layer, head = name[1:].split(".h")
    return 1 + int(layer) * (n_heads + 1) + int(head)


def backward_index(name: str, n_layers: int, n_heads: int) -> int:
    """A receiver's column: per layer the q, k and v inputs of its heads and its MLP; logits."""
    if name == "logits":
        return n_layers * (3 * n_heads + 1)
    if name.startswith("m"):
        return int(name[1:]) * (3 * n_heads + 1) + 3 * n_heads
    head_part, letter = name.rstrip(">").split("<")
    layer, head = head_part[1:].split(".h")
    return int(layer) * (3 * n_heads + 1) + "qkv".index(letter) * n_heads + int(head)


def mib_edge_names(n_layers: int, n_heads: int, parallel: bool) -> list[str]:
    """Every edge, built as the format describes the residual graph."""
    names, stream = [], ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        before = list(stream)
        names += [f"{s}->{h}<{x}>" for s in before for h in heads for x in "qkv"]
        stream += heads
        # with attention and MLP in parallel, the MLP reads the stream from before the heads
        names += [f"{s}->m{layer}" for s in (before if parallel else stream)]
        stream.append(f"m{layer}")
    names += [f"{s}->logits" for s in stream]
    return names


class MibGraph:
    """A MIB graph file's content, built independently: in_graph edges, scores, nodes."""

    def __init__(self, n_layers: int, n_heads: int, parallel: bool, seed: int) -> None:
        rng = random.Random(seed)
        self.cfg = {
            "n_layers": n_layers,
            "n_heads": n_heads,
            "parallel_attn_mlp": parallel,
            "d_model": 32,
        }
        self.edges = mib_edge_names(n_layers, n_heads, parallel)
        # MIB's sign: positive = important, like EAP-IG's scores of a loss
        self.scores = {e: round(rng.uniform(-1, 1), 6) for e in self.edges}
        self.in_graph = {e for e in self.edges if rng.random() < 0.2}
        self.senders = ["input"] + [
            n
            for layer in range(n_layers)
            for n in [*(f"a{layer}.h{h}" for h in range(n_heads)), f"m{layer}"]
        ]
        ends = {p.split("<")[0] for e in self.in_graph for p in e.split("->")}
        self.nodes_in = {n for n in self.senders if n in ends}
        self.receivers = [
            *(
                name
                for layer in range(n_layers)
                for name in [
                    *(f"a{layer}.h{h}<{x}>" for x in "qkv" for h in range(n_heads)),
                    f"m{layer}",
                ]
            ),
            "logits",
        ]

    def json_doc(self) -> dict[str, Any]:
        nodes = {n: {"in_graph": n in self.nodes_in} for n in self.senders}
        nodes["logits"] = {"in_graph": True}
        edges = {e: {"score": self.scores[e], "in_graph": e in self.in_graph} for e in self.edges}
        return {"cfg": self.cfg, "nodes": nodes, "edges": edges}

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        n_layers, n_heads = self.cfg["n_layers"], self.cfg["n_heads"]
        shape = (1 + n_layers * (n_heads + 1), n_layers * (3 * n_heads + 1) + 1)
        scores, in_graph = torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)
        for e in self.edges:
            s, r = e.split("->")
            i, j = forward_index(s, n_heads), backward_index(r, n_layers, n_heads)
            scores[i, j], in_graph[i, j] = self.scores[e], e in self.in_graph
        return scores, in_graph

    def pt_doc(self) -> dict[str, Any]:
        scores, in_graph = self.matrices()
        nodes = torch.tensor([n in self.nodes_in for n in self.senders])
        return {
            "cfg": self.cfg,
            "src_nodes": self.senders,
            "dst_nodes": self.receivers,
            "edges_scores": scores,
            "edges_in_graph": in_graph,
            "nodes_in_graph": nodes,
        }


GRAPHS = [(2, 3, False), (3, 2, True), (1, 1, False)]

# --- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize(("n_layers", "n_heads", "parallel"), GRAPHS)
def test_the_edge_graphs_agree(n_layers: int, n_heads: int, parallel: bool) -> None:
    ours = [e.name for e in edges_of(ModelShape(n_layers, n_heads, True, parallel))]
    assert sorted(ours) == sorted(mib_edge_names(n_layers, n_heads, parallel))


@pytest.mark.parametrize(("n_layers", "n_heads", "parallel"), GRAPHS)
def test_we_read_their_json_and_pt_alike(
    n_layers: int, n_heads: int, parallel: bool, tmp_path: Path
) -> None:
    graph = MibGraph(n_layers, n_heads, parallel, seed=n_layers)
    from_json = Circuit.from_mib_json(json.dumps(graph.json_doc()))
    torch.save(graph.pt_doc(), tmp_path / "importances.pt")
    from_pt = Circuit.from_mib_pt(tmp_path / "importances.pt")
    # the same circuit; .pt scores are float32, JSON's float64
    assert (from_pt.nodes, from_pt.edges, from_pt.shape) == (
        from_json.nodes,
        from_json.edges,
        from_json.shape,
    )
    assert from_pt.metadata == from_json.metadata
    assert from_pt.edge_scores.keys() == from_json.edge_scores.keys()
    for key, value in from_json.edge_scores.items():
        assert from_pt.edge_scores[key] == pytest.approx(value, abs=1e-6)
    expected = {tuple(e.split("->")) for e in graph.in_graph}
    assert from_json.edges == expected
    # read back into our sign: the metric change when noised
    for name, score in graph.scores.items():
        sender, receiver = name.split("->")
        assert from_json.edge_scores[(sender, receiver)] == pytest.approx(-score, abs=1e-6)
    assert from_json.shape == ModelShape(n_layers, n_heads, True, parallel)


@pytest.mark.parametrize(("n_layers", "n_heads", "parallel"), GRAPHS)
def test_they_read_our_files_as_written(
    n_layers: int, n_heads: int, parallel: bool, tmp_path: Path
) -> None:
    """Our JSON and .pt, read the way MIB's loaders read them, give their own graph back."""
    graph = MibGraph(n_layers, n_heads, parallel, seed=7)
    circuit = Circuit.from_mib_json(json.dumps(graph.json_doc()))
    doc = json.loads(circuit.to_mib_json())
    assert doc["cfg"]["d_model"] == 32  # read from their cfg, written back
    assert set(doc["edges"]) == set(graph.edges)
    for name in graph.edges:
        assert doc["edges"][name]["in_graph"] == (name in graph.in_graph)
        assert doc["edges"][name]["score"] == pytest.approx(graph.scores[name], abs=1e-6)
    circuit.to_mib_pt(tmp_path / "ours.pt")
    ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    theirs = graph.pt_doc()
    assert ours["src_nodes"] == theirs["src_nodes"]
    assert ours["dst_nodes"] == theirs["dst_nodes"]
    torch.testing.assert_close(ours["edges_scores"], theirs["edges_scores"])
    assert torch.equal(ours["edges_in_graph"], theirs["edges_in_graph"])
    assert torch.equal(ours["nodes_in_graph"], theirs["nodes_in_graph"])
    for key in ("n_layers", "n_heads", "parallel_attn_mlp", "d_model"):
        assert ours["cfg"][key] == theirs["cfg"][key]


@pytest.mark.parametrize(
    "circuit",
    [
        Circuit.from_nodes(["a0.h1", "m1"], ModelShape(2, 2, True), node_scores={"m1": -0.5}),
        Circuit.from_edges(
            ["input->a1.h0<k>", "a1.h0->logits"],
            ModelShape(2, 2, True),
            edge_scores={"a1.h0->logits": -1.25},
            metadata={"task": "ioi", "d_model": 16},
        ),
        Circuit.from_edges(["a0.h0->a1.h1<v>"], ModelShape(2, 2, False)),
        Circuit.from_edges(["a0.h0->m1"], ModelShape(2, 1, True, parallel=True)),
    ],
    ids=["nodes", "edges", "attention-only", "parallel"],
)
@pytest.mark.parametrize("sign", ["mib", "reuse_lens"])
def test_pt_round_trip(circuit: Circuit, sign: str, tmp_path: Path) -> None:
    path = circuit.to_mib_pt(tmp_path / "sub" / "c.pt", sign=sign)  # type: ignore[arg-type]
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.pt"]
    assert Circuit.from_mib_pt(path) == circuit
    assert Circuit.from_mib_pt(path, shape=circuit.shape) == circuit
    data = torch.load(path, weights_only=True)
    assert data["edges_scores"].shape == (
        1 + circuit.shape.n_layers * (circuit.shape.n_heads + 1),
        circuit.shape.n_layers * (3 * circuit.shape.n_heads + 1) + 1,
    )
    if circuit.node_scores:
        scored = data["nodes_scores"]
        assert int((~scored.isnan()).sum()) == len(circuit.node_scores)
        assert math.isnan(float(scored[0]))  # the input: unscored, NaN as in EAP-IG


def _pt_with(tmp_path: Path, change: Any) -> Path:
    data = MibGraph(2, 1, False, seed=0).pt_doc()
    change(data)
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    return path


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d.pop("edges_in_graph"), "lacks edges_in_graph"),
        (lambda d: d.update(edges_scores=torch.zeros(2, 2)), "has shape (2, 2)"),
        (lambda d: d["edges_in_graph"].__setitem__((4, 0), True), "not an edge"),
        (lambda d: d.update(cfg={"n_layers": 0, "n_heads": 1}), "positive whole number"),
        (lambda d: d.update(nodes_in_graph=[True]), "must be a tensor"),
    ],
)
def test_garbled_pt_files_name_the_problem(tmp_path: Path, change: Any, fragment: str) -> None:
    with pytest.raises(CircuitError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Circuit.from_mib_pt(_pt_with(tmp_path, change))


def test_unreadable_and_missing_pt_files(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_text("not a zip")
    with pytest.raises(CircuitError, match="not a readable .pt file"):
        Circuit.from_mib_pt(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="no MIB .pt circuit file"):
        Circuit.from_mib_pt(tmp_path / "absent.pt")


# --- MIB's evaluation semantics as options (docs/circuit_format.md, "Using reuse_lens with
# MIB"): pruning, sizes, signed ranking, means over padded positions ----------------------


def test_prune_edges_keeps_only_edges_on_an_input_to_logits_path() -> None:
    """EAP-IG's Graph.prune, as documented: drop nodes without a kept outgoing edge or
    (but input) without a kept incoming one, then their edges, until nothing changes."""
    from reuse_lens.circuits.mib import prune_edges

    path = [("input", "a0.h0<v>"), ("a0.h0", "m1"), ("m1", "logits")]
    assert prune_edges(path) == path
    # a1.h2 gets nothing in, so its edge out goes, and then m0 (fed only by it) too
    dangling = [("a1.h2", "m1"), ("input", "a0.h1<k>"), ("a0.h1", "m0")]
    assert prune_edges(path + dangling) == path
    # an edge into a node with no way out goes; logits always stays
    assert prune_edges([("input", "a0.h0<q>"), ("input", "logits")]) == [("input", "logits")]
    # a head fed through its key alone counts as fed, as EAP-IG counts any input slot
    assert prune_edges([("input", "a0.h3<k>"), ("a0.h3", "logits")]) == [
        ("input", "a0.h3<k>"),
        ("a0.h3", "logits"),
    ]
    assert prune_edges([]) == []


@pytest.fixture(scope="module")
def tiny() -> Any:
    import reuse_lens as rl
    from tests.conftest import native_config

    return rl.load_model(native_config(n_layers=3))


@pytest.fixture(scope="module")
def ragged(tiny: Any) -> Any:
    from tests.patching.helpers import random_task

    return random_task(tiny, n=4, lengths=[6, 5, 6, 4], seed=1)


def _dangling_circuit(model: Any) -> Circuit:
    """A path from input to logits plus an edge out of a head that nothing feeds."""
    from reuse_lens.nodes import shape_of

    edges = [
        "input->a0.h0<v>",
        "input->a0.h0<q>",
        "a0.h0->a2.h1<v>",
        "a2.h1->logits",
        "a1.h2->logits",  # a1.h2 has no kept input: MIB's evaluation prunes this edge
        "a0.h3->m1",  # a0.h3 gets nothing in either
        "m1->logits",
    ]
    return Circuit.from_edges(edges, shape_of(model))


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_prune_ablates_edges_off_every_path(tiny: Any, ragged: Any, ablation: str) -> None:
    """prune=True is the faithfulness of the pruned circuit. Under resample ablation it
    changes nothing (a node whose inputs are all ablated computes its corrupted output);
    under mean ablation it does. (Under zero ablation it does only where a node fed zeros
    outputs something else than zero: not on this bias-free model.)"""
    from reuse_lens.circuits.measure import faithfulness
    from reuse_lens.circuits.mib import prune_edges
    from reuse_lens.nodes import shape_of

    circuit = _dangling_circuit(tiny)
    pruned = Circuit.from_edges(
        [f"{s}->{r}" for s, r in prune_edges(circuit.edges)], shape_of(tiny)
    )
    assert len(pruned.edges) == 4
    plain = faithfulness(tiny, ragged, circuit, ablation=ablation, check_task=False)  # type: ignore[arg-type]
    with_prune = faithfulness(
        tiny, ragged, circuit, ablation=ablation, prune=True, check_task=False
    )  # type: ignore[arg-type]
    assert with_prune == faithfulness(tiny, ragged, pruned, ablation=ablation, check_task=False)  # type: ignore[arg-type]
    if ablation == "mean":
        assert with_prune != pytest.approx(plain, abs=1e-4)
    else:
        assert with_prune == pytest.approx(plain, abs=1e-4)


@torch.no_grad()
def _metric_with_padded_means(model: Any, runner: Any) -> float:
    """Every head's and MLP's output replaced by its mean over all prompts of the padded
    batch, position by position, through the bridge's own hooks: the reference."""
    prep = runner.prep
    layers = range(model.cfg.n_layers)
    names = [f"blocks.{i}.attn.hook_z" for i in layers] + [
        f"blocks.{i}.hook_mlp_out" for i in layers
    ]
    _, cache = model.run_with_cache(prep.clean, names_filter=lambda n: n in names)
    means = {name: cache[name].mean(0, keepdim=True) for name in names}
    hooks = [(name, lambda act, hook, m=means[name]: m.expand_as(act)) for name in names]
    logits = model.run_with_hooks(prep.clean, fwd_hooks=hooks, return_type="logits")
    rows = torch.arange(prep.n)
    return float(prep.score(logits[rows, prep.answer_pos], rows).mean())


def test_padded_means_average_every_prompt_of_the_padded_batch(tiny: Any, ragged: Any) -> None:
    """mean_positions='padded' (EAP-IG's mean-positional): a position's mean is over every
    prompt, padding included; the default averages real tokens only, so they differ on
    prompts of mixed lengths and agree on prompts of one length."""
    from reuse_lens.nodes import shape_of
    from reuse_lens.patching.ablation import AblationRunner, NodeMask
    from tests.patching.helpers import random_task

    nothing = NodeMask.full(shape_of(tiny), keep=False)
    padded = AblationRunner(tiny, ragged, ablation="mean", mean_positions="padded")
    real = AblationRunner(tiny, ragged, ablation="mean")
    value = float(padded.nodes(nothing)[0])
    assert value == pytest.approx(_metric_with_padded_means(tiny, padded), abs=1e-4)
    assert value != pytest.approx(float(real.nodes(nothing)[0]), abs=1e-4)
    even = random_task(tiny, n=4, lengths=[5, 5, 5, 5], seed=2)
    assert float(
        AblationRunner(tiny, even, ablation="mean", mean_positions="padded").nodes(nothing)[0]
    ) == pytest.approx(
        float(AblationRunner(tiny, even, ablation="mean").nodes(nothing)[0]), abs=1e-6
    )
    with pytest.raises(ValueError, match="unknown mean_positions"):
        AblationRunner(tiny, ragged, ablation="mean", mean_positions="pad")  # type: ignore[arg-type]


def test_curve_with_mib_sizes_and_signed_ranking(tiny: Any, ragged: Any) -> None:
    """sizes='mib' keeps int(p·N) edges (0 allowed, faithfulness 0); absolute=False ranks
    by MIB's sign (our most negative score first), as MIB without --absolute."""
    from reuse_lens.circuits.measure import faithfulness_curve, ranked
    from reuse_lens.circuits.mib import MIB_EVALUATION
    from reuse_lens.patching.attribution import attribution_patching
    from reuse_lens.patching.edges import EdgeScores

    scores = attribution_patching(tiny, ragged, method="eap", level="edge")
    assert isinstance(scores, EdgeScores)
    n = len(scores.edges)
    fractions = (0.001, 0.05, 0.5, 1.0)
    curve = faithfulness_curve(
        tiny, ragged, scores, ablation="resample", fractions=fractions, sizes="mib"
    )
    assert curve.sizes == tuple(int(p * n) for p in fractions)
    assert curve.sizes[0] == 0 and curve.faithfulness[0] == 0.0
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
    default = faithfulness_curve(tiny, ragged, scores, ablation="resample", fractions=fractions)
    assert default.sizes == tuple(max(1, round(p * n)) for p in fractions)
    signed = ranked(scores, absolute=False)
    values = {
        (e.sender.name, e.receiver_name): float(v)
        for e, v in zip(scores.edges, scores.scores, strict=True)
    }
    assert [values[e] for e in signed] == sorted(values.values())  # type: ignore[index]
    assert [abs(values[e]) for e in ranked(scores)] == sorted(  # type: ignore[index]
        (abs(v) for v in values.values()), reverse=True
    )
    mib = faithfulness_curve(
        tiny, ragged, scores, ablation="mean", fractions=fractions, **MIB_EVALUATION
    )
    assert mib.sizes == curve.sizes
    with pytest.raises(ValueError, match="unknown sizes"):
        faithfulness_curve(tiny, ragged, scores, fractions=fractions, sizes="floor")  # type: ignore[arg-type]


def test_node_circuits_normalized_against_every_edge_ablated(tiny: Any, ragged: Any) -> None:
    """node_empty='edges': a node circuit's f = (m − m(every edge ablated)) / (full − that),
    as MIB's evaluation normalizes node circuits; the empty node circuit (which keeps the
    input) then scores the input's own share instead of 0."""
    from reuse_lens.circuits.measure import CircuitEvaluator, faithfulness
    from reuse_lens.nodes import shape_of

    nodes = Circuit.from_nodes(["a0.h1", "m1", "a2.h0"], shape_of(tiny))
    own = CircuitEvaluator(tiny, ragged, ablation="zero")
    mib = CircuitEvaluator(tiny, ragged, ablation="zero", node_empty="edges")
    m = float(own.runner.nodes(own.node_mask(nodes.nodes))[0])
    empty = own.empty("edge")
    assert mib(nodes) == pytest.approx((m - empty) / (own.full - empty), rel=1e-5)
    assert own(nodes) == pytest.approx((m - own.empty("node")) / (own.full - own.empty("node")))
    assert faithfulness(
        tiny, ragged, nodes, ablation="zero", node_empty="edges", check_task=False
    ) == mib(nodes)
    keeps_input = mib.nodes([[]])[0]
    assert own.nodes([[]])[0] == 0.0 and keeps_input != pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown node_empty"):
        CircuitEvaluator(tiny, ragged, node_empty="node")  # type: ignore[arg-type]


def test_curve_reports_mibs_areas_too(tiny: Any, ragged: Any) -> None:
    """MIB's area_under and area_from_1 are CPR and CMD not divided by the fraction span."""
    from reuse_lens.circuits.measure import faithfulness_curve
    from reuse_lens.patching.attribution import attribution_patching

    scores = attribution_patching(tiny, ragged, method="eap", level="node")
    curve = faithfulness_curve(tiny, ragged, scores, ablation="resample", sizes="mib")
    f, x = curve.faithfulness, curve.fractions
    trapezoids = [(x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(len(x) - 1)]
    assert curve.area_under == pytest.approx(sum(trapezoids), abs=1e-12)
    gaps = [(x[i + 1] - x[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2 for i in range(len(x) - 1)]
    assert curve.area_from_1 == pytest.approx(sum(gaps), abs=1e-12)
