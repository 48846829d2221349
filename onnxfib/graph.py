"""A mutable view of an ONNX model's main graph, built on onnx-graphsurgeon.

It resolves constant weights (initializers and Constant nodes alike), answers shape questions
from ONNX shape inference, and writes rewritten weights back without disturbing tensors that
other nodes share. Nothing here knows about colorings.
"""

from __future__ import annotations

import hashlib
import mmap
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
import onnxruntime
from onnx import external_data_helper

from onnxfib import io

_GENERATORS = {"ConstantOfShape", "Expand", "Tile", "Range", "EyeLike", "RandomNormal", "RandomUniform", "Identity"}
_CONSTANT_VALUE_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")
#: With a ``Storage``, rewritten constants of at least this many bytes are written to its scratch
#: directory at once and read back memory-mapped, so a collapse holds no second copy of the weights.
SPILL_BYTES = 1 << 20
SPILL_FILE = "spill.data"


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-inferred copy of ``model``, or the model itself where inference cannot run."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is an aid, never a requirement: unknown shapes stay unknown
        return model


def _integer(tensor: gs.Tensor) -> bool:
    try:
        return tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.integer)
    except TypeError:
        return False


class GraphView:
    """The model's main graph with Constant nodes materialised as constants, in topological order."""

    def __init__(self, model: onnx.ModelProto, *, prepared: gs.Graph | None = None,
                 storage: io.Storage | None = None) -> None:
        """View ``model``, preprocessed (shapes inferred, Constant nodes materialised, constant
        subexpressions folded, Concat/Slice pairs bypassed); ``prepared``, the :attr:`graph` of
        an untouched view of the same model, is copied instead of preprocessing again. With
        ``storage`` (a model whose external data was not loaded) weights are read memory-mapped
        from ``storage.source``, large rewritten ones go to ``storage.scratch`` as they are made,
        and the export refers to both instead of holding their bytes (see :meth:`export`)."""
        self._source = model
        self._storage = storage
        self._lazy: dict[int, tuple[np.ndarray, LazyValues]] = {}  # id(constant) -> (its mapped values, where stored)
        if prepared is not None:
            self.graph = prepared.copy()
            self.input_names = {t.name for t in self.graph.inputs}
            self.output_names = {t.name for t in self.graph.outputs}
        else:
            self._prepare(model)
        self._rewritten: dict[tuple[str, str, tuple[int, ...], bytes], gs.Constant] = {}
        self._origin: dict[int, str] = {}  # id of a constant made by set_constant -> shared tensor's name
        self._shared: set[str] = set()  # names of shared constants that set_constant replaced
        self._made: dict[tuple[str, tuple[int, ...], bytes], gs.Constant] = {}  # shared_constant's
        self._changed: set[str] = set()  # constants whose values set_constant changed in place
        self._narrowed: set[str] = set()  # tensors whose shapes forget_shape dropped

    def _import(self, model: onnx.ModelProto) -> gs.Graph:
        """graphsurgeon's import; with a storage, external tensors of the main graph read as
        memory maps (their stored form kept for the export)."""
        graph = gs.import_onnx(model)
        if self._storage is not None:
            for tensor in graph.tensors().values():
                lazy = tensor._values if isinstance(tensor, gs.Constant) else None
                if not isinstance(lazy, LazyValues) or not external_data_helper.uses_external_data(lazy.tensor):
                    continue
                values = io.mapped(lazy.tensor, self._storage.source)
                if values is None:  # a dtype numpy cannot map: its bytes are read into memory
                    loaded = onnx.TensorProto()
                    loaded.CopyFrom(lazy.tensor)
                    external_data_helper.load_external_data_for_tensor(loaded, str(self._storage.source))
                    loaded.data_location = onnx.TensorProto.DEFAULT
                    del loaded.external_data[:]
                    tensor._values = LazyValues(loaded)
                    continue
                tensor.values = values
                self._lazy[id(tensor)] = (values, lazy)
        return graph

    def _export_graph(self) -> onnx.ModelProto:
        """graphsurgeon's export, with every constant still holding values read from or written to
        disk exported as its stored (external) form instead of its bytes."""
        swapped = []
        for tensor in self.graph.tensors().values():
            entry = self._lazy.get(id(tensor))
            if entry is not None and tensor._values is entry[0]:
                tensor._values = entry[1]
                swapped.append((tensor, entry[0]))
        try:
            return gs.export_onnx(self.graph, do_type_check=False)
        finally:
            for tensor, values in swapped:
                tensor._values = values

    def release(self) -> None:
        """Hand back the pages of memory-mapped weights this process has read (the file keeps them;
        they are read again when next needed), so a streamed run holds about one layer at a time."""
        for values, _ in self._lazy.values():
            base = values.base
            while base is not None and not isinstance(base, np.memmap):
                base = getattr(base, "base", None)
            handle = getattr(base, "_mmap", None)
            if handle is not None:
                handle.madvise(mmap.MADV_DONTNEED)

    def _spilled(self, values: np.ndarray) -> tuple[np.ndarray, LazyValues | None]:
        """``values`` written to the storage's scratch directory and mapped back, with their stored
        form; ``values`` itself (and None) without a storage or below SPILL_BYTES."""
        if self._storage is None or values.nbytes < SPILL_BYTES:
            return values, None
        path = self._storage.scratch / SPILL_FILE
        with open(path, "ab") as handle:
            offset = io.append_aligned(handle, memoryview(values).cast("B"))
        stored = io.external_ref("spilled", values, path.resolve(), offset)
        view = io.mapped(stored, path.parent)
        return (values, None) if view is None else (view, LazyValues(stored))

    def _prepare(self, model: onnx.ModelProto) -> None:
        self.graph = self._import(_infer_shapes(model))
        self._materialise_constant_nodes()
        if self._fold_constants() and any(node.op == "Shape" for node in self.graph.nodes):
            # sizes folded into Reshape targets make more shapes static (a head split's width,
            # read back for 1/sqrt(d) scaling): infer again and fold the sizes that became known
            folded = self._export_graph()
            _restore(folded, model, narrowed=set(), changed=set())  # sequence/map types infer again
            self._lazy.clear()
            self.graph = self._import(_infer_shapes(folded))
            self._fold_constants(sizes_only=True)
        self.input_names = {t.name for t in self.graph.inputs}
        self.output_names = {t.name for t in self.graph.outputs}
        self._bypass_concat_slices()
        self.graph.toposort()

    def _materialise_constant_nodes(self) -> None:
        for node in self.graph.nodes:
            if node.op != "Constant" or node.domain not in (None, "", "ai.onnx"):
                continue
            out = node.outputs[0]
            name = next((a for a in _CONSTANT_VALUE_ATTRS if a in node.attrs), None)
            if name is None or out.name in {t.name for t in self.graph.outputs}:
                continue
            value = node.attrs[name]
            values = value.values if isinstance(value, gs.Constant) else np.asarray(
                value, dtype=np.float32 if "float" in name else np.int64
            )
            node.outputs.clear()
            out.to_constant(np.asarray(values))
        self.graph.cleanup(remove_unused_graph_inputs=False)

    def _fold_constants(self, sizes_only: bool = False) -> bool:
        """Fold constant subexpressions (a weight passed through Unsqueeze, shape arithmetic
        over static sizes such as torch's chunk bounds) into constants of at most 64 Ki
        elements, so that weights and channel counts are visible and rewritable. Generators
        (ConstantOfShape, Expand, ...) stay: folding them would grow the model. ``sizes_only``
        folds only integer results (no new float constants). Returns whether any node went."""
        def generator(node: gs.Node) -> bool:  # folding these would grow the model
            return node.op in _GENERATORS or (sizes_only and not all(_integer(t) for t in node.outputs))

        def foldable(node: gs.Node) -> bool:
            return node.op == "Shape" or (not generator(node) and bool(node.inputs)
                                          and all(isinstance(t, gs.Constant) for t in node.inputs))

        if not any(foldable(node) for node in self.graph.nodes):
            return False
        count = len(self.graph.nodes)
        onnxruntime.set_default_logger_severity(3)  # the folder's optimiser notes are noise here
        try:
            self.graph.fold_constants(fold_shapes=True, partitioning=None, error_ok=True,
                                      size_threshold=1 << 16, flatten_subgraphs=False,
                                      should_exclude_node=generator)
        finally:
            onnxruntime.set_default_logger_severity(2)  # onnxruntime's default (warnings)
        self.graph.cleanup(remove_unused_graph_inputs=False)
        return len(self.graph.nodes) < count

    def _slice_range(self, node: gs.Node) -> tuple[int, int, int] | None:
        """(axis, start, end) of a one-axis, step-1 Slice with constant bounds (None otherwise)."""
        starts, ends = self.ints(node, 1, "starts"), self.ints(node, 2, "ends")
        axes, steps = self.ints(node, 3, "axes"), self.ints(node, 4, "steps")
        if not starts or not ends or len(starts) != 1 or axes is False or steps is False or (steps and steps[0] != 1):
            return None
        return (0 if axes is None else axes[0]), starts[0], ends[0]

    def _bypass_concat_slices(self) -> None:
        """Let the readers of a Slice that takes exactly one input of a Concat along the same
        axis read that input (torch stacks every RNN layer's final state into h_n and slices
        the last layer's back out): the slice no longer ties the other inputs' channels. A slice
        that a subgraph reads stays (the export writes subgraphs as the source had them)."""
        main = {id(node) for node in self.graph.nodes}
        for node in self.graph.nodes:
            concat = node.inputs[0].inputs[0] if node.op == "Slice" and node.inputs[0].inputs else None
            sliced = node.outputs[0]
            if concat is None or concat.op != "Concat" or self.is_boundary(sliced) or (where := self._slice_range(node)) is None:
                continue
            if any(id(reader) not in main for reader in sliced.outputs):
                continue
            rank, axis = self.rank(node.inputs[0]), int(concat.attrs.get("axis", 0))
            sizes = [self.dim(t, axis) for t in concat.inputs]
            if rank is None or None in sizes or where[0] % rank != axis % rank:
                continue
            total = sum(sizes)
            start, end = (min(max(v + total if v < 0 else v, 0), total) for v in where[1:])
            offsets = np.cumsum([0, *sizes]).tolist()
            part = next((i for i in range(len(sizes)) if (offsets[i], offsets[i + 1]) == (start, end)), None)
            if part is None:
                continue
            for reader in list(sliced.outputs):
                for index, tensor in enumerate(list(reader.inputs)):
                    if tensor is sliced:
                        reader.inputs[index] = concat.inputs[part]
        self.graph.cleanup(remove_unused_graph_inputs=False)

    @property
    def opset(self) -> int:
        """The default-domain opset the model imports."""
        return next((o.version for o in self._source.opset_import if o.domain in ("", "ai.onnx")), 1)

    @property
    def nodes(self) -> list[gs.Node]:
        return list(self.graph.nodes)

    @staticmethod
    def _through_identity(tensor: gs.Tensor) -> gs.Tensor:
        """The tensor behind a chain of Identity nodes (the legacy torch exporter shares equal
        weights that way), or ``tensor`` itself."""
        while isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Identity":
            tensor = tensor.inputs[0].inputs[0]
        return tensor

    @staticmethod
    def constant(tensor: gs.Tensor) -> np.ndarray | None:
        """The value of a constant tensor (also through Identity nodes), None for an activation."""
        tensor = GraphView._through_identity(tensor)
        return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None

    def given(self, node: gs.Node, index: int, attr: str) -> np.ndarray | None | Literal[False]:
        """Values given as input ``index`` (newer opsets) or attribute ``attr``: None when absent,
        False when given but not constant."""
        if len(node.inputs) > index and node.inputs[index].name:
            value = self.constant(node.inputs[index])
            return False if value is None else np.asarray(value).ravel()
        return np.asarray(node.attrs[attr]).ravel() if attr in node.attrs else None

    def ints(self, node: gs.Node, index: int, attr: str) -> list[int] | None | Literal[False]:
        """:meth:`given` as a list of Python ints."""
        values = self.given(node, index, attr)
        return values if values is None or values is False else [int(v) for v in values]

    @staticmethod
    def computed_from_constants(tensor: gs.Tensor, depth: int = 12) -> bool:
        """Whether ``tensor`` is a constant or computed from constants alone (a scale derived
        from a static size), looking at most ``depth`` nodes back."""
        if isinstance(tensor, gs.Constant):
            return True
        producer = tensor.inputs[0] if tensor.inputs else None
        return (depth > 0 and producer is not None and producer.op not in _GENERATORS and bool(producer.inputs)
                and all(GraphView.computed_from_constants(t, depth - 1) for t in producer.inputs if t.name))

    @staticmethod
    def rank(tensor: gs.Tensor) -> int | None:
        shape = tensor.shape
        return None if shape is None else len(shape)

    @staticmethod
    def dim(tensor: gs.Tensor, axis: int) -> int | None:
        """Static size of ``tensor`` along ``axis``, None where unknown."""
        shape = tensor.shape
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        size = shape[axis]
        return int(size) if isinstance(size, (int, np.integer)) and size >= 0 else None

    def is_boundary(self, tensor: gs.Tensor) -> str | None:
        """'graph input' / 'graph output' when the tensor's shape is part of the model's interface."""
        if tensor.name in self.input_names:
            return "graph input"
        if tensor.name in self.output_names:
            return "graph output"
        return None

    def set_constant(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Give ``node`` input ``index`` new constant values; a tensor that other nodes share (or
        that reaches the node through Identity) is replaced by a new constant, not changed. Uses
        of one shared tensor rewritten to equal values share the new constant again (the legacy
        torch exporter stores equal layers' weights once; they must not be stored twice)."""
        old = node.inputs[index]
        values = np.ascontiguousarray(values.astype(self.constant(old).dtype, copy=False))
        source = self._through_identity(old)
        origin = self._origin.get(id(source), source.name)
        if source is old and origin not in self._shared and len(old.outputs) == 1:
            self._store(old, values)
            self._changed.add(old.name)
            return
        self._shared.add(origin)
        key = (origin, values.dtype.str, values.shape, hashlib.sha256(values.tobytes()).digest())
        if key not in self._rewritten:
            self._rewritten[key] = gs.Constant(f"{origin}__onnxfib{len(self._rewritten) + 1}", values)
            self._store(self._rewritten[key], values)
            self._origin[id(self._rewritten[key])] = origin
        node.inputs[index] = self._rewritten[key]

    def _store(self, constant: gs.Constant, values: np.ndarray) -> None:
        """Give ``constant`` its new ``values`` (spilled to the storage when large)."""
        values, stored = self._spilled(values)
        constant.values = values
        constant.data_location = None  # where the source kept it: its new values are exported as given
        if stored is None:
            self._lazy.pop(id(constant), None)
        else:
            self._lazy[id(constant)] = (values, stored)

    def reshape_target(self, reshape: gs.Node, *, lenient: bool = False) -> list[int] | None:
        """A Reshape's target: a constant, or a Concat of constant pieces and pieces that read
        the input's own size at the same position (reported as 0, "copy that axis"). With
        ``lenient`` any computed piece reads as 0 (the caller relies only on constant ones)."""
        value = self.constant(reshape.inputs[1])
        if value is not None:
            return [int(v) for v in value.ravel()]
        concat = reshape.inputs[1].inputs[0] if reshape.inputs[1].inputs else None
        if concat is None or concat.op != "Concat":
            return None
        values: list[int] = []
        for piece in concat.inputs:
            constant = self.constant(piece)
            if constant is not None:
                values.extend(int(v) for v in constant.ravel())
            elif self._reads_size(piece, reshape.inputs[0], len(values)):
                values.append(0)
            elif lenient:
                values.extend([0] * (self.dim(piece, 0) or 1))
            else:
                return None
        return values

    def _reads_size(self, piece: gs.Tensor, tensor: gs.Tensor, axis: int) -> bool:
        """Whether ``piece`` is ``tensor``'s size along ``axis``, read through Shape."""
        node = piece.inputs[0] if piece.inputs else None
        if node is not None and node.op == "Unsqueeze":
            node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if node is None or node.op not in ("Slice", "Gather") or not node.inputs[0].inputs:
            return False
        shape = node.inputs[0].inputs[0]
        if shape.op != "Shape" or shape.inputs[0] is not tensor or int(shape.attrs.get("start", 0)) != 0:
            return False
        if node.op == "Gather":
            index = self.constant(node.inputs[1])
            return index is not None and index.size == 1 and int(index.ravel()[0]) == axis
        starts, ends = self.constant(node.inputs[1]), self.constant(node.inputs[2])
        return starts is not None and ends is not None and (int(starts[0]), int(ends[0])) == (axis, axis + 1)

    def sizes_read(self, shape: gs.Node, rank: int) -> set[int] | None:
        """The axes whose sizes a Shape node's readers take (Gather or Slice of the shape
        vector), None when some reader uses the shape in another way."""
        sizes = shape.outputs[0]
        if self.is_boundary(sizes) or not sizes.outputs:
            return None
        start, end = (int(shape.attrs.get(key, default)) for key, default in (("start", 0), ("end", rank)))
        start, end = (v + rank if v < 0 else v for v in (start, end))
        length = end - start

        def entry(i: int) -> int:
            return start + min(max(i + length if i < 0 else i, 0), length)

        read: set[int] = set()
        for reader in sizes.outputs:
            if reader.inputs[0] is not sizes:
                return None
            if reader.op == "Gather" and int(reader.attrs.get("axis", 0)) == 0:
                index = self.constant(reader.inputs[1])
                if index is None:
                    return None
                read |= {entry(int(i)) for i in index.ravel()}
            elif reader.op == "Slice" and len(reader.inputs) >= 3:
                starts, ends = self.constant(reader.inputs[1]), self.constant(reader.inputs[2])
                steps = self.constant(reader.inputs[4]) if len(reader.inputs) > 4 and reader.inputs[4].name else None
                if starts is None or ends is None or starts.size != 1 or (steps is not None and int(steps.ravel()[0]) != 1):
                    return None
                read |= set(range(entry(int(starts.ravel()[0])), entry(int(ends.ravel()[0]))))
            else:
                return None
        return read

    def set_reshape_last(self, reshape: gs.Node, value: int) -> None:
        """Write ``value`` as the last entry of a Reshape's target (an inferred -1 stays)."""
        self.set_reshape_entry(reshape, -1, value)

    def _target_piece(self, reshape: gs.Node, entry: int) -> tuple[gs.Node, int, int] | None:
        """Where target entry ``entry`` (counted from the end) is stored: (node, input index,
        position in that constant counted from its end), when it is a constant value."""
        if self.constant(reshape.inputs[1]) is not None:
            return reshape, 1, entry
        concat = reshape.inputs[1].inputs[0] if reshape.inputs[1].inputs else None
        if concat is None or concat.op != "Concat":
            return None
        for index in range(len(concat.inputs) - 1, -1, -1):
            piece = concat.inputs[index]
            constant = self.constant(piece)
            length = constant.size if constant is not None else self.dim(piece, 0)
            if length is None:
                return None
            if -entry <= length:
                return (concat, index, entry) if constant is not None else None
            entry += length
        return None

    def target_entry_is_constant(self, reshape: gs.Node, entry: int) -> bool:
        """Whether a Reshape's target entry ``entry`` (from the end) is a constant that
        :meth:`set_reshape_entry` can rewrite."""
        return self._target_piece(reshape, entry) is not None

    def set_reshape_entry(self, reshape: gs.Node, entry: int, value: int) -> None:
        """Write ``value`` as target entry ``entry`` (counted from the end) of a Reshape whose
        entry is a constant (an inferred -1 or a copying 0 stays)."""
        node, index, position = self._target_piece(reshape, entry)
        values = self.constant(node.inputs[index]).ravel().copy()
        if values[position] > 0:
            values[position] = value
            self.set_constant(node, index, values)

    def replace_nodes(self, old: list[gs.Node], new: gs.Node | list[gs.Node]) -> None:
        """Let ``new`` produce the outputs it names instead of the nodes ``old``, which go."""
        for node in old:
            node.inputs.clear()
            node.outputs.clear()
        self.graph.nodes.extend(new if isinstance(new, list) else [new])
        self.graph.toposort()

    def shared_constant(self, values: np.ndarray, dtype: np.dtype, hint: str) -> gs.Constant:
        """A new constant holding ``values``; equal values asked for again share it."""
        values = np.ascontiguousarray(np.asarray(values).astype(dtype))
        key = (values.dtype.str, values.shape, hashlib.sha256(values.tobytes()).digest())
        if key not in self._made:
            self._made[key] = gs.Constant(f"onnxfib_{hint}{len(self._made) + 1}", values)
        return self._made[key]

    def expand_output(self, tensor: gs.Variable, labels: np.ndarray, axis: int) -> None:
        """Keep a narrowed graph output's width: its producer and readers keep the narrowed tensor
        (renamed), and a Gather along ``axis`` by ``labels`` writes the output's name, dtype and
        shape (channel i is base channel ``labels[i]``)."""
        name, shape, dtype = tensor.name, tensor.shape, tensor.dtype
        if shape is not None and axis < 0:
            axis += len(shape)  # opsets before 11 take no negative Gather axis
        tensor.name = f"{name}__onnxfib_base"
        index = next(i for i, t in enumerate(self.graph.outputs) if t is tensor)
        out = gs.Variable(name, dtype=dtype, shape=shape)
        indices = gs.Constant(f"{name}__onnxfib_labels", np.asarray(labels, dtype=np.int64))
        self.graph.nodes.append(gs.Node("Gather", f"{name}__onnxfib_expand", {"axis": axis},
                                        inputs=[tensor, indices], outputs=[out]))
        self.graph.outputs[index] = out
        self.graph.toposort()

    def forget_shape(self, tensor: gs.Variable) -> None:
        """Drop a tensor's recorded shape after its width changed (re-inferred on export)."""
        self._narrowed.add(tensor.name)
        tensor.shape = None

    def export(self, *, unchanged: bool = False) -> onnx.ModelProto:
        """The rewritten model: graphsurgeon's export with what it drops restored from the
        source (:func:`_restore`); a copy of the source itself when the caller says nothing
        was rewritten (``unchanged``: no plan merged anything). With a storage, constants read
        from or spilled to disk stay there: the model refers to them as external data, relative
        to ``storage.source`` or by absolute path (spilled), which ``io.write_model`` reads."""
        model = onnx.ModelProto()
        if unchanged:
            model.CopyFrom(self._source)
            return model
        self.graph.cleanup(remove_unused_graph_inputs=False)
        model = self._export_graph()
        _restore(model, self._source, narrowed=self._narrowed, changed=self._changed)
        return model


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """The names a subgraph (its own subgraphs included) reads from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    defined |= {name for node in graph.node for name in node.output}
    read = {name for node in graph.node for name in node.input if name}
    read |= {name for node in graph.node for sub in _subgraphs(node) for name in outer_names(sub)}
    return read - defined


def _initializers_within(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    """Every initializer of a node's subgraphs, nested ones included."""
    for sub in _subgraphs(node):
        yield from sub.initializer
        for inner in sub.node:
            yield from _initializers_within(inner)


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _same_attribute(new: onnx.AttributeProto, old: onnx.AttributeProto) -> bool:
    """Whether two attributes hold the same value (graphsurgeon may retype an empty list or a
    tensor it cannot hold in numpy)."""
    if new.SerializeToString() == old.SerializeToString():
        return True
    try:
        a, b = onnx.helper.get_attribute_value(new), onnx.helper.get_attribute_value(old)
        if isinstance(a, onnx.TensorProto) and isinstance(b, onnx.TensorProto):
            x, y = onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)
            return a.data_type == b.data_type and x.shape == y.shape and np.array_equal(x, y)
    except Exception:  # a value numpy cannot read: graphsurgeon's version stays
        return False
    scalars = (int, float, bytes, str)
    if isinstance(a, list) and isinstance(b, list):
        return all(isinstance(v, scalars) for v in a + b) and a == b
    return isinstance(a, scalars) and isinstance(b, scalars) and a == b


def _restore_node(node: onnx.NodeProto, original: onnx.NodeProto) -> None:
    """Give an exported node the source node's doc string, metadata, subgraphs (never
    rewritten) and every attribute whose value did not change."""
    node.doc_string = original.doc_string
    del node.metadata_props[:]
    node.metadata_props.extend(original.metadata_props)
    originals = {a.name: a for a in original.attribute}
    for attr in node.attribute:
        old = originals.get(attr.name)
        if old is not None and old.type == attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            attr.CopyFrom(old)
        elif old is not None and _same_attribute(attr, old):
            attr.CopyFrom(old)


def _source_nodes(graph: onnx.GraphProto) -> Callable[[onnx.NodeProto], onnx.NodeProto | None]:
    """A lookup of the source node an exported node came from: by its name where unique, else
    by its outputs, of the same op."""
    counts = Counter(node.name for node in graph.node if node.name)
    by_name = {node.name: node for node in graph.node if node.name and counts[node.name] == 1}
    by_outputs = {tuple(node.output): node for node in graph.node if node.output}

    def find(node: onnx.NodeProto) -> onnx.NodeProto | None:
        for match in (by_name.get(node.name), by_outputs.get(tuple(node.output))):
            if match is not None and (match.op_type, _domain(match)) == (node.op_type, _domain(node)):
                return match
        return None

    return find


def _restore(model: onnx.ModelProto, source: onnx.ModelProto, *, narrowed: set[str], changed: set[str]) -> None:
    """Put back into graphsurgeon's export ``model`` what its round trip drops or alters and
    the rewrite did not change: the source's IR version, opsets, model fields, metadata and
    functions; graph input, output and value_info types (sequences, maps, dims without a
    value) of tensors not ``narrowed``; initializers whose values are not ``changed`` (bytes
    and types as stored); nodes' doc strings, metadata and unchanged attributes; subgraphs as
    the source had them, reading outer-scope initializers from the outer graph."""
    graph, original = model.graph, source.graph
    model.ir_version = source.ir_version
    del model.opset_import[:]
    model.opset_import.extend(source.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(source, field))
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    del model.functions[:]
    model.functions.extend(source.functions)
    graph.name, graph.doc_string = original.name, original.doc_string
    del graph.metadata_props[:]
    graph.metadata_props.extend(original.metadata_props)

    stored = {t.name: t for t in original.initializer}
    for tensor in graph.initializer:
        old = stored.get(tensor.name)
        if old is not None and tensor.name not in changed and list(old.dims) == list(tensor.dims):
            tensor.CopyFrom(old)
    folded = {t.name: t for node in graph.node for t in _initializers_within(node)}  # before subgraphs go back
    find = _source_nodes(original)
    for node in graph.node:
        match = find(node)
        if match is not None:
            _restore_node(node, match)
    # graphsurgeon stores an outer initializer read only in subgraphs inside each of them:
    # the source's subgraphs are back, so their outer names must be defined at this scope
    scope = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    scope |= {name for node in graph.node for name in node.output}
    wanted = {name for node in graph.node for sub in _subgraphs(node) for name in outer_names(sub)} - scope
    constant_nodes = {n.output[0]: n for n in original.node if n.op_type == "Constant" and len(n.output) == 1}
    for name in sorted(wanted):
        if name in stored or name in folded:
            graph.initializer.append(stored[name] if name in stored else folded[name])
        elif name in constant_nodes:
            graph.node.insert(0, constant_nodes[name])

    changed_constants = {t.name for t in graph.initializer if t.name in changed or t.name not in stored}
    interface = {v.name: v for v in (*original.input, *original.output)}
    for value in (*graph.input, *graph.output):
        if value.name in interface and value.name not in changed_constants:
            value.CopyFrom(interface[value.name])
    if model.ir_version < 4:  # IR 3 requires every initializer to be a graph input as well
        listed = {i.name for i in graph.input}
        graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in graph.initializer if t.name not in listed
        )
    scope = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    scope |= {name for node in graph.node for name in node.output}
    kept = [v for v in original.value_info if v.name in scope and v.name not in narrowed | changed_constants]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    if any(v.name in narrowed and v.name in scope for v in original.value_info):  # their new shapes
        inferred = {v.name: v for v in _infer_shapes(model).graph.value_info}
        keep = {v.name for v in kept}
        del graph.value_info[:]
        graph.value_info.extend(
            v if v.name in keep else inferred[v.name] for v in original.value_info
            if v.name in keep or (v.name in narrowed and v.name in inferred)
        )
