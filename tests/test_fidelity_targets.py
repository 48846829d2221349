"""Fidelity targets stated without labels (--min-agreement, --min-cosine, --max-error relative to
the output's scale): the figure a run reports is the one recomputed here from ONNX Runtime's
outputs of the saved model and of the original; an exact collapse of a planted lift agrees fully."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import build_mlp
from onnx import TensorProto, helper, numpy_helper

import onnxfib
from onnxfib.errors import UsageError, ValidationMismatchError
from onnxfib.targets import Evaluator
from onnxfib.validation import run_tensors


def _outputs(model: onnx.ModelProto, data: dict[str, np.ndarray], name: str = "y") -> np.ndarray:
    (y,), = run_tensors(model, [name], [data], "model")
    return y


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(axis=-1) == b.argmax(axis=-1)))


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.fixture(scope="module")
def model():
    return build_mlp([12, 32, 24, 6], seed=5, planted=False)


@pytest.fixture(scope="module")
def data():
    return {"x": np.random.default_rng(7).standard_normal((200, 12)).astype(np.float32)}


def test_exact_collapse_of_a_planted_lift_agrees_fully(data):
    """eps 0 on planted duplicates: the base's parameters, agreement 1 and cosine 1 (to rounding)."""
    planted = build_mlp([12, 32, 24, 6], seed=5)
    outcome = Evaluator(planted, [data])({})
    exact = onnxfib.compress(planted, data=data)
    assert outcome.params == exact.report.params_after < exact.report.params_before
    assert outcome.agreement == 1.0 == _agreement(_outputs(exact.model, data), _outputs(planted, data))
    assert outcome.cosine == pytest.approx(1.0, abs=1e-9)
    assert outcome.max_rel == pytest.approx(exact.report.validation.outputs[0].max_rel, abs=1e-12)
    assert outcome.max_rel < 1e-5


@pytest.mark.parametrize("kind, limit", [("min_agreement", 0.9), ("min_cosine", 0.98)])
def test_label_free_targets_are_met_as_reported(model, data, kind, limit):
    result = onnxfib.compress(model, data=data, **{kind: limit})
    target = result.report.target
    compressed, original = _outputs(result.model, data), _outputs(model, data)
    recomputed = {"min_agreement": _agreement, "min_cosine": _mean_cosine}[kind](compressed, original)
    assert target.met and target.achieved == pytest.approx(recomputed, rel=1e-9, abs=1e-12) and recomputed >= limit
    assert target.agreement == pytest.approx(_agreement(compressed, original))
    assert target.cosine == pytest.approx(_mean_cosine(compressed, original), rel=1e-9)
    assert result.report.params_after < result.report.params_before


def _sequence_model() -> onnx.ModelProto:
    """Token ids [N, 5] -> embedding [20, 8] -> MatMul 8x32 -> Relu -> MatMul 32x7: logits per position."""
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
             for name, shape in (("table", (20, 8)), ("W1", (8, 32)), ("W2", (32, 7)))]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 7])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_agreement_of_a_sequence_output_counts_every_position():
    model = _sequence_model()
    data = {"ids": np.random.default_rng(12).integers(0, 20, (40, 5)).astype(np.int32)}  # int32 ids: cast exactly
    result = onnxfib.compress(model, data=data, min_agreement=0.8)
    compressed, original = _outputs(result.model, data), _outputs(model, data)
    assert compressed.shape == (40, 5, 7)
    agreement = _agreement(compressed, original)
    assert result.report.target.achieved == pytest.approx(agreement) and agreement >= 0.8
    assert result.report.params_after < result.report.params_before


@pytest.mark.slow
def test_cli_reports_the_achieved_agreement(tmp_path, run_cli, model, data):
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **data)
    result = run_cli("compress", "m.onnx", "out.onnx", "--data", "d.npz", "--min-agreement", "0.9",
                     "--report", "r.json")
    assert result.returncode == 0, result.stderr
    recomputed = _agreement(_outputs(onnx.load(tmp_path / "out.onnx"), data), _outputs(model, data))
    report = json.loads((tmp_path / "r.json").read_text())["target"]
    assert report["kind"] == "agreement" and report["met"] and report["achieved"] == pytest.approx(recomputed)
    assert (f"Target: agrees with the original on {recomputed:.2%} of the answers, asked at least 90.00%"
            in result.stdout)


@pytest.mark.slow
def test_a_target_that_cannot_be_met_exits_1_and_writes_nothing(tmp_path, run_cli, data):
    """No output error is 0 once rows merge (sums reorder), so --max-error 0 cannot be met; the
    report holds the eps-0 collapse's relative error, recomputed here."""
    planted = build_mlp([12, 8, 6], seed=5)
    exact = onnxfib.compress(planted, check=False).model
    reference = _outputs(planted, data)
    premise = float(np.max(np.abs(_outputs(exact, data) - reference)) / np.max(np.abs(reference)))
    assert premise > 0
    onnx.save(planted, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **data)
    result = run_cli("compress", "m.onnx", "out.onnx", "--data", "d.npz", "--max-error", "0", "--report", "r.json")
    assert result.returncode == 1 and not (tmp_path / "out.onnx").exists()
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("error: target not met") and "nothing written" in lines[-1]
    assert json.loads((tmp_path / "r.json").read_text())["target"]["achieved"] == pytest.approx(premise, rel=1e-6)


def test_an_unmet_target_raises_with_the_figure_reached(data):
    planted = build_mlp([12, 8, 6], seed=5)
    with pytest.raises(ValidationMismatchError, match="of the output's scale, asked at most 0") as caught:
        onnxfib.compress(planted, data=data, max_error=0.0)
    target = caught.value.report.target
    assert not target.met and target.achieved == target.max_rel > 0


@pytest.mark.slow
def test_calibrated_agreement_is_measured_held_out(model, data):
    """With --calibrate the figure is the pooled held-out one; refit on all rows, the written
    model agrees at least as well on the rows it was fitted to."""
    result = onnxfib.compress(model, data=data, min_agreement=0.95, calibrate=True)
    target = result.report.target
    assert target.met and result.report.refit
    assert _agreement(_outputs(result.model, data), _outputs(model, data)) >= target.achieved - 0.05


@pytest.mark.parametrize("kwargs, message", [
    ({"min_agreement": 1.5}, "min_agreement"),
    ({"min_cosine": 1.5}, "min_cosine"),
    ({"min_cosine": 0.9, "min_agreement": 0.9}, "at most one target"),
])
def test_bad_fidelity_targets_are_usage_errors(model, data, kwargs, message):
    with pytest.raises(UsageError, match=message):
        onnxfib.compress(model, data=data, **kwargs)
