"""Cross-model activation patching (CMAP; Prakash et al. 2024, "Fine-Tuning Enhances
Existing Mechanisms"): which components carry what a fine-tune gained?

Both models read the same clean prompts. ``cross_model_patching`` patches one node's
output from the *source* model's run into the *target* model's run, one node at a time,
and reports the fraction of the gap between the two models' task metric that the patch
closes::

    recovery(node) = (m(target with node from source) - m(target)) / (m(source) - m(target))

With ``direction="tuned_into_base"`` (the default) the target is the base model, so a
node's recovery is the share of the fine-tune's gain that its new output alone brings
back. ``"base_into_tuned"`` patches the other way: the share of the gain a node's old
output takes away. A head's output is its own term z_h · W_O,h of the attention sum
(read before any post-norm, as everywhere in reuse_lens), so a patch carries both the
new attention and the new W_O; an MLP's output is what it adds to the residual stream.
Everything else in the target keeps its own weights and recomputes from the patched
residual stream, as in ordinary activation patching.

``cross_model_recovery`` patches a set of nodes at once: e.g. the fine-tune's circuit,
or every head and MLP (which recovers the whole gain when only heads and MLPs changed).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from reuse_lens._memory import MemoryBudget, resolve_budget
from reuse_lens._progress import progress_bar
from reuse_lens.compare._model_pair import ModelPairError, check_pair_of_models, label
from reuse_lens.nodes import MLP, AttentionHead, ModelShape
from reuse_lens.patching._common import (
    ENGINES,
    Engine,
    Prepared,
    paired_parts,
    prepare,
    rows_per_chunk,
)
from reuse_lens.patching.activation import select_nodes
from reuse_lens.patching.scores import NodeScores
from reuse_lens.tasks.metrics import MetricError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.nodes import Node
    from reuse_lens.patching._forward import Weights
    from reuse_lens.tasks.metrics import Metric
    from reuse_lens.tasks.task import Task

__all__ = [
    "DIRECTIONS",
    "SWAPPABLE",
    "CrossModelDirection",
    "Swappable",
    "cross_model_patching",
    "cross_model_recovery",
]

CrossModelDirection = Literal["tuned_into_base", "base_into_tuned"]
"""Which model's node outputs go into which model's run."""

Swappable = Literal["embed", "unembed", "norms"]
"""Weights no node holds, which ``cross_model_recovery`` can also take from the source:
``embed`` the token and position embeddings (the input side of tied embeddings);
``unembed`` the unembedding and its bias (the readout side); ``norms`` every norm and each
layer's attention output bias."""

SWAPPABLE: tuple[str, ...] = ("embed", "unembed", "norms")

DIRECTIONS: tuple[str, ...] = ("tuned_into_base", "base_into_tuned")
_BOOTSTRAP = 2000


def cross_model_patching(
    base: TransformerBridge,
    tuned: TransformerBridge,
    task: Task,
    *,
    nodes: Literal["all", "heads", "mlps"] | Sequence[str | Node] = "all",
    direction: CrossModelDirection = "tuned_into_base",
    per_position: bool = False,
    normalize: bool = True,
    metric: str | Metric | None = None,
    engine: Engine = "auto",
    memory_budget: MemoryBudget = None,
) -> NodeScores:
    """Patch each node's output from one model into the other; the share of the gap closed.

    Arguments:
        base: the model before fine-tuning.
        tuned: the fine-tuned model (same architecture, shape and vocabulary).
        task: the prompts; both models run its clean prompts.
        nodes: ``"all"``, ``"heads"``, ``"mlps"`` or a list of node names.
        direction: ``"tuned_into_base"`` (each node's fine-tuned output into the base's
            run) or ``"base_into_tuned"``.
        per_position: also patch each position on its own (``heads_by_pos``/``mlps_by_pos``).
        normalize: divide each effect by the gap m(source) − m(target), so that 1 means
            the node alone closes it; False gives the raw metric effects.
        metric: a metric name or ``Metric``; the task's own when None.
        engine: ``auto`` (the functional forward where it reproduces both models, else
            hooks), ``functional`` or ``hooks``; the results agree.
        memory_budget: bytes (or ``"2GiB"``) the runs and chunks may hold (docs/scale.md).

    Returns:
        ``NodeScores`` with ``method="cmap"``: per node the recovered share of the gap (or
        the raw effect); ``clean`` is the source model's metric, ``corrupted`` the
        target's, and ``settings["gain"]`` their difference with its 95% bootstrap
        interval over prompts.

    Raises:
        ModelPairError: for models of different architecture, shape or size.
        MetricError: with ``normalize``, when the two models' metrics do not differ
            beyond chance (there is no gain to recover): the message gives the numbers.
        TaskError: for a task built for another vocabulary.
    """
    target, source, prep_t, prep_s, shape = _prepare(
        base, tuned, task, direction, metric, engine, memory_budget
    )
    heads, mlps = select_nodes(target, nodes, "out")
    gap, interval = _gap(prep_t, prep_s, task.name, need=normalize)
    budget = resolve_budget(memory_budget, target.cfg.device)
    width = int(prep_t.clean.shape[1])
    limit = rows_per_chunk(target, width, None, budget, held=prep_t.held_bytes + prep_s.held_bytes)
    sums = _Sums(shape, width, per_position)
    functional = prep_t.weights is not None and prep_s.weights is not None
    n_parts = max(len(prep_t.spans()), len(prep_s.spans()))
    targets = [(h.layer, h.head) for h in heads] + [(m.layer, None) for m in mlps]
    total = n_parts * len(targets) * (1 + (width if per_position else 0))
    with progress_bar(desc="cross-model patching", total=total, show_from=50) as bar:
        for part_t, part_s in paired_parts(prep_t, prep_s):
            patcher = _Functional(part_t, part_s) if functional else _Hooks(part_t, part_s)
            for layer, head in targets:
                for pos0, local, prompts in _position_groups(part_t, per_position):
                    for start in range(0, len(prompts), limit):
                        chunk = prompts[start : start + limit]
                        effect = patcher.effect(layer, head, chunk, pos0, local)
                        sums.add(layer, head, pos0, local, float(effect.sum()))
                    bar.update()
    scale = prep_t.n * (gap if normalize else 1.0)
    head_scores, mlp_scores, heads_by_pos, mlps_by_pos = sums.scores(heads, mlps, scale)
    return NodeScores(
        heads=head_scores,
        mlps=mlp_scores,
        clean=float(prep_s.clean_metric.mean()),
        corrupted=float(prep_t.clean_metric.mean()),
        method="cmap",
        heads_by_pos=heads_by_pos,
        mlps_by_pos=mlps_by_pos,
        settings={
            "direction": direction,
            "source": label(source),
            "target": label(target),
            "normalize": normalize,
            "gain": gap,
            "gain_interval": list(interval),
            "nodes": nodes if isinstance(nodes, str) else [str(n) for n in nodes],
            "per_position": per_position,
            "metric": getattr(prep_t.metric, "name", repr(prep_t.metric)),
            "engine": "functional" if functional else "hooks",
            "fallback_reason": prep_t.fallback_reason or prep_s.fallback_reason,
            "n_prompts": prep_t.n,
        },
    )


def cross_model_recovery(
    base: TransformerBridge,
    tuned: TransformerBridge,
    task: Task,
    nodes: Sequence[str | Node],
    *,
    weights: Sequence[Swappable] = (),
    direction: CrossModelDirection = "tuned_into_base",
    metric: str | Metric | None = None,
    engine: Engine = "auto",
    memory_budget: MemoryBudget = None,
) -> float:
    """The share of the gap closed by patching every node of ``nodes`` at once.

    Arguments are those of ``cross_model_patching``; ``nodes`` is a list of node names
    (e.g. ``sorted(circuit.nodes)``). Each patched node takes its output from the source
    model's own run; every other node recomputes in the target. ``weights`` also takes
    weights that no node holds from the source (``Swappable``): with every node and all
    three, the target computes exactly what the source does (recovery 1); with none and
    ``("unembed",)``, the share of the gain that the source's readout alone carries.

    Returns:
        (m(target with the nodes from source) − m(target)) / (m(source) − m(target)).
    """
    if isinstance(weights, str) or any(w not in SWAPPABLE for w in weights):
        raise ValueError(f"weights must be a list of {SWAPPABLE}, got {weights!r}")
    target, _, prep_t, prep_s, _ = _prepare(
        base, tuned, task, direction, metric, engine, memory_budget
    )
    heads, mlps = select_nodes(target, list(nodes), "out")
    gap, _ = _gap(prep_t, prep_s, task.name, need=True)
    functional = prep_t.weights is not None and prep_s.weights is not None
    if weights and not functional:
        raise ValueError(
            f"weights={list(weights)!r} needs the functional engine, which does not cover "
            f"this model ({prep_t.fallback_reason or prep_s.fallback_reason}); patch nodes only"
        )
    total = 0.0
    for part_t, part_s in paired_parts(prep_t, prep_s):
        if functional:
            total += float(_Functional(part_t, part_s).joint(heads, mlps, weights).sum())
        else:
            total += float(_Hooks(part_t, part_s).joint(heads, mlps).sum())
    return total / (prep_t.n * gap)


# ---- set-up ----------------------------------------------------------------------------------


def _prepare(
    base: TransformerBridge,
    tuned: TransformerBridge,
    task: Task,
    direction: str,
    metric: str | Metric | None,
    engine: Engine,
    memory_budget: MemoryBudget,
) -> tuple[TransformerBridge, TransformerBridge, Prepared, Prepared, ModelShape]:
    base_model, tuned_model, shape = check_pair_of_models(base, tuned)
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}: choose one of {DIRECTIONS}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    target, source = (
        (base_model, tuned_model) if direction == "tuned_into_base" else (tuned_model, base_model)
    )
    budget = resolve_budget(memory_budget, target.cfg.device)
    # The two models' runs share the budget.
    prep_t = prepare(target, task, metric, engine=engine, budget=budget // 2)
    prep_s = prepare(source, task, metric, engine=engine, budget=budget // 2)
    if (prep_t.weights is None) != (prep_s.weights is None):
        # Both on one engine: the functional forward where it reproduces both models.
        prep_t = prepare(target, task, metric, engine="hooks", budget=budget // 2)
        prep_s = prepare(source, task, metric, engine="hooks", budget=budget // 2)
    if prep_t.weights is None:
        sum_hook(target)
        sum_hook(source)
    return target, source, prep_t, prep_s, shape


def _gap(
    prep_t: Prepared, prep_s: Prepared, task: str, *, need: bool
) -> tuple[float, tuple[float, float]]:
    """m(source) − m(target) over the prompts, with its 95% bootstrap interval.

    With ``need``, MetricError when the interval holds 0: a gap of chance size makes the
    recovered share a ratio of two noises, so no share is reported.
    """
    diff = (prep_s.clean_metric - prep_t.clean_metric).double().cpu()
    gap = float(diff.mean())
    generator = torch.Generator().manual_seed(0)
    draws = torch.randint(len(diff), (_BOOTSTRAP, len(diff)), generator=generator)
    means = diff[draws].mean(1)
    low, high = (
        float(x) for x in torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype))
    )
    if need and (low <= 0 <= high or gap == 0):
        raise MetricError(
            f"the two models do not differ on task {task!r} beyond chance: metric "
            f"{float(prep_s.clean_metric.mean()):.4g} ({label(prep_s.model)}) against "
            f"{float(prep_t.clean_metric.mean()):.4g} ({label(prep_t.model)}), a gap of "
            f"{gap:.4g} with 95% interval [{low:.4g}, {high:.4g}] over {len(diff)} prompts. "
            "There is no gain to recover: pass normalize=False for the raw effects."
        )
    return gap, (low, high)


def _position_groups(prep: Prepared, per_position: bool) -> list[tuple[int, bool, Tensor]]:
    """(pos0, local, prompts): every position at once, then each position alone."""
    everyone = torch.arange(prep.n, device=prep.clean.device)
    groups = [(0, False, everyone)]
    if per_position:
        for pos in range(int(prep.clean.shape[1])):
            reach = everyone[prep.answer_pos >= pos]
            if len(reach):
                groups.append((pos, True, reach))
    return groups


class _Sums:
    """Effects summed over prompts, per node and (per position) per position."""

    def __init__(self, shape: ModelShape, width: int, per_position: bool) -> None:
        self.heads = torch.zeros(shape.n_layers, shape.n_heads, dtype=torch.float64)
        self.mlps = torch.zeros(shape.n_layers, dtype=torch.float64)
        self.head_pos = torch.zeros(width, shape.n_layers, shape.n_heads, dtype=torch.float64)
        self.mlp_pos = torch.zeros(width, shape.n_layers, dtype=torch.float64)
        self.shape, self.per_position = shape, per_position

    def add(self, layer: int, head: int | None, pos: int, local: bool, value: float) -> None:
        if head is None:
            (self.mlp_pos[pos] if local else self.mlps)[layer] += value
        elif local:
            self.head_pos[pos, layer, head] += value
        else:
            self.heads[layer, head] += value

    def scores(
        self, heads: list[AttentionHead], mlps: list[MLP], scale: float
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        nan = float("nan")
        head_mask = torch.zeros(self.shape.n_layers, self.shape.n_heads, dtype=torch.bool)
        for h in heads:
            head_mask[h.layer, h.head] = True
        mlp_mask = torch.zeros(self.shape.n_layers, dtype=torch.bool)
        for m in mlps:
            mlp_mask[m.layer] = True
        head_scores = torch.where(head_mask, self.heads / scale, nan).float()
        mlp_scores = (
            torch.where(mlp_mask, self.mlps / scale, nan).float() if self.shape.has_mlps else None
        )
        if not self.per_position:
            return head_scores, mlp_scores, None, None
        by_pos = torch.where(head_mask, self.head_pos / scale, nan).float()
        mlp_by_pos = (
            torch.where(mlp_mask, self.mlp_pos / scale, nan).float()
            if self.shape.has_mlps
            else None
        )
        return head_scores, mlp_scores, by_pos, mlp_by_pos


# ---- the functional engine ---------------------------------------------------------------------


class _Functional:
    """Patches on the functional forward: the target's cached run, the source's node outputs."""

    def __init__(self, target: Prepared, source: Prepared) -> None:
        assert target.weights is not None and source.weights is not None
        self.prep, self.w, self.ws = target, target.weights, source.weights
        self.run, self.src = target.run("clean"), source.run("clean")
        self.base_metric = target.clean_metric

    @torch.no_grad()
    def effect(
        self, layer: int, head: int | None, prompts: Tensor, pos0: int, local: bool
    ) -> Float[Tensor, " rows"]:
        """metric(patched) − metric(target) of each prompt, one node patched at ``pos0..``
        (only ``pos0`` when ``local``)."""
        w, run, src = self.w, self.run, self.src
        stop = pos0 + 1 if local else None
        at = (prompts, slice(pos0, stop))
        if head is None:
            resid = run.resid_mid[layer][at] + src.mlp_out[layer][at]
        else:
            z = run.z[layer][at]
            delta = _one_head_out(self.ws, layer, src.z[layer][at], head) - _one_head_out(
                w, layer, z, head
            )
            resid_pre = run.resid_pre[layer][at]
            resid_mid = resid_pre + w.attn_out(layer, z, delta)
            # A parallel block's MLP reads resid_pre, which a head patch leaves alone.
            mlp = run.mlp_out[layer][at] if w.parallel else w.mlp_out(layer, resid_mid)
            resid = resid_mid + mlp
        if stop is not None:  # later positions of this block keep the target's residual
            after = run.resid_pre[layer + 1] if layer + 1 < w.n_layers else run.final
            resid = torch.cat([resid, after[prompts, stop:]], dim=1)
        answer = self.prep.answer_pos[prompts]
        final = w.tail(resid, layer + 1, pos0, run, prompts, answer)
        return self.prep.score(w.logits(final), prompts) - self.base_metric[prompts]

    @torch.no_grad()
    def joint(
        self, heads: list[AttentionHead], mlps: list[MLP], weights: Sequence[str] = ()
    ) -> Float[Tensor, " batch"]:
        """metric − metric(target) of each prompt with every node of the set patched, and
        the ``weights`` (``Swappable``) taken from the source."""
        w, src = _swapped(self.w, self.ws, weights), self.src
        every = torch.arange(self.prep.n, device=self.prep.clean.device)
        resid = w.embed(self.prep.clean)
        for layer in range(w.n_layers):
            chosen = [h.head for h in heads if h.layer == layer]
            q, k, v = w.qkv(layer, resid)
            z = w.mix(w.pattern(q, k, torch.arange(resid.shape[1], device=resid.device), layer), v)
            delta = None
            if chosen:
                index = torch.tensor(chosen, device=z.device)
                ours = w.head_out(layer, z)[:, :, index].sum(2)
                delta = self.ws.head_out(layer, src.z[layer])[:, :, index].sum(2) - ours
            resid_mid = resid + w.attn_out(layer, z, delta)
            if any(m.layer == layer for m in mlps):
                mlp = src.mlp_out[layer]
            else:
                mlp = w.mlp_out(layer, w.mlp_input(resid, resid_mid))
            resid = resid_mid + mlp
        final = resid[every, self.prep.answer_pos]
        return self.prep.score(w.logits(final), every) - self.base_metric


def _swapped(w: Weights, source: Weights, names: Sequence[str]) -> Weights:
    """The target's weights with the source's embeddings, unembedding or norms."""
    import dataclasses

    out = w
    if "embed" in names:
        out = dataclasses.replace(
            out, w_e=source.w_e, w_pos=source.w_pos, embed_norm=source.embed_norm
        )
    if "unembed" in names:
        out = dataclasses.replace(out, w_u=source.w_u, b_u=source.b_u)
    if "norms" in names:
        fields = ("ln1", "ln2", "attn_post", "mlp_post", "q_norm", "k_norm", "b_o")
        layers = [
            dataclasses.replace(mine, **{f: getattr(theirs, f) for f in fields})
            for mine, theirs in zip(out.layers, source.layers, strict=True)
        ]
        out = dataclasses.replace(out, layers=layers, ln_final=source.ln_final)
    return out


def _one_head_out(w: Weights, layer: int, z: Tensor, head: int) -> Tensor:
    """Head ``head``'s own output z_h · W_O,h, (rows, pos, d_model), from all heads' z."""
    w_o = w.layers[layer].w_o.view(w.n_heads, w.d_head, -1)[head]
    return z[:, :, head] @ w_o


# ---- the hook engine -------------------------------------------------------------------------


class _Hooks:
    """Patches through hooks on the target bridge, for models the functional forward lacks.

    A head's patch adds z_src,h · W_O,src,h − z_tgt,h · W_O,tgt,h to the hook that holds
    the heads' plain sum on this architecture (``sum_hook``: the output projection's own
    hook, before any post-norm or scale, or else ``hook_attn_out``).
    """

    def __init__(self, target: Prepared, source: Prepared) -> None:
        self.prep = target
        self.model = target.model
        self.target = _hook_cache(target)
        self.source = _hook_cache(source)
        self.w_o_t = _w_o(target.model)
        self.w_o_s = _w_o(source.model)
        self.base_metric = target.clean_metric
        self.sum_hook = sum_hook(target.model)

    def _delta(self, layer: int, head: int, prompts: Tensor) -> Tensor:
        z_s = self.source[f"blocks.{layer}.attn.hook_z"][prompts, :, head]
        z_t = self.target[f"blocks.{layer}.attn.hook_z"][prompts, :, head]
        return z_s @ self.w_o_s[layer][head] - z_t @ self.w_o_t[layer][head]

    @torch.no_grad()
    def effect(
        self, layer: int, head: int | None, prompts: Tensor, pos0: int, local: bool
    ) -> Float[Tensor, " rows"]:
        width = int(self.prep.clean.shape[1])
        positions = torch.zeros(width, dtype=torch.bool, device=prompts.device)
        positions[pos0 : pos0 + 1 if local else width] = True
        mask = positions.view(1, -1, 1)
        if head is None:
            name = f"blocks.{layer}.hook_mlp_out"
            new = self.source[name][prompts]
        else:
            name = self.sum_hook.format(layer=layer)
            new = self.target[name][prompts] + self._delta(layer, head, prompts)

        def patch(act: Tensor, hook: object) -> Tensor:
            return torch.where(mask, new.to(act.dtype), act)

        logits = self.model.run_with_hooks(
            self.prep.clean[prompts], fwd_hooks=[(name, patch)], return_type="logits"
        )
        rows = torch.arange(len(prompts), device=prompts.device)
        answer = self.prep.answer_pos[prompts]
        return self.prep.score(logits[rows, answer].float(), prompts) - self.base_metric[prompts]

    @torch.no_grad()
    def joint(self, heads: list[AttentionHead], mlps: list[MLP]) -> Float[Tensor, " batch"]:
        every = torch.arange(self.prep.n, device=self.prep.clean.device)
        hooks = []
        for layer in range(int(self.model.cfg.n_layers)):
            chosen = [h.head for h in heads if h.layer == layer]
            if chosen:
                # The patched heads' outputs are the source's; the others recompute.
                def attn(
                    act: Tensor, hook: object, layer: int = layer, chosen: list[int] = chosen
                ) -> Tensor:
                    z_now = self._z_now[layer]
                    delta = sum(
                        self.source[f"blocks.{layer}.attn.hook_z"][:, :, h] @ self.w_o_s[layer][h]
                        - z_now[:, :, h] @ self.w_o_t[layer][h]
                        for h in chosen
                    )
                    return act + delta

                def keep_z(act: Tensor, hook: object, layer: int = layer) -> Tensor:
                    self._z_now[layer] = act
                    return act

                hooks += [
                    (f"blocks.{layer}.attn.hook_z", keep_z),
                    (self.sum_hook.format(layer=layer), attn),
                ]
            if any(m.layer == layer for m in mlps):
                name = f"blocks.{layer}.hook_mlp_out"
                hooks.append((name, lambda act, hook, s=self.source[name]: s.to(act.dtype)))
        self._z_now: dict[int, Tensor] = {}
        logits = self.model.run_with_hooks(self.prep.clean, fwd_hooks=hooks, return_type="logits")
        final = logits[every, self.prep.answer_pos].float()
        return self.prep.score(final, every) - self.base_metric


def _hook_cache(prep: Prepared) -> dict[str, Tensor]:
    model = prep.model
    names = set()
    for layer in range(int(model.cfg.n_layers)):
        names |= {f"blocks.{layer}.attn.hook_z", sum_hook(model).format(layer=layer)}
        if not getattr(model.cfg, "attn_only", False):
            names.add(f"blocks.{layer}.hook_mlp_out")
    with torch.no_grad():
        _, cache = model.run_with_cache(prep.clean, names_filter=lambda n: n in names)
    return {name: cache[name] for name in names}


def _w_o(model: TransformerBridge) -> list[Float[Tensor, "head d_head d_model"]]:
    return [block.attn.W_O.detach() for block in model.blocks]  # type: ignore[union-attr]


_HOOK_SUM_ATOL = 1e-4
_SUM_HOOKS = ("blocks.{layer}.attn.o.hook_out", "blocks.{layer}.hook_attn_out")
"""Where the heads' outputs are summed, in order of preference: the output projection's
own hook (before Gemma-2's post-norm or Granite's residual multiplier), else the block's."""
_SUM_HOOK_OF: weakref.WeakKeyDictionary[TransformerBridge, str] = weakref.WeakKeyDictionary()


def sum_hook(model: TransformerBridge) -> str:
    """The hook name (with ``{layer}``) that holds Σ_h z_h · W_O,h + b_O on this model,
    checked once per model on a short run; ModelPairError, with the reason, where none
    does (a head's output cannot then be swapped through hooks)."""
    if model in _SUM_HOOK_OF:
        return _SUM_HOOK_OF[model]
    tokens = torch.zeros(1, 4, dtype=torch.long, device=model.cfg.device)
    candidates = [h for h in _SUM_HOOKS if h.format(layer=0) in model.hook_dict]
    names = {"blocks.0.attn.hook_z", *(h.format(layer=0) for h in candidates)}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        attn = model.blocks[0].attn  # type: ignore[index]
        total = torch.einsum("bphd,hdm->bpm", cache["blocks.0.attn.hook_z"], attn.W_O)
        bias = getattr(attn, "b_O", None)
        if bias is not None:
            total = total + bias
    errors = []
    for hook in candidates:
        found = cache[hook.format(layer=0)]
        error = float((total - found).abs().max())
        if math.isfinite(error) and error <= _HOOK_SUM_ATOL * max(1.0, float(found.abs().max())):
            _SUM_HOOK_OF[model] = hook
            return hook
        errors.append(f"{hook.format(layer=0)} off by {error:.3g}")
    raise ModelPairError(
        f"cross-model patching cannot run on {label(model)}: no architecture adapter covers "
        "it, and no hook holds the plain sum of its heads' outputs "
        f"({'; '.join(errors) or 'none of ' + ', '.join(_SUM_HOOKS)}), so one head's output "
        "cannot be swapped through hooks. An adapter in reuse_lens/arch makes it run on the "
        "functional engine."
    )
