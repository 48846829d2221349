"""Fashion-MNIST CNN: test accuracy against parameters kept, across onnxfib tolerances.

    python benchmarks/fashion_cnn.py            # train, export, compress, evaluate, write results

A small CNN (conv 1->16 3x3, BN, ReLU, maxpool, conv 16->32 3x3, BN, ReLU, maxpool, flatten,
linear 1568->64, ReLU, linear 64->10) is trained on the 60k Fashion-MNIST training images
(Debian package ``dataset-fashion-mnist``, see ``fashion_mnist.py``) for a couple of epochs on
CPU with fixed seeds, exported with the legacy torch.onnx exporter (eval mode), then compressed
by ``onnxfib.compress`` at each eps with ``check=False``. Every model, the original included,
is evaluated on the 10k test images in ONNX Runtime. Writes ``results/fashion_cnn.json`` and
regenerates the ``fashion_cnn`` section of ``RESULTS.md`` (only that section).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fashion_mnist  # noqa: E402
from sections import fashion_mnist_missing, fit, markers, quiet, write_section  # noqa: E402

import onnxfib  # noqa: E402
from onnxfib.stats import count_parameters  # noqa: E402

NAME = "fashion_cnn"
SEED = 0
EPOCHS = 2
BATCH = 128
LR = 1e-3
OPSET = 17
EPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: pixel statistics of the Fashion-MNIST training set (x / 255)
MEAN, STD = 0.2860, 0.3530
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
BEGIN, END = markers(NAME)


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> normalised float32 (n, 1, 28, 28), the model's input."""
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]


def build_model():
    from collections import OrderedDict

    import torch.nn as nn

    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("bn1", nn.BatchNorm2d(16)), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("bn2", nn.BatchNorm2d(32)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(32 * 7 * 7, 64)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(64, 10)),
    ]))


def train(X: np.ndarray, y: np.ndarray, epochs: int):
    """The CNN after ``epochs`` of Adam on (X, y), seeded, in eval mode."""
    import torch

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    return fit(build_model(), X, y, epochs=epochs, lr=LR, batch=BATCH, seed=SEED)


def export(model, path: Path) -> None:
    import torch

    with quiet():
        torch.onnx.export(
            model, (torch.zeros(2, 1, 28, 28),), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def logits(model: onnx.ModelProto, X: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": X[i:i + 2000]})[0] for i in range(0, len(X), 2000)])


def widths(report) -> list[dict]:
    return [
        {"layer": layer.name, "op": layer.op_type, "width": layer.width, "width_after": layer.width_after,
         "frozen": layer.frozen}
        for layer in report.layers
    ]


def run(epochs: int, eps_values: tuple[float, ...]) -> dict:
    import torch

    start = time.perf_counter()
    X_train, y_train = fashion_mnist.load("train")
    X_test, y_test = fashion_mnist.load("test")
    X_train, X_test = preprocess(X_train), preprocess(X_test)
    model = train(X_train, y_train, epochs)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(X_test)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{NAME}.onnx"
        export(model, path)
        original = onnx.load(str(path))
    ops = sorted({node.op_type for node in original.graph.node})
    base_logits = logits(original, X_test)
    export_diff = float(np.abs(base_logits - torch_logits).max())
    base_params = count_parameters(original)
    base_acc = float((base_logits.argmax(1) == y_test).mean())
    rows = []
    for eps in eps_values:
        t0 = time.perf_counter()
        result = onnxfib.compress(original, eps=eps, check=False)
        seconds = time.perf_counter() - t0
        out = logits(result.model, X_test)
        acc = float((out.argmax(1) == y_test).mean())
        rows.append({
            "eps": eps,
            "params": result.report.params_after,
            "params_kept": result.report.params_after / base_params,
            "test_accuracy": acc,
            "accuracy_change": acc - base_acc,
            "agreement_with_original": float((out.argmax(1) == base_logits.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(out - base_logits).max()),
            "max_rel_logit_diff": float(np.abs(out - base_logits).max() / np.abs(base_logits).max()),
            "compress_seconds": round(seconds, 2),
            "layers": widths(result.report),
        })
    return {
        "benchmark": NAME,
        "model": "conv1-16 bn relu pool, conv16-32 bn relu pool, flatten, fc1568-64 relu, fc64-10",
        "exporter": f"torch.onnx legacy (dynamo=False), opset {OPSET}, eval mode",
        "onnx_ops": ops,
        "data": "Fashion-MNIST (Debian dataset-fashion-mnist): 60000 train / 10000 test",
        "training": {"epochs": epochs, "batch": BATCH, "optimizer": f"Adam lr={LR}", "seed": SEED,
                     "seconds": round(train_seconds, 1)},
        "export_max_abs_diff_torch_vs_ort": export_diff,
        "params": base_params,
        "test_accuracy": base_acc,
        "results": rows,
        "versions": {"onnxfib": onnxfib.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
    }


def markdown(data: dict) -> str:
    lines = [
        BEGIN,
        "## Fashion-MNIST CNN (`benchmarks/fashion_cnn.py`)",
        "",
        f"{data['model']}; {data['training']['epochs']} epochs of {data['training']['optimizer']}, "
        f"batch {data['training']['batch']}, seed {data['training']['seed']}; exported by "
        f"{data['exporter']} (ops: {', '.join(data['onnx_ops'])}). Compressed with "
        "`onnxfib.compress(model, eps=eps, check=False)`; accuracy on the 10,000 test images in ONNX "
        f"Runtime. Original: {data['params']:,} parameters, {100 * data['test_accuracy']:.2f}% test accuracy.",
        "",
        "| eps | parameters | kept | test accuracy | change | same prediction as original | max abs logit diff | layer widths |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in data["results"]:
        layer_widths = ", ".join(
            f"{layer['layer'] or layer['op']} {layer['width']}->{layer['width_after']}" for layer in row["layers"]
        )
        lines.append(
            f"| {row['eps']:g} | {row['params']:,} | {100 * row['params_kept']:.1f}% | "
            f"{100 * row['test_accuracy']:.2f}% | {100 * row['accuracy_change']:+.2f} | "
            f"{100 * row['agreement_with_original']:.2f}% | {row['max_abs_logit_diff']:.2g} | {layer_widths} |"
        )
    lines += ["", f"Regenerate: `python benchmarks/fashion_cnn.py` (onnxfib {data['versions']['onnxfib']}, "
              f"torch {data['versions']['torch']}, onnxruntime {data['versions']['onnxruntime']}).", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--eps", type=float, nargs="+", default=list(EPS))
    parser.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    args = parser.parse_args(argv)
    if fashion_mnist_missing():
        return 2
    data = run(args.epochs, tuple(args.eps))
    section = markdown(data)
    print(section)
    if not args.no_write:
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(data, indent=2) + "\n")
        write_section(NAME, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
