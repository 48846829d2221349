"""Convolutional layers: Conv (1-D/2-D/3-D, plain or depthwise), ConvTranspose and
BatchNormalization (inference); pooling is in ``pooling.py``. Channels play the role of neurons
(paper Eq. 15): the kernel between two channels is one "weight", carried whole in the
signature."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from ..coloring import Coloring
from ..graph import GraphView
from .base import Context, Declined, Link, Port, Site, channel_input
from .elementwise import only_first_output_used
from .linear import LinearSite


def patches(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
            dilations: tuple[int, ...]) -> np.ndarray:
    """The Conv input [N, C, *spatial] as float64 rows of patches [N * out positions, C * kernel
    size] (im2col), each row's entries channel-major like a flattened [C, *kernel] kernel."""
    spatial = len(kernel)
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)]
    padded = np.pad(np.asarray(x, dtype=np.float64), widths)
    window = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    axes = tuple(range(2, 2 + spatial))
    view = np.lib.stride_tricks.sliding_window_view(padded, window, axis=axes)
    view = view[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
                + tuple(slice(None, None, d) for d in dilations)]
    view = np.moveaxis(view, 1, 1 + spatial)  # [N, *out positions, C, *kernel]
    return view.reshape(-1, int(np.prod(view.shape[1 + spatial:])))


def _auto_pads(mode: str, sizes: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...],
               dilations: tuple[int, ...]) -> tuple[int, ...]:
    """The explicit pads (begins, then ends) of ``auto_pad`` ``mode`` (SAME_UPPER, SAME_LOWER,
    VALID) on an input of spatial ``sizes`` (ONNX's Conv definition)."""
    if mode == "VALID":
        return (0,) * (2 * len(sizes))
    totals = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
              for n, k, s, d in zip(sizes, kernel, strides, dilations)]
    small = [t // 2 for t in totals]
    large = [t - t // 2 for t in totals]
    return tuple(small + large) if mode == "SAME_UPPER" else tuple(large + small)


@dataclass
class ConvSite(LinearSite):
    """Conv, plain (group 1): a layer whose refit reads its input's patches (:func:`patches`)."""

    dense: ClassVar[bool] = False

    def _geometry(self, x: np.ndarray) -> tuple[tuple[int, ...], ...]:
        """(kernel, strides, pads, dilations) of the Conv as it stands, for input ``x``."""
        node = self.nodes[0]
        kernel = tuple(int(k) for k in self._stored(self.weight).shape[2:])
        spatial = len(kernel)
        strides = tuple(int(v) for v in node.attrs.get("strides", [1] * spatial))
        dilations = tuple(int(v) for v in node.attrs.get("dilations", [1] * spatial))
        mode = node.attrs.get("auto_pad", "NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode == "NOTSET":
            pads = tuple(int(v) for v in node.attrs.get("pads", [0] * (2 * spatial)))
        else:
            pads = _auto_pads(mode, tuple(x.shape[2:]), kernel, strides, dilations)
        return kernel, strides, pads, dilations

    def rows_key(self) -> Hashable:
        node = self.nodes[0]
        return ("patches", self._stored(self.weight).shape[2:], self.refit_blocks(),
                *(str(node.attrs.get(a)) for a in ("strides", "dilations", "pads", "auto_pad")))

    def input_rows(self, x: np.ndarray) -> np.ndarray:
        rows = patches(x, *self._geometry(x))
        return rows.reshape(len(rows), self.refit_blocks(), -1)


@dataclass
class DepthwiseSite(ConvSite):
    """Conv with one input channel per group: output channel o reads input channel o // mult.

    Its input and output axes are tied (the group count must equal the channel count), so it is
    a producer whose rows merge only together with its input channels."""

    multiplier: int = 1

    def links(self) -> list[Link]:
        return [Link(self.inputs[0], self.outputs[0], self._source())]

    def _source(self) -> np.ndarray:
        return np.arange(self.outputs[0].width) // self.multiplier

    def forward(self, ctx: Context) -> None:
        """Output channel o's signature places its kernel (times its input channel's scale) in
        the block of its input channel's color (Eq. 3); the clustering reads it as
        :func:`block_rows` gives it, with the same inner products in far fewer columns."""
        x = ctx.fiber(self.inputs[0])
        kernels = self.matrix()[:, 0, :]  # (out channels, kernel size)
        source = self._source()
        signature = block_rows(kernels * x.scales[source, None], x.partition.labels[source])
        bias = self.bias_rows()
        ctx.set_fiber(
            self.outputs[0],
            ctx.tol.cluster(signature if bias is None else np.hstack([signature, bias])),
        )

    def backward(self, ctx: Context) -> None:
        kernels = self.matrix()[:, 0, :]
        op = ctx.opfiber(self.outputs[0])
        signature = np.zeros((self.inputs[0].width, op.n_colors, kernels.shape[1]))
        np.add.at(signature, (self._source(), op.labels), kernels)
        ctx.add_opfiber(
            self.inputs[0], ctx.tol.partition(signature.reshape(self.inputs[0].width, -1))
        )

    def rewrite(self, ctx: Context) -> None:
        inp, out = ctx.plan(self.inputs[0]), ctx.plan(self.outputs[0])
        if inp is None or out is None:
            return
        node, index = self.weight
        w = self._stored(self.weight).astype(np.float64)
        factor = inp.scales[self._source()] / out.scales
        w = out.partition.reduce(w * factor.reshape((-1,) + (1,) * (w.ndim - 1)), 0, mean=True)
        ctx.graph.set_constant(node, index, w)
        if self.bias is not None:
            b = self._stored(self.bias).astype(np.float64)
            ctx.graph.set_constant(*self.bias, out.partition.reduce(b / out.scales, 0, mean=True))
        node.attrs["group"] = inp.partition.n_colors

    def refit_blocks(self) -> int:
        return int(self.nodes[0].attrs.get("group", 1))

    def block_weights(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """Per input channel, the kernels of the output channels reading it."""
        w, b, free = self.flat()
        blocks = self.refit_blocks()
        return w.reshape(blocks, -1, w.shape[1]), b.reshape(blocks, -1), free

    def set_block_weights(self, graph: GraphView, w: np.ndarray, b: np.ndarray | None) -> None:
        self.set_flat(graph, w.reshape(-1, w.shape[-1]), None if b is None else b.reshape(-1))

    def parameters(self, in_width: int, out_width: int) -> int:
        w = self._stored(self.weight)
        total = w.size // w.shape[0] * out_width
        if self.bias is not None:
            total += out_width
        return int(total)


def block_rows(rows: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Rows with the inner products (so norms and cosines) of the block-sparse matrix that puts
    ``rows[i]`` in the columns of block ``blocks[i]`` and zeros elsewhere, in at most
    ``min(members, width)`` columns per block instead of ``width``: a block of one row is its
    norm in a column of its own, a larger one its rows in an orthonormal basis of their span
    (the R of a QR decomposition). Equal rows of a block stay equal; what an exact clustering
    compares in max-norm is a rotation of the block's rows, within float rounding the same."""
    _, inverse, counts = np.unique(blocks, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    widths = np.minimum(counts, rows.shape[1])
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    compact = np.zeros((len(rows), int(widths.sum())))
    alone = np.flatnonzero(counts[inverse] == 1)
    norms = np.sqrt(np.einsum("ij,ij->i", rows[alone], rows[alone]))
    compact[alone, starts[inverse[alone]]] = norms
    for block in np.flatnonzero(counts > 1):
        members = np.flatnonzero(inverse == block)
        _, triangle = np.linalg.qr(rows[members].T)  # R: R.T R = rows rows.T
        compact[members, starts[block]:starts[block] + widths[block]] = triangle[:widths[block]].T
    return compact


@dataclass
class GroupedConvSite(ConvSite):
    """Conv with ``groups`` > 1 and several input channels per group: a block-diagonal layer.

    Channels merge only inside their group, and every group keeps the same width on each side
    (the kernel is [O, I/groups, k...]), like attention heads."""

    groups: int = 1

    def _full(self, w: np.ndarray) -> np.ndarray:
        """The block-diagonal [O, I, k...] kernel of a grouped [O, I/groups, k...] one."""
        out_per, in_per = w.shape[0] // self.groups, w.shape[1]
        full = np.zeros((w.shape[0], in_per * self.groups, *w.shape[2:]))
        for group in range(self.groups):
            rows = slice(group * out_per, (group + 1) * out_per)
            full[rows, group * in_per : (group + 1) * in_per] = w[rows]
        return full

    def matrix(self, rows: slice | np.ndarray = slice(None), columns: slice = slice(None)
               ) -> np.ndarray:
        w = self._full(self._stored(self.weight).astype(np.float64))[rows, columns]
        return w.reshape(w.shape[0], w.shape[1], -1)

    def _shape(self) -> tuple[int, int, int]:
        outs, per_group, rest = super()._shape()
        return outs, per_group * self.groups, rest

    def constraints(self, ctx: Context) -> dict[str, np.ndarray]:
        return {
            port.name: np.arange(port.width) // (port.width // self.groups)
            for port in (*self.inputs, *self.outputs)
        }

    def blocks(self) -> dict[str, int]:
        return {port.name: port.width // self.groups for port in (*self.inputs, *self.outputs)}

    def rewrite(self, ctx: Context) -> None:
        inp, out = ctx.plan(self.inputs[0]), ctx.plan(self.outputs[0])
        if inp is None and out is None:
            return
        full = self._full(self._stored(self.weight).astype(np.float64))
        if inp is not None:
            full = inp.partition.reduce(
                full * inp.scales.reshape((1, -1) + (1,) * (full.ndim - 2)), 1
            )
        if out is not None:
            full = out.partition.reduce(
                full / out.scales.reshape((-1,) + (1,) * (full.ndim - 1)), 0, mean=True
            )
        out_per, in_per = full.shape[0] // self.groups, full.shape[1] // self.groups
        blocks = [
            full[g * out_per : (g + 1) * out_per, g * in_per : (g + 1) * in_per]
            for g in range(self.groups)
        ]
        ctx.graph.set_constant(*self.weight, np.concatenate(blocks))
        if out is not None and self.bias is not None:
            bias = self._stored(self.bias).astype(np.float64)
            ctx.graph.set_constant(
                *self.bias, out.partition.reduce(bias / out.scales, 0, mean=True)
            )

    def refit_blocks(self) -> int:
        return self.groups

    def block_weights(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """Per group, its [out per group, in per group * kernel] block of the flat map."""
        stored = self._stored(self.weight).astype(np.float64)
        w = stored.reshape(self.groups, stored.shape[0] // self.groups, -1) * self.alpha
        _, b, free = self.flat()
        return w, b.reshape(self.groups, -1), free

    def set_block_weights(self, graph: GraphView, w: np.ndarray, b: np.ndarray | None) -> None:
        stored = self._stored(self.weight)
        graph.set_constant(*self.weight, (w / self.alpha).reshape(stored.shape))
        if b is not None:
            graph.set_constant(*self.bias, (b / self.beta).reshape(self._stored(self.bias).shape))

    def parameters(self, in_width: int, out_width: int) -> int:
        w = self._stored(self.weight)
        per_kernel = w.size // (w.shape[0] * w.shape[1])
        return int(
            out_width * (in_width // self.groups) * per_kernel + (out_width if self.bias else 0)
        )


def _input_width_agrees(x: gs.Tensor, axis: int, width: int, known: dict[str, Port]) -> bool:
    """Whether ``x``'s channel width, where its producer or declared shape says it, is ``width``
    (the checker accepts a kernel that disagrees with ``group``; ONNX Runtime cannot run it)."""
    port = known.get(x.name)
    if port is not None and port.width != width:
        return False
    shape = x.shape
    return not (
        shape is not None
        and len(shape) >= -axis
        and isinstance(shape[axis], int)
        and shape[axis] != width
    )


def bind_conv(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """Conv with a constant kernel [O, I/group, k...]: plain (group 1) or depthwise."""
    w = graph.constant(node.inputs[1])
    given_bias = graph.given(node, 2)
    if w is None or w.ndim < 3 or not np.issubdtype(w.dtype, np.floating):
        return Declined("Conv whose kernel is not a constant float tensor")
    if given_bias.computed:
        return Declined("Conv whose bias is not constant")
    bias = (node, 2) if given_bias.present else None
    axis = 1 - w.ndim
    groups = int(node.attrs.get("group", 1))
    out_width, per_group = int(w.shape[0]), int(w.shape[1])
    if not _input_width_agrees(node.inputs[0], axis, per_group * groups, known):
        return Declined(
            f"Conv kernel reads {per_group * groups} channels ({groups} group(s) of "
            f"{per_group}); its input has another count"
        )
    x, y = node.inputs[0], node.outputs[0]
    common = dict(nodes=[node], weight=(node, 1), out_axis=0, in_axis=1, bias=bias, bias_axis=0)
    if groups == 1:
        return ConvSite(
            inputs=[Port(x, axis, per_group)], outputs=[Port(y, axis, out_width)], **common
        )
    if per_group == 1 and out_width % groups == 0:
        return DepthwiseSite(
            inputs=[Port(x, axis, groups)],
            outputs=[Port(y, axis, out_width)],
            multiplier=out_width // groups,
            **common,
        )
    if out_width % groups == 0:
        return GroupedConvSite(
            inputs=[Port(x, axis, per_group * groups)],
            outputs=[Port(y, axis, out_width)],
            groups=groups,
            **common,
        )
    return Declined(f"Conv whose {out_width} outputs do not divide into {groups} groups")


@dataclass
class ConvTransposeSite(LinearSite):
    """ConvTranspose (group 1): each input position scatters into a window of the output."""

    dense: ClassVar[bool] = False

    def refit_declined(self) -> str | None:
        return ("ConvTranspose: each output row sums overlapping scattered windows (col2im), "
                "not one input row's map")


def bind_conv_transpose(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """ConvTranspose with a constant kernel [I, O/group, k...] and group 1."""
    w = graph.constant(node.inputs[1])
    given_bias = graph.given(node, 2)
    if w is None or w.ndim < 3 or given_bias.computed:
        return Declined("ConvTranspose whose kernel or bias is not constant")
    if int(node.attrs.get("group", 1)) != 1:
        return Declined("ConvTranspose with groups")
    axis = 1 - w.ndim
    return ConvTransposeSite(
        nodes=[node],
        inputs=[Port(node.inputs[0], axis, int(w.shape[0]))],
        outputs=[Port(node.outputs[0], axis, int(w.shape[1]))],
        weight=(node, 1),
        out_axis=1,
        in_axis=0,
        bias=(node, 2) if given_bias.present else None,
        bias_axis=0,
    )


@dataclass
class BatchNormSite(Site):
    """Inference BatchNormalization: ``y = a x + d`` per channel, with
    ``a = scale / sqrt(var + eps)`` and ``d = B - mean a``."""

    epsilon: float = 1e-5

    def _constants(self) -> list[np.ndarray]:
        node = self.nodes[0]
        return [GraphView.constant(node.inputs[i]).astype(np.float64) for i in range(1, 5)]

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        scale, shift, mean, var = self._constants()
        a = scale / np.sqrt(var + self.epsilon)
        return a, shift - mean * a

    def forward(self, ctx: Context) -> None:
        x = ctx.fiber(self.inputs[0])
        a, d = self._affine()
        x = ctx.tol.split_by_rows(x, a)
        ctx.set_fiber(self.outputs[0], ctx.tol.split_by_rows(x, d / x.scales))

    def backward(self, ctx: Context) -> None:
        op = ctx.opfiber(self.outputs[0])
        ctx.add_opfiber(
            self.inputs[0],
            ctx.tol.split_by_rows(Coloring(op, np.ones(len(op))), self._affine()[0]).partition,
        )

    def rewrite(self, ctx: Context) -> None:
        plan = ctx.plan(self.outputs[0])
        if plan is None:
            return
        _, _, mean, var = self._constants()
        a, d = self._affine()
        merge = plan.partition.reduce
        a, d = merge(a, 0, mean=True), merge(d / plan.scales, 0, mean=True)
        mean, var = merge(mean / plan.scales, 0, mean=True), merge(var, 0, mean=True)
        node = self.nodes[0]
        for index, values in enumerate(
            (a * np.sqrt(var + self.epsilon), d + mean * a, mean, var), start=1
        ):
            ctx.graph.set_constant(node, index, values)


def bind_batch_norm(node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
    """BatchNormalization in inference mode with constant statistics, over channel axis 1."""
    read = channel_input(node, graph, known, channel_first=True)
    if isinstance(read, Declined):
        return read
    port = read[0]
    if not only_first_output_used(node, graph) or int(node.attrs.get("training_mode", 0)):
        return Declined("BatchNormalization in training mode")
    if int(node.attrs.get("spatial", 1)) != 1:
        return Declined("BatchNormalization with spatial=0")
    constants = [graph.constant(t) for t in node.inputs[1:5]]
    if len(constants) != 4 or any(c is None or c.shape != (port.width,) for c in constants):
        return Declined("BatchNormalization whose statistics are not constant per channel")
    out = Port(node.outputs[0], port.axis, port.width)
    return BatchNormSite(
        nodes=[node], inputs=[port], outputs=[out], epsilon=float(node.attrs.get("epsilon", 1e-5))
    )


def register(registry) -> None:
    registry.register("Conv", bind_conv)
    registry.register("ConvTranspose", bind_conv_transpose)
    registry.register("BatchNormalization", bind_batch_norm)
