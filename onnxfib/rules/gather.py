"""Gather: embedding lookups (a producer) and selections along a non-channel axis (pass-through).

An embedding ``Gather(table, indices)`` of a constant 2-D table along axis 0 is a linear layer
applied to a one-hot input: output channel j is column j of the table, so channels whose
columns are equal (or proportional: the scale rule) are synchronized for every index, and a
merge is a column merge of the table. A Gather of an activation with constant indices along
another axis than the channel axis (BERT's pooler reads token 0) passes channels through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import GraphView
from .base import UNTRACKED, Context, Declined, Port, Site
from .elementwise import Kind, UnarySite


@dataclass
class EmbeddingSite(Site):
    """``y[..., j] = table[indices[...], j]``: a producer of the table's columns."""

    def _table(self) -> np.ndarray:
        return GraphView.constant(self.nodes[0].inputs[0])

    def forward(self, ctx: Context) -> None:
        columns = self._table().astype(np.float64).T  # a copy of our own: normalised in place
        ctx.set_fiber(self.outputs[0], ctx.tol.cluster(columns, overwrite=True))

    def backward(self, ctx: Context) -> None:
        """No channel input: nothing to contribute."""

    def rewrite(self, ctx: Context) -> None:
        plan = ctx.plan(self.outputs[0])
        if plan is not None:
            ctx.graph.set_constant(self.nodes[0], 0, plan.fit_base(self._table(), 1))


def bind_gather(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """An embedding lookup (constant float 2-D table, axis 0, integer indices), or a
    Gather of a channel port with constant indices along another axis."""
    data, indices = node.inputs
    axis = int(node.attrs.get("axis", 0))
    table, index = graph.constant(data), graph.constant(indices)
    if table is not None:
        if table.ndim != 2 or axis not in (0, -2) or not np.issubdtype(table.dtype, np.floating):
            return Declined("Gather from a constant that is not a float 2-D table read by rows")
        return EmbeddingSite(
            nodes=[node], inputs=[], outputs=[Port(node.outputs[0], -1, int(table.shape[1]))]
        )
    port = known.get(data.name)
    rank = graph.rank(data)
    if port is None:
        return UNTRACKED
    if index is None or rank is None:
        return Declined("Gather with indices that are not constant, or of unknown rank")
    axis, channel = axis % rank, rank + port.axis
    if axis == channel:
        return Declined("Gather along the channel axis")
    rank_out = rank - 1 + index.ndim
    moved = channel if axis > channel else channel - 1 + index.ndim
    return UnarySite(
        nodes=[node],
        inputs=[port],
        outputs=[Port(node.outputs[0], moved - rank_out, port.width)],
        kind=Kind.PASS,
    )


def register(registry) -> None:
    registry.register("Gather", bind_gather)
