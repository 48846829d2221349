"""Flatten, Reshape and Shape: channels folded into features, leading axes regrouped, and the
Shape of an activation whose readers take only sizes other than the channel count.

Flatten ties feature (c, s) to channel c (`Link`) and colors it (color(c), s) (DESIGN §2); the
Reshape targets that name a channel count are rewritten with it. Reshapes that split heads or
unstack a packed projection belong to ``attention.py``, which registers its own Reshape rules."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..coloring import Coloring
from ..graph import GraphView
from ..partition import Partition
from .base import (
    UNTRACKED,
    Context,
    Declined,
    Link,
    Port,
    Site,
    channel_input,
    channel_position,
    static_sizes,
)
from .elementwise import Kind, UnarySite


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
        rows = np.column_stack([x.partition.labels[self.channel], self.position])
        ctx.set_fiber(self.outputs[0], Coloring(Partition.from_rows(rows), x.scales[self.channel]))

    def backward(self, ctx: Context) -> None:
        op = ctx.opfiber(self.outputs[0])
        keys = np.full((self.inputs[0].width, int(self.position.max()) + 1), -1)
        keys[self.channel, self.position] = op.labels
        ctx.add_opfiber(self.inputs[0], Partition.from_rows(keys))

    def rewrite(self, ctx: Context) -> None:
        plan = ctx.plan(self.outputs[0])
        if plan is not None and self.reshape is not None:
            ctx.graph.set_reshape_last(self.reshape, plan.partition.n_colors)


def _flatten(node: gs.Node, graph: GraphView, port: Port, axis: int,
             reshape: gs.Node | None = None) -> Site | Declined:
    x = node.inputs[0]
    where = channel_position(graph, port, x)
    if where is None or x.shape is None:
        return Declined(f"{node.op} of a tensor of unknown rank")
    rank, channel = where
    axis = axis + rank if axis < 0 else axis
    if not 0 < axis <= channel:
        return Declined(f"{node.op} folds the channel axis into the leading (batch) axis")
    before = static_sizes(x.shape, range(axis, channel))
    after = static_sizes(x.shape, range(channel + 1, rank))
    if before is None or after is None:
        return Declined(f"{node.op} folds axes of unknown size with the channel axis")
    s_before, s_after, width = int(np.prod(before)), int(np.prod(after)), port.width
    feature = np.arange(width * s_before * s_after)
    channel_of = (feature // s_after) % width
    position = (feature // (s_after * width)) * s_after + feature % s_after
    out = Port(node.outputs[0], -1, feature.size)
    return FlattenSite(nodes=[node], inputs=[port], outputs=[out], coupled=False,
                       channel=channel_of, position=position, reshape=reshape)


def bind_flatten(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    port = known.get(node.inputs[0].name)
    if port is None:
        return UNTRACKED
    return _flatten(node, graph, port, int(node.attrs.get("axis", 1)))


def bind_reshape(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """Reshape folding trailing axes into one, or regrouping only the leading axes."""
    port = known.get(node.inputs[0].name)
    if port is None:
        return UNTRACKED
    for bind in (_bind_folding_reshape, _bind_leading_reshape):
        site = bind(node, graph, port)
        if site is not None:
            return site
    target, rank = graph.reshape_target(node, lenient=True), graph.rank(node.inputs[0])
    if not target or rank is None:
        return Declined("Reshape to a target that is neither constant nor read from its input")
    if len(target) > rank:
        return Declined(f"Reshape {rank}-D to {len(target)}-D splits the channel axis "
                        "(a channel shuffle or a split into heads outside attention)")
    return Declined(f"Reshape {rank}-D to {len(target)}-D moves the channel axis: it neither "
                    "folds it with the trailing axes nor keeps it last and whole")


@dataclass
class LeadingReshapeSite(UnarySite):
    """A Reshape that keeps the channel axis last and whole ([B, S, C] <-> [B*S, C]), so each
    output row is an input row: channels pass; the target's channel count is rewritten."""

    def rewrite(self, ctx: Context) -> None:
        plan = ctx.plan(self.outputs[0])
        if plan is not None:
            ctx.graph.set_reshape_last(self.nodes[0], plan.partition.n_colors)


def _bind_leading_reshape(node: gs.Node, graph: GraphView, port: Port) -> Site | None:
    target = graph.reshape_target(node, lenient=True)  # only the last, constant entry matters
    if port.axis != -1 or not target or target[-1] != port.width:
        return None
    out = Port(node.outputs[0], -1, port.width)
    return LeadingReshapeSite(nodes=[node], inputs=[port], outputs=[out], kind=Kind.PASS)


def _bind_folding_reshape(node: gs.Node, graph: GraphView, port: Port) -> Site | None:
    """Reshape (constant target, or sizes read back from its input) that keeps the leading axes
    and folds the rest, the channel axis among them, into the last one ([N, C, H, W] ->
    [N, C*H*W]; an RNN's [S, N, dirs, H] -> [S, N, dirs*H]): Flatten at the target's last axis."""
    x = node.inputs[0]
    listed = graph.reshape_target(node)
    if listed is None or x.shape is None or not 2 <= len(listed) <= len(x.shape):
        return None
    target = np.asarray(listed)
    axis = target.size - 1
    folded = static_sizes(x.shape, range(axis, len(x.shape)))
    if folded is None or (int(node.attrs.get("allowzero", 0)) and 0 in target):
        return None
    total = int(np.prod(folded))
    leading = [t == 0 or (isinstance(d, (int, np.integer)) and t == d)
               for t, d in zip(target[:axis], x.shape)]
    inferred_leading = list(target[:axis]).count(-1) == 1 and target[axis] == total
    if not ((all(leading) and target[axis] in (-1, total)) or inferred_leading):
        return None
    site = _flatten(node, graph, port, axis, reshape=node)
    return site if isinstance(site, Site) else None


@dataclass
class ShapeSite(Site):
    """Shape of an activation whose readers only use sizes other than the channel count
    (batch and sequence sizes in exports with dynamic axes): it does not hold the width."""

    def forward(self, ctx: Context) -> None:
        """No channels come out of a Shape."""

    def backward(self, ctx: Context) -> None:
        """No error flows back through a Shape."""


def bind_shape(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    read = channel_input(node, graph, known)
    if isinstance(read, Declined):
        return read
    port, rank, channel = read
    sizes = graph.sizes_read(node, rank)
    if sizes is None or channel in sizes:
        return Declined("Shape whose readers use the channel count")
    return ShapeSite(nodes=[node], inputs=[port], outputs=[], coupled=False)


def register(registry) -> None:
    registry.register("Flatten", bind_flatten)
    registry.register("Reshape", bind_reshape)
    registry.register("Shape", bind_shape)
