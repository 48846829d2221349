"""A mutable view of an ONNX model's main graph, built on onnx-graphsurgeon.

It resolves constant weights (initializers and Constant nodes alike), answers shape questions
from ONNX shape inference, and writes rewritten weights back without disturbing tensors that
other nodes share. Nothing here knows about colorings. The module is over 350 lines because
GraphView's rewrites and its export share one record of what was shared, changed, narrowed and
spilled; its preprocessing and the export's restoring live in ``passes`` and ``restore``.
"""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxfib import io

from .passes import GENERATORS, PREPARATION, run_passes
from .restore import infer_shapes, restore

#: With a ``Storage``, rewritten constants of at least this many bytes are written to its scratch
#: directory at once and read back memory-mapped, so a collapse holds no second copy of the weights.
SPILL_BYTES = 1 << 20
SPILL_FILE = "spill.data"


@dataclass(frozen=True)
class Given:
    """An operand a node takes as an optional input (newer opsets) or attribute (older ones):
    ``present`` whether the node gives it at all; ``value`` its values, flat, where they are a
    constant (None when absent or computed at run time)."""

    present: bool
    value: np.ndarray | None = None

    @property
    def constant(self) -> bool:
        """Whether the values are a constant."""
        return self.value is not None

    @property
    def computed(self) -> bool:
        """Whether the node is given the operand but its values are known only at run time."""
        return self.present and self.value is None

    @property
    def ints(self) -> list[int] | None:
        """The constant values as Python ints (None when absent or computed)."""
        return None if self.value is None else [int(v) for v in self.value]


def _hand_back(values: np.ndarray) -> None:
    """Drop this process's pages of the memory map under ``values`` (none: nothing); the file keeps
    them and they are read again when next needed."""
    base = values.base
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    handle = getattr(base, "_mmap", None)
    if handle is not None:
        handle.madvise(mmap.MADV_DONTNEED)


class GraphView:
    """The model's main graph, preprocessed by :data:`~onnxfib.graph.passes.PREPARATION`
    (Constant nodes materialised as constants, constant subexpressions folded, ..., in
    topological order)."""

    def __init__(self, model: onnx.ModelProto, *, prepared: gs.Graph | None = None,
                 storage: io.Storage | None = None) -> None:
        """View ``model`` with shapes inferred, preprocessed by the PREPARATION passes;
        :attr:`changes` names those that changed the graph. ``prepared``, the :attr:`graph` of
        an untouched view of the same model, is copied instead of preprocessing again (no
        changes are named then). With ``storage`` (a model whose external data was not loaded)
        weights are read memory-mapped from ``storage.source``, large rewritten ones go to
        ``storage.scratch`` as they are made, and the export refers to both instead of holding
        their bytes (see :meth:`export`)."""
        self._source = model
        self._storage = storage
        # id(constant) -> (its mapped values, where stored)
        self._lazy: dict[int, tuple[np.ndarray, LazyValues]] = {}
        self.changes: tuple[str, ...] = ()
        if prepared is not None:
            self.graph = prepared.copy()
        else:
            self.reimport(infer_shapes(model))  # ONNX inference reads a proto: before the passes
        self.input_names = {t.name for t in self.graph.inputs}
        self.output_names = {t.name for t in self.graph.outputs}
        if prepared is None:
            self.changes = run_passes(self, PREPARATION)
        self._rewritten: dict[tuple[str, str, tuple[int, ...], bytes], gs.Constant] = {}
        # id of a constant made by set_constant -> shared tensor's name
        self._origin: dict[int, str] = {}
        self._shared: set[str] = set()  # names of shared constants that set_constant replaced
        self._made: dict[tuple[str, tuple[int, ...], bytes], gs.Constant] = {}  # shared_constant's
        self._changed: set[str] = set()  # constants whose values set_constant changed in place
        self._narrowed: set[str] = set()  # tensors whose shapes forget_shape dropped

    @property
    def source(self) -> onnx.ModelProto:
        """The model this view was made from (never changed)."""
        return self._source

    def reimport(self, model: onnx.ModelProto) -> None:
        """Make :attr:`graph` graphsurgeon's import of ``model`` (a preprocessing pass's
        rewrite of the source), forgetting the memory maps of the graph it replaces. With a
        storage, external tensors of the main graph read as memory maps (their stored form kept
        for the export)."""
        self._lazy.clear()
        graph = gs.import_onnx(model)
        if self._storage is not None:
            for tensor in graph.tensors().values():
                lazy = tensor._values if isinstance(tensor, gs.Constant) else None
                if not isinstance(lazy, LazyValues) or not external_data_helper.uses_external_data(
                        lazy.tensor):
                    continue
                values = io.mapped(lazy.tensor, self._storage.source)
                if values is None:  # a dtype numpy cannot map: its bytes are read into memory
                    loaded = onnx.TensorProto()
                    loaded.CopyFrom(lazy.tensor)
                    external_data_helper.load_external_data_for_tensor(
                        loaded, str(self._storage.source))
                    loaded.data_location = onnx.TensorProto.DEFAULT
                    del loaded.external_data[:]
                    tensor._values = LazyValues(loaded)
                    continue
                tensor.values = values
                self._lazy[id(tensor)] = (values, lazy)
        self.graph = graph

    def export_graph(self) -> onnx.ModelProto:
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
            _hand_back(values)

    def _spilled(self, values: np.ndarray) -> tuple[np.ndarray, LazyValues | None]:
        """``values`` written to the storage's scratch directory and mapped back, with their stored
        form; ``values`` itself (and None) without a storage or below SPILL_BYTES."""
        if self._storage is None or values.nbytes < SPILL_BYTES:
            return values, None
        path = self._storage.scratch / SPILL_FILE
        with open(path, "ab") as handle:
            offset = io.append_aligned(handle, values.data.cast("B"))
        stored = io.external_ref("spilled", values, path.resolve(), offset)
        view = io.mapped(stored, path.parent)
        return (values, None) if view is None else (view, LazyValues(stored))

    @property
    def opset(self) -> int:
        """The default-domain opset the model imports."""
        return next((o.version for o in self._source.opset_import
                     if o.domain in ("", "ai.onnx")), 1)

    @property
    def nodes(self) -> list[gs.Node]:
        return list(self.graph.nodes)

    @staticmethod
    def _through_identity(tensor: gs.Tensor) -> gs.Tensor:
        """The tensor behind a chain of Identity nodes (the legacy torch exporter shares equal
        weights that way), or ``tensor`` itself."""
        while (isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1
               and tensor.inputs[0].op == "Identity"):
            tensor = tensor.inputs[0].inputs[0]
        return tensor

    @staticmethod
    def constant(tensor: gs.Tensor) -> np.ndarray | None:
        """The value of a constant tensor (also through Identity nodes), None for an activation."""
        tensor = GraphView._through_identity(tensor)
        return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None

    def given(self, node: gs.Node, index: int, attr: str | None = None) -> Given:
        """The operand given as input ``index`` (newer opsets) or attribute ``attr``."""
        if len(node.inputs) > index and node.inputs[index].name:
            value = self.constant(node.inputs[index])
            return Given(True, None if value is None else np.asarray(value).ravel())
        if attr is not None and attr in node.attrs:
            return Given(True, np.asarray(node.attrs[attr]).ravel())
        return Given(False)

    @staticmethod
    def computed_from_constants(tensor: gs.Tensor, depth: int = 12) -> bool:
        """Whether ``tensor`` is a constant or computed from constants alone (a scale derived
        from a static size), looking at most ``depth`` nodes back."""
        if isinstance(tensor, gs.Constant):
            return True
        producer = tensor.inputs[0] if tensor.inputs else None
        return (depth > 0 and producer is not None and producer.op not in GENERATORS
                and bool(producer.inputs)
                and all(GraphView.computed_from_constants(t, depth - 1)
                        for t in producer.inputs if t.name))

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
        """'graph input' / 'graph output' when the tensor's shape is part of the model's
        interface."""
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
        current = self.constant(old)
        assert current is not None, "set_constant rewrites constants only"
        values = np.ascontiguousarray(values.astype(current.dtype, copy=False))
        source = self._through_identity(old)
        origin = self._origin.get(id(source), source.name)
        if source is old and origin not in self._shared and len(old.outputs) == 1:
            self._store(old, values)
            self._changed.add(old.name)
            return
        self._shared.add(origin)
        key = (origin, values.dtype.str, values.shape, hashlib.sha256(values.tobytes()).digest())
        if key not in self._rewritten:
            name = f"{origin}__onnxfib{len(self._rewritten) + 1}"
            self._rewritten[key] = gs.Constant(name, values)
            self._store(self._rewritten[key], values)
            self._origin[id(self._rewritten[key])] = origin
        node.inputs[index] = self._rewritten[key]

    def _store(self, constant: gs.Constant, values: np.ndarray) -> None:
        """Give ``constant`` its new ``values`` (spilled to the storage when large)."""
        values, stored = self._spilled(values)
        replaced = self._lazy.get(id(constant))
        if replaced is not None:  # the pages its rewrite read: the view leaves _lazy, so release()
            _hand_back(replaced[0])  # no longer sees it, while a graph copy may keep it mapped
        constant.values = values
        # where the source kept it: its new values are exported as given
        constant.data_location = None
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
        if (shape.op != "Shape" or shape.inputs[0] is not tensor
                or int(shape.attrs.get("start", 0)) != 0):
            return False
        if node.op == "Gather":
            index = self.constant(node.inputs[1])
            return index is not None and index.size == 1 and int(index.ravel()[0]) == axis
        starts, ends = self.constant(node.inputs[1]), self.constant(node.inputs[2])
        return (starts is not None and ends is not None
                and (int(starts[0]), int(ends[0])) == (axis, axis + 1))

    def sizes_read(self, shape: gs.Node, rank: int) -> set[int] | None:
        """The axes whose sizes a Shape node's readers take (Gather or Slice of the shape
        vector), None when some reader uses the shape in another way."""
        sizes = shape.outputs[0]
        if self.is_boundary(sizes) or not sizes.outputs:
            return None
        start, end = (int(shape.attrs.get(key, default))
                      for key, default in (("start", 0), ("end", rank)))
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
                stepped = len(reader.inputs) > 4 and reader.inputs[4].name
                steps = self.constant(reader.inputs[4]) if stepped else None
                if (starts is None or ends is None or starts.size != 1
                        or (steps is not None and int(steps.ravel()[0]) != 1)):
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
        entry is a constant (an inferred -1 or a copying 0 stays). A target built by a Concat
        that other nodes read too (dynamo shares one ``[batch, seq, -1, head]`` among every
        attention view) is first given to this Reshape alone, as a copy of that Concat."""
        piece = self._target_piece(reshape, entry)
        assert piece is not None, "the entry is a constant (target_entry_is_constant)"
        node, index, position = piece
        current = self.constant(node.inputs[index])
        assert current is not None
        values = current.ravel().copy()
        if values[position] > 0:
            values[position] = value
            if node is not reshape and len(reshape.inputs[1].outputs) > 1:
                node = self._own_target(reshape)
            self.set_constant(node, index, values)

    def _own_target(self, reshape: gs.Node) -> gs.Node:
        """A copy of the Concat building ``reshape``'s target, read by ``reshape`` alone."""
        concat, shared = reshape.inputs[1].inputs[0], reshape.inputs[1]
        suffix = f"__onnxfib_for_{reshape.name or id(reshape)}"
        target = gs.Variable(shared.name + suffix, shared.dtype, shared.shape)
        copy = gs.Node("Concat", (concat.name or shared.name) + suffix, dict(concat.attrs),
                       list(concat.inputs), [target])
        where = next(i for i, node in enumerate(self.graph.nodes) if node is reshape)
        self.graph.nodes.insert(where, copy)
        reshape.inputs[1] = target
        return copy

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
        source (:func:`~onnxfib.graph.restore.restore`); a copy of the source itself when the
        caller says nothing was rewritten (``unchanged``: no plan merged anything). With a
        storage, constants read from or spilled to disk stay there: the model refers to them as
        external data, relative to ``storage.source`` or by absolute path (spilled), which
        ``io.write_model`` reads."""
        model = onnx.ModelProto()
        if unchanged:
            model.CopyFrom(self._source)
            return model
        self.graph.cleanup(remove_unused_graph_inputs=False)
        model = self.export_graph()
        restore(model, self._source, narrowed=self._narrowed, changed=self._changed)
        return model
