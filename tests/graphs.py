"""Hand-built ONNX graphs with a planted lift, and the onnxruntime truth to compare against."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxfib.analysis import analyze
from onnxfib.stats import count_parameters


class Builder:
    """Collects nodes and initializers; ``model()`` returns a checked ModelProto."""

    def __init__(self, opset: int = 17) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self._count = 0

    def const(self, value: np.ndarray, *, as_node: bool = False) -> str:
        self._count += 1
        name = f"c{self._count}"
        value = np.asarray(value, dtype=np.float32)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value)))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def int_const(self, value: np.ndarray) -> str:
        self._count += 1
        name = f"c{self._count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        return self.multi(op_type, inputs, 1, **attrs)[0]

    def multi(self, op_type: str, inputs: list[str], outputs: int, **attrs) -> list[str]:
        self._count += 1
        names = [f"t{self._count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{op_type}_{self._count}", **attrs))
        return names

    def model(self, inputs: dict[str, list], output: str, out_shape: list | None) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [output], ["y"], name="out"))
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 7
        if out_shape is None:  # let shape inference state the output's shape
            inferred = onnx.shape_inference.infer_shapes(model)
            model.graph.output[0].CopyFrom(inferred.graph.output[0])
        onnx.checker.check_model(model, full_check=True)
        return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feeds)[0]


def lift_map(rng: np.random.Generator, n: int, extra: int) -> tuple[np.ndarray, np.ndarray]:
    """Source neuron of each lifted neuron and its share of the consumer column (sums to 1)."""
    source = np.concatenate([np.arange(n), rng.integers(0, n, extra)])
    raw = rng.uniform(0.5, 1.5, len(source))
    totals = np.bincount(source, weights=raw, minlength=n)
    return source, raw / totals[source]


def compress_and_compare(model, feeds, *, eps=0.0, symmetry="fiber", rtol=1e-5, atol=1e-5):
    """Collapse ``model``; assert it is valid and reproduces the original in onnxruntime."""
    analysis = analyze(model, eps=eps, symmetry=symmetry)
    out = analysis.collapse()
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert out.opset_import == model.opset_import and out.ir_version == model.ir_version
    np.testing.assert_allclose(run(out, feeds), run(model, feeds), rtol=rtol, atol=atol)
    return analysis, out, count_parameters(out)
