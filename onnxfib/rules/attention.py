"""Scaled dot-product attention written out in ONNX (torch and HuggingFace eager exports), and
torch's packed in-projection unstack that feeds it (``UnstackSite``). Both are alternative
Reshape rules, tried after ``reshape.py``'s. (Over 350 lines: the two pattern walks and the
head chain they share are one op family, kept together.)

The pattern, from the Reshape that merges the heads back:
    q, k, v [.., H*dh] -> head chain -> q [.., H, S, dh], k [.., H, dh, S], v [.., H, S, dh]
    scores = MatMul(q, k) (-> Mul/Div by a constant, -> Add of a mask) -> Softmax
    o = MatMul(probabilities, v) -> Transpose [.., H, dh last] -> Reshape [.., H*dh]
A head chain is a Reshape splitting the last axis into heads of dh (HuggingFace's
[B, S, H, dh]; torch's [S, B*H, dh]), then Transposes, Reshapes that keep the dh axis
(torch's [B*H, S, dh] -> [B, H, S, dh]), single-input Concats (a KV cache with nothing
cached) and scalar scalings (torch scales q and k by dh^-1/4 each).
Head dimensions of Q and K merge together, only where both are fibers (equal, not merely
proportional), and the merged Q row carries the multiplicity (the score sums over the merged
dimensions) when Q's producer can be rescaled. V dimensions pass through the softmax-weighted
sum, so V and the output merge together like an element-wise op. Dimensions never merge across
heads, and every head keeps the same width (a Reshape into heads needs equal widths): heads that
merge less keep the others from merging more (paper Sec. 8.4.4, 8.5.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..coloring import Coloring
from ..graph import GraphView
from ..partition import Partition
from .base import Context, Link, Port, Site
from .segments import SplitSite, part_sizes


@dataclass
class HeadChain:
    """How one of q, k, v goes from its activation [.., heads*dim] to its attention MatMul."""

    port: Port
    heads: int
    dim: int
    nodes: list[gs.Node]  # in graph order, the head split first
    entries: list[tuple[gs.Node, int]]  # each Reshape, its target entry (from the end) holding dim
    axis: int  # where the head dimensions lie at the MatMul, counted from the end

    def set_dim(self, graph: GraphView, dim: int) -> None:
        """Rewrite every Reshape target of the chain for heads of ``dim`` dimensions."""
        for reshape, entry in self.entries:
            graph.set_reshape_entry(reshape, entry, dim)


@dataclass
class AttentionSite(Site):
    """Ports: inputs q, k, v, output o (all [.., heads*dim] on the last axis)."""

    heads: int = 1
    chains: tuple[HeadChain, HeadChain, HeadChain] = None  # type: ignore[assignment]  # q, k, v
    merge: gs.Node = None  # type: ignore[assignment]  # the Reshape [.., heads*dim] of o

    def __post_init__(self) -> None:
        self.coupled = False

    def _head_of(self, port: Port) -> np.ndarray:
        return np.arange(port.width) // (port.width // self.heads)

    def links(self) -> list[Link]:
        q, k, v = self.inputs
        return [Link(q, k), Link(v, self.outputs[0])]

    def constraints(self, ctx: Context) -> dict[str, np.ndarray]:
        labels = {}
        q_can_carry = ctx.can_rescale(self.inputs[0])
        for port in self.inputs[:2]:  # the score needs equal values, not the scale rule
            unit = (
                ctx.tol.unit(ctx.fiber(port)).partition.labels
                if q_can_carry
                else np.arange(port.width)
            )
            labels[port.name] = Partition.from_rows(
                np.column_stack([self._head_of(port), unit])
            ).labels
        for port in (self.inputs[2], self.outputs[0]):
            labels[port.name] = self._head_of(port)
        return labels

    def blocks(self) -> dict[str, int]:
        return {port.name: port.width // self.heads for port in (*self.inputs, *self.outputs)}

    def forward(self, ctx: Context) -> None:
        v = ctx.fiber(self.inputs[2])
        heads = Partition(self._head_of(self.inputs[2]))
        ctx.set_fiber(self.outputs[0], Coloring(v.partition.meet(heads), v.scales))

    def backward(self, ctx: Context) -> None:
        q, k, v = self.inputs
        ctx.add_opfiber(q, Partition.discrete(q.width))
        ctx.add_opfiber(k, Partition.discrete(k.width))
        ctx.add_opfiber(v, ctx.opfiber(self.outputs[0]).meet(Partition(self._head_of(v))))

    def rewrite(self, ctx: Context) -> None:
        q_chain, k_chain, v_chain = self.chains
        for node in self.nodes:
            for tensor in node.outputs:
                ctx.graph.forget_shape(tensor)
        if (plan := ctx.plan(q_chain.port)) is not None:
            ctx.rescale(
                q_chain.port, plan.partition.sizes().astype(np.float64)
            )  # Q . K sums over merged dims
            for chain in (q_chain, k_chain):
                chain.set_dim(ctx.graph, plan.partition.n_colors // self.heads)
        if (plan := ctx.plan(v_chain.port)) is not None:
            v_chain.set_dim(ctx.graph, plan.partition.n_colors // self.heads)
            ctx.graph.set_reshape_last(self.merge, plan.partition.n_colors)


def _perm(node: gs.Node | None) -> list[int] | None:
    return None if node is None else [int(p) for p in node.attrs.get("perm", [])]


def _only_reader(
    tensor: gs.Tensor, reader: gs.Node, graph: GraphView, rank: int, keep: int | None
) -> bool:
    """Whether ``reader`` is the only node reading ``tensor`` apart from Shape nodes taking
    sizes other than axis ``keep`` (counted from the front)."""
    if graph.is_boundary(tensor):
        return False
    for node in tensor.outputs:
        if node is reader:
            continue
        read = graph.sizes_read(node, rank) if node.op == "Shape" else None
        if read is None or keep in read:
            return False
    return sum(node is reader for node in tensor.outputs) == 1


def _producer(tensor: gs.Tensor, op: str, graph: GraphView) -> gs.Node | None:
    """The node of type ``op`` producing ``tensor``, when ``tensor`` has that one reader apart
    from Shape nodes taking other sizes than its last."""
    producer = tensor.inputs[0] if tensor.inputs else None
    rank = graph.rank(tensor)
    if producer is None or producer.op != op or rank is None or len(tensor.outputs) < 1:
        return None
    reader = next((n for n in tensor.outputs if n.op != "Shape"), None)
    return (
        producer
        if reader is not None and _only_reader(tensor, reader, graph, rank, rank - 1)
        else None
    )


def _scaled_input(node: gs.Node, graph: GraphView) -> gs.Tensor | None:
    """The activation a Mul or Div by a one-element constant (or a value computed from
    constants, such as torch's dh^-1/4 from a static size) scales; None for other nodes."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    scalars = [
        i
        for i, t in enumerate(node.inputs)
        if graph.computed_from_constants(t) and t.shape is not None and int(np.prod(t.shape)) == 1
    ]
    if len(scalars) != 1 or (node.op == "Div" and scalars[0] != 1):
        return None
    return node.inputs[1 - scalars[0]]


def _head_chain(
    tensor: gs.Tensor, reader: gs.Node, graph: GraphView, known: dict[str, Port]
) -> HeadChain | None:
    """Walk back from ``tensor`` (read by ``reader``) to the Reshape splitting a bound
    activation's last axis into heads, then check forward that every step keeps the head
    dimensions on one axis of unchanged size."""
    nodes: list[gs.Node] = []
    while True:
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None:
            return None
        nodes.append(producer)
        if producer.op == "Reshape" and producer.inputs[0].name in known:
            break
        if producer.op in ("Transpose", "Reshape") or (
            producer.op == "Concat" and len(producer.inputs) == 1
        ):
            tensor = producer.inputs[0]
        elif (scaled := _scaled_input(producer, graph)) is not None:
            tensor = scaled
        else:
            return None
    nodes.reverse()
    split, port = nodes[0], known[nodes[0].inputs[0].name]
    target = graph.reshape_target(split, lenient=True)
    if port.axis != -1 or not target or target[-1] <= 0 or port.width % target[-1]:
        return None
    if not graph.target_entry_is_constant(split, -1):
        return None
    dim, rank, axis = target[-1], len(target), -1
    entries = [(split, -1)]
    for node, following in zip(nodes, [*nodes[1:], reader]):
        if not _only_reader(node.outputs[0], following, graph, rank, rank + axis):
            return None
        if following is reader:
            break
        if following.op == "Transpose":
            perm = _perm(following)
            if len(perm) != rank:
                return None
            axis = perm.index(rank + axis) - rank
        elif following.op == "Reshape":
            trailing = [graph.dim(following.inputs[0], a) for a in range(rank + axis + 1, rank)]
            target = graph.reshape_target(following, lenient=True)
            at = None if target is None else len(target) - 1 - len(trailing)
            if (
                at is None
                or at < 0
                or None in trailing
                or target[at] != dim
                or target[at + 1 :] != trailing
            ):
                return None
            rank, axis = len(target), at - len(target)
            if not graph.target_entry_is_constant(following, axis):
                return None
            entries.append((following, axis))
    return HeadChain(port, port.width // dim, dim, nodes, entries, axis)


def _reaches_scores(tensor: gs.Tensor, graph: GraphView, depth: int = 3) -> bool:
    """Whether ``tensor`` is the Q.K MatMul of two activations, possibly scaled or masked."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or depth == 0:
        return False
    if producer.op == "MatMul":
        return all(graph.constant(t) is None for t in producer.inputs)
    return producer.op in ("Add", "Mul", "Div") and any(
        _reaches_scores(t, graph, depth - 1) for t in producer.inputs
    )


def bind_attention(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """The attention pattern, anchored at the Reshape that merges the heads back."""
    target = graph.reshape_target(node, lenient=True)
    merge = _producer(node.inputs[0], "Transpose", graph)
    perm = _perm(merge)
    if not target or perm is None or len(perm) != 4 or perm[-2:] != [1, 3]:
        return None
    weighted = _producer(merge.inputs[0], "MatMul", graph)
    if weighted is None:
        return None
    probabilities, values = weighted.inputs
    nodes = []
    if (cast := _producer(probabilities, "Cast", graph)) is not None:  # a float-to-float cast
        nodes.append(cast)
        probabilities = cast.inputs[0]
    softmax = _producer(probabilities, "Softmax", graph)
    if softmax is None or int(softmax.attrs.get("axis", -1)) not in (-1, 3):
        return None
    nodes.append(softmax)
    score = softmax.inputs[0]
    while (scores := _producer(score, "MatMul", graph)) is None:  # walk back over scaling and masks
        step = score.inputs[0] if score.inputs and len(score.outputs) == 1 else None
        if step is None or step.op not in ("Add", "Mul", "Div"):
            return None
        leading = [t for t in step.inputs if _reaches_scores(t, graph)]
        if len(leading) != 1:
            return None
        other = step.inputs[1 - step.inputs.index(leading[0])]
        if step.op != "Add" and (graph.constant(other) is None or graph.constant(other).size != 1):
            return None  # only a scalar may scale the scores; Add may bring any mask
        nodes.append(step)
        score = leading[0]
    q = _head_chain(scores.inputs[0], scores, graph, known)
    k = _head_chain(scores.inputs[1], scores, graph, known)
    v = _head_chain(values, weighted, graph, known)
    if q is None or k is None or v is None or (q.axis, k.axis, v.axis) != (-1, -2, -1):
        return None
    if not q.heads == k.heads == v.heads or q.dim != k.dim or q.port.width != k.port.width:
        return None
    out = Port(node.outputs[0], -1, v.port.width)
    if target[-1] not in (-1, out.width):
        return None
    claimed = [*q.nodes, *k.nodes, *v.nodes, scores, *reversed(nodes), weighted, merge, node]
    return AttentionSite(
        nodes=claimed,
        inputs=[q.port, k.port, v.port],
        outputs=[out],
        heads=q.heads,
        chains=(q, k, v),
        merge=node,
    )


@dataclass
class UnstackSite(SplitSite):
    """torch's packed in-projection split: Reshape [.., n, W] -> Unsqueeze(0) -> Transpose
    (the new axis and n swap) -> Squeeze -> Gather(i) per part, i.e. a Split of the channel
    axis into n equal parts. A merge replaces the chain with that Split (the parts may no
    longer be equal)."""

    def rewrite(self, ctx: Context) -> None:
        if ctx.plan(self.inputs[0]) is None:
            return
        sizes = part_sizes(ctx, self.outputs)
        x, parts = self.inputs[0].tensor, [p.tensor for p in self.outputs]
        name = f"{self.nodes[0].name or x.name}__onnxfib_split"
        if ctx.graph.opset >= 13:
            given = gs.Constant(f"{name}_sizes", np.asarray(sizes, np.int64))
            split = gs.Node("Split", name, {"axis": -1}, inputs=[x, given], outputs=parts)
        else:
            split = gs.Node("Split", name, {"axis": -1, "split": sizes}, inputs=[x], outputs=parts)
        ctx.graph.replace_nodes(self.nodes, split)


def _single_reader(tensor: gs.Tensor, op: str, graph: GraphView) -> gs.Node | None:
    readers = tensor.outputs
    if len(readers) == 1 and readers[0].op == op and not graph.is_boundary(tensor):
        return readers[0]
    return None


def bind_unstack(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """The unstack chain, anchored at its Reshape [.., n*W] -> [.., n, W]."""
    x, stacked = node.inputs[0], node.outputs[0]
    port = known.get(x.name)
    rank = graph.rank(stacked)
    if port is None or port.axis != -1 or rank is None or graph.rank(x) != rank - 1:
        return None
    count, width = graph.dim(stacked, -2), graph.dim(stacked, -1)
    if count is None or width is None or count * width != port.width:
        return None
    if list(stacked.shape[:-2]) != list(x.shape[:-1]):
        return None
    unsqueeze = _single_reader(stacked, "Unsqueeze", graph)
    transpose = unsqueeze and _single_reader(unsqueeze.outputs[0], "Transpose", graph)
    squeeze = transpose and _single_reader(transpose.outputs[0], "Squeeze", graph)
    swapped = list(range(rank + 1))
    swapped[0], swapped[rank - 1] = rank - 1, 0
    if (squeeze is None or graph.given(unsqueeze, 1, "axes").ints != [0]
            or _perm(transpose) != swapped):
        return None
    if [a % (rank + 1) for a in (graph.given(squeeze, 1, "axes").ints or [])] != [rank - 1]:
        return None
    gathers = squeeze.outputs[0].outputs
    indices = [
        graph.constant(g.inputs[1])
        if g.op == "Gather" and int(g.attrs.get("axis", 0)) == 0
        else None
        for g in gathers
    ]
    if graph.is_boundary(squeeze.outputs[0]) or any(i is None or i.shape != () for i in indices):
        return None
    order = sorted(range(len(gathers)), key=lambda j: int(indices[j]))
    if [int(indices[j]) for j in order] != list(range(count)):
        return None
    outputs = [Port(gathers[j].outputs[0], -1, width) for j in order]
    nodes = [node, unsqueeze, transpose, squeeze, *(gathers[j] for j in order)]
    return UnstackSite(
        nodes=nodes, inputs=[port], outputs=outputs, coupled=False, along_channels=True
    )


def register(registry) -> None:
    registry.register("Reshape", bind_unstack, alternative=True)
    registry.register("Reshape", bind_attention, alternative=True)
