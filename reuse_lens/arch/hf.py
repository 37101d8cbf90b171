"""The generic adapter: read a ``transformers`` decoder's weights through its bridge.

TransformerBridge gives every architecture the same component names (``embed``,
``pos_embed``, ``blocks[i].ln1/ln2/ln1_post/ln2_post``, ``attn.q/k/v/o`` and
``attn.q_norm/k_norm``, ``mlp.gate/in/out``, ``ln_final``, ``unembed``, and
``rotary_emb`` on the HF model), each wrapping the original ``transformers`` module, and
splits fused projections (GPT-NeoX's ``query_key_value``, Phi-3's ``gate_up_proj``) into
those names. This adapter reads the original modules' weights under those names; a
family adapter (``families.py``) only says what its ``ArchSpec`` is and overrides the odd
piece (GPT-J's rotary table, GPT-Neo's local layers).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from reuse_lens.arch.spec import ArchSpec
from reuse_lens.patching._forward import Layer, Norm, Rope, Unsupported, Weights, repeat_kv

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["HFAdapter", "original"]


def original(component: Any) -> Any:
    """The ``transformers`` module behind a bridge component (or the module itself)."""
    return getattr(component, "original_component", component)


def _linear(component: Any, label: str) -> tuple[Tensor, Tensor | None]:
    """``(W, b)`` with ``W`` of shape ``(d_in, d_out)``, from a Linear or GPT-2's Conv1D."""
    module = original(component)
    weight = getattr(module, "weight", None)
    if weight is None:
        raise Unsupported(f"{label} is a {type(module).__name__} without a weight")
    # A view, not a copy: the functional forward shares the model's parameters.
    w = weight if type(module).__name__ == "Conv1D" else weight.T
    bias = getattr(module, "bias", None)
    return w.detach(), None if bias is None else bias.detach()


def _is_moe(mlp: Any) -> bool:
    """Whether a block's MLP is a sparse mixture of experts (TransformerLens's MoE bridge
    has no ``in``/``out`` linears; the module it wraps has ``experts``)."""
    return not hasattr(mlp, "in") and hasattr(original(mlp), "experts")


def _no_dense_mlp(x: Tensor) -> Tensor:
    raise RuntimeError("this model has no dense MLP: its MLPs are mixtures of experts")


class HFAdapter:
    """Reads one family of ``transformers`` decoders into ``Weights``.

    Subclasses set ``family`` and ``base`` (the family's ``ArchSpec`` before per-model
    numbers) and override ``spec`` for config-dependent switches, or one of the small
    hooks (``rope_table``, ``window``, ``attn_scale``) for a family's odd piece.
    """

    family: str = "llama"
    base: ArchSpec = ArchSpec()

    # ---- what a family says about itself ---------------------------------------------

    def spec(self, config: Any) -> ArchSpec:
        """The family's spec for one model config (override for config switches)."""
        return self.base

    def rope_table(
        self, hf: Any, layer_type: str | None = None
    ) -> Callable[[int], tuple[Tensor, Tensor]]:
        """cos/sin ``(n, rotary_dim)`` from the model's own rotary module; for
        ``layer_type`` (Gemma-3's and OLMo-3's ``"sliding_attention"``), that type's."""
        rotary = getattr(getattr(hf, "base_model", hf), "rotary_emb", None)
        if rotary is None:
            raise Unsupported(f"{self.family}: no rotary_emb module to take cos/sin from")
        rotary = original(rotary)
        dtype = next(hf.parameters()).dtype
        typed = () if layer_type is None else (layer_type,)

        def table(n: int) -> tuple[Tensor, Tensor]:
            device = next(hf.parameters()).device
            ids = torch.arange(n, device=device).unsqueeze(0)
            with torch.no_grad():
                out = rotary(torch.zeros(1, device=device, dtype=dtype), ids, *typed)
            return self.cos_sin(out)

        return table

    def ropes(self, hf: Any, spec: ArchSpec, n_layers: int) -> tuple[Rope, list[Rope | None]]:
        """The model's rotary embedding, and each layer's own where it has one.

        A rotary module that takes a layer type (Gemma-3, OLMo-3: local layers rotate
        with another base) gives one table per type in ``config.layer_types``.
        """
        rotary = original(getattr(getattr(hf, "base_model", hf), "rotary_emb", None))
        types = getattr(hf.config, "layer_types", None)
        if types is not None and len(types) != n_layers:
            raise Unsupported(f"{self.family}: {len(types)} layer types for {n_layers} layers")
        takes_type = (
            rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        )
        if not (takes_type and types):
            table = self.rope_table(hf)
            rope = Rope(int(table(1)[0].shape[-1]), spec.rotary_interleaved, table)
            return rope, [None] * n_layers
        by_type: dict[str, Rope] = {}
        for kind in dict.fromkeys(types):
            table = self.rope_table(hf, kind)
            by_type[kind] = Rope(int(table(1)[0].shape[-1]), spec.rotary_interleaved, table)
        per_layer: list[Rope | None] = [by_type[kind] for kind in types]
        return by_type[types[0]], per_layer

    def cos_sin(self, out: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """cos and sin ``(n, rotary_dim)`` from what the rotary module returned for one
        row of positions (``(cos, sin)``, each ``(1, n, rotary_dim)``, in most families)."""
        cos, sin = out
        return cos[0], sin[0]

    def alibi_slopes(self, hf: Any, n_heads: int) -> Tensor:
        """ALiBi's per-head slopes (families with ``positions="alibi"`` override this)."""
        raise Unsupported(f"{self.family}: no ALiBi slopes")

    def window(self, layer: int, attn: Any, config: Any) -> int | None:
        """The sliding-window width of ``layer`` (None: global attention)."""
        window = getattr(attn, "sliding_window", None)
        return int(window) if window else None

    def sinks(self, attn: Any, n_heads: int) -> Tensor | None:
        """Per-head attention sinks (GPT-OSS's ``sinks``), one logit per query head."""
        sinks = getattr(attn, "sinks", None)
        if sinks is None:
            return None
        if tuple(sinks.shape) != (n_heads,):
            raise Unsupported(f"{self.family}: attention sinks of shape {tuple(sinks.shape)}")
        return sinks.detach()

    def attn_scale(self, attn: Any, d_head: int) -> float:
        """What the attention scores are divided by."""
        scaling = getattr(attn, "scaling", None)
        if scaling is None:
            scaling = getattr(attn, "inv_norm_factor", None)
        return 1.0 / float(scaling) if scaling else math.sqrt(d_head)

    # ---- reading -----------------------------------------------------------------------

    def norm(self, component: Any, spec: ArchSpec, label: str) -> Norm | None:
        module = original(component)
        if module is None or isinstance(module, nn.Identity):
            return None
        name = type(module).__name__
        weight = getattr(module, "weight", None)
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", spec.norm_eps))
        if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm"):
            bias = getattr(module, "bias", None)
            return Norm(
                None if weight is None else weight.detach(),
                None if bias is None else bias.detach(),
                float(eps),
            )
        if "RMSNorm" in name and weight is not None:
            return Norm(weight.detach().float() + spec.norm_offset, None, float(eps), rms=True)
        raise Unsupported(f"{label} is a {name}, which this adapter cannot compute")

    def extract(self, bridge: TransformerBridge) -> Weights:
        hf = bridge.original_model
        config = hf.config
        spec = self.spec(config)
        cfg = bridge.cfg
        n_heads, d_head = int(cfg.n_heads), int(cfg.d_head)
        n_layers = int(cfg.n_layers)
        rope: Rope | None = None
        layer_ropes: list[Rope | None] = [None] * n_layers
        if spec.positions == "rotary":
            rope, layer_ropes = self.ropes(hf, spec, n_layers)
            spec = dataclasses.replace(spec, rotary_dim=rope.dim)
        with torch.no_grad():
            layers = [
                dataclasses.replace(
                    self._layer(bridge, i, spec, n_heads, d_head),
                    rope=None if layer_ropes[i] is rope else layer_ropes[i],
                )
                for i in range(n_layers)
            ]
            first_attn = original(bridge.blocks[0].attn)
            n_kv = _linear(bridge.blocks[0].attn.k, "blocks.0.attn.k")[0].shape[1] // d_head
            spec = dataclasses.replace(
                spec,
                n_kv_heads=int(n_kv),
                attn_scale=self.attn_scale(first_attn, d_head),
                sliding_window=next((ly.window for ly in layers if ly.window), None),
            )
            if spec.attn_softcap is None:
                cap = getattr(first_attn, "attn_logit_softcapping", None)
                spec = dataclasses.replace(spec, attn_softcap=float(cap) if cap else None)
            embed = original(bridge.embed)
            w_e = embed.weight.detach()
            scale = float(getattr(embed, "scalar_embed_scale", 1.0)) * spec.embed_scale
            if scale != 1.0:  # Gemma multiplies embeddings by sqrt(d_model)
                w_e = w_e * torch.tensor(scale, dtype=w_e.dtype)
            pos_embed = getattr(bridge, "pos_embed", None) if spec.positions == "learned" else None
            w_pos = None if pos_embed is None else original(pos_embed).weight.detach()
            w_u, b_u = _linear(bridge.unembed, "unembed")
            if spec.logit_scale != 1.0:
                w_u = w_u * spec.logit_scale
                b_u = None if b_u is None else b_u * spec.logit_scale
            act = self._act(bridge)
            return Weights(
                w_e=w_e,
                w_pos=w_pos,
                layers=layers,
                ln_final=self.norm(getattr(bridge, "ln_final", None), spec, "ln_final"),
                w_u=w_u,
                b_u=b_u,
                act=act,
                n_heads=n_heads,
                d_head=d_head,
                scale=float(spec.attn_scale or math.sqrt(d_head)),
                spec=spec,
                rope=rope,
                alibi=self.alibi_slopes(hf, n_heads) if spec.positions == "alibi" else None,
                embed_norm=self.norm(getattr(bridge, "embed_ln", None), spec, "embed_ln"),
            )

    def _act(self, bridge: TransformerBridge) -> Callable[[Tensor], Tensor]:
        """The dense MLPs' activation (the first dense block's); a model whose every MLP
        is a mixture of experts computes them with its own modules and needs none."""
        dense = [block.mlp for block in bridge.blocks if not _is_moe(block.mlp)]
        if not dense:
            return _no_dense_mlp
        module = original(dense[0])
        for name in ("act_fn", "act", "activation_fn", "gelu_impl"):
            act = getattr(module, name, None)
            if callable(act):  # the model's own activation module, e.g. ACT2FN["gelu_new"]
                return cast("Callable[[Tensor], Tensor]", act)
        raise Unsupported(f"{self.family}: cannot find the MLP's activation function")

    def _layer(
        self, bridge: TransformerBridge, i: int, spec: ArchSpec, n_heads: int, d_head: int
    ) -> Layer:
        block = bridge.blocks[i]
        attn = block.attn
        label = f"blocks.{i}"
        w_q, b_q = _linear(attn.q, f"{label}.attn.q")
        w_k, b_k = _linear(attn.k, f"{label}.attn.k")
        w_v, b_v = _linear(attn.v, f"{label}.attn.v")
        w_o, b_o = _linear(attn.o, f"{label}.attn.o")
        n_kv = w_k.shape[1] // d_head
        if w_q.shape[1] != n_heads * d_head or n_heads % max(n_kv, 1) or w_v.shape != w_k.shape:
            raise Unsupported(f"{label}: unexpected q/k/v widths {w_q.shape[1]}/{w_k.shape[1]}")

        def bias(b: Tensor | None, width: int) -> Tensor:
            return w_q.new_zeros(width) if b is None else b  # GPT-Neo, Llama: no biases

        width = n_heads * d_head
        b_q = bias(b_q, width)
        b_o = bias(b_o, w_o.shape[1])
        q_norm = self.norm(getattr(attn, "q_norm", None), spec, f"{label}.attn.q_norm")
        k_norm = self.norm(getattr(attn, "k_norm", None), spec, f"{label}.attn.k_norm")
        # Grouped-query attention: the forward projects each key/value head once
        # (``Layer.fused``), except under a norm over the whole key projection.
        grouped = n_kv < n_heads and spec.qk_norm != "proj"
        if grouped:
            b_k, b_v = bias(b_k, n_kv * d_head), bias(b_v, n_kv * d_head)
        else:
            w_k, w_v = repeat_kv(w_k, n_kv, n_heads), repeat_kv(w_v, n_kv, n_heads)
            b_k = bias(None if b_k is None else repeat_kv(b_k, n_kv, n_heads), width)
            b_v = bias(None if b_v is None else repeat_kv(b_v, n_kv, n_heads), width)
        if k_norm is not None and k_norm.weight is not None and spec.qk_norm == "proj":
            # OLMo-2 normalises the whole key projection; its RMS is unchanged by
            # repeating every key head equally often, so the weight repeats with them.
            k_norm = dataclasses.replace(k_norm, weight=repeat_kv(k_norm.weight, n_kv, n_heads))
        mlp = block.mlp
        w_in = b_in = w_out = b_out = w_gate = b_gate = None
        moe = _is_moe(mlp)
        if not moe:
            w_in, b_in = _linear(getattr(mlp, "in"), f"{label}.mlp.in")
            w_out, b_out = _linear(mlp.out, f"{label}.mlp.out")
            if spec.gated_mlp:
                w_gate, b_gate = _linear(mlp.gate, f"{label}.mlp.gate")
            elif hasattr(mlp, "gate"):
                raise Unsupported(f"{label}: the MLP is gated but the {self.family} spec says not")
        r = spec.residual_scale  # Granite scales every sublayer's output
        if r != 1.0:
            w_o, b_o = w_o * r, b_o * r
            if w_out is not None:
                w_out = w_out * r
                b_out = None if b_out is None else b_out * r
        ln1 = self.norm(getattr(block, "ln1", None), spec, f"{label}.ln1")
        ln2 = (
            ln1
            if spec.shared_mlp_norm
            else self.norm(getattr(block, "ln2", None), spec, f"{label}.ln2")
        )
        post = spec.post_norms
        return Layer.fused(
            ln1=ln1,
            w_q=w_q,
            b_q=b_q,
            w_k=w_k,
            b_k=b_k,
            w_v=w_v,
            b_v=b_v,
            w_o=w_o,
            b_o=b_o,
            ln2=ln2,
            w_in=w_in,
            b_in=b_in,
            w_out=w_out,
            b_out=b_out,
            w_gate=w_gate,
            b_gate=b_gate,
            q_norm=q_norm,
            k_norm=k_norm,
            attn_post=self.norm(getattr(block, "ln1_post", None), spec, f"{label}.ln1_post")
            if post
            else None,
            mlp_post=self.norm(getattr(block, "ln2_post", None), spec, f"{label}.ln2_post")
            if post
            else None,
            window=self.window(i, original(attn), bridge.original_model.config),
            mlp_module=original(mlp) if moe else None,
            mlp_scale=r if moe else 1.0,
            nope=not getattr(original(attn), "use_rope", True),
            sinks=self.sinks(original(attn), n_heads),
            n_heads=n_heads if grouped else None,
        )
