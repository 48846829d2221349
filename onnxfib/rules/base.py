"""What a rule binds to: sites, ports, the context they read, a rule's refusal (:class:`Declined`),
and helpers shared by rules (channel positions, per-channel constants)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from ..coloring import Coloring, Tolerance
from ..graph import GraphView
from ..partition import Partition


@dataclass(frozen=True)
class Port:
    """A channel axis of an activation tensor that a site reads or writes."""

    tensor: gs.Variable
    axis: int  # counted from the end (negative), so it survives broadcasting
    width: int

    @property
    def name(self) -> str:
        return self.tensor.name


@dataclass(frozen=True)
class Plan:
    """How one tensor's channels collapse: the partition, and each channel's relative scale."""

    partition: Partition
    scales: np.ndarray

    def fit_base(self, values: np.ndarray, axis: int) -> np.ndarray:
        """Per color, the base ``b`` that best reproduces each channel's ``values`` under its scale
        (least squares: minimises sum_i ||v_i - s_i b||^2, so b = sum_i s_i v_i / sum_i s_i^2)
        along ``axis``. Exact when v_i = s_i b; the plain mean of v_i / s_i when a color's scales
        agree."""
        values = np.asarray(values, dtype=np.float64)
        shape = [1] * values.ndim
        shape[axis] = -1
        numerator = self.partition.reduce(values * self.scales.reshape(shape), axis)  # a new array
        numerator /= self.partition.reduce(self.scales ** 2, 0).reshape(shape)
        return numerator


class Context(Protocol):
    """The per-run analysis state a site reads and writes (implemented in ``analysis``)."""

    graph: GraphView
    tol: Tolerance

    def fiber(self, port: Port) -> Coloring: ...
    def set_fiber(self, port: Port, coloring: Coloring) -> None: ...
    def opfiber(self, port: Port) -> Partition: ...
    def add_opfiber(self, port: Port, partition: Partition) -> None: ...
    def plan(self, port: Port) -> Plan | None: ...
    def rescale(self, port: Port, factors: np.ndarray) -> None:
        """Ask the site producing ``port`` to multiply its (rewritten) channels by ``factors``."""

    def can_rescale(self, port: Port) -> bool:
        """Whether the site producing ``port`` (if any) can carry positive per-channel factors."""


@dataclass(frozen=True)
class Link:
    """Ties channel ``j`` of ``b`` to channel ``b_to_a[j]`` of ``a`` (identity when None): tied
    channels narrow together. Several channels of ``b`` may tie to one of ``a`` (Flatten's
    spatial positions, a depthwise channel multiplier); they stay apart, paired across
    channels by their order."""

    a: Port
    b: Port
    b_to_a: np.ndarray | None = None


@dataclass
class Site:
    """One application of a rule: the nodes it covers and its channel ports.

    A *coupled* site (element-wise) ties all its ports channel by channel: they narrow
    together. An uncoupled (linear) site ties nothing: it merges the rows of its outputs and
    the columns of its inputs, each following its own tensor. Sites that move channels around
    (Flatten, Concat, Split, depthwise Conv) override :meth:`links`.
    """

    nodes: list[gs.Node]
    inputs: list[Port]
    outputs: list[Port]
    coupled: bool = True
    layer: bool = field(default=False, init=False)

    @property
    def name(self) -> str:
        return self.nodes[0].name or self.nodes[0].outputs[0].name

    def pinned(self) -> dict[str, str]:
        """Ports whose width this site needs unchanged, with the reason (none by default)."""
        return {}

    @property
    def clusters_once(self) -> bool:
        """Whether the forward pass clusters one set of rows, once (a layer whose eps a count of
        merges settles from that clustering's tree: ``analysis.Cut``); False by default."""
        return False

    @property
    def expands_output(self) -> bool:
        """Whether an output of this site that is a graph output may narrow, re-expanded to its
        width by a Gather of the merged channels (the residual stream's last LayerNorm); other
        graph outputs keep their width. Such an output's colors must have unit scales."""
        return False

    def constraints(self, ctx: Context) -> dict[str, np.ndarray]:
        """Extra labels per port: channels with different labels must not merge (none by
        default)."""
        return {}

    def blocks(self) -> dict[str, int]:
        """Ports cut into equal blocks (attention heads) that must keep equal widths: block size."""
        return {}

    def can_rescale(self, ctx: Context, port: Port) -> bool:
        """Whether :meth:`rescale` can multiply output ``port`` by positive factors."""
        return False

    def rescale(self, ctx: Context, port: Port, factors: np.ndarray) -> None:
        """Multiply an output port's channels by ``factors`` after this site's rewrite."""
        raise NotImplementedError(f"{type(self).__name__} cannot rescale its outputs")

    def links(self) -> list[Link]:
        """How this site's ports' channels are tied (identity ties for a coupled site)."""
        if not self.coupled:
            return []
        first, *rest = (*self.inputs, *self.outputs)
        return [Link(first, port) for port in rest]

    def forward(self, ctx: Context) -> None:
        """Set the fiber coloring of every output port from the inputs' colorings."""
        raise NotImplementedError

    def backward(self, ctx: Context) -> None:
        """Contribute an opfiber partition to every input port from the outputs' opfibers."""
        raise NotImplementedError

    def rewrite(self, ctx: Context) -> None:
        """Rewrite this site's constants for the plans of its ports (nothing to do by default)."""


@dataclass(frozen=True)
class Declined:
    """A rule's answer for a node it does not bind: the node is a barrier, for ``reason``
    (shown by ``onnxfib inspect``), e.g. ``Declined("Gather along the channel axis")``."""

    reason: str


#: The refusal of a rule whose node reads no activation with a channel axis bound so far.
UNTRACKED = Declined("reads no tensor with a tracked channel axis")


class Rule(Protocol):
    """Binds a node (and possibly nodes right after it) to a site, or declines: a barrier.

    Args:
        node: the node to bind.
        graph: the model being analysed (read-only while binding).
        known: each activation already bound, mapped to the port that produced it (its channel
            axis and width).

    Returns:
        The :class:`Site`, or :class:`Declined` with the reason (None: declined, no reason).
    """

    def __call__(
        self, node: gs.Node, graph: GraphView, known: dict[str, Port]
    ) -> Site | Declined | None: ...


def activation_rows(values: np.ndarray, axis: int) -> np.ndarray:
    """An activation as float64 rows (samples, channels): the channel ``axis`` last, every other
    axis a sample (the rows a layer's refit fits, in the order of the tensor's other axes)."""
    moved = np.asarray(np.moveaxis(values, axis, -1), dtype=np.float64)
    return moved.reshape(-1, moved.shape[-1])


def channel_position(graph: GraphView, port: Port, tensor: gs.Tensor) -> tuple[int, int] | None:
    """(rank, channel axis counted from the front) of ``tensor`` read at ``port``'s channel
    axis, when its rank is known."""
    rank = graph.rank(tensor)
    return None if rank is None else (rank, rank + port.axis)


def channel_input(node: gs.Node, graph: GraphView, known: dict[str, Port], *,
                  channel_first: bool = False) -> tuple[Port, int, int] | Declined:
    """The port of ``node``'s first input, its rank, and its channel axis counted from the front.

    Declined when that input has no tracked channel axis (``UNTRACKED``), its rank is unknown,
    or, with ``channel_first``, its channel axis is not axis 1 (NCHW)."""
    x = node.inputs[0]
    port = known.get(x.name)
    if port is None:
        return UNTRACKED
    rank = graph.rank(x)
    if rank is None:
        return Declined(f"{node.op} of a tensor of unknown rank")
    if channel_first and not (rank >= 2 and port.axis == 1 - rank):
        return Declined(f"{node.op} of a tensor whose channel axis is not axis 1")
    return port, rank, rank + port.axis


def static_sizes(dims: list, indices: Iterable[int]) -> list[int] | None:
    """The sizes of ``dims`` at ``indices`` if all are known non-negative integers."""
    picked = [dims[i] for i in indices]
    if all(isinstance(d, (int, np.integer)) and d >= 0 for d in picked):
        return [int(d) for d in picked]
    return None


def is_per_channel(const: np.ndarray, axis: int, width: int) -> bool:
    """True when the constant has its own value for each channel (size ``width`` on ``axis``)."""
    return const.ndim >= -axis and const.shape[axis] == width


def channel_rows(const: np.ndarray, axis: int, width: int) -> np.ndarray | None:
    """The constant's values seen per channel: shape (width, m). None if it does not
    broadcast along the channel axis (its size there is neither 1 nor ``width``)."""
    const = np.asarray(const, dtype=np.float64)
    if is_per_channel(const, axis, width):
        return np.moveaxis(const, axis, 0).reshape(width, -1)
    if const.ndim < -axis or const.shape[axis] == 1:
        return np.broadcast_to(const.reshape(1, -1), (width, const.size))
    return None


def merge_channels(
    const: np.ndarray, axis: int, width: int, plan: Plan, *, divide_by_scale: bool
) -> np.ndarray | None:
    """A per-channel constant collapsed by ``plan``: the base fitted under the scales
    (``Plan.fit_base``: shifts, biases) or the mean over each color (multipliers). None for a
    channel-uniform constant, which stays as it is."""
    if not is_per_channel(const, axis, width):
        return None
    moved = np.moveaxis(np.asarray(const, dtype=np.float64), axis, 0)
    merged = (
        plan.fit_base(moved, 0) if divide_by_scale else plan.partition.reduce(moved, 0, mean=True)
    )
    return np.moveaxis(merged, 0, axis)
