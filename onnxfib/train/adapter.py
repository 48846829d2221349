"""From a torch model to the core's analysis and back.

The model is exported in memory with torch's TorchScript exporter (eval mode, no constant
folding, so BatchNorm stays a node and every initializer keeps its parameter's name), then
analysed by :class:`onnxfib.analysis.Analysis`. Names tie the ONNX layers back to modules:
a Gemm or Conv whose weight initializer is ``"<module>.weight"`` is that module's layer.
Nothing here computes a signature or a merge; the core does.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from ..analysis import Analysis, MemberFigures
from ..coloring import TreeCache
from ..errors import UsageError
from ..partition import Partition
from ..rules import Plan, Port

#: Modules whose output channels are neurons (rows of a weight).
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: Per-channel modules that may sit between a layer and the layers reading it.
CHANNEL_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
#: ONNX ops a breakable unit may pass through between its producer and its readers.
_PASS_OPS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Gelu", "Identity",
             "Dropout", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
             "GlobalMaxPool", "Flatten", "Erf", "Div", "Mul", "Add"}
_OPSET = 17
_RENAMED = re.compile(r"__onnxfib\d+$")


#: Element-wise modules a plain stack may hold, and the ONNX op each one is.
_STACK_OPS: dict[type[nn.Module], str] = {nn.ReLU: "Relu", nn.Tanh: "Tanh", nn.Sigmoid: "Sigmoid",
                                          nn.Identity: "Identity", nn.Softplus: "Softplus"}


def stack_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto | None:
    """A plain stack (``nn.Sequential`` of Linear modules and parameter-free activations with
    default settings, on a 2-D input) written straight as ONNX: a Gemm (transB) per Linear with
    its parameters as initializers under their names, one node per activation. The same graph
    the exporter makes, without tracing; None for any other model."""
    if not isinstance(model, nn.Sequential) or example.dim() != 2 or example.dtype != torch.float32 or \
            any(p.dtype != torch.float32 for p in model.parameters()):
        return None
    nodes, initializers, current, width = [], [], "input", int(example.shape[1])
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            names = [f"{name}.weight"] + ([f"{name}.bias"] if module.bias is not None else [])
            initializers += [numpy_helper.from_array(p.detach().cpu().numpy(), n)
                             for n, p in zip(names, (module.weight, module.bias))]
            nodes.append(helper.make_node("Gemm", [current, *names], [f"/{name}/Gemm_output_0"],
                                               name=f"/{name}/Gemm", transB=1))
            width = module.out_features
        elif type(module) in _STACK_OPS and not (isinstance(module, nn.Softplus) and module.beta != 1.0):
            op = _STACK_OPS[type(module)]
            nodes.append(helper.make_node(op, [current], [f"/{name}/{op}_output_0"], name=f"/{name}/{op}"))
        else:
            return None
        current = nodes[-1].output[0]
    if not nodes:
        return None
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        nodes, "stack", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, list(example.shape))],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [int(example.shape[0]), width])],
        initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])


def export_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """``model`` as an ONNX model (eval mode, initializers named after parameters): a plain
    stack written directly (:func:`stack_onnx`), anything else through torch's exporter; the
    model's training flag is restored afterwards."""
    direct = stack_onnx(model, example)
    if direct is not None:
        return direct
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused encoder layer has no ONNX export
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), buffer, dynamo=False, do_constant_folding=False,
                              opset_version=_OPSET, input_names=["input"], output_names=["output"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return onnx.load_from_string(buffer.getvalue())


def initializer_name(name: str) -> str:
    """The parameter name an initializer of a collapsed model stands for."""
    return _RENAMED.sub("", name)


@dataclass(frozen=True)
class Layer:
    """A Linear or Conv module and the ONNX tensors it reads and writes."""

    name: str
    module: nn.Module
    input: str
    output: str

    @property
    def width(self) -> int:
        return int(self.module.weight.shape[0])


@dataclass(frozen=True)
class Unit:
    """The neurons of one hidden layer that can be replaced: one producer, the per-channel
    modules after it, and the layers reading it (``spatial`` inputs per channel, c-major,
    when a Flatten sits in between)."""

    producer: Layer
    channel_modules: tuple[nn.Module, ...]
    readers: tuple[tuple[Layer, int], ...]
    tensors: tuple[str, ...]

    @property
    def width(self) -> int:
        return self.producer.width


class TorchAnalysis:
    """The core's analysis of a torch model at tolerance ``eps`` (``symmetry`` decides what the
    collapse plans follow; ``layer_eps`` per layer site, ``trees`` a clustering cache and
    ``record_heights`` as :class:`onnxfib.analysis.Analysis` takes them), with its layers and
    replaceable units named by module."""

    def __init__(self, model: nn.Module, example: torch.Tensor, *, eps: float,
                 symmetry: str = "cover", layer_eps: Mapping[str, float] | None = None,
                 trees: TreeCache | None = None, record_heights: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not 0.0 <= float(eps) < 2.0:
            raise UsageError(f"eps must be in [0, 2) (a cosine distance), got {eps}")
        self.model = model
        self.onnx = export_onnx(model, example)
        self.analysis = Analysis(self.onnx, eps=float(eps), symmetry=symmetry, layer_eps=layer_eps, trees=trees,
                                 record_heights=record_heights)
        modules = dict(model.named_modules())
        self.layers: list[Layer] = []
        self._channel_modules: dict[str, nn.Module] = {}  # ONNX input tensor -> BatchNorm module
        for node in self.onnx.graph.node:
            if len(node.input) < 2 or not node.input[1].endswith(".weight"):
                continue
            module = modules.get(node.input[1][: -len(".weight")])
            if node.op_type in ("Gemm", "Conv") and isinstance(module, LAYER_TYPES):
                name = node.input[1][: -len(".weight")]
                self.layers.append(Layer(name, module, node.input[0], node.output[0]))
            elif node.op_type == "BatchNormalization" and isinstance(module, CHANNEL_TYPES):
                self._channel_modules[node.input[0]] = module
        if not self.layers:
            raise UsageError("the model has no Linear or Conv layer the analysis can see")
        self._ports = {p.name: p for site in self.analysis.sites for p in (*site.inputs, *site.outputs)}

    def figures(self, layer: Layer) -> MemberFigures:
        """Fibers, opfibers (flavored, Eq. 5), covers (Eq. 7) and the collapse partition of a
        layer's output channels; discrete where the analysis could not color them."""
        found = self.analysis.figures.get(layer.output)
        if found is not None:
            return found
        discrete = Partition.discrete(layer.width)
        return MemberFigures(discrete, discrete, discrete, discrete, "not analysed")

    def plan(self, tensor: str) -> Plan | None:
        """The collapse plan (partition, relative scales) of an ONNX tensor, if it narrows."""
        port: Port | None = self._ports.get(tensor)
        return self.analysis.plan(port) if port is not None else None

    def units(self) -> list[Unit]:
        """Hidden layers whose neurons can be replaced in place: one producer, readers that
        are layers, nothing in between but element-wise, per-channel, pooling and Flatten ops,
        and no frozen channel (graph outputs, residual sums with other producers, barriers)."""
        producers = {layer.output: layer for layer in self.layers}
        readers = {layer.input: layer for layer in self.layers}
        site_ops = {p.name: {n.op for n in site.nodes} for site in self.analysis.sites
                    for p in (*site.inputs, *site.outputs)}
        units = []
        for group in self.analysis.groups:
            names = set(group.members)
            made = [producers[n] for n in names if n in producers]
            read = [readers[n] for n in names if n in readers]
            if len(made) != 1 or not read or bool(np.any(group.frozen)):
                continue
            ops = set().union(*(site_ops.get(n, set()) for n in names)) - {"Gemm", "Conv"}
            if not ops <= _PASS_OPS:
                continue
            producer = made[0]
            spatial = []
            for reader in read:
                width_in = int(reader.module.weight.shape[1])
                if width_in % producer.width:
                    break
                spatial.append((reader, width_in // producer.width))
            else:
                channel = tuple(self._channel_modules[n] for n in sorted(names) if n in self._channel_modules)
                units.append(Unit(producer, channel, tuple(spatial), tuple(sorted(names))))
        order = {layer.name: i for i, layer in enumerate(self.layers)}
        return sorted(units, key=lambda u: order[u.producer.name])


def parameter_count(model: nn.Module) -> int:
    """Trainable scalars of ``model``."""
    return int(sum(p.numel() for p in model.parameters()))


__all__ = ["CHANNEL_TYPES", "LAYER_TYPES", "Layer", "TorchAnalysis", "Unit", "export_onnx",
           "initializer_name", "parameter_count", "stack_onnx"]
