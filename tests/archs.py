"""Tiny random-weight models of every architecture family, built from ``transformers`` configs.

Each model is saved with a word-level tokenizer and loaded through ``rl.load_model(folder)``:
the same path a user's checkpoint takes. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

D_MODEL = 64
N_HEADS = 4
N_KV = 2
"""Grouped-query models share each key/value head between two query heads."""

_COMMON = dict(hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=N_HEADS)

_EXPERTS_LOCAL = dict(num_local_experts=4, num_experts_per_tok=2)
"""Four experts, two a token (the config names of Mixtral, GPT-OSS, Granite-MoE)."""

ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", dict(n_embd=D_MODEL, n_layer=2, n_head=N_HEADS, n_positions=128)),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(**_COMMON, intermediate_size=128, rotary_pct=0.5, max_position_embeddings=128),
    ),
    "llama": (
        "LlamaConfig",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_HEADS),
    ),
    "llama_gqa": (
        "LlamaConfig",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV),
    ),
    "qwen2": ("Qwen2Config", dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV)),
    "qwen3": (
        "Qwen3Config",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV, head_dim=16),
    ),
    "gemma": (
        "GemmaConfig",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=1, head_dim=16),
    ),
    "gemma2": (
        "Gemma2Config",
        dict(
            **_COMMON,
            intermediate_size=128,
            num_key_value_heads=N_KV,
            head_dim=16,
            sliding_window=4,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV, sliding_window=None),
    ),
    "phi": ("PhiConfig", dict(**_COMMON, intermediate_size=128, partial_rotary_factor=0.5)),
    "phi3": ("Phi3Config", dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV)),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=D_MODEL,
            num_hidden_layers=2,
            num_attention_heads=N_HEADS,
            ffn_dim=128,
            word_embed_proj_dim=D_MODEL,
            max_position_embeddings=128,
        ),
    ),
    "gptj": (
        "GPTJConfig",
        dict(n_embd=D_MODEL, n_layer=2, n_head=N_HEADS, rotary_dim=8, n_positions=128),
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        dict(
            hidden_size=D_MODEL,
            num_layers=2,
            num_heads=N_HEADS,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            max_position_embeddings=128,
        ),
    ),
    "olmo2": ("Olmo2Config", dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV)),
    "bloom": ("BloomConfig", dict(hidden_size=D_MODEL, n_layer=2, n_head=N_HEADS)),
    "falcon": (
        "FalconConfig",
        dict(**_COMMON, new_decoder_architecture=False, multi_query=True, parallel_attn=True),
    ),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        dict(n_embd=D_MODEL, n_layer=2, n_head=N_HEADS, multi_query=True, n_positions=128),
    ),
    "granite": (
        "GraniteConfig",
        dict(
            **_COMMON,
            intermediate_size=128,
            num_key_value_heads=N_KV,
            # Granite's scalars, none of them 1: a factor a forward pass or an engine
            # forgets shows in every comparison.
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            logits_scaling=2.0,
            attention_multiplier=0.25,
        ),
    ),
    "stablelm": (
        "StableLmConfig",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV),
    ),
    "cohere": ("CohereConfig", dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV)),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            **_COMMON,
            intermediate_size=128,
            num_key_value_heads=N_KV,
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(**_COMMON, intermediate_size=32, num_key_value_heads=N_KV, **_EXPERTS_LOCAL),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            **_COMMON,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_key_value_heads=N_KV,
            num_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            **_COMMON,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_key_value_heads=N_KV,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            **_COMMON,
            intermediate_size=32,
            num_key_value_heads=N_KV,
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            **_EXPERTS_LOCAL,
        ),
    ),
    "olmo3": (
        "Olmo3Config",
        dict(
            **_COMMON,
            intermediate_size=128,
            num_key_value_heads=N_KV,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(
            **_COMMON,
            intermediate_size=32,
            num_key_value_heads=N_KV,
            num_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    "smollm3": (
        "SmolLM3Config",
        # Layer 1 has no rotary embedding (SmolLM3 drops it in every fourth layer).
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV, no_rope_layers=[1, 0]),
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        dict(
            **_COMMON,
            intermediate_size=32,
            num_key_value_heads=N_KV,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            logits_scaling=2.0,
            attention_multiplier=0.25,
            **_EXPERTS_LOCAL,
        ),
    ),
    "starcoder2": (
        "Starcoder2Config",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV),
    ),
    "seed_oss": (
        "SeedOssConfig",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV, head_dim=16),
    ),
    "arcee": ("ArceeConfig", dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV)),
    "olmo": ("OlmoConfig", dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV)),
    "hunyuan": (
        "HunYuanDenseV1Config",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV, head_dim=16),
    ),
    # Patched through hooks (no functional adapter reads them).
    "mpt": ("MptConfig", dict(d_model=D_MODEL, n_layers=2, n_heads=N_HEADS, max_seq_len=128)),
    "openai_gpt": (
        "OpenAIGPTConfig",
        dict(n_embd=D_MODEL, n_layer=2, n_head=N_HEADS, n_positions=128),
    ),
    "phimoe": (
        "PhimoeConfig",
        dict(
            **_COMMON,
            intermediate_size=32,
            num_key_value_heads=N_KV,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    "glm": (
        "GlmConfig",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV, head_dim=16),
    ),
    "glm4": (
        "Glm4Config",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV, head_dim=16),
    ),
    "ernie4_5": (
        "Ernie4_5Config",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV, head_dim=16),
    ),
    "nemotron": (
        "NemotronConfig",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV),
    ),
    "vaultgemma": (
        "VaultGemmaConfig",
        dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV, head_dim=16),
    ),
    "cohere2": (
        "Cohere2Config",
        dict(
            **_COMMON,
            intermediate_size=128,
            num_key_value_heads=N_KV,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "exaone4": ("Exaone4Config", dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV)),
    "apertus": ("ApertusConfig", dict(**_COMMON, intermediate_size=128, num_key_value_heads=N_KV)),
    "xglm": (
        "XGLMConfig",
        dict(d_model=D_MODEL, num_layers=2, attention_heads=N_HEADS, ffn_dim=128),
    ),
    # Falcon's new decoder architecture with one key/value head (more fail to load).
    "falcon_new": ("FalconConfig", dict(**_COMMON, new_decoder_architecture=True, num_kv_heads=1)),
}
"""name -> (``transformers`` config class, its fields). Attention models have 2 layers,
d_model 64 and 4 query heads."""

_MAMBA2_HEADS = dict(mamba_n_heads=8, mamba_d_head=16, mamba_expand=2, mamba_d_state=8)
_MAMBA2 = dict(**_MAMBA2_HEADS, mamba_n_groups=1, mamba_chunk_size=4)

REFUSED: dict[str, tuple[str, dict[str, Any]]] = {
    # No attention.
    "mamba": ("MambaConfig", dict(hidden_size=D_MODEL, num_hidden_layers=2, state_size=4)),
    # Hybrids: attention in some layers, other mixers in the others or beside it.
    "jamba": (
        "JambaConfig",
        dict(
            **_COMMON,
            intermediate_size=64,
            num_key_value_heads=N_KV,
            num_experts=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            mamba_dt_rank=8,
        ),
    ),
    "bamba": (
        "BambaConfig",
        dict(
            **_COMMON,
            intermediate_size=64,
            num_key_value_heads=N_KV,
            attn_layer_indices=[1],
            **_MAMBA2,
        ),
    ),
    "lfm2": (
        "Lfm2Config",
        dict(
            **_COMMON,
            num_key_value_heads=N_KV,
            intermediate_size=128,
            layer_types=["conv", "full_attention"],
        ),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(
            **_COMMON,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_key_value_heads=N_KV,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            layer_types=["linear_attention", "full_attention"],
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
        ),
    ),
    "falcon_h1": (
        "FalconH1Config",
        dict(
            **_COMMON,
            intermediate_size=64,
            num_key_value_heads=N_KV,
            mamba_d_ssm=64,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=8,
            mamba_n_groups=1,
            mamba_chunk_size=4,
        ),
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        dict(
            **_COMMON,
            intermediate_size=32,
            shared_intermediate_size=32,
            num_key_value_heads=N_KV,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["mamba", "attention"],
            position_embedding_type="rope",  # TransformerLens 4.3 runs it with rotary only
            **_MAMBA2,
        ),
    ),
    # A mixture of attention heads: no fixed heads.
    "jetmoe": (
        "JetMoeConfig",
        dict(
            hidden_size=D_MODEL,
            num_hidden_layers=2,
            num_key_value_heads=2,
            kv_channels=16,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    # Multi-head latent attention, a value width other than the query/key width.
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            **_COMMON,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_key_value_heads=N_HEADS,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_group=1,
            topk_group=1,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            **_COMMON,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_key_value_heads=N_HEADS,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
        ),
    ),
}
"""Architectures that every node and edge method refuses (``reuse_lens.arch.support``)."""

ARCHS.update(REFUSED)

HOOKS_ONLY = (
    "openai_gpt",
    "glm",
    "glm4",
    "ernie4_5",
    "nemotron",
    "vaultgemma",
    "cohere2",
    "exaone4",
    "apertus",
    "xglm",
)
"""Families no functional adapter reads: every method runs through hooks on the bridge."""

FUNCTIONAL = tuple(name for name in ARCHS if name not in REFUSED and name not in HOOKS_ONLY)
"""Families a functional adapter reads (``reuse_lens.arch``)."""

SWEPT_SLOWLY = frozenset(
    {
        "qwen2_moe",
        "olmo3",
        "granitemoe",
        "phimoe",
        "mpt",
        "falcon_new",
        "starcoder2",
        "seed_oss",
        "arcee",
        "olmo",
        "hunyuan",
    }
)
"""Families whose per-family sweeps run in the slow tier only: each shares its block with
a family that the default tier sweeps (Qwen3-MoE, OLMo-2, Granite, Mixtral, BLOOM, ...),
and the default tier still checks its logits against the bridge's."""


def family_params(names: tuple[str, ...] | list[str]) -> list[Any]:
    """``names`` as pytest parameters, those in ``SWEPT_SLOWLY`` marked slow."""
    import pytest

    return [pytest.param(n, marks=pytest.mark.slow) if n in SWEPT_SLOWLY else n for n in names]


def save_arch(name: str, folder: Path, tokenizer: Any, *, seed: int = 0, **overrides: Any) -> Path:
    """Build architecture ``name`` with random weights and save it, with ``tokenizer``.

    ``overrides`` replace config fields, e.g. ``num_hidden_layers=3``.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, fields = ARCHS[name]
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer.get_vocab()),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**fields, **overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _scale_up(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _scale_up(model: torch.nn.Module) -> None:
    """Larger random weights, so that heads differ and attention is far from uniform, and
    norm weights and biases that are not their initial ones and zeros.

    ``transformers`` initialises with std 0.02, which makes every head of a tiny model
    attend almost uniformly; patching effects would then be too small to tell apart. Norms
    start at weight 1 (Gemma's ``1 + w`` at 0): a forward pass that dropped a norm's weight,
    or applied it in the wrong place (before or after rotary), would go unnoticed. Experts
    stored as one ``(expert, out, in)`` tensor are matrices too: left at std 0.02 they would
    add almost nothing, and no expert could be told from another.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() in (2, 3) and "norm" not in name and "ln" not in name:
                p.mul_(8.0)
            elif p.dim() == 1:
                p.add_(0.25 * torch.randn_like(p))


def expand_kv(folder: Path, out: Path) -> Path:
    """The multi-head twin of a grouped-query model: each key/value head repeated per query head.

    Both compute the same function, so every method must score them the same.
    """
    import json

    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "config.json").read_text())
    n_heads = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    group = n_heads // n_kv
    state = load_file(folder / "model.safetensors")
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    if not any(key.endswith("k_proj.weight") for key in state):
        raise ValueError(f"{folder} has no separate k_proj/v_proj to expand")
    expanded = {}
    for key, value in state.items():
        # Projections, their biases, and a norm over the whole key width (OLMo-2's k_norm;
        # Qwen3's is per head, of length head_dim, and stays) are laid out head-major.
        per_head = key.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"))
        whole_norm = key.endswith("k_norm.weight") and value.shape[0] == n_kv * head_dim > head_dim
        if per_head or whole_norm:
            value = value.unflatten(0, (n_kv, -1)).repeat_interleave(group, 0).flatten(0, 1)
        expanded[key] = value.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(expanded, out / "model.safetensors", metadata={"format": "pt"})
    config["num_key_value_heads"] = n_heads
    (out / "config.json").write_text(json.dumps(config))
    for extra in folder.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            (out / extra.name).write_bytes(extra.read_bytes())
    return out


_LOADED: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}


def load_arch(name: str, root: Path, tokenizer: Any, **overrides: Any) -> Any:
    """``rl.load_model`` of architecture ``name``, built once per test session under ``root``."""
    import reuse_lens as rl

    key = (name, tuple(sorted(overrides.items())))
    if key not in _LOADED:
        label = "-".join([name, *(f"{k}{v}" for k, v in key[1])])
        _LOADED[key] = rl.load_model(save_arch(name, root / label, tokenizer, **overrides))
    return _LOADED[key]
