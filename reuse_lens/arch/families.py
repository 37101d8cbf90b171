"""One small adapter per architecture family: its ``ArchSpec`` and any odd piece.

Each family cites the model that introduced its convention. Everything else (reading
the weights, calling the model's own rotary module) is ``HFAdapter``'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from reuse_lens.arch.hf import HFAdapter
from reuse_lens.arch.spec import ArchSpec
from reuse_lens.patching._forward import Unsupported

__all__ = ["ADAPTERS"]

_ROTARY_RMS_GATED = ArchSpec(family="llama", norm="rms", positions="rotary", gated_mlp=True)


class Llama(HFAdapter):
    """Llama (Touvron et al. 2023), and Mistral, Qwen2, Phi-3 which share its block:
    pre-RMSNorm, rotary (halves), grouped-query attention, SwiGLU MLP."""

    family = "llama"
    base = _ROTARY_RMS_GATED


class Granite(Llama):
    """IBM Granite 3: Llama with scalar multipliers on the embeddings, every sublayer's
    output and the logits (which it divides by ``logits_scaling``)."""

    family = "granite"

    def spec(self, config: Any) -> ArchSpec:
        return dataclasses.replace(
            self.base,
            family=self.family,
            embed_scale=float(config.embedding_multiplier),
            residual_scale=float(config.residual_multiplier),
            logit_scale=1.0 / float(config.logits_scaling),
        )


class Qwen3(Llama):
    """Qwen3: Llama with an RMSNorm on each head's q and k before rotary."""

    family = "qwen3"
    base = dataclasses.replace(_ROTARY_RMS_GATED, family="qwen3", qk_norm="head")


class HunYuan(Llama):
    """HunYuan dense (Tencent): Llama with an RMSNorm on each head's q and k, after the
    rotary embedding rather than before it."""

    family = "hunyuan"
    base = dataclasses.replace(
        _ROTARY_RMS_GATED, family="hunyuan", qk_norm="head", qk_norm_after_rope=True
    )


class Olmo(Llama):
    """OLMo 1 (Groeneveld et al. 2024): Llama with LayerNorms without weights."""

    family = "olmo"
    base = dataclasses.replace(_ROTARY_RMS_GATED, family="olmo", norm="ln")

    def spec(self, config: Any) -> ArchSpec:
        if getattr(config, "clip_qkv", None) is not None:
            raise Unsupported("olmo with clip_qkv (q, k and v clamped after the projection)")
        return self.base


class Gemma(Llama):
    """Gemma (Gemma Team 2024): RMSNorm scaling by ``1 + w``, GeGLU, embeddings times
    ``sqrt(d_model)`` (read from the embedding module's ``embed_scale``)."""

    family = "gemma"
    base = dataclasses.replace(_ROTARY_RMS_GATED, family="gemma", norm_offset=1.0)


class Gemma2(Gemma):
    """Gemma 2: Gemma plus norms on each sublayer's output, attention and final-logit
    soft-capping, and sliding-window attention on alternate layers."""

    family = "gemma2"

    def spec(self, config: Any) -> ArchSpec:
        cap = getattr(config, "final_logit_softcapping", None)
        return dataclasses.replace(
            self.base,
            family=self.family,
            post_norms=True,
            final_softcap=float(cap) if cap else None,
        )


class Olmo2(Llama):
    """OLMo 2 (OLMo Team 2024): norms only on each sublayer's output, and an RMSNorm over
    the whole q and k projections."""

    family = "olmo2"
    base = dataclasses.replace(
        _ROTARY_RMS_GATED, family="olmo2", pre_norms=False, post_norms=True, qk_norm="proj"
    )


class StableLM(HFAdapter):
    """StableLM 2: LayerNorm, partial rotary, SwiGLU; parallel blocks share ``ln1``."""

    family = "stablelm"
    base = ArchSpec(family="stablelm", norm="ln", positions="rotary", gated_mlp=True)

    def spec(self, config: Any) -> ArchSpec:
        if getattr(config, "qk_layernorm", False):
            raise Unsupported("stablelm with per-head q/k LayerNorms")
        parallel = bool(getattr(config, "use_parallel_residual", False))
        return dataclasses.replace(self.base, parallel=parallel, shared_mlp_norm=parallel)


class Cohere(HFAdapter):
    """Cohere Command-R: a parallel block sharing one bias-free LayerNorm, interleaved
    rotary, SwiGLU, logits multiplied by ``logit_scale``."""

    family = "cohere"
    base = ArchSpec(
        family="cohere",
        norm="ln",
        positions="rotary",
        rotary_interleaved=True,
        gated_mlp=True,
        parallel=True,
        shared_mlp_norm=True,
    )

    def spec(self, config: Any) -> ArchSpec:
        if getattr(config, "use_qk_norm", False):
            raise Unsupported("cohere with q/k norms")
        return dataclasses.replace(self.base, logit_scale=float(config.logit_scale))


class GPTNeoX(HFAdapter):
    """GPT-NeoX / Pythia (Black et al. 2022): parallel attention and MLP, each with its
    own LayerNorm; rotary on a fraction of each head (``rotary_pct``)."""

    family = "gpt_neox"
    base = ArchSpec(family="gpt_neox", norm="ln", positions="rotary", parallel=True)

    def spec(self, config: Any) -> ArchSpec:
        return dataclasses.replace(self.base, parallel=bool(config.use_parallel_residual))


class GPTJ(HFAdapter):
    """GPT-J (Wang & Komatsuzaki 2021): a parallel block sharing ``ln1``; rotary on the
    first ``rotary_dim`` channels, rotating interleaved pairs."""

    family = "gptj"
    base = ArchSpec(
        family="gptj",
        norm="ln",
        positions="rotary",
        rotary_interleaved=True,
        parallel=True,
        shared_mlp_norm=True,
    )

    def cos_sin(self, out: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        # GPT-J's module returns (sin, cos) of half width; each frequency serves a pair.
        sin, cos = out
        return cos[0].repeat_interleave(2, -1), sin[0].repeat_interleave(2, -1)


class Phi(HFAdapter):
    """Phi-1/2 (Microsoft): a parallel block sharing ``ln1``, partial rotary, GELU MLP."""

    family = "phi"
    base = ArchSpec(
        family="phi", norm="ln", positions="rotary", parallel=True, shared_mlp_norm=True
    )

    def spec(self, config: Any) -> ArchSpec:
        if getattr(config, "qk_layernorm", False):
            raise Unsupported("phi with q/k LayerNorms")
        return self.base


class Falcon(HFAdapter):
    """Falcon-7B (Almazrouei et al. 2023): multi-query attention, rotary, a parallel
    block sharing ``ln1``."""

    family = "falcon"
    base = ArchSpec(family="falcon", norm="ln", positions="rotary")

    def spec(self, config: Any) -> ArchSpec:
        if getattr(config, "alibi", False):
            raise Unsupported("falcon with ALiBi")
        if getattr(config, "new_decoder_architecture", False):
            # Falcon-40B's block: parallel, with separate norms for attention and MLP.
            return dataclasses.replace(self.base, parallel=True, shared_mlp_norm=False)
        parallel = bool(getattr(config, "parallel_attn", True))
        return dataclasses.replace(self.base, parallel=parallel, shared_mlp_norm=parallel)


class StarCoder2(HFAdapter):
    """StarCoder2 (BigCode 2024): LayerNorm, rotary, grouped-query attention, biases and
    a plain GELU MLP."""

    family = "starcoder2"
    base = ArchSpec(family="starcoder2", norm="ln", positions="rotary")


class Arcee(HFAdapter):
    """Arcee AFM: Llama with a plain (ungated) MLP of squared ReLU."""

    family = "arcee"
    base = ArchSpec(family="arcee", norm="rms", positions="rotary")


class MPT(HFAdapter):
    """MPT (MosaicML 2023): GPT-2's block without biases and with ALiBi (Press et al.
    2022) in place of position embeddings, its slopes from ``alibi_bias_max``."""

    family = "mpt"
    base = ArchSpec(family="mpt", norm="ln", positions="alibi")

    def spec(self, config: Any) -> ArchSpec:
        attn = config.attn_config
        if getattr(attn, "clip_qkv", None) or getattr(attn, "qk_ln", False):
            raise Unsupported("mpt with clip_qkv or q/k LayerNorms")
        if not getattr(attn, "alibi", True):
            raise Unsupported("mpt without ALiBi")
        return self.base

    def alibi_slopes(self, hf: Any, n_heads: int) -> Tensor:
        from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

        param = next(hf.parameters())
        bias_max = hf.config.attn_config.alibi_bias_max
        # Row 0 of a two-position table is -slope * 1 for every head.
        table = build_mpt_alibi_tensor(n_heads, 2, bias_max, device=param.device)
        return (-table[:, 0, 0]).to(param.dtype)

    def attn_scale(self, attn: Any, d_head: int) -> float:
        return 1.0 / float(attn.softmax_scale)


class GPTNeo(HFAdapter):
    """GPT-Neo (Black et al. 2021): GPT-2 with unscaled attention scores and local
    (sliding-window) attention on the layers ``attention_layers`` marks ``local``."""

    family = "gpt_neo"
    base = ArchSpec(family="gpt_neo", norm="ln", positions="learned")

    def attn_scale(self, attn: Any, d_head: int) -> float:
        return 1.0

    def window(self, layer: int, attn: Any, config: Any) -> int | None:
        local = config.attention_layers[layer] == "local"
        return int(config.window_size) if local else None


class GPTBigCode(HFAdapter):
    """GPT-BigCode / SantaCoder: GPT-2 with multi-query attention."""

    family = "gpt_bigcode"
    base = ArchSpec(family="gpt_bigcode", norm="ln", positions="learned")


class Bloom(HFAdapter):
    """BLOOM (BigScience 2022): ALiBi position biases (Press et al. 2022) instead of
    position embeddings, and a LayerNorm right after the embedding."""

    family = "bloom"
    base = ArchSpec(family="bloom", norm="ln", positions="alibi")

    def alibi_slopes(self, hf: Any, n_heads: int) -> Tensor:
        from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

        device = next(hf.parameters()).device
        return _get_alibi_slopes(n_heads, device).to(next(hf.parameters()).dtype)


class Gemma3(Gemma2):
    """Gemma 3 (Gemma Team 2025): Gemma 2 with an RMSNorm on each head's q and k instead
    of soft-capping, and local layers that rotate with their own base (one rotary table
    per layer type, from the model's own module)."""

    family = "gemma3"

    def spec(self, config: Any) -> ArchSpec:
        return dataclasses.replace(super().spec(config), family=self.family, qk_norm="head")


class Olmo3(Olmo2):
    """OLMo 3: OLMo 2 with sliding-window layers, which rotate with their own table."""

    family = "olmo3"
    base = dataclasses.replace(Olmo2.base, family="olmo3")


class Olmoe(Llama):
    """OLMoE (Muennighoff et al. 2024): a pre-norm Llama block with OLMo-2's q/k norm over
    the whole projection, and a sparse mixture-of-experts MLP."""

    family = "olmoe"
    base = dataclasses.replace(_ROTARY_RMS_GATED, family="olmoe", qk_norm="proj")

    def spec(self, config: Any) -> ArchSpec:
        if getattr(config, "clip_qkv", None) is not None:
            raise Unsupported("olmoe with clip_qkv (q, k and v clamped after the q/k norm)")
        return self.base


class SmolLM3(Llama):
    """SmolLM3 (Hugging Face 2025): Llama with no rotary embedding in every fourth layer
    (``no_rope_layers``; each layer's attention says ``use_rope``)."""

    family = "smollm3"
    base = dataclasses.replace(_ROTARY_RMS_GATED, family="smollm3")


class GptOss(Llama):
    """gpt-oss (OpenAI 2025): a Llama-style block with biases, per-head attention sinks,
    sliding-window attention on alternate layers, YaRN rotary and a mixture of experts.
    Its rotary module gives half-width cos/sin that rotate the halves of each head."""

    family = "gpt_oss"
    base = dataclasses.replace(_ROTARY_RMS_GATED, family="gpt_oss")

    def cos_sin(self, out: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        cos, sin = out
        return torch.cat([cos[0], cos[0]], dim=-1), torch.cat([sin[0], sin[0]], dim=-1)


ADAPTERS: dict[str, HFAdapter] = {
    "bloom": Bloom(),
    "llama": Llama(),
    "mistral": Llama(),
    "qwen2": Llama(),
    "phi3": Llama(),
    "granite": Granite(),
    "qwen3": Qwen3(),
    "gemma": Gemma(),
    "gemma2": Gemma2(),
    "gemma3_text": Gemma3(),
    "mixtral": Llama(),
    "qwen2_moe": Llama(),
    "qwen3_moe": Qwen3(),
    "olmo3": Olmo3(),
    "olmoe": Olmoe(),
    "smollm3": SmolLM3(),
    "gpt_oss": GptOss(),
    "granitemoe": Granite(),
    "phimoe": Llama(),
    "seed_oss": Llama(),
    "hunyuan_v1_dense": HunYuan(),
    "olmo": Olmo(),
    "starcoder2": StarCoder2(),
    "arcee": Arcee(),
    "mpt": MPT(),
    "olmo2": Olmo2(),
    "stablelm": StableLM(),
    "cohere": Cohere(),
    "gpt_neox": GPTNeoX(),
    "gptj": GPTJ(),
    "phi": Phi(),
    "falcon": Falcon(),
    "gpt_neo": GPTNeo(),
    "gpt_bigcode": GPTBigCode(),
}
"""``transformers`` ``model_type`` -> its family's adapter."""
