"""Fashion-MNIST CNN: onnxfib across tolerances, and against pruning and folding baselines.

    python benchmarks/fashion_cnn.py            # train, export, compress, evaluate, write results

A small CNN (conv 1->16 3x3, BN, ReLU, maxpool, conv 16->32 3x3, BN, ReLU, maxpool, flatten,
linear 1568->64, ReLU, linear 64->10) is trained on the 60k Fashion-MNIST training images
(Debian package ``dataset-fashion-mnist``, see ``fashion_mnist.py``) for a couple of epochs on
CPU with fixed seeds, exported with the legacy torch.onnx exporter (eval mode), then compressed
by ``onnxfib.compress`` at each eps with ``check=False``.

Second part, as ``lenet_fashion.py`` does for MLPs: at each removal level (share of parameters
removed) ``onnxfib.compress(model, target_params=1 - level)`` chooses every layer's eps and so the
widths of conv1, conv2 and fc1, data-free (generated measuring inputs, no refit) and calibrated
(1024 training images picked with a fixed seed, ``calibrate=True``); every baseline of
``cnn_baselines.py`` is then narrowed to exactly those widths (same parameter count), and in the
calibrated mode refit on the same images. Every model, the original included, is evaluated on the
10k test images in ONNX Runtime. Writes ``results/fashion_cnn.json``, ``results/fashion_cnn.png``
and regenerates the ``fashion_cnn`` section of ``RESULTS.md`` (only that section). Runs single
threaded (torch, BLAS): on a shared machine, oversubscribed threads made training ten times slower.
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
import baselines  # noqa: E402
import cnn_baselines  # noqa: E402
import fashion_mnist  # noqa: E402
from sections import (  # noqa: E402
    comparison_table,
    fashion_mnist_missing,
    fit,
    markers,
    plot_methods,
    quiet,
    single_threaded,
    write_section,
)

import onnxfib  # noqa: E402
from onnxfib.stats import count_parameters  # noqa: E402

NAME = "fashion_cnn"
SEED = 0
EPOCHS = 2
BATCH = 128
LR = 1e-3
OPSET = 17
EPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
LEVELS = (0.5, 0.7, 0.8)  # shares of parameters removed, for the comparison with the baselines
CALIBRATION = 1024  # training images the calibrated rows may use
MODES = {"data_free": "Data-free", "calibrated": "Calibrated"}
#: baselines narrowed to onnxfib's widths; Model Folding's clusters are computed once per level
#: pixel statistics of the Fashion-MNIST training set (x / 255)
MEAN, STD = 0.2860, 0.3530
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
PLOT = HERE / "results" / f"{NAME}.png"
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
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": X[i:i + 2000]})[0] for i in range(0, len(X), 2000)])


def widths(report) -> list[dict]:
    return [
        {"layer": layer.name, "op": layer.op_type, "width": layer.width, "width_after": layer.width_after,
         "frozen": layer.frozen}
        for layer in report.layers
    ]


def accuracy(model: onnx.ModelProto, X: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of ``model`` in ONNX Runtime (CPU)."""
    return float((logits(model, X).argmax(1) == y).mean())


def layer_widths(report) -> list[int]:
    """Widths after compression of conv1, conv2 and fc1 (every Conv/Gemm but the last)."""
    return [layer.width_after for layer in report.layers if layer.op_type in ("Conv", "Gemm")][:-1]


def compare(original: onnx.ModelProto, layers: list, X: np.ndarray, y: np.ndarray, *, removed: float,
            calib: np.ndarray | None = None, fitted: list | None = None) -> dict:
    """onnxfib at ``target_params = 1 - removed`` (calibrated on ``calib`` when given, else
    data-free), then every baseline narrowed to the widths onnxfib chose, refit on ``calib`` when
    given (the REPAIR variant is left out there: the refit replaces its weights)."""
    keep = round(1.0 - removed, 6)
    given = {} if calib is None else {"data": {"input": calib}, "calibrate": True}
    t0 = time.perf_counter()
    result = onnxfib.compress(original, target_params=keep, check=False, **given)
    compress_seconds = time.perf_counter() - t0
    report = result.report
    widths = layer_widths(report)
    row = {"widths": widths, "params": report.params_after, "removed": 1.0 - report.params_after / report.params_before,
           "layer_eps": {layer.name: layer.eps for layer in report.layers},
           "compress_seconds": round(compress_seconds, 1), "accuracy": {"onnxfib": accuracy(result.model, X, y)}}
    t0 = time.perf_counter()
    folds = baselines.fold_labels_per_seed(layers, widths, methods=cnn_baselines)
    row["seed_range"] = {}
    for name in baselines.NAMES:
        if calib is not None and "REPAIR" in name:
            continue
        draws = baselines.draws(name, layers, widths, folds, methods=cnn_baselines)
        counts = {cnn_baselines.count_params(d.layers) for d in draws}
        assert counts == {report.params_after}, f"{name}: {counts} parameters, onnxfib {report.params_after}"
        if calib is not None:
            draws = [cnn_baselines.refit(d, layers, calib, fitted=fitted) for d in draws]
        scores = [accuracy(cnn_baselines.to_onnx(d.layers, opset=OPSET), X, y) for d in draws]
        row["accuracy"][name] = float(np.mean(scores))
        if len(scores) > 1:
            row["seed_range"][name] = [min(scores), max(scores)]
    row["baseline_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"  {100 * removed:.0f}% {'calibrated' if calib is not None else 'data-free'}: widths {widths}, "
          f"{100 * row['removed']:.1f}% removed, onnxfib {row['accuracy']['onnxfib']:.4f} "
          f"({compress_seconds:.0f} s), baselines {row['baseline_seconds']:.0f} s", file=sys.stderr)
    return row


def run(epochs: int, eps_values: tuple[float, ...], levels: tuple[float, ...]) -> dict:
    import sklearn

    with single_threaded():
        return _run(epochs, eps_values, levels, versions={"scikit-learn": sklearn.__version__})


def _run(epochs: int, eps_values: tuple[float, ...], levels: tuple[float, ...], versions: dict) -> dict:
    import torch

    start = time.perf_counter()
    X_train, y_train = fashion_mnist.load("train")
    X_test, y_test = fashion_mnist.load("test")
    pick = np.random.default_rng(SEED).choice(len(X_train), CALIBRATION, replace=False)
    X_train, X_test, calib = preprocess(X_train), preprocess(X_test), preprocess(X_train[pick])
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
    eps_seconds = time.perf_counter() - start - train_seconds
    layers = cnn_baselines.from_torch(model)
    baseline_diff = float(np.abs(logits(cnn_baselines.to_onnx(layers, opset=OPSET), X_test) - base_logits).max())
    assert baseline_diff < 1e-3, f"the baselines' network differs from the export by {baseline_diff}"
    fitted = cnn_baselines.targets(layers, calib)
    comparison = [
        {"target_removed": removed,
         "data_free": compare(original, layers, X_test, y_test, removed=removed),
         "calibrated": compare(original, layers, X_test, y_test, removed=removed, calib=calib, fitted=fitted)}
        for removed in levels
    ]
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
        "eps_seconds": round(eps_seconds, 1),
        "calibration": CALIBRATION,
        "seeds": baselines.SEEDS,
        "baseline_network_max_abs_diff_vs_export": baseline_diff,
        "levels": comparison,
        "seconds": round(time.perf_counter() - start, 1),
        "versions": {"onnxfib": onnxfib.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "torch": torch.__version__, "numpy": np.__version__, **versions,
                     "python": platform.python_version()},
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
    if data.get("levels"):
        lines += ["", *comparison_markdown(data)]
    lines += ["", f"Regenerate: `python benchmarks/fashion_cnn.py` ({data['seconds']:.0f} s here, single-threaded; "
              f"onnxfib {data['versions']['onnxfib']}, torch {data['versions']['torch']}, onnxruntime "
              f"{data['versions']['onnxruntime']}).", END]
    return "\n".join(lines)


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def conclusion(levels: list[dict]) -> str:
    """One sentence from the numbers: which method is the most accurate at which level, per mode,
    and onnxfib's margin over the best baseline."""
    clauses = []
    for mode, label in MODES.items():
        leaders: dict[str, list[str]] = {}
        margins = []
        for level in levels:
            acc = level[mode]["accuracy"]
            top = max(acc.values())
            for name in (name for name, value in acc.items() if value == top):
                leaders.setdefault(name, []).append(f"{100 * level['target_removed']:.0f}%")
            margins.append(100 * (acc["onnxfib"] - max(v for k, v in acc.items() if k != "onnxfib")))
        parts = [f"{name} at {_listed(at)}" for name, at in leaders.items()]
        parts[0] = parts[0].replace(" at ", " is the most accurate at ", 1) + " removed"
        clauses.append(f"{label.lower()}, " + ", ".join(parts) + " (onnxfib minus the best baseline: "
                       + " / ".join(f"{m:+.2f}" for m in margins) + " points)")
    text = "; ".join(clauses) + "."
    return text[0].upper() + text[1:]


def comparison_markdown(data: dict) -> list[str]:
    levels = data["levels"]
    lines = [
        "### Against pruning and folding baselines at onnxfib's widths",
        "",
        "At each removal level `onnxfib.compress(model, target_params=1 - level, check=False)` chooses every "
        "layer's eps, hence the widths of conv1, conv2 and fc1; every baseline is then narrowed to exactly "
        "those widths and has exactly onnxfib's parameter count (asserted). Data-free: the library's search "
        "measures output error on generated inputs and merges without refitting. Calibrated: "
        f"{data['calibration']} training images picked with seed {data['training']['seed']} (`data=`, "
        "`calibrate=True`: the search measures on them and merged layers are refit); the baselines keep their "
        "choice of channels and units and refit every layer after the first by ridge least squares (convolutions "
        "through im2col) to the original pre-activations on the same images. Baselines "
        "(`benchmarks/cnn_baselines.py`, on the trained weights with BatchNorm folded into the convolutions, "
        "as in the export): random channel pruning; L2-norm filter pruning (largest incoming-filter norms kept); "
        "Model Folding (Wang et al., ICLR 2025: k-means, k-means++ with 10 inits, on each channel's incoming filter, bias and outgoing "
        "weights, conv2's outgoing weights being fc1's 49 columns of the channel; cluster means, outgoing "
        "weights summed), with and without its data-free approximate REPAIR (variance factor "
        "sqrt(n / (1 + (n - 1) c)) on the merged filter, the BatchNorm it would scale being folded; no "
        "calibrated row, the refit replaces it); the fibration paper's plain collapse (Eq. 10: filters summed "
        "over the previous layer's clusters per kernel position, average-linkage cosine clustering cut at the "
        "widths, plain averaging). The seeded baselines (random pruning, and Model Folding's k-means with and "
        f"without REPAIR) show the mean over seeds 0-{data['seeds'] - 1}, their lowest and highest in brackets. "
        "Test accuracy in ONNX Runtime; bold: best mean in the column.",
    ]
    for mode, label in MODES.items():
        columns = [(f"{100 * level['target_removed']:.0f}% target", level[mode]) for level in levels]
        lines += ["", f"**{label}**", "", *comparison_table(columns, "widths conv1-conv2-fc1")]
    seconds = {mode: [level[mode]["compress_seconds"] for level in levels] for mode in MODES}
    lines += ["", conclusion(levels), "",
              f"![accuracy against parameters removed](results/{PLOT.name})", "",
              "onnxfib's time per level: " + "; ".join(
                  f"{MODES[mode].lower()} " + " / ".join(f"{s:.0f}" for s in values) + " s"
                  for mode, values in seconds.items()) + "."]
    return lines


def plot(data: dict, path: Path) -> None:
    """Accuracy against parameters removed, one line per method; data-free and calibrated panels
    (the data-free one also shows the uniform-eps points of the first table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    colors = {name: f"C{i}" for i, name in enumerate(("onnxfib", *baselines.NAMES))}
    for ax, mode in zip(axes, MODES):
        plot_methods(ax, [level[mode] for level in data["levels"]], colors)
        if mode == "data_free":
            sweep = [row for row in data["results"] if row["params_kept"] < 1.0]
            ax.plot([100 * (1 - row["params_kept"]) for row in sweep], [100 * row["test_accuracy"] for row in sweep],
                    ls=":", marker="x", color="grey", label="onnxfib, one eps for all layers")
        ax.axhline(100 * data["test_accuracy"], color="black", lw=0.8, ls="--", label="original")
        ax.set_title(f"Fashion-MNIST CNN: {MODES[mode]}", fontsize=10)
        ax.set_xlabel("parameters removed (%)")
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--eps", type=float, nargs="+", default=list(EPS))
    parser.add_argument("--levels", type=float, nargs="*", default=list(LEVELS),
                        help="shares of parameters removed for the comparison with the baselines")
    parser.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    args = parser.parse_args(argv)
    if fashion_mnist_missing():
        return 2
    data = run(args.epochs, tuple(args.eps), tuple(args.levels))
    section = markdown(data)
    print(section)
    if not args.no_write:
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(data, indent=2) + "\n")
        if data["levels"]:
            plot(data, PLOT)
        write_section(NAME, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
