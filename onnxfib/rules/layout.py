"""Ops that move channels without computing on them: Flatten and Reshape into features,
Concat, Split, Slice, Transpose, Squeeze/Unsqueeze, Resize/Upsample and Pad.

They color by restriction, concatenation or index maps (DESIGN §2), tie their ports' channels
(`Link`), and rewrite the size constants that name a channel count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..coloring import Coloring
from ..graph import GraphView
from ..partition import Partition
from .attention import bind_attention
from .base import Context, Link, Port, Site
from .elementwise import Kind, UnarySite, only_first_output_used


def _static(dims: list, indices) -> list[int] | None:
    """The sizes of ``dims`` at ``indices`` if all are known integers."""
    picked = [dims[i] for i in indices]
    return [int(d) for d in picked] if all(isinstance(d, (int, np.integer)) and d >= 0 for d in picked) else None


def _channel_position(graph: GraphView, port: Port, tensor: gs.Tensor) -> tuple[int, int] | None:
    """(rank, channel axis counted from the front), when the rank is known."""
    rank = graph.rank(tensor)
    return None if rank is None else (rank, rank + port.axis)


def _write_ints(node: gs.Node, graph: GraphView, index: int, attr: str, values: list[int]) -> None:
    """Store an integer list where ``GraphView.ints`` found it (an input or an attribute)."""
    if len(node.inputs) > index and node.inputs[index].name:
        graph.set_constant(node, index, np.asarray(values, dtype=np.int64))
    else:
        node.attrs[attr] = list(values)


# -- Flatten / Reshape -------------------------------------------------------------------------


@dataclass
class FlattenSite(Site):
    """Channels and trailing axes folded into one feature axis: feature f carries channel
    ``channel[f]`` at spatial ``position[f]`` and is colored (color(channel), position)."""

    channel: np.ndarray = None  # type: ignore[assignment]
    position: np.ndarray = None  # type: ignore[assignment]
    reshape: gs.Node | None = None  # a Reshape whose target names the feature count

    def links(self) -> list[Link]:
        return [Link(self.inputs[0], self.outputs[0], self.channel)]

    def forward(self, ctx: Context) -> None:
        x = ctx.fiber(self.inputs[0])
        labels = Partition.from_rows(np.column_stack([x.partition.labels[self.channel], self.position]))
        ctx.set_fiber(self.outputs[0], Coloring(labels, x.scales[self.channel]))

    def backward(self, ctx: Context) -> None:
        op = ctx.opfiber(self.outputs[0])
        keys = np.full((self.inputs[0].width, int(self.position.max()) + 1), -1)
        keys[self.channel, self.position] = op.labels
        ctx.add_opfiber(self.inputs[0], Partition.from_rows(keys))

    def rewrite(self, ctx: Context) -> None:
        plan = ctx.plan(self.outputs[0])
        if plan is not None and self.reshape is not None:
            ctx.graph.set_reshape_last(self.reshape, plan.partition.n_colors)


def _flatten(node: gs.Node, graph: GraphView, port: Port, axis: int, reshape: gs.Node | None = None) -> Site | None:
    x = node.inputs[0]
    where = _channel_position(graph, port, x)
    if where is None or x.shape is None:
        return None
    rank, channel = where
    axis = axis + rank if axis < 0 else axis
    if not 0 < axis <= channel:
        return None  # the channel axis would fold into the leading (batch) axis
    before, after = _static(x.shape, range(axis, channel)), _static(x.shape, range(channel + 1, rank))
    if before is None or after is None:
        return None
    s_before, s_after, width = int(np.prod(before)), int(np.prod(after)), port.width
    feature = np.arange(width * s_before * s_after)
    channel_of = (feature // s_after) % width
    position = (feature // (s_after * width)) * s_after + feature % s_after
    out = Port(node.outputs[0], -1, feature.size)
    return FlattenSite(nodes=[node], inputs=[port], outputs=[out], coupled=False,
                       channel=channel_of, position=position, reshape=reshape)


def bind_flatten(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    port = known.get(node.inputs[0].name)
    return None if port is None else _flatten(node, graph, port, int(node.attrs.get("axis", 1)))


def bind_reshape(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """Reshape folding trailing axes into one, regrouping only the leading axes, unstacking a
    packed projection, or the end of an attention block."""
    return (_bind_folding_reshape(node, graph, known) or _bind_leading_reshape(node, graph, known)
            or _bind_unstack(node, graph, known) or bind_attention(node, graph, known))


@dataclass
class LeadingReshapeSite(UnarySite):
    """A Reshape that keeps the channel axis last and whole ([B, S, C] <-> [B*S, C]), so each
    output row is an input row: channels pass; the target's channel count is rewritten."""

    def rewrite(self, ctx: Context) -> None:
        plan = ctx.plan(self.outputs[0])
        if plan is not None:
            ctx.graph.set_reshape_last(self.nodes[0], plan.partition.n_colors)


def _bind_leading_reshape(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    port = known.get(node.inputs[0].name)
    target = graph.reshape_target(node, lenient=True)  # only the last, constant entry matters
    if port is None or port.axis != -1 or not target or target[-1] != port.width:
        return None
    out = Port(node.outputs[0], -1, port.width)
    return LeadingReshapeSite(nodes=[node], inputs=[port], outputs=[out], kind=Kind.PASS)


def _bind_folding_reshape(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """Reshape (constant target, or sizes read back from its input) that keeps the leading axes and folds the rest, the
    channel axis among them, into the last one ([N, C, H, W] -> [N, C*H*W]; an RNN's
    [S, N, dirs, H] -> [S, N, dirs*H]): Flatten at the target's last axis."""
    x = node.inputs[0]
    port = known.get(x.name)
    target = graph.reshape_target(node)
    if port is None or target is None or x.shape is None or not 2 <= len(target) <= len(x.shape):
        return None
    target = np.asarray(target)
    axis = target.size - 1
    folded = _static(x.shape, range(axis, len(x.shape)))
    if folded is None or (int(node.attrs.get("allowzero", 0)) and 0 in target):
        return None
    total = int(np.prod(folded))
    leading = [t == 0 or (isinstance(d, (int, np.integer)) and t == d) for t, d in zip(target[:axis], x.shape)]
    inferred_leading = list(target[:axis]).count(-1) == 1 and target[axis] == total
    if not ((all(leading) and target[axis] in (-1, total)) or inferred_leading):
        return None
    return _flatten(node, graph, port, axis, reshape=node)


@dataclass
class ShapeSite(Site):
    """Shape of an activation whose readers only use sizes other than the channel count
    (batch and sequence sizes in exports with dynamic axes): it does not hold the width."""

    def forward(self, ctx: Context) -> None:
        """No channels come out of a Shape."""

    def backward(self, ctx: Context) -> None:
        """No error flows back through a Shape."""


def bind_shape(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    x = node.inputs[0]
    port = known.get(x.name)
    where = None if port is None else _channel_position(graph, port, x)
    if where is None:
        return None
    rank, channel = where
    read = graph.sizes_read(node, rank)
    return None if read is None or channel in read else ShapeSite(nodes=[node], inputs=[port], outputs=[], coupled=False)


# -- Concat / Split / Slice ----------------------------------------------------------------------


def _offsets(parts: list[Port]) -> list[int]:
    """Where each part starts along the concatenated channel axis."""
    return np.cumsum([0] + [p.width for p in parts[:-1]]).tolist()


def _segment_links(whole: Port, parts: list[Port], along_channels: bool) -> list[Link]:
    """Each part's channels tied to its segment of ``whole`` (Concat, Split), or channel to
    channel when the parts are cut along another axis."""
    if not along_channels:
        return [Link(whole, part) for part in parts]
    return [Link(whole, part, offset + np.arange(part.width)) for part, offset in zip(parts, _offsets(parts))]


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
            colored = Coloring(Partition.concat([c.partition for c in parts]), np.concatenate([c.scales for c in parts]))
        else:
            units = [ctx.tol.unit(c).partition for c in parts]
            colored = Coloring(units[0].meet(*units[1:]), np.ones(len(parts[0])))
        ctx.set_fiber(self.outputs[0], colored)

    def backward(self, ctx: Context) -> None:
        op = ctx.opfiber(self.outputs[0])
        for port, offset in zip(self.inputs, _offsets(self.inputs)):
            ctx.add_opfiber(port, op.restrict(slice(offset, offset + port.width)) if self.along_channels else op)


def bind_concat(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    ports = [known.get(t.name) for t in node.inputs]
    if not ports or any(p is None for p in ports) or len({p.axis for p in ports}) != 1:
        return None
    where = _channel_position(graph, ports[0], node.outputs[0])
    if where is None:
        return None
    rank, channel = where
    axis = int(node.attrs["axis"])
    along = (axis + rank if axis < 0 else axis) == channel
    if not along and len({p.width for p in ports}) != 1:
        return None
    width = sum(p.width for p in ports) if along else ports[0].width
    out = Port(node.outputs[0], ports[0].axis, width)
    return ConcatSite(nodes=[node], inputs=ports, outputs=[out], coupled=False, along_channels=along)


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
        parts = [np.asarray(factors, dtype=np.float64) if p is port else
                 np.ones(plan.partition.n_colors if (plan := ctx.plan(p)) else p.width) for p in self.outputs]
        ctx.rescale(self.inputs[0], np.concatenate(parts))

    def backward(self, ctx: Context) -> None:
        ops = [ctx.opfiber(p) for p in self.outputs]
        ctx.add_opfiber(self.inputs[0], Partition.concat(ops) if self.along_channels else ops[0].meet(*ops[1:]))

    def rewrite(self, ctx: Context) -> None:
        if not self.along_channels or ctx.plan(self.inputs[0]) is None:
            return
        sizes = [plan.partition.n_colors if (plan := ctx.plan(p)) else p.width for p in self.outputs]
        node = self.nodes[0]
        if ctx.graph.ints(node, 1, "split") is not None:
            _write_ints(node, ctx.graph, 1, "split", sizes)
        elif len(set(sizes)) > 1:  # an equal split that the merge made unequal: spell the sizes out
            node.attrs.pop("num_outputs", None)
            if ctx.graph.opset >= 13:
                node.inputs.append(gs.Constant(f"{node.outputs[0].name}__onnxfib_split", np.asarray(sizes, np.int64)))
            else:
                node.attrs["split"] = sizes


@dataclass
class UnstackSite(SplitSite):
    """torch's packed in-projection split: Reshape [.., n, W] -> Unsqueeze(0) -> Transpose
    (the new axis and n swap) -> Squeeze -> Gather(i) per part, i.e. a Split of the channel
    axis into n equal parts. A merge replaces the chain with that Split (the parts may no
    longer be equal)."""

    def rewrite(self, ctx: Context) -> None:
        if ctx.plan(self.inputs[0]) is None:
            return
        sizes = [plan.partition.n_colors if (plan := ctx.plan(p)) else p.width for p in self.outputs]
        x, parts = self.inputs[0].tensor, [p.tensor for p in self.outputs]
        name = f"{self.nodes[0].name or x.name}__onnxfib_split"
        if ctx.graph.opset >= 13:
            split = gs.Node("Split", name, {"axis": -1}, inputs=[x, gs.Constant(f"{name}_sizes", np.asarray(sizes, np.int64))],
                            outputs=parts)
        else:
            split = gs.Node("Split", name, {"axis": -1, "split": sizes}, inputs=[x], outputs=parts)
        ctx.graph.replace_nodes(self.nodes, split)


def _single_reader(tensor: gs.Tensor, op: str, graph: GraphView) -> gs.Node | None:
    readers = tensor.outputs
    return readers[0] if len(readers) == 1 and readers[0].op == op and not graph.is_boundary(tensor) else None


def _bind_unstack(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    x, stacked = node.inputs[0], node.outputs[0]
    port = known.get(x.name)
    rank = graph.rank(stacked)
    if port is None or port.axis != -1 or rank is None or graph.rank(x) != rank - 1:
        return None
    count, width = graph.dim(stacked, -2), graph.dim(stacked, -1)
    if count is None or width is None or count * width != port.width or list(stacked.shape[:-2]) != list(x.shape[:-1]):
        return None
    unsqueeze = _single_reader(stacked, "Unsqueeze", graph)
    transpose = unsqueeze and _single_reader(unsqueeze.outputs[0], "Transpose", graph)
    squeeze = transpose and _single_reader(transpose.outputs[0], "Squeeze", graph)
    swapped = list(range(rank + 1))
    swapped[0], swapped[rank - 1] = rank - 1, 0
    if squeeze is None or graph.ints(unsqueeze, 1, "axes") != [0] or [int(p) for p in transpose.attrs.get("perm", [])] != swapped:
        return None
    if [a % (rank + 1) for a in (graph.ints(squeeze, 1, "axes") or [])] != [rank - 1]:
        return None
    gathers = squeeze.outputs[0].outputs
    indices = [graph.constant(g.inputs[1]) if g.op == "Gather" and int(g.attrs.get("axis", 0)) == 0 else None
               for g in gathers]
    if graph.is_boundary(squeeze.outputs[0]) or any(i is None or i.shape != () for i in indices):
        return None
    order = sorted(range(len(gathers)), key=lambda j: int(indices[j]))
    if [int(indices[j]) for j in order] != list(range(count)):
        return None
    outputs = [Port(gathers[j].outputs[0], -1, width) for j in order]
    return UnstackSite(nodes=[node, unsqueeze, transpose, squeeze, *(gathers[j] for j in order)], inputs=[port],
                       outputs=outputs, coupled=False, along_channels=True)


def bind_split(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    x = node.inputs[0]
    port = known.get(x.name)
    where = None if port is None else _channel_position(graph, port, x)
    sizes = graph.ints(node, 1, "split")
    if where is None or sizes is False:
        return None
    rank, channel = where
    axis = int(node.attrs.get("axis", 0))
    along = (axis + rank if axis < 0 else axis) == channel
    count = len(node.outputs)
    if along:
        if sizes is None:
            if port.width % count:
                return None
            sizes = [port.width // count] * count
        if sum(sizes) != port.width or len(sizes) != count:
            return None
    else:
        sizes = [port.width] * count
    outputs = [Port(t, port.axis, size) for t, size in zip(node.outputs, sizes)]
    return SplitSite(nodes=[node], inputs=[port], outputs=outputs, coupled=False, along_channels=along)


@dataclass
class SliceSite(Site):
    """A contiguous range [start, stop) of channels (step 1), or a slice of other axes only."""

    start: int = 0
    stop: int = 0
    entry: int = -1  # index of the channel axis in starts/ends; -1 when not sliced

    def links(self) -> list[Link]:
        if self.entry < 0:
            return [Link(self.inputs[0], self.outputs[0])]
        return [Link(self.inputs[0], self.outputs[0], self.start + np.arange(self.stop - self.start))]

    def forward(self, ctx: Context) -> None:
        x = ctx.fiber(self.inputs[0])
        part = slice(self.start, self.stop) if self.entry >= 0 else slice(None)
        ctx.set_fiber(self.outputs[0], Coloring(x.partition.restrict(part), x.scales[part]))

    def backward(self, ctx: Context) -> None:
        op = ctx.opfiber(self.outputs[0])
        if self.entry < 0:
            ctx.add_opfiber(self.inputs[0], op)
            return
        labels = np.zeros(self.inputs[0].width, dtype=np.int64)  # unread channels get no error here
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
            values = ctx.graph.ints(node, index, attr)
            values[self.entry] = value
            _write_ints(node, ctx.graph, index, attr, values)


def bind_slice(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    x = node.inputs[0]
    port = known.get(x.name)
    where = None if port is None else _channel_position(graph, port, x)
    starts, ends = graph.ints(node, 1, "starts"), graph.ints(node, 2, "ends")
    axes, steps = graph.ints(node, 3, "axes"), graph.ints(node, 4, "steps")
    if where is None or not starts or not ends or axes is False or steps is False:
        return None
    rank, channel = where
    axes = list(range(len(starts))) if axes is None else [a + rank if a < 0 else a for a in axes]
    out = Port(node.outputs[0], port.axis, port.width)
    if channel not in axes:
        return SliceSite(nodes=[node], inputs=[port], outputs=[out], coupled=False)
    entry = axes.index(channel)
    if steps is not None and steps[entry] != 1:
        return None
    start, stop = (min(max(v + port.width if v < 0 else v, 0), port.width) for v in (starts[entry], ends[entry]))
    if start >= stop:
        return None
    out = Port(node.outputs[0], port.axis, stop - start)
    return SliceSite(nodes=[node], inputs=[port], outputs=[out], coupled=False, start=start, stop=stop, entry=entry)


# -- axis movers and spatial pass-through ops ---------------------------------------------------


def _moved(node: gs.Node, port: Port, axis_from_front: int, rank_out: int) -> Site:
    out = Port(node.outputs[0], axis_from_front - rank_out, port.width)
    return UnarySite(nodes=[node], inputs=[port], outputs=[out], kind=Kind.PASS)


def bind_transpose(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    x = node.inputs[0]
    port = known.get(x.name)
    rank = graph.rank(x) if "perm" not in node.attrs else len(node.attrs["perm"])
    if port is None or rank is None:
        return None
    perm = list(node.attrs.get("perm", range(rank - 1, -1, -1)))
    return _moved(node, port, perm.index(rank + port.axis), rank)


def bind_squeeze(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """Squeeze/Unsqueeze of axes other than the channel axis."""
    x = node.inputs[0]
    port = known.get(x.name)
    axes = graph.ints(node, 1, "axes")
    where = None if port is None else _channel_position(graph, port, x)
    if where is None or not axes or not only_first_output_used(node, graph):
        return None
    rank, channel = where
    if node.op == "Squeeze":
        axes = sorted(a + rank if a < 0 else a for a in axes)
        if channel in axes:
            return None
        return _moved(node, port, channel - sum(a < channel for a in axes), rank - len(axes))
    rank_out = rank + len(axes)
    axes = {a + rank_out if a < 0 else a for a in axes}
    kept = [p for p in range(rank_out) if p not in axes]
    return _moved(node, port, kept[channel], rank_out)


_REDUCTIONS = {
    "ReduceMean": Kind.PASS, "ReduceSum": Kind.PASS, "ReduceMax": Kind.HOMOGENEOUS,
    "ReduceMin": Kind.HOMOGENEOUS, "ReduceL1": Kind.HOMOGENEOUS, "ReduceL2": Kind.HOMOGENEOUS,
    "ReduceSumSquare": Kind.FUNCTION, "ReduceLogSumExp": Kind.FUNCTION, "ReduceProd": Kind.FUNCTION,
}


def bind_reduce(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """A reduction over axes other than the channel axis (global pooling as dynamo exports it)."""
    x = node.inputs[0]
    port = known.get(x.name)
    where = None if port is None else _channel_position(graph, port, x)
    axes = graph.ints(node, 1, "axes")
    if where is None or not axes:
        return None  # no axes: every axis is reduced, the channel axis too
    rank, channel = where
    axes = sorted(a + rank if a < 0 else a for a in axes)
    if channel in axes:
        return None
    keep = int(node.attrs.get("keepdims", 1))
    site = _moved(node, port, channel if keep else channel - sum(a < channel for a in axes),
                  rank if keep else rank - len(axes))
    site.kind = _REDUCTIONS[node.op]
    return site


@dataclass
class ResizeSite(UnarySite):
    """Resize/Upsample/Pad: per-channel and linear in the input; a constant ``sizes`` input
    names the channel count, rewritten with it."""

    sizes: tuple[gs.Node, int, int] | None = None  # node, input index, entry of the channel axis

    def rewrite(self, ctx: Context) -> None:
        plan = ctx.plan(self.outputs[0])
        if plan is None or self.sizes is None:
            return
        node, index, entry = self.sizes
        values = GraphView.constant(node.inputs[index]).copy()
        values[entry] = plan.partition.n_colors
        ctx.graph.set_constant(node, index, values)


def bind_resize(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """Resize and Upsample whose scales keep the channel axis (scale 1, or sizes = width)."""
    x = node.inputs[0]
    port = known.get(x.name)
    where = None if port is None else _channel_position(graph, port, x)
    if where is None or "axes" in node.attrs:
        return None
    _, channel = where
    scales_index, sizes_index = (1, None) if node.op == "Upsample" or graph.opset < 11 else (2, 3)
    scales = graph.given(node, scales_index, "scales")
    sizes = graph.ints(node, sizes_index, "sizes") if sizes_index else None
    if scales is False or sizes is False:
        return None
    if scales is not None and scales.size and float(scales[channel]) != 1.0:
        return None
    if sizes and sizes[channel] != port.width:
        return None
    out = Port(node.outputs[0], port.axis, port.width)
    return ResizeSite(nodes=[node], inputs=[port], outputs=[out], kind=Kind.PASS,
                      sizes=(node, sizes_index, channel) if sizes else None)


def bind_pad(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """Pad that adds nothing along the channel axis; a non-zero constant value breaks scales."""
    x = node.inputs[0]
    port = known.get(x.name)
    where = None if port is None else _channel_position(graph, port, x)
    pads = graph.ints(node, 1, "pads")
    if where is None or not pads or len(node.inputs) > 3 and node.inputs[3].name:
        return None  # the opset-18 axes input is not supported
    rank, channel = where
    if pads[channel] or pads[channel + rank]:
        return None
    value = graph.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else node.attrs.get("value", 0.0)
    if value is None:
        return None
    kind = Kind.PASS if node.attrs.get("mode", "constant") != "constant" or float(np.ravel(value)[0]) == 0.0 else Kind.FUNCTION
    out = Port(node.outputs[0], port.axis, port.width)
    return ResizeSite(nodes=[node], inputs=[port], outputs=[out], kind=kind)


def register(registry) -> None:
    registry.register("Flatten", bind_flatten)
    registry.register("Reshape", bind_reshape)
    registry.register("Concat", bind_concat)
    registry.register("Split", bind_split)
    registry.register("Slice", bind_slice)
    registry.register("Transpose", bind_transpose)
    registry.register("Squeeze", bind_squeeze)
    registry.register("Unsqueeze", bind_squeeze)
    registry.register("Resize", bind_resize)
    registry.register("Upsample", bind_resize)
    registry.register("Pad", bind_pad)
    registry.register("Shape", bind_shape)
    for op in _REDUCTIONS:
        registry.register(op, bind_reduce)
