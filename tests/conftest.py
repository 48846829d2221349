"""Shared fixtures: small hand-built Gemm/Relu MLPs written to temporary model files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def build_mlp(sizes: list[int], *, seed: int = 0, planted: bool = True, batch: str | int = "N") -> onnx.ModelProto:
    """A Gemm/Relu MLP ``x -> y`` with random weights. With ``planted``, every hidden layer's
    neuron 1 copies neuron 0 (same row and bias: one fiber) and neuron 3 is twice neuron 2 (a
    proportional pair that merges exactly by the scale rule), so compression has work to do."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        weight = (rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        bias = rng.uniform(-0.5, 0.5, fan_out).astype(np.float32)
        hidden = index < len(sizes) - 2
        if planted and hidden and fan_out >= 4:
            weight[1], bias[1] = weight[0], bias[0]
            weight[3], bias[3] = 2 * weight[2], 2 * bias[2]
        inits += [numpy_helper.from_array(weight, f"W{index}"), numpy_helper.from_array(bias, f"b{index}")]
        out = f"h{index}" if hidden else "y"
        nodes.append(helper.make_node("Gemm", [current, f"W{index}", f"b{index}"], [out], name=f"fc{index}", transB=1))
        if hidden:
            nodes.append(helper.make_node("Relu", [out], [f"r{index}"], name=f"relu{index}"))
            out = f"r{index}"
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def sha256(path: Path) -> str:
    """Hex digest of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def write_model(tmp_path: Path) -> Callable[..., Path]:
    """Save a model under tmp_path (optionally with external data) and return its path."""

    def write(model: onnx.ModelProto, name: str = "model.onnx", *, external_data: bool = False) -> Path:
        path = tmp_path / name
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving as external data moves the tensors out of the proto
        onnx.save_model(copy, str(path), save_as_external_data=external_data, location=name + ".data", size_threshold=0)
        return path

    return write


@pytest.fixture
def mlp_model() -> onnx.ModelProto:
    """An 8-16-12-3 MLP with planted duplicate and proportional neurons."""
    return build_mlp([8, 16, 12, 3])


@pytest.fixture
def plain_model() -> onnx.ModelProto:
    """An 8-6-3 MLP with random weights and no redundancy."""
    return build_mlp([8, 6, 3], seed=1, planted=False)


@pytest.fixture
def mlp_path(write_model: Callable[..., Path], mlp_model: onnx.ModelProto) -> Path:
    """``mlp_model`` saved as tmp_path/mlp.onnx."""
    return write_model(mlp_model, "mlp.onnx")


@pytest.fixture
def plain_path(write_model: Callable[..., Path], plain_model: onnx.ModelProto) -> Path:
    """``plain_model`` saved as tmp_path/plain.onnx."""
    return write_model(plain_model, "plain.onnx")


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m onnxfib ARGS`` in tmp_path as a real process; returns the completed process."""

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "onnxfib", *map(str, args)],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )

    return run
