"""Pooling and reductions over axes other than the channel axis: per channel, each with the
scale behaviour of its function (one table, ``_KIND``).

Pools run over the spatial axes of an NCHW tensor; reductions over the axes they name (global
pooling as dynamo exports it). Nothing to rewrite: they name no channel count."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph import GraphView
from .axes import moved
from .base import Declined, Port, Site, channel_input
from .elementwise import Kind, UnarySite, only_first_output_used

#: How each op treats a scaled coloring: averages and sums are linear (PASS), maxima, minima and
#: norms positively homogeneous, sums of squares, log-sum-exp and products neither.
_KIND = {
    "AveragePool": Kind.PASS, "GlobalAveragePool": Kind.PASS,
    "MaxPool": Kind.HOMOGENEOUS, "GlobalMaxPool": Kind.HOMOGENEOUS,
    "LpPool": Kind.HOMOGENEOUS, "GlobalLpPool": Kind.HOMOGENEOUS,
    "ReduceMean": Kind.PASS, "ReduceSum": Kind.PASS,
    "ReduceMax": Kind.HOMOGENEOUS, "ReduceMin": Kind.HOMOGENEOUS,
    "ReduceL1": Kind.HOMOGENEOUS, "ReduceL2": Kind.HOMOGENEOUS,
    "ReduceSumSquare": Kind.FUNCTION, "ReduceLogSumExp": Kind.FUNCTION,
    "ReduceProd": Kind.FUNCTION,
}


def bind_pool(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """Pooling over the spatial axes of an NCHW tensor."""
    read = channel_input(node, graph, known, channel_first=True)
    if isinstance(read, Declined):
        return read
    port = read[0]
    if not only_first_output_used(node, graph):
        return Declined(f"{node.op} whose indices output is read")
    out = Port(node.outputs[0], port.axis, port.width)
    return UnarySite(nodes=[node], inputs=[port], outputs=[out], kind=_KIND[node.op])


def bind_reduce(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """A reduction over axes other than the channel axis."""
    read = channel_input(node, graph, known)
    if isinstance(read, Declined):
        return read
    port, rank, channel = read
    axes = graph.given(node, 1, "axes").ints
    if not axes:
        return Declined(f"{node.op} over every axis (no constant axes), the channel axis too")
    axes = sorted(a + rank if a < 0 else a for a in axes)
    if channel in axes:
        return Declined(f"{node.op} over the channel axis")
    if int(node.attrs.get("keepdims", 1)):
        return moved(node, port, channel, rank, _KIND[node.op])
    return moved(node, port, channel - sum(a < channel for a in axes), rank - len(axes),
                 _KIND[node.op])


def register(registry) -> None:
    for op in _KIND:
        registry.register(op, bind_reduce if op.startswith("Reduce") else bind_pool)
