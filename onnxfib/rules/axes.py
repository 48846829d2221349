"""Ops that move the channel axis or act on the other axes only: Transpose, Squeeze/Unsqueeze,
Resize/Upsample and Pad.

Each is per channel (a coupled site: its channels pass, DESIGN §2); only Resize's ``sizes``
names a channel count, rewritten with it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Given, GraphView
from .base import UNTRACKED, Context, Declined, Port, Site, channel_input
from .elementwise import Kind, UnarySite, only_first_output_used


def moved(node: gs.Node, port: Port, axis_from_front: int, rank_out: int,
          kind: Kind = Kind.PASS) -> UnarySite:
    """A per-channel site whose output holds the channel axis at ``axis_from_front`` of
    ``rank_out`` axes."""
    out = Port(node.outputs[0], axis_from_front - rank_out, port.width)
    return UnarySite(nodes=[node], inputs=[port], outputs=[out], kind=kind)


def bind_transpose(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    x = node.inputs[0]
    port = known.get(x.name)
    rank = graph.rank(x) if "perm" not in node.attrs else len(node.attrs["perm"])
    if port is None:
        return UNTRACKED
    if rank is None:
        return Declined("Transpose of a tensor of unknown rank")
    perm = list(node.attrs.get("perm", range(rank - 1, -1, -1)))
    return moved(node, port, perm.index(rank + port.axis), rank)


def bind_squeeze(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """Squeeze/Unsqueeze of axes other than the channel axis."""
    read = channel_input(node, graph, known)
    if isinstance(read, Declined):
        return read
    port, rank, channel = read
    axes = graph.given(node, 1, "axes").ints
    if not axes or not only_first_output_used(node, graph):
        return Declined(f"{node.op} without constant axes")
    if node.op == "Squeeze":
        axes = sorted(a + rank if a < 0 else a for a in axes)
        if channel in axes:
            return Declined("Squeeze of the channel axis")
        return moved(node, port, channel - sum(a < channel for a in axes), rank - len(axes))
    rank_out = rank + len(axes)
    added = {a + rank_out if a < 0 else a for a in axes}
    kept = [p for p in range(rank_out) if p not in added]
    return moved(node, port, kept[channel], rank_out)


@dataclass
class ResizeSite(UnarySite):
    """Resize/Upsample: per channel and linear in the input; a constant ``sizes`` input names
    the channel count, rewritten with it."""

    sizes: tuple[gs.Node, int, int] | None = None  # node, input index, entry of the channel axis

    def rewrite(self, ctx: Context) -> None:
        plan = ctx.plan(self.outputs[0])
        if plan is None or self.sizes is None:
            return
        node, index, entry = self.sizes
        given = GraphView.constant(node.inputs[index])
        assert given is not None, "bound only with constant sizes"
        values = given.copy()
        values[entry] = plan.partition.n_colors
        ctx.graph.set_constant(node, index, values)


def bind_resize(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """Resize and Upsample whose scales keep the channel axis (scale 1, or sizes = width)."""
    read = channel_input(node, graph, known)
    if isinstance(read, Declined):
        return read
    port, _, channel = read
    if "axes" in node.attrs:
        return Declined(f"{node.op} with the axes attribute")
    scales_index, sizes_index = (1, None) if node.op == "Upsample" or graph.opset < 11 else (2, 3)
    given_scales = graph.given(node, scales_index, "scales")
    given_sizes = graph.given(node, sizes_index, "sizes") if sizes_index else Given(False)
    if given_scales.computed or given_sizes.computed:
        return Declined(f"{node.op} scales or sizes are not constant")
    scales, sizes = given_scales.value, given_sizes.ints
    if scales is not None and scales.size and float(scales[channel]) != 1.0:
        return Declined(f"{node.op} scales the channel axis")
    if sizes and sizes[channel] != port.width:
        return Declined(f"{node.op} changes the channel count")
    out = Port(node.outputs[0], port.axis, port.width)
    return ResizeSite(nodes=[node], inputs=[port], outputs=[out], kind=Kind.PASS,
                      sizes=(node, sizes_index, channel) if sizes and sizes_index else None)


@dataclass
class PadSite(UnarySite):
    """Pad of axes other than the channel axis: per channel, nothing to rewrite (the pads name
    no channel count). Zero padding and the edge modes commute with positive scales
    (``Kind.PASS``); a non-zero constant does not (``Kind.FUNCTION``: colors split by scale)."""


def bind_pad(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """Pad that adds nothing along the channel axis."""
    read = channel_input(node, graph, known)
    if isinstance(read, Declined):
        return read
    port, rank, channel = read
    pads = graph.given(node, 1, "pads").ints
    if len(node.inputs) > 3 and node.inputs[3].name:
        return Declined("Pad with the opset-18 axes input")
    if not pads:
        return Declined("Pad without constant pads")
    if pads[channel] or pads[channel + rank]:
        return Declined("Pad of the channel axis")
    given = len(node.inputs) > 2 and node.inputs[2].name
    value = graph.constant(node.inputs[2]) if given else node.attrs.get("value", 0.0)
    if value is None:
        return Declined("Pad with a value that is not constant")
    zero = node.attrs.get("mode", "constant") != "constant" or float(np.ravel(value)[0]) == 0.0
    out = Port(node.outputs[0], port.axis, port.width)
    return PadSite(nodes=[node], inputs=[port], outputs=[out],
                   kind=Kind.PASS if zero else Kind.FUNCTION)


def register(registry) -> None:
    registry.register("Transpose", bind_transpose)
    registry.register("Squeeze", bind_squeeze)
    registry.register("Unsqueeze", bind_squeeze)
    registry.register("Resize", bind_resize)
    registry.register("Upsample", bind_resize)
    registry.register("Pad", bind_pad)
