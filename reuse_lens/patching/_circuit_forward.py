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
output (Hanna et al. 2024; MIB). ``sparse_edge_logits`` computes the same values from
the other end: the stream with every sender ablated plus the (current − ablated) output
of each sender whose edge is kept, computing a sender once per class of circuits that
give it the same inputs, and only at the positions its readers read. A ``SenderMemo``
carries the classes from one call to the next: the prefixes of a ranking, evaluated
batch after batch by the size rule, recompute only the senders downstream of the edges
each prefix adds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from reuse_lens.nodes import LOGITS, MLP, ModelShape
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
    """Senders' outputs carried from one ``sparse_edge_logits`` call to the next, on the
    same prompts.

    A sender's output in an edge circuit depends only on which edges into it the circuit
    keeps and on the outputs of those edges' senders. ``sparse_edge_logits`` gives each
    distinct (kept in-edges, their senders' classes) a *class*, computes each class once
    for every circuit that has it, and records the class's key here with an id that is
    never reused. The prefixes of one ranking, evaluated batch after batch by the size
    rule, keep most of their senders' classes from one prefix to the next, so the classes
    of the last circuit of a call are held for the next call (in ``rows``, the call's
    buffer, at ``row_of``), in sender order up to ``limit`` bytes (the early senders,
    which change least); the others are dropped. A class not held is computed again:
    the memo changes what is computed, never a value. ``key_of`` gives each held class
    its sender and key; ``streams`` the stream with every sender ablated
    (``_EdgePass.ablated_streams``), the same for every circuit.
    """

    limit: int | None = None
    classes: dict[int, dict[bytes, int]] = field(default_factory=dict)
    rows: Tensor | None = None
    row_of: dict[int, int] = field(default_factory=dict)
    next_id: int = 0
    streams: tuple[list[Tensor], list[Tensor], Tensor] | None = None
    key_of: dict[int, tuple[int, bytes]] = field(default_factory=dict)

    def new_id(self, sender: int, key: bytes) -> int:
        """A new class of ``sender`` with this key."""
        self.classes.setdefault(sender, {})[key] = self.next_id
        self.key_of[self.next_id] = (sender, key)
        self.next_id += 1
        return self.next_id - 1


class _Bank:
    """The current − ablated output of every class a call uses, a row each, in a buffer
    the memo keeps from one call to the next: a held class stays in its row, and the new
    ones take the rows no held class uses, so nothing held is copied.

    A class computed at the answer positions alone (``_full_positions``) is left undefined
    elsewhere: only readers at the answer positions read it, and a read sums the rows it
    keeps and no other (``_gather``)."""

    def __init__(self, like: Tensor, capacity: int, memo: SenderMemo) -> None:
        """Room for ``capacity`` new classes besides those the memo holds."""
        held, self.row_of = memo.rows, dict(memo.row_of)
        taken = set(self.row_of.values())
        fits = held is not None and held.shape[1:] == like.shape and held.dtype == like.dtype
        if held is not None and fits and len(held) - len(taken) >= capacity:
            self.rows = held
        else:  # a larger buffer, the held classes copied to its first rows once; twice
            # the room asked for, so that a memo whose circuits grow seldom copies again
            self.rows = like.new_empty(len(taken) + 2 * capacity, *like.shape)
            if held is not None and self.row_of:
                gids = list(self.row_of)
                rows = [self.row_of[g] for g in gids]
                before = torch.tensor(rows, dtype=torch.long, device=held.device)
                self.rows[: len(gids)] = held[before]
                self.row_of = {gid: row for row, gid in enumerate(gids)}
                taken = set(range(len(gids)))
        self.free = [row for row in range(len(self.rows)) if row not in taken]
        self.free.reverse()  # popped from the end: the lowest rows first

    def put(self, gid: int, delta: Tensor, at: tuple[Tensor, Tensor] | None = None) -> None:
        """Store class ``gid``: ``delta`` at every position, or at the (prompt, position)
        pairs ``at``."""
        row = self.free.pop()
        if at is None:
            self.rows[row] = delta
        else:
            self.rows[row][at] = delta
        self.row_of[gid] = row

    def slots(self, gids: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
        """The rows of these class ids."""
        table = torch.zeros(max(self.row_of) + 1, dtype=torch.long)
        table[list(self.row_of)] = torch.tensor(list(self.row_of.values()))
        return table[gids.cpu()].to(gids.device)


@dataclass
class _Classes:
    """The classes of one sender new to the memo: their ids, their keys ``(class,
    visible sender, column)`` and whether each is computed at every position."""

    gids: list[int]
    keys: Int[Tensor, "cls visible column"]
    full: list[bool]

    def split(self) -> list[tuple[bool, list[int], Int[Tensor, "cls visible column"]]]:
        """The classes computed at every position, then those at the answer alone."""
        groups = []
        for full in (True, False):
            picked = [i for i, f in enumerate(self.full) if f == full]
            if picked:
                index = torch.tensor(picked, device=self.keys.device)
                groups.append((full, [self.gids[i] for i in picked], self.keys[index]))
        return groups


def _classify(
    memo: SenderMemo,
    keep: Bool[Tensor, "circuit sender receiver"],
    ids: Int[Tensor, "circuit sender"],
    full: Bool[Tensor, "circuit sender"],
    sender: int,
    columns: list[int],
    visible: int,
) -> _Classes:
    """Give ``sender`` its class in each circuit that keeps an edge out of it (``ids``;
    -1 in the others, which never read it).

    A class's key is, per sender it reads (the first ``visible``) and per receiver column
    of ``sender``, 0 where the edge is dropped and 1 + that sender's class where it is
    kept, and whether it is needed at every position or at the answer alone (``full``):
    circuits with the same key compute the same output. Returns the classes new to the
    memo, which are to be computed.
    """
    rows = torch.nonzero(keep[:, sender].any(1)).flatten()
    if len(rows) == 0:
        return _Classes([], ids.new_zeros(0, visible, len(columns)), [])
    kept = keep[rows, :visible][:, :, columns].long()
    reads = (kept * (ids[rows, :visible].unsqueeze(-1) + 1)).flatten(1)
    key = torch.cat([reads, full[rows, sender].long().unsqueeze(1)], 1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    table = memo.classes.get(sender, {})
    gids, new = [], []
    for u, row in enumerate(unique.cpu().numpy()):
        raw = row.tobytes()
        if raw in table:
            gids.append(table[raw])
        else:
            gids.append(memo.new_id(sender, raw))
            new.append(u)
    ids[rows, sender] = torch.tensor(gids, device=ids.device)[inverse]
    fresh = unique[torch.tensor(new, dtype=torch.long, device=unique.device)]
    keys = fresh[:, :-1].view(len(new), visible, len(columns))
    return _Classes([gids[u] for u in new], keys, [bool(f) for f in fresh[:, -1].tolist()])


@dataclass(frozen=True)
class _Layout:
    """Where each layer's senders and receivers sit in the edge graph, per layer: the
    first head's sender slot, the first q column, how many senders the heads and the MLP
    read, the MLP's slot and column; per receiver column, the sender that owns it (-1:
    the logits) and whether it is read at every position (keys and values); and the
    senders in groups that read none of each other, last group first (``backwards``)."""

    first_head: list[int]
    first_column: list[int]
    heads_visible: list[int]
    mlp_slot: list[int]
    mlp_column: list[int]
    mlp_visible: list[int]
    logits: int
    reader: Int[Tensor, " receiver"]
    every: Bool[Tensor, " receiver"]
    backwards: list[slice]


@functools.lru_cache(maxsize=8)
def _layout(shape: ModelShape) -> _Layout:
    """The layout of the edge graph of ``shape``, made once per shape (``GraphIndex``'s
    ``senders_before_*`` list the senders each time)."""
    index, n_heads = GraphIndex(shape), shape.n_heads
    reader = torch.full((index.n_receivers,), -1, dtype=torch.long)
    every = torch.zeros(index.n_receivers, dtype=torch.bool)
    layers = range(shape.n_layers)
    first_column = [index.heads_columns(layer).start for layer in layers]
    for layer, start in zip(layers, first_column, strict=True):
        for h in range(n_heads):
            reader[start + h] = index.sender[f"a{layer}.h{h}"]
        every[start + n_heads : start + 3 * n_heads] = True
        if shape.has_mlps:
            reader[index.receiver[MLP(layer).name]] = index.sender[MLP(layer).name]
    mlps = shape.has_mlps
    return _Layout(
        first_head=[index.sender[f"a{layer}.h0"] for layer in layers],
        first_column=first_column,
        heads_visible=[index.senders_before_heads(layer) for layer in layers],
        mlp_slot=[index.sender[MLP(layer).name] if mlps else -1 for layer in layers],
        mlp_column=[index.receiver[MLP(layer).name] if mlps else -1 for layer in layers],
        mlp_visible=[index.senders_before_mlp(layer) if mlps else -1 for layer in layers],
        logits=index.receiver[LOGITS.name],
        reader=reader,
        every=every,
        backwards=_groups_backwards(index),
    )


def _groups_backwards(index: GraphIndex) -> list[slice]:
    """Senders in groups that read none of each other, last first: per layer from the
    last, its MLP, then its heads; then the input."""
    groups = []
    for layer in reversed(range(index.shape.n_layers)):
        if index.shape.has_mlps:
            slot = index.sender[MLP(layer).name]
            groups.append(slice(slot, slot + 1))
        first = index.sender[f"a{layer}.h0"]
        groups.append(slice(first, first + index.shape.n_heads))
    covered = sum(g.stop - g.start for g in groups) + 1
    assert covered == index.n_senders, "every sender but the input is a head or an MLP"
    return [*groups, slice(0, 1)]


def _full_positions(
    layout: _Layout, keep: Bool[Tensor, "circuit sender receiver"]
) -> Bool[Tensor, "circuit sender"]:
    """Which senders a circuit reads at every position; the others it reads at each
    prompt's answer position alone.

    The logits read the answer position; a head's keys and values read every position,
    its query the positions its own output is read at, and an MLP its input at its
    output's. So a sender whose kept edges all end at the logits or at the queries and
    MLPs of senders read at the answer alone is itself read there alone: in the last
    layers, a head's query and an MLP cost one position, not the prompt.
    """
    every, reader = layout.every.to(keep.device), layout.reader.to(keep.device)
    read_by, owned = reader.clamp(min=0), reader >= 0
    full = torch.zeros(keep.shape[:2], dtype=torch.bool, device=keep.device)
    for group in layout.backwards:  # a group's readers come after it
        wide = every | (full[:, read_by] & owned)
        full[:, group] = (keep[:, group] & wide.unsqueeze(1)).any(2)
    return full


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
    cls, sender, column = torch.nonzero(keys, as_tuple=True)
    if len(cls) == 0:
        return base.expand(n, width, *base.shape).clone()
    # Each read sums its kept senders' rows of the bank: a bag sum, which reads only
    # those rows (a dense selection matrix times the bank reads every row for every
    # read, and gathering the rows first copies them).
    read = cls * width + column
    order = torch.argsort(read, stable=True)
    slots = bank.slots(keys[cls, sender, column] - 1)[order]
    source = bank.rows
    if at is not None:  # the rows read, at the answer positions alone
        used, slots = torch.unique(slots, return_inverse=True)
        source = bank.rows[used.unsqueeze(1), at[0], at[1]]
    counts = torch.bincount(read, minlength=n * width)
    offsets = torch.cumsum(counts, 0) - counts
    out = F.embedding_bag(slots, source.flatten(1), offsets, mode="sum")
    out += base.flatten()
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
    of the edges each adds, and ``memo`` carries the last circuit's senders (and ``Z``)
    to the next call. A sender read at the answer position alone is computed there alone
    (``_full_positions``). The same values as the dense edge forward (``DroppedEdges``),
    which the tests check.

    Arguments:
        w: the model's weights (``sparse_edges_supported`` says which it takes).
        index: the edge graph's rows and columns.
        keep: per circuit, the (sender, receiver) edges kept.
        resid: the embedding of each prompt (``Weights.embed``).
        current_input: what the ``input`` sender outputs (the embedding, or the token
            embedding alone).
        src: the ablated outputs; prompt ``p`` reads row ``src_rows[p]`` (or a shared row).
        answer: each prompt's answer position.
        memo: what the previous call on the same prompts held, if any.
    """
    memo = SenderMemo() if memo is None else memo
    run = _EdgePass(w, _layout(index.shape), keep.bool(), memo, src, src_rows, answer, resid)
    if memo.streams is None:
        memo.streams = run.ablated_streams(resid - current_input + run.shared(src.input))
    heads_base, mlp_base, final_base = memo.streams
    run.input(current_input - run.shared(src.input))
    for layer in range(w.n_layers):
        for head in range(w.n_heads):
            run.head(layer, head, heads_base[layer])
        if w.has_mlps:
            run.mlp(layer, mlp_base[layer])
    _carry(memo, run.bank, run.ids[-1])
    return run.logits(final_base)


class _EdgePass:
    """One ``sparse_edge_logits`` call: each sender's class per circuit (``ids``), and the
    bank of the classes' outputs."""

    def __init__(
        self,
        w: Weights,
        layout: _Layout,
        keep: Bool[Tensor, "circuit sender receiver"],
        memo: SenderMemo,
        src: Sources,
        src_rows: Int[Tensor, " prompt"],
        answer: Int[Tensor, " prompt"],
        like: Float[Tensor, "prompt pos d_model"],
    ) -> None:
        """``like``: a tensor of the shape and dtype of a sender's output."""
        self.w, self.layout, self.keep, self.memo = w, layout, keep, memo
        self.src, self.src_rows, self.answer = src, src_rows, answer
        self.ids = torch.full(keep.shape[:2], -1, dtype=torch.long, device=keep.device)
        self.full = _full_positions(layout, keep)
        self.full[:, 0] = True  # the input costs nothing to hold whole
        read = keep.any(2)
        self.wanted = read.any(0).tolist()  # the senders some circuit reads
        # At most one new class per (circuit, sender it reads).
        self.bank = _Bank(like, int(read.sum()), memo)
        rows = torch.arange(len(answer), device=answer.device)
        self.at = (rows, answer)
        # The (prompt, position) pairs up to each answer, where some prompt ends earlier.
        width = like.shape[1]
        upto = torch.arange(width, device=answer.device) <= answer.unsqueeze(1)
        self.upto = None if bool(upto.all()) else torch.nonzero(upto, as_tuple=True)

    def shared(self, x: Tensor) -> Tensor:
        """A source for each prompt, or the one every prompt shares."""
        return x if self.src.shared else x[self.src_rows]

    def answer_of(self, x: Tensor) -> Tensor:
        """A prompt's (or the shared) tensor ``(src, pos, ...)`` at each answer."""
        return x.expand(len(self.answer), *x.shape[1:])[self.at]

    def ablated_streams(
        self, z: Float[Tensor, "prompt pos d_model"]
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The stream with every sender ablated, as each layer's heads read it, as its MLP
        reads it, and as the logits read it (at the answer): the same for every circuit,
        so a memo keeps it from one call to the next."""
        heads_base, mlp_base = [], []
        for layer in range(self.w.n_layers):
            heads_base.append(z)
            mid = z + self.w.attn_out(layer, self.shared(self.src.z[layer]))  # b_O kept
            if self.w.has_mlps:
                mlp_base.append(self.w.mlp_input(z, mid))
                mid = mid + self.shared(self.src.mlp_out[layer])
            z = mid
        return heads_base, mlp_base, z[self.at]

    def input(self, delta: Float[Tensor, "prompt pos d_model"]) -> None:
        for gid in _classify(self.memo, self.keep, self.ids, self.full, 0, [], 0).gids:
            self.bank.put(gid, delta)

    def head(self, layer: int, head: int, base: Float[Tensor, "prompt pos d_model"]) -> None:
        """Compute the classes of a head new to the memo, from its q, k and v inputs."""
        layout, w = self.layout, self.w
        slot = layout.first_head[layer] + head
        if not self.wanted[slot]:
            return
        start = layout.first_column[layer]
        columns = [start + part * w.n_heads + head for part in range(3)]
        visible = layout.heads_visible[layer]
        classes = _classify(self.memo, self.keep, self.ids, self.full, slot, columns, visible)
        ablated_z = self.shared(self.src.z[layer])[:, :, head]
        w_o = w.layers[layer].w_o.view(w.n_heads, w.d_head, -1)[head]
        for whole, gids, keys in classes.split():
            if whole:
                q, k, v = _project_parts(w, layer, head, _gather(base, self.bank, keys), "qkv")
                ablated = ablated_z
                q_pos = torch.arange(base.shape[1], device=base.device)
            else:  # keys and values at every position, the query at the answer
                k_v = _gather(base, self.bank, keys[:, :, 1:])
                k, v = _project_parts(w, layer, head, k_v, "kv")
                x_q = _gather(base[self.at], self.bank, keys[:, :, :1], self.at).unsqueeze(3)
                (q,) = _project_parts(w, layer, head, x_q, "q")
                ablated = self.answer_of(ablated_z).unsqueeze(1)
                q_pos = self.answer.repeat(len(gids)).unsqueeze(-1)
            current = _head_out(w, layer, head, q, k, v, q_pos).unflatten(0, (len(gids), -1))
            delta = current - (ablated @ w_o).unsqueeze(0)
            for gid, row in zip(gids, delta, strict=True):
                self.bank.put(gid, row if whole else row[:, 0], None if whole else self.at)

    def mlp(self, layer: int, base: Float[Tensor, "prompt pos d_model"]) -> None:
        """Compute the classes of an MLP new to the memo, from its input."""
        slot, column = self.layout.mlp_slot[layer], self.layout.mlp_column[layer]
        if not self.wanted[slot]:
            return
        visible = self.layout.mlp_visible[layer]
        classes = _classify(self.memo, self.keep, self.ids, self.full, slot, [column], visible)
        ablated_mlp = self.shared(self.src.mlp_out[layer])
        for whole, gids, keys in classes.split():
            if whole:
                x = _gather(base, self.bank, keys)[:, 0]
                delta = self._mlp_to_answer(layer, x, ablated_mlp)
            else:
                x = _gather(base[self.at], self.bank, keys, self.at)[:, 0]
                current = self.w.mlp_out(layer, x.flatten(0, 1)).unflatten(0, x.shape[:2])
                delta = current - self.answer_of(ablated_mlp).unsqueeze(0)
            for gid, row in zip(gids, delta, strict=True):
                self.bank.put(gid, row, None if whole else self.at)

    def _mlp_to_answer(
        self,
        layer: int,
        x: Float[Tensor, "cls prompt pos d_model"],
        ablated: Float[Tensor, "src pos d_model"],
    ) -> Float[Tensor, "cls prompt pos d_model"]:
        """An MLP's current − ablated output at each prompt's positions up to its answer,
        and 0 after it. Nothing read at or before the answer reads a later position
        (attention is causal: a later key gets exactly zero weight), so the padding of
        shorter prompts costs no MLP."""
        upto = self.upto
        if upto is None:
            current = self.w.mlp_out(layer, x.flatten(0, 1)).unflatten(0, x.shape[:2])
            return current - ablated.unsqueeze(0)
        delta = x.new_zeros(x.shape)
        current = self.w.mlp_out(layer, x[:, upto[0], upto[1]])
        delta[:, upto[0], upto[1]] = current - ablated.expand(x.shape[1:])[upto].unsqueeze(0)
        return delta

    def logits(self, base: Float[Tensor, "prompt d_model"]) -> Float[Tensor, "row d_vocab"]:
        """Every circuit reads its own senders' classes, at the answer position alone."""
        kept = self.keep[:, :, self.layout.logits].long().unsqueeze(-1)
        final = _gather(base, self.bank, kept * (self.ids.unsqueeze(-1) + 1), self.at)
        return self.w.logits(final[:, 0].flatten(0, 1))


def _head_out(
    w: Weights,
    layer: int,
    head: int,
    q: Float[Tensor, "row q_pos 1 d_head"],
    k: Float[Tensor, "row pos 1 d_head"],
    v: Float[Tensor, "row pos 1 d_head"],
    q_pos: Int[Tensor, " ..."],
) -> Float[Tensor, "row q_pos d_model"]:
    """One head's output ``z W_O`` (no bias) at the query positions ``q_pos`` (``(pos,)``,
    or ``(row, n)`` absolute), from its projected q, k and v."""
    weights = w.layers[layer]
    picked = torch.tensor([head], device=q.device)
    positions = torch.arange(k.shape[1], device=k.device)
    q = w._qk_post(layer, q, weights.q_norm, q_pos)
    k = w._qk_post(layer, k, weights.k_norm, positions)
    mixed = w.mix(w.pattern(q, k, q_pos, layer, picked), v)
    return mixed[:, :, 0] @ weights.w_o.view(w.n_heads, w.d_head, -1)[head]


def _project_parts(
    w: Weights, layer: int, head: int, x: Float[Tensor, "cls part prompt pos d_model"], parts: str
) -> list[Tensor]:
    """The ``parts`` (of q, k, v) projections of one head, each from its own input, in
    one norm and one contraction: ``(cls * prompt, pos, 1, d_head)`` each, before any q/k
    norm or rotary."""
    weights = w.layers[layer]
    mats = [getattr(weights, f"w_{p}").view(-1, w.n_heads, w.d_head)[:, head] for p in parts]
    bias = [getattr(weights, f"b_{p}").view(w.n_heads, w.d_head)[head] for p in parts]
    out = torch.einsum("cnbpd,nde->cnbpe", _norm(x, weights.ln1), torch.stack(mats))
    out = out + torch.stack(bias).view(1, len(parts), 1, 1, -1)
    return [part.flatten(0, 1).unsqueeze(2) for part in out.unbind(1)]


def _carry(memo: SenderMemo, bank: _Bank, last: Int[Tensor, " sender"]) -> None:
    """Hold the last circuit's classes for the next call, and forget the others: in the
    bank's own buffer where it fits in ``memo.limit``, else as many as fit, in sender
    order, copied out."""
    kept = [int(g) for g in last.tolist() if g >= 0]
    if memo.limit is not None and bank.rows.nbytes > memo.limit:
        kept = kept[: memo.limit // max(1, bank.rows[0].nbytes)]
        rows = [bank.row_of[g] for g in kept]
        index = torch.tensor(rows, dtype=torch.long, device=bank.rows.device)
        memo.rows, memo.row_of = bank.rows[index], {g: row for row, g in enumerate(kept)}
    else:
        memo.rows, memo.row_of = bank.rows, {g: bank.row_of[g] for g in kept}
    memo.key_of = {g: memo.key_of[g] for g in kept}
    memo.classes = {}
    for gid, (sender, key) in memo.key_of.items():
        memo.classes.setdefault(sender, {})[key] = gid
