"""The vocabulary of reuse_lens: nodes, edges and the kinds of patch.

Names follow the MIB circuit track (Mueller et al. 2025): ``a3.h1`` is head 1 of
layer 3, ``m3`` is the MLP of layer 3, and ``input`` and ``logits`` are the two
ends of the residual stream. In a mixture-of-experts model analysed expert by expert,
``m3.e5`` is routed expert 5 of layer 3's MLP and ``m3.shared`` its shared expert. An edge into a head names the input it enters by,
``a0.h1->a2.h3<q>``, because the q, k and v inputs of a head are patched apart.

This module imports neither torch nor TransformerLens, so that the names can be
used (and circuits read) without loading a model.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "INPUT",
    "LOGITS",
    "MLP",
    "Ablation",
    "AttentionHead",
    "Edge",
    "Endpoint",
    "Expert",
    "HeadInput",
    "InputNode",
    "LogitsNode",
    "ModelShape",
    "Node",
    "NodeNameError",
    "Sender",
    "UnsupportedArchitectureError",
    "architecture",
    "edges_of",
    "format_node",
    "forward_order",
    "nodes_of",
    "parse_edge",
    "parse_node",
    "parse_nodes",
    "shape_of",
]

Ablation = Literal["resample", "mean", "zero"]
"""What replaces an activation when it is knocked out.

- ``resample``: the same activation on the corrupted partner prompt.
- ``mean``: the mean over the task's prompts, position by position.
- ``zero``: zero.
"""

HeadInput = Literal["q", "k", "v"]
"""The input of an attention head that an edge enters by."""


class NodeNameError(ValueError):
    """A node or edge name that does not parse, or names a node the model lacks."""


class UnsupportedArchitectureError(ValueError):
    """A model whose architecture has no nodes that reuse_lens can analyse exactly (no
    attention, a hybrid of attention and other mixers, routed or latent attention)."""


@dataclass(frozen=True, order=True)
class AttentionHead:
    """Head ``head`` of the attention layer in block ``layer``; named ``a{layer}.h{head}``."""

    layer: int
    head: int

    @property
    def name(self) -> str:
        return f"a{self.layer}.h{self.head}"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True)
class MLP:
    """The MLP of block ``layer``; named ``m{layer}``."""

    layer: int

    @property
    def name(self) -> str:
        return f"m{self.layer}"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True)
class Expert:
    """One expert of the mixture-of-experts MLP of block ``layer``: routed expert
    ``index`` (``m{layer}.e{index}``), or the shared expert every token goes through
    (``index == -1``, ``m{layer}.shared``; Qwen2-MoE).

    Its output is its term of the MLP's sum: the routing weight times the expert's
    output at the tokens routed to it, 0 elsewhere (the shared expert's term is its
    gated output at every token). The terms of a layer's experts add up to ``m{layer}``.
    """

    layer: int
    index: int

    @property
    def shared(self) -> bool:
        return self.index == SHARED_EXPERT

    @property
    def name(self) -> str:
        return f"m{self.layer}.shared" if self.shared else f"m{self.layer}.e{self.index}"

    def __str__(self) -> str:
        return self.name


SHARED_EXPERT = -1
"""``Expert.index`` of a layer's shared expert."""


@dataclass(frozen=True)
class InputNode:
    """The embeddings (token plus position): the start of every path; named ``input``."""

    @property
    def name(self) -> str:
        return "input"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class LogitsNode:
    """The unembedding at the answer position: the end of every path; named ``logits``."""

    @property
    def name(self) -> str:
        return "logits"

    def __str__(self) -> str:
        return self.name


INPUT = InputNode()
LOGITS = LogitsNode()

Node = AttentionHead | MLP | Expert
"""A component that a circuit can contain."""

Endpoint = AttentionHead | MLP | Expert | InputNode | LogitsNode
"""Anything an edge can start or end at."""

Sender = AttentionHead | MLP | InputNode
"""Anything an edge can start at (expert nodes have no edges)."""


@dataclass(frozen=True)
class Edge:
    """A path from ``sender``'s output to ``receiver``'s input.

    ``receiver_input`` is set exactly when the receiver is a head, and says which of
    its q, k and v inputs the edge feeds. The name is MIB's: ``a0.h1->a2.h3<q>``,
    ``m0->m1``, ``input->a0.h0<v>``, ``m3->logits``.
    """

    sender: AttentionHead | MLP | InputNode
    receiver: AttentionHead | MLP | LogitsNode
    receiver_input: HeadInput | None = None

    def __post_init__(self) -> None:
        is_head = isinstance(self.receiver, AttentionHead)
        if is_head and self.receiver_input not in ("q", "k", "v"):
            raise NodeNameError(
                f"an edge into head {self.receiver.name} must say which input it enters by "
                f"(receiver_input='q', 'k' or 'v'), got {self.receiver_input!r}"
            )
        if not is_head and self.receiver_input is not None:
            raise NodeNameError(
                f"only heads have q/k/v inputs; {self.receiver.name} got "
                f"receiver_input={self.receiver_input!r}"
            )

    # Cached: a discovery on GPT-2 small names each of its 32,000 edges several times.
    @functools.cached_property
    def receiver_name(self) -> str:
        """The receiver with its input, as MIB writes it: ``a2.h3<q>`` or ``m1``."""
        suffix = f"<{self.receiver_input}>" if self.receiver_input else ""
        return f"{self.receiver.name}{suffix}"

    @functools.cached_property
    def name(self) -> str:
        return f"{self.sender.name}->{self.receiver_name}"

    def __str__(self) -> str:
        return self.name


_HEAD_RE = re.compile(r"a(\d+)\.h(\d+)")
_MLP_RE = re.compile(r"m(\d+)")
_EXPERT_RE = re.compile(r"m(\d+)\.(?:e(\d+)|(shared))")
_RECEIVER_RE = re.compile(r"(.+?)(?:<([qkv])>)?")

_NAME_HELP = (
    "node names are 'a{layer}.h{head}' for heads and 'm{layer}' for MLPs, e.g. 'a3.h1', 'm3' "
    "(and 'm3.e5', 'm3.shared' for experts)"
)


def parse_node(name: str | Endpoint) -> Endpoint:
    """Parse a MIB node name (``a3.h1``, ``m3``, ``input``, ``logits``) into its dataclass.

    Raises:
        NodeNameError: if ``name`` is not a valid node name.
    """
    if isinstance(name, AttentionHead | MLP | Expert | InputNode | LogitsNode):
        return name
    if not isinstance(name, str):
        raise NodeNameError(f"a node name must be a string, got {type(name).__name__}: {name!r}")
    text = name.strip()
    if text == "input":
        return INPUT
    if text == "logits":
        return LOGITS
    if match := _HEAD_RE.fullmatch(text):
        return AttentionHead(int(match[1]), int(match[2]))
    if match := _MLP_RE.fullmatch(text):
        return MLP(int(match[1]))
    if match := _EXPERT_RE.fullmatch(text):
        return Expert(int(match[1]), SHARED_EXPERT if match[3] else int(match[2]))
    raise NodeNameError(f"invalid node name {name!r}: {_NAME_HELP}, plus 'input' and 'logits'")


def forward_order(node: Endpoint) -> tuple[int, int, int]:
    """A sort key in forward order: ``input``; each layer's heads, then its MLP (or its
    routed experts and then its shared one); ``logits``."""
    if isinstance(node, InputNode):
        return (-1, 0, 0)
    if isinstance(node, AttentionHead):
        return (node.layer, 0, node.head)
    if isinstance(node, MLP):
        return (node.layer, 1, 0)
    if isinstance(node, Expert):
        return (node.layer, 1, node.index if not node.shared else 1 << 20)
    return (1 << 30, 0, 0)


def format_node(node: Endpoint) -> str:
    """The MIB name of ``node``."""
    return node.name


def parse_edge(name: str) -> Edge:
    """Parse a MIB edge name such as ``a0.h1->a2.h3<q>`` or ``m2->logits``.

    Raises:
        NodeNameError: if the name does not parse, or its ends cannot be joined.
    """
    sender_text, sep, receiver_text = name.partition("->")
    if not sep:
        raise NodeNameError(
            f"invalid edge name {name!r}: edges are written 'sender->receiver', with the "
            "receiver's input for heads, e.g. 'a0.h1->a2.h3<q>' or 'm2->logits'"
        )
    match = _RECEIVER_RE.fullmatch(receiver_text.strip())
    assert match is not None  # the pattern accepts any non-empty text
    sender, receiver = parse_node(sender_text), parse_node(match[1])
    if isinstance(sender, Expert) or isinstance(receiver, Expert):
        raise NodeNameError(f"invalid edge {name!r}: {_NO_EXPERT_EDGES}")
    if isinstance(sender, LogitsNode):
        raise NodeNameError(f"invalid edge {name!r}: 'logits' cannot send")
    if isinstance(receiver, InputNode):
        raise NodeNameError(f"invalid edge {name!r}: 'input' cannot receive")
    return Edge(sender, receiver, match[2])  # type: ignore[arg-type]


_NO_EXPERT_EDGES = (
    "expert nodes have no edges: the node methods (activation and attribution patching, "
    "node circuits, faithfulness, overlap) take them; for edges use MLP-level nodes "
    "(experts=False)"
)


class _HasConfig(Protocol):
    @property
    def cfg(self) -> object: ...


@dataclass(frozen=True)
class ModelShape:
    """The part of a model's configuration that decides its nodes and its residual graph.

    ``parallel``: attention and MLP read the same residual stream (GPT-NeoX, GPT-J, Phi,
    Falcon, Cohere), so a layer's heads do not feed its MLP.

    ``experts``: set when a mixture-of-experts model is analysed expert by expert
    (``shape_of(model, experts=True)``): the number of routed experts of each layer's
    MLP, 0 where the MLP is dense and stays one node ``m{layer}``; ``shared`` says
    which layers also have a shared expert. An expert-split layer has the nodes
    ``m{layer}.e0``... (and ``m{layer}.shared``) in place of ``m{layer}``. Empty for
    the usual MLP-level nodes.
    """

    n_layers: int
    n_heads: int
    has_mlps: bool
    parallel: bool = False
    experts: tuple[int, ...] = ()
    shared: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if self.experts and (
            len(self.experts) != self.n_layers or len(self.shared) != self.n_layers
        ):
            raise ValueError(
                f"experts and shared must give one value per layer ({self.n_layers}), got "
                f"{len(self.experts)} and {len(self.shared)}"
            )

    def split(self, layer: int) -> bool:
        """Whether the MLP of ``layer`` is analysed expert by expert."""
        return bool(self.experts) and (self.experts[layer] > 0 or self.shared[layer])

    def experts_of(self, layer: int) -> list[Expert]:
        """The expert nodes of ``layer``: routed ones in order, then the shared one."""
        if not self.split(layer):
            return []
        routed = [Expert(layer, k) for k in range(self.experts[layer])]
        return routed + ([Expert(layer, SHARED_EXPERT)] if self.shared[layer] else [])

    @property
    def n_experts(self) -> int:
        """Expert nodes over every layer, routed and shared; 0 without expert nodes."""
        return sum(len(self.experts_of(layer)) for layer in range(self.n_layers))

    @property
    def n_columns(self) -> int:
        """Columns of an expert mask or score table: the most routed experts of a layer,
        plus one for shared experts where any layer has one; 0 without expert nodes."""
        if not self.experts:
            return 0
        return max(self.experts) + int(any(self.shared))

    def column(self, expert: Expert) -> int:
        """``expert``'s column in an expert mask or score table (shared experts last)."""
        return max(self.experts) if expert.shared else expert.index

    def mlp_level(self) -> ModelShape:
        """This shape with every layer's MLP one node again."""
        return ModelShape(self.n_layers, self.n_heads, self.has_mlps, self.parallel)

    def check(self, node: Endpoint) -> None:
        """Raise NodeNameError if ``node`` is not a node of a model of this shape."""
        if isinstance(node, AttentionHead):
            if not (0 <= node.layer < self.n_layers and 0 <= node.head < self.n_heads):
                raise NodeNameError(
                    f"node {node.name} does not exist: the model has {self.n_layers} layers "
                    f"of {self.n_heads} heads (a0.h0 to a{self.n_layers - 1}.h{self.n_heads - 1})"
                )
        elif isinstance(node, MLP):
            if not self.has_mlps:
                raise NodeNameError(f"node {node.name} does not exist: the model is attention-only")
            if not 0 <= node.layer < self.n_layers:
                raise NodeNameError(
                    f"node {node.name} does not exist: the model has MLPs m0 to "
                    f"m{self.n_layers - 1}"
                )
            if self.split(node.layer):
                first = self.experts_of(node.layer)[0].name
                raise NodeNameError(
                    f"node {node.name} is split into its experts in this analysis: name them "
                    f"({first}, ...), or analyse at MLP level (experts=False)"
                )
        elif isinstance(node, Expert) and not (
            0 <= node.layer < self.n_layers and node in self.experts_of(node.layer)
        ):
            where = [layer for layer in range(self.n_layers) if self.split(layer)]
            raise NodeNameError(
                f"node {node.name} does not exist: "
                + (
                    "this analysis has no expert nodes (a mixture-of-experts model "
                    "analysed with experts=True has them)"
                    if not where
                    else f"the expert-split layers are {where}, with experts "
                    + ", ".join(
                        f"m{layer}.e0..e{self.experts[layer] - 1}"
                        + (f" and m{layer}.shared" if self.shared[layer] else "")
                        for layer in where
                    )
                )
            )

    def nodes(self) -> list[Node]:
        """Every head and MLP in forward order: a layer's heads, then its MLP."""
        out: list[Node] = []
        for layer in range(self.n_layers):
            out.extend(AttentionHead(layer, head) for head in range(self.n_heads))
            if self.split(layer):
                out.extend(self.experts_of(layer))
            elif self.has_mlps:
                out.append(MLP(layer))
        return out

    def feeds(self, sender: Endpoint, receiver: Endpoint) -> bool:
        """Whether the residual graph has an edge from ``sender`` to ``receiver``.

        The one rule behind ``edges``, circuits and the edge engines: ``input`` feeds
        everything and everything feeds ``logits``; a node feeds every node of a later
        layer; and, unless the block is parallel, a layer's heads feed that layer's MLP.
        """
        if isinstance(sender, LogitsNode) or isinstance(receiver, InputNode):
            return False
        if isinstance(sender, InputNode) or isinstance(receiver, LogitsNode):
            return True
        if sender.layer < receiver.layer:
            return True
        return (
            not self.parallel
            and isinstance(receiver, MLP | Expert)
            and isinstance(sender, AttentionHead)
            and sender.layer == receiver.layer
        )

    def senders_of(self, receiver: AttentionHead | MLP | LogitsNode) -> list[Sender]:
        """The senders that ``receiver`` reads, in forward order (a prefix of all senders)."""
        nodes = [n for n in self.nodes() if isinstance(n, AttentionHead | MLP)]
        senders: list[Sender] = [INPUT, *nodes]
        return [s for s in senders if self.feeds(s, receiver)]

    def edges(self) -> list[Edge]:
        """Every edge, receivers in forward order: per layer the heads' q, k and v inputs,
        then the MLP; ``logits`` last.

        Raises:
            NodeNameError: for a shape with expert nodes (they have no edges).
        """
        if self.experts:
            raise NodeNameError(_NO_EXPERT_EDGES)
        edges: list[Edge] = []
        for layer in range(self.n_layers):
            heads = [AttentionHead(layer, head) for head in range(self.n_heads)]
            senders = self.senders_of(heads[0])
            for head in heads:
                for qkv in ("q", "k", "v"):
                    edges.extend(Edge(sender, head, qkv) for sender in senders)
            if self.has_mlps:
                mlp = MLP(layer)
                edges.extend(Edge(sender, mlp) for sender in self.senders_of(mlp))
        edges.extend(Edge(sender, LOGITS) for sender in self.senders_of(LOGITS))
        return edges


def architecture(model: _HasConfig) -> str:
    """The model's architecture as TransformerLens names it (``LlamaForCausalLM``), for
    messages."""
    cfg = model.cfg
    return str(getattr(cfg, "architecture", None) or getattr(cfg, "model_name", "this"))


def shape_of(model: _HasConfig, *, experts: bool = False) -> ModelShape:
    """Read the node-deciding shape of a TransformerLens model (or anything with ``cfg``).

    ``experts=True`` splits each mixture-of-experts MLP into its experts (``m3.e0``...,
    ``m3.shared``; ``reuse_lens.arch.experts``); a model without one is refused.

    Every node and edge method starts here, so a model without the nodes reuse_lens
    analyses is refused here, once for all of them (``arch.support``).

    Raises:
        UnsupportedArchitectureError: for a model without attention (Mamba and other
            state-space models, whose cfg still says "1 head" per layer), a hybrid of
            attention and other mixers (Jamba, LFM2, Falcon-H1, ...), a mixture of
            attention heads (JetMoE), or heads whose value width is not their query/key
            width (multi-head latent attention: DeepSeek-V2/V3); the message names the
            architecture and the reason.
    """
    from reuse_lens.arch.support import unsupported_reason

    cfg = model.cfg
    reason = unsupported_reason(model, architecture(model))
    if reason is not None:
        raise UnsupportedArchitectureError(reason)
    shape = ModelShape(
        n_layers=int(cfg.n_layers),  # type: ignore[attr-defined]
        n_heads=int(cfg.n_heads),  # type: ignore[attr-defined]
        has_mlps=not bool(getattr(cfg, "attn_only", False)),
        parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
    )
    if not experts:
        return shape
    from reuse_lens.arch.experts import NoMixture, expert_counts

    try:
        routed, shared = expert_counts(model)
    except NoMixture as error:
        raise UnsupportedArchitectureError(f"{architecture(model)}: {error}") from error
    return dataclasses.replace(shape, experts=routed, shared=shared)


def nodes_of(model: _HasConfig | ModelShape) -> list[Node]:
    """Every head and MLP of ``model`` in forward order.

    Within a layer the heads come first (``a0.h0`` ... ``a0.h{n-1}``), then the MLP
    ``m0``; attention-only models have no MLPs.
    """
    shape = model if isinstance(model, ModelShape) else shape_of(model)
    return shape.nodes()


def edges_of(model: _HasConfig | ModelShape) -> list[Edge]:
    """Every edge of ``model``'s residual graph, in forward order of the receivers.

    A sender feeds every receiver in a later layer; in a sequential block the heads also
    feed that layer's MLP (``ModelShape.feeds``). ``input`` feeds everything and
    everything feeds ``logits``.
    """
    shape = model if isinstance(model, ModelShape) else shape_of(model)
    return shape.edges()


def parse_nodes(names: Iterable[str | Endpoint], shape: ModelShape | None = None) -> list[Node]:
    """Parse node names into heads, MLPs and experts, checking them against ``shape`` when
    given."""
    out: list[Node] = []
    for name in names:
        node = parse_node(name)
        if not isinstance(node, AttentionHead | MLP | Expert):
            raise NodeNameError(f"{node.name!r} is an edge end, not a head or MLP")
        if shape is not None:
            shape.check(node)
        out.append(node)
    return out
