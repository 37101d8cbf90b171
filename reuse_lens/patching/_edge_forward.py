"""The functional forward pass with every receiver reading its own input: the edge graph.

In the forward pass every head's q, k and v input and every MLP's input is the same
residual stream; an edge method needs them apart. Edge ablation (``ablation.py``) adds,
to each receiver's input, the (ablated − current) outputs of the senders whose edges it
drops; edge attribution (``attribution_functional.py``) adds a zero probe per receiver
and differentiates through it. Both are this one pass with a different ``Receivers``:
the block is composed here once, on the pieces of ``Weights``.

Receivers are laid out as in ``GraphIndex``: per layer the q inputs of its heads, then
the k inputs, then the v inputs, then its MLP; ``logits`` (the final residual stream)
last. Senders too: ``input``, then per layer its heads and its MLP; a head's output is
``z @ W_O[h]`` (``b_O`` belongs to no head). A parallel block's MLP reads the residual
stream in front of the block, so not its own layer's heads. Where a norm follows the
attention (Gemma-2), the heads of a layer reach the stream only as ``N(Σ_h out_h + b_O)``:
a receiver that drops some of them reads ``N`` of the sum with those heads' outputs
replaced, exactly, and attribution uses ``N``'s Jacobian at the clean sum.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from reuse_lens.patching._forward import Weights

__all__ = ["Receivers", "run_edges"]


class Receivers:
    """What each receiver reads, given the residual stream; by default the stream itself.

    Subclasses add to the inputs (``heads``, ``mlp``, ``final``) and watch the senders'
    outputs as they are made (``head_outputs``, ``mlp_output``).
    """

    def heads(
        self, layer: int, resid: Float[Tensor, "batch pos d_model"], n_heads: int
    ) -> Float[Tensor, "batch pos 3*head d_model"] | None:
        """The q, k and v inputs of every head of ``layer`` (q of each head, then k, then v),
        or None where every one of them reads ``resid`` itself: the layer then runs as in
        the plain forward pass, without a copy of the stream per receiver."""
        return None

    def mlp(
        self, layer: int, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The input of ``layer``'s MLP, given the residual stream it reads."""
        return resid

    def final(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """What the unembedding reads."""
        return resid

    def head_outputs(
        self,
        layer: int,
        out: Float[Tensor, "batch pos head d_model"],
        raw: Float[Tensor, "batch pos d_model"],
    ) -> None:
        """Each head's output ``z @ W_O[h]`` of ``layer``, as it is made, and their sum with
        ``b_O`` (what a post-norm normalises)."""

    def mlp_output(self, layer: int, out: Float[Tensor, "batch pos d_model"]) -> None:
        """``layer``'s MLP output, as it is made."""


def run_edges(
    w: Weights,
    resid: Float[Tensor, "batch pos d_model"],
    answer_pos: Int[Tensor, " batch"],
    receivers: Receivers,
) -> Float[Tensor, "batch d_vocab"]:
    """The answer logits of the forward pass from embeddings ``resid``, with each receiver
    reading what ``receivers`` gives it.

    Raises:
        NotImplementedError: for a model whose heads' inputs are not separable (a q/k norm
            over all heads at once, OLMo-2), where edges are undefined.
    """
    why = w.spec.edge_unsupported()
    if why is not None:
        raise NotImplementedError(
            f"edges need each head's output on its own, but {why}. Use nodes instead."
        )
    rows, width = resid.shape[:2]
    n_heads, d_head = w.n_heads, w.d_head
    positions = torch.arange(width, device=resid.device)
    for layer in range(w.n_layers):
        weights = w.layers[layer]
        inputs = receivers.heads(layer, resid, n_heads)
        if inputs is None:
            q, k, v = w.qkv(layer, resid, positions)
        else:
            x_q, x_k, x_v = inputs.unflatten(2, (3, n_heads)).unbind(2)
            q, k, v = w.qkv_per_head(layer, x_q, x_k, x_v, positions)
        z = w.mix(w.pattern(q, k, positions, layer), v)
        head_out = torch.einsum("bphe,hed->bphd", z, weights.w_o.view(n_heads, d_head, -1))
        raw = head_out.sum(2) + weights.b_o
        receivers.head_outputs(layer, head_out, raw)
        resid_pre = resid
        # A post-norm (Gemma-2) normalises the heads' sum before it joins the stream.
        resid = resid + (raw if weights.attn_post is None else weights.attn_post(raw))
        if w.has_mlps:
            out = w.mlp_out(layer, receivers.mlp(layer, w.mlp_input(resid_pre, resid)))
            receivers.mlp_output(layer, out)
            resid = resid + out
    final = receivers.final(resid)
    return w.logits(final[torch.arange(rows, device=resid.device), answer_pos])
