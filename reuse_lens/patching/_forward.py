"""A small functional forward pass over a model's weights, for fast patching.

The bridge's ``start_at_layer`` still runs the blocks before it, and every forward pass
unembeds every position. Patching needs neither: a patch at layer ``l`` leaves the
residual stream before ``l`` as in the unpatched run, a patch at position ``p`` leaves
positions before ``p`` unchanged at every layer (causal attention), and a metric reads
only the answer position. This module re-implements the decoder forward pass from
weights read once per call, so that the patching engines can exploit all three.

What varies between architecture families (pre-, post- or no norms, LayerNorm or
RMSNorm, learned or rotary positions, parallel attention and MLP, gated MLPs, q/k norms,
soft caps, sliding windows) is described by an ``ArchSpec`` and read by one ``block``
function; ``reuse_lens.arch`` holds one adapter per family that reads a bridge's
weights into ``Weights``. Grouped-query models give each query head its own k and v
(TransformerLens's ``ungroup_grouped_query_attention``): the semantics that per-head path
patching and edge ablation need. The per-head matrices hold the key/value heads repeated
per query head; the fused q/k/v projection holds each once and repeats k and v after
projecting, so the plain forward does not pay for the repetition. A model no adapter covers raises ``Unsupported`` and the callers fall back
to hooks; ``_common.prepare`` also compares the logits with the bridge's own, so an
architecture that only looks supported is never patched silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from reuse_lens._memory import nbytes
from reuse_lens.arch.spec import ArchSpec

if TYPE_CHECKING:
    pass

__all__ = ["Layer", "Norm", "Rope", "RunCache", "Unsupported", "Weights", "repeat_kv"]

QKVEdit = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


class Unsupported(Exception):
    """The functional forward cannot reproduce this model; the message says why."""


@dataclass(frozen=True)
class Norm:
    """A LayerNorm or an RMSNorm over the last axis (``weight``/``bias`` may be None).

    RMSNorm (Zhang & Sennrich 2019; Llama, Gemma, Qwen, OLMo-2) is computed in float32 as
    ``transformers`` does; Gemma's ``(1 + w)`` scale is folded into ``weight`` on reading.
    """

    weight: Tensor | None
    bias: Tensor | None
    eps: float
    rms: bool = False

    def __call__(self, x: Tensor) -> Tensor:
        if not self.rms:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            h = h * self.weight
        if self.bias is not None:
            h = h + self.bias
        return h.to(x.dtype)


def _norm(x: Tensor, norm: Norm | None) -> Tensor:
    return x if norm is None else norm(x)


def _affine(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ w + b`` as one fused addmm (about 13% faster than a matmul and an add)."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ w if b is None else torch.addmm(b, flat, w)
    return out.view(*x.shape[:-1], w.shape[1])


@dataclass(frozen=True)
class Rope:
    """Rotary position embeddings (Su et al. 2021) on the first ``dim`` channels of a head.

    ``table(n)`` returns cos and sin, each ``(n, dim)``, for positions ``0..n-1``: the
    adapters get them from the model's own rotary module, so every scaling variant
    (linear, Llama-3, YaRN, ...) is whatever ``transformers`` computes. ``interleaved``:
    GPT-J and Cohere rotate channel pairs ``(2i, 2i+1)``; GPT-NeoX, Llama and most others
    rotate the halves ``(i, i + dim/2)``.
    """

    dim: int
    interleaved: bool
    table: Callable[[int], tuple[Tensor, Tensor]]
    _cache: dict[str, Tensor] = field(default_factory=dict, compare=False, repr=False)

    def cos_sin(self, n: int) -> tuple[Tensor, Tensor]:
        if "cos" not in self._cache or self._cache["cos"].shape[0] < n:
            size = max(n, 2 * self._cache["cos"].shape[0] if "cos" in self._cache else 128)
            self._cache["cos"], self._cache["sin"] = self.table(size)
        return self._cache["cos"], self._cache["sin"]

    def __call__(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` ``(..., pos, head, d_head)`` at absolute ``positions`` ``(pos,)`` or ``(b, pos)``."""
        cos, sin = self.cos_sin(int(positions.max()) + 1)
        cos, sin = cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        if self.interleaved:
            turned = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
        else:
            half = self.dim // 2
            turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + turned * sin
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


@dataclass(frozen=True)
class Layer:
    """One block's weights, with the heads' matrices flattened to ``(d_model, head*d_head)``.

    k/v weights hold one column block per *query* head (grouped-query models repeated).
    ``ln2`` is the MLP's input norm (the same object as ``ln1`` where a parallel block
    shares it); ``w_gate`` is set for gated MLPs (Shazeer 2020: ``act(x W_gate) * x W_in``);
    ``attn_post``/``mlp_post`` are Gemma-2's and OLMo-2's norms on each sublayer's output;
    ``q_norm``/``k_norm`` act per head (Qwen3) or on the whole projection (OLMo-2);
    ``window`` is the sliding-window width of a local-attention layer.

    A few families need more than one block's matrices: ``mlp_module`` computes a sparse
    mixture-of-experts MLP (router, experts and any shared expert: Mixtral, Qwen-MoE,
    OLMoE, GPT-OSS, Granite-MoE) with the model's own module, times ``mlp_scale``
    (Granite-MoE's ``residual_multiplier``), in place of ``w_in``/``w_out``; ``rope``
    is the layer's own rotary table where it differs from the model's (Gemma-3's and
    OLMo-3's local layers), and ``nope`` marks a layer without rotary embeddings
    (SmolLM3); ``sinks`` are GPT-OSS's per-head attention sinks, a logit that every
    query's softmax includes and that attends to nothing.
    """

    ln1: Norm | None
    w_q: Tensor
    b_q: Tensor
    w_k: Tensor
    b_k: Tensor
    w_v: Tensor
    b_v: Tensor
    w_o: Tensor
    b_o: Tensor
    ln2: Norm | None
    w_in: Tensor | None
    b_in: Tensor | None
    w_out: Tensor | None
    b_out: Tensor | None
    w_qkv: Tensor
    b_qkv: Tensor
    w_gate: Tensor | None = None
    b_gate: Tensor | None = None
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    attn_post: Norm | None = None
    mlp_post: Norm | None = None
    window: int | None = None
    mlp_module: Callable[[Tensor], Any] | None = None
    mlp_scale: float = 1.0
    rope: Rope | None = None
    nope: bool = False
    sinks: Tensor | None = None
    kv_heads: int | None = None
    """Set under grouped-query attention: ``w_qkv``/``b_qkv`` then hold each key/value
    head once, and ``w_k``... repeated per query head (see ``fused``)."""

    @classmethod
    def fused(
        cls, *, w_q: Tensor, b_q: Tensor, w_k: Tensor, b_k: Tensor, w_v: Tensor, b_v: Tensor,
        n_heads: int | None = None, **rest: Any,
    ) -> Layer:  # fmt: skip
        """A layer whose ``w_qkv``/``b_qkv`` fuse q, k and v into one new tensor, with
        ``w_q``... views into it; ``rest`` are the other fields.

        The fused matrix is the functional forward's one copy of a model's weights (one
        matmul makes q, k and v); every other matrix an adapter reads is a view of the
        model's own parameters, so the forward costs a quarter of the attention's weights
        and not another model.

        Grouped-query attention (``n_heads`` given and k/v narrower than q, Ainslie et al.
        2023): the fused matrix keeps each key/value head once, so the forward projects
        ``n_kv`` of them and repeats them per query head only after (``Weights.qkv``), as
        ``transformers``' ``repeat_kv`` does; ``w_k``/``w_v`` are copies repeated per query
        head (query head ``h`` reads key/value head ``h // (n_heads / n_kv)``), for the
        engines that give every query head its own k and v input.
        """
        widths = [w_q.shape[1], w_k.shape[1], w_v.shape[1]]
        w_qkv, b_qkv = torch.cat([w_q, w_k, w_v], 1), torch.cat([b_q, b_k, b_v])
        q, k, v = w_qkv.split(widths, dim=1)
        bq, bk, bv = b_qkv.split(widths)
        if n_heads is None or w_k.shape[1] == w_q.shape[1]:
            return cls(
                w_q=q, b_q=bq, w_k=k, b_k=bk, w_v=v, b_v=bv, w_qkv=w_qkv, b_qkv=b_qkv, **rest
            )
        kv_heads = w_k.shape[1] * n_heads // w_q.shape[1]
        k, bk, v, bv = (repeat_kv(x, kv_heads, n_heads) for x in (w_k, b_k, w_v, b_v))
        return cls(
            w_q=q, b_q=bq, w_k=k, b_k=bk, w_v=v, b_v=bv, w_qkv=w_qkv, b_qkv=b_qkv,
            kv_heads=kv_heads, **rest,
        )  # fmt: skip


def repeat_kv(w: Tensor, n_kv: int, n_heads: int) -> Tensor:
    """Repeat each key/value head's columns for the query heads that share it.

    ``transformers`` assigns query head ``h`` to key/value head ``h // (n_heads/n_kv)``
    (``repeat_kv``); the last axis of ``w`` is laid out head-major.
    """
    if n_kv == n_heads:
        return w
    heads = w.unflatten(-1, (n_kv, -1))
    return heads.repeat_interleave(n_heads // n_kv, dim=-2).flatten(-2).contiguous()


@dataclass(frozen=True)
class Weights:
    """Everything the functional forward reads, taken from the model once per call.

    ``scale`` divides the attention scores (``sqrt(d_head)`` by default).
    """

    w_e: Tensor
    w_pos: Tensor | None
    layers: list[Layer]
    ln_final: Norm | None
    w_u: Tensor
    b_u: Tensor | None
    act: Callable[[Tensor], Tensor]
    n_heads: int
    d_head: int
    scale: float
    spec: ArchSpec = field(default_factory=ArchSpec)
    rope: Rope | None = None
    alibi: Tensor | None = None
    embed_norm: Norm | None = None
    own_bytes: int = 0
    """Bytes of the tensors here that are not views of the model's parameters (the fused
    q/k/v): memory the forward holds on top of the model, which the budget counts."""

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def parallel(self) -> bool:
        return self.spec.parallel

    # ---- pieces of the forward pass ------------------------------------------------------

    def _positions(self, x: Tensor, positions: Tensor | None) -> Tensor:
        return torch.arange(x.shape[-2], device=x.device) if positions is None else positions

    def rope_of(self, layer: int) -> Rope | None:
        """The rotary embedding of ``layer``: its own table, the model's, or none."""
        w = self.layers[layer]
        return None if w.nope else (w.rope or self.rope)

    def _qk_post(self, layer: int, x: Tensor, norm: Norm | None, positions: Tensor) -> Tensor:
        """q/k norm, then rotary (HunYuan: the other way round): (..., pos, head, d_head)
        -> the same shape."""
        rope = self.rope_of(layer)
        if self.spec.qk_norm_after_rope:
            x = x if rope is None else rope(x, positions)
            return x if norm is None else norm(x)
        if norm is not None:
            if self.spec.qk_norm == "proj":  # OLMo-2: one norm over every head's channels
                x = norm(x.flatten(-2)).unflatten(-1, (self.n_heads, self.d_head))
            else:
                x = norm(x)
        return x if rope is None else rope(x, positions)

    def qkv(
        self, layer: int, resid: Tensor, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of every head, each ``(..., pos, head, d_head)``, from ``resid_pre``.

        ``positions``: absolute positions of ``resid``'s rows, ``(pos,)`` or ``(b, pos)``
        (by default ``0..pos-1``); rotary models need them.
        """
        w = self.layers[layer]
        fused = _affine(_norm(resid, w.ln1), w.w_qkv, w.b_qkv)
        pos = self._positions(resid, positions)
        if w.kv_heads is None:
            q, k, v = fused.unflatten(-1, (3, self.n_heads, self.d_head)).unbind(-3)
            return self._qk_post(layer, q, w.q_norm, pos), self._qk_post(layer, k, w.k_norm, pos), v
        q, kv = fused.split([self.n_heads * self.d_head, 2 * w.kv_heads * self.d_head], -1)
        q = self._qk_post(layer, q.unflatten(-1, (self.n_heads, self.d_head)), w.q_norm, pos)
        return (q, *self._grouped_kv(layer, kv, pos))

    def _grouped_kv(self, layer: int, kv: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """k and v per query head from the projection of the key/value heads ``(..., pos,
        2 * kv_heads * d_head)``: the k norm and rotary run on the key/value heads, before
        they are repeated."""
        w = self.layers[layer]
        assert w.kv_heads is not None
        k, v = kv.unflatten(-1, (2, w.kv_heads, self.d_head)).unbind(-3)
        k = self._qk_post(layer, k, w.k_norm, positions)
        group = self.n_heads // w.kv_heads
        return k.repeat_interleave(group, dim=-2), v.repeat_interleave(group, dim=-2)

    def q_only(self, layer: int, resid: Tensor, positions: Tensor | None = None) -> Tensor:
        w = self.layers[layer]
        q = _affine(_norm(resid, w.ln1), w.w_q, w.b_q).unflatten(-1, (self.n_heads, self.d_head))
        return self._qk_post(layer, q, w.q_norm, self._positions(resid, positions))

    def kv_only(
        self, layer: int, resid: Tensor, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        w = self.layers[layer]
        width = self.n_heads * self.d_head
        kv = _affine(_norm(resid, w.ln1), w.w_qkv[:, width:], w.b_qkv[width:])
        pos = self._positions(resid, positions)
        if w.kv_heads is not None:
            return self._grouped_kv(layer, kv, pos)
        k, v = kv.unflatten(-1, (2, self.n_heads, self.d_head)).unbind(-3)
        return self._qk_post(layer, k, w.k_norm, pos), v

    def qkv_per_head(
        self, layer: int, x_q: Tensor, x_k: Tensor, x_v: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v when every head reads its own residual stream ``(b, pos, head, d_model)``."""
        w, h, d = self.layers[layer], self.n_heads, self.d_head

        def project(x: Tensor, w_flat: Tensor, b_flat: Tensor) -> Tensor:
            per_head = w_flat.view(-1, h, d).permute(1, 0, 2)
            return torch.einsum("bphd,hde->bphe", _norm(x, w.ln1), per_head) + b_flat.view(h, d)

        def project_normed(x: Tensor, w_flat: Tensor, b_flat: Tensor, norm: Norm) -> Tensor:
            # OLMo-2's q/k norm takes one statistic over every head's channels: head i's
            # q is read from the whole projection of head i's own input, normed, at i.
            every = _affine(_norm(x, w.ln1), w_flat, b_flat)  # (b, pos, head i, head*d)
            normed = norm(every).unflatten(-1, (h, d))  # (b, pos, head i, head j, d)
            return normed.diagonal(dim1=-3, dim2=-2).movedim(-1, -2)  # i == j

        if self.spec.qk_norm == "proj" and w.q_norm is not None and w.k_norm is not None:
            q = project_normed(x_q, w.w_q, w.b_q, w.q_norm)
            k = project_normed(x_k, w.w_k, w.b_k, w.k_norm)
            rope = self.rope_of(layer)
            if rope is not None:
                q, k = rope(q, positions), rope(k, positions)
            return q, k, project(x_v, w.w_v, w.b_v)
        q = self._qk_post(layer, project(x_q, w.w_q, w.b_q), w.q_norm, positions)
        k = self._qk_post(layer, project(x_k, w.w_k, w.b_k), w.k_norm, positions)
        return q, k, project(x_v, w.w_v, w.b_v)

    def pattern(
        self,
        q: Tensor,
        k: Tensor,
        q_pos: Tensor,
        layer: int | None = None,
        heads: Tensor | None = None,
    ) -> Tensor:
        """Attention pattern ``(batch, head, q_pos, k_pos)`` for queries at absolute ``q_pos``.

        ``q_pos`` is ``(batch, n_queries)`` or ``(n_queries,)``; key ``j`` is visible to a
        query at position ``i`` when ``j <= i`` (causal) and, in a sliding-window layer
        of width ``W`` (Mistral, Gemma-2, GPT-Neo local layers), ``i - j < W``.
        ``heads``: which of the layer's heads ``q`` and ``k`` hold, when not all of them
        (their per-head ALiBi slopes and sinks are taken).
        """
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / self.scale
        cap = self.spec.attn_softcap
        if cap is not None:  # Gemma-2: scores squashed into (-cap, cap) before the mask
            scores = torch.tanh(scores / cap) * cap
        k_idx = torch.arange(k.shape[1], device=k.device)
        if self.alibi is not None:  # Press et al. 2022 (BLOOM): a linear bias per head
            slopes = self.alibi if heads is None else self.alibi[heads]
            scores = scores + slopes.view(1, -1, 1, 1) * k_idx.to(scores.dtype)
        if q_pos.dim() == 1:
            q_pos = q_pos.unsqueeze(0)
        gap = q_pos.unsqueeze(-1) - k_idx.view(1, 1, -1)  # (b or 1, q, k)
        masked = gap < 0
        window = None if layer is None else self.layers[layer].window
        if window is not None:
            masked = masked | (gap >= window)
        scores = scores.masked_fill(masked.unsqueeze(1), float("-inf"))
        sinks = None if layer is None else self.layers[layer].sinks
        if sinks is not None and heads is not None:
            sinks = sinks[heads]
        if sinks is not None:
            # GPT-OSS: one more logit per head in every softmax, whose share goes nowhere.
            sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
            return torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
        return scores.softmax(-1)

    @staticmethod
    def mix(pattern: Tensor, v: Tensor) -> Tensor:
        """z ``(batch, q_pos, head, d_head)`` from a pattern and values."""
        return torch.einsum("bhqk,bkhd->bqhd", pattern, v)

    def attn_out(self, layer: int, z: Tensor, delta: Tensor | None = None) -> Tensor:
        """What the attention sublayer adds to the residual stream (after any post-norm).

        ``delta`` is added to the heads' sum before the post-norm: a head's own output
        (``head_out``) replaced by another model's (cross-model patching).
        """
        w = self.layers[layer]
        total = _affine(z.flatten(-2), w.w_o, w.b_o)
        return _norm(total if delta is None else total + delta, w.attn_post)

    def head_out(
        self, layer: int, z: Float[Tensor, "... head d_head"]
    ) -> Float[Tensor, "... head d_model"]:
        """Each head's own output ``z_h W_O,h``: its term of the attention sum, before the
        output bias and any post-norm."""
        w_o = self.layers[layer].w_o.view(self.n_heads, self.d_head, -1)
        return torch.einsum("...hd,hdm->...hm", z, w_o)

    def mlp_out(self, layer: int, resid: Tensor) -> Tensor:
        """What the MLP adds to the residual stream, from the residual stream it reads.

        That is ``resid_mid`` in a sequential block and ``resid_pre`` in a parallel one
        (GPT-J, GPT-NeoX, Phi, Falcon, Cohere): see ``mlp_input``.
        """
        w = self.layers[layer]
        if w.mlp_module is not None:
            return _norm(self._module_mlp(w, _norm(resid, w.ln2)), w.mlp_post)
        if w.w_in is None:
            return torch.zeros_like(resid)
        assert w.w_out is not None
        x = _norm(resid, w.ln2)
        hidden = _affine(x, w.w_in, w.b_in)
        if w.w_gate is not None:
            hidden = self.act(_affine(x, w.w_gate, w.b_gate)) * hidden
        else:
            hidden = self.act(hidden)
        return _norm(_affine(hidden, w.w_out, w.b_out), w.mlp_post)

    @staticmethod
    def _module_mlp(w: Layer, x: Tensor) -> Tensor:
        """A mixture-of-experts MLP by the model's own module, on any leading shape.

        The modules take ``(batch, pos, d_model)`` and route each row on its own, so every
        row is one position of a batch of one; some return ``(output, router scores)``.
        """
        assert w.mlp_module is not None
        out = w.mlp_module(x.reshape(1, -1, x.shape[-1]))
        out = (out[0] if isinstance(out, tuple) else out).view(x.shape)
        return out if w.mlp_scale == 1.0 else out * w.mlp_scale

    def mlp_input(self, resid_pre: Tensor, resid_mid: Tensor) -> Tensor:
        """The residual stream the MLP reads: ``resid_pre`` in a parallel block."""
        return resid_pre if self.spec.parallel else resid_mid

    @property
    def has_mlps(self) -> bool:
        first = self.layers[0]
        return first.w_in is not None or first.mlp_module is not None

    def logits(self, final: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch d_vocab"]:
        out = _affine(_norm(final, self.ln_final), self.w_u, self.b_u)
        cap = self.spec.final_softcap
        return out if cap is None else torch.tanh(out / cap) * cap

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.w_e[tokens]
        if self.w_pos is not None:
            x = x + self.w_pos[: tokens.shape[1]].unsqueeze(0)
        return _norm(x, self.embed_norm)

    # ---- one block, and the whole runs built from it -------------------------------------

    def block(
        self,
        layer: int,
        resid: Float[Tensor, "batch pos d_model"],
        positions: Tensor | None = None,
        *,
        kv_prefix: tuple[Tensor, Tensor] | None = None,
        answer: Int[Tensor, " batch"] | None = None,
        edit_qkv: QKVEdit | None = None,
        edit_z: Callable[[Tensor], Tensor] | None = None,
        edit_mlp: Callable[[Tensor], Tensor] | None = None,
        record: dict[str, Tensor] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Block ``layer`` on ``resid`` (pre-norm, parallel and post-norm alike).

        ``positions``: the absolute positions of ``resid``'s rows (``0..`` by default).
        ``kv_prefix``: keys and values of the positions before them (from a cache).
        ``answer``: compute only the query at row ``answer[b]`` of each batch entry and
        return ``(batch, 1, d_model)`` (nothing else reaches the logits in a last block).
        ``edit_qkv``/``edit_z``/``edit_mlp`` replace activations on the way; ``record``
        receives q, k, v, pattern, z, resid_mid and mlp_out.
        """
        pos = self._positions(resid, positions)
        if answer is None:
            q, k, v = self.qkv(layer, resid, pos)
            q_pos, resid_pre = pos, resid
        else:
            k, v = self.kv_only(layer, resid, pos)
            rows = torch.arange(resid.shape[0], device=resid.device)
            resid_pre = resid[rows, answer].unsqueeze(1)
            q_pos = (pos[answer] if pos.dim() == 1 else pos[rows, answer]).unsqueeze(-1)
            q = self.q_only(layer, resid_pre, q_pos)
        if edit_qkv is not None:
            q, k, v = edit_qkv(q, k, v)
        if kv_prefix is not None:
            k, v = torch.cat([kv_prefix[0], k], dim=1), torch.cat([kv_prefix[1], v], dim=1)
        pattern = self.pattern(q, k, q_pos, layer)
        z = self.mix(pattern, v)
        if edit_z is not None:
            z = edit_z(z)
        resid_mid = resid_pre + self.attn_out(layer, z)
        mlp = self.mlp_out(layer, self.mlp_input(resid_pre, resid_mid))
        if edit_mlp is not None:
            mlp = edit_mlp(mlp)
        if record is not None:
            record.update(q=q, k=k, v=v, pattern=pattern, z=z, resid_mid=resid_mid, mlp_out=mlp)
        return resid_mid + mlp

    def run(self, tokens: Int[Tensor, "batch pos"]) -> RunCache:
        """The unpatched forward pass, keeping every activation that patching reads."""
        cache = RunCache([], [], [], [], [], [], [], [], torch.empty(0))
        resid = self.embed(tokens)
        for layer in range(self.n_layers):
            cache.resid_pre.append(resid)
            store: dict[str, Tensor] = {}
            resid = self.block(layer, resid, record=store)
            for name in ("resid_mid", "q", "k", "v", "pattern", "z", "mlp_out"):
                getattr(cache, name).append(store[name])
        cache.final = resid
        return cache

    def run_patched(
        self,
        tokens: Int[Tensor, "batch pos"],
        source: RunCache,
        heads: Tensor,
        mlps: Tensor | None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The final residual stream with many nodes patched at once, at every position.

        ``heads`` is a (layer, head_index) bool mask and ``mlps`` a (layer,) bool mask of
        the nodes whose output (z, or the MLP output) takes its value from ``source``
        (batch-first, or a batch of one shared by every prompt).
        """
        resid = self.embed(tokens)
        for layer in range(self.n_layers):
            mask = heads[layer].view(1, 1, -1, 1).to(resid.device)
            patch_mlp = mlps is not None and bool(mlps[layer])
            resid = self.block(
                layer,
                resid,
                edit_z=lambda z, m=mask, s=source.z[layer]: torch.where(m, s.expand_as(z), z),
                edit_mlp=(lambda x, s=source.mlp_out[layer]: s.expand_as(x)) if patch_mlp else None,
            )
        return resid

    def tail(
        self,
        resid: Float[Tensor, "rows sub_pos d_model"],
        first_layer: int,
        pos0: int,
        base: RunCache,
        prompt: Int[Tensor, " rows"],
        answer_pos: Int[Tensor, " rows"],
    ) -> Float[Tensor, "rows d_model"]:
        """Run blocks ``first_layer..`` on positions ``pos0..`` and return the answer residual.

        Positions before ``pos0`` are unchanged by any patch that starts at ``pos0``, so
        their keys and values come from ``base`` (the unpatched run of prompt
        ``prompt[row]``) instead of being recomputed. In the last block only the answer
        position's query, attention output and MLP are computed: nothing else reaches the
        logits.
        """
        rows = torch.arange(resid.shape[0], device=resid.device)
        rel = answer_pos - pos0
        positions = torch.arange(pos0, pos0 + resid.shape[1], device=resid.device)
        for layer in range(first_layer, self.n_layers):
            prefix = None
            if pos0 > 0:
                prefix = (base.k[layer][prompt, :pos0], base.v[layer][prompt, :pos0])
            last = layer == self.n_layers - 1
            resid = self.block(
                layer, resid, positions, kv_prefix=prefix, answer=rel if last else None
            )
        if first_layer >= self.n_layers:
            return resid[rows, rel]
        return resid[:, 0]


@dataclass
class RunCache:
    """Per-layer activations of one unpatched run, each with a leading batch axis.

    ``resid_pre``/``resid_mid``/``mlp_out``: (batch, pos, d_model); ``q``/``k``/``v``/``z``:
    (batch, pos, head, d_head), q and k after any q/k norm and rotary embedding;
    ``pattern``: (batch, head, q_pos, k_pos); ``final``: the residual stream after the last
    block, (batch, pos, d_model). ``resid_mid`` is ``resid_pre`` plus the attention output
    also in a parallel block, whose MLP reads ``resid_pre``.
    """

    resid_pre: list[Tensor]
    resid_mid: list[Tensor]
    q: list[Tensor]
    k: list[Tensor]
    v: list[Tensor]
    pattern: list[Tensor]
    z: list[Tensor]
    mlp_out: list[Tensor]
    final: Tensor

    @property
    def nbytes(self) -> int:
        """The bytes of every activation held here."""
        return nbytes(x for _, x in self.items())

    def items(self) -> list[tuple[str, Tensor]]:
        """Every activation with its field's name: the per-layer lists in order, ``final`` last."""
        per_layer = [(name, x) for name in _PER_LAYER for x in getattr(self, name)]
        return [*per_layer, ("final", self.final)]

    def rows(self, rows: slice) -> RunCache:
        """These prompts' activations (views, not copies)."""
        return RunCache.from_items([(name, x[rows]) for name, x in self.items()])

    @classmethod
    def from_items(cls, items: Sequence[tuple[str, Tensor]]) -> RunCache:
        """The cache whose ``items()`` are ``items``: each layer's in order, and ``final``."""
        lists: dict[str, list[Tensor]] = {name: [] for name in _PER_LAYER}
        final = [x for name, x in items if name == "final"]
        for name, x in items:
            if name != "final":
                lists[name].append(x)
        (last,) = final
        return cls(**lists, final=last)


_PER_LAYER = ("resid_pre", "resid_mid", "q", "k", "v", "pattern", "z", "mlp_out")
