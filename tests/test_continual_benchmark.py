"""benchmarks/continual.py: its ``--quick`` run writes the JSON the issue asks for, and the figures
in it are the ones recomputed from the per-task scores it records (95% t-intervals over seeds,
SGD's loss-of-plasticity flag); the bit-flipping target changes one slow bit per task."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import continual  # noqa: E402
import fashion_mnist  # noqa: E402


def _interval(values: list[float]) -> tuple[float, float, float]:
    values = np.asarray(values)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean(), values.mean() - half, values.mean() + half


@pytest.mark.slow
def test_quick_run_writes_the_regimes_and_its_figures_are_recomputed(tmp_path: Path) -> None:
    regimes = ["bit_flipping"] + (["permuted"] if fashion_mnist.available() else [])
    methods = ["sgd", "continual_backprop", "symmetry_breaking"]
    command = [sys.executable, str(ROOT / "benchmarks" / "continual.py"), "--quick", "--workers", "1",
               "--out", str(tmp_path), "--runs", str(tmp_path / "runs.jsonl"), "--regimes", *regimes,
               "--methods", *methods]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "continual.json").read_text())
    assert sorted(result["regimes"]) == sorted(regimes)
    assert (tmp_path / "continual_bit_flipping.png").stat().st_size > 0
    for name, entry in result["regimes"].items():
        regime = continual.REGIMES[name]
        assert sorted(entry["methods"]) == sorted(methods) and isinstance(entry["verdict"], str)
        for method in methods:
            runs = sorted((r for r in result["runs"] if r["regime"] == name and r["method"] == method),
                          key=lambda r: r["seed"])
            assert [r["seed"] for r in runs] == [0, 1] and all(len(r["scores"]) == regime.quick_tasks for r in runs)
            m = entry["methods"][method]
            window = max(1, regime.quick_tasks // 10)
            first = [float(np.mean(r["scores"][:window])) for r in runs]
            last = [float(np.mean(r["scores"][-window:])) for r in runs]
            np.testing.assert_allclose(m["first"], _interval(first))
            np.testing.assert_allclose(m["last"], _interval(last))
            assert all(0 <= d[0] <= 1 for d in m["last_task"]["dead"]) and len(m["last_task"]["rank"]) == 2
        sgd = entry["methods"]["sgd"]
        worse = sgd["last"][2] < sgd["first"][1] if regime.higher_is_better else sgd["last"][1] > sgd["first"][2]
        assert entry["sgd_loses_plasticity"] == worse
    again = tmp_path / "again"
    done = subprocess.run([*command[:2], "--summarize", "--runs", str(tmp_path / "runs.jsonl"), "--out", str(again),
                           "--regimes", *regimes], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((again / "continual.json").read_text())["regimes"] == result["regimes"]


def test_bit_flipping_flips_one_slow_bit_per_task() -> None:
    regime = continual.REGIMES["bit_flipping"]
    seen = list(continual.tasks(regime, 0, 6, quick=True))
    slow = [t.x[:, : continual.BIT_FLIPPING] for t in seen]
    assert all((s == s[0]).all() for s in slow)  # constant within a task
    assert [int((a[0] != b[0]).sum()) for a, b in zip(slow, slow[1:])] == [1] * 5
    fast = np.concatenate([t.x[:, continual.BIT_FLIPPING:] for t in seen])
    assert set(np.unique(fast)) == {0.0, 1.0} and 0.4 < fast.mean() < 0.6
    targets = np.concatenate([t.y for t in seen])
    assert targets.std() > 0 and np.all(targets == np.round(targets))  # sums of +-1 threshold units
