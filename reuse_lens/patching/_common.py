"""Plumbing shared by the exact patching methods: inputs, baselines, sources, chunking."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from reuse_lens._memory import Shapes, chunk_items
from reuse_lens._validate import check_pair
from reuse_lens.arch.registry import extract as extract_weights
from reuse_lens.evaluation import answer_logits
from reuse_lens.nodes import architecture
from reuse_lens.patching._forward import RunCache, Unsupported, Weights
from reuse_lens.tasks.metrics import Metric, MetricInputs, check_finite, get_metric

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.tasks.task import Task

__all__ = ["ENGINES", "Engine", "Prepared", "prepare", "rows_per_chunk"]

Engine = Literal["auto", "functional", "hooks"]
"""Which engine patches the model.

- ``auto``: the functional forward where it reproduces the model's logits, else hooks.
- ``functional``: the functional forward, or a ValueError saying why it cannot run.
- ``hooks``: ``run_with_hooks`` on the bridge, whatever the model (TransformerLens's speed).
"""

ENGINES: tuple[str, ...] = ("auto", "functional", "hooks")

logger = logging.getLogger(__name__)

_VERIFY_ATOL = 1e-4


@dataclass
class Prepared:
    """A task on the model's device, its metric, and the unpatched clean/corrupted logits.

    ``weights`` is None when the functional forward does not cover the model; the
    callers then patch through hooks on the bridge.
    """

    model: TransformerBridge
    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    answer_pos: Int[Tensor, " batch"]
    metric: Metric
    inputs: MetricInputs
    clean_logits: Float[Tensor, "batch d_vocab"]
    corrupted_logits: Float[Tensor, "batch d_vocab"]
    weights: Weights | None
    fallback_reason: str | None
    runs: dict[str, RunCache] = field(default_factory=dict)

    def run(self, which: str) -> RunCache:
        """The functional run of the ``clean`` or ``corrupted`` prompts, computed once."""
        assert self.weights is not None
        if which not in self.runs:
            self.runs[which] = self.weights.run(self.clean if which == "clean" else self.corrupted)
        return self.runs[which]

    @property
    def n(self) -> int:
        return int(self.clean.shape[0])

    @property
    def held_bytes(self) -> int:
        """What this preparation holds on top of the model: the functional forward's own
        weights and its cached runs, which an engine's chunks share the budget with."""
        own = 0 if self.weights is None else self.weights.own_bytes
        return own + sum(run.nbytes for run in self.runs.values())

    def score(self, logits: Tensor, prompt: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        """The metric of each row's logits, read against prompt ``prompt[row]``'s answers."""
        values = self.metric(logits.float(), self.inputs.select(prompt))
        return check_finite(torch.as_tensor(values, dtype=torch.float32), self.metric)

    @property
    def clean_metric(self) -> Float[Tensor, " batch"]:
        return self.score(self.clean_logits, torch.arange(self.n, device=self.clean.device))

    @property
    def corrupted_metric(self) -> Float[Tensor, " batch"]:
        return self.score(self.corrupted_logits, torch.arange(self.n, device=self.clean.device))


@torch.no_grad()
def prepare(
    model: TransformerBridge, task: Task, metric: str | Metric | None, *, engine: Engine = "auto"
) -> Prepared:
    """Check the task against the model and compute what every patching method needs.

    The functional forward is verified against the bridge's own logits on the clean
    prompts; on any mismatch the model is patched through hooks instead (``engine="auto"``),
    or the call is refused (``engine="functional"``).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    model, task = check_pair(model, task)
    device = torch.device(model.cfg.device or "cpu")
    chosen = get_metric(task.metric if metric is None else metric)
    clean, corrupted = task.clean.to(device), task.corrupted.to(device)
    answer_pos = task.answer_pos.to(device)
    try:
        clean_logits = answer_logits(model, clean, answer_pos)
    except RuntimeError as error:
        # TransformerLens's own forward pass failing (e.g. OLMo-2 in bfloat16 in 4.3, whose
        # attention mixes float32 and bfloat16) would otherwise surface deep in its code.
        raise RuntimeError(
            f"TransformerLens's forward pass of this {architecture(model)} model fails in "
            f"{model.cfg.dtype} ({error}); nothing reuse_lens computes can run on it. Load "
            "the model in another dtype (load_model(..., dtype='float32'))."
        ) from error
    corrupted_logits: Tensor | None = None
    runs: dict[str, RunCache] = {}
    base_inputs = task.metric_inputs()
    inputs = MetricInputs(
        base_inputs.answers.to(device), base_inputs.wrong.to(device), clean_logits
    )
    weights: Weights | None = None
    reason: str | None = "engine='hooks' was asked for"
    if engine != "hooks":
        try:
            weights = extract_weights(model)
            if weights.spec.parallel != bool(getattr(model.cfg, "parallel_attn_mlp", False)):
                # The residual graph (nodes.shape_of) reads the bridge's flag; the two must
                # describe the same block, or edges would be listed for the wrong graph.
                raise Unsupported(
                    "its adapter and TransformerLens disagree on whether attention and MLP "
                    "run in parallel"
                )
            rows = torch.arange(clean.shape[0], device=device)
            runs["clean"] = weights.run(clean)
            ours = weights.logits(runs["clean"].final[rows, answer_pos])
            gap = float((ours.float() - clean_logits).abs().max())
            tolerance = verify_tolerance(ours.dtype) * max(1.0, float(clean_logits.abs().max()))
            if gap > tolerance:
                raise Unsupported(f"its logits differ from the bridge's by {gap:.2g}")
            reason = None
            # Verified: the corrupted run is the functional one, kept for the engines.
            runs["corrupted"] = weights.run(corrupted)
            corrupted_logits = weights.logits(runs["corrupted"].final[rows, answer_pos])
        except Unsupported as why:
            weights, reason = None, f"the fast forward cannot reproduce this model: {why}"
            runs = {}
            logger.info("patching through hooks: %s", reason)
    if weights is None and engine == "functional":
        raise ValueError(
            f"engine='functional' cannot run this model: {reason}. Use engine='auto', which "
            "patches it through hooks."
        )
    if corrupted_logits is None:
        corrupted_logits = answer_logits(model, corrupted, answer_pos)
    prepared = Prepared(
        model=model,
        clean=clean,
        corrupted=corrupted,
        answer_pos=answer_pos,
        metric=chosen,
        inputs=inputs,
        clean_logits=clean_logits,
        corrupted_logits=corrupted_logits,
        weights=weights,
        fallback_reason=reason,
        runs=runs,
    )
    prepared.clean_metric  # noqa: B018  (raises MetricError on NaN before any sweep)
    prepared.corrupted_metric  # noqa: B018
    return prepared


def verify_tolerance(dtype: torch.dtype) -> float:
    """How far (relative to the largest logit) the fast forward may be from the bridge's.

    In float32 the two agree to 1e-4. In bfloat16 and float16 every matmul rounds, and the
    two forwards round in different places, so a few units in the last place of the
    logits are expected: 8 epsilons of the dtype (0.06 for bfloat16, 0.008 for float16;
    the tiny test models differ by up to 1 and 5 epsilons). A forward that misses a piece
    of the architecture is off by far more.
    """
    if dtype in (torch.float32, torch.float64):
        return _VERIFY_ATOL
    return max(_VERIFY_ATOL, 8 * torch.finfo(dtype).eps)


def position_mask(lengths: Int[Tensor, " batch"], width: int) -> Tensor:
    """(batch, pos) bool: True where the prompt has a real token."""
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def masked_mean(
    x: Float[Tensor, "batch ..."], lengths: Int[Tensor, " batch"], pos_axis: int = 1
) -> Float[Tensor, "1 ..."]:
    """``x`` averaged over the batch, position by position, over real tokens only.

    The sum is taken in float32 and the mean cast back to ``x``'s dtype: it is fed back
    into the model, whose matmuls need their operands in one dtype, and a bfloat16 sum
    over many prompts would lose the low bits of every term.
    """
    width = int(x.shape[pos_axis])
    valid = position_mask(lengths, width).to(torch.float32)  # (batch, pos)
    count = valid.sum(0).clamp(min=1)
    shape = [1] * x.dim()
    shape[0], shape[pos_axis] = x.shape[0], width
    count_shape = [1] * x.dim()
    count_shape[pos_axis] = width
    total = (x.to(torch.float32) * valid.view(shape)).sum(0, keepdim=True)
    return (total / count.view(count_shape)).to(x.dtype)


def mean_cache(cache: RunCache, lengths: Int[Tensor, " batch"]) -> RunCache:
    """Every activation averaged over prompts, position by position, as a batch of one.

    A position is averaged only over the prompts that have a real token there, so the
    padding of shorter prompts never enters the mean.
    """

    def avg(x: Tensor, pos_axis: int = 1) -> Tensor:
        return masked_mean(x, lengths, pos_axis)

    return RunCache(
        resid_pre=[avg(x) for x in cache.resid_pre],
        resid_mid=[avg(x) for x in cache.resid_mid],
        q=[avg(x) for x in cache.q],
        k=[avg(x) for x in cache.k],
        v=[avg(x) for x in cache.v],
        pattern=[avg(x, 2) for x in cache.pattern],
        z=[avg(x) for x in cache.z],
        mlp_out=[avg(x) for x in cache.mlp_out],
        final=avg(cache.final),
    )


def zero_cache(cache: RunCache) -> RunCache:
    """Every activation zero, as a batch of one."""

    def zero(xs: list[Tensor]) -> list[Tensor]:
        return [torch.zeros_like(x[:1]) for x in xs]

    return RunCache(
        zero(cache.resid_pre),
        zero(cache.resid_mid),
        zero(cache.q),
        zero(cache.k),
        zero(cache.v),
        zero(cache.pattern),
        zero(cache.z),
        zero(cache.mlp_out),
        torch.zeros_like(cache.final[:1]),
    )


def rows_per_chunk(
    model: TransformerBridge,
    width: int,
    batch_size: int | None,
    budget: int,
    *,
    held: int = 0,
) -> int:
    """How many (patch, prompt) rows one forward pass may hold under the memory budget.

    ``batch_size`` overrides the budget. Otherwise the budget, less the ``held`` bytes the
    call holds throughout (such as ``Prepared.held_bytes``), is divided by one row's
    activations (``_memory.Shapes.forward_row``).
    """
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        return batch_size
    shapes = Shapes.of(model, width)
    return chunk_items(budget, shapes.forward_row(), held, "row of a forward pass")
