"""The layer-wise refit against independent truths: each refit layer's weights are the ridge
least-squares solution computed here with numpy from ONNX Runtime's activations (the compressed
model's final inputs, the original's outputs), for 3-D MatMul layers, layers sharing an input
(attention-style Q/K/V) and grouped and depthwise convolutions; the calibration error against
the original never rises; a planted exact merge stays exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfib.analysis import analyze
from onnxfib.calibrate import DEFAULT_RIDGE, _fronts, _to_refit, refit
from onnxfib.rules.base import activation_rows
from onnxfib.validation import run_tensors


def _model(nodes, inits, x_shape, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _dense(name: str, x: str, w: str, b: str, y: str) -> list[onnx.NodeProto]:
    return [helper.make_node("MatMul", [x, w], [f"{y}_mm"], name=name),
            helper.make_node("Add", [f"{y}_mm", b], [y], name=f"{name}_bias")]


def _sequence_model(seed: int = 0) -> onnx.ModelProto:
    """x [N, S, 6] -> dense 6->16 -> Relu -> three projections 16->5 of one tensor (q, k, v) ->
    their sum -> Relu -> dense 5->3: 3-D activations, a front of three layers sharing an input."""
    rng = np.random.default_rng(seed)
    inits = {"W0": rng.standard_normal((6, 16)) / 2, "b0": rng.uniform(-0.5, 0.5, 16)}
    nodes = _dense("fc0", "x", "W0", "b0", "h")
    nodes.append(helper.make_node("Relu", ["h"], ["r"], name="relu0"))
    for p in "qkv":
        inits[f"W{p}"], inits[f"b{p}"] = rng.standard_normal((16, 5)) / 4, rng.uniform(-0.3, 0.3, 5)
        nodes += _dense(p, "r", f"W{p}", f"b{p}", p)
    inits["W2"], inits["b2"] = rng.standard_normal((5, 3)) / 2, rng.uniform(-0.3, 0.3, 3)
    nodes += [helper.make_node("Sum", ["q", "k", "v"], ["s"], name="sum"),
              helper.make_node("Relu", ["s"], ["t"], name="relu1")]
    nodes += _dense("fc2", "t", "W2", "b2", "y")
    return _model(nodes, inits, ["N", "S", 6])


def _conv_model(seed: int = 0) -> onnx.ModelProto:
    """Conv 3->8 -> Relu -> grouped Conv 8->8 (2 groups) -> Relu -> depthwise Conv 8->8 (SAME
    padding) -> Relu -> Conv 1x1 8->4, on 10x10 images."""
    rng = np.random.default_rng(seed)
    inits = {"K0": rng.standard_normal((8, 3, 3, 3)) / 4, "c0": rng.uniform(-0.3, 0.3, 8),
             "K1": rng.standard_normal((8, 4, 3, 3)) / 5, "c1": rng.uniform(-0.3, 0.3, 8),
             "K2": rng.standard_normal((8, 1, 3, 3)) / 2, "c2": rng.uniform(-0.3, 0.3, 8),
             "K3": rng.standard_normal((4, 8, 1, 1)) / 2, "c3": rng.uniform(-0.3, 0.3, 4)}
    nodes = [helper.make_node("Conv", ["x", "K0", "c0"], ["h0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "K1", "c1"], ["h1"], name="grouped", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "K2", "c2"], ["h2"], name="depthwise", group=8, strides=[2, 2],
                              auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "K3", "c3"], ["y"], name="pointwise")]
    return _model(nodes, inits, ["N", 3, 10, 10])


def _sse(model: onnx.ModelProto, reference: onnx.ModelProto, x: np.ndarray) -> float:
    (out,), = run_tensors(model, ["y"], [{"x": x}], "candidate")
    (ref,), = run_tensors(reference, ["y"], [{"x": x}], "reference")
    return float(np.sum((out - ref) ** 2))


def _ridge_solution(x: np.ndarray, t: np.ndarray, w0: np.ndarray, ridge: float) -> np.ndarray:
    """argmin ||[X 1] W - T||^2 + lam ||W - W0||^2 by numpy's lstsq on the stacked system."""
    x1 = np.hstack([x, np.ones((len(x), 1))])
    lam = ridge * np.trace(x1.T @ x1) / x1.shape[1]
    a = np.vstack([x1, np.sqrt(lam) * np.eye(x1.shape[1])])
    return np.linalg.lstsq(a, np.vstack([t, np.sqrt(lam) * w0]), rcond=None)[0]


def _check_against_numpy(original, eps, x, layers):
    """Refit ``original`` collapsed at ``eps`` on ``x`` and compare every refit dense or
    plain-Conv layer in ``layers`` with the ridge solution from ORT activations."""
    merged_analysis = analyze(original, eps=eps)
    merged_analysis.collapse()
    start = {s.name: s.block_weights() for s in merged_analysis.sites if s.name in layers}
    analysis = analyze(original, eps=eps)
    model, reports = refit(analysis, original, [{"x": x}])
    assert {r.name for r in reports} >= set(layers)
    sites = {s.name: s for s in analysis.sites}
    for name in layers:
        site = sites[name]
        (inp,), = run_tensors(model, [site.inputs[0].name], [{"x": x}], "refit")
        (out,), = run_tensors(original, [site.outputs[0].name], [{"x": x}], "original")
        plan = analysis.plan(site.outputs[0])
        target = activation_rows(out, site.outputs[0].axis)
        target = target if plan is None else plan.fit_base(target, 1)
        rows = site.input_rows(inp)
        w, b, _ = site.block_weights()
        w0, b0, _ = start[name]
        for g in range(rows.shape[1]):
            t = target.reshape(len(target), rows.shape[1], -1)[:, g]
            expected = _ridge_solution(rows[:, g], t, np.vstack([w0[g].T, b0[g][None]]), DEFAULT_RIDGE)
            np.testing.assert_allclose(np.vstack([w[g].T, b[g][None]]), expected, rtol=2e-4, atol=2e-5)
    return model, reports


@pytest.mark.parametrize("eps", [0.5, 0.8])
def test_3d_matmul_layers_are_the_ridge_solution_on_onnx_runtime_activations(eps):
    original = _sequence_model()
    x = np.random.default_rng(1).standard_normal((30, 7, 6)).astype(np.float32)
    model, reports = _check_against_numpy(original, eps, x, ["q", "k", "v", "fc2"])
    assert all(r.rms_after <= r.rms_before for r in reports)
    assert _sse(model, original, x) < _sse(analyze(original, eps=eps).collapse(), original, x)


def test_projections_of_one_tensor_form_one_front_and_a_chain_one_front_each():
    original = _sequence_model()
    analysis = analyze(original, eps=0.8)
    fronts = _fronts(analysis.collapse(), _to_refit(analysis))
    assert [[s.name for s in front] for front in fronts] == [["q", "k", "v"], ["fc2"]]


def test_grouped_and_depthwise_convs_are_refit_per_group_against_onnx_runtime():
    original = _conv_model()
    x = np.random.default_rng(2).standard_normal((24, 3, 10, 10)).astype(np.float32)
    eps = 1.0  # conv0 8 -> 6 channels, grouped 8 -> 6 (3 a group), depthwise 8 -> 6
    assert [layer.width_after for layer in analyze(original, eps=eps).layers] == [6, 6, 6, 4]
    model, reports = _check_against_numpy(original, eps, x, ["grouped", "depthwise", "pointwise"])
    assert all(r.rms_after <= r.rms_before * (1 + 1e-9) for r in reports)
    before, after = _sse(analyze(original, eps=eps).collapse(), original, x), _sse(model, original, x)
    assert before > 1e-3 and after < 0.9 * before


def test_planted_exact_merge_is_reproduced_exactly_by_the_refit():
    """Duplicate hidden channels (a planted lift): the collapse is exact at eps 0, and the refit
    of the reader, fitted on the collapsed inputs, keeps the original's outputs."""
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((6, 5))
    b0 = rng.uniform(-0.3, 0.3, 5)
    lift = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    inits = {"W0": w0[:, lift], "b0": b0[lift], "W1": rng.standard_normal((10, 3)), "b1": rng.uniform(-1, 1, 3)}
    nodes = [*_dense("fc0", "x", "W0", "b0", "h"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             *_dense("fc1", "r", "W1", "b1", "y")]
    original = _model(nodes, inits, ["N", "S", 6])
    x = rng.standard_normal((20, 4, 6)).astype(np.float32)
    analysis = analyze(original, eps=0.0)
    model, reports = refit(analysis, original, [{"x": x}])
    assert [r.name for r in reports] == ["fc1"] and reports[0].rms_after <= reports[0].rms_before
    assert next(s for s in analysis.sites if s.name == "fc1").inputs[0].width == 10
    assert sum(t.size for t in map(numpy_helper.to_array, model.graph.initializer)) < sum(
        t.size for t in map(numpy_helper.to_array, original.graph.initializer))
    (out,), = run_tensors(model, ["y"], [{"x": x}], "refit")
    (ref,), = run_tensors(original, ["y"], [{"x": x}], "original")
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_rows_built_a_few_samples_at_a_time_give_the_same_refit(monkeypatch):
    """A Conv's patches built one image at a time (``ROW_BYTES`` tiny) give the same weights as
    all at once."""
    import onnxfib.calibrate as calibrate

    original = _conv_model()
    x = np.random.default_rng(3).standard_normal((12, 3, 10, 10)).astype(np.float32)
    whole, _ = refit(analyze(original, eps=1.0), original, [{"x": x}])
    monkeypatch.setattr(calibrate, "ROW_BYTES", 1)
    parts, _ = refit(analyze(original, eps=1.0), original, [{"x": x}])
    for a, b in zip(whole.graph.initializer, parts.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-5, atol=1e-6)
