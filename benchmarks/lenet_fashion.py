"""Fully connected networks on Fashion-MNIST: onnxfib against pruning and folding baselines.

    python benchmarks/lenet_fashion.py          # train, export, compress, evaluate, write results

Two ReLU MLPs are trained on the 60k Fashion-MNIST training images (``fashion_mnist.py``) with
fixed seeds and exported with the legacy torch.onnx exporter:

- ``lenet_300_100``: LeNet-300-100 (784-300-100-10), the Neuron Merging (NeurIPS 2020) protocol;
- ``mlp_500x3``: 784-500-500-500-10, the fibration paper's MNIST network shape.

On LeNet-300-100, at each removal level (share of parameters removed)
``onnxfib.compress(model, target_params=...)`` chooses every layer's eps and so the hidden widths;
every baseline of ``baselines.py`` is then narrowed to exactly those widths. Data-free rows use
the weights alone; calibrated rows may also use 1024 training images. On 784-500-500-500-10 the
script searches the fewest parameters onnxfib keeps at no more than one point of accuracy lost
(``max_drop``, on the labelled calibration images) and compares the baselines at those widths.
Every model, the original included, classifies the 10k test images in ONNX Runtime. Writes
``results/lenet_fashion.json``, ``results/lenet_300_100.png`` and the ``lenet_fashion`` section
of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import baselines  # noqa: E402
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

NAME = "lenet_fashion"
SEED = 0
BATCH = 128
LR = 1e-3
OPSET = 17
#: per network: hidden widths, training epochs, removal levels (share of parameters removed) and
#: the accuracy drop whose smallest model is searched (None: no search)
NETWORKS = {
    "lenet_300_100": {"hidden": (300, 100), "epochs": 8, "levels": (0.5, 0.7, 0.8, 0.9), "max_drop": None,
                      "title": "LeNet-300-100 (784-300-100-10)"},
    "mlp_500x3": {"hidden": (500, 500, 500), "epochs": 5, "levels": (), "max_drop": 0.01,
                  "title": "784-500-500-500-10 (the paper's MNIST shape)"},
}
CALIBRATION = 1024  # training images the calibrated rows may use
MODES = {"data_free": "Data-free", "calibrated": "Calibrated"}
MEAN, STD = 0.2860, 0.3530
#: Neuron Merging (NeurIPS 2020), LeNet-300-100 on Fashion-MNIST, base 89.80%
ANCHORS = {"Neuron Merging (published)": {0.5: 0.8869, 0.7: 0.8275, 0.8: 0.8002},
           "L1 pruning (published)": {0.5: 0.8840, 0.7: 0.7126, 0.8: 0.6676}}
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
BEGIN, END = markers(NAME)

def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> normalised, flattened float32 (n, 784)."""
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD).reshape(len(images), -1)


def train(hidden: Sequence[int], X: np.ndarray, y: np.ndarray, epochs: int):
    """A 784-hidden-10 ReLU MLP after ``epochs`` of Adam on (X, y), seeded, in eval mode."""
    import torch

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    sizes = (X.shape[1], *hidden, 10)
    modules: list = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        modules += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    return fit(torch.nn.Sequential(*modules[:-1]), X, y, epochs=epochs, lr=LR, batch=BATCH, seed=SEED)


def export(model) -> onnx.ModelProto:
    """The legacy torch.onnx export (dynamo=False) of ``model``: Gemm and Relu nodes."""
    import torch

    with tempfile.TemporaryDirectory() as tmp, quiet():
        path = Path(tmp) / "mlp.onnx"
        torch.onnx.export(
            model, (torch.zeros(2, 784),), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
        return onnx.load(str(path))


def weights(model) -> list[baselines.Layer]:
    """The trained ``(W, b)`` pairs, float32."""
    import torch

    return [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy())
            for m in model if isinstance(m, torch.nn.Linear)]


def to_onnx(layers: Sequence[baselines.Layer]) -> onnx.ModelProto:
    """A Gemm/Relu graph ``input -> logits`` computing the MLP ``layers``."""
    nodes, inits, current = [], [], "input"
    for index, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"W{index}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{index}")]
        out = "logits" if index == len(layers) - 1 else f"h{index}"
        nodes.append(helper.make_node("Gemm", [current, f"W{index}", f"b{index}"], [out], transB=1))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out], [f"r{index}"]))
            out = f"r{index}"
        current = out
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", layers[0][0].shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", layers[-1][0].shape[0]])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def accuracy(model: onnx.ModelProto, X: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of ``model`` in ONNX Runtime (CPU)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, {"input": X[i:i + 5000]})[0] for i in range(0, len(X), 5000)])
    return float((out.argmax(1) == y).mean())


def hidden_widths(result) -> list[int]:
    """Widths after compression of the layers that feed another layer (all Gemms but the last)."""
    return [layer.width_after for layer in result.report.layers if layer.op_type == "Gemm"][:-1]


def onnxfib_run(original: onnx.ModelProto, *, calibrate: bool, data: np.ndarray | None = None,
                labels: np.ndarray | None = None, **target) -> dict:
    """``onnxfib.compress`` with a target (the library chooses every layer's eps), refit on
    ``data`` when ``calibrate``; ``data`` and ``labels`` also serve the target search (without
    them it measures the output error on generated inputs: data-free)."""
    given = {} if data is None else {"data": {"input": data}}
    if labels is not None:
        given["labels"] = labels
    result = onnxfib.compress(original, check=False, calibrate=calibrate, **given, **target)
    return {"result": result, "widths": hidden_widths(result), "params": result.report.params_after,
            "removed": 1.0 - result.report.params_after / result.report.params_before,
            "layer_eps": {layer.name: layer.eps for layer in result.report.layers}}


def baseline_scores(layers: list[baselines.Layer], widths: list[int], calib: np.ndarray | None,
                    X: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    """Test accuracy of every baseline narrowed to ``widths``, one per seed for the seeded ones
    (``baselines.draws``); refit on ``calib`` when given (the REPAIR variant is left out there:
    the refit replaces its weights)."""
    folds = baselines.fold_labels_per_seed(layers, widths)
    out = {}
    for name in baselines.NAMES:
        if calib is not None and "REPAIR" in name:
            continue
        draws = baselines.draws(name, layers, widths, folds)
        if calib is not None:
            draws = [baselines.refit(d, layers, calib) for d in draws]
        out[name] = [accuracy(to_onnx(d.layers), X, y) for d in draws]
    return out


def compare(original: onnx.ModelProto, layers: list[baselines.Layer], X: np.ndarray, y: np.ndarray, *,
            calibrate: bool, data: np.ndarray | None = None, labels: np.ndarray | None = None, **target) -> dict:
    """onnxfib at a target, then every baseline at the widths onnxfib chose (same parameter
    count), refit on ``data`` when ``calibrate``."""
    run = onnxfib_run(original, calibrate=calibrate, data=data, labels=labels, **target)
    row = {key: value for key, value in run.items() if key != "result"}
    scores = baseline_scores(layers, run["widths"], data if calibrate else None, X, y)
    row["accuracy"] = {"onnxfib": accuracy(run["result"].model, X, y)}
    row["accuracy"].update({name: float(np.mean(values)) for name, values in scores.items()})
    row["seed_range"] = {name: [min(values), max(values)] for name, values in scores.items() if len(values) > 1}
    print(f"  {target} {'calibrated' if calibrate else 'data-free'}: widths {row['widths']}, "
          f"{100 * row['removed']:.1f}% removed, onnxfib {row['accuracy']['onnxfib']:.4f}", file=sys.stderr)
    return row


def run_network(key: str, data: dict) -> dict:
    """Train, export and compare all methods on one network."""
    import torch

    spec = NETWORKS[key]
    start = time.perf_counter()
    model = train(spec["hidden"], data["X_train"], data["y_train"], spec["epochs"])
    train_seconds = time.perf_counter() - start
    print(f"{key}: trained in {train_seconds:.0f} s", file=sys.stderr)
    original = export(model)
    layers = weights(model)
    X, y = data["X_test"], data["y_test"]
    base_acc = accuracy(original, X, y)
    with torch.no_grad():
        torch_acc = float((model(torch.from_numpy(X)).numpy().argmax(1) == y).mean())
    out = {"title": spec["title"], "hidden": list(spec["hidden"]), "epochs": spec["epochs"],
           "train_seconds": round(train_seconds, 1), "params": baselines.count_params(layers),
           "test_accuracy": base_acc, "torch_test_accuracy": torch_acc,
           "levels": []}
    calib, labels = data["calib"], data["calib_labels"]
    for removed in spec["levels"]:
        keep = round(1.0 - removed, 6)
        out["levels"].append({
            "target_removed": removed,
            "data_free": compare(original, layers, X, y, calibrate=False, target_params=keep),
            "calibrated": compare(original, layers, X, y, calibrate=True, data=calib, target_params=keep),
        })
    if spec["max_drop"] is not None:
        out["max_drop"] = spec["max_drop"]
        out["smallest"] = {
            mode: compare(original, layers, X, y, calibrate=mode == "calibrated", data=calib, labels=labels,
                          max_drop=spec["max_drop"])
            for mode in MODES
        }
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def plot(key: str, net: dict, path: Path) -> None:
    """Accuracy against parameters removed, one line per method; data-free and calibrated panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = {name: f"C{i}" for i, name in enumerate(("onnxfib", *baselines.NAMES))}
    for ax, mode in zip(axes, MODES):
        plot_methods(ax, [level[mode] for level in net["levels"]], colors)
        if key == "lenet_300_100":
            for name, points in ANCHORS.items():
                ax.plot([100 * r for r in points], [100 * a for a in points.values()], ls=":", marker="x",
                        color="grey" if "Merging" in name else "silver", label=name)
        ax.axhline(100 * net["test_accuracy"], color="black", lw=0.8, ls="--", label="original")
        ax.set_title(f"{net['title']}: {MODES[mode]}", fontsize=10)
        ax.set_xlabel("parameters removed (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(data: dict) -> str:
    lines = [
        BEGIN,
        "## Fully connected networks on Fashion-MNIST (`benchmarks/lenet_fashion.py`)",
        "",
        f"ReLU MLPs trained with {data['optimizer']}, batch {data['batch']}, seed {data['seed']}, exported by "
        f"{data['exporter']}; accuracy on the 10,000 test images in ONNX Runtime. At each removal level "
        "`onnxfib.compress(model, target_params=1 - level)` chooses every layer's eps, hence the hidden widths; "
        "every baseline is then narrowed to exactly those widths (same parameter count). Data-free: the "
        "library's search measures output error on generated inputs (256 rows) and merges without "
        "refitting, grouping each layer by its cosine clustering or by folding (Ward on incoming and "
        "outgoing weights), whichever errs less. "
        f"Calibrated: {data['calibration']} training images (`data=`, `calibrate=True`: the search measures "
        "on them and merged layers are refit); the baselines keep their choice of units and refit every "
        "layer after the first by ridge least squares to the original pre-activations on the same images. "
        "Baselines (`benchmarks/baselines.py`): random neuron pruning; L2-norm neuron pruning (smallest incoming-weight norms dropped); "
        "Model Folding (Wang et al., ICLR 2025: k-means, k-means++ with 10 inits, on each unit's incoming row, "
        "bias and outgoing column, "
        "cluster means, next layer's columns summed), with and without its data-free approximate REPAIR "
        "(variance factor sqrt(n / (1 + (n - 1) c)) on the merged rows' weights, as there is no BatchNorm; "
        "no calibrated row, the refit replaces it); the fibration paper's plain collapse (Eq. 10, "
        "average-linkage cosine clustering cut at the widths, plain averaging: no scale rule, no refit). "
        f"The seeded baselines (random pruning, and Model Folding's k-means with and without REPAIR) show "
        f"the mean over seeds 0-{data['seeds'] - 1}, their lowest and highest in brackets. Bold: best mean in "
        "the column.",
    ]
    for key, net in data["networks"].items():
        title = net["title"]
        lines += ["", f"### {title}", "",
                  f"{net['params']:,} parameters, {100 * net['test_accuracy']:.2f}% test accuracy "
                  f"({net['epochs']} epochs, {net['train_seconds']:.0f} s of training)."]
        for mode, label in MODES.items():
            if net["levels"]:
                columns = [(f"{100 * level['target_removed']:.0f}% target", level[mode]) for level in net["levels"]]
                lines += ["", f"**{label}**", "", *comparison_table(columns, "hidden widths")]
        if net["levels"]:
            lines += ["", f"![{title}](results/{key}.png)"]
        if key == "lenet_300_100":
            lines += ["", "Published anchors on this protocol (Neuron Merging, NeurIPS 2020, base 89.80%): "
                      "merging 88.69 / 82.75 / 80.02% and L1 pruning 88.40 / 71.26 / 66.76% at 50 / 70 / 80% "
                      "removed (their training run, not this one)."]
        if "smallest" in net:
            lines += ["", f"**Fewest parameters at most {100 * net['max_drop']:g} point of accuracy lost**: "
                      f"`onnxfib.compress(model, max_drop={net['max_drop']}, data=..., labels=...)` searched on the "
                      f"{data['calibration']} labelled calibration images (data-free column: the images only choose "
                      "the widths, nothing is refit; calibrated column: the accuracy each candidate is judged by is "
                      "held out, each quarter of the images on a refit of the other three); test accuracy below, "
                      "baselines at the same widths (the calibrated ones refit on the same images). Anchor: the paper's reference code keeps 17% of "
                      "the parameters at 5.5 points lost (96.8% to 91.3%, MNIST).", "",
                      *comparison_table([(MODES[mode], net["smallest"][mode]) for mode in MODES], "hidden widths")]
    lines += ["", f"Regenerate: `python benchmarks/lenet_fashion.py` ({data['seconds']:.0f} s here; onnxfib "
              f"{data['versions']['onnxfib']}, torch {data['versions']['torch']}, onnxruntime "
              f"{data['versions']['onnxruntime']}).", END]
    return "\n".join(lines)


def run(networks: Sequence[str]) -> dict:
    import sklearn
    import torch

    start = time.perf_counter()
    X_train, y_train = fashion_mnist.load("train")
    X_test, y_test = fashion_mnist.load("test")
    pick = np.random.default_rng(SEED).choice(len(X_train), CALIBRATION, replace=False)
    data = {"X_train": preprocess(X_train), "y_train": y_train, "X_test": preprocess(X_test), "y_test": y_test,
            "calib": preprocess(X_train[pick]), "calib_labels": y_train[pick]}
    results = {key: run_network(key, data) for key in networks}
    return {
        "benchmark": NAME,
        "data": "Fashion-MNIST (Debian dataset-fashion-mnist): 60000 train / 10000 test",
        "exporter": f"torch.onnx legacy (dynamo=False), opset {OPSET}",
        "optimizer": f"Adam lr={LR}", "batch": BATCH, "seed": SEED, "calibration": CALIBRATION, "seeds": baselines.SEEDS,
        "networks": results,
        "seconds": round(time.perf_counter() - start, 1),
        "versions": {"onnxfib": onnxfib.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "torch": torch.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
                     "python": platform.python_version()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--no-write", action="store_true", help="print the tables, write nothing")
    args = parser.parse_args(argv)
    if fashion_mnist_missing():
        return 2
    with single_threaded():
        data = run(args.networks)
    section = markdown(data)
    print(section)
    if not args.no_write:
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(data, indent=2) + "\n")
        for key, net in data["networks"].items():
            if net["levels"]:
                plot(key, net, RESULTS_JSON.parent / f"{key}.png")
        write_section(NAME, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
