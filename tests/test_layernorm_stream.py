"""The residual stream narrows exactly through LayerNormalization (weighted statistics).

A hand-built transformer-like graph (word and token-type embedding Gathers, Add, LayerNorm,
a ReLU FFN with a residual Add, LayerNorm, output projection) is lifted from a base by
duplicating stream channels: embedding columns, the FFN writer's rows and both LayerNorms'
gamma and beta copied, readers' columns split. The lifted LayerNorms compute the duplicated
channels' statistics, which are the base's multiplicity-weighted ones, so eps = 0 must give
exactly the base's parameter count plus the weighted form's constants (one shared weight vector
of the base width and one shared epsilon) and the lifted model's outputs in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import compress_and_compare, lift_map, run
from onnx import TensorProto, helper, numpy_helper

from onnxfib.stats import count_parameters

V, TYPES, D, F, K, EXTRA = 11, 2, 5, 7, 3, 4


def _stream_model(p: dict[str, np.ndarray], end: str = "projected", opset: int = 17,
                  bias2: bool = True) -> onnx.ModelProto:
    """ids, types -> Gather + Gather -> Add -> LN -> FFN (+ residual) -> LN -> ``end``: a projection
    of every token (``projected``), nothing (``stream``: the stream is the output), or BERT's
    pooler (``pooled``: token 0 by a Gather along the sequence axis, then the projection)."""
    unused = ({"Wo", "co"} if end == "stream" else set()) | (set() if bias2 else {"b2"})
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in p.items() if k not in unused]
    if end == "pooled":
        inits.append(numpy_helper.from_array(np.asarray(0, dtype=np.int64), "first"))
    last = ["r", "g2", "b2"] if bias2 else ["r", "g2"]
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["we"], axis=0),
        helper.make_node("Gather", ["T", "types"], ["te"], axis=0),
        helper.make_node("Add", ["we", "te"], ["emb"]),
        helper.make_node("LayerNormalization", ["emb", "g1", "b1"], ["h"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["h", "W1"], ["a"]),
        helper.make_node("Add", ["a", "c1"], ["ab"]),
        helper.make_node("Relu", ["ab"], ["z"]),
        helper.make_node("MatMul", ["z", "W2"], ["f"]),
        helper.make_node("Add", ["f", "c2"], ["fb"]),
        helper.make_node("Add", ["h", "fb"], ["r"]),
        helper.make_node("LayerNormalization", last, ["y" if end == "stream" else "n"], axis=-1, epsilon=1e-5),
    ]
    if end == "pooled":
        nodes.append(helper.make_node("Gather", ["n", "first"], ["n0"], axis=1))
    if end != "stream":
        nodes += [helper.make_node("MatMul", ["n0" if end == "pooled" else "n", "Wo"], ["o"]),
                  helper.make_node("Add", ["o", "co"], ["y"])]
    shape = {"projected": ["batch", "seq", K], "stream": ["batch", "seq", p["g2"].size], "pooled": ["batch", K]}[end]
    graph = helper.make_graph(
        nodes, "stream",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("ids", "types")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _base(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "E": rng.standard_normal((V, D)), "T": rng.standard_normal((TYPES, D)),
        "g1": rng.uniform(0.5, 2, D), "b1": rng.standard_normal(D),
        "W1": rng.standard_normal((D, F)), "c1": rng.standard_normal(F),
        "W2": rng.standard_normal((F, D)), "c2": rng.standard_normal(D),
        "g2": rng.uniform(0.5, 2, D), "b2": rng.standard_normal(D),
        "Wo": rng.standard_normal((D, K)), "co": rng.standard_normal(K),
    }


def _lift(p: dict[str, np.ndarray], source: np.ndarray, share: np.ndarray) -> dict[str, np.ndarray]:
    """Stream channel i of the lift copies base channel ``source[i]``; readers' rows split by ``share``."""
    lifted = dict(p)
    for name in ("E", "T", "W2"):
        lifted[name] = p[name][:, source]
    for name in ("g1", "b1", "c2", "g2", "b2"):
        lifted[name] = p[name][source]
    for name in ("W1", "Wo"):
        lifted[name] = p[name][source] * share[:, None]
    return lifted


def _feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"ids": rng.integers(0, V, (3, 4)).astype(np.int64),
            "types": rng.integers(0, TYPES, (3, 4)).astype(np.int64)}


CASES = [("projected", 17, True), ("stream", 17, True), ("pooled", 17, True), ("projected", 18, False)]


@pytest.mark.parametrize("end,opset,bias2", CASES, ids=[f"{e}-opset{o}{'' if b else '-no-bias'}" for e, o, b in CASES])
def test_planted_stream_lift_collapses_to_base(end, opset, bias2):
    """Back to the base's count plus D weights and one epsilon; outputs equal the lift's. Where the
    stream is the graph output, it is re-expanded there by a Gather (no weights)."""
    rng = np.random.default_rng(0)
    base = _base(rng)
    source, share = lift_map(rng, D, EXTRA)
    lifted = _stream_model(_lift(base, source, share), end, opset, bias2)
    analysis, out, params = compress_and_compare(lifted, _feeds(rng))
    assert params == count_parameters(_stream_model(base, end, opset, bias2)) + D + 1
    assert {n.op_type for n in out.graph.node} >= {"ReduceSum", "Sqrt", "Div"}
    assert "LayerNormalization" not in {n.op_type for n in out.graph.node}
    assert [layer.width_after for layer in analysis.layers] == ([F, D] + ([] if end == "stream" else [K]))
    if end == "stream":
        expand = [n for n in out.graph.node if n.output[0] == "y"]
        assert expand[0].op_type == "Gather"
        dims = [d.dim_value or d.dim_param for d in out.graph.output[0].type.tensor_type.shape.dim]
        assert dims == ["batch", "seq", D + EXTRA]
    feeds = _feeds(np.random.default_rng(5))
    np.testing.assert_allclose(run(out, feeds), run(lifted, feeds), rtol=1e-5, atol=1e-5)


def test_the_weighted_statistics_are_not_the_base_statistics():
    """Control: the lift is not the base's function (its LayerNorms weigh the copies), so the
    equality above is the weighted form's, not a coincidence of plain statistics."""
    rng = np.random.default_rng(0)
    base = _base(rng)
    source, share = lift_map(rng, D, EXTRA)
    feeds = _feeds(rng)
    lifted, plain = _stream_model(_lift(base, source, share)), _stream_model(base)
    assert not np.allclose(run(lifted, feeds), run(plain, feeds), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("broken", ["scaled-copy", "gamma"])
def test_unequal_channels_do_not_merge_through_layer_norm(broken):
    """A column copied at twice its scale is proportional, not equal: LayerNorm is not
    positively homogeneous per channel, so it must not merge (only unit-scale fibers do). A copy
    with its own gamma must not merge either. The model keeps its size and outputs."""
    rng = np.random.default_rng(1)
    base = _base(rng)
    source, share = lift_map(rng, D, 1)
    lifted = _lift(base, source, share)
    if broken == "scaled-copy":
        lifted["E"][:, -1] *= 2.0
        lifted["T"][:, -1] *= 2.0
    else:
        lifted["g1"][-1] += 0.5
        lifted["g2"][-1] += 0.5
    model = _stream_model(lifted)
    analysis, _, params = compress_and_compare(model, _feeds(rng))
    assert params == count_parameters(model)
    assert [layer.width_after for layer in analysis.layers] == [F, D + 1, K]


def test_proportional_embedding_columns_merge_into_a_layer():
    """The scale rule on embedding columns: a column copied at twice its scale, read directly by
    a layer (no LayerNorm between), merges with that scale folded into the layer's column."""
    rng = np.random.default_rng(2)
    table, w, c = rng.standard_normal((V, D)), rng.standard_normal((D, K)), rng.standard_normal(K)
    source, share = lift_map(rng, D, 2)
    scale = np.where(np.arange(source.size) >= D, 2.0, 1.0)
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for v, n in
             ((table[:, source] * scale, "E"), (w[source] * (share / scale)[:, None], "W"), (c, "c"))]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], axis=0), helper.make_node("MatMul", ["e", "W"], ["m"]),
             helper.make_node("Add", ["m", "c"], ["y"])]
    graph = helper.make_graph(nodes, "embedding",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _, _, params = compress_and_compare(model, {"ids": rng.integers(0, V, (3, 4)).astype(np.int64)})
    assert params == table.size + w.size + c.size


def test_half_precision_layer_norm_keeps_its_width():
    """A float16 LayerNorm computes its statistics in float32 (stash_type); the weighted form
    would not, so it keeps its width: a lift through it stays as it is, outputs unchanged."""
    rng = np.random.default_rng(3)
    x_w, gamma, beta = rng.standard_normal((K, D)), rng.uniform(0.5, 2, D), rng.standard_normal(D)
    source, _ = lift_map(rng, D, 2)
    inits = [numpy_helper.from_array(v.astype(np.float16), n)
             for v, n in ((x_w[:, source], "W"), (gamma[source], "g"), (beta[source], "b"))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", D + 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    analysis, _, params = compress_and_compare(model, {"x": rng.standard_normal((4, K)).astype(np.float16)},
                                               rtol=1e-3, atol=1e-3)
    assert params == count_parameters(model)
    assert [layer.width_after for layer in analysis.layers] == [D + 2]
