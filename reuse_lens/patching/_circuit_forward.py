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
output (Hanna et al. 2024; MIB).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from reuse_lens.nodes import LOGITS, MLP
from reuse_lens.patching._edge_forward import Receivers
from reuse_lens.patching._forward import Norm, Weights, _affine, _norm
from reuse_lens.patching.graph import GraphIndex

__all__ = [
    "DroppedEdges",
    "SenderMemo",
    "Sources",
    "node_forward",
    "sparse_edge_logits",
    "sparse_edges_supported",
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


def sparse_edges_supported(w: Weights) -> str | None:
    """Why ``sparse_edge_logits`` cannot run this model (the dense edge forward can), or
    None: a norm after the attention (Gemma-2) joins the heads before the stream, so a
    head's share is not its own; ALiBi and a q/k norm over every head's channels (OLMo-2)
    tie the heads of a layer together too."""
    if any(layer.attn_post is not None for layer in w.layers):
        return "a norm after the attention"
    return sparse_nodes_supported(w)


@dataclass
class SenderMemo:
    """Senders' outputs carried from one ``sparse_edge_logits`` call to the next.

    A sender's output in an edge circuit depends only on which edges into it the circuit
    keeps and on the outputs of those edges' senders. ``sparse_edge_logits`` gives each
    distinct (kept in-edges, their senders' classes) a *class*, computes each class once
    for every circuit that has it, and records the class's key here with an id that is
    never reused. The prefixes of one ranking, evaluated batch after batch by the size
    rule, keep most of their senders' classes from one prefix to the next, so the classes
    of the last circuit of a call are held (``held``, id -> current − ablated output) for
    the next call; the others are dropped, so what is held is one circuit's senders.

    A memo belongs to one (weights, sources, prompts): ``bind`` forgets everything when
    the prompts change.
    """

    prompts: Tensor | None = None
    classes: dict[int, dict[bytes, int]] = field(default_factory=dict)
    held: dict[int, Tensor] = field(default_factory=dict)
    next_id: int = 0

    def bind(self, prompts: Int[Tensor, " prompt"]) -> None:
        """Use the memo for these prompts: what it holds for others is dropped."""
        if self.prompts is None or not torch.equal(self.prompts, prompts):
            self.prompts, self.classes, self.held = prompts.clone(), {}, {}

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


class _Bank:
    """The current − ablated output of every class a call uses, a row each."""

    def __init__(self, like: Tensor, capacity: int, memo: SenderMemo) -> None:
        self.rows = like.new_empty(capacity, *like.shape)
        self.row_of: dict[int, int] = {}
        for gid, delta in memo.held.items():
            self.put(gid, delta)

    def put(self, gid: int, delta: Tensor) -> None:
        row = len(self.row_of)
        self.rows[row] = delta
        self.row_of[gid] = row

    def slots(self, gids: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
        """The rows of these class ids."""
        table = torch.zeros(max(self.row_of) + 1, dtype=torch.long)
        table[list(self.row_of)] = torch.tensor(list(self.row_of.values()))
        return table[gids.cpu()].to(gids.device)


def _classify(
    memo: SenderMemo,
    keep: Bool[Tensor, "circuit sender receiver"],
    ids: Int[Tensor, "circuit sender"],
    sender: int,
    columns: list[int],
    visible: int,
) -> tuple[list[int], Int[Tensor, "new visible column"]]:
    """Give ``sender`` its class in each circuit that keeps an edge out of it (``ids``;
    -1 in the others, which never read it).

    A class's key is, per sender it reads (the first ``visible``) and per receiver column
    of ``sender``, 0 where the edge is dropped and 1 + that sender's class where it is
    kept: circuits with the same key compute the same output. Returns the ids of the
    classes new to the memo, to be computed, and their keys ``(new, visible, column)``.
    """
    rows = torch.nonzero(keep[:, sender].any(1)).flatten()
    if len(rows) == 0:
        return [], ids.new_zeros(0, visible, len(columns))
    kept = keep[rows, :visible][:, :, columns].long()
    key = (kept * (ids[rows, :visible].unsqueeze(-1) + 1)).flatten(1)
    if key.shape[1] == 0:  # the input sender reads nothing: one class
        key = key.new_zeros(len(rows), 1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    table = memo.classes.setdefault(sender, {})
    gids, new = [], []
    for u, row in enumerate(unique.cpu().numpy()):
        raw = row.tobytes()
        if raw not in table:
            table[raw] = memo.new_id()
            new.append(u)
        gids.append(table[raw])
    ids[rows, sender] = torch.tensor(gids, device=ids.device)[inverse]
    fresh = unique[torch.tensor(new, dtype=torch.long, device=unique.device)]
    return [gids[u] for u in new], fresh[:, : visible * len(columns)].view(
        len(new), visible, len(columns)
    )


def _gather(
    base: Tensor,
    bank: _Bank,
    keys: Int[Tensor, "cls visible column"],
    at: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """What the receiver columns of each class read, ``(cls, column, *base.shape)``:
    ``base`` (the stream with every sender ablated) plus the output of each kept sender's
    class. ``at``: (prompt, position) pairs, where ``base`` holds those positions alone."""
    n, _, width = keys.shape
    filled = bank.rows[: len(bank.row_of)]
    source = filled if at is None else filled[:, at[0], at[1]]
    cls, sender, column = torch.nonzero(keys, as_tuple=True)
    if len(cls) == 0:
        return base.expand(n, width, *base.shape).clone()
    # A dense (read, class row) selection times the bank: far faster than gathering the
    # rows each read adds (a copy per kept edge), and its zeros cost a few flops.
    select = base.new_zeros(n * width, len(filled))
    select[cls * width + column, bank.slots(keys[cls, sender, column] - 1)] = 1
    out = torch.addmm(base.flatten().expand(n * width, -1), select, source.flatten(1))
    return out.view(n, width, *base.shape)


def sparse_edge_logits(
    w: Weights,
    index: GraphIndex,
    keep: Bool[Tensor, "circuit sender receiver"],
    resid: Float[Tensor, "prompt pos d_model"],
    current_input: Float[Tensor, "prompt pos d_model"],
    src: Sources,
    src_rows: Int[Tensor, " prompt"],
    answer: Int[Tensor, " prompt"],
    memo: SenderMemo | None = None,
) -> Float[Tensor, "row d_vocab"]:
    """Answer logits of a stack of edge circuits (rows ``c * prompts + p``), computing
    each sender once per class of circuits that give it the same output.

    A receiver reads ``Z + Σ_s keep[s, r] (current_s − ablated_s)``, where ``Z`` is the
    stream with every sender ablated (the ablated embedding, every ablated head and MLP
    output, the biases): the same for every circuit. A sender none of whose edges is kept
    adds only its ablated output, which ``Z`` holds already, so its current output is
    never needed: a circuit of a few hundred of GPT-2 small's 32,000 edges runs a few heads
    and MLPs, not the model. A sender's output depends only on the edges into it that the
    circuit keeps and on their senders' outputs, so circuits that agree on those share it
    (``_classify``): nested prefixes of one ranking recompute only the senders downstream
    of the edges each adds, and ``memo`` carries the last circuit's senders to the next
    call. The same values as the dense edge forward (``DroppedEdges``), which the tests
    check.

    Arguments:
        w: the model's weights (``sparse_edges_supported`` says which it takes).
        index: the edge graph's rows and columns.
        keep: per circuit, the (sender, receiver) edges kept.
        resid: the embedding of each prompt (``Weights.embed``).
        current_input: what the ``input`` sender outputs (the embedding, or the token
            embedding alone).
        src: the ablated outputs; prompt ``p`` reads row ``src_rows[p]`` (or a shared row).
        answer: each prompt's answer position.
        memo: the classes held from the previous call on the same prompts, if any.
    """
    memo = SenderMemo() if memo is None else memo
    n_circuits, n_prompts = keep.shape[0], resid.shape[0]
    keep = keep.bool()
    ids = torch.full(keep.shape[:2], -1, dtype=torch.long, device=keep.device)
    # At most one new class per (circuit, sender it keeps an edge out of).
    bank = _Bank(resid, int(keep.any(2).sum()) + len(memo.held), memo)

    def shared(x: Tensor) -> Tensor:
        return x if src.shared else x[src_rows]

    ablated_input = shared(src.input)
    z = resid - current_input + ablated_input  # every sender ablated, before block 0
    for gid, _ in zip(*_classify(memo, keep, ids, 0, [], 0), strict=True):
        bank.put(gid, (current_input - ablated_input).expand_as(resid))
    n_heads = w.n_heads
    for layer in range(w.n_layers):
        first = index.sender[f"a{layer}.h0"]
        ablated_z = shared(src.z[layer])
        start = index.heads_columns(layer).start
        visible = index.senders_before_heads(layer)
        for h in range(n_heads):
            columns = [start + part * n_heads + h for part in range(3)]
            gids, keys = _classify(memo, keep, ids, first + h, columns, visible)
            if gids:
                inputs = _gather(z, bank, keys)  # (class, q/k/v, prompt, pos, d_model)
                delta = _head_delta(w, layer, h, inputs, ablated_z)
                for gid, row in zip(gids, delta, strict=True):
                    bank.put(gid, row)
        mid = z + w.attn_out(layer, ablated_z)  # every head ablated, b_O kept
        if w.has_mlps:
            ablated_mlp = shared(src.mlp_out[layer])
            receiver = index.receiver[MLP(layer).name]
            visible = index.senders_before_mlp(layer)
            slot = index.sender[MLP(layer).name]
            gids, keys = _classify(memo, keep, ids, slot, [receiver], visible)
            if gids:
                x = _gather(w.mlp_input(z, mid), bank, keys)[:, 0]
                current = w.mlp_out(layer, x.flatten(0, 1)).unflatten(0, x.shape[:2])
                for gid, row in zip(gids, current - ablated_mlp.unsqueeze(0), strict=True):
                    bank.put(gid, row)
            mid = mid + ablated_mlp
        z = mid
    _carry(memo, bank, ids[-1])
    # The logits read every circuit's own senders, at the answer position alone.
    rows = torch.arange(n_prompts, device=resid.device)
    column = index.receiver[LOGITS.name]
    final_keys = keep[:, :, column].long().unsqueeze(-1) * (ids.unsqueeze(-1) + 1)
    final = _gather(z[rows, answer], bank, final_keys, at=(rows, answer))[:, 0]
    assert final.shape[0] == n_circuits
    return w.logits(final.flatten(0, 1))


def _head_delta(
    w: Weights,
    layer: int,
    head: int,
    inputs: Float[Tensor, "cls qkv prompt pos d_model"],
    ablated_z: Float[Tensor, "src pos head d_head"],
) -> Float[Tensor, "cls prompt pos d_model"]:
    """One head's current − ablated output for each class, from its q, k and v inputs."""
    weights = w.layers[layer]
    picked = torch.tensor([head], device=inputs.device)
    positions = torch.arange(inputs.shape[3], device=inputs.device)
    x_q, x_k, x_v = (x.flatten(0, 1).unsqueeze(2) for x in inputs.unbind(1))
    q = w._qk_post(layer, _project(w, layer, x_q, "q", picked), weights.q_norm, positions)
    k = w._qk_post(layer, _project(w, layer, x_k, "k", picked), weights.k_norm, positions)
    v = _project(w, layer, x_v, "v", picked)
    mixed = w.mix(w.pattern(q, k, positions, layer, picked), v)
    w_o = weights.w_o.view(w.n_heads, w.d_head, -1)[head]
    current = (mixed[:, :, 0] @ w_o).unflatten(0, (inputs.shape[0], inputs.shape[2]))
    return current - (ablated_z[:, :, head] @ w_o).unsqueeze(0)


def _carry(memo: SenderMemo, bank: _Bank, last: Int[Tensor, " sender"]) -> None:
    """Hold the last circuit's classes for the next call, and forget the others."""
    kept = {int(g) for g in last.tolist() if g >= 0}
    memo.held = {g: bank.rows[bank.row_of[g]].clone() for g in kept}
    memo.classes = {
        s: {key: g for key, g in table.items() if g in kept} for s, table in memo.classes.items()
    }


def _project(
    w: Weights, layer: int, x: Tensor, part: str, heads: Int[Tensor, " head"]
) -> Float[Tensor, "batch pos head d_head"]:
    """The ``part`` (q, k or v) projection of ``heads``, each from its own input
    ``(batch, pos, head, d_model)``, before any q/k norm or rotary."""
    weights = w.layers[layer]
    w_flat, b_flat = getattr(weights, f"w_{part}"), getattr(weights, f"b_{part}")
    per_head = w_flat.view(-1, w.n_heads, w.d_head)[:, heads].permute(1, 0, 2)
    bias = b_flat.view(w.n_heads, w.d_head)[heads]
    return torch.einsum("bphd,hde->bphe", _norm(x, weights.ln1), per_head) + bias
