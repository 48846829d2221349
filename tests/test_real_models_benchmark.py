"""The real-model benchmark (benchmarks/real_models.py) in its --quick mode on a tiny stand-in: every
reported figure is recomputed with ONNX Runtime on the model the cell saved, against the
original's answers; the baselines reach the widths onnxfib's allocation chose; cells resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import real_models  # noqa: E402

from onnxfib.stats import count_parameters  # noqa: E402

METHODS = ("onnxfib", "L2", "onnxfib+cal", "fold+refit")


def quick(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_models.py"), "--quick", "--levels", "0.5",
                           "--methods", *METHODS, "--budget", "300", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # 4 cells and a resumed run, each cell a child process: about 30 CPU s
def test_quick_run_reports_what_onnx_runtime_recomputes_on_the_saved_models(tmp_path):
    done = quick(tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "real_models.json").read_text())
    task = real_models.quick_task(tmp_path / "check")
    original = np.concatenate([o[0].argmax(1) for o in real_models.run(task.path, task.evaluation)])
    allocation = results["allocations"]["quick@0.5"]
    assert allocation["params_before"] == count_parameters(onnx.load(str(task.path)))
    cells = {c["method"]: c for c in results["cells"]}
    assert set(cells) == set(METHODS) and all(c["error"] is None for c in cells.values())
    for method, cell in cells.items():
        saved = onnx.load(str(tmp_path / f"quick-0.5-{method}.onnx"))
        answers = np.concatenate([o[0].argmax(1) for o in real_models.run(saved, task.evaluation)])
        assert cell["figures"]["agreement"] == float(np.mean(answers == original)), method
        assert cell["params"] == count_parameters(saved) < allocation["params_before"]
        assert cell["cpu_s"] > 0
    # the baselines narrow to onnxfib's widths: the same parameter count as its data-free collapse
    assert cells["L2"]["params"] == cells["fold+refit"]["params"] == cells["onnxfib"]["params"] == allocation["params"]
    assert abs(allocation["params"] / allocation["params_before"] - 0.5) < 0.1
    # a second run finds every cell done and leaves them as they were
    again = quick(tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "real_models.json").read_text())["cells"] == results["cells"]


def test_l2_pruning_keeps_the_largest_rows_and_drops_the_rest(tmp_path):
    from onnxfib.analysis import analyze

    model = onnx.load(str(real_models.quick_task(tmp_path).path))
    analysis = analyze(model, eps=0.0)
    assert real_models.baseline_colorings(analysis, {}, "L2") == {}  # only the layers named narrow
    name = analysis.layers[0].name
    chosen = real_models.baseline_colorings(analysis, {name: 5}, "L2")
    coloring = chosen[name]
    weights = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w0"))
    largest = set(np.argsort(-np.linalg.norm(weights, axis=1))[:5].tolist())
    full = {int(c) for c in np.flatnonzero(coloring.scales == 1.0)}
    assert full == largest and coloring.partition.n_colors == 5
    assert np.all(coloring.scales[sorted(set(range(len(weights))) - largest)] == real_models.DROPPED_SCALE)
