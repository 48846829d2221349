"""The pieces every benchmark script shares: its section of RESULTS.md, and the data check."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import fashion_mnist

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


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
