"""The vocabulary of reuse_lens: nodes, edges and the kinds of patch.

Names follow the MIB circuit track (Mueller et al. 2025): ``a3.h1`` is head 1 of
layer 3, ``m3`` is the MLP of layer 3, and ``input`` and ``logits`` are the two
ends of the residual stream. An edge into a head names the input it enters by,
``a0.h1->a2.h3<q>``, because the q, k and v inputs of a head are patched apart.

This module imports neither torch nor TransformerLens, so that the names can be
used (and circuits read) without loading a model.
"""

from __future__ import annotations

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

Node = AttentionHead | MLP
"""A component that a circuit can contain."""

Endpoint = AttentionHead | MLP | InputNode | LogitsNode
"""Anything an edge can start or end at."""

Sender = AttentionHead | MLP | InputNode
"""Anything an edge can start at."""


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

    @property
    def receiver_name(self) -> str:
        """The receiver with its input, as MIB writes it: ``a2.h3<q>`` or ``m1``."""
        suffix = f"<{self.receiver_input}>" if self.receiver_input else ""
        return f"{self.receiver.name}{suffix}"

    @property
    def name(self) -> str:
        return f"{self.sender.name}->{self.receiver_name}"

    def __str__(self) -> str:
        return self.name


_HEAD_RE = re.compile(r"a(\d+)\.h(\d+)")
_MLP_RE = re.compile(r"m(\d+)")
_RECEIVER_RE = re.compile(r"(.+?)(?:<([qkv])>)?")

_NAME_HELP = (
    "node names are 'a{layer}.h{head}' for heads and 'm{layer}' for MLPs, e.g. 'a3.h1', 'm3'"
)


def parse_node(name: str | Endpoint) -> Endpoint:
    """Parse a MIB node name (``a3.h1``, ``m3``, ``input``, ``logits``) into its dataclass.

    Raises:
        NodeNameError: if ``name`` is not a valid node name.
    """
    if isinstance(name, AttentionHead | MLP | InputNode | LogitsNode):
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
    raise NodeNameError(f"invalid node name {name!r}: {_NAME_HELP}, plus 'input' and 'logits'")


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
    if isinstance(sender, LogitsNode):
        raise NodeNameError(f"invalid edge {name!r}: 'logits' cannot send")
    if isinstance(receiver, InputNode):
        raise NodeNameError(f"invalid edge {name!r}: 'input' cannot receive")
    return Edge(sender, receiver, match[2])  # type: ignore[arg-type]


class _HasConfig(Protocol):
    @property
    def cfg(self) -> object: ...


@dataclass(frozen=True)
class ModelShape:
    """The part of a model's configuration that decides its nodes and its residual graph.

    ``parallel``: attention and MLP read the same residual stream (GPT-NeoX, GPT-J, Phi,
    Falcon, Cohere), so a layer's heads do not feed its MLP.
    """

    n_layers: int
    n_heads: int
    has_mlps: bool
    parallel: bool = False

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

    def nodes(self) -> list[Node]:
        """Every head and MLP in forward order: a layer's heads, then its MLP."""
        out: list[Node] = []
        for layer in range(self.n_layers):
            out.extend(AttentionHead(layer, head) for head in range(self.n_heads))
            if self.has_mlps:
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
            and isinstance(receiver, MLP)
            and isinstance(sender, AttentionHead)
            and sender.layer == receiver.layer
        )

    def senders_of(self, receiver: AttentionHead | MLP | LogitsNode) -> list[Sender]:
        """The senders that ``receiver`` reads, in forward order (a prefix of all senders)."""
        senders: list[Sender] = [INPUT, *self.nodes()]
        return [s for s in senders if self.feeds(s, receiver)]

    def edges(self) -> list[Edge]:
        """Every edge, receivers in forward order: per layer the heads' q, k and v inputs,
        then the MLP; ``logits`` last."""
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


def shape_of(model: _HasConfig) -> ModelShape:
    """Read the node-deciding shape of a TransformerLens model (or anything with ``cfg``).

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
    return ModelShape(
        n_layers=int(cfg.n_layers),  # type: ignore[attr-defined]
        n_heads=int(cfg.n_heads),  # type: ignore[attr-defined]
        has_mlps=not bool(getattr(cfg, "attn_only", False)),
        parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
    )


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
    """Parse node names into heads and MLPs, checking them against ``shape`` when given."""
    out: list[Node] = []
    for name in names:
        node = parse_node(name)
        if not isinstance(node, AttentionHead | MLP):
            raise NodeNameError(f"{node.name!r} is an edge end, not a head or MLP")
        if shape is not None:
            shape.check(node)
        out.append(node)
    return out
