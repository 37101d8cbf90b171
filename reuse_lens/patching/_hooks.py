"""Patching through hooks on the bridge: the fallback for models ``_forward`` cannot run.

Every patched row is a full forward pass of the bridge (``run_with_hooks``), with many
rows stacked along the batch. It is slower than the functional engine but works on any
architecture whose hook points have the classic shapes; a hook point with another shape
(e.g. k/v of grouped-query attention) is refused with a clear error.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from reuse_lens.nodes import architecture
from reuse_lens.patching._common import masked_means

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = [
    "HookSources",
    "PatternEditsDropped",
    "check_pattern_edits",
    "head_hook_name",
    "hook_logits",
    "hook_name",
    "whole_projection_qk_norm",
]

_HEAD_HOOKS = {
    "out": "hook_z",
    "q": "hook_q",
    "k": "hook_k",
    "v": "hook_v",
    "pattern": "hook_pattern",
}


def hook_name(layer: int, component: str) -> str:
    """The bridge hook that holds ``component`` (``out``/``q``/``k``/``v``/``pattern``/``mlp``)."""
    if component == "mlp":
        return f"blocks.{layer}.hook_mlp_out"
    return f"blocks.{layer}.attn.{_HEAD_HOOKS[component]}"


def whole_projection_qk_norm(model: TransformerBridge) -> bool:
    """Whether q and k are normalised over every head's channels at once (OLMo-2, OLMo-3,
    OLMoE), not head by head (Qwen3, Gemma-3): the norm's weight spans the projection."""
    norm = getattr(model.blocks[0].attn, "q_norm", None)
    weight = getattr(getattr(norm, "original_component", norm), "weight", None)
    return isinstance(weight, Tensor) and weight.numel() > int(model.cfg.d_head)


def head_hook_name(model: TransformerBridge, layer: int, component: str) -> str:
    """The hook that holds ``component`` of each head of ``layer`` on this model.

    ``hook_name``'s, except for q and k under a q/k norm over the whole projection: there
    ``hook_q``/``hook_k`` lie in front of the norm, whose one statistic over every head
    would carry a patch of one head's slice into the others. docs/models.md defines head
    i's q as the normed projection of head i's own input, read at head i; patching it is
    patching the normed (and rotated) q, ``hook_rot_q``, position by position. That is
    the q the functional engine caches.
    """
    if component in ("q", "k") and whole_projection_qk_norm(model):
        return f"blocks.{layer}.attn.hook_rot_{component}"
    return hook_name(layer, component)


class PatternEditsDropped(NotImplementedError):
    """TransformerLens ignores edits of ``hook_pattern`` on this model's architecture."""


_PATTERN_EDITS_REACH: weakref.WeakKeyDictionary[TransformerBridge, bool] = (
    weakref.WeakKeyDictionary()
)
"""Per model: whether an edit of ``blocks.0.attn.hook_pattern`` changes its logits."""


@torch.no_grad()
def pattern_edits_reach_logits(model: TransformerBridge) -> bool:
    """Whether editing ``hook_pattern`` changes the model's output (tested once per model).

    TransformerLens 4.3 computes attention inside some HF modules (OPT, GPT-J, GPT-Neo)
    and only *reports* the pattern at ``hook_pattern``: a hook there runs, but what it
    returns is thrown away. The test makes every head of layer 0 attend to the first
    token only, on a few tokens, and compares the logits with the unedited run's.
    """
    known = _PATTERN_EDITS_REACH.get(model)
    if known is not None:
        return known
    device = torch.device(model.cfg.device or "cpu")
    width = 4
    tokens = (torch.arange(1, width + 1, device=device) % int(model.cfg.d_vocab)).unsqueeze(0)

    def first_token_only(pattern: Tensor, hook: object) -> Tensor:
        del hook
        edited = torch.zeros_like(pattern)
        edited[..., 0] = 1.0
        return edited

    plain = model(tokens, return_type="logits")
    with warnings.catch_warnings():
        # TransformerLens warns that the edit is discarded; the refusal below says so.
        warnings.simplefilter("ignore", UserWarning)
        edited = model.run_with_hooks(
            tokens,
            fwd_hooks=[("blocks.0.attn.hook_pattern", first_token_only)],
            return_type="logits",
        )
    reaches = not torch.equal(plain, edited)
    _PATTERN_EDITS_REACH[model] = reaches
    return reaches


def check_pattern_edits(model: TransformerBridge, what: str) -> None:
    """Refuse ``what`` (an edit of attention patterns) where the edit would be dropped.

    Raises:
        PatternEditsDropped: naming the architecture and what to patch instead.
    """
    if pattern_edits_reach_logits(model):
        return
    raise PatternEditsDropped(
        f"{what} edits attention patterns, but on architecture {architecture(model)} "
        "TransformerLens drops edits of hook_pattern (it reads the pattern out of the HF "
        "attention module and never feeds it back), so every result would be zero or "
        "unchanged. Patch the heads' output instead (component='out', i.e. hook_z), or "
        "their q, k or v."
    )


@dataclass
class HookSources:
    """Source activations by hook name, batch-first; a batch of one is shared by all rows."""

    values: dict[str, Tensor]
    shared: bool

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: TransformerBridge,
        other: Int[Tensor, "batch pos"],
        clean: Int[Tensor, "batch pos"],
        lengths: Int[Tensor, " batch"],
        ablation: str,
        component: str,
        *,
        extra: tuple[str, ...] = (),
    ) -> HookSources:
        """Sources for ``component`` of every head, every MLP's output and the hook points
        named in ``extra``, from the corrupted run (``resample``), or as a batch of one."""
        if ablation == "mean":
            return cls.mean(model, [(clean, lengths)], component, extra=extra)
        values = _cached(model, other if ablation == "resample" else clean, component, extra)
        if ablation == "resample":
            return cls(values, shared=False)
        return cls({k: torch.zeros_like(v[:1]) for k, v in values.items()}, shared=True)

    @classmethod
    @torch.no_grad()
    def mean(
        cls,
        model: TransformerBridge,
        prompts: Iterable[tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]],
        component: str,
        *,
        extra: tuple[str, ...] = (),
    ) -> HookSources:
        """Mean-ablation sources over every prompt of ``prompts`` (clean tokens with their
        lengths: all of them at once, or a call's parts one at a time), as a batch of one;
        summed in float32, kept in the model's dtype (``masked_means``)."""
        pieces = (
            (list(_cached(model, tokens, component, extra).items()), lengths)
            for tokens, lengths in prompts
        )
        return cls(dict(masked_means(pieces)), shared=True)


def _cached(
    model: TransformerBridge, tokens: Tensor, component: str, extra: tuple[str, ...]
) -> dict[str, Tensor]:
    """``component`` of every head, every MLP's output and ``extra``, in one run of ``tokens``."""
    n_layers = int(model.cfg.n_layers)
    names = [head_hook_name(model, layer, component) for layer in range(n_layers)]
    if not getattr(model.cfg, "attn_only", False):
        names += [hook_name(layer, "mlp") for layer in range(n_layers)]
    names += extra
    names_set = set(names)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names_set)
    return {name: cache[name] for name in names}


def hook_logits(
    model: TransformerBridge,
    tokens: Int[Tensor, "rows pos"],
    answer_pos: Int[Tensor, " rows"],
    sources: HookSources,
    *,
    layer: int,
    component: str,
    head: Int[Tensor, " rows"] | None,
    pos0: int,
    first_only: bool,
    prompt: Int[Tensor, " rows"],
) -> Float[Tensor, "rows d_vocab"]:
    """Answer-position logits of ``tokens`` with each row's patch applied through a hook.

    Row ``i`` replaces head ``head[i]`` (or the MLP when ``head`` is None) of ``layer`` at
    positions ``pos0..`` (only ``pos0`` when ``first_only``) by the source value of prompt
    ``prompt[i]``.
    """
    name = (
        head_hook_name(model, layer, component) if component != "mlp" else hook_name(layer, "mlp")
    )
    source = sources.values[name]
    index = torch.zeros_like(prompt) if sources.shared else prompt
    n_heads = int(model.cfg.n_heads)
    # Hook names are captured here, not read from ``hook.name`` (the bridge's internal name).

    def patch(act: Tensor, hook: object) -> Tensor:
        src = source[index]
        if src.shape[1:] != act.shape[1:]:
            raise ValueError(
                f"cannot patch component {component!r} on this model: {name} has shape "
                f"{tuple(act.shape)}, the source {tuple(src.shape)}"
            )
        pos_axis = 2 if component == "pattern" else 1
        width = act.shape[pos_axis]
        positions = torch.zeros(width, dtype=torch.bool, device=act.device)
        positions[pos0 : pos0 + 1 if first_only else width] = True
        if head is None:
            mask = positions.view(1, -1, 1)
        else:
            if act.shape[2 if component != "pattern" else 1] != n_heads:
                raise ValueError(
                    f"cannot patch component {component!r} of single heads on this model: "
                    f"{name} has {act.shape[2]} key/value heads shared by {n_heads} query "
                    "heads (grouped-query attention), so one query head's k or v cannot be "
                    "patched there alone. Patch component 'out' or 'q', or use path_patching "
                    "with receiver_input='k' or 'v', which gives each query head its own input"
                )
            heads = torch.nn.functional.one_hot(head, n_heads).bool()
            if component == "pattern":
                mask = (heads.view(-1, n_heads, 1) & positions.view(1, 1, -1)).unsqueeze(-1)
            else:
                mask = (heads.unsqueeze(1) & positions.view(1, -1, 1)).unsqueeze(-1)
        return torch.where(mask, src, act)

    logits = model.run_with_hooks(tokens, fwd_hooks=[(name, patch)], return_type="logits")
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return logits[rows, answer_pos].float()
