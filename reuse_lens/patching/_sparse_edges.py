"""The sparse edge forward: many ablated edge circuits at once, each sender computed once
per class of circuits that give it the same inputs.

An edge circuit keeps some (sender, receiver) edges. ``sparse_edge_logits`` builds every
receiver input from the stream with every sender ablated plus the (current − ablated)
output of each sender whose edge is kept (Hanna et al. 2024; MIB), so a circuit computes
only the senders it keeps an edge out of, and only at the positions its readers read. A
sender's output depends only on which edges into it a circuit keeps and on those edges'
senders' outputs, so circuits that agree on that share it: each is computed once per
class. A ``SenderMemo`` carries the classes from one call to the next: the prefixes of a
ranking, evaluated batch after batch by the automatic size rule, recompute only the
senders downstream of the edges each prefix adds. ``_circuit_forward`` holds the node
circuits and the dense edge forward it is checked against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from reuse_lens.nodes import LOGITS, MLP, ModelShape
from reuse_lens.patching._circuit_forward import (
    Sources,
    sparse_nodes_supported,
)
from reuse_lens.patching._forward import Weights, _norm
from reuse_lens.patching.graph import GraphIndex

__all__ = ["SenderMemo", "sparse_edge_logits", "sparse_edges_supported"]

PartKey = tuple[int, int, bool, bytes]
"""A head's projected input: (layer, part: 0 q, 1 k, 2 v, at every position or at the
answer alone, the head and what its column reads, as bytes)."""


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
    (``_EdgePass.ablated_streams``), the same for every circuit; ``parts`` the projected
    q, k and v inputs of the held heads' classes (``parts_of``), which the next
    prefix's classes of those heads mostly read again (``_EdgePass._projections``).
    """

    limit: int | None = None
    classes: dict[int, dict[bytes, int]] = field(default_factory=dict)
    rows: Tensor | None = None
    row_of: dict[int, int] = field(default_factory=dict)
    next_id: int = 0
    streams: tuple[list[Tensor], list[Tensor], Tensor] | None = None
    key_of: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    parts: dict[PartKey, Tensor] = field(default_factory=dict)
    parts_of: dict[int, tuple[PartKey, ...]] = field(default_factory=dict)

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
        run.heads(layer, heads_base[layer])
        if w.has_mlps:
            run.mlp(layer, mlp_base[layer])
    _carry(memo, run.bank, run.ids[-1], run.parts, run.parts_of)
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
        self.parts, self.parts_of = dict(memo.parts), dict(memo.parts_of)
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

    def heads(self, layer: int, base: Float[Tensor, "prompt pos d_model"]) -> None:
        """Compute the classes of the layer's heads new to the memo, from their q, k and v
        inputs: the classes of all its heads together (a layer's heads read none of each
        other), those read at every position, then those read at the answer alone.

        A class differs from another of its head by the edges into one of its inputs more
        often than by all three (an edge added into a query leaves the keys and values
        as they were), so each distinct input of a head is normed and projected once
        (``_projections``), whichever classes read it.
        """
        layout, w = self.layout, self.w
        start, visible = layout.first_column[layer], layout.heads_visible[layer]
        found: list[tuple[bool, int, list[int], Tensor]] = []
        for head in range(w.n_heads):
            slot = layout.first_head[layer] + head
            if not self.wanted[slot]:
                continue
            columns = [start + part * w.n_heads + head for part in range(3)]
            classes = _classify(self.memo, self.keep, self.ids, self.full, slot, columns, visible)
            found += [(whole, head, gids, keys) for whole, gids, keys in classes.split()]
        if not found:
            return
        heads = torch.tensor([h for _, h, ids, _ in found for _ in ids], device=base.device)
        keys = torch.cat([keys for *_, keys in found])
        whole = torch.tensor([f for f, _, ids, _ in found for _ in ids], device=base.device)
        k, k_keys = self._projections(layer, base, heads, keys[:, :, 1], 1)
        v, v_keys = self._projections(layer, base, heads, keys[:, :, 2], 2)
        gids = [gid for *_, ids, _ in found for gid in ids]
        for full in (True, False):
            picked = torch.nonzero(whole == full).flatten()
            if len(picked) == 0:
                continue
            at = None if full else self.at
            q, q_keys = self._projections(layer, base, heads[picked], keys[picked, :, 0], 0, at)
            delta = self._heads_delta(layer, heads[picked], q, k[picked], v[picked], full)
            for i, (index, row) in enumerate(zip(picked.tolist(), delta, strict=True)):
                self.bank.put(gids[index], row if full else row[:, 0], at)
                self.parts_of[gids[index]] = (q_keys[i], k_keys[index], v_keys[index])

    def _projections(
        self,
        layer: int,
        base: Float[Tensor, "prompt pos d_model"],
        heads: Int[Tensor, " cls"],
        reads: Int[Tensor, "cls visible"],
        part: int,
        at: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Float[Tensor, "cls prompt q_pos d_head"], list[PartKey]]:
        """Part ``part`` (0 q, 1 k, 2 v) of each class's head, projected from what the
        class's column reads (``reads``: per visible sender, 0 or 1 + its class), at
        every position or at the answer positions ``at``, before any q/k norm or rotary;
        with each class's key of it. Each distinct (head, reads) is normed and projected
        once, and not at all where this call or the memo has it already."""
        w = self.w
        weights = w.layers[layer]
        distinct, inverse = torch.unique(
            torch.cat([heads.unsqueeze(1), reads], 1), dim=0, return_inverse=True
        )
        keys: list[PartKey] = [
            (layer, part, at is None, row.tobytes()) for row in distinct.cpu().numpy()
        ]
        new = [u for u, key in enumerate(keys) if key not in self.parts]
        if new:
            fresh = distinct[torch.tensor(new, device=distinct.device)]
            head, columns = fresh[:, 0], fresh[:, 1:].unsqueeze(2)
            x = _gather(base if at is None else base[at], self.bank, columns, at)[:, 0]
            name = "qkv"[part]
            mats = getattr(weights, f"w_{name}").view(-1, w.n_heads, w.d_head)[:, head]
            bias = getattr(weights, f"b_{name}").view(w.n_heads, w.d_head)[head]
            normed = _norm(x, weights.ln1)
            out = torch.matmul(normed.flatten(1, -2), mats.movedim(1, 0)) + bias.unsqueeze(1)
            out = out.view(len(new), x.shape[1], -1, w.d_head)
            self.parts.update((keys[u], projected) for u, projected in zip(new, out, strict=True))
        projected = torch.stack([self.parts[key] for key in keys])
        return projected[inverse], [keys[u] for u in inverse.tolist()]

    def _heads_delta(
        self,
        layer: int,
        heads: Int[Tensor, " cls"],
        q: Float[Tensor, "cls prompt q_pos d_head"],
        k: Float[Tensor, "cls prompt pos d_head"],
        v: Float[Tensor, "cls prompt pos d_head"],
        whole: bool,
    ) -> Float[Tensor, "cls prompt q_pos d_model"]:
        """Each class's current − ablated head output (of head ``heads[c]``) from its
        projected q, k and v: at every position (``whole``), or at each prompt's answer,
        where its query is read alone. A layer with attention sinks (GPT-OSS), a logit
        per head, attends a head at a time."""
        w, weights = self.w, self.w.layers[layer]
        n, prompts = q.shape[:2]
        if whole:
            q_pos = torch.arange(q.shape[2], device=q.device)
        else:
            q_pos = self.answer.repeat(n).unsqueeze(-1)
        positions = torch.arange(k.shape[2], device=k.device)
        q = w._qk_post(layer, q.flatten(0, 1).unsqueeze(2), weights.q_norm, q_pos)
        k = w._qk_post(layer, k.flatten(0, 1).unsqueeze(2), weights.k_norm, positions)
        v = v.flatten(0, 1).unsqueeze(2)
        if weights.sinks is None:
            z = w.mix(w.pattern(q, k, q_pos, layer), v)
        else:
            z = q.new_empty(q.shape)
            rows = heads.repeat_interleave(prompts)
            for head in heads.unique().tolist():
                at = torch.nonzero(rows == head).flatten()
                pos = q_pos if whole else q_pos[at]
                one = torch.tensor([head], device=q.device)
                z[at] = w.mix(w.pattern(q[at], k[at], pos, layer, one), v[at])
        z = z.unflatten(0, (n, prompts))  # (cls, prompt, q_pos, 1, d_head)
        w_o = weights.w_o.view(w.n_heads, w.d_head, -1)[heads]
        current = torch.matmul(z.flatten(1, 3), w_o).view(n, prompts, z.shape[2], -1)
        ablated_z = self.shared(self.src.z[layer])[:, :, heads]  # (src, pos, cls, d_head)
        if not whole:
            ablated_z = self.answer_of(ablated_z).unsqueeze(1)
        ablated = torch.matmul(ablated_z.movedim(2, 0).flatten(1, 2), w_o)
        return current - ablated.view(n, *ablated_z.shape[:2], -1)

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


def _carry(
    memo: SenderMemo,
    bank: _Bank,
    last: Int[Tensor, " sender"],
    parts: dict[PartKey, Tensor],
    parts_of: dict[int, tuple[PartKey, ...]],
) -> None:
    """Hold the last circuit's classes for the next call, and forget the others: in the
    bank's own buffer where it fits in ``memo.limit``, else as many as fit, in sender
    order, copied out; and its heads' projected inputs, where they fit beside them."""
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
    memo.parts_of = {g: parts_of[g] for g in kept if g in parts_of}
    needed = {key for keys in memo.parts_of.values() for key in keys}
    size = sum(parts[key].nbytes for key in needed)
    room = None if memo.limit is None else memo.limit - memo.rows.nbytes
    if room is not None and size > room:
        memo.parts, memo.parts_of = {}, {}
    else:  # the new ones copied: a view would hold its whole batch of projections
        held = memo.parts
        memo.parts = {key: held[key] if key in held else parts[key].clone() for key in needed}
