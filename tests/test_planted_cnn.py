"""Planted redundancy in convolutional networks: lifted CNNs must compress back to their base,
exactly, at eps = 0.

Five small topologies (tests/cnn_lifting.py) are trained briefly (seeded SGD against a random
teacher, so weights and BatchNorm statistics are non-trivial), then lifted: internal channel
tensors get copies of their channels through conv, batch norm, depthwise, residual, concat, split
and ConvTranspose paths, and the consumers' kernels are split among the copies. Base and lift are
exported with the legacy exporter (TorchScript, opset 17) and the dynamo exporter (torch.export,
opset 18). For each (topology, exporter):

- ``onnxfib.compress(lifted, eps=0)`` has exactly the parameter count of the same exporter's
  export of the base (the reference is the export, not the torch module, because exporters may
  fold eval-mode BatchNorm into the conv: today both do), and its outputs in onnxruntime equal the lifted
  model's (rtol 1e-5, atol 1e-6 * max(|out|, 1)) on seeded image batches;
- control: the base itself keeps its parameter count at eps = 0 and its outputs.

Topologies: ResNet-style (identity and stride-2 1x1-conv shortcuts, global pool, Flatten/Reshape,
Gemm), DenseNet-style (concat), MobileNet-style (depthwise-separable, ReLU6 = Clip, inverted
residual), YOLO-style (SiLU = x * sigmoid(x), C2f split/concat with a residual bottleneck; both
``torch.split`` and ``chunk``, which the legacy exporter writes as Slices bounded by the runtime
Shape), U-Net-style (ConvTranspose, concat skip, output map).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxscript")
onnxfib = pytest.importorskip("onnxfib")
from cnn_lifting import TOPOLOGIES, YOLOish, lift_model, torch_threads, train_briefly  # noqa: E402
from planted_utils import assert_same_outputs, export_torch_image, image_inputs  # noqa: E402

from onnxfib.stats import count_parameters  # noqa: E402

pytestmark = pytest.mark.slow  # exports every CNN topology with both exporters

RTOL = 1e-5
EXPORTERS = ["legacy", "dynamo"]
# name -> (constructor, extra channels per group); seeds derive from the position.
MODELS = {
    "resnet": (TOPOLOGIES["resnet"], None),
    "densenet": (TOPOLOGIES["densenet"], None),
    "mobilenet": (TOPOLOGIES["mobilenet"], None),
    "yolo": (TOPOLOGIES["yolo"], None),
    "yolo_chunk": (lambda: YOLOish(split="chunk"), {"c1": 2, "c2": 3, "a": 3, "b": 3, "y": 4, "c3": 2}),
    "unet": (TOPOLOGIES["unet"], None),
}
CASES = [(name, exporter) for name in MODELS for exporter in EXPORTERS]
IDS = [f"{n}-{e}" for n, e in CASES]


@dataclass
class Planted:
    base_path: Path
    lifted_path: Path
    inputs: list[np.ndarray]
    base_params_torch: int
    lifted_params_torch: int


class _Exports:
    """Trains, lifts and exports lazily; everything is shared by the tests of this module."""

    def __init__(self, root: Path):
        self.root = root
        self.models: dict[str, tuple] = {}
        self.cases: dict[tuple[str, str], Planted] = {}

    def _models(self, name: str):
        if name not in self.models:
            seed = list(MODELS).index(name)
            make, extra = MODELS[name]
            base = make()
            train_briefly(base, base.input_shape, steps=30, batch=16, seed=100 + seed)
            lifted, _ = lift_model(base, extra or base.default_extra, np.random.default_rng(200 + seed))
            self.models[name] = (base, lifted, seed)
        return self.models[name]

    def get(self, name: str, exporter: str) -> Planted:
        key = (name, exporter)
        if key not in self.cases:
            base, lifted, seed = self._models(name)
            d = self.root / f"{name}_{exporter}"
            d.mkdir()
            with torch_threads(1):
                base_path = export_torch_image(base, d / "base.onnx", base.input_shape, exporter)
                lifted_path = export_torch_image(lifted, d / "lifted.onnx", base.input_shape, exporter)
            self.cases[key] = Planted(
                base_path=base_path,
                lifted_path=lifted_path,
                inputs=image_inputs(base.input_shape, seed=300 + seed),
                base_params_torch=sum(p.numel() for p in base.parameters()),
                lifted_params_torch=sum(p.numel() for p in lifted.parameters()),
            )
        return self.cases[key]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> _Exports:
    return _Exports(tmp_path_factory.mktemp("planted_cnn"))


def _layers(result) -> list[tuple]:
    return [(l.name, l.op_type, l.width, l.fibers, l.width_after, l.frozen) for l in result.report.layers]


def _compress_and_check(path: Path, expected_params: int, inputs: list[np.ndarray]):
    """Compress at eps = 0; exact parameter count; outputs equal to the input model's in ORT."""
    result = onnxfib.compress(str(path), eps=0.0)
    model = result.model
    got = count_parameters(model)
    assert got == expected_params, (
        f"{path.parent.name}/{path.name}: {count_parameters(onnx.load(str(path)))} params in, {got} after "
        f"compress, expected {expected_params}; layers (name, op, width, fibers, width_after, frozen): "
        f"{_layers(result)}"
    )
    assert result.report.params_after == expected_params
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    assert_same_outputs(path, model, inputs, rtol=RTOL)
    return result


@pytest.mark.parametrize("name,exporter", CASES, ids=IDS)
def test_lifted_cnn_collapses_to_base(exports, name, exporter):
    case = exports.get(name, exporter)
    expected = count_parameters(onnx.load(str(case.base_path)))
    lifted_params = count_parameters(onnx.load(str(case.lifted_path)))
    assert lifted_params > expected
    # The lift survives export: the two exports compute the same function in onnxruntime.
    assert_same_outputs(case.base_path, case.lifted_path, case.inputs, rtol=RTOL)
    result = _compress_and_check(case.lifted_path, expected, case.inputs)
    # Every layer narrows to the width it has in the base.
    base_widths = [l.width for l in onnxfib.inspect(str(case.base_path), eps=0.0)]
    assert [l.width_after for l in result.report.layers] == base_widths, _layers(result)


@pytest.mark.parametrize("name,exporter", CASES, ids=IDS)
def test_unlifted_cnn_keeps_its_size(exports, name, exporter):
    """Control: a trained base has no planted redundancy, so nothing merges at eps = 0."""
    case = exports.get(name, exporter)
    expected = count_parameters(onnx.load(str(case.base_path)))
    result = _compress_and_check(case.base_path, expected, case.inputs)
    assert all(l.width_after == l.width for l in result.report.layers), _layers(result)
