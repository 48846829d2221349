"""Train the small digits MLP and export it (and a lifted copy) through both torch exporters.

    python models/make_models.py            # regenerates every file listed in models/README.md

Deterministic: fixed seeds, CPU, single thread. Takes a few seconds. The network is
64 -> 32 -> 32 -> 10 with ReLU, trained on standardized scikit-learn ``load_digits`` pixels; the
standardization is folded into the first layer afterwards, so every exported model takes the
raw pixel values (float32, 0..16) as input ``input`` of shape ``[batch, 64]`` and returns
``logits`` of shape ``[batch, 10]``.

The *lifted* models carry planted redundancy (tests/lifting.py): each hidden layer grows from
32 to 48 neurons by copying randomly chosen neurons and splitting their outgoing weights among
the copies. They compute the same function, and their fibration base is the trained network, so
``onnxfib compress models/digits_mlp_lifted.onnx out.onnx`` (eps = 0) shrinks them back to the
base's parameter count exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))
from lifting import lift_mlp  # noqa: E402
from onnxfib.stats import count_parameters  # noqa: E402

SEED = 0
HIDDEN = (32, 32)
LIFT_EXTRA = [16, 16]  # 32 -> 48 per hidden layer
EPOCHS = 60
BATCH = 64
LR = 3e-3
OPSET = 18
N_SAMPLE = 256


def load_data():
    """Digits as float32 pixels 0..16; a fixed stratified 75/25 split."""
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    return train_test_split(X, y, test_size=0.25, random_state=SEED, stratify=y)


def build(hidden=HIDDEN) -> nn.Sequential:
    sizes = (64, *hidden, 10)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train(X_train, y_train) -> nn.Sequential:
    """Adam on standardized inputs; returns the network with the standardization folded in."""
    torch.manual_seed(SEED)
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    std[std == 0] = 1.0  # constant pixels (always 0): leave them unscaled, as StandardScaler does
    Xs = torch.from_numpy((X_train - mean) / std)
    ys = torch.from_numpy(y_train).long()
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(Xs), generator=gen)
        for start in range(0, len(Xs), BATCH):
            idx = perm[start:start + BATCH]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(Xs[idx]), ys[idx])
            loss.backward()
            opt.step()
    model.eval()
    # Fold x_std = (x - mean) / std into the first layer: W' = W / std, b' = b - W' @ mean.
    first = model[0]
    with torch.no_grad():
        w = first.weight.double() / torch.from_numpy(std).double()[None, :]
        b = first.bias.double() - w @ torch.from_numpy(mean).double()
        first.weight.copy_(w.float())
        first.bias.copy_(b.float())
    return model


def accuracy(model: nn.Module, X, y) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(X)).argmax(1).numpy() == y).mean())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def quiet():
    """Silence the exporters' progress prints, warnings and log lines."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
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


def export_legacy(model: nn.Module, path: Path) -> None:
    with quiet():
        torch.onnx.export(
            model, (torch.zeros(2, 64),), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def export_dynamo(model: nn.Module, path: Path, external_data: bool) -> None:
    for stale in (path, Path(str(path) + ".data")):
        stale.unlink(missing_ok=True)
    with quiet():
        program = torch.onnx.export(
            model, (torch.zeros(2, 64),), dynamo=True, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
    proto = program.model_proto
    if external_data:
        # Every initializer goes to ``<name>.onnx.data`` (size_threshold=0: the tensors here are
        # small, and the point of this file is to exercise the external-data path).
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0, convert_attribute=False)
    else:
        onnx.save_model(proto, str(path))


def onnx_accuracy(path: Path, X, y) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": X})
    return float((logits.argmax(1) == y).mean())


def main() -> dict:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    X_train, X_test, y_train, y_test = load_data()
    base = train(X_train, y_train)
    lifted = lift_mlp(base, LIFT_EXTRA, np.random.default_rng(SEED))
    with torch.no_grad():
        diff = (lifted(torch.from_numpy(X_test)) - base(torch.from_numpy(X_test))).abs().max().item()
    assert diff < 1e-4, f"lifted network differs from the base by {diff}"

    files = {
        "digits_mlp.onnx": (base, "legacy", False),
        "digits_mlp_dynamo.onnx": (base, "dynamo", True),
        "digits_mlp_lifted.onnx": (lifted, "legacy", False),
        "digits_mlp_lifted_dynamo.onnx": (lifted, "dynamo", False),
    }
    summary: dict = {"torch_test_accuracy": accuracy(base, X_test, y_test), "files": {}}
    for name, (model, exporter, external) in files.items():
        path = HERE / name
        if exporter == "legacy":
            export_legacy(model, path)
        else:
            export_dynamo(model, path, external)
        onnx.checker.check_model(str(path), full_check=True)
        summary["files"][name] = {
            "exporter": exporter,
            "external_data": external,
            "params": count_parameters(onnx.load(str(path))),
            "torch_params": n_params(model),
            "hidden": [m.out_features for m in model if isinstance(m, nn.Linear)][:-1],
            "test_accuracy": onnx_accuracy(path, X_test, y_test),
        }
    np.savez(HERE / "digits_sample.npz", input=np.ascontiguousarray(X_test[:N_SAMPLE]))
    return summary


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
