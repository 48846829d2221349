"""Calibrated merging: the ridge refit never increases the calibration error of the merge it
starts from (checked in ONNX Runtime against the original model), keeps exact merges exact, and
does not depend on how the calibration data is cut into batches."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_mlp
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxfib
from onnxfib.analysis import analyze
from onnxfib.calibrate import NormalEquations, Selector, refit
from onnxfib.errors import UsageError
from onnxfib.validation import run_tensors


def _calibration(n: int = 300, features: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, features)).astype(np.float32)


def _sse(model, reference, x: np.ndarray, name: str = "y") -> float:
    (out,), = run_tensors(model, [name], [{"x": x}], "candidate")
    (ref,), = run_tensors(reference, [name], [{"x": x}], "reference")
    return float(np.sum((out - ref) ** 2))


@pytest.mark.parametrize("eps", [0.6, 0.9])
def test_refit_never_increases_the_calibration_error_of_the_merge(eps):
    original = build_mlp([8, 24, 3], seed=3, planted=False)
    x = _calibration()
    merged = analyze(original, eps=eps).collapse()
    refit_model, reports = refit(analyze(original, eps=eps), original, [{"x": x}])
    assert reports and all(r.rms_after <= r.rms_before for r in reports)
    before, after = _sse(merged, original, x), _sse(refit_model, original, x)
    assert before > 1e-3  # the merge is approximate: there is something to refit
    assert after <= before * (1 + 1e-6)
    assert after < 0.9 * before


def test_refit_improves_every_layer_along_the_graph():
    original = build_mlp([8, 24, 20, 3], seed=4, planted=False)
    x = _calibration(seed=2)
    refit_model, reports = refit(analyze(original, eps=0.8), original, [{"x": x}])
    assert [r.name for r in reports] == ["fc1", "fc2"]  # fc0 reads the untouched input
    assert all(r.rms_after <= r.rms_before for r in reports)
    assert _sse(refit_model, original, x) < _sse(analyze(original, eps=0.8).collapse(), original, x)


@pytest.mark.parametrize("build", ["mlp", "cnn"])
def test_refit_model_holds_what_an_export_of_the_refit_graph_holds(build):
    """The refit writes each front's weights into the collapse in place instead of exporting the
    whole graph per front: the model it returns is the one an export gives, node for node and
    value for value."""
    if build == "mlp":
        original, x = build_mlp([8, 24, 20, 16, 3], seed=4, planted=False), _calibration(seed=2)
    else:
        original, x = _cnn(), np.random.default_rng(4).standard_normal((40, 3, 9, 9)).astype(np.float32)
    analysis = analyze(original, eps=0.8)
    refit_model, reports = refit(analysis, original, [{"x": x}])
    assert len(reports) >= (3 if build == "mlp" else 1)
    exported = analysis.graph.export()
    assert [(n.op_type, list(n.input)) for n in refit_model.graph.node] == [
        (n.op_type, list(n.input)) for n in exported.graph.node]
    mine = {t.name: numpy_helper.to_array(t) for t in refit_model.graph.initializer}
    theirs = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    assert mine.keys() == theirs.keys()
    for name, values in theirs.items():
        np.testing.assert_array_equal(mine[name], values)
    merged = {t.name: numpy_helper.to_array(t) for t in analysis.collapse().graph.initializer}
    assert any(not np.array_equal(merged[name], values) for name, values in mine.items())  # something was refit


def test_refit_is_independent_of_the_batching():
    original = build_mlp([8, 24, 3], seed=3, planted=False)
    x = _calibration()
    whole, _ = refit(analyze(original, eps=0.7), original, [{"x": x}])
    parts, _ = refit(analyze(original, eps=0.7), original, [{"x": x[:100]}, {"x": x[100:170]}, {"x": x[170:]}])
    for a, b in zip(whole.graph.initializer, parts.graph.initializer):
        assert a.name == b.name
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-4, atol=1e-6)


def test_calibrated_exact_merge_stays_exact():
    model = build_mlp([8, 16, 12, 3])
    result = onnxfib.compress(model, data={"x": _calibration()}, calibrate=True)
    assert result.report.validation.ok and result.report.calibrated
    assert result.report.params_after < result.report.params_before


def test_calibrate_needs_data_and_a_positive_ridge():
    model = build_mlp([8, 16, 3])
    with pytest.raises(UsageError, match="calibrate needs data"):
        onnxfib.compress(model, calibrate=True)
    with pytest.raises(UsageError, match="ridge"):
        onnxfib.compress(model, data={"x": _calibration()}, calibrate=True, ridge=0.0)


def _half_unused_model():
    """An 8-12-3 MLP whose hidden neurons 6..11 feed nothing (zero columns in the reader)."""
    model = build_mlp([8, 12, 3], seed=6, planted=False)
    reader = next(t for t in model.graph.initializer if t.name == "W1")
    weights = numpy_helper.to_array(reader).copy()
    weights[:, 6:] = 0.0
    reader.CopyFrom(numpy_helper.from_array(weights, "W1"))
    return model


def test_selection_keeps_the_channels_the_reader_uses_and_refits_exactly():
    model = _half_unused_model()
    x = _calibration(400)
    heights = analyze(model, eps=0.0, record_heights=True).heights["fc0"]
    eps = float(0.5 * (heights[5] + heights[6]))  # six merges: twelve rows into six colors
    analysis = analyze(model, eps=eps)
    assert next(layer.width_after for layer in analysis.layers if layer.name == "fc0") == 6
    chosen = Selector(model, [{"x": x}]).colorings(analysis)["fc0"]
    assert sorted(np.flatnonzero(chosen.scales == 1.0)) == [0, 1, 2, 3, 4, 5]
    result = onnxfib.compress(model, layer_eps={"fc0": eps}, data={"x": x}, calibrate=True, check=False)
    assert result.report.params_after < result.report.params_before
    assert _sse(result.model, model, x) < 1e-6 * _sse(analysis.collapse(), model, x)


def _cnn() -> onnx.ModelProto:
    """Conv(3->10, 3x3, pad 1) -> Relu -> Conv(10->4, 3x3, stride 2, dilation 1) on 9x9 images."""
    rng = np.random.default_rng(8)
    w0 = rng.standard_normal((10, 3, 3, 3)).astype(np.float32) / 5
    w1 = rng.standard_normal((4, 10, 3, 3)).astype(np.float32) / 9
    inits = [numpy_helper.from_array(w0, "K0"), numpy_helper.from_array(rng.uniform(-0.3, 0.3, 10).astype(np.float32), "c0"),
             numpy_helper.from_array(w1, "K1"), numpy_helper.from_array(rng.uniform(-0.3, 0.3, 4).astype(np.float32), "c1")]
    nodes = [helper.make_node("Conv", ["x", "K0", "c0"], ["h"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu0"),
             helper.make_node("Conv", ["r", "K1", "c1"], ["y"], name="conv1", strides=[2, 2], pads=[0, 1, 0, 1])]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_conv_patches_reproduce_onnx_runtime():
    model = _cnn()
    x = np.random.default_rng(3).standard_normal((5, 3, 9, 9)).astype(np.float32)
    (r, y), = run_tensors(model, ["r", "y"], [{"x": x}], "model")
    site = next(s for s in analyze(model, eps=0.0).sites if s.name == "conv1")
    w, b, free = site.flat()
    rows = site.input_rows(r)[:, 0]
    assert free and rows.shape == (5 * 4 * 5, 10 * 9)  # H: (9 - 3) // 2 + 1, W: (9 + 2 - 3) // 2 + 1
    expected = np.moveaxis(y, 1, -1).reshape(-1, 4)
    np.testing.assert_allclose(rows @ w.T + b, expected, rtol=1e-4, atol=1e-5)


def test_conv_refit_never_increases_the_calibration_error():
    model = _cnn()
    x = np.random.default_rng(4).standard_normal((40, 3, 9, 9)).astype(np.float32)
    merged = analyze(model, eps=0.8).collapse()
    refit_model, reports = refit(analyze(model, eps=0.8), model, [{"x": x}])
    assert [r.name for r in reports] == ["conv1"]
    before, after = _sse(merged, model, x), _sse(refit_model, model, x)
    assert before > 1e-3 and after < 0.9 * before


def test_normal_equations_match_the_explicit_intercept_column_in_float64():
    """Batches of float32 rows give X^T X and X^T T of the stacked rows with a ones column, summed
    in float64 (float32 products would miss by far more than the tolerance on these offsets)."""
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((n, 3)) + 1000.0).astype(np.float32) for n in (40_000, 25_000)]
    targets = [rng.standard_normal((len(x), 2)) for x in batches]
    for intercept in (True, False):
        equations = NormalEquations(3, 2, intercept=intercept)
        for x, t in zip(batches, targets):
            equations.add(x, t)
        x = np.vstack(batches).astype(np.float64)
        if intercept:
            x = np.hstack([x, np.ones((len(x), 1))])
        t = np.vstack(targets)
        np.testing.assert_allclose(equations.gram, x.T @ x, rtol=1e-12)
        np.testing.assert_allclose(equations.cross, x.T @ t, rtol=1e-9)
        assert equations.samples == t.size
        np.testing.assert_allclose(equations.target_energy, np.sum(t * t), rtol=1e-12)


def test_original_activations_are_kept_for_the_next_refit_when_read_alongside_the_compressed_model():
    """A refit reads the original's tensors zipped with the compressed model's, so the generator is
    not resumed after its last batch piece: the tensors it computed are still kept (within the
    budget) and equal ONNX Runtime's on the original, and a second read gives the same values."""
    from onnxfib.calibrate import OriginalActivations

    model = build_mlp([8, 12, 10, 3])
    pieces = [{"x": _calibration(40)}, {"x": _calibration(30, seed=2)}]
    activations = OriginalActivations(model, pieces)
    first = [values for _, values in zip(range(len(pieces)), activations(["r0", "r1"]))]
    assert set(activations._kept) == {"r0", "r1"}
    expected = list(run_tensors(model, ["r0", "r1"], pieces, "original"))
    for got in (first, list(activations(["r0", "r1"]))):
        for piece, reference in zip(got, expected):
            for value, truth in zip(piece, reference):
                np.testing.assert_array_equal(value, truth)
