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
