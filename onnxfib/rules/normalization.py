"""Normalisations over the channel axis: LayerNormalization.

Its statistics read every channel, so its input can never narrow and its output keeps the
width too; but synchronized input channels stay synchronized after it (the row's mean and
deviation are shared), so its output is colored and the layers reading it see those fibers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..coloring import Coloring
from ..graph import GraphView
from .base import Context, Port, Site, channel_rows
from .elementwise import only_first_output_used


@dataclass
class LayerNormSite(Site):
    """``y = scale * (x - mean(x)) / std(x) + bias`` over the channel axis."""

    source: Port | None = None  # the input, read but never narrowed

    def pinned(self) -> dict[str, str]:
        return {self.outputs[0].name: f"comes from {self.nodes[0].op} (its statistics read every channel)"}

    def _rows(self, index: int) -> np.ndarray | None:
        node, out = self.nodes[0], self.outputs[0]
        if len(node.inputs) <= index or not node.inputs[index].name:
            return None
        return channel_rows(GraphView.constant(node.inputs[index]), out.axis, out.width)

    def forward(self, ctx: Context) -> None:
        width = self.outputs[0].width
        x = ctx.fiber(self.source) if self.source is not None else Coloring.discrete(width)
        y = ctx.tol.unit(x)  # x_i = x_j gives equal normalised values; proportional ones do not
        for index in (1, 2):
            rows = self._rows(index)
            if rows is not None:
                y = ctx.tol.split_by_rows(y, rows)
        ctx.set_fiber(self.outputs[0], y)

    def backward(self, ctx: Context) -> None:
        """The input is not a port: nothing narrows through a normalisation."""


def bind_layer_norm(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """LayerNormalization over the last axis only, with constant scale (and bias)."""
    x = node.inputs[0]
    scale = graph.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    bias_given = len(node.inputs) > 2 and node.inputs[2].name
    if scale is None or scale.ndim != 1 or (bias_given and graph.constant(node.inputs[2]) is None):
        return None
    rank = graph.rank(x)
    axis = int(node.attrs.get("axis", -1))
    if not only_first_output_used(node, graph) or not (axis == -1 or (rank is not None and axis == rank - 1)):
        return None
    port = known.get(x.name)
    source = port if port is not None and port.axis == -1 and port.width == scale.size else None
    out = Port(node.outputs[0], -1, int(scale.size))
    return LayerNormSite(nodes=[node], inputs=[], outputs=[out], coupled=False, source=source)


def register(registry) -> None:
    registry.register("LayerNormalization", bind_layer_norm)
