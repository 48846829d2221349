"""Element-wise ops: activations, per-channel constants, and the And rule for two activations.

All of them couple their ports into one shrink group. Colors pass through unchanged where the
op commutes with a positive scale (Relu, LeakyRelu, Identity, Dropout, float Cast, Mul by a
constant); other functions first split each color by scale (DESIGN §2, scale rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..coloring import Coloring
from ..graph import GraphView
from ..partition import Partition
from .base import UNTRACKED, Context, Declined, Port, Site, channel_rows, merge_channels


class Kind(Enum):
    """How an element-wise op treats a scaled coloring."""

    PASS = "pass"  # identity on values: colors, scales and opfibers pass
    HOMOGENEOUS = "homogeneous"  # f(a z) = a f(z) for a > 0: scales pass; errors need flavors
    FUNCTION = "function"  # any other function: split by scale first


def _flavored(ctx: Context, out: Port, inp: Port, *extra: Partition) -> Partition:
    """Opfibers of an input through a non-linear op: output opfibers meet input fibers."""
    return ctx.opfiber(out).meet(ctx.fiber(inp).partition, *extra)


@dataclass
class UnarySite(Site):
    kind: Kind = Kind.FUNCTION

    def forward(self, ctx: Context) -> None:
        x = ctx.fiber(self.inputs[0])
        ctx.set_fiber(self.outputs[0], ctx.tol.unit(x) if self.kind is Kind.FUNCTION else x)

    def backward(self, ctx: Context) -> None:
        out, inp = self.outputs[0], self.inputs[0]
        op = ctx.opfiber(out) if self.kind is Kind.PASS else _flavored(ctx, out, inp)
        ctx.add_opfiber(inp, op)

    def can_rescale(self, ctx: Context, port: Port) -> bool:
        return self.kind is not Kind.FUNCTION and ctx.can_rescale(self.inputs[0])

    def rescale(self, ctx: Context, port: Port, factors: np.ndarray) -> None:
        """Positive factors pass through ops that commute with them, to the producer."""
        if self.kind is Kind.FUNCTION or np.any(factors <= 0):
            super().rescale(ctx, port, factors)
        ctx.rescale(self.inputs[0], factors)


class ConstantRole(Enum):
    """Role of the constant operand of a binary op whose other operand is an activation."""

    SHIFT = "shift"  # x + c, x - c, c - x: y = s (x_hat + c / s)
    MULTIPLIER = "multiplier"  # x * c, x / c, PRelu slope: scales pass, colors split by c
    NUMERATOR = "numerator"  # c / x: a function of x, then split by c


@dataclass
class ConstantSite(Site):
    """An activation combined channel-wise with a constant (bias, scale, PRelu slope)."""

    const: tuple[gs.Node, int] = None  # type: ignore[assignment]
    role: ConstantRole = ConstantRole.SHIFT
    kind: Kind = Kind.PASS  # how the op treats x apart from the constant (PRelu: homogeneous)

    def _rows(self) -> np.ndarray:
        node, index = self.const
        port = self.inputs[0]
        return channel_rows(GraphView.constant(node.inputs[index]), port.axis, port.width)

    def _keys(self, x: Coloring) -> np.ndarray:
        rows = self._rows()
        return rows / x.scales[:, None] if self.role is ConstantRole.SHIFT else rows

    def forward(self, ctx: Context) -> None:
        x = ctx.fiber(self.inputs[0])
        if self.role is ConstantRole.NUMERATOR:
            x = ctx.tol.unit(x)
        ctx.set_fiber(self.outputs[0], ctx.tol.split_by_rows(x, self._keys(x)))

    def backward(self, ctx: Context) -> None:
        out, inp = self.outputs[0], self.inputs[0]
        if self.role is ConstantRole.SHIFT and self.kind is Kind.PASS:
            ctx.add_opfiber(inp, ctx.opfiber(out))
            return
        op = ctx.opfiber(out)
        keyed = ctx.tol.split_by_rows(Coloring(op, np.ones(len(op))), self._rows()).partition
        flavor = self.role is ConstantRole.NUMERATOR or self.kind is not Kind.PASS
        ctx.add_opfiber(inp, _flavored(ctx, out, inp, keyed) if flavor else keyed)

    def rewrite(self, ctx: Context) -> None:
        plan = ctx.plan(self.outputs[0])
        if plan is None:
            return
        node, index = self.const
        port = self.inputs[0]
        values = GraphView.constant(node.inputs[index])
        merged = merge_channels(values, port.axis, port.width, plan,
                                divide_by_scale=self.role is ConstantRole.SHIFT)
        if merged is not None:
            ctx.graph.set_constant(node, index, merged)


class Combination(Enum):
    """The And rule for activations combined element-wise (DESIGN §2)."""

    SUM = "sum"  # Add, Sub, Sum: every operand must be synchronized, the tuple is the color
    PRODUCT = "product"  # Mul: scales multiply
    QUOTIENT = "quotient"  # Div: the denominator must be synchronized


@dataclass
class PairSite(Site):
    combination: Combination = Combination.SUM

    def forward(self, ctx: Context) -> None:
        fibers = [ctx.fiber(p) for p in self.inputs]
        if self.combination is Combination.SUM:
            units = [ctx.tol.unit(f).partition for f in fibers]
            colored = Coloring(units[0].meet(*units[1:]), np.ones(len(fibers[0])))
        elif self.combination is Combination.PRODUCT:
            a, b = fibers
            colored = Coloring(a.partition.meet(b.partition), a.scales * b.scales)
        else:
            a, b = fibers
            colored = Coloring(a.partition.meet(ctx.tol.unit(b).partition), a.scales)
        ctx.set_fiber(self.outputs[0], colored)

    def backward(self, ctx: Context) -> None:
        out = self.outputs[0]
        if self.combination is Combination.SUM:
            for port in self.inputs:
                ctx.add_opfiber(port, ctx.opfiber(out))
        else:
            a, b = self.inputs
            ctx.add_opfiber(a, _flavored(ctx, out, b))
            ctx.add_opfiber(b, _flavored(ctx, out, a, ctx.fiber(b).partition))


_UNARY = {
    "Identity": Kind.PASS,
    "Dropout": Kind.PASS,
    "Relu": Kind.HOMOGENEOUS,
    "LeakyRelu": Kind.HOMOGENEOUS,
    **{op: Kind.FUNCTION for op in (
        "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid",
        "HardSwish", "Erf", "Gelu", "Clip", "Exp", "Abs", "Neg", "Sqrt", "Reciprocal",
        "ThresholdedRelu", "Mish", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Log", "Pow",
    )},
}
_FLOAT_CASTS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


def _channel_input(x: gs.Tensor, known: dict[str, Port]) -> Port | None:
    return known.get(x.name) if isinstance(x, gs.Variable) else None


def only_first_output_used(node: gs.Node, graph: GraphView) -> bool:
    return all(not t.outputs and not graph.is_boundary(t) for t in node.outputs[1:])


def bind_unary(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """Activations and pass-through ops whose extra inputs (Clip bounds, Dropout ratio) are
    constant."""
    port = _channel_input(node.inputs[0], known) if node.inputs else None
    if port is None:
        return UNTRACKED
    if not only_first_output_used(node, graph):
        return Declined(f"{node.op} whose second output is read")
    extras = [graph.constant(t) for t in node.inputs[1:] if t.name]
    if any(value is None or value.size != 1 for value in extras):
        return Declined(f"{node.op} whose extra inputs are not single constants")
    kind = _UNARY.get(node.op, Kind.FUNCTION)
    if node.op == "Cast":
        kind = Kind.PASS if node.attrs.get("to") in _FLOAT_CASTS else Kind.FUNCTION
    if node.op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
        if bool(np.asarray(graph.constant(node.inputs[2])).item()):
            return Declined("Dropout in training mode (random masks)")
    out = Port(node.outputs[0], port.axis, port.width)
    return UnarySite(nodes=[node], inputs=[port], outputs=[out], kind=kind)


def bind_prelu(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """PRelu: homogeneous, with a (per-channel) slope constant that splits colors."""
    port = _channel_input(node.inputs[0], known)
    slope = graph.constant(node.inputs[1])
    if port is None:
        return UNTRACKED
    if slope is None or channel_rows(slope, port.axis, port.width) is None:
        return Declined("PRelu whose slope is not a constant broadcast along the channels")
    out = Port(node.outputs[0], port.axis, port.width)
    return ConstantSite(
        nodes=[node],
        inputs=[port],
        outputs=[out],
        const=(node, 1),
        role=ConstantRole.MULTIPLIER,
        kind=Kind.HOMOGENEOUS,
    )


def bind_arithmetic(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """Add/Sub/Mul/Div of an activation with a broadcast constant, or of two activations."""
    a, b = node.inputs
    pa, pb = _channel_input(a, known), _channel_input(b, known)
    ca, cb = graph.constant(a), graph.constant(b)
    if pa is not None and pb is not None:
        if (pa.axis, pa.width) != (pb.axis, pb.width):
            return Declined(f"{node.op} of two tensors whose channel axes or counts differ")
        combination = {"Mul": Combination.PRODUCT, "Div": Combination.QUOTIENT}.get(
            node.op, Combination.SUM
        )
        out = Port(node.outputs[0], pa.axis, pa.width)
        return PairSite(nodes=[node], inputs=[pa, pb], outputs=[out], combination=combination)
    port, const, index = (pa, cb, 1) if pa is not None else (pb, ca, 0)
    if port is None:
        return UNTRACKED
    if node.op in ("Add", "Sub"):
        role = ConstantRole.SHIFT
    elif node.op == "Mul" or index == 1:
        role = ConstantRole.MULTIPLIER
    else:
        role = ConstantRole.NUMERATOR
    out = Port(node.outputs[0], port.axis, port.width)
    if const is None:  # an activation equal across channels: a row statistic (mean, deviation)
        other = node.inputs[index]
        if not _channel_uniform(other, port.axis, graph):
            return Declined(f"{node.op} with an untracked tensor that varies across channels")
        return UniformSite(nodes=[node], inputs=[port], outputs=[out], role=role)
    if channel_rows(const, port.axis, port.width) is None:
        return Declined(f"{node.op} with a constant that does not broadcast along the channels")
    return ConstantSite(nodes=[node], inputs=[port], outputs=[out], const=(node, index), role=role)


def _channel_uniform(tensor: gs.Tensor, axis: int, graph: GraphView) -> bool:
    """True when ``tensor`` is known to hold one value across the channel axis (size 1 there,
    or too few axes to reach it), so it broadcasts equally onto every channel."""
    rank = graph.rank(tensor)
    return rank is not None and (rank < -axis or graph.dim(tensor, axis) == 1)


@dataclass
class UniformSite(Site):
    """An activation combined with another that is equal across channels (LayerNorm written
    out: x - mean, x / deviation). Nothing to rewrite; the other operand is no channel port."""

    role: ConstantRole = ConstantRole.SHIFT

    def forward(self, ctx: Context) -> None:
        x = ctx.fiber(self.inputs[0])
        ctx.set_fiber(
            self.outputs[0], x if self.role is ConstantRole.MULTIPLIER else ctx.tol.unit(x)
        )

    def backward(self, ctx: Context) -> None:
        out, inp = self.outputs[0], self.inputs[0]
        op = _flavored(ctx, out, inp) if self.role is ConstantRole.NUMERATOR else ctx.opfiber(out)
        ctx.add_opfiber(inp, op)


def bind_sum(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """Sum of activations that share their channel axis (opset-8 residuals)."""
    ports = [_channel_input(t, known) for t in node.inputs]
    if not ports or any(p is None for p in ports):
        return UNTRACKED if not any(ports) else Declined("Sum of tracked and untracked tensors")
    if len({(p.axis, p.width) for p in ports}) != 1:
        return Declined("Sum of tensors whose channel axes or counts differ")
    out = Port(node.outputs[0], ports[0].axis, ports[0].width)
    return PairSite(nodes=[node], inputs=ports, outputs=[out], combination=Combination.SUM)


def register(registry) -> None:
    registry.register("Sum", bind_sum)
    for op in [*_UNARY, "Cast"]:
        registry.register(op, bind_unary)
    registry.register("PRelu", bind_prelu)
    for op in ("Add", "Sub", "Mul", "Div"):
        registry.register(op, bind_arithmetic)
