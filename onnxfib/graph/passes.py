"""The preprocessing a :class:`~onnxfib.graph.GraphView` runs over a model's main graph, as a
named list of passes (:data:`PREPARATION`), each reporting whether it changed the graph.

Together they make weights and channel counts visible as constants and keep the graph in
topological order; none changes what the model computes (ONNX Runtime gives the preprocessed
graph's outputs for the original's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime

from .restore import infer_shapes, restore

if TYPE_CHECKING:
    from .view import GraphView

#: Ops whose folding would grow the model (their outputs are larger than their inputs).
GENERATORS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "EyeLike", "RandomNormal",
                        "RandomUniform", "Identity"})
_CONSTANT_VALUE_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")
#: onnxruntime's default-logger severity as onnxfib last set it. onnxruntime (1.32) has a setter
#: for its process-wide severity but no getter, so the severity in force before onnxfib first
#: sets one is taken to be onnxruntime's own default, 2 (warnings).
_ORT_SEVERITY = [2]


@contextmanager
def ort_log_severity(level: int) -> Iterator[None]:
    """Set onnxruntime's process-wide default-logger severity to ``level`` (0 verbose ... 4
    fatal) for the block, then restore the severity in force before it as onnxfib knows it
    (the one an enclosing block set, else onnxruntime's default; see ``_ORT_SEVERITY``)."""
    previous = _ORT_SEVERITY[0]
    onnxruntime.set_default_logger_severity(level)
    _ORT_SEVERITY[0] = level
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(previous)
        _ORT_SEVERITY[0] = previous


@dataclass(frozen=True)
class Pass:
    """One preprocessing step: ``run`` rewrites the view's graph in place and returns whether it
    changed anything. With ``after``, it runs only when the pass of that name changed the graph."""

    name: str
    run: Callable[[GraphView], bool]
    after: str | None = None


def run_passes(view: GraphView, passes: Sequence[Pass]) -> tuple[str, ...]:
    """Run ``passes`` over ``view`` in order; the names of those that changed its graph."""
    changed: list[str] = []
    for step in passes:
        if (step.after is None or step.after in changed) and step.run(view):
            changed.append(step.name)
    return tuple(changed)


def materialise_constant_nodes(view: GraphView) -> bool:
    """Turn the outputs of default-domain Constant nodes (other than graph outputs) into
    constants, as initializers are. Returns whether any Constant node went."""
    graph = view.graph
    outputs = {t.name for t in graph.outputs}
    changed = False
    for node in graph.nodes:
        if node.op != "Constant" or node.domain not in (None, "", "ai.onnx"):
            continue
        out = node.outputs[0]
        name = next((a for a in _CONSTANT_VALUE_ATTRS if a in node.attrs), None)
        if name is None or out.name in outputs:
            continue
        value = node.attrs[name]
        values = value.values if isinstance(value, gs.Constant) else np.asarray(
            value, dtype=np.float32 if "float" in name else np.int64
        )
        node.outputs.clear()
        out.to_constant(np.asarray(values))
        changed = True
    graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def _integer(tensor: gs.Tensor) -> bool:
    try:
        return tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.integer)
    except TypeError:
        return False


def _fold(view: GraphView, *, sizes_only: bool) -> bool:
    """Fold constant subexpressions (a weight passed through Unsqueeze, shape arithmetic over
    static sizes such as torch's chunk bounds) into constants of at most 64 Ki elements, so that
    weights and channel counts are visible and rewritable. GENERATORS stay. ``sizes_only`` folds
    only integer results (no new float constants). Returns whether any node went."""
    graph = view.graph

    def generator(node: gs.Node) -> bool:  # folding these would grow the model
        return node.op in GENERATORS or (sizes_only and not all(_integer(t) for t in node.outputs))

    def foldable(node: gs.Node) -> bool:
        return node.op == "Shape" or (not generator(node) and bool(node.inputs)
                                      and all(isinstance(t, gs.Constant) for t in node.inputs))

    if not any(foldable(node) for node in graph.nodes):
        return False
    count = len(graph.nodes)
    with ort_log_severity(3):  # the folder's optimiser notes are noise here
        graph.fold_constants(fold_shapes=True, partitioning=None, error_ok=True,
                             size_threshold=1 << 16, flatten_subgraphs=False,
                             should_exclude_node=generator)
    graph.cleanup(remove_unused_graph_inputs=False)
    return len(graph.nodes) < count


def fold_constants(view: GraphView) -> bool:
    """:func:`_fold` of every constant subexpression. Returns whether any node went."""
    return _fold(view, sizes_only=False)


def _shapes(graph: gs.Graph) -> dict[str, tuple[object, ...] | None]:
    return {name: None if t.shape is None else tuple(t.shape)
            for name, t in graph.tensors().items() if isinstance(t, gs.Variable)}


def infer_folded_sizes(view: GraphView) -> bool:
    """Where Shape nodes remain after a fold, infer shapes again and fold the sizes that became
    known (sizes folded into Reshape targets make more shapes static: a head split's width, read
    back for 1/sqrt(d) scaling). Returns whether a shape became known or a size was folded."""
    if not any(node.op == "Shape" for node in view.graph.nodes):
        return False
    before = _shapes(view.graph)
    folded = view.export_graph()
    restore(folded, view.source, narrowed=set(), changed=set())  # sequence/map types infer again
    view.reimport(infer_shapes(folded))
    return _fold(view, sizes_only=True) or _shapes(view.graph) != before


def _slice_range(view: GraphView, node: gs.Node) -> tuple[int, int, int] | None:
    """(axis, start, end) of a one-axis, step-1 Slice with constant bounds (None otherwise)."""
    starts, ends = view.given(node, 1, "starts").ints, view.given(node, 2, "ends").ints
    axes, steps = view.given(node, 3, "axes"), view.given(node, 4, "steps")
    if not starts or not ends or len(starts) != 1 or axes.computed or steps.computed:
        return None
    if steps.ints and steps.ints[0] != 1:
        return None
    return (0 if axes.ints is None else axes.ints[0]), starts[0], ends[0]


def bypass_concat_slices(view: GraphView) -> bool:
    """Let the readers of a Slice that takes exactly one input of a Concat along the same axis
    read that input (torch stacks every RNN layer's final state into h_n and slices the last
    layer's back out): the slice no longer ties the other inputs' channels. A slice that a
    subgraph reads stays (the export writes subgraphs as the source had them). Returns whether
    any reader was moved."""
    graph = view.graph
    main = {id(node) for node in graph.nodes}
    changed = False
    for node in graph.nodes:
        concat = node.inputs[0].inputs[0] if node.op == "Slice" and node.inputs[0].inputs else None
        sliced = node.outputs[0]
        if concat is None or concat.op != "Concat" or view.is_boundary(sliced):
            continue
        where = _slice_range(view, node)
        if where is None or any(id(reader) not in main for reader in sliced.outputs):
            continue
        rank, axis = view.rank(node.inputs[0]), int(concat.attrs.get("axis", 0))
        sizes = [view.dim(t, axis) for t in concat.inputs]
        known = [size for size in sizes if size is not None]
        if rank is None or len(known) < len(sizes) or where[0] % rank != axis % rank:
            continue
        total = sum(known)
        start, end = (min(max(v + total if v < 0 else v, 0), total) for v in where[1:])
        offsets = np.cumsum([0, *known]).tolist()
        part = next((i for i in range(len(known)) if (offsets[i], offsets[i + 1]) == (start, end)),
                    None)
        if part is None:
            continue
        for reader in list(sliced.outputs):
            for index, tensor in enumerate(list(reader.inputs)):
                if tensor is sliced:
                    reader.inputs[index] = concat.inputs[part]
                    changed = True
    graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def toposort(view: GraphView) -> bool:
    """Put the nodes in graphsurgeon's topological order (by depth from the inputs, so a graph
    already sorted another way is reordered too). Returns whether the order changed."""
    before = [id(node) for node in view.graph.nodes]
    view.graph.toposort()
    return [id(node) for node in view.graph.nodes] != before


#: What every view of a model runs, in this order (shapes are inferred when the model is read).
PREPARATION: tuple[Pass, ...] = (
    Pass("materialise-constants", materialise_constant_nodes),
    Pass("fold-constants", fold_constants),
    Pass("infer-folded-sizes", infer_folded_sizes, after="fold-constants"),
    Pass("bypass-concat-slices", bypass_concat_slices),
    Pass("toposort", toposort),
)
