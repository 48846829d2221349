"""Recurrent layers: ONNX LSTM and GRU (paper Sec. 8.4.3).

All gates share one partition of the hidden units, found as the coarsest partition that is
stable under the recurrence: start with one color, and refine by each unit's signature (its
rows of W aggregated by the input's fibers, of R by the current hidden colors, its biases and
peepholes) until nothing changes. A tolerant eps clusters the signatures once, R aggregated by
that exact partition (``RecurrentSite._stable_partition``). Both directions of a bidirectional
layer share it, since their outputs share one channel axis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from ..coloring import Coloring, Tolerance
from ..graph import GraphView
from ..partition import Partition
from .base import Context, Link, Plan, Port, Site

_GATES = {"LSTM": 4, "GRU": 3}


@dataclass
class RecurrentSite(Site):
    """An LSTM or GRU node: W [dirs, G*H, I], R [dirs, G*H, H], B [dirs, 2*G*H], peepholes.

    With ``apart`` (a bidirectional layer whose output is read as [.., dirs*H] through
    Transpose and Reshape), each direction has its own hidden partition and the output port
    holds both directions' units; they keep equal counts (one hidden_size). Otherwise the
    directions share one partition of the H channels of Y (and Y_h, Y_c)."""

    gates: int = 4
    hidden: int = 0
    zero_states: tuple[int, ...] = ()  # inputs that only hold zeros (dropped on rewrite)
    apart: bool = False

    def __post_init__(self) -> None:
        self.coupled = False
        self.layer = True

    @property
    def op_type(self) -> str:
        return self.nodes[0].op

    @property
    def directions(self) -> int:
        return int(GraphView.constant(self.nodes[0].inputs[1]).shape[0])

    def _constant(self, index: int) -> np.ndarray | None:
        node = self.nodes[0]
        if len(node.inputs) <= index or not node.inputs[index].name:
            return None
        return GraphView.constant(node.inputs[index]).astype(np.float64)

    def _per_unit(self, index: int, blocks: int) -> np.ndarray | None:
        """Input ``index`` as (dirs, blocks, H, rest)."""
        value = self._constant(index)
        if value is None:
            return None
        return value.reshape(value.shape[0], blocks, self.hidden, -1)

    def _direction_of(self) -> np.ndarray:
        return np.repeat(np.arange(self.directions), self.hidden)

    def links(self) -> list[Link]:
        first, *rest = self.outputs
        return [Link(first, port) for port in rest]

    def constraints(self, ctx: Context) -> dict[str, np.ndarray]:
        return {self.outputs[0].name: self._direction_of()} if self.apart else {}

    def blocks(self) -> dict[str, int]:
        return {self.outputs[0].name: self.hidden} if self.apart else {}

    def _stable_partition(self, ctx: Context, direction: int) -> Partition:
        """The hidden partition of one direction. Exact (eps 0): the coarsest one the recurrence
        keeps, refined from one color by each unit's signature (its rows of W aggregated by the
        input's fibers, of R by the current hidden colors, its biases and peepholes) until
        nothing changes. Tolerant: the units clustered once at eps by their signatures with R
        aggregated by that exact partition, so a larger eps never keeps more colors (refining
        at eps again and again is not monotone in eps: on a trained LSTM eps 0.99 kept 479 of
        512 units where 0.97 kept 426). Either way the merge distances recorded are those of
        the clustering the tolerant pass makes."""
        x = ctx.fiber(self.inputs[0])
        w = self._per_unit(1, self.gates)[direction] * x.scales
        recurrent = self._per_unit(2, self.gates)[direction]
        fixed = [x.partition.reduce(w, 2)]
        for index, blocks in ((3, 2 * self.gates), (7, 3)):
            extra = self._per_unit(index, blocks)
            if extra is not None:
                fixed.append(extra[direction])

        def clustered(tol: Tolerance, hidden: Partition) -> Partition:
            parts = [*fixed, hidden.reduce(recurrent, 2)]
            signature = np.concatenate(
                [np.moveaxis(p, 1, 0).reshape(self.hidden, -1) for p in parts], axis=1
            )
            return tol.unit(tol.cluster(signature)).partition

        exact = replace(ctx.tol, eps=0.0, heights=None, chosen=None, merges=None)
        stable = Partition.uniform(self.hidden)
        while (refined := clustered(exact, stable).meet(stable)) != stable:
            stable = refined
        tolerant = clustered(ctx.tol, stable)
        return stable if ctx.tol.exact and ctx.tol.chosen is None else tolerant

    def forward(self, ctx: Context) -> None:
        parts = [self._stable_partition(ctx, d) for d in range(self.directions)]
        hidden = Partition.concat(parts) if self.apart else parts[0].meet(*parts[1:])
        for port in self.outputs:
            ctx.set_fiber(port, Coloring(hidden, np.ones(len(hidden))))

    def backward(self, ctx: Context) -> None:
        ctx.add_opfiber(self.inputs[0], Partition.discrete(self.inputs[0].width))

    def _direction_plans(self, out: Plan | None) -> list[Partition] | None:
        if out is None:
            return None
        if not self.apart:
            return [out.partition] * self.directions
        return [out.partition.restrict(self._direction_of() == d) for d in range(self.directions)]

    def rewrite(self, ctx: Context) -> None:
        inp, out = ctx.plan(self.inputs[0]), ctx.plan(self.outputs[0])
        hidden = self._direction_plans(out)
        if inp is None and hidden is None:
            return
        node = self.nodes[0]
        for index, blocks in ((1, self.gates), (2, self.gates), (3, 2 * self.gates), (7, 3)):
            value = self._per_unit(index, blocks)
            if value is None:
                continue
            if index == 1 and inp is not None:
                value = inp.partition.reduce(value * inp.scales, 3)
            if hidden is not None:
                merged = []
                for direction, part in zip(value, hidden):
                    if index == 2:
                        direction = part.reduce(direction, 2)
                    merged.append(part.reduce(direction, 1, mean=True))
                value = np.stack(merged)
            shape = (
                (value.shape[0], -1)
                if index in (3, 7)
                else (value.shape[0], value.shape[1] * value.shape[2], -1)
            )
            ctx.graph.set_constant(node, index, value.reshape(shape))
        if hidden is not None:
            node.attrs["hidden_size"] = hidden[0].n_colors
            for index in self.zero_states:  # absent initial states are zeros by the ONNX spec
                node.inputs[index] = gs.Variable.empty()
            for claimed in self.nodes:
                for tensor in claimed.outputs:
                    ctx.graph.forget_shape(tensor)
            if self.apart:
                ctx.graph.set_reshape_last(self.nodes[-1], out.partition.n_colors)

    def parameters(self, in_width: int, out_width: int) -> int:
        """Scalars in W, R, B and P with ``in_width`` inputs and ``out_width`` output channels."""
        hidden = out_width // self.directions if self.apart else out_width
        per_unit = {1: self.gates * in_width, 2: self.gates * hidden, 3: 2 * self.gates, 7: 3}
        return int(
            sum(
                value.shape[0] * count * hidden
                for index, count in per_unit.items()
                if (value := self._constant(index)) is not None
            )
        )


def _directions_merged(node: gs.Node, graph: GraphView, hidden: int) -> list[gs.Node] | None:
    """Transpose [0, 2, 1, 3] then Reshape to [.., dirs*H]: how torch reads a bidirectional Y."""
    y = node.outputs[0]
    if (
        graph.is_boundary(y)
        or len(y.outputs) != 1
        or any(t.outputs or graph.is_boundary(t) for t in node.outputs[1:])
    ):
        return None
    transpose = y.outputs[0]
    if transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != [0, 2, 1, 3]:
        return None
    moved = transpose.outputs[0]
    if graph.is_boundary(moved) or len(moved.outputs) != 1 or moved.outputs[0].op != "Reshape":
        return None
    reshape = moved.outputs[0]
    target = graph.reshape_target(reshape)
    if (
        target is None
        or len(target) != 3
        or target[-1] not in (-1, 2 * hidden)
        or any(t != 0 for t in target[:2])
    ):
        return None
    return [transpose, reshape]


def _only_zeros(tensor: gs.Tensor, graph: GraphView) -> bool:
    """True for a tensor that is zeros by construction: a zero constant, or ConstantOfShape
    with value 0, possibly sliced (how torch exports an LSTM's default initial state)."""
    value = graph.constant(tensor)
    if value is not None:
        return not np.any(value)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None:
        return False
    if producer.op == "Slice":
        return _only_zeros(producer.inputs[0], graph)
    if producer.op == "ConstantOfShape":
        fill = producer.attrs.get("value")
        return fill is None or not np.any(
            np.asarray(fill.values if isinstance(fill, gs.Constant) else fill)
        )
    if producer.op == "Expand":
        return _only_zeros(producer.inputs[0], graph)
    return False


def bind_recurrent(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | None:
    """LSTM or GRU with constant weights, zero (or absent) initial states, no layout change."""
    gates = _GATES[node.op]
    x = node.inputs[0]
    w = graph.constant(node.inputs[1])
    r = graph.constant(node.inputs[2])
    hidden = int(node.attrs.get("hidden_size", 0))
    if w is None or r is None or hidden <= 0 or w.shape[1] != gates * hidden:
        return None
    optional = {3: "B", 5: "initial_h"} | ({6: "initial_c", 7: "P"} if node.op == "LSTM" else {})
    zero_states = []
    for index, name in optional.items():
        if len(node.inputs) <= index or not node.inputs[index].name:
            continue
        if name.startswith("initial"):
            if not _only_zeros(node.inputs[index], graph):
                return None
            zero_states.append(index)
        elif graph.constant(node.inputs[index]) is None:
            return None
    port = Port(x, -1, int(w.shape[2]))
    merged = _directions_merged(node, graph, hidden) if w.shape[0] == 2 else None
    if merged is not None:
        out = Port(merged[-1].outputs[0], -1, 2 * hidden)
        return RecurrentSite(
            nodes=[node, *merged],
            inputs=[port],
            outputs=[out],
            gates=gates,
            hidden=hidden,
            zero_states=tuple(zero_states),
            apart=True,
        )
    outputs = [Port(t, -1, hidden) for t in node.outputs if t.outputs or graph.is_boundary(t)]
    if not outputs:
        return None
    return RecurrentSite(
        nodes=[node],
        inputs=[port],
        outputs=outputs,
        gates=gates,
        hidden=hidden,
        zero_states=tuple(zero_states),
    )


def register(registry) -> None:
    for op in _GATES:
        registry.register(op, bind_recurrent)
