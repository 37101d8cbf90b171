"""Run a model with everything outside a circuit ablated: the engine behind faithfulness.

A *node* circuit keeps some heads and MLPs; every other head's and MLP's output is
replaced by its ablated value (the corrupted partner's, the mean over the task's clean
prompts, or zero), for every receiver downstream. An *edge* circuit keeps some edges
(sender -> receiver input); every receiver input adds up the current outputs of the
senders whose edge it keeps and the ablated outputs of the others (Hanna et al. 2024;
MIB). Ablating every edge out of a node is the same as ablating the node, and
``tests/circuits`` checks that the two engines agree on this.

The attention output bias ``b_O`` of a layer belongs to no head, so it is never ablated;
an ablated head's output is ``z @ W_O`` of its source value. The ``input`` sender can only
be ablated edge by edge, so a node circuit always keeps it. What ``input`` is depends on
``input_node`` (see ``InputKind``): by default the token plus position embedding, the whole
residual stream before the first block; with ``"tokens"`` the token embedding alone, as
EAP-IG and MIB's evaluation define it, and the position embedding is never ablated.

Both engines run on the functional forward of ``_forward`` (many circuits and prompts
stacked along the batch; ``_circuit_forward``): node circuits that keep the same nodes up
to a block share the blocks before it, and a circuit computes only the heads and MLPs it
keeps (node circuits) or keeps an edge out of (edge circuits), an ablated one's output
being its source; edge circuits evaluated call after call through one ``EdgeMemo``
reuse the senders' outputs they share. A model that the functional forward cannot
reproduce runs them through hooks on the bridge (``_hook_edges`` for edges, which
refuses, with the reason, a model whose hooks cannot give each head its own inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from reuse_lens._memory import (
    HEADROOM,
    MemoryBudget,
    Shapes,
    chunk_items,
    nbytes,
    resolve_budget,
)
from reuse_lens._validate import check_pair
from reuse_lens.nodes import MLP, AttentionHead, Expert, ModelShape, Node, parse_node, shape_of
from reuse_lens.patching._circuit_forward import DroppedEdges, Sources, node_forward
from reuse_lens.patching._common import (
    Engine,
    Prepared,
    position_mask,
    prepare,
    rows_per_chunk,
    zero_cache,
)
from reuse_lens.patching._edge_forward import run_edges
from reuse_lens.patching._experts import ExpertRuns, Plan, RoutingMode, check_routing
from reuse_lens.patching._forward import Weights
from reuse_lens.patching._hook_edges import HookEdges
from reuse_lens.patching._hooks import HookSources, hook_name
from reuse_lens.patching._sparse_edges import SenderMemo, sparse_edge_logits, sparse_edges_supported
from reuse_lens.patching.graph import GraphIndex

if TYPE_CHECKING:
    from collections.abc import Iterable

    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.nodes import Ablation
    from reuse_lens.tasks.metrics import Metric
    from reuse_lens.tasks.task import Task

__all__ = [
    "INPUT_NODES",
    "MEAN_POSITIONS",
    "AblationRunner",
    "EdgeMemo",
    "InputKind",
    "MeanPositions",
    "NodeMask",
]

_ABLATIONS = ("resample", "mean", "zero")

InputKind = Literal["embeddings", "tokens"]
"""What the ``input`` sender's output is when its edges are ablated.

``"embeddings"`` (the default): the token plus position embedding, ``blocks.0.hook_resid_pre``:
everything in the residual stream that no head or MLP wrote, so that ablating every edge
leaves no clean signal behind (with ``resample`` ablation it is exactly the corrupted run).
``"tokens"``: the token embedding alone (``hook_embed``), EAP-IG's ``input`` node and so
MIB's; the position embedding stays clean. Choose it to reproduce MIB's numbers. Only
``zero`` ablation tells the two apart: a position's embedding is the same in a clean
prompt, its corrupted partner and the mean over real tokens, so under ``resample`` and
``mean`` ablating it changes nothing."""

INPUT_NODES: tuple[str, ...] = ("embeddings", "tokens")

MeanPositions = Literal["real", "padded"]
"""Which prompts ``mean`` ablation averages at a position.

``"real"`` (the default): the prompts that have a real token there, so padding never
enters the mean. ``"padded"``: every prompt of the task's padded batch, whatever the
model computes at its padding included, as EAP-IG's ``mean-positional`` ablation (and so
MIB's) averages one padded batch. The two differ only on prompts of mixed lengths."""

MEAN_POSITIONS: tuple[str, ...] = ("real", "padded")


@dataclass(frozen=True)
class NodeMask:
    """Which heads and MLPs a node circuit keeps: True = kept, False = ablated.

    ``experts`` is set for a shape with expert nodes: ``(layer, column)``, the columns of
    ``ModelShape.column``; there ``mlps`` is read only at the layers not split into
    experts.
    """

    heads: Bool[Tensor, "layer head_index"]
    mlps: Bool[Tensor, " layer"] | None
    experts: Bool[Tensor, "layer column"] | None = None

    @classmethod
    def full(cls, shape: ModelShape, keep: bool = True) -> NodeMask:
        heads = torch.full((shape.n_layers, shape.n_heads), keep)
        mlps = torch.full((shape.n_layers,), keep) if shape.has_mlps else None
        experts = torch.full((shape.n_layers, shape.n_columns), keep) if shape.experts else None
        return cls(heads, mlps, experts)

    @classmethod
    def of(cls, shape: ModelShape, nodes: Iterable[str | Node], *, keep: bool = True) -> NodeMask:
        """``nodes`` set to ``keep`` and every other node to the opposite: the circuit of
        ``nodes`` (the default), or everything but them (``keep=False``)."""
        mask = cls.full(shape, keep=not keep)
        for name in nodes:
            node = parse_node(name)
            shape.check(node)
            if isinstance(node, AttentionHead):
                mask.heads[node.layer, node.head] = keep
            elif isinstance(node, MLP) and mask.mlps is not None:
                mask.mlps[node.layer] = keep
            elif isinstance(node, Expert) and mask.experts is not None:
                mask.experts[node.layer, shape.column(node)] = keep
        return mask


class EdgeMemo:
    """Senders' outputs that the edge circuits of one runner carry from one
    ``edge_values`` call to the next (``_sparse_edges.SenderMemo``), per chunk of
    prompts: the prefixes of a ranking, evaluated batch after batch, recompute only the
    senders downstream of the edges each adds.

    What is held over every chunk stays within ``MEMO_SHARE`` of the memory budget of
    the runner it is bound to on first use; past it, the later senders are computed
    again. It changes no value.
    """

    def __init__(self) -> None:
        self.limit: int | None = None
        self.runner: AblationRunner | None = None
        self._chunks: dict[tuple[int, ...], SenderMemo] = {}

    def bind(self, runner: AblationRunner) -> None:
        """Tie the memo to the runner whose sources its outputs were computed with."""
        if self.runner is None:
            self.runner, self.limit = runner, int(runner.budget * MEMO_SHARE)
        elif self.runner is not runner:
            raise ValueError("an EdgeMemo holds one runner's outputs: make one per runner")

    @property
    def computed(self) -> int:
        """How many classes of senders were computed through this memo."""
        return sum(memo.next_id for memo in self._chunks.values())

    def of(self, prompts: Int[Tensor, " prompt"], n: int) -> SenderMemo:
        """The memo of this chunk of ``n`` prompts, with its share of the limit."""
        key = tuple(prompts.tolist())
        if key not in self._chunks:
            share = None if self.limit is None else self.limit * len(key) // max(1, n)
            self._chunks[key] = SenderMemo(limit=share)
        return self._chunks[key]


MEMO_SHARE = 0.25
"""The share of the memory budget an ``EdgeMemo`` may hold between passes: the last
pass's buffer of senders' outputs where it fits, else as many of the last circuit's
outputs as do. It needs no room of its own in the chunking: the sparse edge forward of a
pass holds far less than ``Shapes.edge_ablation_prompt`` counts (that is the dense
forward's: every sender's delta for every circuit, three times, and every receiver's
input), about one copy of the deltas."""


class AblationRunner:
    """The task metric of a model with everything outside a circuit ablated.

    Build one per (model, task, ablation) and call ``nodes`` / ``edges`` for as many
    circuits as needed: the sources and the unablated runs are computed once. Circuits
    and prompts are stacked along the batch, as many rows per pass as ``memory_budget``
    holds (``batch_size`` overrides it; see ``reuse_lens._memory``); the values do not
    depend on the chunking. ``hold_runs`` keeps the unablated runs of the preparation
    (``prep``) until ``release_runs``, for a caller that patches the same prompts first
    (discovery's activation patching takes them through ``Prepared.renewed``).

    Attributes:
        full: the mean metric of the unablated model (every node and edge kept).
        shape: the model's layers, heads and MLPs.
    """

    def __init__(
        self,
        model: TransformerBridge,
        task: Task,
        *,
        ablation: Ablation = "mean",
        metric: str | Metric | None = None,
        batch_size: int | None = None,
        engine: Engine = "auto",
        input_node: InputKind = "embeddings",
        mean_positions: MeanPositions = "real",
        memory_budget: MemoryBudget = None,
        experts: bool = False,
        routing: RoutingMode = "frozen",
        hold_runs: bool = False,
    ) -> None:
        check_routing(routing)
        if experts and engine == "functional":
            raise ValueError(
                "expert nodes are patched through hooks on the bridge (each mixture runs its "
                "own router and experts): use engine='auto' or 'hooks' with experts=True"
            )
        if ablation not in _ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}: choose 'mean', 'resample' or 'zero'")
        if input_node not in INPUT_NODES:
            raise ValueError(
                f"unknown input_node {input_node!r}: choose 'embeddings' (token plus position "
                "embedding, the default) or 'tokens' (the token embedding alone, as MIB/EAP-IG)"
            )
        if mean_positions not in MEAN_POSITIONS:
            raise ValueError(
                f"unknown mean_positions {mean_positions!r}: choose 'real' (the default) or "
                "'padded' (padding averaged in, as EAP-IG's mean-positional ablation)"
            )
        self.input_node: InputKind = input_node
        # Circuits compute only the heads and MLPs they keep (node circuits) or keep an
        # edge of (edge circuits), where the model allows it (``_circuit_forward``,
        # ``_sparse_edges``); False: every one, always (the tests compare the two).
        self.sparse_nodes = True
        self.sparse_edges = True
        self.mean_positions: MeanPositions = mean_positions
        model, task = check_pair(model, task)
        if len(task) == 0:
            raise ValueError(f"task {task.name!r} has no prompts: load it with n >= 1")
        self.ablation = ablation
        # First: it refuses models without attention heads (and, for experts, without
        # a mixture of experts).
        self.shape = shape_of(model, experts=experts)
        self.budget = resolve_budget(memory_budget, model.cfg.device)
        if batch_size is not None:
            rows_per_chunk(model, 1, batch_size, self.budget)  # refuses a bad one now
        if experts:
            engine = "hooks"
        self.prep: Prepared = prepare(model, task, metric, engine=engine, budget=self.budget)
        self.batch_size = batch_size
        self._width = int(self.prep.clean.shape[1])
        # The positions each prompt adds to a mean: its real ones, or the whole padded width.
        self._mean_lengths = (
            self.prep.answer_pos + 1
            if mean_positions == "real"
            else torch.full_like(self.prep.answer_pos, self._width)
        )
        self.full = float(self.prep.clean_metric.mean())
        self._sources: Sources | None = None
        self._hook_sources: HookSources | None = None
        self._edges_by_hooks: HookEdges | None = None
        self._experts: ExpertRuns | None = None
        if experts:
            self._experts = ExpertRuns(model, routing)
            self._experts.set_up(
                ablation,
                self.prep.clean,
                self.prep.corrupted,
                self._mean_lengths,
                self._per_chunk(self._expert_prompt(), "prompt of the experts' record"),
            )
        with torch.no_grad():
            if self.prep.weights is not None:
                forward_row = Shapes.of(model, self._width).forward_row()
                if self.ablation != "resample" or self._sources_fit(forward_row):
                    self._sources = self._functional_sources(self.prep.weights)
                # Circuits read the sources and recompute the rest from the tokens: the
                # runs go, and the budget's room with them returns to the chunks (with
                # ``hold_runs``, once the caller that patches with them first is done).
                if not hold_runs:
                    self.release_runs()
            else:
                self._hook_sources = self._hooked_sources()

    def release_runs(self) -> None:
        """Let the unablated runs go (``hold_runs``): circuits read the sources and
        recompute the rest, and the budget's room returns to the chunks."""
        self.prep.runs.clear()
        self.prep.part_bytes = 0

    @property
    def engine(self) -> str:
        return "functional" if self.prep.weights is not None else "hooks"

    def circuits_per_pass(self, level: Literal["node", "edge"]) -> int:
        """How many circuits one pass of the engine evaluates on every prompt (at least 1)."""
        if level == "edge":
            per_pass = self._edge_prompts_per_chunk(self.prep.weights)
        else:
            shapes = Shapes.of(self.prep.model, self._width)
            per_pass = self._per_chunk(shapes.forward_row(), "row of a forward pass")
        return max(1, per_pass // self.prep.n)

    # ---- node circuits --------------------------------------------------------------

    def nodes(self, masks: NodeMask | list[NodeMask]) -> Float[Tensor, " circuit"]:
        """The mean metric of each node circuit (a tensor with one value per mask)."""
        return self.node_values(masks).mean(1)

    @torch.no_grad()
    def node_values(self, masks: NodeMask | list[NodeMask]) -> Float[Tensor, "circuit prompt"]:
        """The metric of each node circuit on each prompt.

        Circuits and prompts are stacked along the batch, as many (circuit, prompt) rows
        per pass as the budget holds; in the functional engine, circuits that keep the
        same nodes up to a block share that block's run (``_circuit_forward.node_forward``).
        """
        batch = [masks] if isinstance(masks, NodeMask) else masks
        for mask in batch:
            self._check_node_mask(mask)
        n = self.prep.n
        values = torch.empty(len(batch), n)
        if not batch:
            return values
        heads = torch.stack([m.heads for m in batch]).to(self.prep.clean.device)
        mlps = (
            torch.stack([m.mlps for m in batch]).to(self.prep.clean.device)  # type: ignore[misc]
            if self.shape.has_mlps
            else None
        )
        shapes = Shapes.of(self.prep.model, self._width)
        step = self._per_chunk(shapes.forward_row(), "row of a forward pass")
        experts = None
        if self.shape.experts:
            experts = torch.stack([m.experts for m in batch]).to(self.prep.clean.device)  # type: ignore[misc]
        w = self.prep.weights
        if w is None:
            self._node_values_hooks(heads, mlps, experts, step, values)
            return values
        # A pass holds whole circuits on every prompt when they fit, else one circuit on
        # as many prompts as fit.
        per_pass, prompts_per = max(1, step // n), min(n, step)
        device = self.prep.clean.device
        for first in range(0, len(batch), per_pass):
            circuits = slice(first, min(first + per_pass, len(batch)))
            for start in range(0, n, prompts_per):
                prompt = torch.arange(start, min(start + prompts_per, n), device=device)
                src, src_rows = self._sources_of(w, prompt)
                logits = node_forward(
                    w,
                    self.prep.clean[prompt],
                    self.prep.answer_pos[prompt],
                    src,
                    src_rows,
                    heads[circuits],
                    None if mlps is None else mlps[circuits],
                    sparse=self.sparse_nodes,
                )
                k = logits.shape[0]
                scored = self.prep.score(logits.flatten(0, 1), prompt.repeat(k))
                values[circuits, start : start + len(prompt)] = scored.view(k, -1).cpu()
        return values

    def _node_values_hooks(
        self,
        heads: Bool[Tensor, "circuit layer head_index"],
        mlps: Bool[Tensor, "circuit layer"] | None,
        experts: Bool[Tensor, "circuit layer column"] | None,
        step: int,
        values: Float[Tensor, "circuit prompt"],
    ) -> None:
        """``node_values`` through hooks on the bridge, ``step`` rows a pass."""
        n = self.prep.n
        total = heads.shape[0] * n
        # Row r evaluates circuit r // n on prompt r % n.
        circuit_of = torch.arange(total, device=heads.device) // n
        prompt_of = torch.arange(total, device=heads.device) % n
        flat = values.view(-1)
        for start in range(0, total, step):
            rows = slice(start, min(start + step, total))
            prompt, circuit = prompt_of[rows], circuit_of[rows]
            keep_m = None if mlps is None else mlps[circuit]
            keep_e = None if experts is None else experts[circuit]
            logits = self._node_logits_hooks(prompt, heads[circuit], keep_m, keep_e)
            flat[rows] = self.prep.score(logits, prompt).cpu()

    def _check_node_mask(self, mask: NodeMask) -> None:
        expected = (self.shape.n_layers, self.shape.n_heads)
        if tuple(mask.heads.shape) != expected:
            raise ValueError(
                f"a head mask must have shape {expected}, got {tuple(mask.heads.shape)}"
            )
        if (mask.mlps is None) != (not self.shape.has_mlps):
            raise ValueError("an MLP mask must be given exactly when the model has MLPs")
        columns = (self.shape.n_layers, self.shape.n_columns)
        if (mask.experts is None) != (not self.shape.experts) or (
            mask.experts is not None and tuple(mask.experts.shape) != columns
        ):
            raise ValueError(
                f"an expert mask of shape {columns} must be given exactly when the circuit "
                "has expert nodes (experts=True)"
            )

    def _node_logits_hooks(
        self,
        prompt: Int[Tensor, " rows"],
        keep_h: Bool[Tensor, "rows layer head_index"],
        keep_m: Bool[Tensor, "rows layer"] | None,
        keep_e: Bool[Tensor, "rows layer column"] | None = None,
    ) -> Float[Tensor, "rows d_vocab"]:
        assert self._hook_sources is not None
        sources = self._hook_sources
        index = torch.zeros_like(prompt) if sources.shared else prompt

        def heads_hook(layer: int):
            def hook(act: Tensor, hook: object) -> Tensor:
                del hook
                keep = keep_h[:, layer].view(-1, 1, act.shape[2], 1)
                return torch.where(keep, act, sources.values[hook_name(layer, "out")][index])

            return hook

        def mlp_hook(layer: int):
            def hook(act: Tensor, hook: object) -> Tensor:
                del hook
                assert keep_m is not None
                kept = keep_m[:, layer].view(-1, 1, 1)
                return torch.where(kept, act, sources.values[hook_name(layer, "mlp")][index])

            return hook

        hooks: list[Any] = [
            (hook_name(layer, "out"), heads_hook(layer)) for layer in range(self.shape.n_layers)
        ]
        if keep_m is not None:
            # A layer split into experts is ablated expert by expert, below, not whole.
            whole = [layer for layer in range(self.shape.n_layers) if not self.shape.split(layer)]
            hooks += [(hook_name(layer, "mlp"), mlp_hook(layer)) for layer in whole]
        tokens = self.prep.clean[prompt]
        if self._experts is None:
            logits = self.prep.model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
        else:
            assert keep_e is not None
            keep = self._expert_keep(keep_e)
            plan = Plan(
                prompt=prompt, keep=keep, clean_before=self._first_patched(keep_h, keep_m, keep)
            )
            with self._experts.active(plan):
                logits = self.prep.model.run_with_hooks(
                    tokens, fwd_hooks=hooks, return_type="logits"
                )
        rows = torch.arange(len(prompt), device=prompt.device)
        return logits[rows, self.prep.answer_pos[prompt]].float()

    def _first_patched(
        self,
        keep_h: Bool[Tensor, "rows layer head_index"],
        keep_m: Bool[Tensor, "rows layer"] | None,
        keep_e: dict[int, Bool[Tensor, "rows column"]],
    ) -> Int[Tensor, " rows"]:
        """Per row, the first layer where it replaces a head, a whole MLP or an expert
        (the number of layers where it replaces none): every mixture before it reads
        what it read in the clean run."""
        patched = (~keep_h).any(-1)  # (rows, layer)
        if keep_m is not None:
            split = torch.tensor([self.shape.split(layer) for layer in range(self.shape.n_layers)])
            patched = patched | (~keep_m & ~split.to(keep_m.device))
        for layer, keep in keep_e.items():
            patched[:, layer] |= (~keep).any(-1)
        layers = torch.arange(self.shape.n_layers, device=patched.device)
        return torch.where(patched, layers, self.shape.n_layers).min(-1).values

    def _expert_keep(
        self, keep_e: Bool[Tensor, "rows layer column"]
    ) -> dict[int, Bool[Tensor, "rows column"]]:
        """Per split layer, the expert columns each row keeps; layers that keep every
        expert in every row are left out (their mixture runs as it is)."""
        out: dict[int, Tensor] = {}
        for layer in range(self.shape.n_layers):
            if not self.shape.split(layer):
                continue
            columns = [self.shape.column(e) for e in self.shape.experts_of(layer)]
            keep = keep_e[:, layer, columns]  # the columns of this layer's experts, in order
            if not bool(keep.all()):
                out[layer] = keep
        return out

    # ---- edge circuits --------------------------------------------------------------

    def edges(self, keep: Bool[Tensor, "sender receiver"]) -> float:
        """The mean metric of one edge circuit, given as a keep-mask in ``GraphIndex`` order."""
        return float(self.edge_values(keep.unsqueeze(0))[0].mean())

    @torch.no_grad()
    def edge_values(
        self, keep: Bool[Tensor, "circuit sender receiver"], memo: EdgeMemo | None = None
    ) -> Float[Tensor, "circuit prompt"]:
        """The metric of each edge circuit (keep-masks in ``GraphIndex`` order) on each prompt.

        The functional engine stacks circuits and prompts along the batch, as many
        (circuit, prompt) rows a pass as the budget holds; hooks run one circuit a pass.
        ``memo``: senders' outputs carried from one call (and pass) to the next, for
        circuits that share them (``EdgeMemo``: the prefixes of a ranking, in order); the
        values are the same without it.
        """
        if self.shape.experts:
            raise NotImplementedError(
                "edge circuits are not evaluated with expert nodes (experts=True): evaluate a "
                "node circuit, or an edge circuit with MLP-level nodes (experts=False)"
            )
        w = self.prep.weights
        if w is not None and (why := w.spec.edge_unsupported()) is not None:
            raise NotImplementedError(
                f"edge circuits need each head's output on its own, but {why}. Evaluate a node "
                "circuit instead (Circuit.from_nodes(circuit.nodes, ...))."
            )
        index = GraphIndex(self.shape)
        if keep.dim() != 3 or tuple(keep.shape[1:]) != (index.n_senders, index.n_receivers):
            raise ValueError(
                f"an edge mask must have shape {(index.n_senders, index.n_receivers)}, "
                f"got {tuple(keep.shape[1:]) if keep.dim() == 3 else tuple(keep.shape)}"
            )
        n, device = self.prep.n, self.prep.clean.device
        dtype = w.w_u.dtype if w is not None else self.prep.model.W_O.dtype
        drop = (~keep.bool()).to(dtype).to(device)
        values = torch.empty(len(keep), n)
        step = self._edge_prompts_per_chunk(w)
        if w is None:
            hooks = self._hook_edges()
            for c in range(len(keep)):
                for start in range(0, n, step):
                    prompt = torch.arange(start, min(start + step, n), device=device)
                    tokens, answer = self.prep.clean[prompt], self.prep.answer_pos[prompt]
                    logits = hooks.logits(tokens, prompt, answer, drop[c])
                    values[c, start : start + len(prompt)] = self.prep.score(logits, prompt).cpu()
            return values
        per_pass, prompts_per = max(1, step // n), min(n, step)
        if memo is not None:
            memo.bind(self)
        for first in range(0, len(keep), per_pass):
            circuits = slice(first, min(first + per_pass, len(keep)))
            for start in range(0, n, prompts_per):
                prompt = torch.arange(start, min(start + prompts_per, n), device=device)
                logits = self._edge_logits(w, index, prompt, drop[circuits], memo)
                k = drop[circuits].shape[0]
                scored = self.prep.score(logits, prompt.repeat(k))
                values[circuits, start : start + len(prompt)] = scored.view(k, -1).cpu()
        return values

    def _edge_prompts_per_chunk(self, w: Weights | None) -> int:
        """Prompts per edge-circuit pass: ``batch_size``, else as many as the budget holds.

        A row holds every sender's delta ``(pos, sender, d_model)`` and, a layer at a time,
        every receiver's own input ``(pos, 3*head, d_model)``: far more than a node row.
        """
        shapes = Shapes.of(self.prep.model, self._width)
        post = w is not None and any(layer.attn_post is not None for layer in w.layers)
        per_prompt = shapes.edge_ablation_prompt(post_norm=post)
        held = self._sources is not None and self.ablation == "resample"
        if held and self.batch_size is None and not self._sources_fit(per_prompt):
            # An edge circuit's prompt is far larger than a node row: the held sources
            # go, and each chunk computes its own from here on.
            self._sources = None
        return self._per_chunk(per_prompt, "prompt of an edge circuit")

    def _per_chunk(self, per_item: int, what: str) -> int:
        """Items (rows or prompts) per pass: ``batch_size``, else as many as the budget
        holds next to what the call holds (``_held``); an item whose sources are computed
        with its chunk also holds its corrupted run."""
        if self.batch_size is not None:
            return self.batch_size
        if self._resampled_per_chunk:
            per_item += Shapes.of(self.prep.model, self._width).run_cache()
        return chunk_items(self.budget, per_item, self._held(), what)

    def _hooked_sources(self) -> HookSources:
        """The hook engine's sources; a mean is taken part by part (``Prepared.spans``),
        so that no cache of every prompt is made for a batch of one."""
        prep = self.prep
        if self.ablation == "mean":
            return HookSources.mean(prep.model, prep.clean_parts(self._mean_lengths), "out")
        return HookSources.build(
            prep.model, prep.corrupted, prep.clean, self._mean_lengths, self.ablation, "out"
        )

    def _expert_prompt(self) -> int:
        """One prompt of the experts' record: a forward row, and every term of every
        mixture, ``(pos, expert, d_model)`` per layer, held until its chunk is summed."""
        shapes = Shapes.of(self.prep.model, self._width)
        return shapes.forward_row() + shapes.expert_terms(self.shape.n_experts)

    def _held(self) -> int:
        """Bytes held for the whole of a call: the functional weights and the ablation's
        sources (none when each chunk computes its own); for hooks, the sources of node
        circuits and, once built, of edge circuits, and the experts' routing and
        sources."""
        if self.prep.weights is None:
            held = [] if self._hook_sources is None else [self._hook_sources]
            if self._edges_by_hooks is not None:
                held.append(self._edges_by_hooks.sources)
            experts = 0 if self._experts is None else self._experts.held_bytes
            return experts + nbytes(x for sources in held for x in sources.values.values())
        src = self._sources
        sources = 0 if src is None else nbytes([src.input, *src.z, *src.mlp_out])
        return self.prep.held_bytes + sources

    def _hook_edges(self) -> HookEdges:
        """The hook engine for edge circuits, built on first use (its sources cost a run)."""
        if self._edges_by_hooks is None:
            prep = self.prep
            self._edges_by_hooks = HookEdges(
                prep.model, prep.corrupted, prep.clean, self._mean_lengths, self.ablation
            )
        return self._edges_by_hooks

    def _edge_logits(
        self,
        w: Weights,
        index: GraphIndex,
        prompt: Int[Tensor, " prompt"],
        drop: Float[Tensor, "circuit sender receiver"],
        memo: EdgeMemo | None = None,
    ) -> Float[Tensor, "row d_vocab"]:
        """Answer logits, circuit-major, with every receiver input = kept senders' outputs
        + dropped ones' ablations (``memo``: see ``edge_values``)."""
        src, src_rows = self._sources_of(w, prompt)
        k = drop.shape[0]
        tokens = self.prep.clean[prompt]
        resid = w.embed(tokens)
        # The input sender's current output: the whole embedding, or the token part alone.
        current = resid if self.input_node == "embeddings" else w.w_e[tokens]
        if self.sparse_edges and sparse_edges_supported(w) is None:
            keep = drop == 0
            answer = self.prep.answer_pos[prompt]
            held = None if memo is None else memo.of(prompt, self.prep.n)
            return sparse_edge_logits(
                w, index, keep, resid, current, src, src_rows, answer, memo=held
            )
        input_delta = (src.input[src_rows] - current).repeat(k, 1, 1)
        ablated_z = [z if src.shared else z[src_rows] for z in src.z]
        ablated_mlp = [m if src.shared else m[src_rows] for m in src.mlp_out]
        resid = resid.repeat(k, 1, 1)
        dropped = DroppedEdges(w, index, drop, resid, input_delta, ablated_z, ablated_mlp)
        return run_edges(w, resid, self.prep.answer_pos[prompt].repeat(k), dropped)

    # ---- sources --------------------------------------------------------------------

    @property
    def _resampled_per_chunk(self) -> bool:
        """Whether each chunk computes resampling's sources for its own prompts."""
        return self.prep.weights is not None and self._sources is None

    def _sources_fit(self, per_item: int) -> bool:
        """Whether resampling's sources (the corrupted runs' sender outputs of every
        prompt) may be held next to items of ``per_item`` bytes: in at most half of what
        the weights copy leaves of the budget, and with one item beside them. If not,
        each chunk computes those of its own prompts (one more forward pass per prompt)."""
        w = self.prep.weights
        assert w is not None
        room = int(self.budget * (1 - HEADROOM)) - w.own_bytes
        sources = self.prep.n * Shapes.of(self.prep.model, self._width).sender_outputs()
        return 2 * sources <= room and sources + per_item <= room

    def _sources_of(
        self, w: Weights, prompt: Int[Tensor, " rows"]
    ) -> tuple[Sources, Int[Tensor, " rows"]]:
        """The sources for a chunk's prompts, and the row of them each prompt reads."""
        if self._sources is not None:
            src = self._sources
            return src, torch.zeros_like(prompt) if src.shared else prompt
        distinct, rows = torch.unique(prompt, return_inverse=True)
        tokens = self.prep.corrupted[distinct]
        run = w.run(tokens)
        source_input = run.resid_pre[0] if self.input_node == "embeddings" else w.w_e[tokens]
        return Sources(input=source_input, z=run.z, mlp_out=run.mlp_out), rows

    def _functional_sources(self, w: Weights) -> Sources:
        """What replaces each sender's output: the corrupted runs' (of every prompt,
        gathered part by part), their mean over every prompt, or zero."""
        prep = self.prep
        if self.ablation == "resample":
            # Of each part's corrupted run, only what a circuit reads is kept.
            # resid_pre[0] is the embedding, the output of the ``input`` sender.
            kept = [
                [run.resid_pre[0], *run.z, *run.mlp_out]
                for run in (part.run("corrupted") for part in prep.parts())
            ]
            flat = kept[0] if len(kept) == 1 else [torch.cat(xs) for xs in zip(*kept, strict=True)]
            n = w.n_layers
            source_input, z, mlp_out = flat[0], flat[1 : 1 + n], flat[1 + n :]
        else:
            cache = (
                prep.mean_run(self._mean_lengths)
                if self.ablation == "mean"
                else zero_cache(prep.select(slice(0, 1)).run("clean"))
            )
            source_input, z, mlp_out = cache.resid_pre[0], cache.z, cache.mlp_out
        if self.input_node == "tokens":
            source_input = self._token_embedding_source(w)
        return Sources(input=source_input, z=z, mlp_out=mlp_out)

    def _token_embedding_source(self, w: Weights) -> Float[Tensor, "src pos d_model"]:
        """The ablated token embedding, for ``input_node="tokens"`` (MIB's ``input``)."""
        prep = self.prep
        if self.ablation == "resample":
            return w.w_e[prep.corrupted]
        embedded = w.w_e[prep.clean]
        if self.ablation == "zero":
            return torch.zeros_like(embedded[:1])
        # As every other mean: position by position, over the prompts that count there.
        valid = position_mask(self._mean_lengths, embedded.shape[1]).to(embedded.dtype)
        total = (embedded * valid.unsqueeze(-1)).sum(0, keepdim=True)
        return total / valid.sum(0).clamp(min=1).view(1, -1, 1)
