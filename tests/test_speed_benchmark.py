"""The speed benchmark (benchmarks/speed.py) on tiny sizes: its models' planted base is what onnxfib
reaches, and its measuring helper reports a child's CPU time, memory, exit code and timeout."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed  # noqa: E402

import onnxfib  # noqa: E402
from onnxfib.stats import count_parameters  # noqa: E402

BURN = "import numpy\na = numpy.ones(40_000_000)\ns = 0\nfor i in range(1_000_000):\n    s += i"


@pytest.mark.slow
def test_measure_reports_cpu_time_and_memory_of_a_busy_child():
    result = speed.measure([sys.executable, "-c", BURN])
    assert result["exit"] == 0 and not result["timed_out"]
    assert result["cpu_s"] > 0.05 and result["cpu_s"] == pytest.approx(result["user_s"] + result["sys_s"], abs=2e-3)
    assert result["peak_rss_mb"] > 300  # the 320 MB array, not the benchmark's own memory


def test_measure_stops_a_child_past_its_timeout_and_keeps_failures():
    slow = speed.measure([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert slow["timed_out"] and slow["wall_s"] < 10 and slow["cpu_s"] < 5  # killed, its usage kept
    failed = speed.measure([sys.executable, "-c", "print('bad'); raise SystemExit(3)"])
    assert failed["exit"] == 3 and not failed["timed_out"] and "bad" in failed["output"]


def test_exponent_of_a_power_law():
    assert speed.exponent([10, 100, 1000], [2.0, 20.0, 200.0]) == pytest.approx(1.0)
    assert speed.exponent([10, 100], [1.0, 100.0]) == pytest.approx(2.0)
    assert speed.exponent([10], [1.0]) is None


def test_planted_mlp_has_the_base_onnxfib_reaches(tmp_path):
    case = speed.build_mlp(tmp_path / "mlp.onnx", (16, 40, 48, 8))
    assert case.base_params == 16 * 35 + 35 + 35 * 42 + 42 + 42 * 8 + 8
    model = onnx.load(str(case.path))
    assert case.params == count_parameters(model) and not case.external
    assert onnxfib.compress(model, eps=0.0, check=False).report.params_after == case.base_params


@pytest.mark.slow
def test_run_case_measures_every_tool_on_a_planted_mlp(tmp_path):
    case = speed.build_mlp(tmp_path / "mlp.onnx", (16, 40, 48, 8))
    result = speed.run_case(case, tmp_path, repeat=1, timeout=120)
    assert result["base_reached"], result["summary"]
    assert result["summary"][speed.SLIM]["params_after"] == case.params
    assert result["summary"][speed.EXACT]["cpu_ratio_vs_onnxslim"] > 0
    data = {"cases": [result], "scaling": speed.scaling([result])}
    data["goals"] = speed.goals(data)
    assert data["goals"][2]["measured"] == result["summary"][speed.EXACT]["rss_over_file"]


@pytest.mark.slow
def test_planted_bert_reaches_its_base(tmp_path):
    case = speed.build_bert(tmp_path / "bert.onnx", 2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                            vocab_size=100, max_position_embeddings=64)
    model = onnx.load(str(case.path))
    assert case.params == count_parameters(model)
    assert onnxfib.compress(model, eps=0.0, check=False).report.params_after == case.base_params


@pytest.mark.slow
def test_cluster_layer_times_both_clusterings_of_a_planted_layer(tmp_path):
    case = speed.build_mlp(tmp_path / "mlp.onnx", (16, 40, 48, 8))  # W1: 48 rows, the last 6 copies
    result = speed.cluster_layer(case.path, "W1", "b1", eps=0.3, repeat=3)
    assert "error" not in result, result
    assert result["rows"] == 48 and result["fibers"]["colors"] <= 42  # the planted copies merged
    assert 1 <= result["opfibers"]["colors"] <= 40
    assert result["cpu_s"] == pytest.approx(sum(result[k]["user_s"] + result[k]["sys_s"]
                                                for k in ("fibers", "opfibers")), abs=2e-3)
    assert len(result["runs_cpu_s"]) == 3 and sorted(result["runs_cpu_s"])[1] == result["cpu_s"]  # the median run


@pytest.mark.slow
def test_planted_llama_is_built_in_a_child_with_one_data_file_and_reaches_its_base(tmp_path):
    config = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 100}
    case, export = speed._build_llama_child(tmp_path / "llama.onnx", config, timeout=300)
    assert case is not None and export["exit"] == 0 and export["peak_rss_mb"] > 0, export
    assert sorted(p.name for p in tmp_path.glob("llama.onnx*")) == ["llama.onnx", "llama.onnx.data"]
    assert case.external and case.options == ["--input-shape", "input_ids:1,128"]
    assert speed.largest_tensor_bytes(case.path) == 4 * 128 * 64  # an MLP weight (the embedding: 100 x 64)
    result = onnxfib.compress(case.path, eps=0.0, check="full", input_shapes={"input_ids": (1, 128)})
    assert result.report.validation.ok and result.report.params_after == case.base_params
    assert case.params - case.base_params == 2 * (128 // speed.PLANTED) * 3 * 64  # gate, up rows; down columns
