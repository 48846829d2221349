"""The onnx package's bundled "light" ImageNet models, compressed at eps = 0.

``onnx/backend/test/data/light/light_<name>.onnx`` are full-size architectures (AlexNet,
DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512) exported
from Caffe2 with IR version 3 and opset 9 (initializers are also listed as graph inputs). To
keep the files small, almost every weight is ``ConstantOfShape(shape, value=0.02)``: every
output channel of such a layer has the same kernel, so nearly everything is one fiber. A few
tensors (some biases and BatchNorm parameters, 0 to 4,800 values per model) are real-valued and
keep some channels apart. All 1000 logits are equal, and every model but DenseNet ends in a
Softmax over them, so the shipped outputs are the constant 1/1000 whatever the input.
DenseNet's output (0.461) and Inception v2's logits (0.469) do not depend on the input either:
their chains of BatchNorm and Caffe2 scale (Mul/Add) layers with constant parameters reach a
fixed point. In the other seven models the logits vary with the input by 10-78%.

Each model is tested in two forms:

- ``shipped``: the file as it is;
- ``materialised``: each ``ConstantOfShape`` with a constant shape replaced by the initializer it
  computes (what a normal export stores), still IR 3 / opset 9, and a Softmax that produces a
  graph output removed (the producer writes the output name), so the compared outputs are the
  logits, which depend on the input, and not the constant 1/1000.

For both, ``onnxfib.compress(eps=0)`` must succeed with its own validation on, and this module
checks independently that the compressed model passes ``onnx.checker`` (full_check), keeps the
IR version, opsets and the graph's (non-initializer) input and output names and shapes, and
gives the original's outputs in ONNX Runtime (rtol 1e-5, atol 1e-6 x max|output|) on seeded
normal inputs and on the onnx backend's own input (``arange(n) / n``), on which the shipped
model also reproduces the packaged ``*_output_0.pb``.

Parameters are ``onnxfib.stats.count_parameters`` (floating-point initializers and Constant
nodes), measured at eps = 0 (core of commit 592de15). ``PARAMS`` asserts these figures: the
"before" exactly, the "after" as an upper bound (a better core may merge more, never less).

| model        | shipped      | materialised                  | kept   | what stops further merging |
|--------------|--------------|-------------------------------|--------|----------------------------|
| bvlc_alexnet | 0 -> 0       | 60,965,224 -> 2,345,299       | 3.85%  | LRN; grouped Conv (group=2) |
| densenet121  | 768 -> 768   | 8,146,152 -> 8,146,152        | 100%   | Mul/Add by Unsqueeze(constant) after each BN |
| inception_v1 | 1,072 -> 1,072 | 6,998,552 -> 1,294,956      | 18.50% | LRN; real-valued biases; fc weight is Reshape(constant) |
| inception_v2 | 4,800 -> 4,800 | 11,234,792 -> 11,234,792    | 100%   | Mul/Add by Unsqueeze(constant) after each BN |
| resnet50     | 1,793 -> 1,793 | 25,610,152 -> 5,128,581     | 20.03% | opset-9 ``Sum`` residuals |
| shufflenet   | 120 -> 120   | 1,420,152 -> 1,420,152        | 100%   | grouped Conv (group=4), channel shuffle (5-D Reshape/Transpose), ``Sum`` |
| squeezenet   | 640 -> 640   | 1,235,496 -> 36,243           | 2.93%  | real-valued biases (13 convs) |
| vgg19        | 128 -> 128   | 143,667,240 -> 41,479         | 0.03%  | real-valued biases of conv1_1, conv1_2 |
| zfnet512     | 1 -> 1       | 87,250,536 -> 633,228         | 0.73%  | LRN |

In the shipped files the weights are ``ConstantOfShape`` outputs, which the core does not treat
as constants: no layer is analysed, and the counted parameters are only the few real-valued
initializers; nothing merges, so the model comes out as it went in (ResNet-50 and ZFNet keep an
unused 1x1 initializer that the graph library's cleanup used to drop). The materialised VGG-19 is
the heaviest case: about 45 s and 5.5 GB peak (the whole module: about 2 min, 5.8 GB).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxfib
from onnxfib.stats import count_parameters

LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
MODELS = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
          "squeezenet", "vgg19", "zfnet512")
FORMS = ("shipped", "materialised")
FAST = ("squeezenet",)  # the others are marked slow (seconds to minutes each)
RTOL = 1e-5
ATOL_SCALE = 1e-6  # atol = ATOL_SCALE * max(1, max |reference output|)

#: (model, form) -> (params before, params after at most), measured at eps = 0 (table above).
PARAMS: dict[tuple[str, str], tuple[int, int]] = {
    ("bvlc_alexnet", "shipped"): (0, 0),
    ("bvlc_alexnet", "materialised"): (60_965_224, 2_345_299),
    ("densenet121", "shipped"): (768, 768),
    ("densenet121", "materialised"): (8_146_152, 8_146_152),
    ("inception_v1", "shipped"): (1_072, 1_072),
    ("inception_v1", "materialised"): (6_998_552, 1_294_956),
    ("inception_v2", "shipped"): (4_800, 4_800),
    ("inception_v2", "materialised"): (11_234_792, 11_234_792),
    ("resnet50", "shipped"): (1_793, 1_793),
    ("resnet50", "materialised"): (25_610_152, 5_128_581),
    ("shufflenet", "shipped"): (120, 120),
    ("shufflenet", "materialised"): (1_420_152, 1_420_152),
    ("squeezenet", "shipped"): (640, 640),
    ("squeezenet", "materialised"): (1_235_496, 36_243),
    ("vgg19", "shipped"): (128, 128),
    ("vgg19", "materialised"): (143_667_240, 41_479),
    ("zfnet512", "shipped"): (1, 1),
    ("zfnet512", "materialised"): (87_250_536, 633_228),
}


def _path(name: str) -> Path:
    return LIGHT / f"light_{name}.onnx"


def materialise(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its ConstantOfShape weights stored as initializers and a final Softmax
    removed (see the module docstring); the function up to that Softmax is unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    declared = {v.name for v in graph.input}
    nodes = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
            value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"),
                         np.zeros(1, np.float32))
            tensor = numpy_helper.from_array(np.full(shape, value.reshape(-1)[0], dtype=value.dtype), node.output[0])
            graph.initializer.append(tensor)
            if out.ir_version < 4 and node.output[0] not in declared:
                graph.input.append(helper.make_tensor_value_info(node.output[0], tensor.data_type, shape.tolist()))
        else:
            nodes.append(node)
    outputs = {v.name for v in graph.output}
    last = nodes[-1]
    if last.op_type == "Softmax" and last.output[0] in outputs:
        nodes.pop()
        for node in nodes:
            node.output[:] = [last.output[0] if name == last.input[0] else name for name in node.output]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    every = {t.name for t in graph.initializer}
    keep = [t for t in graph.initializer if t.name in used]
    names = {t.name for t in keep}
    inputs = [v for v in graph.input if v.name not in every or v.name in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.value_info[:]
    return out


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are not initializers (IR 3 lists both)."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def signature(values: list[onnx.ValueInfoProto]) -> list[tuple[str, int, tuple]]:
    return [
        (v.name, v.type.tensor_type.elem_type,
         tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim))
        for v in values
    ]


def batches(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Seeded standard-normal inputs and the onnx backend test's ``arange(n) / n`` input."""
    rng = np.random.default_rng(0)
    normal, backend = {}, {}
    for value in data_inputs(model):
        shape = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
        normal[value.name] = rng.standard_normal(shape).astype(np.float32)
        n = int(np.prod(shape))
        backend[value.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    return [normal, backend]


def run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [sess.run(None, feed) for feed in feeds]


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    atol = ATOL_SCALE * max(1.0, float(np.abs(expected).max()))
    err = np.abs(actual.astype(np.float64) - expected)
    bad = err > atol + RTOL * np.abs(expected)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} elements differ, max abs {err.max():.3g} "
        f"(atol {atol:.3g}, rtol {RTOL:g}, max |ref| {np.abs(expected).max():.3g})"
    )


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in MODELS])
def test_light_model_compresses_exactly(name: str, form: str) -> None:
    shipped = onnx.load(str(_path(name)))
    original = shipped if form == "shipped" else materialise(shipped)
    onnx.checker.check_model(original, full_check=True)
    feeds = batches(original)
    expected = run(original, feeds)

    # the harness itself: the backend input gives the packaged reference output
    reference = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"light_{name}_output_0.pb")))
    got = expected[1][0]
    if form == "materialised" and shipped.graph.node[-1].op_type == "Softmax":
        flat = got.reshape(got.shape[0], -1).astype(np.float64)
        got = np.exp(flat - flat.max(axis=1, keepdims=True))
        got = (got / got.sum(axis=1, keepdims=True)).reshape(reference.shape)
    np.testing.assert_allclose(got, reference, rtol=1e-3, atol=1e-7)

    result = onnxfib.compress(original, eps=0.0)
    compressed = result.model
    report = result.report
    assert report.validation is not None and report.validation.ok

    onnx.checker.check_model(compressed, full_check=True)
    assert compressed.ir_version == original.ir_version
    assert [(o.domain, o.version) for o in compressed.opset_import] == [
        (o.domain, o.version) for o in original.opset_import
    ]
    assert signature(data_inputs(compressed)) == signature(data_inputs(original))
    assert signature(list(compressed.graph.output)) == signature(list(original.graph.output))

    actual = run(compressed, feeds)
    for which, (got_outputs, want_outputs) in enumerate(zip(actual, expected)):
        for output, got_value, want_value in zip(original.graph.output, got_outputs, want_outputs):
            assert got_value.shape == want_value.shape
            assert_close(got_value, want_value, f"{name}/{form} output {output.name} on batch {which}")
    if form == "shipped":
        np.testing.assert_allclose(actual[1][0], reference, rtol=1e-3, atol=1e-7)

    assert report.params_before == count_parameters(original)
    assert report.params_after == count_parameters(compressed)
    before, after_at_most = PARAMS[name, form]
    assert report.params_before == before
    assert report.params_after <= after_at_most, (
        f"{name}/{form}: {report.params_after:,} parameters after compression, measured {after_at_most:,}"
    )
    if after_at_most < before:
        assert report.params_after < report.params_before
