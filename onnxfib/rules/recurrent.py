"""Recurrent layers: ONNX LSTM and GRU (paper Sec. 8.4.3).

All gates share one partition of the hidden units, found as the coarsest partition that is
stable under the recurrence: start with one color, and refine by each unit's signature (its
rows of W aggregated by the input's fibers, of R by the current hidden colors, its biases and
peepholes) until nothing changes. Both directions of a bidirectional layer share it, since
their outputs share one channel axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..coloring import Coloring
from ..graph import GraphView
from ..partition import Partition
from .base import Context, Link, Port, Site

_GATES = {"LSTM": 4, "GRU": 3}


@dataclass
class RecurrentSite(Site):
    """An LSTM or GRU node: W [dirs, G*H, I], R [dirs, G*H, H], B [dirs, 2*G*H], peepholes."""

    gates: int = 4
    hidden: int = 0
    zero_states: tuple[int, ...] = ()  # inputs that only hold zeros (dropped on rewrite)

    def __post_init__(self) -> None:
        self.coupled = False
        self.layer = True

    @property
    def op_type(self) -> str:
        return self.nodes[0].op

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

    def links(self) -> list[Link]:
        first, *rest = self.outputs
        return [Link(first, port) for port in rest]

    def forward(self, ctx: Context) -> None:
        x = ctx.fiber(self.inputs[0])
        w = self._per_unit(1, self.gates) * x.scales
        recurrent = self._per_unit(2, self.gates)
        fixed = [x.partition.reduce(w, 3)]
        for index, blocks in ((3, 2 * self.gates), (7, 3)):
            extra = self._per_unit(index, blocks)
            if extra is not None:
                fixed.append(extra)
        hidden = Partition.uniform(self.hidden)
        while True:
            parts = [*fixed, hidden.reduce(recurrent, 3)]
            signature = np.concatenate([np.moveaxis(p, 2, 0).reshape(self.hidden, -1) for p in parts], axis=1)
            refined = ctx.tol.unit(ctx.tol.cluster(signature)).partition.meet(hidden)
            if refined == hidden:
                break
            hidden = refined
        for port in self.outputs:
            ctx.set_fiber(port, Coloring(hidden, np.ones(self.hidden)))

    def backward(self, ctx: Context) -> None:
        ctx.add_opfiber(self.inputs[0], Partition.discrete(self.inputs[0].width))

    def rewrite(self, ctx: Context) -> None:
        inp, out = ctx.plan(self.inputs[0]), ctx.plan(self.outputs[0])
        if inp is None and out is None:
            return
        node = self.nodes[0]
        for index, blocks in ((1, self.gates), (2, self.gates), (3, 2 * self.gates), (7, 3)):
            value = self._per_unit(index, blocks)
            if value is None:
                continue
            if index == 1 and inp is not None:
                value = inp.partition.reduce(value * inp.scales, 3)
            if index == 2 and out is not None:
                value = out.partition.reduce(value, 3)
            if out is not None:
                value = out.partition.reduce(value, 2, mean=True)
            shape = (value.shape[0], -1) if index in (3, 7) else (value.shape[0], value.shape[1] * value.shape[2], -1)
            ctx.graph.set_constant(node, index, value.reshape(shape))
        if out is not None:
            node.attrs["hidden_size"] = out.partition.n_colors
            for index in self.zero_states:  # absent initial states are zeros by the ONNX spec
                node.inputs[index] = gs.Variable.empty()
            for tensor in node.outputs:
                ctx.graph.forget_shape(tensor)

    def parameters(self, in_width: int, out_width: int) -> int:
        """Scalars in W, R, B and P with ``in_width`` inputs and ``out_width`` hidden units."""
        per_unit = {1: self.gates * in_width, 2: self.gates * out_width, 3: 2 * self.gates, 7: 3}
        return int(sum(value.shape[0] * count * out_width for index, count in per_unit.items()
                       if (value := self._constant(index)) is not None))


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
        return fill is None or not np.any(np.asarray(fill.values if isinstance(fill, gs.Constant) else fill))
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
    outputs = [Port(t, -1, hidden) for t in node.outputs if t.outputs or graph.is_boundary(t)]
    if not outputs:
        return None
    return RecurrentSite(nodes=[node], inputs=[port], outputs=outputs, gates=gates, hidden=hidden,
                         zero_states=tuple(zero_states))


def register(registry) -> None:
    for op in _GATES:
        registry.register(op, bind_recurrent)
