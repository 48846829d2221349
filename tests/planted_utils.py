"""Helpers for the planted-redundancy tests: data, quiet exporters, onnxruntime comparisons.

Kept out of conftest.py on purpose (that file belongs to the core's tests); import it as a
plain module from the test files next to it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


# ----------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=None)
def digits():
    """(X float32 raw pixels 0..16, y) of scikit-learn's load_digits, and standardization stats."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    return X, y


@functools.lru_cache(maxsize=None)
def digits_standardized() -> np.ndarray:
    X, _ = digits()
    std = X.std(axis=0)
    std[std == 0] = 1.0
    return ((X - X.mean(axis=0)) / std).astype(np.float32)


def eval_inputs(n_features: int = 64, n_real: int = 200, n_random: int = 64, seed: int = 0,
                standardized: bool = True) -> list[np.ndarray]:
    """Real digits rows and seeded random rows (wider spread than the data, both signs)."""
    X = digits_standardized() if standardized else digits()[0]
    rng = np.random.default_rng(seed)
    real = X[rng.choice(len(X), size=n_real, replace=False), :n_features]
    scale = 3.0 if standardized else 16.0
    random = (rng.standard_normal((n_random, n_features)) * scale).astype(np.float32)
    return [np.ascontiguousarray(real), random]


# ------------------------------------------------------------------------------ exporters


@contextlib.contextmanager
def quiet():
    """Silence exporter prints, warnings and log records."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "skl2onnx")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_torch(model, path: Path, n_features: int, exporter: str = "legacy", seq: int | None = None,
                 external_data: bool = False, opset: int = 18) -> Path:
    """Export ``model`` with input ``input`` ([batch, n] or [batch, seq, n]) and output ``logits``.

    ``exporter`` is ``"legacy"`` (TorchScript, Gemm) or ``"dynamo"`` (torch.export; Gemm for 2-D
    inputs, MatMul+Add for 3-D). ``external_data`` writes every initializer to ``<path>.data``.
    """
    import torch

    shape = (2, n_features) if seq is None else (2, seq, n_features)
    example = (torch.zeros(*shape),)
    model = model.eval()
    with quiet():
        if exporter == "legacy":
            axes = {0: "batch"}
            torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": axes, "logits": axes})
        elif exporter == "dynamo":
            program = torch.onnx.export(model, example, dynamo=True, opset_version=opset,
                                        input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            proto = program.model_proto
            if external_data:
                onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=Path(path).name + ".data", size_threshold=0,
                                convert_attribute=False)
            else:
                onnx.save_model(proto, str(path))
        else:
            raise ValueError(exporter)
    return Path(path)


def export_sklearn(est, path: Path, n_features: int = 64, opset: int = 17) -> Path:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    options = {id(est): {"zipmap": False}} if is_classifier(est) else None
    with quiet():
        proto = convert_sklearn(est, initial_types=[("input", FloatTensorType([None, n_features]))],
                                options=options, target_opset=opset)
    onnx.save_model(proto, str(path))
    return Path(path)


# ---------------------------------------------------------------------------- onnxruntime


def ort_run(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a path or ModelProto in onnxruntime (CPU), all outputs by name."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_same_outputs(reference, candidate, inputs: list[np.ndarray], input_name: str = "input",
                        rtol: float = 1e-5, atol_rel: float = 1e-6, reshape=None) -> float:
    """Both models, run in onnxruntime on every batch, agree output by output.

    Float outputs: ``|cand - ref| <= atol + rtol * |ref|`` with ``atol = atol_rel * max|ref|``.
    Integer outputs (class labels) must be equal except where the reference's top two
    probabilities are within float rounding of each other (then either label is right).
    Returns the largest absolute error seen on float outputs.
    """
    worst = 0.0
    for x in inputs:
        x = x if reshape is None else x.reshape(reshape(x))
        ref = ort_run(reference, {input_name: x})
        got = ort_run(candidate, {input_name: x})
        assert set(ref) == set(got), f"outputs differ: {sorted(ref)} vs {sorted(got)}"
        for name, r in ref.items():
            g = got[name]
            assert g.shape == r.shape and g.dtype == r.dtype, (name, g.shape, r.shape, g.dtype, r.dtype)
            if np.issubdtype(r.dtype, np.floating):
                atol = atol_rel * max(float(np.abs(r).max()), 1.0)
                err = np.abs(g.astype(np.float64) - r.astype(np.float64))
                bound = atol + rtol * np.abs(r.astype(np.float64))
                bad = err > bound
                assert not bad.any(), (
                    f"output {name!r}: {int(bad.sum())} of {r.size} values beyond rtol={rtol}, atol={atol:.3g}; "
                    f"max abs err {err.max():.3g}, max rel err {(err / np.maximum(np.abs(r), 1e-30)).max():.3g}"
                )
                worst = max(worst, float(err.max()))
            else:
                mismatch = np.flatnonzero(g.ravel() != r.ravel())
                if mismatch.size:
                    probs = next((v for k, v in ref.items() if np.issubdtype(v.dtype, np.floating)), None)
                    assert probs is not None, f"output {name!r}: {mismatch.size} labels differ"
                    top2 = np.sort(probs.reshape(len(r.ravel()), -1)[mismatch], axis=1)[:, -2:]
                    assert np.all(top2[:, 1] - top2[:, 0] <= 1e-5), f"output {name!r}: labels differ at {mismatch}"
    return worst


def linear_param_count(model) -> int:
    """Scalars in the Linear layers of a torch model."""
    import torch.nn as nn

    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())


def sklearn_param_count(est) -> int:
    return int(sum(c.size for c in est.coefs_) + sum(b.size for b in est.intercepts_))


def random_mlp(sizes: list[int], activation: str, seed: int, bias_scale: float = 0.5, bias: bool = True):
    """A random torch MLP (no training): torch's default init plus a spread-out bias, so that
    units sit in the non-linear regime of their activation on standardized inputs."""
    import torch
    import torch.nn as nn

    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
            "leakyrelu": lambda: nn.LeakyReLU(0.1)}
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1], bias=bias)
        if bias:
            with torch.no_grad():
                lin.bias.uniform_(-bias_scale, bias_scale)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(acts[activation]())
    return nn.Sequential(*layers).eval()


def export_torch_image(model, path: Path, input_shape: tuple[int, ...], exporter: str = "legacy",
                       opset: int | None = None, batch: int = 2, output_name: str = "output") -> Path:
    """Export an image model with input ``input`` ([batch, *input_shape], dynamic batch) and one
    output ``output_name``. ``exporter`` is ``"legacy"`` (TorchScript; opset 17 by default; folds
    eval-mode BatchNorm into the preceding Conv) or ``"dynamo"`` (torch.export; opset 18 by
    default; keeps BatchNormalization nodes)."""
    import torch

    example = (torch.zeros(batch, *input_shape),)
    model = model.eval()
    with quiet():
        if exporter == "legacy":
            axes = {0: "batch"}
            torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset or 17,
                              input_names=["input"], output_names=[output_name],
                              dynamic_axes={"input": axes, output_name: axes})
        elif exporter == "dynamo":
            program = torch.onnx.export(model, example, dynamo=True, opset_version=opset or 18,
                                        input_names=["input"], output_names=[output_name],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            onnx.save_model(program.model_proto, str(path))
        else:
            raise ValueError(exporter)
    return Path(path)


def image_inputs(input_shape: tuple[int, ...], batches: tuple[int, ...] = (8, 3), scales: tuple[float, ...] = (1.0, 3.0),
                 seed: int = 0) -> list[np.ndarray]:
    """Seeded Gaussian image batches ([n, *input_shape] float32), one per (batch size, spread)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, *input_shape)) * s).astype(np.float32) for n, s in zip(batches, scales)]
