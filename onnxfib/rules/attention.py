"""Scaled dot-product attention written out in ONNX (torch/HuggingFace eager exports).

The pattern, from the Reshape that merges the heads back:
    q, k, v [.., H*dh] -> Reshape [.., H, dh] -> Transpose (K also moves dh before the keys)
    scores = MatMul(q, k) (-> Mul/Div by a constant, -> Add of a mask) -> Softmax
    o = MatMul(probabilities, v) -> Transpose -> Reshape [.., H*dh]
Head dimensions of Q and K merge together, only where both are fibers (equal, not merely
proportional), and the merged Q row carries the multiplicity (the score sums over the merged
dimensions). V dimensions pass through the softmax-weighted sum, so V and the output merge
together like an element-wise op. Dimensions never merge across heads, and every head keeps
the same width (a Reshape into heads needs equal widths): heads that merge less keep the
others from merging more (paper Sec. 8.4.4, 8.5.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..coloring import Coloring
from ..graph import GraphView
from ..partition import Partition
from .base import Context, Link, Port, Site

_HEADS_FIRST = [0, 2, 1, 3]


@dataclass
class AttentionSite(Site):
    """Ports: inputs q, k, v, output o (all [.., heads*dim] on the last axis)."""

    heads: int = 1
    shapes: dict[str, gs.Node] = None  # type: ignore[assignment]  # the Reshape of q, k, v, o

    def __post_init__(self) -> None:
        self.coupled = False

    def _head_of(self, port: Port) -> np.ndarray:
        return np.arange(port.width) // (port.width // self.heads)

    def links(self) -> list[Link]:
        q, k, v = self.inputs
        return [Link(q, k), Link(v, self.outputs[0])]

    def constraints(self, ctx: Context) -> dict[str, np.ndarray]:
        labels = {}
        for port in self.inputs[:2]:  # the score needs equal values, not the scale rule
            unit = ctx.tol.unit(ctx.fiber(port)).partition.labels
            labels[port.name] = Partition.from_rows(np.column_stack([self._head_of(port), unit])).labels
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
        q, k, v = self.inputs
        for node in self.nodes:
            for tensor in node.outputs:
                ctx.graph.forget_shape(tensor)
        if (plan := ctx.plan(q)) is not None:
            ctx.rescale(q, plan.partition.sizes().astype(np.float64))  # Q . K sums over merged dims
            for name in ("q", "k"):
                ctx.graph.set_reshape_last(self.shapes[name], plan.partition.n_colors // self.heads)
        if (plan := ctx.plan(v)) is not None:
            ctx.graph.set_reshape_last(self.shapes["v"], plan.partition.n_colors // self.heads)
            ctx.graph.set_reshape_last(self.shapes["o"], plan.partition.n_colors)


def _producer(tensor: gs.Tensor, op: str, graph: GraphView) -> gs.Node | None:
    """The node of type ``op`` that produces ``tensor``, when the pattern is ``tensor``'s only
    reader apart from Shape nodes taking its batch and sequence sizes (axes 0 and 1)."""
    if not tensor.inputs or tensor.inputs[0].op != op or graph.is_boundary(tensor):
        return None
    others = [n for n in tensor.outputs if n.op == "Shape"]
    if len(tensor.outputs) - len(others) != 1 or any(not (graph.sizes_read(n, 4) or {9}) <= {0, 1} for n in others):
        return None
    return tensor.inputs[0]


def _perm(node: gs.Node | None) -> list[int] | None:
    return None if node is None else [int(p) for p in node.attrs.get("perm", [])]


def _split_heads(tensor: gs.Tensor, perm: list[int], graph: GraphView, known: dict[str, Port]):
    """Walk back Transposes composing to ``perm`` (through single-input Concats, a KV cache
    with nothing cached) to Reshape [.., H, dh] of a bound activation; (nodes, port, H, dh)."""
    nodes, composed = [], list(range(4))
    while True:
        producer = tensor.inputs[0] if tensor.inputs and len(tensor.outputs) == 1 and not graph.is_boundary(tensor) else None
        if producer is not None and producer.op == "Transpose":
            composed = [_perm(producer)[i] for i in composed]
        elif not (producer is not None and producer.op == "Concat" and len(producer.inputs) == 1):
            break
        nodes.append(producer)
        tensor = producer.inputs[0]
    reshape = _producer(tensor, "Reshape", graph)
    if composed != perm or reshape is None or reshape.inputs[0].name not in known:
        return None
    target = graph.reshape_target(reshape, lenient=True)
    port = known[reshape.inputs[0].name]
    if target is None or len(target) != 4 or port.axis != -1:
        return None
    heads, dim = target[2], target[3]
    if heads == -1 and dim > 0:
        heads = port.width // dim
    elif dim == -1 and heads > 0:
        dim = port.width // heads
    if heads <= 0 or dim <= 0 or heads * dim != port.width:
        return None
    return [reshape, *reversed(nodes)], port, heads, dim


def _reaches_scores(tensor: gs.Tensor, graph: GraphView, depth: int = 3) -> bool:
    """Whether ``tensor`` is the Q.K MatMul of two transposed activations, possibly scaled."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or depth == 0:
        return False
    if producer.op == "MatMul":
        return all(t.inputs and t.inputs[0].op in ("Transpose", "Concat") for t in producer.inputs)
    return producer.op in ("Add", "Mul", "Div") and any(_reaches_scores(t, graph, depth - 1) for t in producer.inputs)


_PASSING = {"Split", "Identity", "Relu", "LeakyRelu"}  # commute with positive factors


def _rescalable(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` comes from a projection (Gemm, MatMul, MatMul + constant bias)
    through ops a positive per-channel factor passes, so the merged Q rows can carry their
    multiplicity (``Context.rescale``)."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None:
        return False
    if producer.op == "Add":  # the bias of a MatMul: one constant input, one MatMul output
        constants = [t for t in producer.inputs if isinstance(t, gs.Constant) or GraphView.constant(t) is not None]
        others = [t for t in producer.inputs if t not in constants]
        return len(constants) == 1 and len(others) == 1 and bool(others[0].inputs) and others[0].inputs[0].op == "MatMul"
    if producer.op == "Reshape":  # only one that keeps the channel axis last and whole
        width = GraphView.dim(tensor, -1)
        return width is not None and width == GraphView.dim(producer.inputs[0], -1) and _rescalable(producer.inputs[0])
    return producer.op in ("MatMul", "Gemm") or (producer.op in _PASSING and _rescalable(producer.inputs[0]))


def bind_attention(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """The attention pattern, anchored at the Reshape that merges the heads back."""
    target = graph.reshape_target(node, lenient=True)
    merge = _producer(node.inputs[0], "Transpose", graph)
    if target is None or len(target) != 3 or _perm(merge) != _HEADS_FIRST:
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
    q = _split_heads(scores.inputs[0], _HEADS_FIRST, graph, known)
    k = _split_heads(scores.inputs[1], [0, 2, 3, 1], graph, known)
    v = _split_heads(values, _HEADS_FIRST, graph, known)
    if q is None or k is None or v is None or not q[2] == k[2] == v[2] or q[3] != k[3]:
        return None
    if not _rescalable(q[1].tensor):
        return None
    out = Port(node.outputs[0], -1, v[1].width)
    if target[-1] not in (-1, out.width):
        return None
    claimed = [*q[0], *k[0], *v[0], scores, *reversed(nodes), weighted, merge, node]
    shapes = {"q": q[0][0], "k": k[0][0], "v": v[0][0], "o": node}
    return AttentionSite(nodes=claimed, inputs=[q[1], k[1], v[1]], outputs=[out], heads=q[2], shapes=shapes)
