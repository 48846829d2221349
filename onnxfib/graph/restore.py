"""Putting back what onnx-graphsurgeon's round trip drops or alters (:func:`restore`), and the
ONNX shape inference the view and its passes read. Nothing here knows about colorings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import onnx


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-inferred copy of ``model``, or the model itself where inference cannot run."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is an aid, never a requirement: unknown shapes stay unknown
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
        graphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        if old is not None and old.type == attr.type in graphs:
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
            if match is not None and (match.op_type, _domain(match)) == (
                    node.op_type, _domain(node)):
                return match
        return None

    return find


def restore(model: onnx.ModelProto, source: onnx.ModelProto, *, narrowed: set[str],
            changed: set[str]) -> None:
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
    # before subgraphs go back
    folded = {t.name: t for node in graph.node for t in _initializers_within(node)}
    find = _source_nodes(original)
    for node in graph.node:
        match = find(node)
        if match is not None:
            _restore_node(node, match)
    # graphsurgeon stores an outer initializer read only in subgraphs inside each of them:
    # the source's subgraphs are back, so their outer names must be defined at this scope
    scope = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    scope |= {name for node in graph.node for name in node.output}
    wanted = {name for node in graph.node for sub in _subgraphs(node)
              for name in outer_names(sub)} - scope
    constant_nodes = {n.output[0]: n for n in original.node
                      if n.op_type == "Constant" and len(n.output) == 1}
    for name in sorted(wanted):
        if name in stored or name in folded:
            graph.initializer.append(stored[name] if name in stored else folded[name])
        elif name in constant_nodes:
            graph.node.insert(0, constant_nodes[name])

    changed_constants = {t.name for t in graph.initializer
                         if t.name in changed or t.name not in stored}
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
    dropped = narrowed | changed_constants
    kept = [v for v in original.value_info if v.name in scope and v.name not in dropped]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    if any(v.name in narrowed and v.name in scope for v in original.value_info):  # their new shapes
        inferred = {v.name: v for v in infer_shapes(model).graph.value_info}
        keep = {v.name for v in kept}
        del graph.value_info[:]
        graph.value_info.extend(
            v if v.name in keep else inferred[v.name] for v in original.value_info
            if v.name in keep or (v.name in narrowed and v.name in inferred)
        )
