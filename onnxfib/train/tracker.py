"""Watch fibers, opfibers and covers form during training (paper Sec. 4.1, Fig. 8 and Fig. 10).

Each record runs the core's analysis on the current weights (a plain stack written straight as
ONNX, anything else an in-memory export; see :func:`adapter.export_onnx`) and keeps, per Linear/Conv layer, the numbers of fibers, flavored opfibers (Eq. 5) and covers
(Eq. 7), their size distributions, how many channels merged, and how many covers of the
previous record split (Theorem 3.1 says none do under exact gradient descent at eps = 0).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import io
from ..errors import UsageError
from ..partition import Partition
from ..plotting import pyplot
from ..viewer import fiber_colors
from .adapter import TorchAnalysis

KINDS = ("fibers", "opfibers", "covers")


@dataclass(frozen=True)
class LayerRecord:
    """One layer at one step."""

    step: int
    epoch: int | None
    layer: str
    width: int
    fibers: int
    opfibers: int
    covers: int
    merged: int  # channels that share a cover with an earlier channel: width - covers
    splits: int  # covers of the previous record no longer inside one cover
    fiber_sizes: list[int]
    opfiber_sizes: list[int]
    cover_sizes: list[int]

    def sizes(self, kind: str) -> list[int]:
        return getattr(self, f"{kind[:-1]}_sizes")


def splits(before: Partition, after: Partition) -> int:
    """Colors of ``before`` whose channels no longer share one color in ``after``."""
    pairs = Partition.from_rows(np.column_stack([before.labels, after.labels]))
    return int(pairs.n_colors - before.n_colors)


class CoverTracker:
    """Records symmetry figures of ``model`` at tolerance ``eps`` every ``every`` steps;
    ``example`` is one input batch (its shape fixes the export). ``seconds`` is the time spent
    recording, for overhead figures; ``cpu_seconds`` the process CPU time it took."""

    def __init__(self, model: nn.Module, example: torch.Tensor, *, eps: float = 0.0, every: int = 1) -> None:
        if every < 1:
            raise UsageError(f"every must be at least 1, got {every}")
        self.model, self.example, self.eps, self.every = model, example, float(eps), int(every)
        self.cpu_seconds = 0.0
        self.records: list[LayerRecord] = []
        self.seconds = 0.0
        self._last: dict[str, Partition] = {}

    def maybe_record(self, step: int, epoch: int | None = None) -> list[LayerRecord]:
        """Record when ``step`` is a multiple of ``every``; returns the new records (or none)."""
        return self.record(step, epoch) if step % self.every == 0 else []

    def record(self, step: int, epoch: int | None = None) -> list[LayerRecord]:
        """Analyse the current weights and append one record per layer."""
        start, cpu = time.perf_counter(), time.process_time()
        analysis = TorchAnalysis(self.model, self.example, eps=self.eps, symmetry="cover")
        new = []
        for layer in analysis.layers:
            figures = analysis.figures(layer)
            previous = self._last.get(layer.name)
            new.append(LayerRecord(
                step=step, epoch=epoch, layer=layer.name, width=layer.width,
                fibers=figures.fibers.n_colors, opfibers=figures.opfibers.n_colors,
                covers=figures.covers.n_colors, merged=layer.width - figures.covers.n_colors,
                splits=splits(previous, figures.covers) if previous is not None and len(previous) == layer.width else 0,
                fiber_sizes=sorted(figures.fibers.sizes().tolist(), reverse=True),
                opfiber_sizes=sorted(figures.opfibers.sizes().tolist(), reverse=True),
                cover_sizes=sorted(figures.covers.sizes().tolist(), reverse=True),
            ))
            self._last[layer.name] = figures.covers
        self.records.extend(new)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu
        return new

    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.records))

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"eps": self.eps, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
                                    "records": [asdict(r) for r in self.records]}, indent=1))
        return path

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Counts only, one row per layer and record (sizes go to the JSON)."""
        path = Path(path)
        columns = ["step", "epoch", "layer", "width", "fibers", "opfibers", "covers", "merged", "splits"]
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for record in self.records:
                writer.writerow([getattr(record, c) for c in columns])
        return path

    def plot_counts(self, path: str | os.PathLike, kind: str = "fibers") -> Path:
        """Number of ``kind`` per layer against the step (the paper's Fig. 8)."""
        if kind not in KINDS:
            raise UsageError(f"kind must be one of {KINDS}, got {kind!r}")
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for layer in self.layers():
            rows = [r for r in self.records if r.layer == layer]
            ax.plot([r.step for r in rows], [getattr(r, kind) for r in rows], label=f"{layer} ({rows[0].width})")
        ax.set_xlabel("step")
        ax.set_ylabel(f"number of {kind} (eps={self.eps:g})")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)

    def plot_sizes(self, path: str | os.PathLike, layer: str, kind: str = "covers", records: int = 4) -> Path:
        """Histograms of ``kind`` sizes of one layer at ``records`` evenly spaced records (Fig. 10)."""
        if kind not in KINDS:
            raise UsageError(f"kind must be one of {KINDS}, got {kind!r}")
        rows = [r for r in self.records if r.layer == layer]
        if not rows:
            raise UsageError(f"no records of layer {layer!r}; recorded: {', '.join(self.layers())}")
        plt = pyplot()
        picks = [rows[i] for i in sorted(set(np.linspace(0, len(rows) - 1, min(records, len(rows))).astype(int)))]
        fig, axes = plt.subplots(1, len(picks), figsize=(3 * len(picks), 3), sharey=True, squeeze=False)
        for ax, row in zip(axes[0], picks):
            sizes = row.sizes(kind)
            ax.hist(sizes, bins=np.arange(1, max(sizes) + 2) - 0.5 if max(sizes) < 40 else 20)
            ax.set_title(f"step {row.step}: {len(sizes)} {kind}", fontsize="small")
            ax.set_xlabel(f"{kind[:-1]} size")
        axes[0][0].set_ylabel(f"count ({layer})")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)

    def steps(self) -> list[int]:
        return list(dict.fromkeys(r.step for r in self.records))

    def _draw(self, ax, step: int, kind: str) -> None:
        """One record on ``ax``: a row per layer, its channels as dots grouped by ``kind``
        (largest first) and colored as the view colors them (``view.fiber_colors``)."""
        rows = [r for r in self.records if r.step == step]
        ax.clear()
        for y, row in enumerate(rows):
            sizes = row.sizes(kind)
            labels = np.repeat(np.arange(len(sizes)), sizes)
            x = np.arange(row.width) / max(row.width - 1, 1)
            ax.scatter(x, np.full(row.width, y), c=fiber_colors(labels), s=max(4.0, 40.0 - row.width / 4),
                       edgecolors="#555555", linewidths=0.3, gid=row.layer)
            ax.text(-0.02, y, f"{row.layer}: {len(sizes)} {kind} of {row.width}", ha="right", va="center", fontsize=7)
        epoch = rows[0].epoch if rows else None
        ax.set_title(f"step {step}{'' if epoch is None else f' (epoch {epoch})'}: channels grouped by {kind}, "
                     f"eps {self.eps:g}; grey: alone", fontsize=8)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.axis("off")

    def frame(self, step: int, kind: str = "covers"):
        """A matplotlib figure of the record at ``step`` (see ``animate``); the caller closes it."""
        if kind not in KINDS:
            raise UsageError(f"kind must be one of {KINDS}, got {kind!r}")
        if step not in self.steps():
            raise UsageError(f"no record at step {step}; recorded steps: {self.steps()}")
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(self.layers()) + 1.0), dpi=100)
        fig.subplots_adjust(left=0.3, right=0.98)
        self._draw(ax, step, kind)
        return fig

    def animate(self, path: str | os.PathLike, kind: str = "covers", fps: float = 2.0) -> Path:
        """An animated GIF of fiber (or opfiber, cover) formation: one frame per recorded step,
        a row of dots per layer grouped and colored by ``kind``; written atomically."""
        steps = self.steps()
        if not steps:
            raise UsageError("nothing recorded yet: call record() during training first")
        fig = self.frame(steps[0], kind)  # UsageError first when matplotlib is missing
        from matplotlib.animation import FuncAnimation, PillowWriter

        animation = FuncAnimation(fig, lambda i: self._draw(fig.axes[0], steps[i], kind), frames=len(steps))
        try:
            with tempfile.TemporaryDirectory() as scratch:
                gif = Path(scratch) / "frames.gif"
                animation.save(gif, writer=PillowWriter(fps=fps))
                data = gif.read_bytes()
        finally:
            pyplot().close(fig)
        return io.write_bytes_atomic(path, data)


__all__ = ["CoverTracker", "KINDS", "LayerRecord", "splits"]
