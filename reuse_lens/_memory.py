"""One memory budget for every engine: how it is set, and how many items fit under it.

The budget bounds the working memory one call allocates on top of the model's weights:
the runs it caches and the chunk it is computing. Every engine splits its work into
items (a (patch, prompt) row of a forward pass, a prompt of a backward pass) and takes as
many items per chunk as the budget holds. The bytes of one item are estimated here, from
the model's shapes, so that no engine learns its chunk size by running out of memory.

Precedence: the ``memory_budget=`` argument, then the ``REUSE_LENS_MEMORY_BUDGET``
environment variable, then the default: 2 GiB on the CPU and half the free memory of the
GPU at the time of the call. 2 GiB: the earlier default of 1 GiB counted one chunk's
activations only; the budget now also holds the cached runs, and 2 GiB keeps the chunks
of GPT-2-sized work at about their earlier size while fitting any laptop. Half the free
GPU memory: the other half is headroom for the allocator's fragmentation and the error of
the estimates, and a shared GPU keeps what its other users hold (docs/scale.md).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = [
    "DEFAULT_CPU_BUDGET",
    "ENV_VAR",
    "HEADROOM",
    "MemoryBudget",
    "Shapes",
    "chunk_items",
    "edge_attribution_plan",
    "nbytes",
    "parse_budget",
    "resolve_budget",
]

logger = logging.getLogger(__name__)

MemoryBudget = int | str | None
"""Bytes (an int), a size such as ``"2GiB"``, or None for the environment or the default."""

ENV_VAR = "REUSE_LENS_MEMORY_BUDGET"

DEFAULT_CPU_BUDGET = 2 << 30
"""The budget on the CPU when neither the argument nor the environment sets one."""

CUDA_FREE_FRACTION = 0.5
"""The share of the GPU's free memory the default budget takes."""

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_FORMS = (
    "a positive number of bytes (an int such as 2147483648) or a string such as '512MiB', "
    "'2GiB' or '1.5GB' (units B, KB, MB, GB, TB in powers of 1000; KiB, MiB, GiB, TiB in "
    "powers of 1024)"
)


def parse_budget(value: int | str, source: str = "memory_budget") -> int:
    """The budget in bytes, from an int or a size string; ``source`` names it in errors.

    Raises:
        ValueError: for anything but a positive size, naming the value and the forms taken.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{source}={value!r} is not a size: give {_FORMS}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{source}={value!r} must be positive: give {_FORMS}")
        return value
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit not in _UNITS and unit != ""):
        raise ValueError(f"{source}={value!r} is not a size: give {_FORMS}")
    size = math.floor(float(match.group(1)) * _UNITS.get(unit, 1))
    if size < 1:
        raise ValueError(f"{source}={value!r} must be at least one byte: give {_FORMS}")
    return size


def resolve_budget(value: MemoryBudget, device: torch.device | str | None = None) -> int:
    """The budget in bytes: the argument, else ``REUSE_LENS_MEMORY_BUDGET``, else the default
    for ``device`` (2 GiB on the CPU, half the free memory of a GPU)."""
    if value is not None:
        return parse_budget(value)
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip():
        return parse_budget(env, ENV_VAR)
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * CUDA_FREE_FRACTION))
    return DEFAULT_CPU_BUDGET


HEADROOM = 0.1
"""The share of a budget kept free of chunks: for the allocator's fragmentation and the
small temporaries (a chunk's metric, the sources' indexing) no estimate counts. Measured
at GPT-2 small, activation patching under 512 MiB peaked 3% above it without it."""


def chunk_items(budget: int, per_item: int, fixed: int = 0, what: str = "item") -> int:
    """How many items of ``per_item`` bytes fit in ``budget`` once ``fixed`` bytes are held
    (and ``HEADROOM`` of the budget is kept free).

    At least one: an item that alone exceeds the budget still runs (the work cannot be cut
    finer along this axis), with a warning naming the budget it overruns.
    """
    room = int(budget * (1 - HEADROOM)) - fixed
    if room < per_item:
        logger.warning(
            "memory budget %s is below what one %s needs (%s, on top of %s held): running "
            "one at a time, above the budget",
            format_bytes(budget),
            what,
            format_bytes(per_item),
            format_bytes(max(0, fixed)),
        )
        return 1
    return max(1, room // max(1, per_item))


def edge_attribution_plan(
    budget: int,
    shapes: Shapes,
    *,
    post_norm: bool = False,
    qk_norm: bool = False,
    batch_size: int | None = None,
    held: int = 0,
) -> tuple[int, int]:
    """Prompts per chunk and receivers' layers per gradient pass of edge attribution.

    Prompts are split first: the receivers of every layer in one pass, as many prompts as
    the budget holds. Where one prompt alone does not fit (a large model, long prompts),
    the receivers are split too: each pass probes as many layers' receivers as fit, which
    costs a forward and backward pass per group of layers. ``batch_size`` fixes the
    prompts; the layers are then chosen to fit them. ``held`` bytes are held throughout
    (the functional forward's own weights).
    """
    whole, budget = budget, int(budget * (1 - HEADROOM)) - held

    def per_prompt(layers: int) -> int:
        return shapes.edge_backward_prompt(post_norm=post_norm, qk_norm=qk_norm, layers=layers)

    if batch_size is None:
        if per_prompt(shapes.n_layers) <= budget:
            return budget // per_prompt(shapes.n_layers), shapes.n_layers
        batch_size = 1
    for layers in range(shapes.n_layers, 0, -1):
        if batch_size * per_prompt(layers) <= budget:
            return batch_size, layers
    # Not even one layer's receivers fit: run them one layer at a time, with the warning.
    chunk_items(whole, batch_size * per_prompt(1), held, "layer of edge attribution's receivers")
    return batch_size, 1


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes of ``tensors``' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def format_bytes(n: int | float) -> str:
    """``n`` bytes in the largest binary unit that keeps it at least 1 (``"1.5 GiB"``)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Shapes:
    """The sizes the estimates read: the model's, the prompts' width and bytes per number.

    ``itemsize`` is the model's dtype; the engines keep gradients, deltas and scores in
    float32 whatever the dtype (``F32``). k and v count one per *query* head, as the
    functional forward stores them (grouped-query models repeated).
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    width: int
    itemsize: int = 4

    @classmethod
    def of(cls, model: TransformerBridge, width: int) -> Shapes:
        cfg = model.cfg
        dtype = getattr(cfg, "dtype", None) or torch.float32
        return cls(
            n_layers=int(cfg.n_layers),
            d_model=int(cfg.d_model),
            n_heads=int(cfg.n_heads),
            d_head=int(cfg.d_head),
            d_mlp=int(cfg.d_mlp or 0),
            d_vocab=int(cfg.d_vocab),
            width=int(width),
            itemsize=torch.empty((), dtype=dtype).element_size(),
        )

    @property
    def n_senders(self) -> int:
        """``input``, then every head and MLP (``GraphIndex``)."""
        return 1 + self.n_layers * (self.n_heads + (1 if self.d_mlp else 0))

    @property
    def n_receivers(self) -> int:
        """q, k and v of every head, every MLP, and the logits."""
        return self.n_layers * (3 * self.n_heads + (1 if self.d_mlp else 0)) + 1

    # ---- bytes per item --------------------------------------------------------------

    def forward_row(self) -> int:
        """One (patch, prompt) row of a batched functional or hooked forward pass, no grad.

        One block is alive at a time: the residual stream and its norms, q/k/v/z, the
        attention scores and pattern, the MLP's hidden layer (twice for a gated one), with
        2x headroom for the temporaries of the elementwise ops; plus the answer logits.
        """
        hd = self.n_heads * self.d_head
        per_token = 8 * self.d_model + 6 * hd + 3 * self.d_mlp + 3 * self.n_heads * self.width
        return 2 * F32 * self.width * per_token + 2 * F32 * self.d_vocab

    def bridge_prompt(self) -> int:
        """One prompt of the bridge's own forward pass (``evaluation.answer_logits``): a
        forward row, and the logits of every position, which TransformerLens unembeds,
        with their float32 copy."""
        return self.forward_row() + (self.itemsize + F32) * self.width * self.d_vocab

    def run_cache(self) -> int:
        """One prompt of a cached functional run (``RunCache``): every layer's resid_pre,
        resid_mid, q, k, v, z, mlp_out and attention pattern."""
        hd = self.n_heads * self.d_head
        per_layer = 3 * self.d_model + 4 * hd + self.n_heads * self.width
        return self.itemsize * self.width * self.n_layers * per_layer

    def sender_outputs(self) -> int:
        """One prompt of what resampling's ablation sources keep of a corrupted run: the
        embedding, every layer's z and every MLP's output."""
        per_token = self.d_model + self.n_layers * (self.n_heads * self.d_head + self.d_model)
        return self.itemsize * self.width * per_token

    def expert_terms(self, columns: int) -> int:
        """One prompt's terms of ``columns`` experts in all (summed over the mixtures),
        ``(pos, expert, d_model)`` each, in float32: what a record of the mixtures holds
        (``patching._experts``)."""
        return F32 * self.width * columns * self.d_model

    def backward_prompt(self) -> int:
        """One prompt of a forward and backward pass through the bridge's hooks (node EAP).

        Autograd keeps each block's inputs to its matmuls and norms (about 12 d_model, 4
        head widths and 3 MLP widths per token), the scores and pattern, and the
        captured z/MLP outputs with their gradients and the corrupted run's; the logits
        of every position when the model cannot gather the answer position first.
        """
        hd = self.n_heads * self.d_head
        per_token = 16 * self.d_model + 10 * hd + 4 * self.d_mlp + 4 * self.n_heads * self.width
        per_prompt = self.n_layers * self.width * per_token + self.width * self.d_vocab
        return F32 * per_prompt

    def edge_backward_prompt(
        self, *, post_norm: bool = False, qk_norm: bool = False, layers: int | None = None
    ) -> int:
        """One prompt of edge attribution on the functional forward (one gradient step),
        probing the receivers of ``layers`` layers (all by default) in that pass.

        Dominated by the per-receiver inputs: each probed layer's 3 x n_heads copies of the
        residual stream (``(pos, 3*head, d_model)``), as a probe, its gradient, the
        normed input autograd keeps and its temporaries, about 8 copies (12 with a q/k
        norm on the whole projection, OLMo-2, which normalises a (head, head*d_head) block
        per head); the senders' deltas ``(pos, sender, d_model)`` in float32 (twice with a
        post-norm, whose Jacobian product rewrites them each step); and the q, k, v,
        scores and MLP of every layer as a plain backward pass keeps them.
        """
        receivers_per_layer = 3 * self.n_heads * self.d_model
        copies = 12 if qk_norm else 8
        probed = self.n_layers if layers is None else layers
        inputs = F32 * copies * probed * self.width * receivers_per_layer
        deltas = (3 if post_norm else 2) * F32 * self.width * self.n_senders * self.d_model
        return inputs + deltas + self.backward_prompt()

    def edge_ablation_prompt(self, *, post_norm: bool = False) -> int:
        """One prompt of an edge circuit's forward pass (``ablation.py``, no grad).

        The senders' deltas ``(pos, sender, d_model)`` for the whole pass, with the copy
        each receiver block's contraction makes of them and its output, and one layer's
        receiver inputs ``(pos, 3*head, d_model)`` at a time with their norms and
        projections, about 16 copies (20 where a post-norm (Gemma-2) normalises every
        receiver's own sum of the heads). Calibrated at GPT-2 small: 6 copies and one
        of the deltas undercounted a measured prompt by half.
        """
        per_layer = (20 if post_norm else 16) * self.width * 3 * self.n_heads * self.d_model
        deltas = 3 * self.width * self.n_senders * self.d_model
        return F32 * (per_layer + deltas) + self.forward_row()


F32 = 4
"""Bytes of a float32: scores, gradients and deltas are kept in float32."""
