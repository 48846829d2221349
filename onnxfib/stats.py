"""Size figures of a model: parameters (floating-point constants) and nodes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


def _tensor_size(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) if tensor.data_type in _FLOAT_TYPES else 0


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of scalars in the main graph's floating-point initializers and Constant nodes."""
    graph = model.graph
    total = sum(_tensor_size(t) for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    total += _tensor_size(attr.t)
                elif attr.name in ("value_float", "value_floats"):
                    total += len(helper.get_attribute_value(attr)) if attr.name == "value_floats" else 1
    return total


def count_nodes(model: onnx.ModelProto) -> int:
    """Number of nodes in the main graph."""
    return len(model.graph.node)


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes of the main graph per op type (``domain::op`` outside the default domain), most first."""
    counts = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


#: The ops whose multiply-accumulates :func:`count_macs` counts: where nearly all of a
#: network's arithmetic is.
_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def count_macs(model: onnx.ModelProto, input_dims: dict[str, tuple[int, ...]]) -> int | None:
    """Multiply-accumulates of one run of ``model`` on inputs of ``input_dims``, summed over its
    Conv, ConvTranspose, Gemm and MatMul nodes, from ONNX shape inference (on the graph alone:
    float initializers enter as typed inputs, so no weight is copied); a node whose shapes it
    cannot infer counts nothing, and None when inference fails. An estimate of a run's cost."""
    graph = onnx.GraphProto(name=model.graph.name)
    graph.node.extend(model.graph.node)
    graph.output.extend(model.graph.output)
    declared = set()
    for value in model.graph.input:
        declared.add(value.name)
        typed = graph.input.add()
        typed.CopyFrom(value)
        if value.name in input_dims:
            typed.type.tensor_type.shape.Clear()
            for size in input_dims[value.name]:
                typed.type.tensor_type.shape.dim.add().dim_value = size
    for tensor in model.graph.initializer:
        if tensor.data_type in _FLOAT_TYPES:
            if tensor.name not in declared:
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
        else:
            graph.initializer.append(tensor)  # shape tensors: what Reshape's inference reads
    stripped = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(stripped, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError, RuntimeError):
        return None  # an estimate only: a model inference cannot read is measured on the rows asked
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return sum(_node_macs(node, shapes) for node in inferred.graph.node if node.op_type in _MAC_OPS)


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """One Conv/ConvTranspose/Gemm/MatMul node's multiply-accumulates; 0 where a shape is unknown."""
    first, weight = (shapes.get(name) for name in node.input[:2])
    output = shapes.get(node.output[0])
    if first is None or weight is None or output is None or not first:
        return 0
    if node.op_type == "Conv":  # each output element sums C_in/group x kernel products
        return int(np.prod(output, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))
    if node.op_type == "ConvTranspose":  # each input element spreads over C_out/group x kernel
        return int(np.prod(first, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))
    transposed = node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
    inner = first[0] if transposed else first[-1]
    return int(np.prod(output, dtype=np.int64) * inner)
