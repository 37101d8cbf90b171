"""Circuit: validation against the model's shape, equality, and both JSON formats both ways."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reuse_lens.circuits import CIRCUIT_FORMAT_VERSION, Circuit, CircuitError
from reuse_lens.nodes import LOGITS, MLP, AttentionHead, Edge, ModelShape, edges_of

SMALL = ModelShape(n_layers=2, n_heads=1, has_mlps=True)  # 6 nodes and 23 edges, by hand below
GPT = ModelShape(n_layers=3, n_heads=4, has_mlps=True)
ATTN_ONLY = ModelShape(n_layers=2, n_heads=2, has_mlps=False)


def edge_circuit() -> Circuit:
    return Circuit.from_edges(
        [("a0.h1", "a2.h3<q>"), "input->m0", Edge(MLP(1), LOGITS), ("a2.h3", "logits")],
        GPT,
        node_scores={"a0.h1": 0.5, "a1.h2": -1.25},
        edge_scores={("a0.h1", "a2.h3<q>"): 2.0, "m0->a1.h0<k>": -0.125},
        stages={"a2.h3": 0, "a0.h1": 1},
        metadata={"task": "ioi", "method": "eap-ig", "settings": {"steps": 5, "top": [1, 2]}},
    )


# --- construction and validation ---


def test_from_nodes_canonicalises_names_and_objects() -> None:
    circuit = Circuit.from_nodes([" a0.h1", AttentionHead(1, 3), MLP(2), "a0.h1"], GPT)
    assert circuit.nodes == frozenset({"a0.h1", "a1.h3", "m2"})
    assert circuit.heads == frozenset({"a0.h1", "a1.h3"})
    assert circuit.mlps == frozenset({"m2"})
    assert circuit.level == "node"
    assert circuit.edges == frozenset()
    assert len(circuit) == 3
    assert circuit.nodes_in_order() == ["a0.h1", "a1.h3", "m2"]


def test_from_edges_derives_nodes_from_the_ends() -> None:
    circuit = edge_circuit()
    assert circuit.nodes == frozenset({"a0.h1", "a2.h3", "m0", "m1"})
    assert circuit.edges == frozenset(
        {("a0.h1", "a2.h3<q>"), ("input", "m0"), ("m1", "logits"), ("a2.h3", "logits")}
    )
    assert circuit.level == "edge"
    # scores may cover nodes and edges outside the circuit (for re-thresholding)
    assert dict(circuit.node_scores) == {"a0.h1": 0.5, "a1.h2": -1.25}
    assert dict(circuit.edge_scores) == {("m0", "a1.h0<k>"): -0.125, ("a0.h1", "a2.h3<q>"): 2.0}


def test_contains_nodes_and_edges() -> None:
    circuit = edge_circuit()
    assert "a0.h1" in circuit and AttentionHead(2, 3) in circuit and "m1" in circuit
    assert "a0.h0" not in circuit and "m2" not in circuit
    assert ("a0.h1", "a2.h3<q>") in circuit and "m1->logits" in circuit
    assert Edge(MLP(1), LOGITS) in circuit
    assert ("a0.h1", "a2.h3<k>") not in circuit
    assert "not a node" not in circuit and "a9.h9" not in circuit and 3 not in circuit


def test_repr_is_short_and_says_what_it_is() -> None:
    text = repr(edge_circuit())
    assert text.startswith("Circuit(edge, 4 nodes [a0.h1, m0, m1, a2.h3], 4 edges")
    assert "task='ioi'" in text
    big = Circuit.from_nodes([n.name for n in GPT.nodes()], GPT)
    assert len(repr(big)) < 150 and "..." in repr(big)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("a5.h0", "node a5.h0 does not exist: the model has 3 layers of 4 heads"),
        ("a0.h4", "a0.h0 to a2.h3"),
        ("m3", "MLPs m0 to m2"),
        ("b1", "invalid node name 'b1'"),
        ("input", "not a head or MLP"),
        ("logits", "not a head or MLP"),
    ],
)
def test_bad_nodes_are_named_with_the_model_size(name: str, fragment: str) -> None:
    with pytest.raises(CircuitError, match="bad circuit node") as info:
        Circuit.from_nodes(["a0.h0", name], GPT)
    assert fragment in str(info.value)


def test_mlp_in_attention_only_model_is_rejected() -> None:
    with pytest.raises(CircuitError, match="m0 does not exist: the model is attention-only"):
        Circuit.from_nodes(["m0"], ATTN_ONLY)


def test_a_string_is_not_a_collection_of_nodes() -> None:
    with pytest.raises(CircuitError, match="collection of names"):
        Circuit.from_nodes("a0.h1", GPT)


@pytest.mark.parametrize(
    "edge",
    [
        ("m1", "a1.h0<q>"),  # an MLP feeds only later layers
        ("a1.h0", "a0.h0<v>"),  # backwards
        ("a1.h0", "a1.h1<q>"),  # heads of a layer do not feed each other
        ("m1", "m1"),
        ("a0.h0", "a1.h0"),  # an edge into a head names its q/k/v input
        ("logits", "m0"),
        ("a0.h0", "a9.h0<q>"),
    ],
)
def test_edges_outside_the_graph_are_rejected(edge: tuple[str, str]) -> None:
    with pytest.raises(CircuitError, match="bad circuit edge"):
        Circuit.from_edges([edge], GPT)


@pytest.mark.parametrize("shape", [GPT, ATTN_ONLY, ModelShape(1, 1, True)])
def test_edge_rule_matches_edges_of(shape: ModelShape) -> None:
    """Circuit's edge check (by layers) accepts exactly the edges that edges_of lists."""
    real = {e.name for e in edges_of(shape)}
    senders = ["input", *(n.name for n in shape.nodes())]
    receivers = [
        *(
            f"{n.name}<{x}>" if isinstance(n, AttentionHead) else n.name
            for n in shape.nodes()
            for x in "qkv"
        ),
        "logits",
    ]
    receivers = list(dict.fromkeys(receivers))
    accepted = set()
    for sender in senders:
        for receiver in receivers:
            try:
                Circuit.from_edges([(sender, receiver)], shape)
            except CircuitError:
                continue
            accepted.add(f"{sender}->{receiver}")
    assert accepted == real


def test_edges_must_end_at_circuit_nodes() -> None:
    with pytest.raises(CircuitError, match=r"a2\.h3.*Circuit\.from_edges"):
        Circuit(nodes=frozenset({"a0.h1"}), shape=GPT, edges=frozenset({("a0.h1", "a2.h3<q>")}))
    # input and logits are the ends of every path and need not be nodes
    circuit = Circuit(nodes=frozenset({"m0"}), shape=GPT, edges=frozenset({("input", "m0")}))
    assert circuit.nodes == frozenset({"m0"})


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"node_scores": {"a0.h0": float("nan")}}, "finite"),
        ({"node_scores": {"a0.h0": float("inf")}}, "finite"),
        ({"node_scores": {"a0.h0": "1.0"}}, "must be numbers"),
        ({"node_scores": {"a7.h0": 1.0}}, "a7.h0 does not exist"),
        ({"edge_scores": {"a0.h0->logits": None}}, "must be numbers"),
        ({"edge_scores": {"m2->m1": 1.0}}, "not an edge of the model's graph"),
        ({"stages": {"a0.h0": -1}}, "stages start at 0"),
        ({"stages": {"a0.h0": 1.5}}, "whole numbers"),
        ({"stages": {"a0.h0": True}}, "whole numbers"),
        ({"stages": {"a1.h1": 0}}, "outside the circuit: a1.h1"),
        ({"metadata": ["not", "a", "mapping"]}, "metadata must be a mapping"),
    ],
)
def test_bad_scores_stages_and_metadata(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(CircuitError) as info:
        Circuit.from_nodes(["a0.h0"], GPT, **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ({"device": object()}, "metadata['device'] is a object"),
        ({"settings": {"heads": {1, 2}}}, "metadata['settings']['heads'] is a set"),
        ({"curve": [1.0, float("nan")]}, "metadata['curve'][1] is nan"),
        ({"by_layer": {3: "x"}}, "has the key 3 of type int"),
    ],
)
def test_metadata_must_be_json(metadata: dict[str, Any], fragment: str) -> None:
    with pytest.raises(CircuitError, match="must be JSON-serialisable") as info:
        Circuit.from_nodes(["a0.h0"], GPT, metadata=metadata)
    assert fragment in str(info.value)


def test_mappings_are_read_only_copies() -> None:
    scores = {"a0.h0": 1.0}
    settings_ = {"steps": [5]}
    circuit = Circuit.from_nodes(["a0.h0"], GPT, node_scores=scores, metadata={"s": settings_})
    scores["a0.h0"] = 9.0
    settings_["steps"].append(6)
    assert circuit.node_scores["a0.h0"] == 1.0
    assert circuit.metadata["s"] == {"steps": [5]}
    with pytest.raises(TypeError):
        circuit.node_scores["a0.h0"] = 2.0  # type: ignore[index]
    with pytest.raises(TypeError):
        circuit.metadata["new"] = 1  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        circuit.nodes = frozenset()  # type: ignore[misc]


def test_metadata_is_stored_in_its_json_form() -> None:
    circuit = Circuit.from_nodes(["a0.h0"], GPT, metadata={"pair": (1, 2)})
    assert circuit.metadata["pair"] == [1, 2]


def test_with_metadata_merges_and_leaves_the_original() -> None:
    circuit = edge_circuit()
    updated = circuit.with_metadata(seed=3, task="colored_objects")
    assert updated.metadata["seed"] == 3 and updated.metadata["task"] == "colored_objects"
    assert updated.metadata["method"] == "eap-ig"
    assert circuit.metadata["task"] == "ioi" and "seed" not in circuit.metadata
    assert updated.nodes == circuit.nodes and updated.edges == circuit.edges
    assert updated != circuit


# --- equality, hashing, copying ---


def test_equality_is_by_content() -> None:
    a = Circuit.from_nodes(["m0", "a0.h1"], GPT, node_scores={"m0": 1.0})
    b = Circuit.from_nodes([AttentionHead(0, 1), "m0"], GPT, node_scores={"m0": 1})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Circuit.from_nodes(["m0", "a0.h1"], GPT, node_scores={"m0": 2.0})
    assert a != Circuit.from_nodes(["m0", "a0.h1"], GPT)
    assert a != Circuit.from_nodes(["m0", "a0.h1"], ModelShape(4, 4, True), node_scores={"m0": 1})
    assert a != a.with_metadata(task="ioi")
    assert a != Circuit.from_nodes(["m0", "a0.h1"], GPT, node_scores={"m0": 1.0}, stages={"m0": 0})
    assert a != {"m0", "a0.h1"}


def test_node_and_edge_circuits_with_the_same_nodes_differ() -> None:
    edges = Circuit.from_edges([("input", "m0")], GPT)
    nodes = Circuit.from_nodes(["m0"], GPT)
    assert edges.nodes == nodes.nodes and edges != nodes


def test_pickle_and_deepcopy_round_trip() -> None:
    circuit = edge_circuit()
    assert pickle.loads(pickle.dumps(circuit)) == circuit
    assert copy.deepcopy(circuit) == circuit
    assert copy.copy(circuit) == circuit


# --- check against a model ---


def test_check_names_the_nodes_a_smaller_model_lacks() -> None:
    circuit = Circuit.from_nodes(["a0.h0", "a2.h3", "m2", "a1.h1"], GPT)
    circuit.check(GPT)
    circuit.check(ModelShape(12, 12, True))
    with pytest.raises(CircuitError) as info:
        circuit.check(ModelShape(2, 2, True))
    message = str(info.value)
    assert "lacks 2 of the circuit's 4 nodes: a2.h3, m2" in message
    assert "2 layers of 2 heads" in message and "3 layers of 4 heads" in message
    with pytest.raises(CircuitError, match="lacks 1 of the circuit's 4 nodes: m2"):
        circuit.check(ModelShape(3, 4, False))


def test_check_reads_the_shape_of_a_model() -> None:
    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=1, n_heads=4, attn_only=False))
    with pytest.raises(CircuitError, match="a2.h3, m2"):
        Circuit.from_nodes(["a0.h0", "a2.h3", "m2"], GPT).check(model)
    Circuit.from_nodes(["a0.h3", "m0"], model).check(model)
    with pytest.raises(CircuitError, match="ModelShape or a model with .cfg"):
        Circuit.from_nodes(["a0.h0"], GPT).check("gpt2")


def test_circuit_module_imports_no_torch() -> None:
    code = (
        "import sys, reuse_lens.circuits; "
        "assert 'torch' not in sys.modules and 'transformer_lens' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- our JSON format ---


def test_to_json_document_is_sorted_and_complete() -> None:
    doc = json.loads(edge_circuit().to_json())
    assert doc == edge_circuit().to_dict()
    assert doc["format"] == "reuse_lens.circuit" and doc["format_version"] == 1
    assert doc["shape"] == {"n_layers": 3, "n_heads": 4, "has_mlps": True}
    assert doc["nodes"] == ["a0.h1", "m0", "m1", "a2.h3"]
    # edges_of order: by receiver (a2.h3<q>, then logits), then by sender
    assert doc["edges"] == [
        ["input", "m0"],
        ["a0.h1", "a2.h3<q>"],
        ["m1", "logits"],
        ["a2.h3", "logits"],
    ]
    assert doc["edge_scores"] == {"m0->a1.h0<k>": -0.125, "a0.h1->a2.h3<q>": 2.0}
    assert doc["node_scores"] == {"a0.h1": 0.5, "a1.h2": -1.25}
    assert doc["stages"] == {"a0.h1": 1, "a2.h3": 0}
    assert doc["metadata"]["settings"] == {"steps": 5, "top": [1, 2]}


def test_edge_order_is_edges_of_order() -> None:
    everything = Circuit.from_edges(edges_of(GPT), GPT)
    assert everything.edges_in_order() == [(e.sender.name, e.receiver_name) for e in edges_of(GPT)]


@pytest.mark.parametrize(
    "circuit",
    [
        Circuit.from_nodes([], GPT),
        Circuit.from_nodes(["a0.h1", "m2"], GPT, stages={"m2": 0}, metadata={"n": None}),
        Circuit.from_nodes(["a1.h1"], ATTN_ONLY, node_scores={"a0.h0": 1e-300}),
        edge_circuit(),
    ],
    ids=["empty", "nodes", "attention-only", "edges"],
)
def test_json_round_trip_through_text_and_files(circuit: Circuit, tmp_path: Path) -> None:
    text = circuit.to_json()
    assert Circuit.from_json(text) == circuit
    path = tmp_path / "sub" / "circuit.json"
    assert circuit.to_json(path) == text
    assert path.read_text() == text
    assert Circuit.from_json(path) == circuit
    assert Circuit.from_json(str(path)) == circuit


def test_to_json_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.json"
    old = Circuit.from_nodes(["a0.h0"], GPT)
    old.to_json(path)
    edge_circuit().to_json(path)  # overwrite
    assert Circuit.from_json(path) == edge_circuit()
    assert os.listdir(tmp_path) == ["c.json"]

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        old.to_json(path)
    assert os.listdir(tmp_path) == ["c.json"]  # no temporary file left over
    assert Circuit.from_json(path) == edge_circuit()  # the old file is whole


def doc_with(**changes: Any) -> str:
    doc = edge_circuit().to_dict()
    for key, value in changes.items():
        if value is ...:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            doc_with(format_version=2),
            "format_version 2, but this reuse_lens reads format_version 1",
        ),
        (doc_with(format_version=...), "lacks the field 'format_version' (this reuse_lens reads"),
        (doc_with(format_version="1"), "format_version '1', but this reuse_lens reads"),
        (doc_with(format_version=True), "format_version True, but"),
        (doc_with(format="other"), "its 'format' is 'other'"),
        (doc_with(nodes=...), "lacks the field 'nodes'"),
        (doc_with(shape=...), "lacks the field 'shape'"),
        (doc_with(nodes="a0.h1"), "'nodes' must be a JSON array"),
        (doc_with(shape={"n_layers": 3, "n_heads": 4}), "'shape.has_mlps' must be true or false"),
        (
            doc_with(shape={"n_layers": 0, "n_heads": 4, "has_mlps": True}),
            "'shape.n_layers' must be",
        ),
        (doc_with(shape={"n_layers": 2, "n_heads": 4, "has_mlps": True}), "a2.h3 does not exist"),
        (doc_with(edges=[["a0.h1"]]), "each edge is [sender, receiver]"),
        (doc_with(edge_scores=[1, 2]), "'edge_scores' must be a JSON object"),
        ('{"format": "reuse_lens.circuit", "nodes": [', "not valid JSON"),
        ("[1, 2]", "no circuit file at [1, 2]"),
        (json.dumps({"cfg": {}, "nodes": {}, "edges": {}}), "use Circuit.from_mib_json"),
    ],
)
def test_garbled_files_name_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(CircuitError) as info:
        Circuit.from_json(text)
    assert fragment in str(info.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CircuitError, match="no circuit file at"):
        Circuit.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CircuitError, match="cannot read"):
        Circuit.from_json(tmp_path / "bad.json")
    with pytest.raises(CircuitError, match="file path or JSON text"):
        Circuit.from_json(42)  # type: ignore[arg-type]


def test_hand_written_file_needs_only_the_required_fields() -> None:
    text = json.dumps(
        {
            "format": "reuse_lens.circuit",
            "format_version": 1,
            "shape": {"n_layers": 3, "n_heads": 4, "has_mlps": True},
            "nodes": ["a2.h3", "m0"],
        }
    )
    assert Circuit.from_json(text) == Circuit.from_nodes(["m0", "a2.h3"], GPT)


# --- MIB's format ---


def test_mib_export_of_a_node_circuit_by_hand() -> None:
    circuit = Circuit.from_nodes(["a0.h0"], SMALL, node_scores={"a0.h0": 1.5, "m1": -2.0})
    doc = json.loads(circuit.to_mib_json(d_model=16))
    assert doc["cfg"] == {
        "n_layers": 2,
        "n_heads": 1,
        "parallel_attn_mlp": False,
        "d_model": 16,
        "attn_only": False,
    }
    assert list(doc["nodes"]) == ["input", "a0.h0", "m0", "a1.h0", "m1", "logits"]
    # MIB's sign by default: positive = important, the opposite of ours
    assert doc["nodes"]["a0.h0"] == {"in_graph": True, "score": -1.5}
    assert doc["nodes"]["m1"] == {"in_graph": False, "score": 2.0}
    assert doc["nodes"]["m0"] == {"in_graph": False}
    assert doc["nodes"]["input"] == {"in_graph": True}
    assert doc["nodes"]["logits"] == {"in_graph": True}
    # 3 (a0.h0 q/k/v) + 2 (m0) + 9 (a1.h0 q/k/v) + 4 (m1) + 5 (logits)
    assert len(doc["edges"]) == 23
    in_graph = {name for name, info in doc["edges"].items() if info["in_graph"]}
    assert in_graph == {
        "input->a0.h0<q>",
        "input->a0.h0<k>",
        "input->a0.h0<v>",
        "input->logits",
        "a0.h0->logits",
    }
    assert all(info["score"] == 0.0 for info in doc["edges"].values())
    assert doc["reuse_lens"]["level"] == "node"
    assert doc["reuse_lens"]["score_sign"] == "mib"


def test_mib_export_of_an_edge_circuit_by_hand() -> None:
    circuit = Circuit.from_edges(
        ["a0.h0->m0", "m0->logits"], SMALL, edge_scores={"m0->logits": 0.75, "input->m1": 0.5}
    )
    doc = json.loads(circuit.to_mib_json(sign="reuse_lens"))
    assert {n for n, i in doc["edges"].items() if i["in_graph"]} == {"a0.h0->m0", "m0->logits"}
    assert doc["edges"]["m0->logits"] == {"score": 0.75, "in_graph": True}
    assert doc["edges"]["input->m1"] == {"score": 0.5, "in_graph": False}
    assert doc["nodes"]["input"] == {"in_graph": False}  # no edge leaves the input
    assert [n for n, i in doc["nodes"].items() if i["in_graph"]] == ["a0.h0", "m0", "logits"]
    assert doc["cfg"]["d_model"] == 0  # unknown, and read by MIB for neuron circuits only
    assert json.loads(circuit.with_metadata(d_model=64).to_mib_json())["cfg"]["d_model"] == 64


@pytest.mark.parametrize(
    "circuit",
    [
        Circuit.from_nodes([], SMALL),
        Circuit.from_nodes(["a0.h0", "m1"], SMALL, stages={"m1": 0}, metadata={"task": "x"}),
        Circuit.from_nodes(["a0.h1"], ATTN_ONLY, edge_scores={"input->logits": 1.0}),
        edge_circuit(),
        Circuit.from_edges(
            edges_of(SMALL), SMALL, edge_scores={e.name: 1.0 for e in edges_of(SMALL)}
        ),
    ],
    ids=["empty", "nodes", "attention-only", "edges", "all-edges-all-scores"],
)
def test_mib_round_trip(circuit: Circuit, tmp_path: Path) -> None:
    assert Circuit.from_mib_json(circuit.to_mib_json()) == circuit
    path = tmp_path / "mib.json"
    circuit.to_mib_json(path)
    assert os.listdir(tmp_path) == ["mib.json"]
    assert Circuit.from_mib_json(path, shape=circuit.shape) == circuit


def test_plain_mib_file_of_a_node_circuit_gives_back_its_nodes() -> None:
    """Without our block, a node circuit's implied edges are read as an edge circuit."""
    circuit = Circuit.from_nodes(["a0.h0", "m1"], SMALL)
    doc = circuit.to_mib_dict()
    del doc["reuse_lens"]
    back = Circuit.from_mib_json(json.dumps(doc))
    assert back.nodes == circuit.nodes
    assert back.level == "edge"
    assert ("a0.h0", "m1") in back.edges and ("input", "logits") in back.edges
    assert back.metadata["source_format"] == "mib"
    assert back.metadata["mib_cfg"]["n_layers"] == 2
    assert back.edge_scores == {}  # all 0.0 means unscored


def test_plain_mib_file_keeps_real_edge_scores() -> None:
    circuit = Circuit.from_edges(["a0.h0->m0"], SMALL, edge_scores={"a0.h0->m0": -0.5})
    doc = circuit.to_mib_dict()
    del doc["reuse_lens"]
    back = Circuit.from_mib_json(json.dumps(doc))
    assert back.edges == circuit.edges and back.nodes == circuit.nodes
    assert len(back.edge_scores) == 23 and back.edge_scores[("a0.h0", "m0")] == -0.5
    assert back.edge_scores[("input", "logits")] == 0.0
    # a d_model read from MIB's cfg goes back out
    assert json.loads(back.to_mib_json())["cfg"]["d_model"] == 0


def mib_document(nodes_in: set[str], edges_in: set[str], **node_extra: Any) -> dict[str, Any]:
    """A MIB file written by hand, as EAP-IG writes one (NaN marks unscored nodes)."""
    nodes: dict[str, dict[str, Any]] = {"input": {"in_graph": True}}
    for node in SMALL.nodes():
        nodes[node.name] = {"in_graph": node.name in nodes_in, "score": float("nan")}
        nodes[node.name].update(node_extra.get(node.name, {}))
    nodes["logits"] = {"in_graph": True}
    edges = {e.name: {"score": 0.0, "in_graph": e.name in edges_in} for e in edges_of(SMALL)}
    cfg = {"n_layers": 2, "n_heads": 1, "parallel_attn_mlp": False, "d_model": 8}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def test_mib_file_marking_only_nodes_is_a_node_circuit() -> None:
    doc = mib_document({"a1.h0", "m0"}, set(), m0={"score": 0.25})
    back = Circuit.from_mib_json(json.dumps(doc))  # json writes NaN, as EAP-IG's files have
    assert back.level == "node" and back.nodes == frozenset({"a1.h0", "m0"})
    assert dict(back.node_scores) == {"m0": -0.25}  # MIB's sign, read back into ours
    assert back.shape == SMALL


def test_mib_file_marking_only_edges_takes_nodes_from_the_ends() -> None:
    doc = mib_document(set(), {"a0.h0->a1.h0<v>", "a1.h0->logits"})
    back = Circuit.from_mib_json(json.dumps(doc))
    assert back.nodes == frozenset({"a0.h0", "a1.h0"})
    assert back.edges == frozenset({("a0.h0", "a1.h0<v>"), ("a1.h0", "logits")})


def test_mib_neuron_masks_are_dropped_with_a_warning() -> None:
    doc = mib_document({"m0"}, set(), m0={"neurons": [True, False]})
    with pytest.warns(UserWarning, match="node m0 keeps only some neurons"):
        back = Circuit.from_mib_json(json.dumps(doc))
    assert back.nodes == frozenset({"m0"})


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d.pop("cfg"), "lacks the field 'cfg'"),
        (lambda d: d.pop("edges"), "lacks the field 'edges'"),
        (lambda d: d["cfg"].update(n_heads="1"), "'cfg.n_heads' must be a positive whole number"),
        (lambda d: d["nodes"].update({"a2.h0": {"in_graph": True}}), "a2.h0 does not exist"),
        (lambda d: d["nodes"]["m0"].update(in_graph="yes"), "'nodes'['m0'].in_graph must be"),
        (lambda d: d["edges"].update({"m1->m0": {"in_graph": False}}), "m1->m0 is not an edge"),
        (lambda d: d["edges"].update({"a0.h0->a1.h0<v>": 1}), "must be a JSON object"),
    ],
)
def test_garbled_mib_files_name_the_problem(change: Any, fragment: str) -> None:
    doc = mib_document({"m0"}, set())
    change(doc)
    with pytest.raises(CircuitError) as info:
        Circuit.from_mib_json(json.dumps(doc))
    assert fragment in str(info.value)


def test_mib_shape_must_match_the_given_shape() -> None:
    text = Circuit.from_nodes(["m0"], SMALL).to_mib_json()
    with pytest.raises(CircuitError, match="2 layers x 1 heads, but the shape given is 3 x 1"):
        Circuit.from_mib_json(text, shape=ModelShape(3, 1, True))
    with pytest.raises(CircuitError, match="attention-only"):
        Circuit.from_mib_json(text, shape=ModelShape(2, 1, False))
    with pytest.raises(CircuitError, match="use Circuit.from_json"):
        Circuit.from_mib_json(Circuit.from_nodes(["m0"], SMALL).to_json())


# --- properties over random circuits ---


@st.composite
def circuits(draw: st.DrawFn) -> Circuit:
    shape = ModelShape(
        n_layers=draw(st.integers(1, 3)),
        n_heads=draw(st.integers(1, 3)),
        has_mlps=draw(st.booleans()),
    )
    names = [n.name for n in shape.nodes()]
    keys = [(e.sender.name, e.receiver_name) for e in edges_of(shape)]
    score = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
    edges = draw(st.lists(st.sampled_from(keys), max_size=12)) if draw(st.booleans()) else []
    extra = draw(st.lists(st.sampled_from(names), max_size=6))
    circuit = Circuit.from_edges(edges, shape)
    nodes = sorted(circuit.nodes | set(extra))
    json_value = st.recursive(
        st.none() | st.booleans() | st.integers() | score | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=8,
    )
    stage_nodes = draw(st.lists(st.sampled_from(nodes), max_size=4)) if nodes else []
    return Circuit(
        nodes=frozenset(nodes),
        shape=shape,
        edges=circuit.edges,
        node_scores=draw(st.dictionaries(st.sampled_from(names), score, max_size=5)),
        edge_scores=draw(st.dictionaries(st.sampled_from(keys), score, max_size=8)),
        stages={n: draw(st.integers(0, 4)) for n in stage_nodes},
        metadata=draw(st.dictionaries(st.text(max_size=8), json_value, max_size=4)),
    )


@settings(max_examples=60, deadline=None)
@given(circuits())
def test_both_formats_round_trip_random_circuits(circuit: Circuit) -> None:
    assert Circuit.from_json(circuit.to_json()) == circuit
    back = Circuit.from_mib_json(circuit.to_mib_json())
    assert back == circuit and hash(back) == hash(circuit)
    assert json.loads(circuit.to_json())["format_version"] == CIRCUIT_FORMAT_VERSION
    # every head or MLP at an edge's end is a node
    ends = {s for s, _ in circuit.edges} | {r.partition("<")[0] for _, r in circuit.edges}
    assert ends - {"input", "logits"} <= circuit.nodes


@pytest.mark.parametrize(
    "shape",
    [ModelShape(3, 2, has_mlps=True), ModelShape(2, 3, has_mlps=True, parallel=True),
     ModelShape(2, 2, has_mlps=False)],
)  # fmt: skip
def test_edge_scores_come_in_the_graphs_order_whatever_their_order_given(
    shape: ModelShape,
) -> None:
    """Scores are kept in ``edges_of`` order: the order of their receivers, inputs and
    senders (``_edge_order``), looked up per edge rather than computed."""
    import random

    from reuse_lens.circuits.circuit import _edge_order

    graph = edges_of(shape)
    assert sorted(graph, key=_edge_order) == graph
    keys = [(e.sender.name, e.receiver_name) for e in graph]
    shuffled = random.Random(0).sample(keys, len(keys))
    scores = {key: float(i) for i, key in enumerate(shuffled)}
    circuit = Circuit.from_edges(keys[:3], shape, edge_scores=scores)
    assert list(circuit.edge_scores) == keys
    assert dict(circuit.edge_scores) == scores
