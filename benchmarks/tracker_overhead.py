"""What a ``CoverTracker`` record costs against training, in CPU seconds.

    python benchmarks/tracker_overhead.py     # about a minute on 2 cores

Two plain stacks trained on Fashion-MNIST: a width-256 MLP (784-256-256-256-10, Adam, batch 128)
and the continual-learning network of ``continual.py`` (196-100-100-2 on 14x14 images, SGD,
batch 20). For each, ``RECORDS`` times: 50 training steps, then one record at eps 0 and at eps
``EPS``, with the tracker's direct ONNX writing of plain stacks ("now") and with the model hidden in a wrapper, so that torch's exporter traces it ("before").
CPU seconds from ``resource.getrusage`` (process user + system); the figure is the CPU time of
one record over the CPU time of 50 steps. Writes ``results/tracker_overhead.json`` and the
``tracker_overhead`` section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fashion_mnist  # noqa: E402
from sections import fashion_mnist_missing, write_section  # noqa: E402

NAME = "tracker_overhead"
RECORDS = 10
STEPS = 50
EPS = 0.3
GOAL = 0.05
RESULTS_JSON = HERE / "results" / f"{NAME}.json"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=RECORDS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if fashion_mnist_missing():
        return 2
    import torch
    from torch import nn

    from onnxfib.train import CoverTracker

    torch.set_num_threads(1)
    images, labels = fashion_mnist.load("train")
    flat = torch.from_numpy((images.reshape(len(images), -1) / 255.0).astype(np.float32))
    small = torch.from_numpy((images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(images), -1)
                              / 255.0).astype(np.float32))
    targets = torch.from_numpy(labels.astype(np.int64))

    class Hidden(nn.Module):
        """The same stack behind a wrapper: not a plain ``nn.Sequential``, so it is traced."""

        def __init__(self, stack: nn.Module) -> None:
            super().__init__()
            self.stack = stack

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stack(x)

    nets = {
        "MLP 784-256-256-256-10 (Adam, batch 128)": (
            lambda: nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                  nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)),
            flat, targets, 128, lambda p: torch.optim.Adam(p, lr=1e-3)),
        "continual 196-100-100-2 (SGD, batch 20)": (
            lambda: nn.Sequential(nn.Linear(196, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 2)),
            small, targets % 2, 20, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
    }
    rows = []
    for label, (build, x, y, batch, optimizer_of) in nets.items():
        torch.manual_seed(0)
        model = build()
        optimizer = optimizer_of(model.parameters())
        generator = torch.Generator().manual_seed(0)
        trackers = {(path, eps): CoverTracker(model if path == "now" else Hidden(model), x[:1], eps=eps)
                    for path in ("now", "before") for eps in (0.0, EPS)}
        train = 0.0
        for record in range(args.records):
            start = cpu()
            for _ in range(STEPS):
                index = torch.randint(0, len(x), (batch,), generator=generator)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
            train += cpu() - start
            for tracker in trackers.values():
                tracker.record(record * STEPS)
        per_50 = train / args.records
        for (path, eps), tracker in trackers.items():
            per_record = tracker.cpu_seconds / args.records
            rows.append({"network": label, "path": path, "eps": eps, "record_cpu_s": per_record,
                         "train_cpu_s_per_50_steps": per_50, "ratio": per_record / per_50})
    data = {"rows": rows, "records": args.records, "steps": STEPS, "goal": GOAL,
            "platform": f"{platform.machine()}, {platform.python_version()}, torch threads 1",
            "load": os.getloadavg()[0]}
    section = markdown(data)
    print(section)
    if not args.no_write:
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(data, indent=1))
        write_section(NAME, section)
    return 0


def markdown(data: dict) -> str:
    lines = [
        f"<!-- {NAME} -->",
        "## Cover tracking overhead (`tracker_overhead.py`)",
        "",
        f"One `CoverTracker` record against {data['steps']} training steps, CPU seconds (getrusage, one torch thread), "
        f"mean over {data['records']} records during training on Fashion-MNIST. \"now\": a plain stack written "
        "straight as ONNX; \"before\": the same model traced by torch's exporter. "
        f"Goal: a record at most {data['goal']:.0%} of 50 steps.",
        "",
        "| network | path | eps | CPU s per record | CPU s per 50 steps | ratio | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['network']} | {r['path']} | {r['eps']:g} | {r['record_cpu_s']:.4f} | "
                     f"{r['train_cpu_s_per_50_steps']:.4f} | {r['ratio']:.1%} | "
                     f"{'met' if r['ratio'] <= data['goal'] else 'not met'} |")
    lines += ["", f"Generated by `python benchmarks/tracker_overhead.py` ({data['platform']}; 2 cores shared with other "
              f"jobs, load average {data['load']:.0f}).", f"<!-- /{NAME} -->"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
