"""Edge attribution on the functional forward: each receiver's input gradient, exactly.

Through hooks, a receiver's gradient is read at a shared hook point and mapped back by
hand (``W_Q`` and the norm's Jacobian), which needs one k and v per query head. Here
every receiver reads its own input, the residual stream plus a zero *probe*
(``_edge_forward.run_edges``), so ``∂m/∂probe_r`` is the partial derivative through
receiver ``r`` alone, whatever sits between the residual stream and the head: any norm,
q/k norms per head, rotary, or grouped key/value heads (stored per query head, so each
query head's k and v input is its own, as TransformerLens's
``ungroup_grouped_query_attention``). The edge score is then, as in ``attribution.py``,

    score(s → r) = Σ over prompts and positions of Δout_s · mean over steps of ∂m/∂in_r,

with Δout_s the corrupted − clean output of sender ``s`` and the steps EAP-IG's points
between the clean (α = 0) and corrupted embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from reuse_lens._progress import progress_bar
from reuse_lens.nodes import LOGITS, MLP, ModelShape
from reuse_lens.patching._common import Engine, prepare
from reuse_lens.patching._edge_forward import Receivers, run_edges
from reuse_lens.patching._forward import RunCache, Weights
from reuse_lens.patching.graph import GraphIndex
from reuse_lens.tasks.metrics import Metric, MetricError, MetricInputs, check_finite

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.tasks.task import Task

__all__ = ["FunctionalEdges", "attribute_edges", "edge_chunk", "functional_weights"]


@dataclass
class FunctionalEdges:
    """One chunk's edge matrix (summed over its prompts) and its metric sums."""

    matrix: Float[Tensor, "sender receiver"]
    clean: float
    corrupted: float


class _Probes(Receivers):
    """Receivers that read the residual stream plus a zero probe that gradients flow into.

    Only the receivers of ``layers`` (and the logits, when the last layer is among them)
    get a probe; the others read the stream itself, as in the plain forward pass. One
    pass then holds a copy of the stream per receiver for those layers alone, which is
    how a prompt too large for the memory budget is split over its receivers.
    """

    def __init__(self, w: Weights, like: Tensor, layers: range) -> None:
        b, p, d = like.shape
        zeros = {"device": like.device, "dtype": like.dtype, "requires_grad": True}
        self.heads_in = {layer: torch.zeros(b, p, 3 * w.n_heads, d, **zeros) for layer in layers}
        self.mlp_in = {layer: torch.zeros(b, p, d, **zeros) for layer in layers if w.has_mlps}
        last = w.n_layers - 1 in layers
        self.final_in = torch.zeros(b, p, d, **zeros) if last else None
        self.raw: dict[int, Tensor] = {}

    def head_outputs(self, layer: int, out: Tensor, raw: Tensor) -> None:
        self.raw[layer] = raw.detach()

    def leaves(self) -> list[Tensor]:
        final = [] if self.final_in is None else [self.final_in]
        return [*self.heads_in.values(), *self.mlp_in.values(), *final]

    def split(
        self, grads: Sequence[Tensor]
    ) -> tuple[dict[int, Tensor], dict[int, Tensor], Tensor | None]:
        """``grads`` (in ``leaves`` order) as the heads', the MLPs' and the logits' probes'."""
        n_heads, n_mlps = len(self.heads_in), len(self.mlp_in)
        heads = dict(zip(self.heads_in, grads[:n_heads], strict=True))
        mlps = dict(zip(self.mlp_in, grads[n_heads : n_heads + n_mlps], strict=True))
        final = grads[-1] if self.final_in is not None else None
        return heads, mlps, final

    def heads(self, layer: int, resid: Tensor, n_heads: int) -> Tensor | None:
        probe = self.heads_in.get(layer)
        return None if probe is None else resid.unsqueeze(2) + probe

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        probe = self.mlp_in.get(layer)
        return resid if probe is None else resid + probe

    def final(self, resid: Tensor) -> Tensor:
        return resid if self.final_in is None else resid + self.final_in


def _jvp(f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor) -> Tensor:
    """``J_f(x) v`` by two reverse passes: ``J^T u`` is linear in ``u``, and its gradient
    against ``u`` along ``v`` is ``J v``. (torch's forward mode would do it in one, but
    loads TorchScript decompositions, which warn as deprecated.)"""
    with torch.enable_grad():
        point = x.detach().requires_grad_(True)
        out = f(point)
        u = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, point, u, create_graph=True)
        (jv,) = torch.autograd.grad(vjp, u, v)
    return jv.detach()


def _through_post_norms(
    w: Weights, index: GraphIndex, deltas: Tensor, raw: dict[int, Tensor]
) -> Tensor:
    """Deltas with each post-normed head's change passed through the norm's Jacobian at
    this step's sum of the heads (Gemma-2): the first-order change of what the residual
    stream receives, so a node's edges add up to its node score at every step."""
    posts = [layer for layer in range(w.n_layers) if w.layers[layer].attn_post is not None]
    if not posts:
        return deltas
    deltas = deltas.clone()
    for layer in posts:
        post = w.layers[layer].attn_post
        assert post is not None
        heads = slice(index.sender[f"a{layer}.h0"], index.sender[f"a{layer}.h0"] + w.n_heads)
        change = deltas[:, :, heads]
        point = raw[layer].float().unsqueeze(2).expand_as(change)
        deltas[:, :, heads] = _jvp(post, point, change)
    return deltas


def _sender_deltas(
    w: Weights, clean: RunCache, corrupted: RunCache
) -> Float[Tensor, "batch pos sender d_model"]:
    """Corrupted − clean output of every sender, in ``GraphIndex`` order, in float32."""
    parts = [(corrupted.resid_pre[0] - clean.resid_pre[0]).float().unsqueeze(2)]
    for layer in range(w.n_layers):
        weights = w.layers[layer]
        w_o = weights.w_o.view(w.n_heads, w.d_head, -1).float()
        dz = corrupted.z[layer].float() - clean.z[layer].float()
        parts.append(torch.einsum("bphe,hed->bphd", dz, w_o))
        if w.has_mlps:
            delta = corrupted.mlp_out[layer].float() - clean.mlp_out[layer].float()
            parts.append(delta.unsqueeze(2))
    return torch.cat(parts, dim=2)


def edge_chunk(
    w: Weights,
    index: GraphIndex,
    clean: Int[Tensor, "batch pos"],
    corrupted: Int[Tensor, "batch pos"],
    answer_pos: Int[Tensor, " batch"],
    metric: Metric,
    inputs: MetricInputs,
    *,
    n_steps: int,
    layers_per_pass: int | None = None,
    runs: tuple[RunCache, RunCache] | None = None,
) -> FunctionalEdges:
    """Edge scores of one chunk of prompts, summed over them (``attribution.py`` divides).

    ``inputs`` carry the answers; their ``clean_logits`` are filled in here from the
    functional clean run. ``layers_per_pass`` splits the receivers: each gradient pass
    probes the receivers of that many layers (all of them by default), and the layers
    before its first run without autograd. ``runs``: the chunk's clean and corrupted
    runs, where a caller holds them already (discovery's evaluator).
    """
    rows = torch.arange(clean.shape[0], device=clean.device)
    with torch.no_grad():
        clean_run, corrupted_run = runs if runs is not None else (w.run(clean), w.run(corrupted))
        clean_logits = w.logits(clean_run.final[rows, answer_pos]).float()
        corrupted_logits = w.logits(corrupted_run.final[rows, answer_pos]).float()
        deltas = _sender_deltas(w, clean_run, corrupted_run)
    inputs = MetricInputs(inputs.answers, inputs.wrong, clean_logits)
    start, end = clean_run.resid_pre[0], corrupted_run.resid_pre[0]
    del clean_run, corrupted_run  # the embeddings and the deltas are all the steps read
    matrix = torch.zeros(index.n_senders, index.n_receivers, device=clean.device)
    step_layers = layers_per_pass or w.n_layers
    groups = [range(i, min(i + step_layers, w.n_layers)) for i in range(0, w.n_layers, step_layers)]
    post_norms = any(layer.attn_post is not None for layer in w.layers)
    # Sender-major once per chunk, or, under post-norms, once per step (their Jacobians
    # are taken at the step's point), whatever the number of receiver groups.
    plain = None if post_norms else _sender_major(deltas)
    normed = deltas if post_norms else None  # without post-norms, one copy is held
    del deltas
    for step in range(n_steps):
        alpha = step / n_steps
        flat = plain
        for layers in groups:
            probes = _Probes(w, start, layers)
            with torch.enable_grad():
                embedded = start + alpha * (end - start)
                logits = run_edges(w, embedded, answer_pos, probes).float()
                values = check_finite(metric(logits, inputs), metric, logits)
                if not values.requires_grad:
                    raise MetricError(
                        f"metric {getattr(metric, 'name', metric)!r} has no gradient: "
                        "attribution patching needs a differentiable metric such as logit_diff"
                    )
                grads = probes.split(torch.autograd.grad(values.sum(), probes.leaves()))
            if flat is None:  # every pass of a step records the same heads' sums
                assert normed is not None
                flat = _sender_major(_through_post_norms(w, index, normed, probes.raw))
            _accumulate(index, flat, grads, matrix)
    clean_values = check_finite(metric(clean_logits, inputs), metric, clean_logits)
    corrupted_values = check_finite(metric(corrupted_logits, inputs), metric, corrupted_logits)
    return FunctionalEdges(
        matrix=matrix / n_steps,
        clean=float(clean_values.sum()),
        corrupted=float(corrupted_values.sum()),
    )


def _sender_major(
    deltas: Float[Tensor, "batch pos sender d_model"],
) -> Float[Tensor, "sender flat"]:
    """The deltas as ``(sender, batch*pos*d_model)``, so that each receiver block of
    ``_accumulate`` is one matmul on a prefix of its rows: an einsum per block would copy
    the deltas into that layout again for every layer."""
    return deltas.permute(2, 0, 1, 3).reshape(deltas.shape[2], -1)


def _accumulate(
    index: GraphIndex,
    flat: Float[Tensor, "sender flat"],
    grads: tuple[dict[int, Tensor], dict[int, Tensor], Tensor | None],
    matrix: Float[Tensor, "sender receiver"],
) -> None:
    """Add Δsender · ∂m/∂(receiver input) for every edge into the receivers of one pass.

    ``flat`` are the senders' deltas, sender-major (``_sender_major``); ``grads`` are the
    probes' gradients: per layer the heads' and the MLP's, and the logits'
    (``_Probes.split``).
    """
    heads, mlps, final = grads
    for layer, grad in heads.items():
        n = index.senders_before_heads(layer)
        g = grad.float()  # (batch, pos, receiver, d_model)
        matrix[:n, index.heads_columns(layer)] += flat[:n] @ g.permute(0, 1, 3, 2).reshape(
            -1, g.shape[2]
        )
    for layer, grad in mlps.items():
        n_mlp = index.senders_before_mlp(layer)
        matrix[:n_mlp, index.receiver[MLP(layer).name]] += flat[:n_mlp] @ grad.float().reshape(-1)
    if final is not None:
        matrix[:, index.receiver[LOGITS.name]] += flat @ final.float().reshape(-1)


def functional_weights(
    model: TransformerBridge,
    task: Task,
    metric_fn: Metric,
    engine: Engine,
    verified: Weights | None = None,
) -> Weights | None:
    """The verified functional forward of ``model``, or None where it does not reproduce
    the model (the hooks are tried then). ``verified``: weights a caller has verified
    on the same model already (discovery's evaluator), used as they are.

    Raises:
        NotImplementedError: where the model's edges are undefined (its heads' inputs are
            not separable); hooks cannot do better there.
    """
    w = verified
    if w is None:
        w = prepare(model, task.select([0]), metric_fn, engine=engine).weights
    why = None if w is None else w.spec.edge_unsupported()
    if why is not None:
        raise NotImplementedError(
            f"edge-level attribution needs each head's own inputs, but {why}. Use level='node'."
        )
    return w


def attribute_edges(
    w: Weights,
    task: Task,
    metric_fn: Metric,
    shape: ModelShape,
    *,
    n_steps: int,
    batch_size: int,
    layers_per_pass: int | None = None,
    runs: tuple[RunCache, RunCache] | None = None,
) -> FunctionalEdges:
    """Every edge's score on ``task``, the mean over its prompts, chunk by chunk.

    ``batch_size`` prompts a chunk; ``layers_per_pass`` receivers' layers a gradient pass
    (``edge_chunk``); ``runs``: the clean and corrupted runs of every prompt, where the
    caller holds them (each chunk reads its rows instead of running the model again).
    """
    index = GraphIndex(shape)
    device = w.w_u.device
    n = len(task)
    matrix = torch.zeros(index.n_senders, index.n_receivers)
    clean_total = corrupted_total = 0.0
    starts = list(range(0, n, batch_size))
    for start in progress_bar(starts, desc="attribution (edges)", show_from=8):
        span = slice(start, min(start + batch_size, n))
        chunk = task.select(list(range(span.start, span.stop))).to(device)
        base = chunk.metric_inputs()
        out = edge_chunk(
            w,
            index,
            chunk.clean,
            chunk.corrupted,
            chunk.answer_pos,
            metric_fn,
            MetricInputs(base.answers.to(device), base.wrong.to(device), base.clean_logits),
            n_steps=n_steps,
            layers_per_pass=layers_per_pass,
            runs=None if runs is None else (runs[0].rows(span), runs[1].rows(span)),
        )
        matrix += out.matrix.cpu()
        clean_total += out.clean
        corrupted_total += out.corrupted
    return FunctionalEdges(matrix / n, clean_total / n, corrupted_total / n)
