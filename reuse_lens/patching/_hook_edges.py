"""Edge circuits through hooks on the bridge: the fallback for models ``_forward`` cannot run.

An edge circuit keeps some (sender → receiver input) edges; every receiver input is the
current residual stream plus, for each sender whose edge it drops, that sender's
(ablated − current) output (Hanna et al. 2024; MIB). Through hooks this needs:

- each head's own q, k and v input: TransformerLens's split q/k/v inputs
  (``set_use_split_qkv_input``), where ``hook_{q,k,v}_input`` hold one residual copy per
  head, in front of the head's norm;
- each MLP's own input: the MLP's norm is applied again, by the hook at ``mlp.hook_in``,
  to the residual entering it plus the dropped senders' deltas, so a norm that a parallel
  block shares between attention and MLP (GPT-J, Phi, Falcon, Cohere) is not moved for the
  heads;
- every sender's output as a separate term of the residual stream: a head's is
  ``z @ W_O`` (without ``b_O``, which belongs to no head), times the scalar that the block
  applies between the attention and the residual stream (Granite's
  ``residual_multiplier``), which ``head_output_scale`` measures once per model.

``edge_refusal`` says when one of these does not hold; the engines refuse then, naming the
architecture and the reason, instead of returning numbers that mean something else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from reuse_lens.nodes import LOGITS, MLP, architecture, shape_of
from reuse_lens.patching._hook_geometry import head_output_scale, post_ln
from reuse_lens.patching._hooks import HookSources, hook_name, whole_projection_qk_norm
from reuse_lens.patching._qk_norm_hooks import normed_hook, own_input_normed
from reuse_lens.patching.graph import GraphIndex

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["EDGE_INPUT_HOOK", "HookEdges", "edge_refusal", "mlp_norm"]

EDGE_INPUT_HOOK = "blocks.0.hook_resid_pre"
"""Token plus position embedding: the output of the ``input`` sender."""


def mlp_norm(model: TransformerBridge) -> str:
    """The norm in front of each MLP: ``ln2``; or ``ln1`` in a parallel block that shares
    one norm between attention and MLP (GPT-J, Phi, Falcon, Cohere; GPT-NeoX has its own
    ``ln2`` on the same residual)."""
    return "ln2" if "blocks.0.ln2.hook_in" in model.hook_dict else "ln1"


def edge_refusal(model: TransformerBridge) -> str | None:
    """Why edges cannot be read or patched through this model's hooks; None when they can."""
    cfg = model.cfg
    arch = architecture(model)
    hooks = model.hook_dict
    if any(f"blocks.0.{norm}.hook_in" in hooks for norm in ("ln1_post", "ln2_post")):
        return (
            f"edges need each sender's output to reach the residual stream as a sum; this "
            f"{arch} model normalises the attention and MLP outputs after the block "
            "(post-norms, as Gemma-2 and OLMo-2), which mixes the senders"
        )
    if post_ln(model):
        return (
            f"edges need each sender's output to reach the residual stream as a sum; this "
            f"{arch} model normalises the residual stream itself after adding each "
            "sublayer's output (post-LN, as the original GPT and BERT), so every later "
            "receiver reads a norm of all senders together"
        )
    n_kv = getattr(cfg, "n_key_value_heads", None)
    if n_kv is not None and n_kv != cfg.n_heads:
        from reuse_lens.arch.registry import has_adapter

        way_out = (
            "the functional engine (engine='auto') gives each query head its own"
            if has_adapter(model)
            else "no functional adapter reads this architecture yet (reuse_lens/arch/"
            "README.md says how to add one), so edges cannot be computed on it; node "
            "methods, and path_patching into head receivers, work"
        )
        return (
            f"edges need each query head's own k and v input; this {arch} model shares "
            f"{n_kv} key/value heads among {cfg.n_heads} query heads (grouped-query "
            f"attention), and its hooks hold only the shared ones ({way_out})"
        )
    has_mlps = not getattr(cfg, "attn_only", False)
    if "blocks.0.ln1.hook_in" not in hooks or (has_mlps and "blocks.0.mlp.hook_in" not in hooks):
        return (
            f"edges read the residual entering each block's norms; this {arch} model has "
            "no 'ln1' (or 'mlp') hook points in front of its attention"
        )
    if head_output_scale(model) is None:
        return (
            f"edges need each head's output z @ W_O to be what reaches the residual stream "
            f"(up to one scalar); on this {arch} model the attention output (hook_attn_out) "
            "is not a scalar multiple of the heads' z @ W_O plus b_O"
        )
    return None


@contextmanager
def split_qkv_inputs(model: TransformerBridge) -> Iterator[None]:
    """Give every head its own residual copy for q, k and v while the block runs."""
    before = bool(getattr(model.cfg, "use_split_qkv_input", False))
    try:
        model.set_use_split_qkv_input(True)
    except (NotImplementedError, ValueError) as error:
        raise NotImplementedError(
            f"edges need each head's own q, k and v input, which TransformerLens cannot "
            f"split on this {architecture(model)} model ({error}). Evaluate a node circuit "
            "instead."
        ) from error
    try:
        yield
    finally:
        model.set_use_split_qkv_input(before)


@torch.no_grad()
def _check_split_inputs(model: TransformerBridge, tokens: Int[Tensor, "1 pos"]) -> None:
    """Refuse unless each head's split q/k/v input is the residual in front of its norm.

    That is where an edge's delta belongs. On some attention bridges (Bloom's, for one) the
    split copies are taken after the norm, and a delta added there would be normalised
    away: checked on one prompt, once per engine.
    """
    last = int(model.cfg.n_layers) - 1
    names = [f"blocks.{layer}.{point}" for layer in (0, last) for point in _SPLIT_CHECK]
    with split_qkv_inputs(model):
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    silent = [name for name in names if name not in cache.cache_dict]
    if silent:
        raise NotImplementedError(
            f"edges need each head's own q, k and v input; on this {architecture(model)} "
            "model TransformerLens accepts split q/k/v inputs but its attention never "
            f"computes them ({silent[0]} does not fire), so edges cannot be read or "
            "ablated through hooks. Evaluate a node circuit instead."
        )
    for layer in (0, last):
        residual = cache[f"blocks.{layer}.ln1.hook_in"].unsqueeze(2)
        for part in "qkv":
            copies = cache[f"blocks.{layer}.attn.hook_{part}_input"]
            if copies.shape[:2] != residual.shape[:2] or not torch.allclose(
                copies, residual.expand_as(copies), atol=1e-5, rtol=1e-4
            ):
                raise NotImplementedError(
                    f"edges need each head's own q, k and v input in front of its norm; on "
                    f"this {architecture(model)} model TransformerLens's split "
                    f"hook_{part}_input is not the residual entering ln1. Evaluate a node "
                    "circuit instead."
                )


_SPLIT_CHECK = ("ln1.hook_in", "attn.hook_q_input", "attn.hook_k_input", "attn.hook_v_input")


class HookEdges:
    """Answer logits of edge circuits, computed by ``run_with_hooks`` on the bridge."""

    def __init__(
        self,
        model: TransformerBridge,
        corrupted: Int[Tensor, "batch pos"],
        clean: Int[Tensor, "batch pos"],
        lengths: Int[Tensor, " batch"],
        ablation: str,
    ) -> None:
        reason = edge_refusal(model)
        if reason is not None:
            raise NotImplementedError(reason + ". Evaluate a node circuit instead.")
        _check_split_inputs(model, clean[:1])
        self.model = model
        self.shape = shape_of(model)
        self.index = GraphIndex(self.shape)
        self.norm = mlp_norm(model)
        self.whole_norm = whole_projection_qk_norm(model)
        self.sources = HookSources.build(
            model, corrupted, clean, lengths, ablation, "out", extra=(EDGE_INPUT_HOOK,)
        )
        scale = head_output_scale(model)
        assert scale is not None  # edge_refusal refused the model otherwise
        with torch.no_grad():
            # (layer, head, d_head, d_model), times what the block applies after W_O.
            self.w_o = model.W_O.detach() * scale

    @torch.no_grad()
    def logits(
        self,
        tokens: Int[Tensor, "rows pos"],
        prompt: Int[Tensor, " rows"],
        answer_pos: Int[Tensor, " rows"],
        drop: Float[Tensor, "sender receiver"],
    ) -> Float[Tensor, "rows d_vocab"]:
        """Row ``i``: ``tokens[i]`` with the edges in ``drop`` (1 = ablated) taken from the
        sources of prompt ``prompt[i]``."""
        src = self.sources.values
        pick = torch.zeros_like(prompt) if self.sources.shared else prompt
        index, shape = self.index, self.shape
        rows, width = tokens.shape
        d_model = int(self.w_o.shape[-1])
        # deltas[:, :, s]: (ablated − current) output of sender s, filled in forward order.
        deltas = torch.zeros(
            rows, width, index.n_senders, d_model, device=tokens.device, dtype=self.w_o.dtype
        )
        state: dict[str, Any] = {}

        def added(n: int, columns: Any) -> Tensor:
            """Σ over the first ``n`` senders of drop[s, column] · delta_s."""
            return torch.einsum("bpsd,s...->bp...d", deltas[:, :, :n], drop[:n, columns])

        def record_input(x: Tensor, hook: Any) -> None:
            deltas[:, :, 0] = src[EDGE_INPUT_HOOK][pick] - x

        hooks: list[Any] = [(EDGE_INPUT_HOOK, record_input)]
        for layer in range(shape.n_layers):
            n_in = index.senders_before_heads(layer)
            cols = index.heads_columns(layer)
            n_heads = shape.n_heads
            for i, part in enumerate("qkv"):
                part_cols = slice(cols.start + i * n_heads, cols.start + (i + 1) * n_heads)
                key = f"{part}{layer}"

                def move_input(
                    x: Tensor, hook: Any, n: int = n_in, c: slice = part_cols, key: str = key
                ) -> Tensor:
                    state[key] = x + added(n, c).to(x.dtype)
                    return state[key]

                hooks.append((f"blocks.{layer}.attn.hook_{part}_input", move_input))
                if self.whole_norm and part != "v":
                    # The bridge norms the heads' projections together; each head's
                    # statistic comes from its own input instead (docs/models.md).
                    def own_norm(
                        out: Tensor, hook: Any, layer: int = layer, part: str = part, key: str = key
                    ) -> Tensor:
                        normed = own_input_normed(self.model, layer, part, state[key])
                        return normed.to(out.dtype)

                    hooks.append((normed_hook(layer, part), own_norm))

            def record_heads(z: Tensor, hook: Any, layer: int = layer, n: int = n_in) -> None:
                w_o = self.w_o[layer]
                current = torch.einsum("bphe,hed->bphd", z, w_o)
                ablated = torch.einsum("bphe,hed->bphd", src[hook_name(layer, "out")][pick], w_o)
                deltas[:, :, n : n + current.shape[2]] = ablated - current

            hooks.append((hook_name(layer, "out"), record_heads))
            if shape.has_mlps:
                hooks += self._mlp_hooks(layer, deltas, added, state, src, pick)

        def move_final(x: Tensor, hook: Any) -> Tensor:
            return x + added(index.n_senders, index.receiver[LOGITS.name]).to(x.dtype)

        hooks.append(("ln_final.hook_in", move_final))
        with split_qkv_inputs(self.model):
            logits = self.model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
        return logits[torch.arange(rows, device=tokens.device), answer_pos].float()

    def _mlp_hooks(
        self,
        layer: int,
        deltas: Tensor,
        added: Any,
        state: dict[str, Any],
        src: dict[str, Tensor],
        pick: Tensor,
    ) -> list[Any]:
        n_in = self.index.senders_before_mlp(layer)
        column = self.index.receiver[MLP(layer).name]
        norm = getattr(self.model.blocks[layer], self.norm)
        slot = self.index.sender[MLP(layer).name]
        key = f"resid{layer}"

        def keep(x: Tensor, hook: Any) -> None:
            if x.dim() == 3:  # not a per-head copy that split q/k/v inputs normalise
                state[key] = x

        def move(x: Tensor, hook: Any) -> Tensor:
            return norm(state[key] + added(n_in, column).to(x.dtype)).to(x.dtype)

        def record(out: Tensor, hook: Any) -> None:
            deltas[:, :, slot] = src[hook_name(layer, "mlp")][pick] - out

        return [
            (f"blocks.{layer}.{self.norm}.hook_in", keep),
            (f"blocks.{layer}.mlp.hook_in", move),
            (hook_name(layer, "mlp"), record),
        ]
