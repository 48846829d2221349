"""A round trip through the graph library loses nothing (issue 13).

A model where nothing merges comes out with the input's graph (only ``onnxfib.*`` metadata
added); a model that does merge keeps everything the rewrite did not touch: outer-scope
initializers of If/Loop branches, sequence/map output types, types without a shape, node doc
strings and metadata. The truth is the input model itself and ONNX Runtime run on it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import build_mlp
from graphs import Builder
from lifting import onnx_mlp
from onnx import TensorProto, helper, numpy_helper

import onnxfib
from onnxfib import cli
from onnxfib.stats import count_parameters

MODELS = Path(__file__).resolve().parents[1] / "models"


# ------------------------------------------------------------------------------ models


def if_loop_model(planted: bool) -> onnx.ModelProto:
    """MatMul/Add/Relu/MatMul, then an If whose branches add or multiply outer initializers C
    and D, then a Loop whose body adds C again; with ``planted`` hidden neuron 1 copies 0.
    Nodes carry metadata and a doc string."""
    rng = np.random.default_rng(0)
    w0, b0 = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    if planted:
        w0[:, 1], b0[1] = w0[:, 0], b0[0]
    inits = [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(b0, "b0"),
             numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "C"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "D"),
             numpy_helper.from_array(np.array(3, dtype=np.int64), "trip")]
    vi = helper.make_tensor_value_info
    then = helper.make_graph([helper.make_node("Add", ["y1", "C"], ["t"], name="then_add")], "then", [],
                             [vi("t", TensorProto.FLOAT, ["N", 3])])
    other = helper.make_graph([helper.make_node("Mul", ["y1", "D"], ["e"], name="else_mul")], "else", [],
                              [vi("e", TensorProto.FLOAT, ["N", 3])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_id"),
         helper.make_node("Add", ["acc_in", "C"], ["acc_out"], name="body_add")], "body",
        [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("acc_in", TensorProto.FLOAT, ["N", 3])],
        [vi("cond_out", TensorProto.BOOL, []), vi("acc_out", TensorProto.FLOAT, ["N", 3])])
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["m0"], name="mm0"),
             helper.make_node("Add", ["m0", "b0"], ["a0"], name="add0"),
             helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "W1"], ["y1"], name="mm1", doc_string="the second layer"),
             helper.make_node("If", ["cond"], ["yi"], name="if", then_branch=then, else_branch=other),
             helper.make_node("Loop", ["trip", "", "yi"], ["y"], name="loop", body=body)]
    nodes[0].metadata_props.add(key="pkg.origin", value="layer0")
    nodes[4].metadata_props.add(key="pkg.origin", value="branch")
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, ["N", 4]), vi("cond", TensorProto.BOOL, [])],
                              [vi("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def zipmap_classifier(planted: bool) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """scikit-learn's default export of a digits MLPClassifier (16 hidden units): a ZipMap
    output of type seq(map(int64, float)). With ``planted`` hidden unit 1 copies unit 0's
    incoming weights and bias. Returns the model, the inputs and the labels."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=60, random_state=0).fit(X, y)
    if planted:
        clf.coefs_[0][:, 1], clf.intercepts_[0][1] = clf.coefs_[0][:, 0], clf.intercepts_[0][0]
    return to_onnx(clf, X[:1]), X, y


def _shapeless(name: str, elem: int) -> onnx.ValueInfoProto:
    """A value_info whose type has no shape field (as older tools wrote them)."""
    value = onnx.ValueInfoProto()
    value.name = name
    value.type.tensor_type.elem_type = elem
    return value


def quantized_ir6(planted_head: bool = False) -> onnx.ModelProto:
    """A dynamically quantized model as an older onnx quantization tool wrote it: IR 6, opset
    11 with com.microsoft, DynamicQuantizeLinear -> ConvInteger -> rescale -> Relu -> Flatten ->
    com.microsoft DynamicQuantizeMatMul, value_info types without a shape field (the output
    listed there too) and an output dim without a value. ``planted_head`` appends a float
    Gemm/Relu/Gemm head whose hidden unit 1 copies unit 0 (something to merge)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (4, 3, 3, 3)).astype(np.uint8), "Wq"),
             numpy_helper.from_array(np.array(128, np.uint8), "wz"),
             numpy_helper.from_array(np.array(0.02, np.float32), "ws"),
             numpy_helper.from_array(rng.integers(-127, 127, (4 * 6 * 6, 5)).astype(np.int8), "Bq"),
             numpy_helper.from_array(np.array(0.01, np.float32), "bs"),
             numpy_helper.from_array(np.zeros(5, np.float32), "bias")]
    last = "q" if planted_head else "y"
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
             helper.make_node("ConvInteger", ["xq", "Wq", "xz", "wz"], ["ci"], name="convint"),
             helper.make_node("Cast", ["ci"], ["cf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["xs", "ws"], ["s"], name="scale"),
             helper.make_node("Mul", ["cf", "s"], ["c"], name="rescale"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("DynamicQuantizeMatMul", ["f", "Bq", "bs", "", "bias"], [last], name="dqmm",
                              domain="com.microsoft")]
    value_info = [_shapeless(last, TensorProto.FLOAT), _shapeless("xq", TensorProto.UINT8),
                  _shapeless("ci", TensorProto.INT32), _shapeless("cf", TensorProto.FLOAT),
                  _shapeless("r", TensorProto.FLOAT), _shapeless("f", TensorProto.FLOAT)]
    out_dims = [None, 5]
    if planted_head:
        w1, b1 = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
        w1[1], b1[1] = w1[0], b1[0]
        inits += [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "b1"),
                  numpy_helper.from_array(rng.standard_normal((3, 6)).astype(np.float32), "W2"),
                  numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b2")]
        nodes += [helper.make_node("Gemm", ["q", "W1", "b1"], ["g1"], name="fc1", transB=1),
                  helper.make_node("Relu", ["g1"], ["h1"], name="relu1"),
                  helper.make_node("Gemm", ["h1", "W2", "b2"], ["y"], name="fc2", transB=1)]
        value_info += [_shapeless("g1", TensorProto.FLOAT), _shapeless("h1", TensorProto.FLOAT)]
        out_dims = [None, 3]
    graph = helper.make_graph(nodes, "quantized", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)], inits,
                              value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=6, producer_name="onnxruntime.quantization", producer_version="1.5.0")
    onnx.checker.check_model(model, full_check=True)
    return model


def constant_node_cnn() -> onnx.ModelProto:
    """Conv/BatchNorm/Relu/GlobalAveragePool/Flatten/Gemm with random weights, some given as
    Constant nodes (which the graph view turns into constants while it works)."""
    rng = np.random.default_rng(3)
    b = Builder()
    w = b.const(rng.standard_normal((5, 2, 3, 3)), as_node=True)
    conv = b.op("Conv", ["x", w, b.const(rng.standard_normal(5))], pads=[1, 1, 1, 1])
    bn = b.op("BatchNormalization", [conv, b.const(rng.uniform(0.5, 1.5, 5)), b.const(rng.standard_normal(5)),
                                     b.const(rng.standard_normal(5)), b.const(rng.uniform(0.5, 1.5, 5))])
    pooled = b.op("GlobalAveragePool", [b.op("Relu", [bn])])
    flat = b.op("Flatten", [pooled])
    gemm = b.op("Gemm", [flat, b.const(rng.standard_normal((3, 5)), as_node=True), b.const(rng.standard_normal(3))],
                transB=1)
    return b.model({"x": ["N", 2, 6, 6]}, gemm, None)


def ort_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# --------------------------------------------------------------------------- comparison


def without_onnxfib_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the ``onnxfib.*`` metadata compress adds."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [p for p in copy.metadata_props if not p.key.startswith("onnxfib.")]
    del copy.metadata_props[:]
    copy.metadata_props.extend(kept)
    return copy


def assert_same_model(out: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """``out`` is ``model`` but for onnxfib's metadata: field by field, then byte for byte."""
    out = without_onnxfib_metadata(out)
    assert (out.ir_version, list(out.opset_import)) == (model.ir_version, list(model.opset_import))
    assert list(out.metadata_props) == list(model.metadata_props)
    assert list(out.functions) == list(model.functions)
    a, b = out.graph, model.graph
    assert [n.name for n in a.node] == [n.name for n in b.node]
    for got, want in zip(a.node, b.node):
        assert got == want, f"node {want.name or want.op_type} differs"
    assert list(a.input) == list(b.input)
    assert list(a.output) == list(b.output)
    assert list(a.value_info) == list(b.value_info)
    assert [t.name for t in a.initializer] == [t.name for t in b.initializer]
    assert list(a.initializer) == list(b.initializer)
    assert out.SerializeToString() == model.SerializeToString()


# ------------------------------------------------------------------- the property: no merge


def _skl_regressor() -> onnx.ModelProto:
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPRegressor

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = MLPRegressor(hidden_layer_sizes=(7,), max_iter=20, random_state=0).fit(X, X[:, 0])
    return to_onnx(est, X[:1])


def _random_mlp(use_gemm: bool, activation: str) -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    sizes = [6, 9, 7, 2]
    weights = [rng.standard_normal((o, i)).astype(np.float32) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rng.uniform(-0.5, 0.5, o).astype(np.float32) for o in sizes[1:]]
    return onnx_mlp(weights, biases, activation=activation, use_gemm=use_gemm)


UNMERGED = {
    "digits_mlp": lambda: onnx.load(MODELS / "digits_mlp.onnx"),
    "digits_mlp_dynamo": lambda: onnx.load(MODELS / "digits_mlp_dynamo.onnx"),
    "mlp": lambda: build_mlp([8, 6, 3], seed=1, planted=False),
    "mlp_static_batch": lambda: build_mlp([5, 7, 4, 2], seed=2, planted=False, batch=3),
    "onnx_mlp_matmul_tanh": lambda: _random_mlp(False, "tanh"),
    "onnx_mlp_gemm_relu": lambda: _random_mlp(True, "relu"),
    "cnn_constant_nodes": constant_node_cnn,
    "if_loop": lambda: if_loop_model(planted=False),
    "zipmap_classifier": lambda: zipmap_classifier(planted=False)[0],
    "skl_regressor": _skl_regressor,
    "quantized_ir6": quantized_ir6,
}


@pytest.mark.parametrize("name", sorted(UNMERGED))
def test_nothing_to_merge_gives_the_input_graph(name):
    model = UNMERGED[name]()
    result = onnxfib.compress(model, eps=0.0)
    assert result.report.validation.ok
    assert not [layer for layer in result.report.layers if layer.width_after < layer.width]
    assert_same_model(result.model, model)


def test_old_quantized_model_comes_out_unchanged_through_the_cli(tmp_path):
    model = quantized_ir6()
    source, target = tmp_path / "quantized.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    assert cli.main(["compress", str(source), str(target)]) == 0
    assert_same_model(onnx.load(str(target)), model)


def _torch_models(tmp_path: Path) -> dict[str, Path]:
    import torch  # noqa: F401
    from cnn_lifting import ResNetish
    from planted_utils import export_torch, export_torch_image, random_mlp
    from transformer_lifting import rnn_model, transformer_stack

    paths = {}
    for exporter in ("legacy", "dynamo"):
        paths[f"mlp-{exporter}"] = export_torch(random_mlp([6, 9, 4], "relu", seed=0), tmp_path / f"mlp-{exporter}.onnx",
                                                6, exporter=exporter)
        paths[f"resnetish-{exporter}"] = export_torch_image(ResNetish(), tmp_path / f"cnn-{exporter}.onnx", (3, 8, 8),
                                                            exporter=exporter)
    paths["encoder-legacy"] = export_torch(transformer_stack("encoder", seed=0), tmp_path / "enc.onnx", 16, seq=5)
    paths["lstm-legacy"] = export_torch(rnn_model("LSTM", seed=0), tmp_path / "lstm.onnx", 6, seq=4)
    return paths


@pytest.mark.slow
def test_nothing_to_merge_gives_the_input_graph_for_exports(tmp_path):
    """The same property on torch exports (legacy and dynamo: MLP, CNN, transformer, LSTM)
    and on a few of the onnx package's bundled light models (IR 3, opset 9)."""
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    paths = _torch_models(tmp_path)
    paths.update({name: light / f"light_{name}.onnx" for name in ("squeezenet", "shufflenet", "resnet50")})
    for name, path in paths.items():
        model = onnx.load(str(path))
        result = onnxfib.compress(path, eps=0.0)
        assert result.report.validation.ok, name
        assert_same_model(result.model, model)


# ------------------------------------------------------------- models that do merge (the fixes)


def _scope_initializers(graph: onnx.GraphProto) -> list[str]:
    """Initializer names of every subgraph of ``graph``, nested ones included."""
    names = []
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names += [t.name for t in sub.initializer] + _scope_initializers(sub)
    return names


def test_subgraph_outer_initializers_stay_outer_and_are_counted():
    model = if_loop_model(planted=True)
    result = onnxfib.compress(model, eps=0.0)
    out = result.model
    # W0 loses a column, b0 an entry, W1 a row; C and D (read only in the branches) stay
    assert (result.report.params_before, result.report.params_after) == (54, 54 - 4 - 1 - 3)
    assert [layer.width_after for layer in result.report.layers if layer.name == "mm0"] == [5]
    assert {"C", "D"} <= {t.name for t in out.graph.initializer}
    assert _scope_initializers(out.graph) == []
    originals = {n.name: n for n in model.graph.node}
    for node in out.graph.node:
        assert list(node.metadata_props) == list(originals[node.name].metadata_props)
        assert node.doc_string == originals[node.name].doc_string
        for attr, want in zip(node.attribute, originals[node.name].attribute):
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                assert attr == want
    x = np.random.default_rng(1).standard_normal((7, 4)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(ort_outputs(out, feeds)[0], ort_outputs(model, feeds)[0], rtol=1e-5, atol=1e-6)


def test_default_skl2onnx_classifier_compresses_with_its_zipmap():
    model, X, y = zipmap_classifier(planted=True)
    result = onnxfib.compress(model, eps=0.0)
    assert [(layer.width, layer.width_after) for layer in result.report.layers][0] == (16, 15)
    assert list(result.model.graph.output) == list(model.graph.output)  # seq(map(int64, float)) kept
    feeds = {"X": X[:50]}
    (labels, probabilities), (want_labels, want_probabilities) = ort_outputs(result.model, feeds), ort_outputs(model, feeds)
    np.testing.assert_array_equal(labels, want_labels)
    for got, want in zip(probabilities, want_probabilities):
        assert got.keys() == want.keys()
        np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-5, atol=1e-6)


def test_default_skl2onnx_classifier_meets_an_accuracy_target():
    model, X, y = zipmap_classifier(planted=True)
    result = onnxfib.compress(model, data={"X": X[:300]}, labels=y[:300], max_drop=0.02)
    assert result.report.target.met
    assert result.report.params_after < result.report.params_before
    assert list(result.model.graph.output) == list(model.graph.output)


def test_old_quantized_model_keeps_its_types_where_it_merges():
    model = quantized_ir6(planted_head=True)
    result = onnxfib.compress(model, eps=0.0)
    out = result.model
    assert [layer.width_after for layer in result.report.layers if layer.name == "fc1"] == [5]
    assert (out.ir_version, list(out.opset_import)) == (6, list(model.opset_import))
    assert list(out.graph.input) == list(model.graph.input) and list(out.graph.output) == list(model.graph.output)
    # types without a shape stay so (the narrowed g1 and h1 too: their new shapes are not known)
    assert {v.name: v for v in out.graph.value_info} == {v.name: v for v in model.graph.value_info}
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(ort_outputs(out, {"x": x})[0], ort_outputs(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_merged_models_keep_what_the_rewrite_did_not_touch():
    """The export path (something merges): interface types, unchanged initializers byte for
    byte, node metadata and doc strings, the source's value_info names."""
    model = build_mlp([8, 16, 12, 3])
    model.graph.node[1].doc_string = "first activation"
    model.graph.node[1].metadata_props.add(key="pkg.note", value="kept")
    model.graph.output[0].type.tensor_type.shape.dim[0].Clear()  # a dim without a value
    model.graph.value_info.extend([helper.make_tensor_value_info("r0", TensorProto.FLOAT, ["N", 16]),
                                   _shapeless("h1", TensorProto.FLOAT), _shapeless("y", TensorProto.FLOAT)])
    onnx.helper.set_model_props(model, {"author": "me"})
    out = onnxfib.compress(model, eps=0.0).model
    assert count_parameters(out) < count_parameters(model)
    assert list(out.graph.input) == list(model.graph.input) and list(out.graph.output) == list(model.graph.output)
    assert out.graph.node[1].doc_string == "first activation"
    assert list(out.graph.node[1].metadata_props) == list(model.graph.node[1].metadata_props)
    assert [v.name for v in out.graph.value_info] == ["r0", "h1", "y"]
    widths = [v.type.tensor_type.shape.dim[1].dim_value for v in out.graph.value_info[:2]]
    assert widths == [14, 10]  # narrowed: re-inferred
    assert out.graph.value_info[2] == model.graph.value_info[2]  # y: as it was
    assert [p.key for p in out.metadata_props if not p.key.startswith("onnxfib.")] == ["author"]
    unchanged = {t.name: t for t in model.graph.initializer if t.name in ("b2",)}
    assert all(t == unchanged[t.name] for t in out.graph.initializer if t.name in unchanged)


def test_a_slice_of_a_concat_that_a_branch_reads_stays():
    """The Slice-of-Concat bypass must not reroute readers inside a subgraph: the export writes
    the source's subgraphs, which read the slice by name."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 6)).astype(np.float32)
    w0[:, 1] = w0[:, 0]
    inits = [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(np.array([3], np.int64), "s"), numpy_helper.from_array(np.array([6], np.int64), "e"),
             numpy_helper.from_array(np.array([1], np.int64), "ax")]
    vi = helper.make_tensor_value_info
    then = helper.make_graph([helper.make_node("Relu", ["sl"], ["t"])], "then", [], [vi("t", TensorProto.FLOAT, ["N", 3])])
    other = helper.make_graph([helper.make_node("Neg", ["sl"], ["u"])], "else", [], [vi("u", TensorProto.FLOAT, ["N", 3])])
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["m0"], name="mm0"), helper.make_node("Relu", ["m0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "W1"], ["y1"], name="mm1"),
             helper.make_node("Concat", ["x3", "y1"], ["cat"], axis=1),
             helper.make_node("Slice", ["cat", "s", "e", "ax"], ["sl"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, ["N", 4]), vi("x3", TensorProto.FLOAT, ["N", 3]),
                                           vi("cond", TensorProto.BOOL, [])], [vi("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    result = onnxfib.compress(model, eps=0.0)
    assert [layer.width_after for layer in result.report.layers if layer.name == "mm0"] == [5]
    feeds = {"x": rng.standard_normal((5, 4)).astype(np.float32), "x3": rng.standard_normal((5, 3)).astype(np.float32)}
    for cond in (True, False):
        feeds["cond"] = np.array(cond)
        np.testing.assert_allclose(ort_outputs(result.model, feeds)[0], ort_outputs(model, feeds)[0], rtol=1e-5, atol=1e-6)


def test_a_layer_a_branch_reads_is_frozen_naming_the_branchs_if():
    """A hidden activation read inside an If's branch keeps its width (the branch reads it whole),
    and the reason names the reader and the If of the main graph that holds it, not a blank name."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 6)).astype(np.float32)
    w0[:, 1] = w0[:, 0]  # an exact fiber the branch forbids merging
    inits = [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "W1")]
    vi = helper.make_tensor_value_info
    then = helper.make_graph([helper.make_node("Relu", ["r0"], ["t"], name="inner")], "then", [],
                             [vi("t", TensorProto.FLOAT, ["N", 6])])
    other = helper.make_graph([helper.make_node("Neg", ["r0"], ["u"])], "else", [], [vi("u", TensorProto.FLOAT, ["N", 6])])
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["m0"], name="mm0"), helper.make_node("Relu", ["m0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "W1"], ["y"], name="mm1"),
             helper.make_node("If", ["cond"], ["z"], name="gate", then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, ["N", 4]), vi("cond", TensorProto.BOOL, [])],
                              [vi("y", TensorProto.FLOAT, ["N", 3]), vi("z", TensorProto.FLOAT, ["N", 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    frozen = {layer.name: (layer.width_after, layer.frozen) for layer in onnxfib.inspect(model)}
    width, reason = frozen["mm0"]
    assert width == 6 and reason in ("'r0' feeds Relu 'inner' in a subgraph of If 'gate'",
                                     "'r0' feeds an unnamed Neg in a subgraph of If 'gate'")
