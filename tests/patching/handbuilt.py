"""A hand-built two-layer model whose circuit is known exactly, for every patching method.

Prompts are ``[BOS, X, f, f, ...]``; the answer is ``X`` and the corrupted prompt puts
``Y`` in place of ``X`` (the wrong answer is ``Y``). The model has no LayerNorm, so every
path is written by hand into its own block of residual dimensions:

- ``a0.h0`` (planted, "mover"): every query attends to position 1 and copies its token
  into subspace S1.
- ``m0`` (planted): copies S1 into S2 (relu(x) − relu(−x) = x, so it is linear).
- ``a1.h0`` (planted): attends uniformly, reads S2 and writes S3, which the unembedding
  reads: logit[X] − logit[Y] = 5 · (n − 1) / n at a prompt of n tokens.
- ``a0.h1`` (decoy): attends to position 1 like ``a0.h0`` and sees the changed token, but
  writes subspace D1, which only the decoy MLP reads.
- ``m1`` (decoy): copies D1 into D2, which nothing reads.
- ``a1.h1`` (decoy): attends to position 1, reads the token itself and writes D2.

So noising any planted node flips the logit difference (effect −2 × clean), and every
decoy has effect 0. Path patching to the logits sees only ``a1.h0``; to ``a1.h0<v>`` it
sees ``a0.h0`` and ``m0`` (and with ``freeze_mlps`` only ``m0``, because ``a0.h0`` reaches
``a1.h0`` only through ``m0``).
"""

from __future__ import annotations

from typing import Any

import torch

import reuse_lens as rl

PLANTED = ("a0.h0", "m0", "a1.h0")
DECOYS = ("a0.h1", "m1", "a1.h1")

_V, _CTX, _D, _HEADS, _DH, _MLP = 10, 8, 64, 2, 8, 32
_BOS, _FILL = 0, 9
_TOK, _POS, _ONE = 0, 10, 18  # token one-hots 0..9, position one-hots 10..17, constant 18
_S1, _S2, _S3, _D1, _D2 = 20, 28, 36, 44, 52  # 8 dimensions each


def build_model() -> Any:
    """The hand-built native bridge (no LayerNorm, relu MLPs)."""
    model = rl.load_model(
        dict(
            d_model=_D, d_head=_DH, n_heads=_HEADS, n_layers=2, n_ctx=_CTX, d_vocab=_V,
            d_mlp=_MLP, act_fn="relu", normalization_type=None, seed=0,
        )
    )  # fmt: skip
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.zero_()

        def get(suffix: str) -> torch.Tensor:
            (name,) = [n for n in params if n.endswith(suffix)]
            return params[name]

        embed = get("tok_embed._original_component.weight")  # (vocab, d_model)
        for t in range(1, _V):
            embed[t, _TOK + t] = 1.0
        pos = get("pos._original_component.weight")  # (n_ctx, d_model)
        for p in range(_CTX):
            pos[p, _POS + p] = 1.0
            pos[p, _ONE] = 1.0

        def attn(layer: int, part: str) -> torch.Tensor:
            return get(
                f"layers.{layer}._original_component.attn._original_component.{part}._original_component.weight"
            )

        def to_position_one(layer: int, head: int) -> None:
            # q reads the constant dimension, k the position-1 one-hot: a score of
            # 400 / sqrt(d_head) for key 1 and 0 elsewhere, so ~all attention is on it.
            attn(layer, "q")[head * _DH, _ONE] = 20.0
            attn(layer, "k")[head * _DH, _POS + 1] = 20.0

        def copy(layer: int, head: int, src: int, dst: int) -> None:
            for i in range(8):
                attn(layer, "v")[head * _DH + i, src + i] = 1.0
                attn(layer, "o")[dst + i, head * _DH + i] = 1.0

        to_position_one(0, 0)
        copy(0, 0, _TOK + 1, _S1)  # a0.h0: token at position 1 -> S1
        to_position_one(0, 1)
        copy(0, 1, _TOK + 1, _D1)  # a0.h1 (decoy): token -> D1
        copy(1, 0, _S2, _S3)  # a1.h0: uniform attention, S2 -> S3
        to_position_one(1, 1)
        copy(1, 1, _TOK + 1, _D2)  # a1.h1 (decoy): token -> D2

        def mlp_copy(layer: int, src: int, dst: int) -> None:
            w_in = get(
                f"layers.{layer}._original_component.mlp._original_component.fc_in._original_component.weight"
            )
            w_out = get(
                f"layers.{layer}._original_component.mlp._original_component.fc_out._original_component.weight"
            )
            for i in range(8):  # relu(x) - relu(-x) = x
                w_in[2 * i, src + i], w_in[2 * i + 1, src + i] = 1.0, -1.0
                w_out[dst + i, 2 * i], w_out[dst + i, 2 * i + 1] = 1.0, -1.0

        mlp_copy(0, _S1, _S2)
        mlp_copy(1, _D1, _D2)
        unembed = get("head._original_component.weight")  # (vocab, d_model)
        for i in range(8):
            unembed[1 + i, _S3 + i] = 5.0
    return model.eval()


def build_task(model: Any, lengths: tuple[int, ...] = (5, 5, 4, 6)) -> rl.Task:
    """Prompt pairs ``[BOS, X, f, ...]`` / ``[BOS, Y, f, ...]``; answer X, wrong Y."""
    clean, corrupted, answers, wrong = [], [], [], []
    for i, length in enumerate(lengths):
        x, y = 1 + i % 8, 1 + (i + 3) % 8
        clean.append([_BOS, x] + [_FILL] * (length - 2))
        corrupted.append([_BOS, y] + [_FILL] * (length - 2))
        answers.append(x)
        wrong.append(y)
    return rl.Task.from_pairs(model, clean, corrupted, answers, wrong, name="handbuilt")
