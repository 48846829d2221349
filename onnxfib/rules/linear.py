"""Linear producers: Gemm (any transA/transB/alpha/beta) and MatMul with a constant weight on
either side, optionally followed by the Add of a constant bias (paper Eq. 3 and Eq. 10)."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import GraphView
from ..partition import Partition
from .base import (
    Context,
    Declined,
    Plan,
    Port,
    Site,
    activation_rows,
    channel_rows,
    is_per_channel,
    merge_channels,
)

_ALL = slice(None)
#: Bytes of float64 weight a linear site's signatures and collapse read at a time.
BLOCK_BYTES = 8 << 20


def _color_blocks(
    labels: np.ndarray | None, count: int, per_item: int
) -> Iterator[tuple[np.ndarray, int, int]]:
    """``count`` channels of ``per_item`` float64 values each, in the order of their colors
    (canonical ``labels``; None: each its own), cut into blocks of whole colors of about
    BLOCK_BYTES (one color at least): ``(channels, first color, end color)``."""
    if labels is None:
        order, bounds = np.arange(count), np.arange(count + 1)
    else:
        order = np.argsort(labels, kind="stable")  # each color's channels in index order
        bounds = np.concatenate([[0], np.cumsum(np.bincount(labels))])
    step = max(1, BLOCK_BYTES // (8 * max(per_item, 1)))
    color = 0
    while color < len(bounds) - 1:
        last = max(color + 1, int(np.searchsorted(bounds, bounds[color] + step, side="right")) - 1)
        yield order[bounds[color]:bounds[last]], color, last
        color = last


def _all_finite(values: np.ndarray) -> bool:
    """Whether every entry of ``values`` is finite, read a block at a time (no mask the size of
    a wide layer's weight)."""
    flat = values.reshape(-1)
    step = max(1, BLOCK_BYTES // 8)
    return all(np.isfinite(flat[start:start + step]).all() for start in range(0, flat.size, step))


@dataclass
class LinearSite(Site):
    """``y[..., i] = alpha * sum_k W[i, k] x[..., k] + beta * b[i]`` along the channel axes.

    The weight is stored in the model with its output channels on ``out_axis`` and its input
    channels on ``in_axis``; any further axes (none for dense layers) travel with each entry.
    """

    #: Whether the refit's input columns are the input's channels, one each (a dense layer; a
    #: Conv's are patches of them).
    dense: ClassVar[bool] = True

    weight: tuple[gs.Node, int] = None  # type: ignore[assignment]
    out_axis: int = 0
    in_axis: int = 1
    alpha: float = 1.0
    bias: tuple[gs.Node, int] | None = None
    bias_axis: int | None = None  # the bias's channel axis; None: it broadcasts against the output
    beta: float = 1.0
    internal: list[gs.Variable] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.coupled = False
        self.layer = True

    @property
    def op_type(self) -> str:
        return "+".join(n.op for n in self.nodes)

    @property
    def clusters_once(self) -> bool:
        return True  # its rows' signatures, once (every forward pass of this file and conv.py)

    def _stored(self, ref: tuple[gs.Node, int]) -> np.ndarray:
        node, index = ref
        return GraphView.constant(node.inputs[index])

    def matrix(self, rows: slice | np.ndarray = _ALL, columns: slice = _ALL) -> np.ndarray:
        """The weight as (out channels, in channels, rest), alpha applied, float64; ``rows`` and
        ``columns`` select output and input channels (only they are copied)."""
        stored = self._stored(self.weight)
        if isinstance(rows, np.ndarray):  # along the stored axis: on a moved view it is strided
            stored, rows = np.take(stored, rows, axis=self.out_axis), _ALL
        moved = np.moveaxis(stored, (self.out_axis, self.in_axis), (0, 1))
        w = moved[rows, columns].astype(np.float64)
        w = w.reshape(w.shape[0], w.shape[1], -1)
        if self.alpha != 1:
            w *= self.alpha  # in place: a wide layer's float64 copy is the largest array of a run
        return w

    def _shape(self) -> tuple[int, int, int]:
        """(out channels, in channels, rest) of :meth:`matrix`, without reading the weight."""
        shape = self._stored(self.weight).shape
        outs, ins = shape[self.out_axis], shape[self.in_axis]
        return outs, ins, int(np.prod(shape)) // max(outs * ins, 1)

    @property
    def _bias_axis(self) -> int:
        return self.outputs[0].axis if self.bias_axis is None else self.bias_axis

    def bias_rows(self) -> np.ndarray | None:
        if self.bias is None:
            return None
        return self.beta * channel_rows(
            self._stored(self.bias), self._bias_axis, self.outputs[0].width
        )

    def forward(self, ctx: Context) -> None:
        """Fibers (Eq. 3): each output channel's row summed per input color (times the input's
        scales), then its bias; a block of rows at a time, so that besides the signatures only
        one block of the weight is held in float64."""
        x = ctx.fiber(self.inputs[0])
        outs, ins, rest = self._shape()
        bias = self.bias_rows()
        width = x.partition.n_colors * rest
        signature = np.empty((outs, width + (0 if bias is None else bias.shape[1])))
        for rows, _, _ in _color_blocks(None, outs, ins * rest):
            block = self.matrix(rows=rows)
            block *= x.scales[None, :, None]
            signature[rows, :width] = x.partition.reduce(block, 1).reshape(len(block), width)
            ctx.graph.release()  # a streamed weight's pages, once read, are not needed again
        if bias is not None:
            signature[:, width:] = bias
        ctx.set_fiber(self.outputs[0], ctx.tol.cluster(signature, overwrite=True))

    def backward(self, ctx: Context) -> None:
        """Opfibers (Eq. 5): each input channel's column summed per output opfiber, the rows
        of a few opfibers at a time."""
        opfibers = ctx.opfiber(self.outputs[0])
        outs, ins, rest = self._shape()
        signature = np.empty((ins, opfibers.n_colors * rest))
        for rows, first, last in _color_blocks(opfibers.labels, outs, ins * rest):
            per_opfiber = Partition(opfibers.labels[rows]).reduce(self.matrix(rows=rows), 0)
            signature[:, first * rest:last * rest] = np.moveaxis(per_opfiber, 1, 0).reshape(ins, -1)
            ctx.graph.release()
        ctx.add_opfiber(self.inputs[0], ctx.tol.partition(signature, overwrite=True))

    def rewrite(self, ctx: Context) -> None:
        inp, out = ctx.plan(self.inputs[0]), ctx.plan(self.outputs[0])
        if inp is None and out is None:
            return
        collapsed = _collapsed(self._stored(self.weight), inp, self.in_axis, out, self.out_axis)
        ctx.graph.set_constant(*self.weight, collapsed)
        if out is not None and self.bias is not None:
            merged = merge_channels(
                self._stored(self.bias),
                self._bias_axis,
                self.outputs[0].width,
                out,
                divide_by_scale=True,
            )
            if merged is not None:
                ctx.graph.set_constant(*self.bias, merged)
        for tensor in self.internal:
            ctx.graph.forget_shape(tensor)

    def can_rescale(self, ctx: Context, port: Port) -> bool:
        return True

    def flat(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(W [out, in * kernel], b [out], free)``: the map the layer applies, each row its
        input channels' entries in order (a kernel's entries together), alpha and beta folded in,
        b zero without a bias; ``free`` says whether :meth:`set_flat` may write a bias of its own
        per channel."""
        w = self.matrix()
        width = w.shape[0]  # the current width: the layer may have been collapsed already
        rows = (
            None
            if self.bias is None
            else self.beta * channel_rows(self._stored(self.bias), self._bias_axis, width)
        )
        flat = w.reshape(width, -1)
        if rows is None:
            return flat, np.zeros(width), False
        free = rows.shape[1] == 1 and self._stored(self.bias).size == width
        return flat, rows[:, 0] if rows.shape[1] == 1 else np.zeros(width), free

    # What ``calibrate.refit`` needs of a layer: it fits, per block, the rows ``input_rows(x)``
    # of the layer's input activation ``x`` to the rows of its output (``activation_rows`` of
    # the output port, output channels cut into ``refit_blocks()`` equal consecutive blocks).

    def refit_declined(self) -> str | None:
        """Why this layer cannot be refit on data (None: it can)."""
        return None

    def refit_blocks(self) -> int:
        """Independent least-squares problems of the refit (groups), in the current model."""
        return 1

    def rows_key(self) -> Hashable:
        """Layers reading one tensor with equal keys have equal :meth:`input_rows` (their normal
        equations share ``X^T X``)."""
        return ("channels", self.inputs[0].axis)

    def input_rows(self, x: np.ndarray) -> np.ndarray:
        """The input activation ``x`` as float64 rows (samples, blocks, columns) that
        :meth:`block_weights` multiply, samples in the order of the output's rows."""
        return activation_rows(x, self.inputs[0].axis)[:, None, :]

    def block_weights(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(W [blocks, out per block, columns], b [blocks, out per block], free)`` of the
        current model: :meth:`flat` cut into the refit's blocks."""
        w, b, free = self.flat()
        return w[None], b[None], free

    def set_block_weights(self, graph: GraphView, w: np.ndarray, b: np.ndarray | None) -> None:
        """Store refit weights in the form :meth:`block_weights` returns."""
        self.set_flat(graph, w[0], None if b is None else b.reshape(-1))

    def nonfinite_channels(self) -> int:
        """Output channels whose weights or bias hold NaN or infinities."""
        stored = [self._stored(self.weight)] + (
            [] if self.bias is None else [self._stored(self.bias)]
        )
        if all(_all_finite(values) for values in stored):
            return 0
        w, b, _ = self.flat()
        return int(np.count_nonzero(~(np.isfinite(w).all(axis=1) & np.isfinite(b))))

    def set_flat(self, graph: GraphView, w: np.ndarray, b: np.ndarray | None) -> None:
        """Store a new map (the inverse of :meth:`flat`; ``b`` only where it is free)."""
        stored = self._stored(self.weight)
        moved = np.moveaxis(stored, (self.out_axis, self.in_axis), (0, 1))
        graph.set_constant(
            *self.weight,
            np.moveaxis(
                (w / self.alpha).reshape(moved.shape), (0, 1), (self.out_axis, self.in_axis)
            ),
        )
        if b is not None:
            graph.set_constant(*self.bias, (b / self.beta).reshape(self._stored(self.bias).shape))

    def rescale(self, ctx: Context, port: Port, factors: np.ndarray) -> None:
        """Multiply output channels (rows and per-channel bias) by ``factors``, after the
        rewrite."""
        w = self._stored(self.weight).astype(np.float64)
        ctx.graph.set_constant(*self.weight, w * _along(factors, self.out_axis, w.ndim))
        if self.bias is not None:
            b = self._stored(self.bias).astype(np.float64)
            if is_per_channel(b, self._bias_axis, len(factors)):
                ctx.graph.set_constant(*self.bias, b * _along(factors, self._bias_axis, b.ndim))

    def parameters(self, in_width: int, out_width: int) -> int:
        """Scalars in weight and bias once the input has ``in_width`` and output ``out_width``."""
        w = self._stored(self.weight)
        total = w.size // (w.shape[self.in_axis] * w.shape[self.out_axis]) * in_width * out_width
        if self.bias is not None:
            b, width = self._stored(self.bias), self.outputs[0].width
            total += (
                b.size // width * out_width if is_per_channel(b, self._bias_axis, width) else b.size
            )
        return int(total)




def _collapsed(stored: np.ndarray, inp: Plan | None, in_axis: int, out: Plan | None,
               out_axis: int) -> np.ndarray:
    """Eq. 10 with the scale rule on a weight: input channels summed per color times their
    scales (``inp``), then output channels fitted per color (``out.fit_base``), in float64 and
    returned in the stored dtype. Output colors are fitted a few at a time from their own rows
    (:func:`_color_blocks`), with the same sums as on the whole matrix, so no float64 copy of
    the whole weight is made."""
    n_out = stored.shape[out_axis]
    shape = list(stored.shape)
    shape[out_axis] = n_out if out is None else out.partition.n_colors
    if inp is not None:
        shape[in_axis] = inp.partition.n_colors
    result = np.empty(shape, stored.dtype)
    labels = None if out is None else out.partition.labels
    for rows, first, last in _color_blocks(labels, n_out, stored.size // max(n_out, 1)):
        block = np.take(stored, rows, axis=out_axis).astype(np.float64)
        if inp is not None:
            block *= _along(inp.scales, in_axis, block.ndim)
            block = inp.partition.reduce(block, in_axis)
        if out is not None:
            colors = Plan(Partition(out.partition.labels[rows]), out.scales[rows])
            block = colors.fit_base(block, out_axis)
        result[_span(result.ndim, out_axis, first, last)] = block
    return result


def _span(ndim: int, axis: int, start: int, stop: int) -> tuple[slice, ...]:
    """The index of entries ``start`` to ``stop`` along ``axis`` of an ``ndim`` array."""
    index = [slice(None)] * ndim
    index[axis] = slice(start, stop)
    return tuple(index)


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Reshape a per-channel vector to broadcast along ``axis`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _bias_add(
    y: gs.Variable, port_axis: int, width: int, graph: GraphView
) -> tuple[gs.Node, int] | None:
    """The Add of a constant per-channel bias that is ``y``'s only consumer, if there is one."""
    if graph.is_boundary(y) or len(y.outputs) != 1:
        return None
    add = y.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    index = 1 if add.inputs[0] is y else 0
    if add.inputs[1 - index] is not y:
        return None
    value = graph.constant(add.inputs[index])
    if value is None or channel_rows(value, port_axis, width) is None:
        return None
    return add, index


def _linear(
    node: gs.Node,
    graph: GraphView,
    weight_index: int,
    out_axis: int,
    in_axis: int,
    x_axis: int,
    y_axis: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: tuple[gs.Node, int] | None = None,
    fuse_bias: bool = False,
) -> LinearSite | None:
    w = graph.constant(node.inputs[weight_index])
    if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        return None
    width_in, width_out = int(w.shape[in_axis]), int(w.shape[out_axis])
    x = node.inputs[1 - weight_index]
    y = node.outputs[0]
    nodes, internal = [node], []
    if fuse_bias and (claimed := _bias_add(y, y_axis, width_out, graph)) is not None:
        bias = claimed
        nodes.append(claimed[0])
        internal.append(y)
        y = claimed[0].outputs[0]
    return LinearSite(
        nodes=nodes,
        inputs=[Port(x, x_axis, width_in)],
        outputs=[Port(y, y_axis, width_out)],
        weight=(node, weight_index),
        out_axis=out_axis,
        in_axis=in_axis,
        alpha=alpha,
        bias=bias,
        beta=beta,
        internal=internal,
    )


def bind_gemm(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """Gemm: ``Y = alpha * A' B' + beta * C``; the constant operand is the weight."""
    a, b = node.inputs[0], node.inputs[1]
    trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        c = graph.constant(node.inputs[2])
        if c is None:
            return Declined("Gemm whose C is not constant")
        bias = (node, 2)
    if graph.constant(b) is not None and graph.constant(a) is None:
        # B' is [K, N]: output channels are N (Y axis 1), A's features are its axis 1 (or 0).
        out_axis, in_axis = (0, 1) if trans_b else (1, 0)
        site = _linear(
            node, graph, 1, out_axis, in_axis, -2 if trans_a else -1, -1, alpha, beta, bias
        )
    elif graph.constant(a) is not None and graph.constant(b) is None:
        # A' is [M, K]: output channels are M (Y axis 0), B's features are its axis 0 (or 1).
        out_axis, in_axis = (1, 0) if trans_a else (0, 1)
        site = _linear(
            node, graph, 0, out_axis, in_axis, -1 if trans_b else -2, -2, alpha, beta, bias
        )
    else:
        return Declined("Gemm of two activations (no constant weight)")
    if site is None:
        return Declined("Gemm whose constant weight is not a float matrix")
    if bias is not None:
        out = site.outputs[0]
        if channel_rows(graph.constant(node.inputs[2]), out.axis, out.width) is None:
            return Declined("Gemm whose C does not broadcast along the output channels")
    return site


def bind_matmul(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """MatMul with a 2-D constant weight: ``x @ W`` (channels last) or ``W @ x`` (channels on
    axis -2, or -1 for a vector x); a following constant bias Add is part of the layer."""
    x, w = node.inputs
    if graph.constant(w) is not None and graph.constant(x) is None:
        site = _linear(node, graph, 1, 1, 0, -1, -1, fuse_bias=True)
    elif graph.constant(x) is not None and graph.constant(w) is None:
        rank = graph.rank(w)
        if rank is None:
            return Declined("MatMul W @ x with x of unknown rank")
        axis = -1 if rank == 1 else -2
        site = _linear(node, graph, 0, 0, 1, axis, axis, fuse_bias=True)
    else:
        return Declined("MatMul of two activations (no constant weight)")
    return Declined("MatMul whose constant is not a float matrix") if site is None else site


def register(registry) -> None:
    registry.register("Gemm", bind_gemm)
    registry.register("MatMul", bind_matmul)
