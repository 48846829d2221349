"""Continual learning where plain SGD loses plasticity: SGD vs continual backprop, shrink and
perturb, L2 towards the initial weights and symmetry breaking (issue 15).

    python benchmarks/continual.py                    # the full run (budget below)
    python benchmarks/continual.py --quick --out DIR  # seconds: every regime and method, tiny
    python benchmarks/continual.py --regimes permuted --seeds 0 1 --tasks 40

Regimes, each a sequence of tasks learnt one after the other by one network (plain SGD, no
momentum, the regime's step size and batch; everything carries over between tasks):

* ``permuted``: online permuted Fashion-MNIST (Dohare et al.'s online permuted MNIST). Each task
  a fresh fixed pixel permutation of a fresh sample of training images, seen once; 10 classes;
  the task's score is the online accuracy (each batch scored before the step on it).
* ``random_labels``: random-label Fashion-MNIST (Kumar et al. 2023, Lyle et al. 2023). A fixed
  small subset of training images gets a fresh random labelling per task, memorised for several
  epochs; the score is the accuracy on that labelling at the end of the task.
* ``class_pairs``: the class-incremental pairs task (the paper's Sec. 11.3 at CPU scale): each
  task a random pair of classes in random label order; the output layer is reset per task; the
  score is the accuracy on the pair's test images.
* ``bit_flipping``: slowly-changing regression (Dohare et al.'s bit-flipping problem): the
  target is a fixed random network of linear threshold units on 20 bits; 15 bits are constant
  within a task and one of them flips at each new task, 5 are random per sample; the score is
  the online mean squared error (lower is better).

The Fashion-MNIST learner is a 784-100-100-out ReLU MLP (the issue's pilot); the regression
learner a 20-100-100-1 one. Methods: ``sgd``; ``continual_backprop`` (utility-based
replacement; Dohare et al.'s published decay 0.99 and maturity 100, replacement rates around
their 1e-4); ``shrink_perturb`` (weight decay and Gaussian noise every step);
``l2_init`` (pull towards the initial weights); ``symmetry_breaking`` (covers at a cosine
tolerance, recomputed at a period, broken on continual backprop's schedule: rate 1e-4, maturity
100). Every method but SGD gets the same sweep: three settings (``SWEEP``), the first its
declared default (the literature's where there is one); the headline figure of a method is its
default, fixed before any run (no method is tuned on the results); the sweep is reported beside.

Per task and hidden layer the run records the fraction of dead and always-active units and the
effective rank on a probe batch of the task's inputs, and every ``COVER_EVERY`` tasks the covers
at ONE fixed tolerance (``TRACK_EPS``) with the core's analysis (``CoverTracker``), the same for
every method. CPU time
per training step (``time.process_time`` in the worker, training and the method's own work,
without the figures) is reported per method.

Budget of the full run: 4 regimes x 13 settings x 5 seeds = 260 runs of 12,500-15,000 steps;
at the 1.5-2 CPU ms per step measured for plain SGD and about 2x that for symmetry breaking
(one analysis every 100 steps), about 2 CPU hours, an hour on 2 idle cores (``--workers 2``).
``--regimes``, ``--settings``, ``--seeds`` and ``--tasks`` run part of it; ``--label`` says so in
the outputs.

Outputs (under ``--out``, default ``benchmarks/results``): ``continual.json`` (key ``regimes``),
``continual_<regime>.png`` (per-task curves), ``continual_cover_sizes.png`` and, for the default
output, the ``continual`` section of ``RESULTS.md``. Each finished run is appended to
``--runs`` (JSON lines) as it ends, so an interrupted run can be summarised with
``--summarize``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fashion_mnist  # noqa: E402
from sections import fashion_mnist_missing, write_section  # noqa: E402

NAME = "continual"
RESULTS = HERE / "results"
SEEDS = (0, 1, 2, 3, 4)
TRACK_EPS = 0.2  # the one tolerance covers are counted at, for every method
PROBE = 500
REPLACEMENT_RATE, MATURITY, DECAY = 1e-4, 100, 0.99  # Dohare et al. 2024 (online permuted MNIST)
METHODS = ("sgd", "continual_backprop", "shrink_perturb", "l2_init", "symmetry_breaking")
COVER_EVERY = 5  # tasks between cover counts (and the last task): one analysis costs 0.1-0.2 CPU s
# Each method's settings; the first is its declared default (the literature's, where there is
# one), the headline figure; the others are the sweep every method gets alike.
SWEEP: dict[str, list[dict]] = {
    "sgd": [{}],
    "continual_backprop": [{"rate": 1e-4}, {"rate": 1e-3}, {"rate": 1e-5}],
    "shrink_perturb": [{"weight_decay": 1e-4, "noise": 1e-4}, {"weight_decay": 1e-3, "noise": 1e-4},
                       {"weight_decay": 1e-4, "noise": 1e-5}],
    "l2_init": [{"strength": 1e-3}, {"strength": 1e-2}, {"strength": 1e-4}],
    "symmetry_breaking": [{"eps": 0.2, "every": 100}, {"eps": 0.5, "every": 100}, {"eps": 0.2, "every": 400}],
}


@dataclass(frozen=True)
class Regime:
    """One task sequence: its learner, step size, length (full and ``--quick``) and score."""

    name: str
    title: str
    inputs: int
    outputs: int
    lr: float
    batch: int
    tasks: int
    quick_tasks: int
    score: str  # what a task's score is
    higher_is_better: bool = True
    hidden: tuple[int, ...] = (100, 100)


REGIMES = {
    "permuted": Regime("permuted", "Online permuted Fashion-MNIST", 784, 10, 0.1, 16, 100, 3, "online accuracy"),
    "random_labels": Regime("random_labels", "Random-label Fashion-MNIST", 784, 10, 0.1, 16, 40, 3,
                            "accuracy on the task's labelling after training"),
    "class_pairs": Regime("class_pairs", "Fashion-MNIST class pairs", 784, 2, 0.1, 16, 100, 3,
                          "test accuracy on the pair"),
    "bit_flipping": Regime("bit_flipping", "Slowly-changing regression (bit flipping)", 20, 1, 0.01, 16, 60, 3,
                           "online mean squared error", higher_is_better=False),
}
# Per-task sizes: full run, --quick.
PERMUTED_IMAGES = (2000, 160)
RANDOM_SUBSET, RANDOM_EPOCHS = (512, 64), (10, 2)
PAIR_TRAIN, PAIR_TEST, PAIR_EPOCHS = (200, 20), 500, (5, 1)
BIT_STEPS, BIT_FLIPPING, BIT_TARGET_HIDDEN = (250, 20), 15, 100


@dataclass
class Task:
    """One task: its training batches (each epoch in a fresh order), a probe batch, and how it is
    scored (``online``: the mean of the per-batch figure before each step; else ``evaluate``)."""

    x: np.ndarray
    y: np.ndarray
    epochs: int
    probe: np.ndarray
    online: bool
    test: tuple[np.ndarray, np.ndarray] | None = None


_DATA: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST as uint8 pixels (784 per image) and int64 labels, read once per process
    (``pixels`` makes float32 in [0, 1] of a selection)."""
    if not _DATA:
        for split in ("train", "test"):
            images, labels = fashion_mnist.load(split)
            _DATA[split] = (images.reshape(len(images), -1), labels.astype(np.int64))
    return _DATA


def pixels(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def tasks(regime: Regime, seed: int, count: int, quick: bool) -> Iterator[Task]:
    """The regime's task sequence for ``seed`` (the same for every method)."""
    rng = np.random.default_rng(10_000 + seed)
    q = int(quick)
    if regime.name == "bit_flipping":
        yield from _bit_flipping(rng, count, BIT_STEPS[q] * regime.batch)
        return
    (x_train, y_train), (x_test, y_test) = data()["train"], data()["test"]
    if regime.name == "permuted":
        for _ in range(count):
            perm = rng.permutation(784)
            idx = rng.choice(len(x_train), PERMUTED_IMAGES[q], replace=False)
            x = pixels(x_train[idx][:, perm])
            yield Task(x, y_train[idx], 1, x[:PROBE], online=True)
    elif regime.name == "random_labels":
        idx = rng.choice(len(x_train), RANDOM_SUBSET[q], replace=False)
        x = pixels(x_train[idx])
        for _ in range(count):
            yield Task(x, rng.integers(0, 10, len(x)), RANDOM_EPOCHS[q], x[:PROBE], online=False, test=None)
    elif regime.name == "class_pairs":
        by_train = [np.flatnonzero(y_train == c) for c in range(10)]
        by_test = [np.flatnonzero(y_test == c) for c in range(10)]
        for _ in range(count):
            pair = rng.choice(10, size=2, replace=False)
            tr = np.concatenate([rng.choice(by_train[c], PAIR_TRAIN[q], replace=False) for c in pair])
            te = np.concatenate([by_test[c][:PAIR_TEST] for c in pair])
            x = pixels(x_train[tr])
            yield Task(x, (y_train[tr] == pair[1]).astype(np.int64), PAIR_EPOCHS[q], x[:PROBE],
                       online=False, test=(pixels(x_test[te]), (y_test[te] == pair[1]).astype(np.int64)))
    else:
        raise ValueError(f"unknown regime {regime.name!r}")


def _bit_flipping(rng: np.random.Generator, count: int, samples: int) -> Iterator[Task]:
    """Dohare et al.'s target: 20 input bits (the first ``BIT_FLIPPING`` slowly changing),
    ``BIT_TARGET_HIDDEN`` linear threshold units with weights +-1 and thresholds set so a unit
    fires when most of its weighted bits agree, output weights +-1."""
    m = 20
    w = rng.choice([-1.0, 1.0], size=(m + 1, BIT_TARGET_HIDDEN))  # last row: bias input
    threshold = 0.6 * (m + 1) - (w < 0).sum(0)  # beta = 0.6, as in Dohare et al.
    v = rng.choice([-1.0, 1.0], size=BIT_TARGET_HIDDEN)
    slow = rng.integers(0, 2, BIT_FLIPPING).astype(np.float32)
    for _ in range(count):
        flip = rng.integers(BIT_FLIPPING)
        slow[flip] = 1.0 - slow[flip]
        fast = rng.integers(0, 2, (samples, m - BIT_FLIPPING)).astype(np.float32)
        x = np.concatenate([np.broadcast_to(slow, (samples, BIT_FLIPPING)), fast], axis=1)
        hidden = (np.concatenate([x, np.ones((samples, 1), np.float32)], axis=1) @ w > threshold).astype(np.float32)
        y = (hidden @ v).astype(np.float32)[:, None]
        yield Task(x, y, 1, x[:PROBE], online=True)


def make_helper(method: str, setting: dict, model, example, optimizer, lr: float, seed: int):
    """The method's per-step helper (None for plain SGD)."""
    from onnxfib.train import ContinualBackprop, SymmetryBreaker
    from onnxfib.train.plasticity import L2Init, ShrinkPerturb

    if method == "sgd":
        return None
    if method == "continual_backprop":
        return ContinualBackprop(model, example, optimizer=optimizer, replacement_rate=setting["rate"],
                                 maturity=MATURITY, decay=DECAY, seed=seed)
    if method == "shrink_perturb":
        return ShrinkPerturb(model, shrink=lr * setting["weight_decay"], noise=setting["noise"], seed=seed)
    if method == "l2_init":
        return L2Init(model, pull=lr * setting["strength"])
    if method == "symmetry_breaking":
        return SymmetryBreaker(model, example, optimizer=optimizer, eps=setting["eps"], every=setting["every"],
                               replacement_rate=REPLACEMENT_RATE, maturity=MATURITY, seed=seed)
    raise ValueError(f"unknown method {method!r}")


def checkpoints(count: int) -> list[int]:
    """Tasks whose cover size distribution is kept (first, quarters, last)."""
    return sorted({0, count // 4, count // 2, 3 * count // 4, count - 1})


def run(regime_name: str, method: str, setting_index: int, seed: int, count: int, quick: bool) -> dict:
    """Train one setting of one method on one seed's task sequence; per-task figures."""
    import torch
    from torch import nn

    from onnxfib.train import CoverTracker
    from onnxfib.train.plasticity import effective_rank, unit_activity

    regime = REGIMES[regime_name]
    setting = SWEEP[method][setting_index]
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    widths = (regime.inputs, *regime.hidden)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], regime.outputs))
    head = model[-1]
    hidden_names = [str(i) for i in range(0, 2 * len(regime.hidden), 2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=regime.lr)
    example = torch.zeros(1, regime.inputs)
    helper = make_helper(method, setting, model, example, optimizer, regime.lr, seed)
    tracker = CoverTracker(model, example, eps=TRACK_EPS)
    regression = not regime.higher_is_better
    loss_fn = nn.MSELoss() if regression else nn.CrossEntropyLoss()
    scores: list[float] = []
    figures: dict[str, list[list[float]]] = {k: [[] for _ in hidden_names] for k in ("dead", "active", "rank", "covers")}
    cover_sizes: dict[str, list[list[int]]] = {}
    replaced: list[int] = []
    cover_tasks: list[int] = []
    train_cpu, steps = 0.0, 0
    for index, task in enumerate(tasks(regime, seed, count, quick)):
        if regime.name == "class_pairs":  # a fresh output layer per task
            with torch.no_grad():
                bound = 1.0 / math.sqrt(head.in_features)
                head.weight.uniform_(-bound, bound)
                head.bias.uniform_(-bound, bound)
        before = getattr(helper, "replaced", 0)
        xs, ys = torch.from_numpy(task.x), torch.from_numpy(task.y)
        online = []
        start = time.process_time()
        model.train()
        for _ in range(task.epochs):
            order = torch.from_numpy(rng.permutation(len(xs)))
            for batch in order.split(regime.batch):
                out = model(xs[batch])
                loss = loss_fn(out, ys[batch])
                if task.online:
                    online.append(float(loss) if regression else float((out.argmax(1) == ys[batch]).float().mean()))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if helper is not None:
                    helper.step()
                steps += 1
        train_cpu += time.process_time() - start
        model.eval()
        with torch.no_grad():
            if task.online:
                scores.append(float(np.mean(online)))
            else:
                tx, ty = task.test if task.test is not None else (task.x, task.y)
                scores.append(float((model(torch.from_numpy(tx)).argmax(1) == torch.from_numpy(ty)).float().mean()))
            h = torch.from_numpy(task.probe)
            for k, layer in enumerate(model):
                h = layer(h)
                if isinstance(layer, nn.ReLU):
                    features = h.double().numpy()
                    dead, active = unit_activity(features)
                    figures["dead"][k // 2].append(dead)
                    figures["active"][k // 2].append(active)
                    figures["rank"][k // 2].append(effective_rank(features))
                    if k // 2 == len(hidden_names) - 1:
                        break
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise FloatingPointError(f"{regime_name} {method} {setting}, seed {seed}: weights not finite after task {index}")
        if index % COVER_EVERY == 0 or index in checkpoints(count):
            records = {r.layer: r for r in tracker.record(index)}
            for k, name in enumerate(hidden_names):
                figures["covers"][k].append(records[name].covers)
            cover_tasks.append(index)
            if index in checkpoints(count):
                cover_sizes[str(index)] = [records[name].cover_sizes for name in hidden_names]
        replaced.append(getattr(helper, "replaced", 0) - before)
    if helper is not None and hasattr(helper, "remove"):
        helper.remove()
    return {"regime": regime_name, "method": method, "setting": setting_index, "seed": seed, "scores": scores,
            **figures, "cover_tasks": cover_tasks, "cover_sizes": cover_sizes, "replaced": replaced, "steps": steps,
            "train_cpu_seconds": train_cpu, "cpu_ms_per_step": 1e3 * train_cpu / max(steps, 1),
            "tracker_seconds": tracker.seconds}


def interval(values) -> list[float]:
    """Mean and 95% t-interval ``[mean, low, high]`` over seeds (the mean twice for one seed)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return [mean, mean, mean]
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return [mean, mean - half, mean + half]


def worse(regime: Regime, a: list[float], b: list[float]) -> bool:
    """Whether interval ``a`` lies wholly on the worse side of interval ``b`` (no overlap)."""
    return a[2] < b[1] if regime.higher_is_better else a[1] > b[2]


def tenths(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed means of the first and the last tenth of the tasks (at least one task each)."""
    window = max(1, scores.shape[1] // 10)
    return scores[:, :window].mean(1), scores[:, -window:].mean(1)


def summarize_setting(regime: Regime, runs: list[dict]) -> dict:
    """Figures of one setting over its seeds (runs sorted by seed)."""
    scores = np.array([r["scores"] for r in runs])
    first, last = tenths(scores)
    per_layer = {k: [interval([r[k][layer][-1] for r in runs]) for layer in range(len(runs[0][k]))]
                 for k in ("dead", "active", "rank", "covers")}
    return {
        "seeds": [r["seed"] for r in runs],
        "first_per_seed": first.tolist(), "last_per_seed": last.tolist(),
        "first": interval(first), "last": interval(last), "all": interval(scores.mean(1)),
        "declines": worse(regime, interval(last), interval(first)),
        "last_task": per_layer,
        "replaced": float(np.mean([sum(r["replaced"]) for r in runs])),
        "cpu_ms_per_step": float(np.mean([r["cpu_ms_per_step"] for r in runs])),
        "tracker_ms_per_record": 1e3 * float(np.mean([r["tracker_seconds"] / len(r["cover_tasks"]) for r in runs])),
    }


def summarize(runs: list[dict], regime_names: list[str]) -> dict:
    """The ``regimes`` entry of continual.json: per regime, every setting of every method that
    ran (``sweep``), each method's headline (its default setting, ``methods``), SGD's decline and
    the verdict."""
    out = {}
    for name in regime_names:
        regime = REGIMES[name]
        mine = [r for r in runs if r["regime"] == name]
        if not mine:
            continue
        settings: dict[str, list[dict]] = {}
        for method in METHODS:
            found = []
            for index, setting in enumerate(SWEEP[method]):
                chosen = sorted((r for r in mine if r["method"] == method and r["setting"] == index),
                                key=lambda r: r["seed"])
                if chosen:
                    found.append({"setting": setting, "index": index, **summarize_setting(regime, chosen)})
            if found:
                settings[method] = found
        best = {m: found[0] for m, found in settings.items() if found[0]["index"] == 0}
        entry = {"title": regime.title, "score": regime.score, "higher_is_better": regime.higher_is_better,
                 "tasks": len(mine[0]["scores"]), "lr": regime.lr, "batch": regime.batch,
                 "network": "-".join(map(str, (regime.inputs, *regime.hidden, regime.outputs))),
                 "sweep": settings, "methods": best}
        if "sgd" in best:
            entry["sgd_loses_plasticity"] = bool(best["sgd"]["declines"])
        entry["verdict"] = verdict(regime, best)
        out[name] = entry
    return out


def verdict(regime: Regime, best: dict) -> str:
    """One line on symmetry breaking against continual backprop, read off the intervals."""
    if "symmetry_breaking" not in best or "continual_backprop" not in best:
        return "symmetry breaking or continual backprop was not run"
    sb, cbp = best["symmetry_breaking"], best["continual_backprop"]
    fmt = "{:.3f} [{:.3f}, {:.3f}]".format
    figures = f"last tenth {fmt(*sb['last'])} vs {fmt(*cbp['last'])}"
    if worse(regime, sb["last"], cbp["last"]):
        head = "continual backprop beats symmetry breaking"
    elif worse(regime, cbp["last"], sb["last"]):
        head = "symmetry breaking beats continual backprop"
    else:
        head = "symmetry breaking and continual backprop are indistinguishable"
    keeps = "declines" if sb["declines"] else "does not decline"
    return f"{head} ({figures}); symmetry breaking {keeps} from first to last tenth"


COLORS = {"sgd": "tab:blue", "continual_backprop": "tab:red", "shrink_perturb": "tab:green",
          "l2_init": "tab:purple", "symmetry_breaking": "tab:olive"}


def plot(runs: list[dict], summary: dict, out: Path) -> list[Path]:
    """Per regime: the headline settings' per-task score, dead units, effective rank and covers
    (last hidden layer; mean and 95% band over seeds), and the cover sizes at the checkpoints."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, entry in summary.items():
        count = entry["tasks"]
        fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
        panels = (("scores", entry["score"]), ("dead", "dead units, last hidden layer"),
                  ("rank", "effective rank, last hidden layer"), ("covers", f"covers at eps {TRACK_EPS:g}, last hidden layer"))
        for method, best in entry["methods"].items():
            chosen = sorted((r for r in runs if r["regime"] == name and r["method"] == method
                             and r["setting"] == best["index"]), key=lambda r: r["seed"])
            for ax, (key, label) in zip(axes, panels):
                values = np.array([r[key] if key == "scores" else r[key][-1] for r in chosen], dtype=np.float64)
                if key == "covers":
                    x = np.array(chosen[0]["cover_tasks"]) + 1.0
                else:
                    bins = max(1, count // 25)
                    values = values[:, : count // bins * bins].reshape(len(values), -1, bins).mean(2)
                    x = (np.arange(values.shape[1]) + 0.5) * bins
                band = np.array([interval(values[:, j]) for j in range(values.shape[1])])
                ax.plot(x, band[:, 0], color=COLORS[method], label=method.replace("_", " "))
                ax.fill_between(x, band[:, 1], band[:, 2], color=COLORS[method], alpha=0.2)
                ax.set_xlabel("task")
                ax.set_ylabel(label, fontsize="small")
        axes[0].legend(fontsize="small")
        fig.suptitle(f"{entry['title']}: {entry['network']} ReLU, SGD {entry['lr']:g}, batch {entry['batch']}; "
                     "default setting per method, band: 95% interval over seeds", fontsize="small")
        fig.tight_layout()
        path = out / f"{NAME}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        marks = checkpoints(count)
        mine = {m: [r for r in runs if r["regime"] == name and r["method"] == m and r["setting"] == b["index"]]
                for m, b in entry["methods"].items()}
        largest = max(max(s[-1]) for rs in mine.values() for r in rs for s in r["cover_sizes"].values())
        fig, axes = plt.subplots(len(mine), len(marks), figsize=(2.4 * len(marks), 1.7 * len(mine)),
                                 sharex=True, sharey=True, squeeze=False)
        for row, (method, chosen) in enumerate(mine.items()):
            for col, task in enumerate(marks):
                sizes = [s for r in chosen for s in r["cover_sizes"][str(task)][-1]]
                axes[row][col].hist(sizes, bins=np.arange(1, largest + 2) - 0.5, color=COLORS[method])
                axes[row][col].set_yscale("log")
                if row == 0:
                    axes[row][col].set_title(f"after task {task + 1}", fontsize="small")
            axes[row][0].set_ylabel(method.replace("_", " "), fontsize="x-small")
        for ax in axes[-1]:
            ax.set_xlabel("cover size")
        fig.suptitle(f"{entry['title']}: cover sizes in the last hidden layer at eps {TRACK_EPS:g} "
                     "(seeds pooled, log count)", fontsize="small")
        fig.tight_layout()
        path = out / f"{NAME}_{name}_cover_sizes.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def describe(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.0e}"


def per_layer(figures: dict, key: str, scale: float = 1.0, form: str = "{:.0f}") -> str:
    """A last-task figure's means, one per hidden layer, as ``a / b``."""
    return " / ".join(form.format(v[0] * scale) for v in figures[key])


def markdown(result: dict) -> str:
    """The ``continual`` section of RESULTS.md, read off the summary."""
    fmt = "{:.3f} [{:.3f}, {:.3f}]".format
    lines = [f"<!-- {NAME} -->", "## Continual learning where plasticity is lost (`continual.py`)", "",
             result["label"], "",
             f"Plain SGD (no momentum) for every method within a regime; continual backprop: decay {DECAY}, "
             f"maturity {MATURITY}; symmetry breaking: replacement rate {REPLACEMENT_RATE:g}, maturity {MATURITY}. "
             f"Covers counted at eps {TRACK_EPS:g} for every method. Figures: mean [95% interval over seeds] of the "
             "per-seed mean over the first and the last tenth of the tasks; a method's headline is its default "
             "setting, declared before any run; the other settings are in the sweep table.", ""]
    for name, entry in result["regimes"].items():
        lines += [f"### {entry['title']} ({entry['tasks']} tasks, {entry['network']}, SGD {entry['lr']:g}, "
                  f"batch {entry['batch']}; score: {entry['score']})", "",
                  f"Plain SGD loses plasticity: **{entry.get('sgd_loses_plasticity')}**. Verdict: {entry['verdict']}.", "",
                  "| method (default setting) | first tenth | last tenth | all tasks | dead units L1 / L2 (last task) | "
                  "always active L1 / L2 | effective rank L1 / L2 | covers L1 / L2 | re-seeded | CPU ms/step |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        sgd_ms = entry["methods"].get("sgd", {}).get("cpu_ms_per_step")
        for method, m in entry["methods"].items():
            pair = partial(per_layer, m["last_task"])
            setting = ", ".join(f"{k} {describe(v)}" for k, v in m["setting"].items()) or "-"
            ratio = f" ({m['cpu_ms_per_step'] / sgd_ms:.2f}x)" if sgd_ms else ""
            lines.append(f"| {method.replace('_', ' ')} ({setting}) | {fmt(*m['first'])} | {fmt(*m['last'])} | "
                         f"{fmt(*m['all'])} | {pair('dead', 100)}% | {pair('active', 100)}% | "
                         f"{pair('rank', 1.0, '{:.1f}')} | {pair('covers')} | {m['replaced']:.0f} | "
                         f"{m['cpu_ms_per_step']:.2f}{ratio} |")
        lines += ["", "Sweep (all settings, same seeds):", "", "| method | setting | first tenth | last tenth | all tasks |",
                  "|---|---|---|---|---|"]
        for method, found in entry["sweep"].items():
            for f in found:
                setting = ", ".join(f"{k} {describe(v)}" for k, v in f["setting"].items()) or "-"
                lines.append(f"| {method.replace('_', ' ')} | {setting} | {fmt(*f['first'])} | {fmt(*f['last'])} | "
                             f"{fmt(*f['all'])} |")
        lines += ["", f"![{name}](results/{NAME}_{name}.png)", f"![{name} cover sizes](results/{NAME}_{name}_cover_sizes.png)", ""]
    cpu = sum(r["train_cpu_seconds"] for r in result["runs"])
    lines += [f"Generated by `{result['command']}`: {len(result['runs'])} runs, {cpu:.0f} CPU s of training in all, "
              f"{result['seconds']:.0f} s wall for this command ({result['platform']}).",
              f"<!-- /{NAME} -->"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--tasks", type=int, help="tasks per regime (default: each regime's own)")
    parser.add_argument("--settings", type=int, nargs="+", help="indices into each method's SWEEP (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny tasks, 2 seeds, default setting of each method")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for continual.json and the plots")
    parser.add_argument("--runs", type=Path, nargs="+", help="JSON-lines file each finished run is appended to "
                        "(the first); with --summarize, all are read")
    parser.add_argument("--summarize", action="store_true", help="summarise the runs already in --runs, run nothing")
    parser.add_argument("--no-write", action="store_true", help="print the section, write nothing")
    parser.add_argument("--label", default="", help="what was run, if not the documented budget")
    args = parser.parse_args(argv)
    if set(args.regimes) - {"bit_flipping"} and not args.summarize and fashion_mnist_missing():
        return 2
    if args.summarize and (args.runs is None or not all(path.is_file() for path in args.runs)):
        print("--summarize needs existing --runs files", file=sys.stderr)
        return 2
    start = time.perf_counter()
    seeds = args.seeds[:2] if args.quick else args.seeds
    jobs = [(regime, method, index, seed, args.tasks or (REGIMES[regime].quick_tasks if args.quick else REGIMES[regime].tasks))
            for regime in args.regimes for method in args.methods
            for index in range(len(SWEEP[method]))
            if index in (args.settings if args.settings is not None else [0] if args.quick else [index])
            for seed in seeds]
    runs = []
    if args.summarize:
        found = {}
        for path in args.runs:
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    found[(r["regime"], r["method"], r["setting"], r["seed"])] = r
        runs = [r for r in found.values() if r["regime"] in args.regimes]
    else:
        if args.runs is not None:
            args.runs[0].parent.mkdir(parents=True, exist_ok=True)
        jobs.sort(key=lambda j: -(j[4] * (2 if j[1] == "symmetry_breaking" else 1)))  # long runs first
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            futures = [pool.submit(run, *job, args.quick) for job in jobs]
            for future in as_completed(futures):  # each run written as soon as it ends
                runs.append(future.result())
                r = runs[-1]
                if args.runs is not None:
                    with args.runs[0].open("a") as handle:
                        handle.write(json.dumps(r) + "\n")
                print(f"{r['regime']} {r['method']} {SWEEP[r['method']][r['setting']]} seed {r['seed']}: "
                      f"{r['train_cpu_seconds']:.0f} CPU s", file=sys.stderr, flush=True)
    runs.sort(key=lambda r: (r["regime"], r["method"], r["setting"], r["seed"]))
    summary = summarize(runs, args.regimes)
    label = args.label or ("`--quick`: tiny tasks, 2 seeds, one setting per method; a smoke test, no figures to read."
                           if args.quick else "The documented full run.")
    command = "python benchmarks/continual.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    result = {"regimes": summary, "label": label, "track_eps": TRACK_EPS, "quick": args.quick, "seeds": seeds,
              "sweep": SWEEP, "command": command, "seconds": time.perf_counter() - start,
              "platform": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "runs": runs}
    section = markdown(result)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=1))
        plot(runs, summary, args.out)
        if args.out.resolve() == RESULTS.resolve():
            write_section(NAME, section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
