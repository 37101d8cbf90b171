"""Exact activation patching of heads and MLPs, batched, from cached residuals.

Each patch replaces one node's activation in one run (the *base* run) by its value in
another (the *source*), and the effect is the task metric with the patch minus the
metric of the unpatched base run, averaged over prompts, each read at its own answer
position. The numbers equal TransformerLens 4.3's ``transformer_lens.patching`` (which
denoises: clean values into the corrupted run) to within 1e-4; ``tests/patching``
checks this on native and HF-wrapped models.

Speed comes from the functional forward in ``_forward``: many patches share one forward
pass (stacked along the batch), each starts at its own layer from the cached residual
stream, a patch at position ``p`` recomputes only positions ``>= p`` (keys and values
before ``p`` come from the cache), and only the answer position is unembedded. Models
that the functional forward cannot reproduce are patched through hooks on the bridge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from reuse_lens._memory import MemoryBudget, resolve_budget
from reuse_lens._progress import progress_bar
from reuse_lens._validate import check_pair
from reuse_lens.nodes import MLP, AttentionHead, Node, NodeNameError, shape_of
from reuse_lens.patching._common import (
    Engine,
    Prepared,
    parse_all,
    prepare,
    rows_per_chunk,
    zero_cache,
)
from reuse_lens.patching._experts import RoutingMode, check_routing
from reuse_lens.patching._forward import RunCache, Weights
from reuse_lens.patching._hooks import HookSources, check_pattern_edits, hook_logits
from reuse_lens.patching.experts import expert_activation_patching
from reuse_lens.patching.scores import NodeScores

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.nodes import Ablation
    from reuse_lens.tasks.metrics import Metric
    from reuse_lens.tasks.task import Task

__all__ = ["Component", "Direction", "activation_patching"]

Component = Literal["out", "q", "k", "v", "pattern"]
"""What of a head is patched: its output (``hook_z`` through ``W_O``), q, k, v or pattern."""

Direction = Literal["noising", "denoising"]
"""noising: source values into the clean run; denoising: clean values into the corrupted run."""

_COMPONENTS = ("out", "q", "k", "v", "pattern")
_ABLATIONS = ("resample", "mean", "zero")


@dataclass(frozen=True)
class Group:
    """Patches that share a layer, a first patched position and a kind.

    ``heads`` is None for the MLP of ``layer``. ``pos0`` is the first position any patch
    in the group changes; ``all_pos`` says whether every position from there on is
    patched (all-position patching, ``pos0 == 0``) or only ``pos0`` itself.
    """

    layer: int
    heads: tuple[int, ...] | None
    pos0: int
    all_pos: bool
    prompts: Tensor


@dataclass
class Rows:
    """One chunk of a group: row ``i`` patches variant ``variant[i]`` of prompt ``prompt[i]``."""

    group: Group
    prompt: Int[Tensor, " rows"]
    variant: Int[Tensor, " rows"]

    @property
    def head(self) -> Tensor:
        assert self.group.heads is not None
        heads = torch.tensor(self.group.heads, device=self.prompt.device)
        return heads[self.variant]


def activation_patching(
    model: TransformerBridge,
    task: Task,
    *,
    nodes: Literal["all", "heads", "mlps"] | Sequence[str | Node] = "all",
    ablation: Ablation = "resample",
    direction: Direction = "noising",
    per_position: bool = False,
    component: Component = "out",
    metric: str | Metric | None = None,
    batch_size: int | None = None,
    engine: Engine = "auto",
    memory_budget: MemoryBudget = None,
    experts: bool = False,
    routing: RoutingMode = "frozen",
) -> NodeScores:
    """Patch each node's activation and measure how the task metric moves.

    Arguments:
        model: the model, a ``TransformerBridge``.
        task: the prompts; the model must read its token ids as the task's words.
        nodes: ``"all"``, ``"heads"``, ``"mlps"`` or a list of node names (``"a1.h3"``,
            ``"m2"``). With a q/k/v/pattern ``component``, ``"all"`` patches only heads.
        ablation: what replaces the activation in noising. ``resample``: the corrupted
            partner's activation. ``mean``: the mean over the task's clean prompts,
            position by position; at a position beyond a shorter prompt's end, only the
            prompts that reach that position are averaged (padding never enters a mean).
            ``zero``: zero.
        direction: ``noising`` patches the ablated value into the clean run; ``denoising``
            patches the clean value into the corrupted run (TransformerLens's
            convention; it needs ``ablation="resample"``).
        per_position: also patch each position on its own; fills ``heads_by_pos`` and
            ``mlps_by_pos``. A prompt without a real token at a position (it is shorter)
            contributes an effect of 0 there.
        component: for heads, ``out`` (``hook_z`` through ``W_O``), ``q``, ``k``, ``v`` or
            ``pattern`` (per position: the pattern row of that query position, as in
            TransformerLens's ``..._pattern_by_pos``). MLPs have only ``out``.
        metric: a metric name or ``Metric``; the task's own metric when None.
        batch_size: (patch, prompt) rows per forward pass; by default as many as fit in
            the memory budget.
        engine: ``auto`` (the fast functional forward where it reproduces the model's
            logits, else hooks), ``functional`` (refused, with the reason, where it does
            not) or ``hooks`` (TransformerLens's ``run_with_hooks``); the results agree.
        memory_budget: bytes (or a size such as ``"2GiB"``) the cached runs and each
            chunk of rows may hold on top of the weights; by default
            ``REUSE_LENS_MEMORY_BUDGET``, else 2 GiB on the CPU and half the free memory
            of a GPU (docs/scale.md). Chunking never changes the scores.
        experts: make each expert of a mixture-of-experts MLP a node (``m3.e5``,
            ``m3.shared``) in place of the whole MLP; ``nodes="mlps"`` then means the
            experts and any dense MLPs. Noising, ``component="out"``, all positions,
            through hooks (docs/models.md, "Experts as nodes").
        routing: with ``experts``, ``frozen`` (the default) keeps each prompt's clean
            routing in every patched run; ``recompute`` lets the router see the patch.

    Returns:
        ``NodeScores`` with ``method="activation"``. ``heads``/``mlps`` hold
        metric(patched) − metric(unpatched base run), averaged over prompts, with NaN for
        nodes not patched; ``clean``/``corrupted`` are the unpatched metrics.

    Raises:
        NodeNameError: for node names the model lacks (all of them are named).
        ValueError: for an unknown option, a non-out component on an MLP, or denoising
            with an ablation other than resample.
        MetricError: if the metric returns NaN or infinity.
        TaskError: if the task was built for another vocabulary.
        PatternEditsDropped: for ``component="pattern"`` on architectures where
            TransformerLens drops edits of ``hook_pattern`` (OPT, GPT-J, GPT-Neo).
        UnsupportedArchitectureError: for a model without fixed attention heads (Mamba,
            hybrids, a mixture of attention heads, latent attention; `arch.support`).
    """
    check_pair(model, task)  # a spec string or a list is named here, not deep inside
    if component not in _COMPONENTS:
        raise ValueError(f"unknown component {component!r}: choose one of {_COMPONENTS}")
    if ablation not in _ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}: choose one of {_ABLATIONS}")
    if direction not in ("noising", "denoising"):
        raise ValueError(f"unknown direction {direction!r}: choose 'noising' or 'denoising'")
    if direction == "denoising" and ablation != "resample":
        raise ValueError(
            f"denoising patches the clean run's activations into the corrupted run, so it "
            f"takes no ablation; got ablation={ablation!r}. Use ablation='resample'."
        )
    check_routing(routing)
    if experts:
        _check_expert_options(direction, per_position, component, engine)
        return expert_activation_patching(
            model,
            task,
            nodes=nodes,
            ablation=ablation,
            routing=routing,
            metric=metric,
            batch_size=batch_size,
            memory_budget=memory_budget,
        )
    return _activation_patching(
        model,
        task,
        nodes,
        ablation,
        direction,
        per_position,
        component,
        metric,
        batch_size,
        engine=engine,
        memory_budget=memory_budget,
    )


def _activation_patching(
    model: TransformerBridge,
    task: Task,
    nodes: str | Sequence[str | Node],
    ablation: str,
    direction: str,
    per_position: bool,
    component: str,
    metric: str | Metric | None,
    batch_size: int | None,
    *,
    engine: Engine = "auto",
    memory_budget: MemoryBudget = None,
    prep: Prepared | None = None,
) -> NodeScores:
    """``activation_patching`` after its options are checked; ``prep``, a preparation of
    the same call (``Prepared.renewed``), spares the bridge's forward passes."""
    heads, mlps = select_nodes(model, nodes, component)
    budget = resolve_budget(memory_budget, model.cfg.device)
    if prep is None:
        prep = prepare(model, task, metric, engine=engine, budget=budget)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    shape = shape_of(model)
    width = int(prep.clean.shape[1])
    kinds: list[tuple[int, tuple[int, ...] | None]] = []
    for layer in range(n_layers):
        layer_heads = tuple(h.head for h in heads if h.layer == layer)
        if layer_heads:
            kinds.append((layer, layer_heads))
        if any(m.layer == layer for m in mlps):
            kinds.append((layer, None))
    # A mean is over every prompt, whichever part of the call is being patched.
    mean: RunCache | HookSources | None = None
    if ablation == "mean" and prep.weights is not None:
        mean = prep.mean_run(prep.answer_pos + 1)
    elif ablation == "mean":
        mean = HookSources.mean(model, prep.clean_parts(prep.answer_pos + 1), component)
    # Held throughout: the functional weights, and the runs (hooks: TransformerLens's
    # caches) of every prompt or of the part at hand.
    limit = rows_per_chunk(model, width, batch_size, budget, held=prep.held_bytes)
    spans = prep.spans()
    plans = [
        list(_chunks(_groups(prep, span, kinds, ablation, per_position), limit)) for span in spans
    ]

    head_sum = torch.zeros(n_layers, n_heads)
    mlp_sum = torch.zeros(n_layers)
    head_pos = torch.zeros(width, n_layers, n_heads) if per_position else None
    mlp_pos = torch.zeros(width, n_layers) if per_position else None
    n_chunks = sum(len(chunks) for chunks in plans)
    with progress_bar(desc="activation patching", total=n_chunks, show_from=20) as bar:
        for part, chunks in zip(prep.parts(), plans, strict=True):
            patcher = _engine(part, ablation, direction, component, mean)
            for rows in chunks:
                effect = (patcher.metric(rows) - patcher.base_metric[rows.prompt]).cpu()
                group = rows.group
                n_variants = 1 if group.heads is None else len(group.heads)
                totals = torch.zeros(n_variants).index_add_(0, rows.variant.cpu(), effect)
                if group.heads is None:
                    target = mlp_sum if group.all_pos else mlp_pos
                    assert target is not None
                    index = (group.layer,) if group.all_pos else (group.pos0, group.layer)
                    target[index] += totals[0]
                else:
                    target = head_sum if group.all_pos else head_pos
                    assert target is not None
                    at = target[group.layer] if group.all_pos else target[group.pos0, group.layer]
                    at[list(group.heads)] += totals
                bar.update()
            del patcher  # this part's runs go before the next part's are computed
            part.runs.clear()

    nan_heads = torch.full((n_layers, n_heads), float("nan"))
    head_scores = nan_heads.clone()
    for h in heads:
        head_scores[h.layer, h.head] = head_sum[h.layer, h.head] / prep.n
    mlp_scores = torch.full((n_layers,), float("nan")) if shape.has_mlps else None
    if mlp_scores is not None:
        for m in mlps:
            mlp_scores[m.layer] = mlp_sum[m.layer] / prep.n
    heads_by_pos = mlps_by_pos = None
    if per_position:
        assert head_pos is not None and mlp_pos is not None
        patched_heads = ~torch.isnan(head_scores)
        heads_by_pos = torch.where(patched_heads, head_pos / prep.n, float("nan"))
        if mlp_scores is not None:
            mlps_by_pos = torch.where(~torch.isnan(mlp_scores), mlp_pos / prep.n, float("nan"))
    return NodeScores(
        heads=head_scores,
        mlps=mlp_scores,
        clean=float(prep.clean_metric.mean()),
        corrupted=float(prep.corrupted_metric.mean()),
        method="activation",
        heads_by_pos=heads_by_pos,
        mlps_by_pos=mlps_by_pos,
        settings={
            "nodes": nodes if isinstance(nodes, str) else [str(n) for n in nodes],
            "ablation": ablation,
            "direction": direction,
            "per_position": per_position,
            "component": component,
            "metric": getattr(prep.metric, "name", repr(prep.metric)),
            "mean_over": "clean prompts" if ablation == "mean" else None,
            "engine": "functional" if prep.weights is not None else "hooks",
            "fallback_reason": prep.fallback_reason,
            "n_prompts": prep.n,
        },
    )


def _check_expert_options(direction: str, per_position: bool, component: str, engine: str) -> None:
    """Refuse, naming it, an option that expert nodes do not take."""
    asked = {
        "direction='denoising'": direction == "denoising",
        "per_position=True": per_position,
        f"component={component!r}": component != "out",
        "engine='functional'": engine == "functional",
    }
    refused = [name for name, bad in asked.items() if bad]
    if refused:
        raise ValueError(
            f"experts=True patches each node's output at every position in the noising "
            f"direction, through hooks; it does not take {', '.join(refused)}. Drop "
            "experts=True for those options (each MLP is then one node)."
        )


def select_nodes(
    model: TransformerBridge,
    nodes: str | Sequence[str | Node],
    component: str,
) -> tuple[list[AttentionHead], list[MLP]]:
    """Split ``nodes`` into the heads and MLPs of ``model`` to patch, checking every name."""
    shape = shape_of(model)
    if isinstance(nodes, str):
        if nodes not in ("all", "heads", "mlps"):
            parsed = parse_all([nodes], shape)
        else:
            every = shape.nodes()
            parsed = [
                n
                for n in every
                if nodes == "all"
                or (nodes == "heads" and isinstance(n, AttentionHead))
                or (nodes == "mlps" and isinstance(n, MLP))
            ]
            if nodes == "all" and component != "out":
                parsed = [n for n in parsed if isinstance(n, AttentionHead)]
            if nodes == "mlps" and not shape.has_mlps:
                raise NodeNameError("nodes='mlps' but the model is attention-only")
    else:
        parsed = parse_all(list(nodes), shape)
    mlps = [n for n in parsed if isinstance(n, MLP)]
    if mlps and component != "out":
        raise ValueError(
            f"component={component!r} applies to heads only; MLPs ({', '.join(m.name for m in mlps)}) "
            "can only be patched at their output (component='out')"
        )
    return [n for n in parsed if isinstance(n, AttentionHead)], mlps


def _groups(
    prep: Prepared,
    span: slice,
    kinds: list[tuple[int, tuple[int, ...] | None]],
    ablation: str,
    per_position: bool,
) -> list[Group]:
    """The patches of one part of the call (the prompts of ``span``, numbered from 0)."""
    part = prep.select(span)
    lengths = part.answer_pos + 1
    first = _first_difference(part, ablation)
    groups = [
        Group(layer, kind, pos0, True, bucket)
        for pos0, bucket in _buckets(first, lengths)
        for layer, kind in kinds
    ]
    if per_position:
        everyone = torch.arange(part.n, device=part.clean.device)
        for pos in range(int(part.clean.shape[1])):
            # Prompts without a token at pos, or whose patch there is a no-op, add 0.
            reach = everyone[(lengths > pos) & (first <= pos)]
            if len(reach):
                groups.extend(Group(layer, kind, pos, False, reach) for layer, kind in kinds)
    return groups


def _first_difference(prep: Prepared, ablation: str) -> Int[Tensor, " batch"]:
    """The first position at which each prompt's patch can change anything.

    With resampling, clean and corrupted prompts that agree on tokens ``0..p`` have equal
    activations at every position up to ``p`` (causal attention), so a patch there is a
    no-op: the run before the first differing token is reused instead of recomputed. A
    prompt with no differing token gets its length (all its effects are exactly 0).
    """
    lengths = prep.answer_pos + 1
    if ablation != "resample":
        return torch.zeros_like(lengths)
    width = prep.clean.shape[1]
    differs = (prep.clean != prep.corrupted) & (
        torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    )
    index = torch.where(differs, torch.arange(width, device=lengths.device), width)
    return torch.minimum(index.min(1).values, lengths)


def _buckets(
    first: Int[Tensor, " batch"], lengths: Int[Tensor, " batch"], min_prompts: int = 4
) -> list[tuple[int, Tensor]]:
    """Prompts grouped by where their patches start, each group starting at its minimum.

    Groups of fewer than ``min_prompts`` prompts are merged into the next, so that the
    batched forward passes stay large enough to be efficient.
    """
    keep = (first < lengths).nonzero().flatten()
    order = keep[torch.argsort(first[keep], stable=True)]
    out: list[tuple[int, Tensor]] = []
    current: list[int] = []
    for i, prompt in enumerate(order.tolist()):
        current.append(prompt)
        last = i == len(order) - 1
        if last or (len(current) >= min_prompts and first[order[i + 1]] != first[prompt]):
            chosen = torch.tensor(current, device=first.device)
            out.append((int(first[chosen].min()), chosen))
            current = []
    return out


def _chunks(groups: list[Group], limit: int) -> Iterator[Rows]:
    for group in groups:
        n_variants = 1 if group.heads is None else len(group.heads)
        device = group.prompts.device
        variant = torch.arange(n_variants, device=device).repeat_interleave(len(group.prompts))
        prompt = group.prompts.repeat(n_variants)
        for start in range(0, len(prompt), limit):
            yield Rows(group, prompt[start : start + limit], variant[start : start + limit])


# ---- engines --------------------------------------------------------------------------------


class _Engine:
    """Computes the metric of each patched row; the base run's metric per prompt."""

    base_metric: Tensor

    def metric(self, rows: Rows) -> Tensor:
        raise NotImplementedError


def _engine(
    prep: Prepared,
    ablation: str,
    direction: str,
    component: str,
    mean: RunCache | HookSources | None,
) -> _Engine:
    """The engine of one part of the call; ``mean`` is a mean ablation's source, taken
    over every prompt of the call (a run for the functional engine, hook values else)."""
    base_tokens = prep.clean if direction == "noising" else prep.corrupted
    if prep.weights is not None:
        assert mean is None or isinstance(mean, RunCache)
        return _FunctionalEngine(
            prep, prep.weights, base_tokens, ablation, direction, component, mean
        )
    assert mean is None or isinstance(mean, HookSources)
    return _HookEngine(prep, base_tokens, ablation, direction, component, mean)


class _FunctionalEngine(_Engine):
    def __init__(
        self,
        prep: Prepared,
        weights: Weights,
        base_tokens: Tensor,
        ablation: str,
        direction: str,
        component: str,
        mean: RunCache | None,
    ) -> None:
        self.prep, self.w, self.component = prep, weights, component
        with torch.no_grad():
            base_name, other_name = ("clean", "corrupted")[:: 1 if direction == "noising" else -1]
            self.base = prep.run(base_name)
            if ablation == "resample":
                self.source = prep.run(other_name)
            elif ablation == "mean":
                assert mean is not None
                self.source = mean
            else:
                self.source = zero_cache(self.base)
            every = torch.arange(prep.n, device=base_tokens.device)
            self.base_metric = prep.score(
                weights.logits(self.base.final[every, prep.answer_pos]), every
            )
        self.shared_source = self.source.final.shape[0] == 1

    @torch.no_grad()
    def metric(self, rows: Rows) -> Tensor:
        group, w = rows.group, self.w
        prompt = rows.prompt
        source = torch.zeros_like(prompt) if self.shared_source else prompt
        answer = self.prep.answer_pos[prompt]
        if group.layer == w.n_layers - 1 and group.heads is not None and self.component == "out":
            final = self._last_layer_out(rows, source, answer)
        else:
            resid = patched_block(
                w, self.base, self.source, group, prompt, source, rows, self.component
            )
            final = w.tail(resid, group.layer + 1, group.pos0, self.base, prompt, answer)
        return self.prep.score(w.logits(final), prompt)

    def _last_layer_out(
        self, rows: Rows, source: Tensor, answer: Int[Tensor, " rows"]
    ) -> Float[Tensor, "rows d_model"]:
        """A last-layer head's output patch: only the answer position reaches the logits."""
        w, layer, prompt = self.w, rows.group.layer, rows.prompt
        patched = torch.nn.functional.one_hot(rows.head, w.n_heads).bool()
        if not rows.group.all_pos:
            patched = patched & (answer == rows.group.pos0).unsqueeze(1)
        z_base = self.base.z[layer][prompt, answer]
        z = torch.where(patched.unsqueeze(-1), self.source.z[layer][source, answer], z_base)
        resid_pre = self.base.resid_pre[layer][prompt, answer]
        resid_mid = resid_pre + w.attn_out(layer, z)
        if w.parallel:
            return resid_mid + self.base.mlp_out[layer][prompt, answer]
        return resid_mid + w.mlp_out(layer, resid_mid)


def _mask(rows: Rows, n_heads: int, n_pos: int, first_only: bool) -> Tensor:
    """(rows, pos, head) bool: the patched head of each row, at the patched positions."""
    heads = torch.nn.functional.one_hot(rows.head, n_heads).bool()
    pos = torch.ones(n_pos, dtype=torch.bool, device=heads.device)
    if first_only:
        pos = torch.zeros_like(pos)
        pos[0] = True
    return heads.unsqueeze(1) & pos.view(1, -1, 1)


def patched_block(
    w: Weights,
    base: RunCache,
    source: RunCache,
    group: Group,
    prompt: Tensor,
    src: Tensor,
    rows: Rows,
    component: str,
) -> Tensor:
    """The residual stream after block ``group.layer`` with each row's patch applied.

    Returns positions ``group.pos0..`` only, shape (rows, pos - pos0, d_model).
    """
    layer, p0 = group.layer, group.pos0
    first_only = not group.all_pos
    # A per-position patch of a head's output, q or pattern row, or of an MLP, changes only
    # position p0 within its own block: the later positions keep the base run's residual.
    local = first_only and (group.heads is None or component in ("out", "q", "pattern"))
    stop = p0 + 1 if local else None
    if group.heads is None:  # the MLP: its output replaced, nothing else in the block moves
        mlp_base = base.mlp_out[layer][prompt, p0:stop]
        mlp_src = source.mlp_out[layer][src, p0:stop]
        if first_only:
            mlp_src = torch.cat([mlp_src[:, :1], mlp_base[:, 1:]], dim=1)
        resid = base.resid_mid[layer][prompt, p0:stop] + mlp_src
        return _rejoin(w, base, layer, prompt, resid, stop)
    resid_pre = base.resid_pre[layer][prompt, p0:stop]
    n_heads = w.n_heads
    if component == "out":
        z_base = base.z[layer][prompt, p0:stop]
        mask = _mask(rows, n_heads, z_base.shape[1], first_only).unsqueeze(-1)
        z = torch.where(mask, source.z[layer][src, p0:stop], z_base)
    elif component == "pattern":
        pat_base = base.pattern[layer][prompt][:, :, p0:stop]
        mask = _mask(rows, n_heads, pat_base.shape[2], first_only).transpose(1, 2).unsqueeze(-1)
        pattern = torch.where(mask, source.pattern[layer][src][:, :, p0:stop], pat_base)
        z = w.mix(pattern, base.v[layer][prompt])
    else:
        q = base.q[layer][prompt, p0:stop]
        k, v = base.k[layer][prompt], base.v[layer][prompt]
        if component == "q":
            mask = _mask(rows, n_heads, q.shape[1], first_only).unsqueeze(-1)
            q = torch.where(mask, source.q[layer][src, p0:stop], q)
        else:
            # k and v at positions >= p0 (all positions when p0 == 0) are replaced.
            full = torch.zeros(k.shape[1], dtype=torch.bool, device=k.device)
            full[p0:] = True
            if first_only:
                full[p0 + 1 :] = False
            mask = (
                torch.nn.functional.one_hot(rows.head, n_heads).bool().unsqueeze(1)
                & full.view(1, -1, 1)
            ).unsqueeze(-1)
            if component == "k":
                k = torch.where(mask, source.k[layer][src], k)
            else:
                v = torch.where(mask, source.v[layer][src], v)
        q_pos = torch.arange(p0, p0 + q.shape[1], device=q.device)
        z = w.mix(w.pattern(q, k, q_pos, layer), v)
    resid_mid = resid_pre + w.attn_out(layer, z)
    # A parallel block's MLP reads resid_pre, which no head patch changes.
    mlp = base.mlp_out[layer][prompt, p0:stop] if w.parallel else w.mlp_out(layer, resid_mid)
    return _rejoin(w, base, layer, prompt, resid_mid + mlp, stop)


def _rejoin(
    w: Weights, base: RunCache, layer: int, prompt: Tensor, resid: Tensor, stop: int | None
) -> Tensor:
    """Append the base run's residual after block ``layer`` at positions ``stop..``."""
    if stop is None:
        return resid
    after = base.resid_pre[layer + 1] if layer + 1 < w.n_layers else base.final
    return torch.cat([resid, after[prompt, stop:]], dim=1)


class _HookEngine(_Engine):
    """Patching through ``run_with_hooks`` on the bridge, for models ``_forward`` lacks."""

    def __init__(
        self,
        prep: Prepared,
        base_tokens: Tensor,
        ablation: str,
        direction: str,
        component: str,
        mean: HookSources | None,
    ) -> None:
        self.prep, self.base_tokens, self.component = prep, base_tokens, component
        if component == "pattern":
            check_pattern_edits(prep.model, "activation_patching(component='pattern')")
        if ablation == "mean":
            assert mean is not None
            self.sources = mean
        else:
            other = prep.corrupted if direction == "noising" else prep.clean
            clean_run = base_tokens if direction == "noising" else prep.clean
            self.sources = HookSources.build(
                prep.model, other, clean_run, prep.answer_pos + 1, ablation, component
            )
        every = torch.arange(prep.n, device=base_tokens.device)
        with torch.no_grad():
            logits = prep.model(base_tokens, return_type="logits")
        self.base_metric = prep.score(logits[every, prep.answer_pos].float(), every)

    @torch.no_grad()
    def metric(self, rows: Rows) -> Tensor:
        group = rows.group
        head = None if group.heads is None else rows.head
        logits = hook_logits(
            self.prep.model,
            self.base_tokens[rows.prompt],
            self.prep.answer_pos[rows.prompt],
            self.sources,
            layer=group.layer,
            component="mlp" if group.heads is None else self.component,
            head=head,
            pos0=group.pos0,
            first_only=not group.all_pos,
            prompt=rows.prompt,
        )
        return self.prep.score(logits, rows.prompt)
