"""Concat, Split and Slice: channels cut into or joined from contiguous segments.

Along the channel axis they color by concatenation or restriction (DESIGN §2) and tie each
part's channels to its segment of the whole (`Link`); along another axis every part carries
all the channels. The split sizes and slice bounds that name channel counts are rewritten."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..coloring import Coloring
from ..graph import GraphView
from ..partition import Partition
from .base import UNTRACKED, Context, Declined, Link, Port, Site, channel_input, channel_position


def write_ints(node: gs.Node, graph: GraphView, index: int, attr: str, values: list[int]) -> None:
    """Store an integer list where ``GraphView.ints`` found it (an input or an attribute)."""
    if len(node.inputs) > index and node.inputs[index].name:
        graph.set_constant(node, index, np.asarray(values, dtype=np.int64))
    else:
        node.attrs[attr] = list(values)


def _offsets(parts: list[Port]) -> list[int]:
    """Where each part starts along the concatenated channel axis."""
    return np.cumsum([0] + [p.width for p in parts[:-1]]).tolist()


def _segment_links(whole: Port, parts: list[Port], along_channels: bool) -> list[Link]:
    """Each part's channels tied to its segment of ``whole`` (Concat, Split), or channel to
    channel when the parts are cut along another axis."""
    if not along_channels:
        return [Link(whole, part) for part in parts]
    return [Link(whole, part, offset + np.arange(part.width))
            for part, offset in zip(parts, _offsets(parts))]


def part_sizes(ctx: Context, parts: list[Port]) -> list[int]:
    """Each part's width after the collapse (its plan's colors, or its width)."""
    return [plan.partition.n_colors if (plan := ctx.plan(p)) else p.width for p in parts]


@dataclass
class ConcatSite(Site):
    """Concat along the channel axis (colorings concatenate, colors never shared between parts)
    or along another axis (the And rule over all inputs)."""

    along_channels: bool = True

    def links(self) -> list[Link]:
        return _segment_links(self.outputs[0], self.inputs, self.along_channels)

    def forward(self, ctx: Context) -> None:
        parts = [ctx.fiber(p) for p in self.inputs]
        if self.along_channels:
            colored = Coloring(Partition.concat([c.partition for c in parts]),
                               np.concatenate([c.scales for c in parts]))
        else:
            units = [ctx.tol.unit(c).partition for c in parts]
            colored = Coloring(units[0].meet(*units[1:]), np.ones(len(parts[0])))
        ctx.set_fiber(self.outputs[0], colored)

    def backward(self, ctx: Context) -> None:
        op = ctx.opfiber(self.outputs[0])
        for port, offset in zip(self.inputs, _offsets(self.inputs)):
            part = op.restrict(slice(offset, offset + port.width)) if self.along_channels else op
            ctx.add_opfiber(port, part)


def bind_concat(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    found = [known.get(t.name) for t in node.inputs]
    ports = [p for p in found if p is not None]
    if not ports:
        return UNTRACKED
    if len(ports) != len(found):
        return Declined("Concat of a tracked tensor with an untracked one (a constant or a "
                        "barrier's output)")
    if len({p.axis for p in ports}) != 1:
        return Declined("Concat of tensors whose channel axes differ")
    where = channel_position(graph, ports[0], node.outputs[0])
    if where is None:
        return Declined("Concat with an output of unknown rank")
    rank, channel = where
    axis = int(node.attrs["axis"])
    along = (axis + rank if axis < 0 else axis) == channel
    if not along and len({p.width for p in ports}) != 1:
        return Declined("Concat along another axis of tensors whose channel counts differ")
    width = sum(p.width for p in ports) if along else ports[0].width
    out = Port(node.outputs[0], ports[0].axis, width)
    return ConcatSite(nodes=[node], inputs=ports, outputs=[out], coupled=False,
                      along_channels=along)


@dataclass
class SplitSite(Site):
    """Split along the channel axis (each output restricts the coloring) or along another axis
    (every output carries the input's channels)."""

    along_channels: bool = True

    def links(self) -> list[Link]:
        return _segment_links(self.inputs[0], self.outputs, self.along_channels)

    def forward(self, ctx: Context) -> None:
        x = ctx.fiber(self.inputs[0])
        for port, offset in zip(self.outputs, _offsets(self.outputs)):
            part = slice(offset, offset + port.width) if self.along_channels else slice(None)
            ctx.set_fiber(port, Coloring(x.partition.restrict(part), x.scales[part]))

    def can_rescale(self, ctx: Context, port: Port) -> bool:
        return self.along_channels and ctx.can_rescale(self.inputs[0])

    def rescale(self, ctx: Context, port: Port, factors: np.ndarray) -> None:
        """Pass one output's factors to the input's producer, ones on the other segments."""
        if not self.along_channels:
            super().rescale(ctx, port, factors)
        parts = [np.asarray(factors, dtype=np.float64) if p is port else np.ones(size)
                 for p, size in zip(self.outputs, part_sizes(ctx, self.outputs))]
        ctx.rescale(self.inputs[0], np.concatenate(parts))

    def backward(self, ctx: Context) -> None:
        ops = [ctx.opfiber(p) for p in self.outputs]
        whole = Partition.concat(ops) if self.along_channels else ops[0].meet(*ops[1:])
        ctx.add_opfiber(self.inputs[0], whole)

    def rewrite(self, ctx: Context) -> None:
        if not self.along_channels or ctx.plan(self.inputs[0]) is None:
            return
        sizes = part_sizes(ctx, self.outputs)
        node = self.nodes[0]
        if ctx.graph.given(node, 1, "split").present:
            write_ints(node, ctx.graph, 1, "split", sizes)
        elif len(set(sizes)) > 1:  # an equal split that the merge made unequal: spell sizes out
            node.attrs.pop("num_outputs", None)
            if ctx.graph.opset >= 13:
                name = f"{node.outputs[0].name}__onnxfib_split"
                node.inputs.append(gs.Constant(name, np.asarray(sizes, np.int64)))
            else:
                node.attrs["split"] = sizes


def bind_split(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    read = channel_input(node, graph, known)
    if isinstance(read, Declined):
        return read
    port, rank, channel = read
    split = graph.given(node, 1, "split")
    if split.computed:
        return Declined("Split sizes are not constant")
    sizes = split.ints
    axis = int(node.attrs.get("axis", 0))
    along = (axis + rank if axis < 0 else axis) == channel
    count = len(node.outputs)
    if along:
        if sizes is None:
            if port.width % count:
                return Declined(f"Split of {port.width} channels into {count} equal parts")
            sizes = [port.width // count] * count
        if sum(sizes) != port.width or len(sizes) != count:
            return Declined("Split sizes disagree with the channel count")
    else:
        sizes = [port.width] * count
    outputs = [Port(t, port.axis, size) for t, size in zip(node.outputs, sizes)]
    return SplitSite(nodes=[node], inputs=[port], outputs=outputs, coupled=False,
                     along_channels=along)


@dataclass
class SliceSite(Site):
    """A contiguous range [start, stop) of channels (step 1), or a slice of other axes only."""

    start: int = 0
    stop: int = 0
    entry: int = -1  # index of the channel axis in starts/ends; -1 when not sliced

    def links(self) -> list[Link]:
        if self.entry < 0:
            return [Link(self.inputs[0], self.outputs[0])]
        kept = self.start + np.arange(self.stop - self.start)
        return [Link(self.inputs[0], self.outputs[0], kept)]

    def forward(self, ctx: Context) -> None:
        x = ctx.fiber(self.inputs[0])
        part = slice(self.start, self.stop) if self.entry >= 0 else slice(None)
        ctx.set_fiber(self.outputs[0], Coloring(x.partition.restrict(part), x.scales[part]))

    def backward(self, ctx: Context) -> None:
        op = ctx.opfiber(self.outputs[0])
        if self.entry < 0:
            ctx.add_opfiber(self.inputs[0], op)
            return
        labels = np.zeros(self.inputs[0].width, dtype=np.int64)  # unread channels: no error here
        labels[self.start:self.stop] = op.labels + 1
        ctx.add_opfiber(self.inputs[0], Partition(labels))

    def rewrite(self, ctx: Context) -> None:
        source, target = ctx.plan(self.inputs[0]), ctx.plan(self.outputs[0])
        if self.entry < 0 or source is None:
            return
        start = int(source.partition.labels[:self.start].max()) + 1 if self.start else 0
        stop = start + (target.partition.n_colors if target else self.outputs[0].width)
        node = self.nodes[0]
        for index, attr, value in ((1, "starts", start), (2, "ends", stop)):
            values = ctx.graph.given(node, index, attr).ints
            assert values, "bound only with constant starts and ends"
            values[self.entry] = value
            write_ints(node, ctx.graph, index, attr, values)


def bind_slice(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    read = channel_input(node, graph, known)
    if isinstance(read, Declined):
        return read
    port, rank, channel = read
    starts, ends = graph.given(node, 1, "starts").ints, graph.given(node, 2, "ends").ints
    given_axes, given_steps = graph.given(node, 3, "axes"), graph.given(node, 4, "steps")
    if not starts or not ends or given_axes.computed or given_steps.computed:
        return Declined("Slice bounds, axes or steps are not constant")
    axes, steps = given_axes.ints, given_steps.ints
    axes = list(range(len(starts))) if axes is None else [a + rank if a < 0 else a for a in axes]
    out = Port(node.outputs[0], port.axis, port.width)
    if channel not in axes:
        return SliceSite(nodes=[node], inputs=[port], outputs=[out], coupled=False)
    entry = axes.index(channel)
    if steps is not None and steps[entry] != 1:
        return Declined("Slice of the channel axis with a step other than 1")
    start, stop = (min(max(v + port.width if v < 0 else v, 0), port.width)
                   for v in (starts[entry], ends[entry]))
    if start >= stop:
        return Declined("Slice of no channels")
    out = Port(node.outputs[0], port.axis, stop - start)
    return SliceSite(nodes=[node], inputs=[port], outputs=[out], coupled=False, start=start,
                     stop=stop, entry=entry)


def register(registry) -> None:
    registry.register("Concat", bind_concat)
    registry.register("Split", bind_split)
    registry.register("Slice", bind_slice)
