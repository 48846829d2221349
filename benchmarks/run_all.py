"""Regenerate every benchmark section of RESULTS.md, its JSON files and plots, in one command.

    python benchmarks/run_all.py                # 1.5 h on 2 idle CPU cores (continual.py's hour), plus speed.py's hour
    python benchmarks/run_all.py --only lenet_fashion
    python benchmarks/run_all.py --no-write     # print the tables only

Runs, in order: ``fashion_cnn.py`` (the CNN across eps), ``lenet_fashion.py`` (LeNet-300-100
and 784-500-500-500-10 against the baselines of ``baselines.py``), ``continual.py`` (continual
learning in four regimes where SGD loses plasticity: five methods), ``collapse_retrain.py`` (Algorithm 1) and
``speed.py`` (CPU time and memory against onnxslim on BERT and wide MLPs) and ``latency.py``
(ONNX Runtime latency of compressed models against torch exports of the same widths).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCRIPTS = ("fashion_cnn", "lenet_fashion", "continual", "collapse_retrain", "speed", "latency")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    parser.add_argument("--no-write", action="store_true", help="print the tables, write nothing")
    args = parser.parse_args(argv)
    status = 0
    for name in args.only:
        start = time.perf_counter()
        code = importlib.import_module(name).main(["--no-write"] if args.no_write else [])
        print(f"{name}: exit {code}, {time.perf_counter() - start:.0f} s", file=sys.stderr)
        status = status or code
    return status


if __name__ == "__main__":
    raise SystemExit(main())
