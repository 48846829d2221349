"""Continual learning on Fashion-MNIST: plain SGD vs continual backprop vs symmetry breaking.

    python benchmarks/continual.py              # 200 tasks x 3 seeds x 3 methods (about 15 min on 2 cores)

A long sequence of binary tasks, each a random pair of Fashion-MNIST classes with a random
label order (the class-incremental protocol of the paper's Sec. 11.3, at CPU scale). One MLP
(196-100-100-2, ReLU; images average-pooled to 14x14) learns them one after another; its output
layer is re-initialised at every task, everything else carries over. Per task it trains for a
few epochs on a small sample of the two classes and is tested on their test images. The three
methods share the optimizer (SGD with momentum) and the replacement schedule (rate, maturity):
continual backprop re-seeds the lowest-utility mature neurons; symmetry breaking re-seeds the
redundant members of mature covers (recomputed periodically at a cosine tolerance) after
folding them into the kept neuron. A cover tracker records the second hidden layer's covers at
the end of every task (its cost is reported as overhead). Writes ``results/continual.json``,
``results/continual_accuracy.png``, ``results/continual_covers.png``,
``results/continual_cover_sizes.png`` (like the paper's Fig. 10) and the ``continual`` section
of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fashion_mnist  # noqa: E402
from sections import fashion_mnist_missing, write_section  # noqa: E402

NAME = "continual"
METHODS = ("sgd", "continual_backprop", "symmetry_breaking")
TASKS = 200
SEEDS = (0, 1, 2)
TRAIN_PER_CLASS = 200
TEST_PER_CLASS = 500
EPOCHS = 10
BATCH = 20
LR = 0.01
MOMENTUM = 0.9
HIDDEN = 100
REPLACEMENT_RATE = 1e-3
MATURITY = 100
DECAY = 0.99
EPS = 0.4
RECOMPUTE_EVERY = 50
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
ACCURACY_PNG = HERE / "results" / f"{NAME}_accuracy.png"
COVERS_PNG = HERE / "results" / f"{NAME}_covers.png"
SIZES_PNG = HERE / "results" / f"{NAME}_cover_sizes.png"


def load_data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images average-pooled to 14x14, flattened and standardised; labels."""
    data = {}
    for split in ("train", "test"):
        images, labels = fashion_mnist.load(split)
        pooled = images.astype(np.float32).reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)) / 255.0
        data[split] = (pooled.reshape(len(pooled), -1), labels.astype(np.int64))
    mean, std = data["train"][0].mean(), data["train"][0].std()
    return {k: ((x - mean) / std, y) for k, (x, y) in data.items()}


def task_sequence(tasks: int, seed: int) -> list[tuple[int, int]]:
    """Ordered class pairs (first class gets label 0); the same for every method of a seed."""
    rng = np.random.default_rng(10_000 + seed)
    return [tuple(int(c) for c in rng.choice(10, size=2, replace=False)) for _ in range(tasks)]


def run(method: str, seed: int, tasks: int, data: dict, epochs: int, lr: float) -> dict:
    """Train one method on one seed's task sequence; per-task accuracy and cover figures."""
    import torch
    from torch import nn

    from onnxfib.train import ContinualBackprop, CoverTracker, SymmetryBreaker

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(196, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, 2))
    head = model[4]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    example = torch.zeros(1, 196)
    schedule = dict(optimizer=optimizer, replacement_rate=REPLACEMENT_RATE, maturity=MATURITY, seed=seed)
    if method == "continual_backprop":
        helper = ContinualBackprop(model, example, decay=DECAY, **schedule)
    elif method == "symmetry_breaking":
        helper = SymmetryBreaker(model, example, eps=EPS, every=RECOMPUTE_EVERY, **schedule)
    else:
        helper = None
    tracker = CoverTracker(model, example, eps=EPS)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    by_class_train = [np.flatnonzero(y_train == c) for c in range(10)]
    by_class_test = [np.flatnonzero(y_test == c) for c in range(10)]
    accuracy, covers, dead, replaced = [], [], [], []
    cover_sizes: dict[str, list[int]] = {}
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for task, pair in enumerate(task_sequence(tasks, seed)):
        with torch.no_grad():  # a fresh output layer per task
            bound = 1.0 / math.sqrt(HIDDEN)
            head.weight.uniform_(-bound, bound)
            head.bias.uniform_(-bound, bound)
        for p in (head.weight, head.bias):
            optimizer.state.pop(p, None)
        train_idx = np.concatenate([rng.choice(by_class_train[c], TRAIN_PER_CLASS, replace=False) for c in pair])
        test_idx = np.concatenate([by_class_test[c][:TEST_PER_CLASS] for c in pair])
        xs, ys = torch.from_numpy(x_train[train_idx]), torch.from_numpy((y_train[train_idx] == pair[1]).astype(np.int64))
        before = helper.replaced if helper is not None else 0
        model.train()
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(len(xs)))
            for batch in order.split(BATCH):
                optimizer.zero_grad()
                loss_fn(model(xs[batch]), ys[batch]).backward()
                optimizer.step()
                if helper is not None:
                    helper.step()
        model.eval()
        with torch.no_grad():
            xt = torch.from_numpy(x_test[test_idx])
            yt = torch.from_numpy((y_test[test_idx] == pair[1]).astype(np.int64))
            accuracy.append(float((model(xt).argmax(1) == yt).float().mean()))
            hidden = model[:4](xt)
            dead.append(float((hidden.amax(0) <= 0).float().mean()))
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise FloatingPointError(f"{method}, seed {seed}: weights not finite after task {task}")
        record = {r.layer: r for r in tracker.record(task)}["2"]
        covers.append(record.covers)
        if task in checkpoints(tasks):
            cover_sizes[str(task)] = record.cover_sizes
        replaced.append((helper.replaced if helper is not None else 0) - before)
    seconds = time.perf_counter() - start
    return {"method": method, "seed": seed, "accuracy": accuracy, "covers": covers, "dead": dead,
            "replaced": replaced, "seconds": seconds, "tracker_seconds": tracker.seconds,
            "tracker_records": len(covers),
            "breaking_seconds": getattr(helper, "seconds", 0.0),
            "cover_sizes": cover_sizes}


def checkpoints(tasks: int) -> list[int]:
    """Tasks whose cover size distribution is kept (first, quarters, last)."""
    return sorted({0, tasks // 4, tasks // 2, 3 * tasks // 4, tasks - 1})


def summarize(runs: list[dict], tasks: int) -> dict:
    window = max(1, tasks // 10)
    summary = {}
    for method in METHODS:
        acc = np.array([r["accuracy"] for r in runs if r["method"] == method])
        first, last = acc[:, :window].mean(1), acc[:, -window:].mean(1)
        chosen = [r for r in runs if r["method"] == method]
        summary[method] = {
            "first": [float(first.mean()), float(first.std())],
            "last": [float(last.mean()), float(last.std())],
            "change": [float((last - first).mean()), float((last - first).std())],
            "all": [float(acc.mean()), float(acc.mean(1).std())],
            "covers_last": float(np.mean([r["covers"][-1] for r in chosen])),
            "dead_last": float(np.mean([r["dead"][-1] for r in chosen])),
            "replaced": float(np.mean([sum(r["replaced"]) for r in chosen])),
            "seconds": float(np.mean([r["seconds"] for r in chosen])),
        }
    return summary


def plot(runs: list[dict], tasks: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"sgd": "tab:blue", "continual_backprop": "tab:red", "symmetry_breaking": "tab:olive"}
    bin_size = max(1, tasks // 20)
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in METHODS:
        acc = np.array([r["accuracy"] for r in runs if r["method"] == method])
        binned = acc[:, : tasks // bin_size * bin_size].reshape(len(acc), -1, bin_size).mean(2)
        x = (np.arange(binned.shape[1]) + 0.5) * bin_size
        mean, std = binned.mean(0), binned.std(0)
        ax.plot(x, mean, label=method.replace("_", " "), color=colors[method])
        ax.fill_between(x, mean - std, mean + std, color=colors[method], alpha=0.2)
    ax.set_xlabel(f"task (mean of {bin_size}-task bins)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Fashion-MNIST class pairs, {len(SEEDS)} seeds (band: std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ACCURACY_PNG, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in METHODS:
        cov = np.array([r["covers"] for r in runs if r["method"] == method])
        ax.plot(np.arange(tasks), cov.mean(0), label=method.replace("_", " "), color=colors[method])
    ax.set_xlabel("task")
    ax.set_ylabel(f"covers in hidden layer 2 (of {HIDDEN}, eps={EPS:g})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(COVERS_PNG, dpi=120)
    plt.close(fig)
    marks = checkpoints(tasks)
    largest = max(max(sizes) for r in runs for sizes in r["cover_sizes"].values())
    fig, axes = plt.subplots(len(METHODS), len(marks), figsize=(2.6 * len(marks), 2.2 * len(METHODS)),
                             sharex=True, sharey=True, squeeze=False)
    for row, method in enumerate(METHODS):
        for col, task in enumerate(marks):
            sizes = [s for r in runs if r["method"] == method for s in r["cover_sizes"][str(task)]]
            axes[row][col].hist(sizes, bins=np.arange(1, largest + 2) - 0.5, color=colors[method])
            axes[row][col].set_yscale("log")
            if row == 0:
                axes[row][col].set_title(f"after task {task + 1}", fontsize="small")
        axes[row][0].set_ylabel(method.replace("_", " "), fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("cover size")
    fig.suptitle(f"Cover sizes in hidden layer 2 (eps={EPS:g}, all seeds pooled)", fontsize="small")
    fig.tight_layout()
    fig.savefig(SIZES_PNG, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    s, tasks, runs = result["summary"], result["tasks"], result["runs"]
    window = max(1, tasks // 10)
    overhead = np.mean([r["tracker_seconds"] / r["tracker_records"] for r in runs]) * 1e3
    share = np.mean([r["tracker_seconds"] / r["seconds"] for r in runs]) * 100
    lines = [
        f"<!-- {NAME} -->",
        "## Continual learning on Fashion-MNIST (`continual.py`)",
        "",
        f"{tasks} binary tasks (random class pair, random label order), MLP 196-{HIDDEN}-{HIDDEN}-2 (ReLU, "
        f"14x14 inputs), output layer reset per task, {TRAIN_PER_CLASS} training images per class, "
        f"{result['epochs']} epochs of batch {BATCH}, SGD lr {result['lr']:g} momentum {MOMENTUM}; tested on {TEST_PER_CLASS} test images "
        f"per class. Replacement rate {REPLACEMENT_RATE:g} per mature neuron and step, maturity {MATURITY} steps; "
        f"continual backprop utility decay {DECAY}; symmetry breaking covers at eps {EPS:g}, recomputed every "
        f"{RECOMPUTE_EVERY} steps. Seeds {', '.join(map(str, result['seeds']))}: mean ± std over seeds.",
        "",
        f"| method | first {window} tasks | last {window} tasks | last − first | all tasks | covers (layer 2, "
        f"last task) | dead units (last) | neurons re-seeded | seconds/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        m = s[method]
        lines.append(
            f"| {method.replace('_', ' ')} | {m['first'][0]:.3f} ± {m['first'][1]:.3f} | "
            f"{m['last'][0]:.3f} ± {m['last'][1]:.3f} | {m['change'][0]:+.3f} ± {m['change'][1]:.3f} | "
            f"{m['all'][0]:.3f} ± {m['all'][1]:.3f} | {m['covers_last']:.1f} | {m['dead_last'] * 100:.1f}% | "
            f"{m['replaced']:.0f} | {m['seconds']:.0f} |")
    lines += [
        "",
        f"Cover tracker overhead: {overhead:.1f} ms per record (export + analysis of the whole model), "
        f"{share:.1f}% of the training time at one record per task.",
        "",
        f"![accuracy per task]({ACCURACY_PNG.relative_to(HERE).as_posix()})",
        f"![covers per task]({COVERS_PNG.relative_to(HERE).as_posix()})",
        f"![cover sizes]({SIZES_PNG.relative_to(HERE).as_posix()})",
        "",
        result["finding"],
        "",
        f"Generated by `python benchmarks/continual.py` in {result['seconds']:.0f} s "
        f"({result['platform']}).",
        f"<!-- /{NAME} -->",
    ]
    return "\n".join(lines)


def finding(summary: dict) -> str:
    """One sentence per claim, read off the numbers (never written by hand)."""
    sgd, cbp, sb = (summary[m] for m in METHODS)

    def trend(m: dict) -> str:
        change, spread = m["change"]
        if abs(change) <= spread:
            return f"stays level ({change:+.3f} ± {spread:.3f})"
        return f"{'improves' if change > 0 else 'declines'} ({change:+.3f} ± {spread:.3f})"

    return (f"From the first to the last tenth of the sequence, plain SGD {trend(sgd)}, continual backprop "
            f"{trend(cbp)} and symmetry breaking {trend(sb)}. The paper's claim (SGD loses plasticity while "
            f"symmetry breaking keeps improving) "
            + ("holds here." if sgd["change"][0] < 0 < sb["change"][0] and sb["last"][0] > sgd["last"][0]
               else "is not reproduced at this scale."))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=TASKS)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    args = parser.parse_args(argv)
    if fashion_mnist_missing():
        return 2
    start = time.perf_counter()
    data = load_data()
    jobs = [(method, seed) for seed in args.seeds for method in METHODS]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run, method, seed, args.tasks, data, args.epochs, args.lr) for method, seed in jobs]
        runs = []
        for future in futures:
            runs.append(future.result())
            print(f"{runs[-1]['method']} seed {runs[-1]['seed']}: {runs[-1]['seconds']:.0f} s", file=sys.stderr)
    summary = summarize(runs, args.tasks)
    result = {"tasks": args.tasks, "seeds": args.seeds, "epochs": args.epochs, "lr": args.lr, "summary": summary,
              "finding": finding(summary), "runs": runs, "seconds": time.perf_counter() - start,
              "platform": f"{platform.machine()}, {platform.python_version()}"}
    section = markdown(result)
    print(section)
    if not args.no_write:
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(result, indent=1))
        plot(runs, args.tasks)
        write_section(NAME, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
