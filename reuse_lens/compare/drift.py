"""What fine-tuning changed, component by component: ``component_drift(base, tuned, task)``.

A fine-tune moves every weight a little (weight decay alone does), so "what changed" is a
question of *where it changed more*. For each attention head and MLP this module measures

- **weights**: the relative change ‖W_tuned − W_base‖ / ‖W_base‖ (Frobenius norms) of the
  head's W_Q, W_K, W_V and W_O slices (biases with their matrices), apart and together,
  and of each MLP's input, gate and output matrices, apart and together; per layer, the
  same for the norms and the attention output bias, and per model for the embeddings;
- **activations** (with a task): on the task's clean prompts, each node's output in the
  two models (a head's is z_h · W_O,h, read before any post-norm; an MLP's is what it adds
  to the residual stream): 1 − cosine similarity and the relative L2 change
  ‖o_tuned − o_base‖ / ‖o_base‖, at each prompt's answer position and over every real
  position; for heads, the change of the attention pattern, the total variation
  ½ Σ_k |p_tuned − p_base| of each query row, averaged over real query positions;
- **statistics**: do MLPs change more than heads (Jain et al. 2024; Wang et al. 2025 find
  fine-tuning moves feed-forward layers more)? Given a circuit, do its members change more
  than the other nodes of their kind? Each is a one-sided permutation test with its effect
  size, and the p-values of one report are corrected together, as in ``compare``.

Under grouped-query attention a query head reads its group's key and value heads, so its
W_K and W_V slices are its group's: every head of a group shows the same k and v change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from reuse_lens._io import write_text_atomic
from reuse_lens._memory import MemoryBudget, resolve_budget
from reuse_lens.compare._drift_stats import DriftTest, drift_tests
from reuse_lens.compare._drift_weights import NORMS as _NORMS
from reuse_lens.compare._drift_weights import LayerParts, NodeWeights, node_weights
from reuse_lens.compare._model_pair import check_pair_of_models, label
from reuse_lens.compare._stats import CORRECTIONS, Correction, adjust_p_values, plain
from reuse_lens.nodes import MLP, AttentionHead, ModelShape, parse_node

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.circuits.circuit import Circuit
    from reuse_lens.patching._common import Engine, Prepared
    from reuse_lens.tasks.task import Task

__all__ = [
    "DRIFT_VERSION",
    "HEAD_WEIGHTS",
    "MLP_WEIGHTS",
    "DriftReport",
    "DriftTest",
    "component_drift",
]

DRIFT_VERSION = 1
"""The version of ``DriftReport.to_json``'s format."""

HEAD_WEIGHTS = ("q", "k", "v", "o")
MLP_WEIGHTS = ("in", "gate", "out")
ACTIVATIONS = ("act_cos_answer", "act_l2_answer", "act_cos_all", "act_l2_all")
_COLUMNS = (
    "node",
    "kind",
    "layer",
    "head",
    "weight",
    *(f"weight_{w}" for w in HEAD_WEIGHTS),
    *(f"weight_{w}" for w in MLP_WEIGHTS),
    *ACTIVATIONS,
    "attn_tv",
    "in_circuit",
)
N_PERMUTATIONS = 10_000


@dataclass(frozen=True, eq=False)
class DriftReport:
    """Per-component change between a base model and its fine-tune (``component_drift``).

    Attributes:
        base / tuned: the two models' specs.
        shape: the models' common node shape.
        task: the task the activations were measured on, or None (weights only).
        rows: one mapping per node (forward order) with the columns of ``table()``.
        layers: one mapping per layer: the relative change of each norm and of the
            attention output bias (NaN where the architecture has none).
        model: the relative change of the embeddings, positions, final norm and unembedding.
        circuit: the circuit whose members the report outlines and tests, or None.
        tests: the permutation tests, their p-values corrected together.
        correction: how the tests' p-values were corrected (``"holm"``, ...).
        notes: what the numbers mean on this architecture (grouped-query attention ...).
        settings: the options the report was made with.
    """

    base: str
    tuned: str
    shape: ModelShape
    task: str | None
    rows: tuple[Mapping[str, Any], ...]
    layers: tuple[Mapping[str, float], ...]
    model: Mapping[str, float]
    circuit: frozenset[str] | None = None
    tests: tuple[DriftTest, ...] = ()
    correction: str = "holm"
    notes: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One row per node: ``node``, ``kind`` (head/mlp), ``layer``, ``head``, ``weight``
        (the relative change of all the node's weights), ``weight_q`` ... ``weight_out``,
        the activation columns (NaN without a task), ``attn_tv`` (heads) and
        ``in_circuit``. Relative changes are 0.0 where nothing changed."""
        import pandas as pd

        table = pd.DataFrame([dict(row) for row in self.rows], columns=list(_COLUMNS))
        table["head"] = table["head"].astype("Int64")  # None for MLPs
        return table

    def layer_table(self) -> pd.DataFrame:
        """One row per layer: the relative change of each norm and the attention output bias."""
        import pandas as pd

        return pd.DataFrame(
            [{"layer": i, **dict(row)} for i, row in enumerate(self.layers)],
            columns=["layer", *_NORMS, "b_o"],
        )

    def layer_profile(self, measure: str = "weight") -> pd.DataFrame:
        """Per layer: the mean of ``measure`` over its heads, and its MLP's value."""
        import pandas as pd

        heads: dict[int, list[float]] = {}
        mlps: dict[int, float] = {}
        for row in self.rows:
            if row["kind"] == "head":
                heads.setdefault(int(row["layer"]), []).append(float(row[measure]))
            else:
                mlps[int(row["layer"])] = float(row[measure])
        layers = range(self.shape.n_layers)
        return pd.DataFrame(
            {
                "layer": list(layers),
                "heads": [float(np.mean(heads[i])) if i in heads else math.nan for i in layers],
                "mlp": [mlps.get(i, math.nan) for i in layers],
            }
        )

    def values(self, measure: str = "weight") -> dict[str, float]:
        """``{node name: measure}`` for every node."""
        return {str(row["node"]): float(row[measure]) for row in self.rows}

    def most_changed(self, k: int = 5, measure: str = "weight") -> list[str]:
        """The ``k`` nodes with the largest ``measure``, largest first (ties in forward order)."""
        values = self.values(measure)
        finite = [(name, v) for name, v in values.items() if math.isfinite(v)]
        return [name for name, _ in sorted(finite, key=lambda item: -item[1])[:k]]

    def test(self, name: str, measure: str = "weight") -> DriftTest | None:
        """The test called ``name`` on ``measure``, or None where it was not made."""
        return next((t for t in self.tests if t.name == name and t.measure == measure), None)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (NaN as null); ``from_dict`` reads it back."""
        return plain(
            {
                "format": "reuse_lens.drift",
                "version": DRIFT_VERSION,
                "base": self.base,
                "tuned": self.tuned,
                "shape": {
                    "n_layers": self.shape.n_layers,
                    "n_heads": self.shape.n_heads,
                    "has_mlps": self.shape.has_mlps,
                    "parallel": self.shape.parallel,
                },
                "task": self.task,
                "rows": [dict(row) for row in self.rows],
                "layers": [dict(row) for row in self.layers],
                "model": dict(self.model),
                "circuit": None if self.circuit is None else sorted(self.circuit),
                "tests": [t.__dict__ for t in self.tests],
                "correction": self.correction,
                "notes": list(self.notes),
                "settings": dict(self.settings),
            }
        )

    def to_json(self, path: str | Any) -> Any:
        """Write the report as JSON, atomically (a crash never leaves half a file)."""
        import json

        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> DriftReport:
        """The report ``to_dict`` wrote (null read back as NaN)."""
        if doc.get("format") != "reuse_lens.drift" or doc.get("version") != DRIFT_VERSION:
            raise ValueError(
                f"not a reuse_lens drift report of version {DRIFT_VERSION}: format "
                f"{doc.get('format')!r}, version {doc.get('version')!r}"
            )

        def nan(row: Mapping[str, Any]) -> dict[str, Any]:
            # JSON has no NaN: a null number reads back as NaN; null labels stay None.
            keep = ("head", "in_circuit", "node", "kind")
            return {k: (math.nan if v is None and k not in keep else v) for k, v in row.items()}

        circuit = doc.get("circuit")
        return cls(
            base=doc["base"],
            tuned=doc["tuned"],
            shape=ModelShape(**doc["shape"]),
            task=doc.get("task"),
            rows=tuple(nan(row) for row in doc["rows"]),
            layers=tuple(nan(row) for row in doc["layers"]),
            model=nan(doc["model"]),
            circuit=None if circuit is None else frozenset(circuit),
            tests=tuple(DriftTest(**nan(t)) for t in doc["tests"]),
            correction=doc["correction"],
            notes=tuple(doc["notes"]),
            settings=doc["settings"],
        )

    @classmethod
    def from_json(cls, path: str | Any) -> DriftReport:
        """Read a report that ``to_json`` wrote."""
        import json
        from pathlib import Path

        return cls.from_dict(json.loads(Path(path).read_text()))

    def sentences(self) -> list[str]:
        """What fine-tuning changed, in plain words generated from the numbers."""
        out: list[str] = []
        name = f"{self.tuned} (from {self.base})"
        top = self.most_changed(3)
        if not top:
            return [f"{name}: no weight could be compared."]
        values = self.values()
        if all(values[n] == 0 for n in values):
            return [f"{name}: no head or MLP weight changed."]
        out.append(
            f"{name}: the heads and MLPs whose weights changed most are "
            + ", ".join(f"{n} ({values[n]:.1%})" for n in top)
            + "."
        )
        for test in self.tests:
            significant = test.p_adjusted <= 0.05
            words = test.sentence(self.correction)
            out.append(
                ("" if significant else "Not significant: ") + words[0].upper() + words[1:] + "."
            )
        return out


def component_drift(
    base: TransformerBridge,
    tuned: TransformerBridge,
    task: Task | None = None,
    *,
    circuit: Circuit | Iterable[str] | None = None,
    correction: Correction = "holm",
    n_permutations: int = N_PERMUTATIONS,
    seed: int = 0,
    engine: Engine = "auto",
    memory_budget: MemoryBudget = None,
) -> DriftReport:
    """How much each head and MLP of ``tuned`` differs from ``base``.

    Arguments:
        base: the model before fine-tuning.
        tuned: the fine-tuned model: the same architecture and shape.
        task: with a task, each node's output and attention pattern are also compared on
            the task's clean prompts (both models must read the task's token ids).
        circuit: a circuit (or node names) of ``tuned``: its members are outlined in the
            table (``in_circuit``) and tested against the other nodes of their kind.
        correction: how the report's p-values are corrected together (``"holm"``,
            ``"bh"``, ``"bonferroni"`` or ``"none"``).
        n_permutations: permutations of each test.
        seed: the permutations' seed; the same seed gives the same p-values.
        engine: ``"auto"`` reads the weights through the model's architecture adapter and
            runs the functional forward where they reproduce the model, and otherwise the
            bridge's per-head weights and hooks; ``"functional"`` or ``"hooks"`` forces
            one. The two agree (a test compares them).
        memory_budget: bytes (or ``"2GiB"``) the two models' runs may hold at once; the
            prompts are taken in parts when they do not fit (docs/scale.md).

    Returns:
        A ``DriftReport``. Identical models give exactly 0.0 everywhere.

    Raises:
        ModelPairError: for models of different architecture, shape or size.
        TaskError: for a task built for another vocabulary.
        UnsupportedArchitectureError: for an architecture whose weights neither an adapter
            nor the bridge reads per head and MLP (``engine="functional"``: no adapter).
    """
    base_model, tuned_model, shape = check_pair_of_models(base, tuned)
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}: choose one of {CORRECTIONS}")
    if (
        isinstance(n_permutations, bool)
        or not isinstance(n_permutations, int)
        or n_permutations < 1
    ):
        raise ValueError(f"n_permutations must be a positive int, got {n_permutations!r}")
    if engine not in ("auto", "functional", "hooks"):
        raise ValueError(f"unknown engine {engine!r}: choose 'auto', 'functional' or 'hooks'")
    members = _circuit_nodes(circuit, shape)
    via = {"auto": "auto", "functional": "adapter", "hooks": "bridge"}[engine]
    with torch.no_grad():
        w_base, w_tuned = node_weights(base_model, via=via), node_weights(tuned_model, via=via)
        rows = _weight_rows(w_base, w_tuned, shape)
        layers = [_layer_norms(a, b) for a, b in zip(w_base.layers, w_tuned.layers, strict=True)]
        model_row = {
            name: _relative(list(zip(w_base.model[name], w_tuned.model[name], strict=True)))
            for name in w_base.model
        }
        if task is not None:
            # The bridge's weights go with the hook engine; an adapter's with "auto", which
            # still falls back to hooks where its forward does not reproduce the model.
            run_on = "hooks" if w_base.source == "bridge" else engine
            _add_activations(rows, base_model, tuned_model, task, shape, run_on, memory_budget)
    for row in rows:
        row["in_circuit"] = None if members is None else row["node"] in members
    tests = drift_tests(rows, members, shape, n_permutations, seed, has_task=task is not None)
    adjusted = adjust_p_values([t.p_value for t in tests], correction)
    tests = [_with(t, p_adjusted=p) for t, p in zip(tests, adjusted, strict=True)]
    notes = []
    if w_base.n_kv_heads is not None and w_base.n_kv_heads < shape.n_heads:
        notes.append(
            f"Grouped-query attention ({w_base.n_kv_heads} key/value heads for "
            f"{shape.n_heads} query heads): each head's W_K and W_V change is its group's, "
            "shared by every query head of the group."
        )
    if any("experts" in layer.mlp for layer in w_base.layers):
        notes.append(
            "Mixture-of-experts MLPs: an MLP's weight change is that of its router and every "
            "expert together; its in, gate and out columns are empty."
        )
    if w_base.source == "bridge":
        notes.append(
            "No architecture adapter reads this family: the weights are TransformerLens's "
            "per-head matrices and the outputs are read through hooks."
        )
    return DriftReport(
        base=label(base_model),
        tuned=label(tuned_model),
        shape=shape,
        task=None if task is None else task.name,
        rows=tuple(rows),
        layers=tuple(layers),
        model=model_row,
        circuit=members,
        tests=tuple(tests),
        correction=correction,
        notes=tuple(notes),
        settings={"n_permutations": n_permutations, "seed": seed, "weights": w_base.source},
    )


def _with(test: DriftTest, **changes: Any) -> DriftTest:
    from dataclasses import replace

    return replace(test, **changes)


def _circuit_nodes(
    circuit: Circuit | Iterable[str] | None, shape: ModelShape
) -> frozenset[str] | None:
    if circuit is None:
        return None
    from reuse_lens.circuits.circuit import Circuit

    names: Iterable[str] = circuit.nodes if isinstance(circuit, Circuit) else circuit
    if isinstance(names, str):
        raise TypeError(
            f"circuit must be a Circuit or a list of node names, got the string {names!r}"
        )
    out = set()
    for name in names:
        node = parse_node(str(name))
        shape.check(node)
        out.add(node.name)
    return frozenset(out)


# ---- weights ---------------------------------------------------------------------------------


def _relative(pairs: Sequence[tuple[Tensor | None, Tensor | None]]) -> float:
    """‖tuned − base‖ / ‖base‖ over every (base, tuned) tensor pair; 0 where nothing changed.

    NaN when no tensor is given; infinity when the base is all zero and the tuned is not
    (a weight that fine-tuning switched on from zero).
    """
    change = size = 0.0
    seen = False
    for a, b in pairs:
        if a is None or b is None:
            continue
        seen = True
        change += float((b.double() - a.double()).pow(2).sum())
        size += float(a.double().pow(2).sum())
    if not seen:
        return math.nan
    if change == 0:
        return 0.0
    return math.inf if size == 0 else math.sqrt(change / size)


def _weight_rows(base: NodeWeights, tuned: NodeWeights, shape: ModelShape) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for index, (a, b) in enumerate(zip(base.layers, tuned.layers, strict=True)):
        for head in range(shape.n_heads):
            node = AttentionHead(index, head).name
            rows.append(_row(node, "head", index, head, a.heads[head], b.heads[head], HEAD_WEIGHTS))
        if shape.has_mlps:
            rows.append(_row(MLP(index).name, "mlp", index, None, a.mlp, b.mlp, MLP_WEIGHTS))
    return rows


def _row(
    node: str,
    kind: str,
    layer: int,
    head: int | None,
    parts_a: Mapping[str, tuple[Tensor | None, ...]],
    parts_b: Mapping[str, tuple[Tensor | None, ...]],
    keys: Sequence[str],
) -> dict[str, Any]:
    """One node's row: each part's relative change (``weight_<part>``), and all its parts
    together (a mixture of experts' router and experts too, which have no column)."""
    row: dict[str, Any] = dict.fromkeys(_COLUMNS, math.nan)
    row.update(node=node, kind=kind, layer=layer, head=head)
    every = []
    for key, part in parts_a.items():
        pairs = list(zip(part, parts_b[key], strict=True))
        if key in keys:
            row[f"weight_{key}"] = _relative(pairs)
        every += pairs
    row["weight"] = _relative(every)
    return row


def _layer_norms(a: LayerParts, b: LayerParts) -> dict[str, float]:
    out = {name: _relative(list(zip(a.norms[name], b.norms[name], strict=True))) for name in _NORMS}
    # Adapters hold an absent attention output bias as zeros: zero in both models is no
    # bias (NaN, as the bridge, which has none), not a bias that did not change.
    absent = all(x is None or not bool(x.any()) for x in (a.b_o, b.b_o))
    out["b_o"] = math.nan if absent else _relative([(a.b_o, b.b_o)])
    return out


# ---- activations -----------------------------------------------------------------------------


def _add_activations(
    rows: list[dict[str, Any]],
    base: TransformerBridge,
    tuned: TransformerBridge,
    task: Task,
    shape: ModelShape,
    engine: Engine,
    memory_budget: MemoryBudget,
) -> None:
    """Fill the activation columns of ``rows``: sums over prompts part by part, then means."""
    from reuse_lens.patching._common import paired_parts, prepare

    budget = resolve_budget(memory_budget, base.cfg.device)
    # Each model's part holds its own runs; two models share the budget.
    prep_b = prepare(base, task, None, engine=engine, budget=budget // 2)
    prep_t = prepare(tuned, task, None, engine=engine, budget=budget // 2)
    functional = prep_b.weights is not None and prep_t.weights is not None
    n_layers, n_heads = shape.n_layers, shape.n_heads
    totals = {
        "head": torch.zeros(len(ACTIVATIONS) + 1, n_layers, n_heads, dtype=torch.float64),
        "mlp": torch.zeros(len(ACTIVATIONS), n_layers, dtype=torch.float64),
    }
    n_prompts = prep_b.n
    n_positions = 0
    for part_b, part_t in paired_parts(prep_b, prep_t):
        answer = part_b.answer_pos
        real = _real_positions(answer, int(part_b.clean.shape[1]))
        n_positions += int(real.sum())
        outs_b = _node_outputs(part_b, functional, shape)
        outs_t = _node_outputs(part_t, functional, shape)
        for layer, ((head_b, pat_b, mlp_b), (head_t, pat_t, mlp_t)) in enumerate(
            zip(outs_b, outs_t, strict=True)
        ):
            totals["head"][:4, layer] += _change_sums(head_b, head_t, answer, real)
            totals["head"][4, layer] += _pattern_tv_sum(pat_b, pat_t, real)
            if mlp_b is not None and mlp_t is not None:
                stats = _change_sums(mlp_b.unsqueeze(2), mlp_t.unsqueeze(2), answer, real)
                totals["mlp"][:, layer] += stats[:, 0]
    denominators = [n_prompts, n_prompts, n_positions, n_positions]
    for row in rows:
        layer = int(row["layer"])
        if row["kind"] == "head":
            values = totals["head"][:, layer, int(row["head"])]
            row["attn_tv"] = float(values[4]) / n_positions
        else:
            values = totals["mlp"][:, layer]
        for i, (column, count) in enumerate(zip(ACTIVATIONS, denominators, strict=True)):
            row[column] = float(values[i]) / count


Outputs = list[tuple[Tensor, Tensor, Tensor | None]]
"""Per layer: each head's output (batch, pos, head, d_model), the attention pattern
(batch, head, q, k) and the MLP's output (batch, pos, d_model), None without MLPs."""


def _node_outputs(part: Prepared, functional: bool, shape: ModelShape) -> Outputs:
    """Each node's output on a part's clean prompts: from the functional forward's run, or
    from the bridge's hooks (a head's is its ``hook_z`` slice times its ``W_O``, read before
    any post-norm or scale, as the functional engine reads it)."""
    if functional:
        assert part.weights is not None
        run = part.run("clean")
        return [
            (
                part.weights.head_out(layer, run.z[layer]),
                run.pattern[layer],
                run.mlp_out[layer] if shape.has_mlps else None,
            )
            for layer in range(shape.n_layers)
        ]
    model = part.model
    names = set()
    for layer in range(shape.n_layers):
        names |= {f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_pattern"}
        if shape.has_mlps:
            names.add(f"blocks.{layer}.hook_mlp_out")
    _, cache = model.run_with_cache(part.clean, names_filter=lambda n: n in names)
    out: Outputs = []
    for layer, block in enumerate(model.blocks):  # type: ignore[arg-type]
        z = cache[f"blocks.{layer}.attn.hook_z"]
        heads = torch.einsum("bphd,hdm->bphm", z, block.attn.W_O.detach().to(z.dtype))
        mlp = cache[f"blocks.{layer}.hook_mlp_out"] if shape.has_mlps else None
        out.append((heads, cache[f"blocks.{layer}.attn.hook_pattern"], mlp))
    return out


def _real_positions(answer: Tensor, width: int) -> Tensor:
    """(batch, pos) bool: the prompt's own tokens, up to and including its answer position."""
    return torch.arange(width, device=answer.device).unsqueeze(0) <= answer.unsqueeze(1)


def _change_sums(
    out_b: Float[Tensor, "batch pos node d_model"],
    out_t: Float[Tensor, "batch pos node d_model"],
    answer: Tensor,
    real: Tensor,
) -> Float[Tensor, "4 node"]:
    """Sums of (1 − cos, relative L2) at the answer positions and over the real positions."""
    a, b = out_b.double(), out_t.double()
    norm_a, norm_b = a.norm(dim=-1), b.norm(dim=-1)
    diff = (b - a).norm(dim=-1)
    dot = (a * b).sum(-1)
    both_zero = (norm_a == 0) & (norm_b == 0)
    cos = torch.where(
        both_zero,
        torch.ones_like(dot),
        dot / (norm_a * norm_b).clamp_min(torch.finfo(torch.float64).tiny),
    )
    one_minus_cos = torch.where((norm_a == 0) ^ (norm_b == 0), torch.ones_like(cos), 1 - cos)
    # An unchanged output is exactly 0 (1 - cos of a vector with itself rounds to ~1e-16).
    one_minus_cos = torch.where(diff == 0, torch.zeros_like(cos), one_minus_cos)
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / norm_a)  # inf where base is 0
    rows = torch.arange(a.shape[0], device=answer.device)
    at_answer = [x[rows, answer].sum(0) for x in (one_minus_cos, rel)]
    mask = real.unsqueeze(-1)
    over_all = [torch.where(mask, x, 0.0).sum((0, 1)) for x in (one_minus_cos, rel)]
    return torch.stack([*at_answer, *over_all]).cpu()


def _pattern_tv_sum(
    pat_b: Float[Tensor, "batch head q k"], pat_t: Float[Tensor, "batch head q k"], real: Tensor
) -> Float[Tensor, " head"]:
    """Σ over real query positions of ½ Σ_k |p_tuned − p_base|, per head."""
    tv = 0.5 * (pat_t.double() - pat_b.double()).abs().sum(-1)  # (batch, head, q)
    return torch.where(real.unsqueeze(1), tv, 0.0).sum((0, 2)).cpu()
