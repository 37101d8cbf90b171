"""reuse_lens.circuits.mib on its own; the format's behaviour is tested through Circuit
in test_circuit.py."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from reuse_lens.circuits import Circuit, CircuitError, mib
from reuse_lens.nodes import ModelShape, edges_of

SMALL = ModelShape(n_layers=2, n_heads=1, has_mlps=True)


def test_mib_module_imports_no_torch() -> None:
    """MIB files can be converted without a model, like circuit.py's own."""
    code = "import sys, reuse_lens.circuits.mib; print(*sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert {"torch", "transformer_lens"}.isdisjoint(run.stdout.split())


def test_module_functions_are_what_the_methods_give() -> None:
    circuit = Circuit.from_edges(
        ["a0.h0->a1.h0<q>", "a1.h0->logits"], SMALL, edge_scores={"a1.h0->logits": 0.5}
    )
    doc = mib.to_mib_dict(circuit, d_model=8)
    assert doc == circuit.to_mib_dict(d_model=8)
    assert json.loads(mib.to_mib_json(circuit, d_model=8)) == doc
    fields = mib.mib_fields(doc)
    assert fields["nodes"] == frozenset({"a0.h0", "a1.h0"})
    assert fields["shape"] == SMALL
    assert Circuit(**fields) == circuit


def test_neuron_warning_points_at_the_caller() -> None:
    """The warning names the line that called from_mib_json, not reuse_lens code."""
    nodes = {n.name: {"in_graph": n.name == "m0"} for n in SMALL.nodes()}
    nodes["m0"]["neurons"] = [True, False]
    edges = {e.name: {"score": 0.0, "in_graph": False} for e in edges_of(SMALL)}
    doc = {"cfg": {"n_layers": 2, "n_heads": 1}, "nodes": nodes, "edges": edges}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Circuit.from_mib_json(json.dumps(doc))
    (warning,) = caught
    assert warning.filename == __file__


def test_parallel_models_round_trip_with_their_own_graph() -> None:
    # EAP-IG builds its edge graph from cfg.parallel_attn_mlp: a parallel model's file
    # must say so, and must not hold an edge from a layer's heads into its own MLP.
    shape = ModelShape(n_layers=2, n_heads=1, has_mlps=True, parallel=True)
    circuit = Circuit.from_edges([("a0.h0", "m1"), ("m0", "logits")], shape)
    doc = json.loads(circuit.to_mib_json())
    assert doc["cfg"]["parallel_attn_mlp"] is True
    assert "a1.h0->m1" not in doc["edges"] and "a0.h0->m0" not in doc["edges"]
    assert len(doc["edges"]) == len(edges_of(shape))
    back = Circuit.from_mib_json(json.dumps(doc))
    assert back.shape == shape and back.edges == circuit.edges
    assert Circuit.from_json(circuit.to_json()).shape == shape
    sequential = ModelShape(n_layers=2, n_heads=1, has_mlps=True)
    assert (
        json.loads(Circuit.from_nodes(["a0.h0"], sequential).to_mib_json())["cfg"][
            "parallel_attn_mlp"
        ]
        is False
    )
    with pytest.raises(CircuitError, match="not an edge of the model's graph"):
        Circuit.from_edges([("a1.h0", "m1")], shape)
    seq_circuit = Circuit.from_edges([("a1.h0", "m1")], sequential)
    with pytest.raises(CircuitError, match="in parallel"):
        seq_circuit.check(shape)


# --- the sign of the scores -------------------------------------------------------------


def test_mib_files_carry_mibs_sign_and_read_back_in_ours() -> None:
    """Ours is the metric change when noised (important = negative); MIB ranks by signed
    score unless --absolute, with important = positive, so MIB files flip the sign."""
    circuit = Circuit.from_edges(
        ["a0.h0->m0"],
        SMALL,
        edge_scores={"a0.h0->m0": -0.5, "input->m1": 0.25},
        node_scores={"a0.h0": -2.0},
    )
    doc = circuit.to_mib_dict()
    assert doc["edges"]["a0.h0->m0"]["score"] == 0.5
    assert doc["edges"]["input->m1"]["score"] == -0.25
    assert doc["nodes"]["a0.h0"]["score"] == 2.0
    assert doc["edges"]["input->logits"]["score"] == 0.0  # no -0.0 placeholders
    assert "-0.0" not in circuit.to_mib_json()
    assert doc["reuse_lens"]["score_sign"] == "mib"
    assert Circuit.from_mib_dict(doc) == circuit
    ours = circuit.to_mib_dict(sign="reuse_lens")
    assert ours["edges"]["a0.h0->m0"]["score"] == -0.5
    assert Circuit.from_mib_dict(ours) == circuit
    # a file of MIB's own (no block) is in MIB's sign; a file of ours from before the
    # record is in ours; an explicit sign overrides both
    del doc["reuse_lens"]
    assert Circuit.from_mib_dict(doc).edge_scores[("a0.h0", "m0")] == -0.5
    assert Circuit.from_mib_dict(doc, sign="reuse_lens").edge_scores[("a0.h0", "m0")] == 0.5
    del ours["reuse_lens"]["score_sign"]
    assert Circuit.from_mib_dict(ours).edge_scores[("a0.h0", "m0")] == -0.5
    with pytest.raises(CircuitError, match="unknown score sign"):
        circuit.to_mib_dict(sign="positive")  # type: ignore[arg-type]
