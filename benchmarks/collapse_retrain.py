"""Collapse–retrain (the paper's Algorithm 1) on a Fashion-MNIST MLP: parameters against loss.

    python benchmarks/collapse_retrain.py       # a few minutes on 2 cores

LeNet-300-100 (784-300-100-10, ReLU) is trained on 50k of the 60k Fashion-MNIST training images
(the other 10k are the validation split), then collapsed with ``onnxfib.train.collapse_retrain``
(Algorithm 1): per-layer thresholds from the greedy search, raised 5% per round, each round
retrained to early stopping on the validation split, stopping at the first round whose
validation loss exceeds the trained model's by more than the tolerance. The test split is only
reported. For comparison one global threshold is also applied to the trained model once,
without retraining.
A ``CoverTracker`` watches fibers and covers form during the first training (Fig. 8 and 10 plots).
The accepted model is exported to ONNX and given to an exact ``onnxfib.compress`` pass, which
must find nothing left to merge. Writes ``results/collapse_retrain.json``,
``results/collapse_retrain.png``, the tracker's CSV and plots, and the ``collapse_retrain``
section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fashion_mnist  # noqa: E402
from sections import fashion_mnist_missing, write_section  # noqa: E402

NAME = "collapse_retrain"
SEED = 0
EPOCHS = 3
RETRAIN_EVERY = 100  # early stopping: validation checks every RETRAIN_EVERY steps
RETRAIN_PATIENCE = 2
RETRAIN_MAX_STEPS = 1500
VALIDATION = 10_000
BATCH = 128
LR = 1e-3
TOLERANCE = 0.05
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TRACK_EPS = 0.6
TRACK_EVERY = 100
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
PLOT_PNG = HERE / "results" / f"{NAME}.png"
TRACK_CSV = HERE / "results" / f"{NAME}_tracking.csv"
FIBERS_PNG = HERE / "results" / f"{NAME}_fibers.png"
COVERS_PNG = HERE / "results" / f"{NAME}_cover_sizes.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    args = parser.parse_args(argv)
    if fashion_mnist_missing():
        return 2
    import torch
    from torch import nn

    import onnxfib
    from onnxfib.train import (
        CoverTracker,
        EarlyStopping,
        OnnxLayers,
        collapse_retrain,
        collapse_to_base,
        export_onnx,
        parameter_count,
    )

    start = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    (xtr, ytr), (xte, yte) = fashion_mnist.load("train"), fashion_mnist.load("test")
    mean, std = xtr.mean() / 255.0, xtr.std() / 255.0
    xtr = torch.from_numpy(((xtr.reshape(len(xtr), -1) / 255.0 - mean) / std).astype(np.float32))
    xte = torch.from_numpy(((xte.reshape(len(xte), -1) / 255.0 - mean) / std).astype(np.float32))
    ytr, yte = torch.from_numpy(ytr.astype(np.int64)), torch.from_numpy(yte.astype(np.int64))
    order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(SEED))
    xva, yva = xtr[order[:VALIDATION]], ytr[order[:VALIDATION]]
    xtr, ytr = xtr[order[VALIDATION:]], ytr[order[VALIDATION:]]
    generator = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()

    def train(model: nn.Module, steps: int, tracker: CoverTracker | None = None) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        model.train()
        done = 0
        while done < steps:
            for batch in torch.randperm(len(xtr), generator=generator).split(BATCH):
                optimizer.zero_grad()
                loss_fn(model(xtr[batch]), ytr[batch]).backward()
                optimizer.step()
                done += 1
                if tracker is not None:
                    tracker.maybe_record(done, epoch=(done - 1) * BATCH // len(xtr))
                if done == steps:
                    break

    def evaluate(model: nn.Module, split: str = "test") -> float:
        x, y = (xte, yte) if split == "test" else (xva, yva)
        model.eval()
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    def validate(model: nn.Module) -> float:
        return evaluate(model, "val")

    batches = iter(())

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iter(torch.randperm(len(xtr), generator=generator).split(BATCH))
            batch = next(batches)
        optimizer.zero_grad()
        loss_fn(model(xtr[batch]), ytr[batch]).backward()
        optimizer.step()

    def accuracy(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(xte).argmax(1) == yte).float().mean())

    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    example = xte[:1]
    tracker = CoverTracker(model, example, eps=TRACK_EPS, every=TRACK_EVERY)
    tracker.record(0, epoch=0)
    train_start = time.perf_counter()
    train(model, args.epochs * -(-len(xtr) // BATCH), tracker)
    train_seconds = time.perf_counter() - train_start
    reference = {"params": parameter_count(model), "loss": evaluate(model), "accuracy": accuracy(model)}
    once = []
    for eps in THRESHOLDS:
        collapsed = collapse_to_base(model, example, eps=eps)
        once.append({"eps": eps, "params": parameter_count(collapsed), "loss": evaluate(collapsed),
                     "accuracy": accuracy(collapsed)})
    retrain = EarlyStopping(step, validate, lambda p: torch.optim.Adam(p, lr=LR), every=RETRAIN_EVERY,
                            patience=RETRAIN_PATIENCE, max_steps=RETRAIN_MAX_STEPS)
    result = collapse_retrain(model, layers=OnnxLayers(example), validate=validate, retrain=retrain,
                              tolerance=args.tolerance)
    final = result.model
    exported = export_onnx(final, example)
    check = onnxfib.compress(exported, eps=0.0).report
    rounds = [{"thresholds": r.thresholds, "params": r.params, "val_loss_collapsed": r.loss_collapsed,
               "val_loss_retrained": r.loss_retrained, "steps": r.retrain_steps, "accepted": r.accepted}
              for r in result.rounds]
    widths = [m.out_features for m in final if isinstance(m, nn.Linear)]
    reference["val_loss"] = result.loss_before
    data = {"reference": reference, "once": once, "rounds": rounds, "tolerance": args.tolerance,
            "stopped": result.stopped,
            "final": {"params": parameter_count(final), "loss": evaluate(final), "accuracy": accuracy(final),
                      "widths": widths, "onnx_params_before": check.params_before,
                      "onnx_params_after": check.params_after},
            "tracking": {"eps": TRACK_EPS, "every": TRACK_EVERY, "records": len(tracker.records) // 3,
                         "seconds": tracker.seconds, "train_seconds": train_seconds},
            "epochs": args.epochs, "seconds": time.perf_counter() - start,
            "platform": f"{platform.machine()}, {platform.python_version()}"}
    section = markdown(data)
    print(section)
    if not args.no_write:
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(data, indent=1))
        plot(data)
        tracker.to_csv(TRACK_CSV)
        tracker.plot_counts(FIBERS_PNG, kind="fibers")
        tracker.plot_sizes(COVERS_PNG, layer="2", kind="covers")
        write_section(NAME, section)
    return 0


def plot(data: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ref = data["reference"]
    ax.scatter([ref["params"]], [ref["loss"]], color="black", zorder=3, label="trained")
    once = data["once"]
    ax.plot([o["params"] for o in once], [o["loss"] for o in once], "o--", color="tab:gray",
            label="collapse once (no retraining)")
    rounds = data["rounds"]
    ax.scatter([ref["params"]], [ref["val_loss"]], color="tab:red", marker="s", zorder=3, label="trained (validation)")
    ax.plot([r["params"] for r in rounds], [r["val_loss_retrained"] for r in rounds], "s-", color="tab:red",
            label="collapse–retrain rounds (validation loss)")
    ax.axhline((1 + data["tolerance"]) * ref["val_loss"], color="tab:red", lw=0.8, ls=":", label="stop line")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("loss (cross-entropy)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(PLOT_PNG, dpi=120)
    plt.close(fig)


def markdown(data: dict) -> str:
    ref, final = data["reference"], data["final"]
    lines = [
        f"<!-- {NAME} -->",
        "## Collapse–retrain on Fashion-MNIST (`collapse_retrain.py`)",
        "",
        f"LeNet-300-100 (784-300-100-10, ReLU) trained {data['epochs']} epochs with Adam (lr {LR}, batch {BATCH}) on "
        f"50k training images (10k held out for validation); Algorithm 1 (`onnxfib.train.collapse_retrain`): "
        f"per-layer thresholds from the greedy search, raised 5% per round, retraining with Adam to early stopping "
        f"on the validation split (checks every {RETRAIN_EVERY} steps, patience {RETRAIN_PATIENCE}, at most "
        f"{RETRAIN_MAX_STEPS} steps), stopping at the first round whose validation loss exceeds the trained model's "
        f"by more than {data['tolerance']:.0%} (stopped: {data['stopped']}).",
        "",
        "| round | per-layer eps | parameters | val loss after collapse | after retraining | steps | accepted |",
        "|---|---|---|---|---|---|---|",
        f"| trained | – | {ref['params']:,} | – | {ref['val_loss']:.4f} | – | – |",
    ]
    for i, r in enumerate(data["rounds"], 1):
        eps = ", ".join(f"{v:.3f}" for v in r["thresholds"].values())
        lines.append(f"| {i} | {eps} | {r['params']:,} | {r['val_loss_collapsed']:.4f} | "
                     f"{r['val_loss_retrained']:.4f} | {r['steps']} | {'yes' if r['accepted'] else 'no (stop)'} |")
    lines += [
        "",
        "Collapsing the trained model once at each threshold, without retraining:",
        "",
        "| eps | parameters | test loss | accuracy |",
        "|---|---|---|---|",
        *(f"| {o['eps']:g} | {o['params']:,} | {o['loss']:.4f} | {o['accuracy']:.4f} |" for o in data["once"]),
        "",
        f"Result: {final['params']:,} parameters ({final['params'] / ref['params']:.1%} of {ref['params']:,}), "
        f"hidden widths {final['widths'][:-1]}, test accuracy {final['accuracy']:.4f} (trained: "
        f"{ref['accuracy']:.4f}), test loss {final['loss']:.4f} (trained: {ref['loss']:.4f}). Exported to ONNX, an "
        f"exact onnxfib pass keeps {final['onnx_params_after']:,} of {final['onnx_params_before']:,} parameters"
        + (" (nothing left to merge)." if final["onnx_params_after"] == final["onnx_params_before"] else "."),
        "",
        f"![parameters against loss]({PLOT_PNG.relative_to(HERE).as_posix()})",
        "",
        f"While the model first trains, a `CoverTracker` records every {data['tracking']['every']} steps at eps "
        f"{data['tracking']['eps']:g}: fibers per layer over training (like the paper's Fig. 8) and the cover sizes "
        f"of the second hidden layer (Fig. 10); {data['tracking']['records']} records took "
        f"{data['tracking']['seconds']:.1f} s, {data['tracking']['seconds'] / data['tracking']['train_seconds']:.1%} "
        f"of the training time (counts in `{TRACK_CSV.relative_to(HERE).as_posix()}`).",
        "",
        f"![fibers per layer]({FIBERS_PNG.relative_to(HERE).as_posix()})",
        f"![cover sizes]({COVERS_PNG.relative_to(HERE).as_posix()})",
        "",
        f"Generated by `python benchmarks/collapse_retrain.py` in {data['seconds']:.0f} s ({data['platform']}).",
        f"<!-- /{NAME} -->",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
