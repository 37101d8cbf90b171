"""Path patching (Wang et al. 2022; Merullo et al. 2024): a sender's effect through receivers.

For each sender (a head or an MLP), in the clean run:

1. the sender's output takes its value from the corrupted run;
2. every other head is held at its clean value (and every MLP too with ``freeze_mlps``),
   so the change can reach the receivers only directly, or through MLPs;
3. the receivers' inputs are recorded;
4. a fresh clean run gets those inputs patched in, and the metric is measured.

The effect is metric(step 4) − metric(clean run), averaged over prompts, each read at its
own answer position. With ``receivers="logits"`` the receiver is the residual stream at
the end of the model (the direct path to the unembedding), so step 4 is the unembedding.

A head receiver's input is recorded as its q, k or v vector (``hook_q``/``hook_k``/
``hook_v``). That equals patching the residual stream that feeds only that head's q, k or
v input (TransformerLens's ``use_split_qkv_input``), because LayerNorm and ``W_Q`` act on
that head's copy alone; native bridges cannot enable split inputs, and their
``hook_attn_scores`` edits are dropped, so q/k/v are the hook points that work everywhere.
Under grouped-query attention each query head still has its own k and v input, the
semantics of TransformerLens's ``ungroup_grouped_query_attention``: a receiver's recorded
k is its kv head's, read from the sender-patched run, and it reaches that query head alone.

Steps 1 to 3 involve no attention (every head but the sender is frozen), so they are
position-wise: the fast version runs them on the patched positions only (on the answer
position alone for ``receivers="logits"``), batched over senders and prompts, from the
cached clean residual stream at the sender's layer. Step 4 starts at the first receiver
layer after the sender.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool
from torch import Tensor

from reuse_lens._memory import MemoryBudget, resolve_budget
from reuse_lens._progress import progress_bar
from reuse_lens._validate import check_pair
from reuse_lens.nodes import MLP, AttentionHead, Node, NodeNameError, parse_nodes, shape_of
from reuse_lens.patching._common import Engine, Prepared, prepare, rows_per_chunk
from reuse_lens.patching._forward import RunCache, Weights
from reuse_lens.patching._hooks import head_hook_name, hook_name
from reuse_lens.patching.scores import NodeScores

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.tasks.metrics import Metric
    from reuse_lens.tasks.task import Task

__all__ = ["path_patching"]

_INPUT_NAMES = {"q": "q", "k": "k", "v": "v"}


def path_patching(
    model: TransformerBridge,
    task: Task,
    *,
    senders: Sequence[str | Node] | None = None,
    receivers: Literal["logits", "resid"] | Sequence[str | AttentionHead] = "logits",
    receiver_input: str = "qkv",
    freeze_mlps: bool = False,
    positions: Literal["answer"] | Sequence[int] | None = None,
    metric: str | Metric | None = None,
    batch_size: int | None = None,
    engine: Engine = "auto",
    memory_budget: MemoryBudget = None,
) -> NodeScores:
    """The effect of each sender that flows only through the receivers.

    Arguments:
        model: the model, a ``TransformerBridge``.
        task: the prompts; senders are patched from the corrupted partner (resample).
        senders: node names; by default every head and MLP upstream of the receivers
            (for head receivers: in a layer before the last receiver's).
        receivers: ``"logits"`` (the final residual stream at the answer position, i.e.
            the direct path to the unembedding), ``"resid"`` (the same), or a list of head
            names.
        receiver_input: which inputs of head receivers are patched: any non-empty subset
            of ``"qkv"``, e.g. ``"q"``, ``"kv"``.
        freeze_mlps: also hold every MLP at its clean value in step 2, so only direct
            head-to-receiver paths count.
        positions: where the sender is patched: None for every position, ``"answer"``
            for each prompt's answer position, or a list of absolute positions.
        metric: a metric name or ``Metric``; the task's own when None.
        batch_size: (sender, prompt) rows per forward pass; by default as many as fit in
            the memory budget.
        engine: ``auto``, ``functional`` or ``hooks``, as in ``activation_patching``.
        memory_budget: as in ``activation_patching``: a chunk holds as many (sender,
            prompt) rows as fit, down to one prompt of one sender.

    Returns:
        ``NodeScores`` with ``method="path"``: metric(patched) − metric(clean) per sender,
        NaN for nodes that were not senders.

    Raises:
        NodeNameError: for unknown sender or receiver names.
        ValueError: for a bad ``receiver_input`` or ``positions``, or an MLP receiver.
    """
    check_pair(model, task)  # a spec string or a list is named here, not deep inside
    shape = shape_of(model)
    recv = _receivers(receivers, shape)
    inputs = _receiver_inputs(receiver_input) if recv else ()
    if senders is None:
        last = shape.n_layers if not recv else max(h.layer for h in recv)
        chosen = [n for n in shape.nodes() if n.layer < last]
    else:
        chosen = parse_nodes(list(senders), shape)
    budget = resolve_budget(memory_budget, model.cfg.device)
    prep = prepare(model, task, metric, engine=engine, budget=budget)
    mask = _position_mask(positions, prep)
    # The runs (hooks: TransformerLens's caches) of every prompt, or of one part of them,
    # are held throughout; each chunk is a forward pass.
    limit = rows_per_chunk(model, prep.clean.shape[1], batch_size, budget, held=prep.held_bytes)
    if prep.weights is None:
        effects = _path_hooks(prep, chosen, recv, inputs, freeze_mlps, mask, limit)
    else:
        effects = _path_functional(
            prep, prep.weights, chosen, recv, inputs, freeze_mlps, mask, limit
        )
    heads = torch.full((shape.n_layers, shape.n_heads), float("nan"))
    mlps = torch.full((shape.n_layers,), float("nan")) if shape.has_mlps else None
    for node, value in effects.items():
        if isinstance(node, AttentionHead):
            heads[node.layer, node.head] = value
        elif mlps is not None:
            mlps[node.layer] = value
    return NodeScores(
        heads=heads,
        mlps=mlps,
        clean=float(prep.clean_metric.mean()),
        corrupted=float(prep.corrupted_metric.mean()),
        method="path",
        settings={
            "senders": None if senders is None else [str(s) for s in senders],
            "receivers": "logits" if not recv else [h.name for h in recv],
            "receiver_input": "".join(inputs) if recv else None,
            "freeze_mlps": freeze_mlps,
            "positions": positions
            if positions is None or isinstance(positions, str)
            else list(positions),
            "metric": getattr(prep.metric, "name", repr(prep.metric)),
            "engine": "functional" if prep.weights is not None else "hooks",
            "fallback_reason": prep.fallback_reason,
            "n_prompts": prep.n,
        },
    )


def _receivers(
    receivers: str | Sequence[str | AttentionHead], shape: object
) -> list[AttentionHead]:
    from reuse_lens.nodes import ModelShape

    assert isinstance(shape, ModelShape)
    if isinstance(receivers, str):
        if receivers in ("logits", "resid"):
            return []
        receivers = [receivers]
    parsed = parse_nodes(list(receivers), shape)
    mlps = [n.name for n in parsed if isinstance(n, MLP)]
    if mlps:
        raise NodeNameError(
            f"receivers must be heads (or 'logits'); got MLP(s) {mlps}. Patch an MLP's input "
            "effect through the heads after it instead."
        )
    if not parsed:
        raise ValueError("receivers is an empty list: give head names, or 'logits'")
    return sorted({n for n in parsed if isinstance(n, AttentionHead)})


def _receiver_inputs(receiver_input: str) -> tuple[str, ...]:
    letters = tuple(dict.fromkeys(receiver_input))
    if not letters or any(c not in _INPUT_NAMES for c in letters):
        raise ValueError(
            f"receiver_input must be a non-empty subset of 'qkv' (e.g. 'q', 'kv'), got "
            f"{receiver_input!r}"
        )
    return letters


def _position_mask(
    positions: str | Sequence[int] | None, prep: Prepared
) -> Bool[Tensor, "batch pos"]:
    """(batch, pos) bool: where each prompt's sender is patched (real tokens only)."""
    width = prep.clean.shape[1]
    device = prep.clean.device
    index = torch.arange(width, device=device).unsqueeze(0)
    real = index <= prep.answer_pos.unsqueeze(1)
    if positions is None:
        return real.expand(prep.n, width).clone()
    if isinstance(positions, str):
        if positions != "answer":
            raise ValueError(
                f"positions must be None, 'answer' or a list of ints, got {positions!r}"
            )
        return index == prep.answer_pos.unsqueeze(1)
    chosen = torch.zeros(width, dtype=torch.bool, device=device)
    for p in positions:
        if not isinstance(p, int) or not 0 <= p < width:
            raise ValueError(f"position {p!r} is outside the prompts (0 to {width - 1})")
        chosen[p] = True
    return chosen.unsqueeze(0) & real


# ---- the fast version -----------------------------------------------------------------------


def _path_functional(
    prep: Prepared,
    w: Weights,
    senders: list[Node],
    recv: list[AttentionHead],
    inputs: tuple[str, ...],
    freeze: bool,
    mask: Tensor,
    limit: int,
) -> dict[Node, float]:
    """Each sender's effect, ``limit`` (sender, prompt) rows per forward pass: several
    senders on every prompt, or, below one sender's prompts, one sender on a slice; one
    part of the call's prompts at a time (``Prepared.parts``)."""
    groups: list[tuple[int, list[Node]]] = []
    for layer in range(w.n_layers):
        heads: list[Node] = [
            s for s in senders if isinstance(s, AttentionHead) and s.layer == layer
        ]
        mlps: list[Node] = [s for s in senders if isinstance(s, MLP) and s.layer == layer]
        groups += [(layer, g) for g in (heads, mlps) if g]

    def plan(n: int) -> list[tuple[int, list[Node], Tensor]]:
        """The chunks of a part of ``n`` prompts: (layer, senders, prompts)."""
        every = torch.arange(n, device=prep.clean.device)
        per_chunk = max(1, limit // n)
        slices = [every[i : i + limit] for i in range(0, n, limit)] if limit < n else [every]
        return [
            (layer, g[i : i + per_chunk], rows)
            for layer, g in groups
            for i in range(0, len(g), per_chunk)
            for rows in slices
        ]

    spans = prep.spans()
    plans = [plan(span.stop - span.start) for span in spans]

    sums: dict[Node, float] = {}
    n_chunks = sum(len(chunks) for chunks in plans)
    with progress_bar(desc="path patching", total=n_chunks, show_from=20) as bar:
        for part, span, chunks in zip(prep.parts(), spans, plans, strict=True):
            with torch.no_grad():
                clean, corrupted = part.run("clean"), part.run("corrupted")
                every = torch.arange(part.n, device=part.clean.device)
                base = part.score(w.logits(clean.final[every, part.answer_pos]), every)
            for layer, nodes, prompts in chunks:
                n = len(nodes)
                prompt = prompts.repeat(n)
                with torch.no_grad():
                    values = _rows(
                        part, w, clean, corrupted, layer, nodes, prompt, recv, inputs, freeze,
                        mask[span],
                    )  # fmt: skip
                effect = (values - base[prompt]).view(n, len(prompts)).sum(1).cpu()
                for node, t in zip(nodes, effect.tolist(), strict=True):
                    sums[node] = sums.get(node, 0.0) + t
                bar.update()
            del clean, corrupted  # this part's runs go before the next part's are computed
            part.runs.clear()
    return {node: total / prep.n for node, total in sums.items()}


def _rows(
    prep: Prepared,
    w: Weights,
    clean: RunCache,
    corrupted: RunCache,
    layer: int,
    nodes: list[Node],
    prompt: Tensor,
    recv: list[AttentionHead],
    inputs: tuple[str, ...],
    freeze: bool,
    mask: Tensor,
) -> Tensor:
    """The metric after path-patching each row's sender (row = sender-major, prompt-minor)."""
    n_rows, width = len(prompt), prep.clean.shape[1]
    answer = prep.answer_pos[prompt]
    rows = torch.arange(n_rows, device=prompt.device)
    # Steps 1-3 are position-wise: the logits read only the answer position.
    idx = (
        answer.unsqueeze(1)
        if not recv
        else torch.arange(width, device=prompt.device).expand(n_rows, width)
    )

    def g(t: Tensor) -> Tensor:
        return t[prompt.unsqueeze(1), idx]

    patched = g(mask).unsqueeze(-1)
    if isinstance(nodes[0], AttentionHead):
        heads = torch.tensor([n.head for n in nodes if isinstance(n, AttentionHead)])
        one_hot = torch.nn.functional.one_hot(heads, w.n_heads).bool().to(prompt.device)
        one_hot = one_hot.repeat_interleave(n_rows // len(nodes), 0).view(n_rows, 1, -1, 1)
        z = torch.where(one_hot & patched.unsqueeze(-1), g(corrupted.z[layer]), g(clean.z[layer]))
        # The whole attention output is recomputed (not a per-head delta): a post-norm
        # (Gemma-2, OLMo-2) makes it non-linear in the heads.
        resid_pre = g(clean.resid_pre[layer])
        resid = resid_pre + w.attn_out(layer, z)
        mlp = g(clean.mlp_out[layer]) if freeze else w.mlp_out(layer, w.mlp_input(resid_pre, resid))
        resid = resid + mlp
    else:
        mlp = torch.where(patched, g(corrupted.mlp_out[layer]), g(clean.mlp_out[layer]))
        resid = g(clean.resid_mid[layer]) + mlp
    recorded: dict[tuple[int, int, str], Tensor] = {}
    last_receiver = max((h.layer for h in recv), default=w.n_layers)
    for later in range(layer + 1, w.n_layers):
        if later > last_receiver:  # nothing after the last receiver is recorded
            break
        here = [h for h in recv if h.layer == later]
        if here:
            q, k, v = w.qkv(later, resid)
            found = {"q": q, "k": k, "v": v}
            for h in here:
                for c in inputs:
                    recorded[(later, h.head, c)] = found[c][:, :, h.head]
        attn = g(clean.resid_mid[later]) - g(clean.resid_pre[later])  # heads frozen: clean
        mid = resid + attn
        # A parallel block's MLP reads resid_pre, not the (frozen) heads' output.
        mlp = g(clean.mlp_out[later]) if freeze else w.mlp_out(later, w.mlp_input(resid, mid))
        resid = mid + mlp
    if not recv:
        return prep.score(w.logits(resid[:, 0]), prompt)
    if not recorded:  # no receiver after the sender: nothing changes
        return prep.score(w.logits(clean.final[prompt, prep.answer_pos[prompt]]), prompt)
    first = min(key[0] for key in recorded)
    resid = clean.resid_pre[first][prompt]

    def receive(later: int):
        def edit(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            found = {"q": q, "k": k, "v": v}
            for (lay, head, c), value in recorded.items():
                if lay == later:
                    found[c][:, :, head] = value
            return found["q"], found["k"], found["v"]

        return edit

    for later in range(first, w.n_layers):
        resid = w.block(later, resid, edit_qkv=receive(later))
    return prep.score(w.logits(resid[rows, answer]), prompt)


# ---- the fallback: hooks on the bridge ------------------------------------------------------


def _path_hooks(
    prep: Prepared,
    senders: list[Node],
    recv: list[AttentionHead],
    inputs: tuple[str, ...],
    freeze: bool,
    mask: Tensor,
    limit: int,
) -> dict[Node, float]:
    """Path patching by ``run_with_hooks``, one sender at a time, ``limit`` prompts a pass;
    one part of the call's prompts at a time (``Prepared.parts``)."""
    model = prep.model
    group = int(model.cfg.n_heads) // int(model.cfg.n_key_value_heads or model.cfg.n_heads)
    n_layers = int(model.cfg.n_layers)
    # What _hook_rows reads of the clean and corrupted runs: every head's z, every MLP's output.
    names = {hook_name(layer, c) for layer in range(n_layers) for c in ("out", "mlp")}
    spans = prep.spans()
    sums: dict[Node, float] = {sender: 0.0 for sender in senders}
    with progress_bar(desc="path patching", total=len(senders) * len(spans), show_from=20) as bar:
        for part, span in zip(prep.parts(), spans, strict=True):
            every = torch.arange(part.n, device=part.clean.device)
            with torch.no_grad():
                _, clean = model.run_with_cache(part.clean, names_filter=names.__contains__)
                _, corrupted = model.run_with_cache(part.corrupted, names_filter=names.__contains__)
                logits = model(part.clean, return_type="logits")[every, part.answer_pos].float()
                base = part.score(logits, every)
            slices = [every[i : i + limit] for i in range(0, part.n, limit)]
            for sender in senders:
                for rows in slices:
                    values = _hook_rows(
                        part, clean, corrupted, sender, rows, recv, inputs, freeze, mask[span],
                        group,
                    )  # fmt: skip
                    sums[sender] += float((values - base[rows]).sum())
                bar.update()
            del clean, corrupted  # this part's caches go before the next part's are made
    return {sender: total / prep.n for sender, total in sums.items()}


def _hook_rows(
    prep: Prepared,
    clean: Any,
    corrupted: Any,
    sender: Node,
    part: Tensor,
    recv: list[AttentionHead],
    inputs: tuple[str, ...],
    freeze: bool,
    mask: Tensor,
    group: int,
) -> Tensor:
    """The metric of prompts ``part`` with ``sender`` path-patched, through hooks."""
    model = prep.model
    n_layers = int(model.cfg.n_layers)
    has_mlps = not getattr(model.cfg, "attn_only", False)
    # What the unembedding reads: the final residual stream after any final norm, which
    # the answer's logits are a function of position by position. (Not the last block's
    # hook_resid_post: the post-LN original GPT's blocks never fire it.)
    final_name = "unembed.hook_in"
    tokens, where = prep.clean[part], mask[part].unsqueeze(-1)
    hooks: list[Any] = []
    for layer in range(n_layers):
        name = hook_name(layer, "out")
        value = clean[name][part].clone()
        if isinstance(sender, AttentionHead) and sender.layer == layer:
            value[:, :, sender.head] = torch.where(
                where, corrupted[name][part][:, :, sender.head], value[:, :, sender.head]
            )
        hooks.append((name, _setter(value)))
        if has_mlps:
            mlp_name = hook_name(layer, "mlp")
            if isinstance(sender, MLP) and sender.layer == layer:
                mlp_value = torch.where(where, corrupted[mlp_name][part], clean[mlp_name][part])
                hooks.append((mlp_name, _setter(mlp_value)))
            elif freeze:
                hooks.append((mlp_name, _setter(clean[mlp_name][part])))
    record_names = [head_hook_name(model, h.layer, c) for h in recv for c in inputs] or [final_name]
    store: dict[str, Tensor] = {}
    hooks += [(name, _recorder(store, name)) for name in record_names]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks)
        if not recv:
            patch_hooks: list[Any] = [(final_name, _setter(store[final_name]))]
        elif group > 1 and {"k", "v"} & set(inputs):
            patch_hooks = _grouped_receivers(model, tokens, store, recv, inputs, group)
        else:
            # Only the receivers' slices are replaced; other heads of their layers run
            # on, and see what earlier receivers changed.
            patch_hooks = [
                (name, _head_setter(store[name], h.head))
                for h in recv
                for c in inputs
                for name in [head_hook_name(model, h.layer, c)]
            ]
        out = model.run_with_hooks(tokens, fwd_hooks=patch_hooks)
    rows = torch.arange(len(part), device=part.device)
    return prep.score(out[rows, prep.answer_pos[part]].float(), part)


def _grouped_receivers(
    model: TransformerBridge,
    clean: Tensor,
    store: dict[str, Tensor],
    recv: list[AttentionHead],
    inputs: tuple[str, ...],
    group: int,
) -> list[Any]:
    """Hooks that give each receiver head its recorded inputs under grouped-query attention.

    Under GQA ``hook_k``/``hook_v`` hold one key/value head per ``group`` query heads, so
    patching a receiver's k or v there would also change the other query heads of its
    group (and, for a head number above the kv heads, index past the end). Each query
    head has its own k and v input (TransformerLens's ``ungroup_grouped_query_attention``),
    so receivers are handled layer by layer: a run patches the receivers' q and their kv
    groups, and keeps only the receivers' outputs (``hook_z``); later passes and the final
    run set those outputs, so siblings in a group stay as in the clean run.
    """
    fixed: list[Any] = []
    for layer in sorted({h.layer for h in recv}):
        here = [h for h in recv if h.layer == layer]
        hooks = list(fixed)
        for c in inputs:
            name = head_hook_name(model, layer, c)
            slots = sorted({h.head if c == "q" else h.head // group for h in here})
            hooks += [(name, _head_setter(store[name], slot)) for slot in slots]
        z_name = hook_name(layer, "out")
        seen: dict[str, Tensor] = {}
        hooks.append((z_name, _recorder(seen, z_name)))
        model.run_with_hooks(clean, fwd_hooks=hooks, stop_at_layer=layer + 1)
        fixed += [(z_name, _head_setter(seen[z_name], h.head)) for h in here]
    return fixed


def _setter(value: Tensor):
    def hook(act: Tensor, hook: object) -> Tensor:
        return value

    return hook


def _head_setter(value: Tensor, head: int):
    def hook(act: Tensor, hook: object) -> Tensor:
        act = act.clone()
        act[:, :, head] = value[:, :, head]
        return act

    return hook


def _recorder(store: dict[str, Tensor], name: str):
    # The name is captured here: inside a hook, ``hook.name`` is the bridge's own name.
    def hook(act: Tensor, hook: object) -> None:
        store[name] = act.detach().clone()

    return hook
