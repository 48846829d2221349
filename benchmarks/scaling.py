"""Scaling: validation loss against non-embedding parameters for a small transformer language
model, (a) trained from scratch at each size and (b) one large model collapsed and retrained
down the ladder with ``onnxfib.train.collapse_retrain`` (the paper's Algorithm 1, Sec. 11.4).

    python benchmarks/scaling.py            # about 3 CPU-minutes (measured: 178 CPU s; 42 min wall at load 45)
    python benchmarks/scaling.py --quick    # seconds: the structure, on a sliver of the data

Data: real text available offline from Debian packages, the glosses (definitions and examples)
of WordNet 3.0 (``wordnet-base``: ``/usr/share/wordnet/data.*``) and every fortune cookie file in
``/usr/share/games/fortunes`` (``fortunes``, or ``fortunes-min`` alone), split by document (gloss or fortune) into
train / validation / test (90 / 5 / 5 %, seeded). Tokenizer: UTF-8 bytes (256 symbols), stated
as such; no tokenizer is downloaded. Model: a causal ``nn.TransformerEncoder`` LM (byte and
position embeddings, ``LAYERS`` encoder layers of width ``D_MODEL`` with ReLU feed-forward
blocks, a final LayerNorm and a byte head). The ladder varies the feed-forward width at a fixed
residual width: what the collapse narrows (``FeedForwardLayers``: the residual stream and the
attention heads keep their widths), so both curves are the same family of models. Non-embedding
parameters: all but the byte and position embeddings (Kaplan et al.).

(a) every size is trained with Adam until early stopping on the validation split (or the step
cap); (b) the largest size, trained the same way, is collapsed at the greedy per-block
thresholds raised by 5 % and retrained to early stopping, round after round, until the
validation loss exceeds the trained model's by more than the tolerance. Each curve gets a power
law L = c N^-alpha fitted per seed (least squares on log-log), alpha reported as the mean with a
95 % t-interval over the seeds. The test split is only reported, never used for a decision.
Writes ``results/scaling.json``, ``results/scaling.png`` and the ``scaling`` section of
``RESULTS.md``; ``--json`` and ``--no-write`` for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sections import write_section  # noqa: E402

NAME = "scaling"
WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
PLOT_PNG = HERE / "results" / f"{NAME}.png"


@dataclass(frozen=True)
class Setup:
    """Everything a run depends on."""

    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    seeds: tuple[int, ...] = (0, 1, 2)
    d_model: int = 32
    heads: int = 4
    layers: int = 2
    context: int = 32
    batch: int = 16
    lr: float = 3e-3
    every: int = 50  # validation checks of early stopping
    patience: int = 2
    max_steps: int = 300
    retrain_every: int = 25
    retrain_patience: int = 2
    retrain_max_steps: int = 150
    tolerance: float = 0.05
    raise_by: float = 0.05
    slack: float = 0.01
    max_rounds: int = 5
    val_windows: int = 64
    train_bytes: int = 0  # 0: all of the training text


QUICK = Setup(widths=(8, 16, 32), seeds=(0, 1), d_model=16, heads=2, layers=1, context=16, batch=8, every=10,
              patience=1, max_steps=20, retrain_every=5, retrain_patience=1, retrain_max_steps=10, max_rounds=2,
              val_windows=8, train_bytes=20_000)


def documents() -> list[str]:
    """WordNet glosses and fortunes, one document each."""
    docs = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{part}").read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith("  ") and " | " in line:
                docs.append(line.split(" | ", 1)[1].strip())
    for path in sorted(FORTUNES.iterdir()):
        if path.is_file() and not path.suffix and not path.is_symlink():
            docs += [d.strip() for d in path.read_text(encoding="utf-8", errors="replace").split("\n%\n") if d.strip()]
    return docs


def splits(docs: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Byte arrays of the train / val / test documents (90 / 5 / 5 %, shuffled by ``seed``)."""
    order = np.random.default_rng(seed).permutation(len(docs))
    cut = [int(0.9 * len(docs)), int(0.95 * len(docs))]
    parts = {"train": order[:cut[0]], "val": order[cut[0]:cut[1]], "test": order[cut[1]:]}
    return {k: np.frombuffer("\n".join(docs[i] for i in v).encode("utf-8"), dtype=np.uint8) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long run on a sliver of the data")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 2)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here instead")
    parser.add_argument("--no-write", action="store_true", help="print the section, write no file of the repository")
    args = parser.parse_args(argv)
    if not (WORDNET / "data.noun").exists() or not FORTUNES.is_dir():
        print("text corpora not found: apt-get install -y wordnet-base fortunes", file=sys.stderr)
        return 2
    setup = QUICK if args.quick else Setup()
    if args.seeds is not None:
        setup = replace(setup, seeds=tuple(range(args.seeds)))

    def save(data: dict) -> None:
        data["quick"] = args.quick
        if args.json is not None:
            args.json.write_text(json.dumps(data, indent=1))
        if not args.no_write:
            RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
            RESULTS_JSON.write_text(json.dumps(data, indent=1))
            plot(data, PLOT_PNG)
            write_section(NAME, markdown(data))

    print(markdown(run(setup, save)))
    return 0


def run(setup: Setup, save: Callable[[dict], None]) -> dict:
    """Both curves for every seed, and their fits; ``save`` gets the results after every seed
    (``seeds_done`` says how many: a partial run is labelled as such)."""
    import torch
    from torch import nn

    from onnxfib.train import EarlyStopping, FeedForwardLayers, collapse_retrain

    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), _cpu()
    text = splits(documents())
    train_bytes = text["train"] if not setup.train_bytes else text["train"][: setup.train_bytes]
    train = torch.from_numpy(train_bytes.astype(np.int64))
    windows = {k: _windows(torch.from_numpy(text[k].astype(np.int64)), setup.context, setup.val_windows)
               for k in ("val", "test")}
    loss_fn = nn.CrossEntropyLoss()

    def loss_on(model: nn.Module, split: str) -> float:
        model.eval()
        with torch.no_grad():
            x, y = windows[split]
            return float(loss_fn(model(x).reshape(-1, 256), y.reshape(-1)))

    def trainer(generator: torch.Generator, every: int, patience: int, max_steps: int) -> EarlyStopping:
        def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            starts = torch.randint(0, len(train) - setup.context - 1, (setup.batch,), generator=generator)
            offsets = starts[:, None] + torch.arange(setup.context + 1)
            chunk = train[offsets]
            optimizer.zero_grad()
            loss_fn(model(chunk[:, :-1]).reshape(-1, 256), chunk[:, 1:].reshape(-1)).backward()
            optimizer.step()
        return EarlyStopping(step, lambda m: loss_on(m, "val"), lambda p: torch.optim.Adam(p, lr=setup.lr),
                             every=every, patience=patience, max_steps=max_steps)

    scratch: list[dict] = []
    collapse: list[dict] = []
    for done, seed in enumerate(setup.seeds, 1):
        large = None
        for width in setup.widths:
            torch.manual_seed(seed)
            model = CharLM(setup, width)
            cpu = _cpu()
            steps = trainer(torch.Generator().manual_seed(seed), setup.every, setup.patience, setup.max_steps)(model)
            scratch.append({"seed": seed, "width": width, "params": non_embedding(model), "steps": steps,
                            "val_loss": loss_on(model, "val"), "test_loss": loss_on(model, "test"),
                            "cpu_s": _cpu() - cpu})
            print(f"scratch seed {seed} width {width}: {scratch[-1]}", file=sys.stderr, flush=True)
            if width == max(setup.widths):
                large = model  # the largest model from scratch is where the collapse starts
        assert large is not None
        cpu = _cpu()
        result = collapse_retrain(
            large, layers=FeedForwardLayers(), validate=lambda m: loss_on(m, "val"),
            retrain=trainer(torch.Generator().manual_seed(1000 + seed), setup.retrain_every, setup.retrain_patience,
                            setup.retrain_max_steps),
            tolerance=setup.tolerance, raise_by=setup.raise_by, slack=setup.slack, max_rounds=setup.max_rounds)
        points = [{"round": 0, "params": non_embedding(large), "val_loss": result.loss_before, "accepted": True,
                   "steps": 0}]
        for k, r in enumerate(result.rounds, 1):
            points.append({"round": k, "params": r.params - _embedding_params(large), "val_loss": r.loss_retrained,
                           "val_loss_collapsed": r.loss_collapsed, "accepted": r.accepted, "steps": r.retrain_steps})
        collapse.append({"seed": seed, "points": points, "stopped": result.stopped,
                         "final_widths": _ffn_widths(result.model),
                         "final_params": non_embedding(result.model), "final_val_loss": loss_on(result.model, "val"),
                         "final_test_loss": loss_on(result.model, "test"), "cpu_s": _cpu() - cpu})
        print(f"collapse seed {seed}: {collapse[-1]}", file=sys.stderr, flush=True)
        seeds = setup.seeds[:done]
        fits = {"scratch": [fit([(p["params"], p["val_loss"]) for p in scratch if p["seed"] == s]) for s in seeds],
                "collapse": [fit([(p["params"], p["val_loss"]) for p in c["points"]]) for c in collapse]}
        data = {"setup": setup.__dict__, "seeds_done": done, "corpus": {k: int(len(v)) for k, v in text.items()},
                "train_bytes_used": int(len(train)), "scratch": scratch, "collapse": collapse, "fits": fits,
                "alpha": {k: interval([f["alpha"] for f in v]) for k, v in fits.items()},
                "seconds": time.perf_counter() - start, "cpu_seconds": _cpu() - cpu_start,
                "platform": f"{platform.machine()}, {platform.python_version()}, torch threads 1",
                "load": os.getloadavg()[0]}
        save(data)
    return data


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _windows(tokens, context: int, count: int):
    """``count`` fixed, evenly spaced (input, target) windows of a split."""
    import torch
    starts = np.linspace(0, len(tokens) - context - 2, count).astype(np.int64)
    chunk = tokens[torch.from_numpy(starts)[:, None] + torch.arange(context + 1)]
    return chunk[:, :-1], chunk[:, 1:]


def fit(points: list[tuple[int, float]]) -> dict:
    """The power law L = c N^-alpha through ``points`` (least squares on log-log)."""
    n, loss = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    if len(points) < 2 or np.ptp(n) == 0:
        return {"alpha": float("nan"), "log_c": float("nan"), "points": len(points)}
    slope, intercept = np.polyfit(n, loss, 1)
    return {"alpha": float(-slope), "log_c": float(intercept), "points": len(points)}


def interval(values: list[float]) -> dict:
    """Mean and 95 % t-interval over seeds (NaN fits left out)."""
    from scipy import stats
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if finite.size < 2:
        mean = float(finite.mean()) if finite.size else float("nan")
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": int(finite.size)}
    half = float(stats.t.ppf(0.975, finite.size - 1) * finite.std(ddof=1) / np.sqrt(finite.size))
    return {"mean": float(finite.mean()), "low": float(finite.mean() - half), "high": float(finite.mean() + half),
            "n": int(finite.size)}


def _embedding_params(model) -> int:
    return int(model.embed.weight.numel() + model.position.numel())


def non_embedding(model) -> int:
    """Trainable scalars except the byte and position embeddings."""
    return int(sum(p.numel() for p in model.parameters())) - _embedding_params(model)


def _ffn_widths(model) -> list[int]:
    return [int(layer.linear1.out_features) for layer in model.stack.layers]


def CharLM(setup: Setup, width: int):  # noqa: N802 - builds the module class on first use (torch is optional)
    """A causal byte-level transformer LM with feed-forward width ``width``."""
    import torch
    from torch import nn

    class _CharLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(256, setup.d_model)
            self.position = nn.Parameter(torch.randn(setup.context, setup.d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(setup.d_model, setup.heads, width, dropout=0.0, batch_first=True)
            self.stack = nn.TransformerEncoder(layer, setup.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(setup.d_model)
            self.head = nn.Linear(setup.d_model, 256)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(setup.context))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = x.shape[1]
            hidden = self.stack(self.embed(x) + self.position[:t], mask=self.mask[:t, :t], is_causal=True)
            return self.head(self.norm(hidden))

    return _CharLM()


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colors = {"scratch": "tab:blue", "collapse": "tab:red"}
    for seed in data["setup"]["seeds"][: data["seeds_done"]]:
        rows = [p for p in data["scratch"] if p["seed"] == seed]
        ax.plot([p["params"] for p in rows], [p["val_loss"] for p in rows], "o-", color=colors["scratch"],
                alpha=0.6, label="trained from scratch" if seed == data["setup"]["seeds"][0] else None)
    for c in data["collapse"]:
        pts = c["points"]
        ax.plot([p["params"] for p in pts], [p["val_loss"] for p in pts], "s--", color=colors["collapse"], alpha=0.6,
                label="collapse–retrain (Algorithm 1)" if c["seed"] == data["setup"]["seeds"][0] else None)
        rejected = [p for p in pts if not p["accepted"]]
        ax.scatter([p["params"] for p in rejected], [p["val_loss"] for p in rejected], marker="x", color="black",
                   zorder=3, label="round beyond tolerance" if c["seed"] == data["setup"]["seeds"][0] else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title(f"alpha scratch {data['alpha']['scratch']['mean']:.3f}, "
                 f"collapse {data['alpha']['collapse']['mean']:.3f}", fontsize="small")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _alpha(a: dict) -> str:
    return f"{a['mean']:.3f} [{a['low']:.3f}, {a['high']:.3f}] (n={a['n']})"


def verdict(data: dict) -> str:
    """Whether collapse–retrain's exponent is steeper than from scratch, by the intervals."""
    s, c = data["alpha"]["scratch"], data["alpha"]["collapse"]
    if not (np.isfinite(s["low"]) and np.isfinite(c["low"])):
        return "not enough seeds for intervals: no verdict"
    if c["low"] > s["high"]:
        return f"collapse–retrain has the steeper exponent ({c['mean'] / s['mean']:.1f}x, intervals apart)"
    if c["high"] < s["low"]:
        sign = (": negative, the validation loss fell as the collapse removed parameters, every round training "
                "further") if c["high"] < 0 else ""
        return (f"collapse–retrain has the lower exponent ({c['mean']:.3f} against {s['mean']:.3f}, intervals "
                f"apart{sign}): not the paper's steeper exponent")
    return "the intervals overlap: no difference in exponent is shown"


def budget_note(data: dict) -> str:
    """How many optimiser steps each curve's points had: where the step caps bind, a lower loss
    after collapse–retrain is extra training as much as collapse."""
    setup = data["setup"]
    capped = sum(p["steps"] >= setup["max_steps"] for p in data["scratch"])
    rounds = [p for c in data["collapse"] for p in c["points"][1:]]
    capped_rounds = sum(p["steps"] >= setup["retrain_max_steps"] for p in rounds)
    extra = [sum(p["steps"] for p in c["points"]) for c in data["collapse"]]
    return (f"Training budget: {capped} of {len(data['scratch'])} from-scratch models stopped at the "
            f"{setup['max_steps']}-step cap, {capped_rounds} of {len(rounds)} retraining rounds at the "
            f"{setup['retrain_max_steps']}-step cap; each collapse curve's last point had its trained model's steps plus "
            f"{min(extra, default=0)}-{max(extra, default=0)} retraining steps. Where the caps bind the models are "
            "not converged, and a lower loss after collapse–retrain reflects the extra training as much as the collapse: "
            "the exponents compare the two procedures at this budget, not converged scaling laws.")


def markdown(data: dict) -> str:
    setup = data["setup"]
    lines = [
        f"<!-- {NAME} -->",
        "## Scaling: from scratch against collapse–retrain (`scaling.py`)" + (" — QUICK MODE" if data.get("quick") else ""),
        "",
        *([f"**PARTIAL: {data['seeds_done']} of {len(setup['seeds'])} seeds done.**", ""]
          if data["seeds_done"] < len(setup["seeds"]) else []),
        f"Byte-level causal transformer LM ({setup['layers']} encoder layers, residual width {setup['d_model']}, "
        f"{setup['heads']} heads, context {setup['context']}, ReLU feed-forward blocks) on WordNet 3.0 glosses and "
        f"the Debian fortunes files ({data['corpus']['train']:,} / {data['corpus']['val']:,} / {data['corpus']['test']:,} bytes "
        f"train / val / test; tokenizer: UTF-8 bytes). Adam lr {setup['lr']}, batch {setup['batch']}, early stopping on "
        f"the validation split every {setup['every']} steps, patience {setup['patience']}, at most "
        f"{setup['max_steps']} steps. Ladder: feed-forward widths {list(setup['widths'])}; collapse–retrain starts "
        f"from width {max(setup['widths'])}: greedy per-block thresholds (slack {setup['slack']}), raised "
        f"{setup['raise_by']:.0%} per round, retraining to early stopping (every {setup['retrain_every']}, patience "
        f"{setup['retrain_patience']}, at most {setup['retrain_max_steps']} steps), tolerance "
        f"{setup['tolerance']:.0%}, at most {setup['max_rounds']} rounds. Seeds {list(setup['seeds'])}.",
        "",
        "| seed | curve | non-embedding params | val loss | test loss |",
        "|---|---|---|---|---|",
    ]
    for p in data["scratch"]:
        lines.append(f"| {p['seed']} | scratch, width {p['width']} | {p['params']:,} | {p['val_loss']:.4f} | "
                     f"{p['test_loss']:.4f} |")
    for c in data["collapse"]:
        for p in c["points"]:
            state = "trained" if p["round"] == 0 else f"round {p['round']}" + ("" if p["accepted"] else " (beyond tolerance)")
            lines.append(f"| {c['seed']} | collapse, {state} | {p['params']:,} | {p['val_loss']:.4f} | – |")
        lines.append(f"| {c['seed']} | collapse, final (widths {c['final_widths']}, stopped: {c['stopped']}) | "
                     f"{c['final_params']:,} | {c['final_val_loss']:.4f} | {c['final_test_loss']:.4f} |")
    lines += [
        "",
        f"Fitted exponents (L = c N^-alpha, mean and 95 % t-interval over seeds): from scratch alpha = "
        f"{_alpha(data['alpha']['scratch'])}; collapse–retrain alpha = {_alpha(data['alpha']['collapse'])}.",
        "",
        f"**Verdict: {verdict(data)}.** The paper reports about twice the from-scratch exponent for collapse–"
        "retrain on a seq2seq transformer; here only the feed-forward widths are collapsed, at CPU scale.",
        "",
        budget_note(data),
        "",
        f"![validation loss against non-embedding parameters]({PLOT_PNG.relative_to(HERE).as_posix()})",
        "",
        f"Generated by `python benchmarks/scaling.py{' --quick' if data.get('quick') else ''}` in "
        f"{data['seconds']:.0f} s wall, {data['cpu_seconds']:.0f} CPU s ({data['platform']}; load average "
        f"{data['load']:.0f} at the end, on a shared machine).",
        f"<!-- /{NAME} -->",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
