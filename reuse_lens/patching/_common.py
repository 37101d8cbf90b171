"""Plumbing shared by the exact patching methods: inputs, baselines, sources, chunking."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from reuse_lens._memory import Shapes, chunk_items
from reuse_lens._validate import check_pair
from reuse_lens.arch.registry import extract as extract_weights
from reuse_lens.evaluation import answer_logits
from reuse_lens.nodes import ModelShape, Node, NodeNameError, architecture, parse_nodes
from reuse_lens.patching._forward import RunCache, Unsupported, Weights
from reuse_lens.tasks.metrics import Metric, MetricInputs, check_finite, get_metric

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.tasks.task import Task

__all__ = [
    "ENGINES",
    "Engine",
    "Prepared",
    "paired_parts",
    "prepare",
    "prompts_per_part",
    "rows_per_chunk",
]

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
    part_size: int | None = None
    """Prompts per part of the call (``parts``); None: every prompt in one part."""
    part_bytes: int = 0
    """The estimated runs of one part, where they are not in ``runs``: the functional
    engine's when the call is split, the hook engines' caches always."""

    @torch.no_grad()
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
        """What this preparation holds on top of the model while an engine works: the
        functional forward's own weights and the cached runs (of every prompt, or of the
        part at hand), which an engine's chunks share the budget with."""
        own = 0 if self.weights is None else self.weights.own_bytes
        return own + sum(run.nbytes for run in self.runs.values()) + self.part_bytes

    def spans(self) -> list[slice]:
        """The prompts of each part of the call: one span of ``part_size`` prompts each, or
        every prompt in one when their runs fit the budget (``prepare``)."""
        size = self.part_size or self.n
        return [slice(start, min(start + size, self.n)) for start in range(0, self.n, size)]

    def parts(self) -> Iterator[Prepared]:
        """The call's parts, each a ``Prepared`` of its own prompts (``select``), made as
        they are asked for; ``self`` alone when the runs of every prompt fit.

        A part computes its runs on first use. An engine works one part at a time and lets
        it go before taking the next, so the runs of one part are held at a time. Scores
        are means over prompts: the engines sum each part's per-prompt values and divide
        by ``n``.
        """
        spans = self.spans()
        if len(spans) == 1:
            yield self
            return
        for span in spans:
            yield self.select(span)

    @torch.no_grad()  # the weights are the model's parameters: no graph may be kept
    def renewed(self) -> Prepared:
        """This preparation as ``prepare`` returns it, for another engine on the same
        (model, task, metric): the bridge's logits and the functional forward's check
        are kept, the runs are those ``prepare`` keeps (every prompt's, where they are
        held whole: the ones still held here, the others computed again) and
        ``part_bytes`` what an engine holds beside its chunks. An engine that cleared its
        runs (the ablation runner) can hand its preparation on this way without the
        bridge's forward passes being run again."""
        held_whole = self.weights is not None and self.part_size is None
        runs = {}
        if held_whole:
            assert self.weights is not None
            prompts = {"clean": self.clean, "corrupted": self.corrupted}
            runs = {
                name: self.runs[name] if name in self.runs else self.weights.run(tokens)
                for name, tokens in prompts.items()
            }
        part_bytes = 0
        if not held_whole:
            size = min(self.part_size or self.n, self.n)
            part_bytes = 2 * size * Shapes.of(self.model, int(self.clean.shape[1])).run_cache()
        return dataclasses.replace(self, runs=runs, part_bytes=part_bytes)

    def held_runs(self) -> tuple[RunCache, RunCache] | None:
        """The clean and corrupted runs of every prompt, where both are held."""
        clean, corrupted = self.runs.get("clean"), self.runs.get("corrupted")
        return None if clean is None or corrupted is None else (clean, corrupted)

    def select(self, prompts: slice) -> Prepared:
        """These prompts alone: the same model, weights and metric; runs computed anew."""
        return dataclasses.replace(
            self,
            clean=self.clean[prompts],
            corrupted=self.corrupted[prompts],
            answer_pos=self.answer_pos[prompts],
            inputs=self.inputs.select(prompts),
            clean_logits=self.clean_logits[prompts],
            corrupted_logits=self.corrupted_logits[prompts],
            runs={},
            part_size=None,
            part_bytes=0,
        )

    def clean_parts(
        self, lengths: Int[Tensor, " batch"]
    ) -> list[tuple[Int[Tensor, "part pos"], Int[Tensor, " part"]]]:
        """The clean prompts of each part with their ``lengths``: what a mean through
        hooks runs (``HookSources.mean``), one part at a time."""
        return [(self.clean[span], lengths[span]) for span in self.spans()]

    @torch.no_grad()  # the weights are the model's parameters: no graph may be kept
    def mean_run(self, lengths: Int[Tensor, " batch"]) -> RunCache:
        """The clean runs averaged over every prompt (``mean_cache``), part by part when
        the runs of every prompt are not held; ``lengths`` are the positions each prompt
        adds to the mean."""
        pieces = zip(self.parts(), self.spans(), strict=True)
        return mean_cache((part.run("clean"), lengths[span]) for part, span in pieces)

    def score(self, logits: Tensor, prompt: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        """The metric of each row's logits, read against prompt ``prompt[row]``'s answers."""
        values = self.metric(logits.float(), self.inputs.select(prompt))
        return check_finite(values, self.metric, logits).to(torch.float32)

    @property
    def clean_metric(self) -> Float[Tensor, " batch"]:
        return self.score(self.clean_logits, torch.arange(self.n, device=self.clean.device))

    @property
    def corrupted_metric(self) -> Float[Tensor, " batch"]:
        return self.score(self.corrupted_logits, torch.arange(self.n, device=self.clean.device))


def paired_parts(a: Prepared, b: Prepared) -> Iterator[tuple[Prepared, Prepared]]:
    """Two calls on the same prompts (a model and its fine-tune) taken part by part
    together, on the finer of their two splits; each pair's runs are let go before the
    next pair is made, so one part of each model is held at a time."""
    spans = max(a.spans(), b.spans(), key=len)
    for span in spans:
        part_a, part_b = (p if span == slice(0, p.n) else p.select(span) for p in (a, b))
        yield part_a, part_b
        part_a.runs.clear()
        part_b.runs.clear()


@torch.no_grad()
def prepare(
    model: TransformerBridge,
    task: Task,
    metric: str | Metric | None,
    *,
    engine: Engine = "auto",
    budget: int | None = None,
) -> Prepared:
    """Check the task against the model and compute what every patching method needs.

    The functional forward is verified against the bridge's own logits on the clean
    prompts; on any mismatch the model is patched through hooks instead (``engine="auto"``),
    or the call is refused (``engine="functional"``).

    Under a ``budget`` (bytes) the bridge's logits are computed as many prompts a pass as
    fit, and the runs are kept only if the runs of every prompt fit in half of what the
    weights leave free (``prompts_per_part``). Otherwise the call works in parts of that
    many prompts (``Prepared.parts``), each recomputing its own runs. Without a budget
    every run is kept, as a caller that holds them anyway wants.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    model, task = check_pair(model, task)
    device = torch.device(model.cfg.device or "cpu")
    chosen = get_metric(task.metric if metric is None else metric)
    clean, corrupted = task.clean.to(device), task.corrupted.to(device)
    answer_pos = task.answer_pos.to(device)
    shapes = Shapes.of(model, int(clean.shape[1]))
    per_pass = _BRIDGE_BATCH
    if budget is not None:
        per_prompt = shapes.bridge_prompt()
        per_pass = min(per_pass, chunk_items(budget, per_prompt, 0, "prompt of the bridge's pass"))
    try:
        clean_logits = answer_logits(model, clean, answer_pos, batch_size=per_pass)
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
    part_size: int | None = None
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
            if budget is not None:
                part_size = prompts_per_part(budget, shapes, weights.own_bytes)
            runs, corrupted_logits = _verified_runs(
                weights, clean, corrupted, answer_pos, clean_logits, part_size
            )
            reason = None
        except Unsupported as why:
            weights, reason = None, f"the fast forward cannot reproduce this model: {why}"
            runs, part_size = {}, None
            logger.info("patching through hooks: %s", reason)
    if weights is None and engine == "functional":
        raise ValueError(
            f"engine='functional' cannot run this model: {reason}. Use engine='auto', which "
            "patches it through hooks."
        )
    if corrupted_logits is None:
        corrupted_logits = answer_logits(model, corrupted, answer_pos, batch_size=per_pass)
    if weights is None and budget is not None:
        # The hook engines cache two runs of a part's prompts, as the functional one does.
        part_size = prompts_per_part(budget, shapes, 0)
    split = part_size is not None and part_size < len(clean)
    # Held by the engines beside their chunks where not in ``runs``: a part's two runs
    # (the hook engines' caches always; the functional runs when the call is split).
    part_runs = 2 * min(part_size or 0, len(clean)) * shapes.run_cache()
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
        part_size=part_size if split else None,
        part_bytes=part_runs if split or weights is None else 0,
    )
    prepared.clean_metric  # noqa: B018  (raises MetricError on NaN before any sweep)
    prepared.corrupted_metric  # noqa: B018
    return prepared


_BRIDGE_BATCH = 64
"""Prompts per pass of the bridge's own forward pass (full logits) at most."""


def prompts_per_part(budget: int, shapes: Shapes, own_bytes: int) -> int:
    """Prompts whose clean and corrupted runs one part of a call holds under ``budget``.

    The runs of a part may take half of what the functional weights (``own_bytes``) and a
    mean ablation's source (one prompt's run) leave free; the other half is for the
    chunks of rows that patch them. Each prompt is therefore counted at twice its runs.
    """
    return chunk_items(
        budget, 2 * 2 * shapes.run_cache(), own_bytes + shapes.run_cache(), "prompt's runs"
    )


def _verified_runs(
    weights: Weights,
    clean: Int[Tensor, "batch pos"],
    corrupted: Int[Tensor, "batch pos"],
    answer_pos: Int[Tensor, " batch"],
    clean_logits: Float[Tensor, "batch d_vocab"],
    part_size: int | None,
) -> tuple[dict[str, RunCache], Float[Tensor, "batch d_vocab"]]:
    """Check the functional forward against the bridge's logits on every clean prompt, and
    compute the corrupted logits with it, ``part_size`` prompts at a time.

    Returns the runs of every prompt when they are one part (else none: each part
    recomputes its own), and the corrupted prompts' answer logits.

    Raises:
        Unsupported: if any prompt's logits differ from the bridge's beyond the dtype's
            tolerance (``verify_tolerance``).
    """
    n = int(clean.shape[0])
    size = part_size or n
    tolerance: float | None = None
    runs: dict[str, RunCache] = {}
    corrupted_logits = []
    for start in range(0, n, size):
        span = slice(start, min(start + size, n))
        rows = torch.arange(span.stop - span.start, device=clean.device)
        runs["clean"] = weights.run(clean[span])
        ours = weights.logits(runs["clean"].final[rows, answer_pos[span]])
        if tolerance is None:
            largest = max(1.0, float(clean_logits.abs().max()))
            tolerance = verify_tolerance(ours.dtype) * largest
        gap = float((ours.float() - clean_logits[span]).abs().max())
        if gap > tolerance:
            raise Unsupported(f"its logits differ from the bridge's by {gap:.2g}")
        # Verified: the corrupted run is the functional one, kept for the engines.
        runs["corrupted"] = weights.run(corrupted[span])
        corrupted_logits.append(weights.logits(runs["corrupted"].final[rows, answer_pos[span]]))
        if size < n:
            runs = {}
    return runs, torch.cat(corrupted_logits)


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


def _masked_total(x: Tensor, valid: Tensor, pos_axis: int) -> Tensor:
    """The float32 sum over the batch of ``x`` at the positions ``valid`` (batch, pos) marks."""
    shape = [1] * x.dim()
    shape[0], shape[pos_axis] = x.shape[0], x.shape[pos_axis]
    return (x.to(torch.float32) * valid.view(shape)).sum(0, keepdim=True)


def _divide(total: Tensor, count: Tensor, pos_axis: int, dtype: torch.dtype) -> Tensor:
    """``total`` over the prompts counted at each position (at least one), in ``dtype``."""
    count_shape = [1] * total.dim()
    count_shape[pos_axis] = int(count.shape[0])
    return (total / count.clamp(min=1).view(count_shape)).to(dtype)


def _pos_axis(name: str) -> int:
    """The position axis of a ``RunCache`` field or a hook point: a pattern's query
    positions, else 1."""
    return 2 if name == "pattern" or name.endswith("hook_pattern") else 1


def masked_means(
    pieces: Iterable[tuple[Sequence[tuple[str, Tensor]], Int[Tensor, " batch"]]],
) -> list[tuple[str, Tensor]]:
    """Named activations averaged over prompts, position by position, each a batch of one.

    ``pieces`` are the same named activations of successive groups of prompts, with those
    prompts' lengths: every prompt in one, or the parts of a call one at a time (each is
    dropped once summed). A position is averaged only over the prompts that have a real
    token there, so the padding of shorter prompts never enters the mean. A pattern
    (``pattern``, ``...hook_pattern``) is averaged over its query positions.

    The sums are float32 and each mean is cast back to its activation's dtype: it is fed
    back into the model, whose matmuls need their operands in one dtype, and a bfloat16
    sum over many prompts would lose the low bits of every term.
    """
    named: Sequence[tuple[str, Tensor]] = ()
    totals: list[Tensor] = []
    count: Tensor | None = None
    for piece, lengths in pieces:
        name, first = piece[0]
        valid = position_mask(lengths, int(first.shape[_pos_axis(name)])).to(torch.float32)
        sums = [_masked_total(x, valid, _pos_axis(name)) for name, x in piece]
        totals = sums if not totals else [a + b for a, b in zip(totals, sums, strict=True)]
        count = valid.sum(0) if count is None else count + valid.sum(0)
        named = piece
    if count is None:
        raise ValueError("a mean over no prompts")
    return [
        (name, _divide(total, count, _pos_axis(name), x.dtype))
        for (name, x), total in zip(named, totals, strict=True)
    ]


def mean_cache(pieces: Iterable[tuple[RunCache, Int[Tensor, " batch"]]]) -> RunCache:
    """Every activation of the runs averaged over prompts, as a batch of one
    (``masked_means``); ``pieces`` are runs with their prompts' lengths."""
    return RunCache.from_items(masked_means((cache.items(), n) for cache, n in pieces))


def zero_cache(cache: RunCache) -> RunCache:
    """Every activation zero, as a batch of one."""
    return RunCache.from_items([(name, torch.zeros_like(x[:1])) for name, x in cache.items()])


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


def parse_all(names: list[str | Node], shape: ModelShape) -> list[Node]:
    """Parse node names against ``shape``, naming every bad one in one NodeNameError."""
    bad: list[str] = []
    out: list[Node] = []
    for name in names:
        try:
            out.extend(parse_nodes([name], shape))
        except NodeNameError as error:
            bad.append(f"{name!r} ({error})")
    if bad:
        raise NodeNameError(f"unknown node name(s): {'; '.join(bad)}")
    return out
