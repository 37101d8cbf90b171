"""The functional forward of many ablated circuits at once, sharing what they share.

Node circuits: circuit ``c`` keeps some heads and MLPs and ablates the others. The
residual stream entering block ``l`` depends only on which nodes of the layers before
``l`` it keeps, so circuits that agree there have the same stream and the block before it
need only run once for all of them. ``node_forward`` runs every block once per *class*
of circuits that agree on layers ``0..l`` (a prefix tree over layers): many circuits of
one ranking, such as the prefixes that the automatic size rule or a faithfulness curve
evaluates, share most of their early blocks. Each class's block is the same computation
as the circuit's own, so the values do not depend on how circuits are grouped beyond the
float rounding of a batched matmul. In the last block only the answer position is
computed: nothing else reaches the logits.

Edge circuits: ``DroppedEdges`` is the edge graph's ``Receivers`` for a stack of circuits,
each with its own (sender, receiver) drop matrix: every receiver input reads the current
stream plus, for every sender whose edge it drops, that sender's (ablated − current)
output (Hanna et al. 2024; MIB). ``_sparse_edges`` computes the same values from the
other end, sharing senders between circuits; the tests check the two against each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from reuse_lens.nodes import LOGITS, MLP
from reuse_lens.patching._edge_forward import Receivers
from reuse_lens.patching._forward import Norm, Weights, _affine, _norm
from reuse_lens.patching.graph import GraphIndex

__all__ = [
    "DroppedEdges",
    "Sources",
    "node_forward",
    "sparse_nodes_supported",
]


@dataclass
class Sources:
    """The ablated output of every sender, batch-first (a batch of one is shared).

    ``input`` is what replaces the ``input`` sender (edge circuits only); ``z`` per layer
    ``(src, pos, head, d_head)``; ``mlp_out`` per layer ``(src, pos, d_model)``.
    """

    input: Float[Tensor, "src pos d_model"]
    z: list[Tensor]
    mlp_out: list[Tensor]

    @property
    def shared(self) -> bool:
        return self.input.shape[0] == 1


def node_forward(
    w: Weights,
    tokens: Int[Tensor, "prompt pos"],
    answer: Int[Tensor, " prompt"],
    src: Sources,
    src_rows: Int[Tensor, " prompt"],
    keep_h: Bool[Tensor, "circuit layer head_index"],
    keep_m: Bool[Tensor, "circuit layer"] | None,
    *,
    sparse: bool = True,
) -> Float[Tensor, "circuit prompt d_vocab"]:
    """The answer logits of every circuit on every prompt, blocks shared between circuits
    that keep the same nodes up to them, and in each block only the heads and MLPs that
    some circuit keeps computed (``_kept_block``; ``sparse=False``: every one, through
    ``Weights.block``).

    Arguments:
        w: the model's weights.
        tokens: the prompts.
        answer: each prompt's answer position.
        src: the ablated outputs; prompt ``p`` reads row ``src_rows[p]`` of them.
        keep_h: per circuit, the heads kept (True) or ablated (False).
        keep_m: per circuit, the MLPs kept; None for a model without MLPs.

    Returns:
        Logits at each prompt's answer position, per circuit.
    """
    n_prompts, n_circuits = tokens.shape[0], keep_h.shape[0]
    state = w.embed(tokens)  # one class: every circuit shares the embedding
    classes = torch.zeros(n_circuits, dtype=torch.long, device=keep_h.device)
    n_classes = 1
    last = w.n_layers - 1
    for layer in range(w.n_layers):
        key = [classes.unsqueeze(1), keep_h[:, layer].long()]
        if keep_m is not None:
            key.append(keep_m[:, layer : layer + 1].long())
        # Sorted and deterministic: the classes of layer ``layer`` and their parents.
        unique, inverse = torch.unique(torch.cat(key, 1), dim=0, return_inverse=True)
        parent, k = unique[:, 0], len(unique)
        if k == n_classes and torch.equal(parent, torch.arange(k, device=parent.device)):
            resid = state
        else:
            resid = state.unflatten(0, (n_classes, n_prompts))[parent].flatten(0, 1)
        heads = unique[:, 1 : 1 + w.n_heads].bool()
        mlps = unique[:, -1].bool() if keep_m is not None else None
        at = answer if layer == last else None
        z_src = _source(src.z[layer], src, src_rows, at)
        mlp_src = None if mlps is None else _source(src.mlp_out[layer], src, src_rows, at)
        if sparse and sparse_nodes_supported(w) is None:
            state = _kept_block(w, layer, resid, heads, mlps, z_src, mlp_src, at)
        else:
            edit_mlp = None
            if mlps is not None and mlp_src is not None:
                edit_mlp = _keep_or(mlps.view(k, 1, 1, 1), mlp_src)
            state = w.block(
                layer,
                resid,
                answer=None if at is None else at.repeat(k),
                edit_z=_keep_or(heads.view(k, 1, 1, -1, 1), z_src),
                edit_mlp=edit_mlp,
            )
        classes, n_classes = inverse, k
    logits = w.logits(state[:, 0])  # the last block returned the answer position alone
    return logits.unflatten(0, (n_classes, n_prompts))[classes]


def sparse_nodes_supported(w: Weights) -> str | None:
    """Why ``node_forward`` must compute every head of a layer (``Weights.block``) rather
    than those a circuit keeps, or None: ALiBi and a q/k norm over every head's channels
    (OLMo-2) tie a layer's heads together."""
    if w.alibi is not None:
        return "ALiBi"
    if w.spec.qk_norm == "proj":
        return "a q/k norm over all heads"
    return None


def _kept_block(
    w: Weights,
    layer: int,
    resid: Float[Tensor, "row pos d_model"],
    heads: Bool[Tensor, "class head_index"],
    mlps: Bool[Tensor, " class"] | None,
    z_src: Tensor,
    mlp_src: Tensor | None,
    answer: Int[Tensor, " prompt"] | None,
) -> Float[Tensor, "row pos d_model"]:
    """Block ``layer`` for rows ``class * prompts + p``, computing only what some class
    keeps: the q, k, v and attention of the heads some class keeps, and the MLP for the
    classes that keep it. An ablated head's z and an ablated MLP's output are their
    sources (``_source``), whatever the block would compute, so a small circuit costs a
    few heads and MLPs per layer, not the layer. With ``answer`` (the last block), only
    each prompt's answer position is returned, ``(row, 1, d_model)``, as ``Weights.block``.
    """
    weights = w.layers[layer]
    n_classes, width = heads.shape[0], resid.shape[1]
    positions = torch.arange(width, device=resid.device)
    rows = torch.arange(resid.shape[0], device=resid.device)
    at = None if answer is None else answer.repeat(n_classes)
    resid_pre = resid if at is None else resid[rows, at].unsqueeze(1)
    q_pos = positions if at is None else at.unsqueeze(-1)
    n_q, n_prompts = resid_pre.shape[1], resid.shape[0] // n_classes
    w_o = weights.w_o.view(w.n_heads, w.d_head, -1)
    ablated = (~heads).to(z_src.dtype)
    if z_src.shape[1] == 1:
        # Sources shared by every prompt (mean, zero): each head's through W_O once, then
        # the ablated ones summed per class.
        per_head = torch.einsum("xpqhe,hed->pqhd", z_src, w_o)
        attn = torch.einsum("ch,pqhd->cpqd", ablated, per_head) + weights.b_o
    else:  # a source per prompt (resample): the ablated heads' z of each class, through W_O
        masked = z_src * ablated.view(n_classes, 1, 1, -1, 1)
        attn = _affine(masked.flatten(-2), weights.w_o, weights.b_o)
    kept = torch.nonzero(heads.any(0)).flatten()
    if len(kept):
        x = _norm(resid, weights.ln1)
        q = _project_flat(w, layer, x if at is None else x[rows, at].unsqueeze(1), "q", kept)
        k = w._qk_post(layer, _project_flat(w, layer, x, "k", kept), weights.k_norm, positions)
        v = _project_flat(w, layer, x, "v", kept)
        q = w._qk_post(layer, q, weights.q_norm, q_pos)
        mixed = w.mix(w.pattern(q, k, q_pos, layer, kept), v).unflatten(0, (n_classes, -1))
        mixed = mixed * heads[:, kept].view(n_classes, 1, 1, -1, 1).to(mixed.dtype)
        attn = attn + _affine(mixed.flatten(-2), w_o[kept].flatten(0, 1), None)
    attn = attn.expand(n_classes, n_prompts, n_q, -1).flatten(0, 1)
    resid_mid = resid_pre + _norm(attn, weights.attn_post)
    if mlps is None:
        return resid_mid
    assert mlp_src is not None
    out = mlp_src.expand(n_classes, n_prompts, n_q, -1)
    computed = torch.nonzero(mlps).flatten()
    if len(computed):
        by_class = w.mlp_input(resid_pre, resid_mid).unflatten(0, (n_classes, -1))
        picked = by_class[computed].flatten(0, 1)
        out = out.clone()
        out[computed] = w.mlp_out(layer, picked).unflatten(0, (len(computed), -1))
    return resid_mid + out.reshape(resid_mid.shape)


def _project_flat(
    w: Weights, layer: int, x: Tensor, part: str, heads: Int[Tensor, " head"]
) -> Float[Tensor, "batch pos head d_head"]:
    """The ``part`` (q, k or v) projection of ``heads`` from one input ``x`` (normed)."""
    weights = w.layers[layer]
    w_flat, b_flat = getattr(weights, f"w_{part}"), getattr(weights, f"b_{part}")
    matrix = w_flat.view(-1, w.n_heads, w.d_head)[:, heads].flatten(1)
    bias = b_flat.view(w.n_heads, w.d_head)[heads].flatten()
    return _affine(x, matrix, bias).unflatten(-1, (len(heads), w.d_head))


def _source(x: Tensor, src: Sources, rows: Tensor, answer: Tensor | None) -> Tensor:
    """A sender's ablated output, ``(1, prompt or 1, pos or 1, ...)``, for every class."""
    if answer is not None:  # the last block: the answer position of each prompt only
        picked = x[torch.zeros_like(rows) if src.shared else rows, answer]
        return picked.unsqueeze(0).unsqueeze(2)
    return x.unsqueeze(0) if src.shared else x[rows].unsqueeze(0)


def _keep_or(keep: Tensor, ablated: Tensor) -> Callable[[Tensor], Tensor]:
    """An edit that keeps an output where ``keep`` (per class) and ablates it elsewhere."""

    def edit(out: Tensor) -> Tensor:
        by_class = out.unflatten(0, (keep.shape[0], -1))
        return torch.where(keep, by_class, ablated).flatten(0, 1)

    return edit


class DroppedEdges(Receivers):
    """Receivers of a stack of edge circuits, circuit-major (rows ``c * prompts + p``):
    each reads the current residual stream plus, for every sender whose edge circuit ``c``
    drops, that sender's (ablated − current) output.

    What a layer's receivers add is a batched matmul of each circuit's (receiver,
    sender) drop matrix with each position's (sender, d_model) deltas: it lands in the
    row-major ``(row, pos, receiver, d_model)`` layout the receivers read, and neither
    the deltas nor the result is copied into another layout.

    The heads of a layer with a post-norm (Gemma-2) reach the stream only through
    ``N(Σ_h out_h + b_O)``: their slots in ``deltas`` stay zero, and a receiver gets
    ``N(sum with its dropped heads' outputs ablated) − N(sum)`` for that layer instead.
    """

    def __init__(
        self,
        w: Weights,
        index: GraphIndex,
        drop: Float[Tensor, "circuit sender receiver"],
        resid: Float[Tensor, "row pos d_model"],
        input_delta: Float[Tensor, "row pos d_model"],
        ablated_z: list[Tensor],
        ablated_mlp: list[Tensor],
    ) -> None:
        """``resid``, ``input_delta``: per (circuit, prompt) row; ``ablated_z`` and
        ``ablated_mlp``: per layer, one row per prompt (or one shared by every prompt)."""
        self.w, self.index, self.drop = w, index, drop
        self.n_circuits = drop.shape[0]
        self.deltas = resid.new_zeros(*resid.shape[:2], index.n_senders, resid.shape[-1])
        self.deltas[:, :, 0] = input_delta
        self.ablated_z = ablated_z
        self.ablated_mlp = ablated_mlp
        # Per post-normed layer: its first head's sender slot, the heads' sum, their deltas.
        self.normed: list[tuple[int, Tensor, Tensor, Norm]] = []

    def _by_circuit(self, x: Tensor) -> Tensor:
        return x.unflatten(0, (self.n_circuits, -1))

    def _minus(self, ablated: Tensor, out: Tensor) -> Tensor:
        """``ablated − out`` per row: ``ablated`` has a row per prompt (or one shared),
        ``out`` a row per (circuit, prompt)."""
        return (ablated.unsqueeze(0) - self._by_circuit(out)).flatten(0, 1)

    def _read(self, n: int, columns: slice | int, resid: Tensor) -> Tensor:
        """What the receivers in ``columns`` read: ``resid`` plus, over the first ``n``
        senders, the deltas of the dropped ones; ``(row, pos, receiver, d_model)``, with
        no receiver axis for a single column."""
        single = isinstance(columns, int)
        span = slice(columns, columns + 1) if isinstance(columns, int) else columns
        drop = self.drop[:, :n, span].transpose(1, 2)  # (circuit, receiver, sender)
        deltas = self._by_circuit(self.deltas[:, :, :n])  # (circuit, prompt, pos, sender, d)
        # Per position, (receiver, sender) @ (sender, d_model): the result is row-major.
        read = torch.matmul(drop.unsqueeze(1).unsqueeze(1), deltas).flatten(0, 1)
        read.add_(resid.unsqueeze(2))
        read = read[:, :, 0] if single else read
        for first, raw, delta, norm in self.normed:
            if first >= n:
                break
            heads = slice(first, first + delta.shape[2])
            moved = torch.einsum(
                "cbphd,ch...->cbp...d", self._by_circuit(delta), self.drop[:, heads, columns]
            ).flatten(0, 1)
            base = raw if isinstance(columns, int) else raw.unsqueeze(2)
            read = read + norm(base + moved) - norm(base)
        return read

    def heads(self, layer: int, resid: Tensor, n_heads: int) -> Tensor:
        n = self.index.senders_before_heads(layer)
        return self._read(n, self.index.heads_columns(layer), resid)

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        n = self.index.senders_before_mlp(layer)
        return self._read(n, self.index.receiver[MLP(layer).name], resid)

    def final(self, resid: Tensor) -> Tensor:
        return self._read(self.index.n_senders, self.index.receiver[LOGITS.name], resid)

    def head_outputs(self, layer: int, out: Tensor, raw: Tensor) -> None:
        w_o = self.w.layers[layer].w_o.view(self.w.n_heads, self.w.d_head, -1)
        ablated = torch.einsum("bphe,hed->bphd", self.ablated_z[layer], w_o)
        first = self.index.sender[f"a{layer}.h0"]
        post = self.w.layers[layer].attn_post
        if post is not None:
            self.normed.append((first, raw, self._minus(ablated, out), post))
            return
        self.deltas[:, :, first : first + out.shape[2]] = self._minus(ablated, out)

    def mlp_output(self, layer: int, out: Tensor) -> None:
        slot = self.index.sender[MLP(layer).name]
        self.deltas[:, :, slot] = self._minus(self.ablated_mlp[layer], out)
