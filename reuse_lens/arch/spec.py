"""``ArchSpec``: what distinguishes one decoder-only transformer family from another."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ArchSpec", "NormKind", "PositionKind", "QKNorm"]

NormKind = Literal["ln", "rms", "none"]
PositionKind = Literal["learned", "rotary", "alibi", "none"]
QKNorm = Literal["none", "head", "proj"]


@dataclass(frozen=True)
class ArchSpec:
    """The architecture of a decoder, as the functional forward reads it.

    The defaults describe GPT-2 (Radford et al. 2019): pre-LayerNorm, learned positions,
    multi-head attention scaled by ``1/sqrt(d_head)``, a plain MLP. The per-model
    numbers (``norm_eps``, ``n_kv_heads``, ``sliding_window``, ``attn_scale``) are filled
    in by the adapter from the model's config.

    Attributes:
        family: the adapter's name (``"llama"``, ``"gpt_neox"``, ...).
        norm: ``ln`` (LayerNorm), ``rms`` (RMSNorm) or ``none``.
        norm_eps: the norms' epsilon.
        norm_offset: RMSNorm scales by ``offset + w``: 1 for Gemma, 0 elsewhere.
        positions: ``learned`` (an added table), ``rotary`` (RoPE, Su et al. 2021),
            ``alibi`` (Press et al. 2022) or ``none``.
        rotary_dim: channels of each head that RoPE rotates (partial in GPT-NeoX, GPT-J,
            Phi, StableLM); None for all.
        rotary_interleaved: GPT-J/Cohere rotate channel pairs ``(2i, 2i+1)``; GPT-NeoX
            and Llama the halves ``(i, i + dim/2)``.
        n_kv_heads: key/value heads (fewer than query heads: grouped-query attention,
            Ainslie et al. 2023; one: multi-query, Shazeer 2019).
        parallel: attention and MLP read the same residual stream and both add to it
            (GPT-J, GPT-NeoX, Phi, Falcon, Cohere).
        shared_mlp_norm: in a parallel block the MLP reads ``ln1``'s output (GPT-J, Phi,
            Falcon, Cohere) rather than a norm of its own (GPT-NeoX).
        pre_norms: norms on each sublayer's input (all but OLMo-2).
        post_norms: norms on each sublayer's output (Gemma-2, OLMo-2).
        gated_mlp: ``act(x W_gate) * (x W_in)`` (SwiGLU/GeGLU, Shazeer 2020).
        qk_norm: norms on q and k: per head (Qwen3, Gemma-3) or over the whole
            projection (OLMo-2).
        qk_norm_after_rope: the q/k norms act after the rotary embedding (HunYuan), not
            before it.
        attn_softcap: Gemma-2's ``cap * tanh(scores / cap)``.
        final_softcap: the same on the logits.
        sliding_window: local attention width, on the layers the adapter marks.
        attn_scale: the attention scores are divided by it (``sqrt(d_head)`` by default;
            Gemma's ``query_pre_attn_scalar``, Granite's ``attention_multiplier``).
        embed_scale: multiplies the embeddings (Gemma: ``sqrt(d_model)``; Granite).
        logit_scale: multiplies the logits (Cohere; Granite divides by ``logits_scaling``).
        residual_scale: multiplies each sublayer's output (Granite).
    """

    family: str = "gpt2"
    norm: NormKind = "ln"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0
    positions: PositionKind = "learned"
    rotary_dim: int | None = None
    rotary_interleaved: bool = False
    n_kv_heads: int | None = None
    parallel: bool = False
    shared_mlp_norm: bool = False
    pre_norms: bool = True
    post_norms: bool = False
    gated_mlp: bool = False
    qk_norm: QKNorm = "none"
    qk_norm_after_rope: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    attn_scale: float | None = None
    embed_scale: float = 1.0
    logit_scale: float = 1.0
    residual_scale: float = 1.0

    def edge_unsupported(self) -> str | None:
        """Why edge methods (each head's own q/k/v input) cannot run, or None.

        Every family registered today supports them: norms after a sublayer (Gemma-2) are
        recomputed per receiver (``patching/_edge_forward.py``), and a q/k norm over the
        whole projection (OLMo-2) takes head i's statistic from the projection of head i's
        own input (``Weights.qkv_per_head``). A family whose heads cannot be separated
        returns its reason here, and the edge engines refuse with it.
        """
        return None
