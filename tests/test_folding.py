"""Folding (data-free regrouping for target searches): on a planted layer whose base is known,
it groups what the cosine clustering cannot see, units that barely reach the output."""

from __future__ import annotations

import numpy as np
from conftest import build_mlp
from onnx import numpy_helper

import onnxfib
from onnxfib.analysis import analyze
from onnxfib.folding import Folder, outgoing_weights
from onnxfib.partition import Partition
from onnxfib.validation import run_tensors

PAIRS, QUIET = 4, 4  # hidden units: PAIRS near-copied pairs that matter, QUIET units that barely do


def planted_model():
    """6 -> 12 -> 4 ReLU MLP: units 2k and 2k+1 (k < PAIRS) share a row up to 1e-4 noise and
    an outgoing column up to noise; the QUIET units have small rows, random directions and
    outgoing columns of 1e-3. The 5-color base: the pairs, and the quiet units together."""
    rng = np.random.default_rng(0)
    model = build_mlp([6, 2 * PAIRS + QUIET, 4], planted=False)
    rows = np.repeat(rng.standard_normal((PAIRS, 6)), 2, axis=0) + 1e-4 * rng.standard_normal((2 * PAIRS, 6))
    bias = np.repeat(rng.uniform(0.2, 0.5, PAIRS), 2)
    outgoing = np.repeat(rng.standard_normal((4, PAIRS)), 2, axis=1) + 1e-4 * rng.standard_normal((4, 2 * PAIRS))
    quiet_rows = 0.05 * rng.standard_normal((QUIET, 6))
    weights = {"W0": np.vstack([rows, quiet_rows]), "b0": np.concatenate([bias, np.full(QUIET, 0.01)]),
               "W1": np.hstack([outgoing, 1e-3 * rng.standard_normal((4, QUIET))])}
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(np.float32), init.name))
    planted = Partition(np.concatenate([np.repeat(np.arange(PAIRS), 2), np.full(QUIET, PAIRS)]))
    return model, planted


def _eps_for_colors(model, colors: int) -> float:
    """A uniform eps at which the cosine clustering of the hidden layer keeps ``colors`` colors."""
    heights = analyze(model, eps=0.0, record_heights=True).heights["fc0"]
    merges = len(heights) + 1 - colors
    return float(0.5 * (heights[merges - 1] + heights[merges]))


def test_folder_recovers_the_planted_base_that_cosine_clustering_misses():
    model, planted = planted_model()
    analysis = analyze(model, eps=_eps_for_colors(model, planted.n_colors))
    cosine = analysis.plan(next(s for s in analysis.sites if s.name == "fc0").outputs[0]).partition
    assert cosine.n_colors == planted.n_colors and cosine != planted  # directions alone mix the quiet units in
    assert Folder(model).colorings(analysis) == {"fc0": planted}


def test_target_search_reaches_the_planted_base_with_a_small_error():
    model, planted = planted_model()
    data = {"x": np.random.default_rng(1).standard_normal((256, 6)).astype(np.float32)}
    (reference,), = run_tensors(model, ["y"], [data], "original")
    params = lambda width: 6 * width + width + width * 4 + 4  # noqa: E731
    result = onnxfib.compress(model, target_params=params(planted.n_colors) / params(len(planted)), data=data,
                              check=False)
    (folded,), = run_tensors(result.model, ["y"], [data], "compressed")
    assert [layer.width_after for layer in result.report.layers] == [planted.n_colors, 4]
    cosine = onnxfib.compress(model, eps=_eps_for_colors(model, planted.n_colors), check=False)
    (merged,), = run_tensors(cosine.model, ["y"], [data], "compressed")
    assert cosine.report.params_after == result.report.params_after
    folded_error, cosine_error = np.abs(folded - reference).max(), np.abs(merged - reference).max()
    assert folded_error < 0.01 < cosine_error  # the quiet units' whole contribution is below 0.01


def test_outgoing_weights_of_a_conv_read_through_a_flatten_are_its_column_blocks():
    """Conv (4 channels on 4x4) -> Relu -> Flatten -> Gemm: channel c's outgoing weights are the
    Gemm's 16 columns c*16 .. c*16+15 (c-major flatten), laid out position by position."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(2)
    conv_w, conv_b = rng.standard_normal((4, 1, 3, 3)), rng.standard_normal(4)
    gemm_w, gemm_b = rng.standard_normal((3, 64)), rng.standard_normal(3)
    inits = [numpy_helper.from_array(a.astype(np.float32), n)
             for a, n in [(conv_w, "cw"), (conv_b, "cb"), (gemm_w, "gw"), (gemm_b, "gb")]]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    analysis = analyze(model, eps=0.0)
    conv = next(s for s in analysis.sites if s.name == "conv")
    expected = gemm_w.reshape(3, 4, 16).transpose(1, 2, 0).reshape(4, 48)
    np.testing.assert_allclose(outgoing_weights(analysis, conv), expected, rtol=1e-6)
    assert "conv" in Folder(model)._trees
