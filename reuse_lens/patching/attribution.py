"""Attribution patching: EAP and EAP-IG scores of nodes and edges, batched over prompts.

Attribution patching (Nanda 2023; Syed et al. 2023, "EAP") replaces one forward pass per
patch by a first-order Taylor estimate from one forward and one backward pass:

    effect(n) ≈ (a_n(corrupted) − a_n(clean)) · ∂metric/∂a_n  (gradient on the clean run)

which is the *noising* direction used everywhere in reuse_lens: a corrupted activation
patched into the clean run, effect = metric with the patch − metric without it.

EAP-IG (Hanna et al. 2024, "Have Faith in Faithfulness") replaces the gradient on the clean
run by its mean along the straight line between the clean and the corrupted input
embeddings. We take the points α = 0, 1/steps, ..., (steps−1)/steps from clean (α = 0)
towards corrupted: the same points as Hanna et al.'s code, which counts k = 1..steps from
the corrupted end. The clean point is included, so ``steps=1`` is exactly EAP.

Edges (sender u → receiver v) are scored as Δout_u · ∂metric/∂in_v, where in_v is the
residual stream entering v *before* v's LayerNorm, and the gradient is the partial one
through v alone. For heads, q, k and v are separate receivers: ∂m/∂q of head h is mapped
back through W_Q[h] and then through the LayerNorm's Jacobian at that position (a
vector-Jacobian product with the block's own LayerNorm module), so the three inputs are
kept apart exactly although they share one LayerNorm. See docs/attribution.md.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from reuse_lens._memory import (
    MemoryBudget,
    Shapes,
    chunk_items,
    edge_attribution_plan,
    resolve_budget,
)
from reuse_lens._progress import progress_bar
from reuse_lens._validate import check_pair
from reuse_lens.nodes import (
    LOGITS,
    MLP,
    ModelShape,
    edges_of,
    shape_of,
)
from reuse_lens.patching._attribution_functional import attribute_edges, functional_weights
from reuse_lens.patching._common import ENGINES, Engine, Prepared
from reuse_lens.patching._experts import ExpertRuns, Plan, RoutingMode, check_routing
from reuse_lens.patching._hook_edges import EDGE_INPUT_HOOK, edge_refusal, mlp_norm
from reuse_lens.patching._hook_geometry import head_output_scale
from reuse_lens.patching._hooks import whole_projection_qk_norm
from reuse_lens.patching._qk_norm_hooks import normed_hook, own_input_grads
from reuse_lens.patching.edges import EdgeScores
from reuse_lens.patching.graph import GraphIndex
from reuse_lens.patching.scores import NodeScores
from reuse_lens.tasks.metrics import Metric, MetricError, MetricInputs, check_finite, get_metric

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.tasks.task import Task

__all__ = ["AttributionLevel", "AttributionMethod", "attribution_patching"]

AttributionMethod = Literal["eap", "eap-ig"]
"""``eap``: the gradient on the clean run. ``eap-ig``: the gradient averaged along the
straight path between the clean and corrupted input embeddings (Hanna et al. 2024)."""

AttributionLevel = Literal["node", "edge"]
"""``node``: one score per head and MLP. ``edge``: one score per edge of ``edges_of``."""


def attribution_patching(
    model: TransformerBridge,
    task: Task,
    *,
    method: AttributionMethod = "eap",
    level: AttributionLevel = "node",
    steps: int = 5,
    per_position: bool = False,
    metric: str | Metric | None = None,
    batch_size: int | None = None,
    engine: Engine = "auto",
    memory_budget: MemoryBudget = None,
    experts: bool = False,
    routing: RoutingMode = "frozen",
) -> NodeScores | EdgeScores:
    """Estimate the effect of every head and MLP (or every edge) by attribution patching.

    Arguments:
        model: a TransformerBridge in eval mode, on the device it should run on.
        task: clean and corrupted prompts; each prompt is read at its own answer position.
        method: ``"eap"`` (one gradient, on the clean run) or ``"eap-ig"`` (integrated
            gradients over ``steps`` points between clean and corrupted embeddings).
        level: ``"node"`` for heads and MLPs, ``"edge"`` for every edge of the graph.
        steps: points on the integration path for ``eap-ig`` (ignored by ``eap``).
        per_position: also return node scores per token position (node level only).
        metric: a metric name or Metric; the task's own metric when None. The score is
            the metric's mean over prompts.
        batch_size: prompts per forward/backward pass; by default as many as
            ``memory_budget`` holds.
        engine: at edge level, ``functional`` differentiates the functional forward with
            one input per receiver (every architecture it reproduces, grouped-query
            attention included), ``hooks`` reads gradients at the bridge's hooks (one k
            and v per query head needed), ``auto`` the first that runs. Node scores are
            always read through hooks.
        memory_budget: bytes or a size such as ``"2GiB"`` that one chunk of prompts may
            hold (its forward and backward pass; at edge level also every receiver's own
            input and every sender's delta); by default ``REUSE_LENS_MEMORY_BUDGET``,
            else 2 GiB on the CPU and half the free memory of a GPU (docs/scale.md).
            Scores are sums over prompts, so the chunking does not change them.
        experts: at node level, score each expert of a mixture-of-experts MLP (``m3.e5``,
            ``m3.shared``) in place of the whole MLP: its term's change times the
            gradient of its block's output (docs/models.md, "Experts as nodes").
        routing: with ``experts``, ``frozen`` (the default) differentiates every run
            with each prompt's clean routing held fixed; ``recompute`` lets the
            gradient flow through the routers' weights as well.

    Returns:
        NodeScores (heads (layer, head_index), MLPs (layer,)) at node level, EdgeScores at
        edge level; effects are in the noising direction (corrupted into clean).

    Raises:
        ValueError: for an unknown method or level, ``steps < 1``, a bad batch size,
            ``per_position`` with ``level="edge"``, a model in training mode, or EAP with a
            metric measured against the clean run (``kl_div``), whose gradient there is 0.
        NotImplementedError: at edge level through hooks (no functional adapter, or
            ``engine="hooks"``), for grouped key/value heads, norms after attention and
            MLP (Gemma-2, OLMo-2), post-LN blocks, or an attention output that is not a
            scalar multiple of the heads' ``z @ W_O`` (``_hook_edges.edge_refusal``).
        TaskError: if the task was built for another vocabulary.
        MetricError: if the metric is NaN or infinite on some prompt.
    """
    return _attribution_patching(
        model,
        task,
        method=method,
        level=level,
        steps=steps,
        per_position=per_position,
        metric=metric,
        batch_size=batch_size,
        engine=engine,
        memory_budget=memory_budget,
        experts=experts,
        routing=routing,
    )


def _attribution_patching(
    model: TransformerBridge,
    task: Task,
    *,
    method: AttributionMethod,
    level: AttributionLevel,
    steps: int,
    per_position: bool,
    metric: str | Metric | None,
    batch_size: int | None,
    engine: Engine,
    memory_budget: MemoryBudget,
    experts: bool,
    routing: RoutingMode,
    prep: Prepared | None = None,
) -> NodeScores | EdgeScores:
    """``attribution_patching``; ``prep``: a preparation of the same (model, task,
    metric) that discovery's evaluator holds, whose verified functional forward and
    unablated runs the edge engine reads instead of making its own."""
    check_pair(model, task)  # a spec string or a list is named here, not deep inside
    if method not in ("eap", "eap-ig"):
        raise ValueError(f"unknown attribution method {method!r}: choose 'eap' or 'eap-ig'")
    if level not in ("node", "edge"):
        raise ValueError(f"unknown attribution level {level!r}: choose 'node' or 'edge'")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if engine not in ENGINES or (engine == "functional" and level == "node"):
        raise ValueError(
            f"engine must be one of {', '.join(ENGINES)} (and 'functional' only at level "
            f"'edge'; node scores are read through hooks), got {engine!r}"
        )
    if per_position and level == "edge":
        raise ValueError("per_position=True is only available at level='node'")
    check_routing(routing)
    if experts and level == "edge":
        raise ValueError(
            "experts=True scores nodes: expert nodes have no edges. Use level='node', or "
            "experts=False for edges between whole MLPs"
        )
    if experts and per_position:
        raise ValueError(
            "experts=True scores each expert over every position; per_position=True is "
            "only available with experts=False (each MLP one node)"
        )
    if model.training:
        # Dropout would make the clean and corrupted runs differ by noise.
        raise ValueError("the model is in training mode: call model.eval() first")
    task.check_model(model)
    budget = resolve_budget(memory_budget, model.cfg.device)
    metric_fn = task.metric if metric is None else get_metric(metric)
    if method == "eap" and getattr(metric_fn, "needs_clean_logits", False):
        # KL from the clean run is at its minimum on the clean run, so its gradient there,
        # and every EAP score, is exactly zero: refuse rather than return zeros.
        raise ValueError(
            f"EAP takes one gradient on the clean run, where metric {metric_fn.name!r} (a "
            "divergence from the clean run) has zero gradient, so every score would be 0. "
            "Use method='eap-ig' or a metric such as 'logit_diff'."
        )
    n_steps = 1 if method == "eap" else steps
    result = _attribute(
        model,
        task,
        metric_fn,
        n_steps=n_steps,
        edges=level == "edge",
        batch_size=batch_size,
        budget=budget,
        engine=engine,
        routing=routing if experts else None,
        prep=prep,
    )
    settings: dict[str, Any] = {
        "method": method,
        "level": level,
        "steps": n_steps,
        "metric": getattr(metric_fn, "name", repr(metric_fn)),
        "direction": "noising",
        "n_prompts": len(task),
        "engine": result.engine,
    }
    if experts:
        settings.update(experts=True, routing=routing)
    if level == "edge":
        assert result.edge_matrix is not None  # _attribute filled it when asked
        graph = edges_of(result.shape)
        index = GraphIndex(result.shape)
        senders = torch.tensor([index.sender[e.sender.name] for e in graph])
        receivers = torch.tensor([index.receiver[e.receiver_name] for e in graph])
        return EdgeScores(
            edges=tuple(graph),
            scores=result.edge_matrix[senders, receivers],
            shape=result.shape,
            clean=result.clean,
            corrupted=result.corrupted,
            method=method,
            settings=settings,
        )
    mlps = None if result.mlps_by_pos is None else result.mlps_by_pos.sum(0)
    expert_scores = None
    if result.experts_by_pos is not None:
        split = torch.tensor([result.shape.split(layer) for layer in range(result.shape.n_layers)])
        assert mlps is not None
        mlps = torch.where(split, float("nan"), mlps)  # those MLPs are their experts here
        expert_scores = _expert_table(result.shape, result.experts_by_pos.sum(0))
    return NodeScores(
        heads=result.heads_by_pos.sum(0),
        mlps=mlps,
        clean=result.clean,
        corrupted=result.corrupted,
        method=method,
        heads_by_pos=result.heads_by_pos if per_position else None,
        mlps_by_pos=result.mlps_by_pos if per_position and expert_scores is None else None,
        settings=settings,
        experts=expert_scores,
        expert_shape=result.shape if expert_scores is not None else None,
    )


def _expert_table(
    shape: ModelShape, scores: Float[Tensor, "layer column"]
) -> Float[Tensor, "layer column"]:
    """``scores`` with NaN in the columns a layer has no expert for."""
    table = torch.full_like(scores, float("nan"))
    for layer in range(shape.n_layers):
        for expert in shape.experts_of(layer):
            column = shape.column(expert)
            table[layer, column] = scores[layer, column]
    return table


# ---- the computation ----------------------------------------------------------------------


@dataclass
class _Result:
    shape: ModelShape
    heads_by_pos: Float[Tensor, "pos layer head_index"]
    mlps_by_pos: Float[Tensor, "pos layer"] | None
    clean: float
    corrupted: float
    edge_matrix: Float[Tensor, "sender receiver"] | None = None
    engine: str = "hooks"
    experts_by_pos: Float[Tensor, "pos layer column"] | None = None


@dataclass
class _Capture:
    """Activations (forward hooks) and gradients (backward hooks) of one pass, by hook name."""

    acts: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)

    def fwd(self, name: str) -> tuple[str, Callable[..., None]]:
        # The name is captured here: inside a hook, hook.name is the bridge's internal
        # name, not the alias we registered (DESIGN.md).
        def hook(tensor: Tensor, *, hook: Any) -> None:
            del hook
            self.acts[name] = tensor.detach()

        return name, hook

    def bwd(self, name: str) -> tuple[str, Callable[..., None]]:
        def hook(grad: Tensor, *, hook: Any) -> None:
            del hook
            self.grads[name] = grad.detach()

        return name, hook


def _hook_names(shape: ModelShape, mlp_norm: str = "ln2") -> dict[str, list[str]]:
    layers = range(shape.n_layers)
    mlps = list(layers) if shape.has_mlps else []
    return {
        "z": [f"blocks.{layer}.attn.hook_z" for layer in layers],
        "mlp_out": [f"blocks.{layer}.hook_mlp_out" for layer in mlps],
        "q": [f"blocks.{layer}.attn.hook_q" for layer in layers],
        "k": [f"blocks.{layer}.attn.hook_k" for layer in layers],
        "v": [f"blocks.{layer}.attn.hook_v" for layer in layers],
        "ln1_in": [f"blocks.{layer}.ln1.hook_in" for layer in layers],
        "mlp_norm_in": [f"blocks.{layer}.{mlp_norm}.hook_in" for layer in mlps],
        "mlp_in": [f"blocks.{layer}.mlp.hook_in" for layer in mlps],
        "final": [f"blocks.{shape.n_layers - 1}.hook_resid_post"],
    }


_INPUT_HOOK = EDGE_INPUT_HOOK
"""Token plus position embedding: the ``input`` node and where EAP-IG interpolates."""


def _attribute(
    model: TransformerBridge,
    task: Task,
    metric_fn: Metric,
    *,
    n_steps: int,
    edges: bool,
    batch_size: int | None,
    budget: int,
    engine: Engine = "auto",
    routing: RoutingMode | None = None,
    prep: Prepared | None = None,
) -> _Result:
    shape = shape_of(model, experts=routing is not None)
    experts = None if routing is None else ExpertRuns(model, routing)
    shapes = Shapes.of(model, int(task.clean.shape[1]))
    if edges and engine != "hooks":
        verified = None if prep is None else prep.weights
        functional = functional_weights(model, task, metric_fn, engine, verified)
        if functional is not None:
            runs = None if prep is None or verified is None else prep.held_runs()
            held = 0 if runs is None else runs[0].nbytes + runs[1].nbytes
            batch_size, layers_per_pass = edge_attribution_plan(
                budget,
                shapes,
                post_norm=any(layer.attn_post is not None for layer in functional.layers),
                qk_norm=functional.spec.qk_norm == "proj",
                batch_size=batch_size,
                held=functional.own_bytes + held,
            )
            out = attribute_edges(
                functional,
                task,
                metric_fn,
                shape,
                n_steps=n_steps,
                batch_size=batch_size,
                layers_per_pass=layers_per_pass,
                runs=runs,
            )
            width = int(task.clean.shape[1])
            return _Result(
                shape=shape,
                heads_by_pos=torch.zeros(width, shape.n_layers, shape.n_heads),
                mlps_by_pos=torch.zeros(width, shape.n_layers) if shape.has_mlps else None,
                clean=out.clean,
                corrupted=out.corrupted,
                edge_matrix=out.matrix,
                engine="functional",
            )
    if edges:
        _check_edge_support(model)
    if batch_size is None:
        # Edges through hooks hold what the functional engine holds, and the norm's
        # Jacobian products of every head's q, k and v gradient on top.
        per_prompt = shapes.edge_backward_prompt() if edges else shapes.backward_prompt()
        if experts is not None:  # the chunk's clean and corrupted terms, and a step's
            per_prompt += 3 * shapes.expert_terms(shape.n_experts)
        batch_size = chunk_items(budget, per_prompt, what="prompt of attribution patching")
    device = torch.device(model.cfg.device or "cpu")
    n = len(task)
    width = int(task.clean.shape[1])
    heads = torch.zeros(width, shape.n_layers, shape.n_heads)
    mlps = torch.zeros(width, shape.n_layers) if shape.has_mlps else None
    by_expert = torch.zeros(width, shape.n_layers, shape.n_columns) if experts else None
    index = GraphIndex(shape) if edges else None
    matrix = torch.zeros(index.n_senders, index.n_receivers) if index is not None else None
    clean_total = corrupted_total = 0.0
    starts = list(range(0, n, batch_size))
    weights = _Weights.of(model, edges)
    with progress_bar(
        total=len(starts) * (n_steps + 1),
        desc=f"attribution ({'edges' if edges else 'nodes'})",
        show_from=8,
    ) as bar:
        for start in starts:
            chunk = task.select(list(range(start, min(start + batch_size, n)))).to(device)
            out = _attribute_chunk(
                model,
                chunk,
                metric_fn,
                shape,
                weights,
                index,
                n_steps=n_steps,
                bar=bar,
                experts=experts,
            )
            w = int(chunk.clean.shape[1])
            if by_expert is not None and out.experts_by_pos is not None:
                by_expert[:w] += out.experts_by_pos.cpu()
            heads[:w] += out.heads_by_pos.cpu()
            if mlps is not None and out.mlps_by_pos is not None:
                mlps[:w] += out.mlps_by_pos.cpu()
            if matrix is not None and out.edge_matrix is not None:
                matrix += out.edge_matrix.cpu()
            clean_total += out.clean
            corrupted_total += out.corrupted
    # Every score is a sum over prompts; the task's score is the mean (metrics.py).
    return _Result(
        shape=shape,
        heads_by_pos=heads / n,
        mlps_by_pos=None if mlps is None else mlps / n,
        clean=clean_total / n,
        corrupted=corrupted_total / n,
        edge_matrix=None if matrix is None else matrix / n,
        experts_by_pos=None if by_expert is None else by_expert / n,
    )


@dataclass(frozen=True)
class _Weights:
    """The weights that map a head's z to its output and its q/k/v gradient to d_model."""

    W_O: Float[Tensor, "layer head_index d_head d_model"]
    W_Q: Float[Tensor, "layer head_index d_model d_head"] | None
    W_K: Float[Tensor, "layer head_index d_model d_head"] | None
    W_V: Float[Tensor, "layer head_index d_model d_head"] | None

    @classmethod
    def of(cls, model: TransformerBridge, edges: bool) -> _Weights:
        """The weights; for edges, ``W_O`` times the scalar the block applies after it
        (``head_output_scale``: Granite's ``residual_multiplier``), so that a head's
        delta is what it adds to the residual stream. Node scores read ``hook_z``, which
        needs no ``W_O``."""
        with torch.no_grad():
            w_o = model.W_O.detach().float()
            if not edges:
                return cls(w_o, None, None, None)
            scale = head_output_scale(model)
            assert scale is not None  # _check_edge_support refused the model otherwise
            w_o = w_o * scale
            return cls(
                w_o,
                model.W_Q.detach().float(),
                model.W_K.detach().float(),
                model.W_V.detach().float(),
            )


def _check_edge_support(model: TransformerBridge) -> None:
    reason = edge_refusal(model)
    if reason is not None:
        raise NotImplementedError(
            f"edge-level attribution: {reason}. Use level='node' (and, for head inputs under "
            "grouped-query attention, path_patching with head receivers, which is exact there)."
        )


@dataclass
class _ChunkOut:
    heads_by_pos: Float[Tensor, "pos layer head_index"]
    mlps_by_pos: Float[Tensor, "pos layer"] | None
    clean: float
    corrupted: float
    edge_matrix: Float[Tensor, "sender receiver"] | None
    experts_by_pos: Float[Tensor, "pos layer column"] | None = None


_UNEMBED_IN = "unembed.hook_in"


class _AnswerLogits:
    """Runs the model and returns the logits at each prompt's own answer position.

    Where the model has ``unembed.hook_in``, a forward hook there keeps only the answer
    positions, so the unembedding (about a quarter of a GPT-2-small forward pass,
    DESIGN.md) runs on one position per prompt, not on all of them. (Not at
    ``ln_final.hook_in``: HF GPT-2 reshapes ln_f's output to the full sequence.) Each
    prompt is read at its own answer position, never at padding.
    """

    def __init__(self, model: TransformerBridge, answer_pos: Int[Tensor, " batch"]) -> None:
        self.answer_pos = answer_pos
        self.gather = _UNEMBED_IN in model.hook_dict

    def hooks(self) -> list[tuple[str, Callable[..., Tensor]]]:
        if not self.gather:
            return []

        def gather(x: Tensor, *, hook: Any) -> Tensor:
            del hook
            rows = torch.arange(x.shape[0], device=x.device)
            return x[rows, self.answer_pos][:, None]

        return [(_UNEMBED_IN, gather)]

    def read(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, "batch d_vocab"]:
        if self.gather:
            return logits[:, 0].float()
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, self.answer_pos].float()


def _attribute_chunk(
    model: TransformerBridge,
    task: Task,
    metric_fn: Metric,
    shape: ModelShape,
    weights: _Weights,
    index: GraphIndex | None,
    *,
    n_steps: int,
    bar: Any,
    experts: ExpertRuns | None = None,
) -> _ChunkOut:
    names = _hook_names(shape, mlp_norm(model))
    edges = index is not None
    node_acts = [_INPUT_HOOK, *names["z"], *names["mlp_out"]]
    base = task.metric_inputs()

    # The corrupted run: its activations are the patch values, its metric the baseline.
    answer = _AnswerLogits(model, task.answer_pos)
    corrupted = _Capture()
    fwd_corrupted = [corrupted.fwd(h) for h in node_acts] + answer.hooks()
    corrupted_terms: dict[int, tuple[Any, Tensor]] = {}
    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=fwd_corrupted),
        _experts_plan(experts, Plan(record=corrupted_terms)),
    ):
        corrupted_logits = answer.read(model(task.corrupted))
    bar.update(1)
    # Expert terms: the clean ones, and the clean routing each run of a chunk keeps.
    clean_terms = {} if experts is None else experts.set_clean(task.clean)
    expert_grads: dict[int, Tensor] = {}
    every = torch.arange(len(task), device=task.clean.device)

    grad_names = names["z"] + names["mlp_out"]
    step_acts: list[str] = []
    if edges:
        grad_names += names["q"] + names["k"] + names["v"] + names["mlp_in"] + names["final"]
        step_acts = list(dict.fromkeys(names["ln1_in"] + names["mlp_norm_in"]))
        if whole_projection_qk_norm(model):
            # q and k in front of the norm, and their gradients after it (_qk_norm_hooks).
            grad_names += [normed_hook(layer, c) for layer in range(shape.n_layers) for c in "qk"]
            step_acts += names["q"] + names["k"]
    corrupted_input = corrupted.acts[_INPUT_HOOK]

    grad_sums: dict[str, Tensor] = {}
    clean_acts: dict[str, Tensor] = {}
    clean_logits: Tensor | None = None
    matrix = (
        torch.zeros(index.n_senders, index.n_receivers, device=task.clean.device)
        if index is not None
        else None
    )
    deltas: Tensor | None = None
    clean_metric = 0.0
    for step in range(n_steps):
        alpha = step / n_steps
        run = _Capture()
        embed_hook = _InputPoint(corrupted_input, alpha)
        fwd = [(_INPUT_HOOK, embed_hook)]
        fwd += [run.fwd(h) for h in (node_acts if step == 0 else [])]
        fwd += [run.fwd(h) for h in step_acts]
        fwd += answer.hooks()
        step_grads: dict[int, Tensor] = {}
        plan = Plan(prompt=every, grads=step_grads)
        with (
            torch.enable_grad(),
            model.hooks(fwd_hooks=fwd, bwd_hooks=[run.bwd(h) for h in grad_names]),
            _experts_plan(experts, plan),
        ):
            logits = answer.read(model(task.clean))
            if step == 0:
                clean_logits = logits.detach()
            inputs = MetricInputs(base.answers, base.wrong, clean_logits)
            values = check_finite(metric_fn(logits, inputs), metric_fn, logits)
            if step == 0:
                clean_metric = float(values.detach().sum())
            if not values.requires_grad:
                raise MetricError(
                    f"metric {getattr(metric_fn, 'name', metric_fn)!r} has no gradient (e.g. "
                    "accuracy, an argmax): attribution patching needs a differentiable "
                    "metric such as logit_diff or prob_diff"
                )
            torch.autograd.grad(values.sum(), [embed_hook.leaf])
        bar.update(1)
        if step == 0:
            clean_acts = {k: v for k, v in run.acts.items() if k in node_acts}
            if index is not None:
                deltas = _sender_deltas(shape, weights, clean_acts, corrupted.acts)
        for name in names["z"] + names["mlp_out"]:
            g = run.grads[name].float()
            grad_sums[name] = g if name not in grad_sums else grad_sums[name] + g
        for layer, g in step_grads.items():
            g = g.float()
            expert_grads[layer] = g if layer not in expert_grads else expert_grads[layer] + g
        if index is not None and matrix is not None:
            assert deltas is not None
            _accumulate_edges(model, shape, weights, index, run, deltas, matrix)
        del run, embed_hook

    assert clean_logits is not None
    inputs = MetricInputs(base.answers, base.wrong, clean_logits)
    corrupted_values = check_finite(
        metric_fn(corrupted_logits, inputs), metric_fn, corrupted_logits
    )

    # Node scores: Δa · mean gradient, summed over the feature axis. A head's output is
    # z @ W_O, linear in z, so Δz · ∂m/∂z equals Δ(head output) · ∂m/∂(head output).
    width = int(task.clean.shape[1])
    heads = torch.zeros(width, shape.n_layers, shape.n_heads, device=task.clean.device)
    for layer, name in enumerate(names["z"]):
        delta = corrupted.acts[name].float() - clean_acts[name].float()
        heads[:, layer] = (delta * grad_sums[name]).sum(dim=(0, -1)) / n_steps
    mlps = None
    if shape.has_mlps:
        mlps = torch.zeros(width, shape.n_layers, device=task.clean.device)
        for layer, name in enumerate(names["mlp_out"]):
            delta = corrupted.acts[name].float() - clean_acts[name].float()
            mlps[:, layer] = (delta * grad_sums[name]).sum(dim=(0, -1)) / n_steps
    by_expert = None
    if experts is not None:
        by_expert = torch.zeros(width, shape.n_layers, shape.n_columns, device=task.clean.device)
        for layer, (_, corrupted_layer) in corrupted_terms.items():
            # Every term of a block has its output's gradient: the output is their sum.
            delta = corrupted_layer.float() - clean_terms[layer].float()
            products = delta * expert_grads[layer].unsqueeze(2)
            columns = [shape.column(e) for e in shape.experts_of(layer)]
            by_expert[:, layer, columns] = products.sum(dim=(0, -1)) / n_steps
    return _ChunkOut(
        heads_by_pos=heads,
        mlps_by_pos=mlps,
        clean=clean_metric,
        corrupted=float(corrupted_values.sum()),
        edge_matrix=None if matrix is None else matrix / n_steps,
        experts_by_pos=by_expert,
    )


def _experts_plan(experts: ExpertRuns | None, plan: Plan) -> AbstractContextManager[None]:
    """``plan`` applied to the mixtures in the runs inside, when experts are nodes."""
    return nullcontext() if experts is None else experts.active(plan)


class _InputPoint:
    """A forward hook that makes the embeddings a leaf, moved a fraction ``alpha`` of the
    way from the clean embeddings (α = 0) to the corrupted ones (EAP-IG).

    Backpropagating to the leaf fires every backward hook downstream of it, without
    writing into any parameter's ``.grad``.
    """

    def __init__(self, corrupted: Tensor, alpha: float) -> None:
        self.corrupted = corrupted
        self.alpha = alpha
        self.leaf = corrupted

    def __call__(self, tensor: Tensor, *, hook: Any) -> Tensor:
        del hook
        x = tensor.detach()
        if self.alpha > 0:
            # Positions and padding are shared, so only changed tokens' embeddings move.
            x = x + self.alpha * (self.corrupted - x)
        self.leaf = x.clone().requires_grad_(True)
        return self.leaf


def _sender_deltas(
    shape: ModelShape,
    weights: _Weights,
    clean: dict[str, Tensor],
    corrupted: dict[str, Tensor],
) -> Float[Tensor, "batch pos sender d_model"]:
    """Corrupted − clean output of every sender, in ``GraphIndex`` order."""
    parts = [(corrupted[_INPUT_HOOK].float() - clean[_INPUT_HOOK].float()).unsqueeze(2)]
    for layer in range(shape.n_layers):
        z = f"blocks.{layer}.attn.hook_z"
        dz = corrupted[z].float() - clean[z].float()
        parts.append(torch.einsum("bphe,hed->bphd", dz, weights.W_O[layer].to(dz.device)))
        if shape.has_mlps:
            m = f"blocks.{layer}.hook_mlp_out"
            parts.append((corrupted[m].float() - clean[m].float()).unsqueeze(2))
    return torch.cat(parts, dim=2)


def _norm_vjp(
    norm: torch.nn.Module,
    x: Float[Tensor, "batch pos d_model"],
    grads: Float[Tensor, "batch pos k d_model"],
) -> Float[Tensor, "batch pos k d_model"]:
    """Pull ``k`` gradients at a LayerNorm's output back to its input, at the point ``x``.

    This runs the block's own norm module (LayerNorm, RMSNorm or identity) on ``x``
    repeated ``k`` times, so the Jacobian is exactly the model's.
    """
    k = grads.shape[2]
    with torch.enable_grad():
        xs = x.unsqueeze(2).expand(-1, -1, k, -1).clone().requires_grad_(True)
        out = norm(xs)
        (g,) = torch.autograd.grad(out, xs, grad_outputs=grads.to(out.dtype))
    return g.float()


def _accumulate_edges(
    model: TransformerBridge,
    shape: ModelShape,
    weights: _Weights,
    index: GraphIndex,
    run: _Capture,
    deltas: Float[Tensor, "batch pos sender d_model"],
    matrix: Float[Tensor, "sender receiver"],
) -> None:
    """Add Δsender · ∂m/∂(receiver input) for every edge of one gradient pass."""
    assert weights.W_Q is not None and weights.W_K is not None and weights.W_V is not None
    device = deltas.device
    whole_norm = whole_projection_qk_norm(model)
    for layer in range(shape.n_layers):
        block = model.blocks[layer]
        parts = []
        for kind, w in (("q", weights.W_Q), ("k", weights.W_K), ("v", weights.W_V)):
            if whole_norm and kind != "v":
                # Head i's statistic from its own input (docs/models.md).
                projected = run.acts[f"blocks.{layer}.attn.hook_{kind}"].flatten(-2)
                grad = run.grads[normed_hook(layer, kind)]
                parts.append(
                    own_input_grads(model, layer, kind, projected, grad, shape.n_heads).to(device)
                )
                continue
            g = run.grads[f"blocks.{layer}.attn.hook_{kind}"].float()
            parts.append(torch.einsum("bphe,hde->bphd", g, w[layer].to(device)))
        # ∂m/∂(LN output) through each head's q, k and v alone, then back through the LN.
        at_ln = torch.cat(parts, dim=2)
        x = run.acts[f"blocks.{layer}.ln1.hook_in"]
        g_in = _norm_vjp(block.ln1, x, at_ln)
        n = index.senders_before_heads(layer)
        cols = index.heads_columns(layer)
        matrix[:n, cols] += torch.einsum("bpsd,bprd->sr", deltas[:, :, :n], g_in)
        if shape.has_mlps:
            # ∂m/∂(MLP input) through the MLP alone, back through the norm in front of it
            # (in a parallel block with one shared norm, the heads' path is not included).
            norm = mlp_norm(model)
            g_out = run.grads[f"blocks.{layer}.mlp.hook_in"].float().unsqueeze(2)
            x2 = run.acts[f"blocks.{layer}.{norm}.hook_in"]
            g_mlp = _norm_vjp(getattr(block, norm), x2, g_out)
            n_mlp = index.senders_before_mlp(layer)
            col = index.receiver[MLP(layer).name]
            matrix[:n_mlp, col] += torch.einsum("bpsd,bpd->s", deltas[:, :, :n_mlp], g_mlp[:, :, 0])
    final = run.grads[f"blocks.{shape.n_layers - 1}.hook_resid_post"].float()
    matrix[:, index.receiver[LOGITS.name]] += torch.einsum("bpsd,bpd->s", deltas, final)
