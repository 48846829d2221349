"""Normalisations over the channel axis: LayerNormalization, merged with weighted statistics.

If channel i of the lifted input x (width n) equals the base value x_c of its color c (size
m_c), the row's mean and variance are the m_c / n weighted statistics of the base, so a merged
LayerNorm is ``gamma_c (x_c - mean_w) / sqrt(var_w + epsilon) + beta_c`` (DESIGN §2, Weighted
LayerNorm). Input and output are tied channel for channel; only truly equal channels (unit
scales) with equal gamma and beta share a color. A LayerNorm whose input is not a channel
port (it comes from a barrier), or whose scale is not float32/float64, pins its output width
as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..coloring import Coloring
from ..graph import GraphView
from .base import Context, Plan, Port, Site, channel_rows
from .elementwise import only_first_output_used


@dataclass
class LayerNormSite(Site):
    """``y = scale * (x - mean(x)) / sqrt(var(x) + epsilon) + bias`` over the channel axis."""

    def pinned(self) -> dict[str, str]:
        if self.inputs:
            return {}
        return {
            self.outputs[
                0
            ].name: f"comes from {self.nodes[0].op} (its input is not a float32/64 channel port)"
        }

    @property
    def expands_output(self) -> bool:
        return bool(self.inputs)

    def _constant(self, index: int) -> np.ndarray | None:
        node = self.nodes[0]
        if len(node.inputs) <= index or not node.inputs[index].name:
            return None
        return GraphView.constant(node.inputs[index])

    def _rows(self, index: int) -> np.ndarray | None:
        value, out = self._constant(index), self.outputs[0]
        return None if value is None else channel_rows(value, out.axis, out.width)

    def forward(self, ctx: Context) -> None:
        width = self.outputs[0].width
        x = ctx.fiber(self.inputs[0]) if self.inputs else Coloring.discrete(width)
        y = ctx.tol.unit(x)  # x_i = x_j gives equal normalised values; proportional ones do not
        for index in (1, 2):
            rows = self._rows(index)
            if rows is not None:
                y = ctx.tol.split_by_rows(y, rows)
        ctx.set_fiber(self.outputs[0], y)

    def backward(self, ctx: Context) -> None:
        """An input channel's error reads its own output error, gamma and normalised value
        (besides row sums shared by all channels): output opfibers meet output fibers."""
        if self.inputs:
            out = self.outputs[0]
            ctx.add_opfiber(self.inputs[0], ctx.opfiber(out).meet(ctx.fiber(out).partition))

    def rewrite(self, ctx: Context) -> None:
        plan = ctx.plan(self.outputs[0]) if self.inputs else None
        if plan is None or plan.partition.is_discrete:
            return
        self._write_weighted(ctx, plan)

    def _write_weighted(self, ctx: Context, plan: Plan) -> None:
        """Replace the node by the weighted form (Mul, ReduceSum, Sub, Sqrt, Div) over the base."""
        node, graph = self.nodes[0], ctx.graph
        x, y = node.inputs[0], node.outputs[0]
        gamma = self._constant(1)
        dtype = gamma.dtype
        width = len(plan.partition)
        merged_gamma = plan.partition.reduce(gamma.astype(np.float64), 0, mean=True)
        weights = graph.shared_constant(plan.partition.sizes() / width, dtype, "layernorm_weights")
        epsilon = graph.shared_constant(
            np.asarray(float(node.attrs.get("epsilon", 1e-5))), dtype, "layernorm_epsilon"
        )
        axes = graph.shared_constant(np.asarray([-1]), np.int64, "layernorm_axes")
        name = node.name or y.name
        nodes: list[gs.Node] = []

        def op(
            kind: str, inputs: list[gs.Tensor], out: gs.Variable | None = None, **attrs
        ) -> gs.Variable:
            out = out or gs.Variable(f"{name}__onnxfib_{len(nodes)}", dtype=y.dtype)
            nodes.append(
                gs.Node(
                    kind, f"{name}__onnxfib_{kind}{len(nodes)}", attrs, inputs=inputs, outputs=[out]
                )
            )
            return out

        # LayerNormalization exists from opset 17, so ReduceSum takes its axes as an input
        mean = op("ReduceSum", [op("Mul", [x, weights]), axes], keepdims=1)
        centred = op("Sub", [x, mean])
        var = op(
            "ReduceSum", [op("Mul", [op("Mul", [centred, centred]), weights]), axes], keepdims=1
        )
        normalised = op("Div", [centred, op("Sqrt", [op("Add", [var, epsilon])])])
        beta = self._constant(2)
        scale = gs.Constant(f"{name}__onnxfib_scale", merged_gamma.astype(dtype))
        if beta is None:
            op("Mul", [normalised, scale], y)
        else:
            merged_beta = plan.fit_base(beta.astype(np.float64), 0)
            bias = gs.Constant(f"{name}__onnxfib_bias", merged_beta.astype(dtype))
            op("Add", [op("Mul", [normalised, scale]), bias], y)
        graph.replace_nodes([node], nodes)


def bind_layer_norm(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """LayerNormalization over the last axis only, with a constant 1-D scale (and bias)."""
    x = node.inputs[0]
    scale = graph.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    bias_given = len(node.inputs) > 2 and node.inputs[2].name
    if scale is None or scale.ndim != 1 or (bias_given and graph.constant(node.inputs[2]) is None):
        return None
    rank = graph.rank(x)
    axis = int(node.attrs.get("axis", -1))
    if not only_first_output_used(node, graph) or not (
        axis == -1 or (rank is not None and axis == rank - 1)
    ):
        return None
    port = known.get(x.name)
    # float16/bfloat16: the fused op computes its statistics in float32 (stash_type), the
    # weighted form would not, so such a LayerNorm keeps its width
    wide = scale.dtype in (np.float32, np.float64)
    source = (
        port if wide and port is not None and port.axis == -1 and port.width == scale.size else None
    )
    out = Port(node.outputs[0], -1, int(scale.size))
    if source is None:
        return LayerNormSite(nodes=[node], inputs=[], outputs=[out], coupled=False)
    return LayerNormSite(nodes=[node], inputs=[source], outputs=[out])


def register(registry) -> None:
    registry.register("LayerNormalization", bind_layer_norm)
