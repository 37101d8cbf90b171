"""Experts as nodes: forward hooks that patch a mixture-of-experts MLP expert by expert.

Each expert's term (``arch.experts``) can be kept or replaced by its source value, per
row of the batch, in any run of the bridge; and the router either runs on what the
block reads in that run (``recompute``) or keeps the routing of the unpatched clean
run of the row's prompt (``frozen``, the default).

Why frozen by default: an expert node is then the same computation in the clean run and
in every patched one, with the same tokens routed to it and the same weights, so its
effect is what flows through the expert, and a patch elsewhere cannot switch experts on
or off downstream (top-k routing is a step function: a small change of the residual
stream can hand a token to another expert, and that jump would be scored as the
patched node's effect). Attribution patching takes gradients, which see no jump at
all; with the routing frozen they are the gradients of the function that patching
evaluates. ``recompute`` is the model's own behaviour, and what MLP-level nodes
always measure: with it, the scores include the router's response to the patch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from reuse_lens._memory import nbytes
from reuse_lens.arch.experts import Mixture, NoMixture, Routing, mixtures
from reuse_lens.nodes import UnsupportedArchitectureError, architecture
from reuse_lens.patching._common import masked_means

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["ROUTINGS", "ExpertRuns", "Plan", "RoutingMode", "check_routing"]

RoutingMode = Literal["frozen", "recompute"]
"""What the router does in a patched run: keep the clean run's routing (``frozen``), or
route what the block reads in that run (``recompute``)."""

ROUTINGS: tuple[str, ...] = ("frozen", "recompute")


def check_routing(routing: object) -> None:
    if routing not in ROUTINGS:
        raise ValueError(
            f"unknown routing {routing!r}: choose 'frozen' (the default: every patched run "
            "keeps the clean run's routing) or 'recompute' (the router sees the patch)"
        )


@dataclass
class Plan:
    """What every mixture does in one run of a batch of rows.

    Attributes:
        prompt: the prompt of each row: it indexes the frozen routing and the sources.
        keep: per layer, which expert terms each row keeps (True) or replaces by its
            source (False), ``(rows, column)``; a layer not given keeps them all.
        record: filled with each layer's routing and terms ``(batch, pos, column,
            d_model)`` of this run (detached).
        grads: filled with the gradient of each layer's output ``(batch, pos, d_model)``
            when the run is differentiated (the gradient of every term).
        clean_before: per row, the first layer where the run patches something: the
            mixtures before it read what they read in the clean run, so they route as it
            did and run as they are (their terms are not recomputed); None: any layer
            may read a patch.
    """

    prompt: Int[Tensor, " rows"] | None = None
    keep: dict[int, Bool[Tensor, "rows column"]] = field(default_factory=dict)
    record: dict[int, tuple[Routing, Tensor]] | None = None
    grads: dict[int, Tensor] | None = None
    clean_before: Int[Tensor, " rows"] | None = None


class ExpertRuns:
    """The mixtures of one model, patched expert by expert in runs of the bridge.

    ``frozen`` holds each layer's routing in the clean run, ``(prompt, pos, top_k)``;
    ``sources`` each layer's source terms, ``(prompt, pos, column, d_model)``, or a batch
    of one shared by every prompt (``mean``, ``zero``).
    """

    def __init__(self, model: TransformerBridge, routing: RoutingMode) -> None:
        check_routing(routing)
        self.model = model
        self.routing: RoutingMode = routing
        try:
            self.mixtures: dict[int, Mixture] = mixtures(model)
        except NoMixture as error:
            raise UnsupportedArchitectureError(f"{architecture(model)}: {error}") from error
        self.frozen: dict[int, Routing] = {}
        self.sources: dict[int, Tensor] = {}
        self.shared_sources = False
        self._plan: Plan | None = None
        self._checked = False

    # ---- set-up ---------------------------------------------------------------------

    @torch.no_grad()
    def record(self, tokens: Int[Tensor, "batch pos"]) -> dict[int, tuple[Routing, Tensor]]:
        """Each layer's routing and terms in the unpatched run of ``tokens``; the first call
        also checks that the terms add up to each block's output (``Mixture.mismatch``)."""
        out: dict[int, tuple[Routing, Tensor]] = {}
        with self.active(Plan(record=out)):
            self.model(tokens, return_type="logits")
        self._checked = True
        return out

    def set_up(
        self,
        ablation: str,
        clean: Int[Tensor, "batch pos"],
        corrupted: Int[Tensor, "batch pos"],
        lengths: Int[Tensor, " batch"],
        per_pass: int,
    ) -> None:
        """The clean routing that ``frozen`` keeps, and the source terms of ``ablation``:
        the corrupted partner's (``resample``), the mean over the clean prompts at their
        real positions (``mean``), or zero. Made from runs of ``per_pass`` prompts at a
        time: a run records every mixture's terms ``(prompt, pos, expert, d_model)``,
        which for every prompt at once would hold many times the model's activations. A
        mean is summed chunk by chunk; resampled sources are kept whole (the runner
        counts them against its budget, ``held_bytes``)."""
        routings: list[dict[int, Routing]] = []
        first: dict[int, Tensor] = {}

        def clean_pieces() -> Iterator[tuple[list[tuple[str, Tensor]], Tensor]]:
            for start in range(0, len(clean), per_pass):
                rows = slice(start, start + per_pass)
                recorded = self.record(clean[rows])
                routings.append({layer: routing for layer, (routing, _) in recorded.items()})
                if not first:
                    first.update({layer: terms[:1] for layer, (_, terms) in recorded.items()})
                yield [(str(layer), terms) for layer, (_, terms) in recorded.items()], lengths[rows]

        if ablation == "mean":
            self.sources = {int(name): mean for name, mean in masked_means(clean_pieces())}
        else:
            for _ in clean_pieces():  # the routing alone
                pass
            if ablation == "zero":
                self.sources = {layer: torch.zeros_like(t) for layer, t in first.items()}
            else:
                parts = [
                    self.record(corrupted[start : start + per_pass])
                    for start in range(0, len(corrupted), per_pass)
                ]
                self.sources = {
                    layer: torch.cat([part[layer][1] for part in parts]) for layer in parts[0]
                }
        self.shared_sources = ablation != "resample"
        self.frozen = {
            layer: Routing(
                torch.cat([r[layer].index for r in routings]),
                torch.cat([r[layer].weight for r in routings]),
            )
            for layer in routings[0]
        }

    @property
    def held_bytes(self) -> int:
        """What the set-up holds for every run: the clean routing and the sources."""
        routings = [x for r in self.frozen.values() for x in (r.index, r.weight)]
        return nbytes([*self.sources.values(), *routings])

    def set_clean(self, clean: Int[Tensor, "batch pos"]) -> dict[int, Tensor]:
        """Record the clean run: its routing is what ``frozen`` keeps. Returns its terms."""
        recorded = self.record(clean)
        self.frozen = {layer: routing for layer, (routing, _) in recorded.items()}
        return {layer: terms for layer, (_, terms) in recorded.items()}

    # ---- runs -----------------------------------------------------------------------

    @contextmanager
    def active(self, plan: Plan) -> Iterator[None]:
        """Run the model inside this block to apply ``plan`` to every mixture."""
        handles = [
            mixture.module.register_forward_hook(self._hook(layer))
            for layer, mixture in self.mixtures.items()
        ]
        self._plan = plan
        try:
            yield
        finally:
            self._plan = None
            for handle in handles:
                handle.remove()

    def _hook(self, layer: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
            del module
            plan = self._plan
            assert plan is not None
            keep = plan.keep.get(layer)
            changes = keep is not None or (self.routing == "frozen" and plan.prompt is not None)
            rows = None  # the rows whose terms are computed: every one
            if changes and plan.record is None and plan.clean_before is not None:
                # A row that reads no patch here keeps every expert and routes as the
                # clean run did: the block's own output is its output.
                rows = plan.clean_before <= layer
                changes = bool(rows.any())
                rows = None if bool(rows.all()) else rows
            if not changes and plan.record is None and plan.grads is None:
                return None
            x = args[0]
            out = output[0] if isinstance(output, tuple) else output
            if changes or plan.record is not None:
                prompt = plan.prompt if rows is None or plan.prompt is None else plan.prompt[rows]
                terms, routing = self._terms(layer, x if rows is None else x[rows], prompt)
                if plan.record is not None:
                    if not self._checked and not changes:
                        # An unpatched run, routed as the block routed it: the terms
                        # must add up to what the block computed.
                        self._check(layer, terms.sum(2), out)
                    plan.record[layer] = (routing, terms.detach())
                if keep is not None:
                    source = self._source(layer, prompt, terms.shape[1])
                    kept = keep if rows is None else keep[rows]
                    terms = torch.where(kept[:, None, :, None], terms, source)
                if changes:
                    summed = terms.sum(2).to(out.dtype)
                    out = summed if rows is None else out.clone().index_put_((rows,), summed)
            grads = plan.grads
            if grads is not None and out.requires_grad:

                def keep_grad(grad: Tensor) -> None:
                    grads[layer] = grad.detach()

                out.register_hook(keep_grad)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    def _check(self, layer: int, total: Tensor, out: Tensor) -> None:
        """Refuse the model unless the block's terms (their sum, ``total``) add up to its
        output."""
        why = self.mixtures[layer].mismatch(total, out)
        if why is not None:
            raise UnsupportedArchitectureError(f"{architecture(self.model)}: {why}")

    def _terms(
        self, layer: int, x: Float[Tensor, "batch pos d_model"], prompt: Tensor | None
    ) -> tuple[Float[Tensor, "batch pos column d_model"], Routing]:
        mixture = self.mixtures[layer]
        flat = x.reshape(-1, x.shape[-1])
        if self.routing == "frozen" and prompt is not None:
            clean = self.frozen[layer]
            width = x.shape[1]
            routing = Routing(
                clean.index[prompt, :width].reshape(flat.shape[0], -1),
                clean.weight[prompt, :width].reshape(flat.shape[0], -1),
            )
        else:
            routing = mixture.route(flat)
        terms = mixture.terms(flat, routing).unflatten(0, x.shape[:2])
        shaped = Routing(
            routing.index.reshape(*x.shape[:2], -1), routing.weight.reshape(*x.shape[:2], -1)
        )
        return terms, shaped

    def _source(self, layer: int, prompt: Tensor | None, width: int) -> Tensor:
        source = self.sources[layer]
        if self.shared_sources:
            return source[:, :width]
        assert prompt is not None, "resample sources are read by prompt"
        return source[prompt, :width]
