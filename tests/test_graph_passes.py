"""GraphView's preprocessing passes, onnxruntime's log severity around folding, and ``Given``.

Each tiny model plants one thing a pass must rewrite; the view must name exactly the passes
planted (none on a model with nothing to do), and ONNX Runtime must give the preprocessed
graph's outputs for the original model's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfib.graph import PREPARATION, Given, GraphView, ort_log_severity

WIDTH = 8
Branch = tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[onnx.ValueInfoProto]]


def _weight(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _out(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def plain(tag: str) -> Branch:
    """MatMul by an initializer, then Relu: nothing to preprocess."""
    w = numpy_helper.from_array(_weight((WIDTH, 4), 1), f"{tag}_w")
    nodes = [helper.make_node("MatMul", ["x", w.name], [f"{tag}_h"]),
             helper.make_node("Relu", [f"{tag}_h"], [f"{tag}_y"])]
    return nodes, [w], [_out(f"{tag}_y")]


def constant_node(tag: str) -> Branch:
    """The weight of a MatMul held by a Constant node."""
    w = numpy_helper.from_array(_weight((WIDTH, 4), 2), f"{tag}_w")
    nodes = [helper.make_node("Constant", [], [w.name], value=w),
             helper.make_node("MatMul", ["x", w.name], [f"{tag}_y"])]
    return nodes, [], [_out(f"{tag}_y")]


def transposed_weight(tag: str) -> Branch:
    """A weight stored transposed and turned by a Transpose node: a constant subexpression."""
    w = numpy_helper.from_array(_weight((4, WIDTH), 3), f"{tag}_w")
    nodes = [helper.make_node("Transpose", [w.name], [f"{tag}_wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", f"{tag}_wt"], [f"{tag}_y"])]
    return nodes, [w], [_out(f"{tag}_y")]


def head_split(tag: str) -> Branch:
    """A reshape to (-1, 2, width / 2) whose last entry is Div of a read size (which ONNX data
    propagation does not follow), then scaling by 1/sqrt(last size) read back through Shape:
    that size is static only after the target is folded and shapes are inferred again."""
    ints = {f"{tag}_one": np.array(1, np.int64), f"{tag}_two": np.array(2, np.int64),
            f"{tag}_zero": np.array([0], np.int64), f"{tag}_lead": np.array([-1, 2], np.int64),
            f"{tag}_last": np.array(2, np.int64)}
    inits = [numpy_helper.from_array(v, k) for k, v in ints.items()]
    t = tag
    nodes = [
        helper.make_node("Shape", ["x"], [f"{t}_s"]),
        helper.make_node("Gather", [f"{t}_s", f"{t}_one"], [f"{t}_width"], axis=0),
        helper.make_node("Div", [f"{t}_width", f"{t}_two"], [f"{t}_half"]),
        helper.make_node("Unsqueeze", [f"{t}_half", f"{t}_zero"], [f"{t}_halfv"]),
        helper.make_node("Concat", [f"{t}_lead", f"{t}_halfv"], [f"{t}_target"], axis=0),
        helper.make_node("Reshape", ["x", f"{t}_target"], [f"{t}_r"]),
        helper.make_node("Shape", [f"{t}_r"], [f"{t}_rs"]),
        helper.make_node("Gather", [f"{t}_rs", f"{t}_last"], [f"{t}_d"], axis=0),
        helper.make_node("Cast", [f"{t}_d"], [f"{t}_df"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", [f"{t}_df"], [f"{t}_scale"]),
        helper.make_node("Div", [f"{t}_r", f"{t}_scale"], [f"{t}_y"]),
    ]
    return nodes, inits, [_out(f"{t}_y")]


def concat_slice(tag: str) -> Branch:
    """Slice taking back the second of two concatenated activations (torch's h_n[-1])."""
    inits = [numpy_helper.from_array(np.array([v], np.int64), f"{tag}_{k}")
             for k, v in (("start", WIDTH), ("end", 2 * WIDTH), ("axis", 1))]
    nodes = [helper.make_node("Relu", ["x"], [f"{tag}_a"]),
             helper.make_node("Sigmoid", ["x"], [f"{tag}_b"]),
             helper.make_node("Concat", [f"{tag}_a", f"{tag}_b"], [f"{tag}_h"], axis=1),
             helper.make_node("Slice", [f"{tag}_h"] + [i.name for i in inits], [f"{tag}_s"]),
             helper.make_node("Tanh", [f"{tag}_s"], [f"{tag}_y"])]
    return nodes, inits, [_out(f"{tag}_y")]


def unsorted(tag: str) -> Branch:
    """Two nodes listed after the node that reads them."""
    nodes = [helper.make_node("Sigmoid", [f"{tag}_a"], [f"{tag}_y"]),
             helper.make_node("Relu", [f"{tag}_h"], [f"{tag}_a"]),
             helper.make_node("Neg", ["x"], [f"{tag}_h"])]
    return nodes, [], [_out(f"{tag}_y")]


#: What each planted branch must make the view report.
PLANTED: dict[str, tuple[Callable[[str], Branch], tuple[str, ...]]] = {
    "nothing": (plain, ()),
    "constant node": (constant_node, ("materialise-constants",)),
    "constant subexpression": (transposed_weight, ("fold-constants",)),
    "size known after folding": (head_split, ("fold-constants", "infer-folded-sizes")),
    "concat then slice": (concat_slice, ("bypass-concat-slices",)),
    "unsorted nodes": (unsorted, ("toposort",)),
}


def build(*branches: Callable[[str], Branch]) -> onnx.ModelProto:
    """One model reading x [N, WIDTH] into every branch (each with its own outputs)."""
    nodes, inits, outputs = [], [], []
    for index, branch in enumerate(branches):
        n, i, o = branch(f"b{index}")
        nodes += n
        inits += i
        outputs += o
    graph = helper.make_graph(nodes, "planted", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", WIDTH])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def assert_preprocessing_keeps_outputs(model: onnx.ModelProto, view: GraphView) -> None:
    x = np.random.default_rng(0).standard_normal((3, WIDTH)).astype(np.float32)
    for got, want in zip(run(view.export(), x), run(model, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("planted", PLANTED)
def test_view_names_exactly_the_passes_its_planted_model_needs(planted):
    branch, expected = PLANTED[planted]
    model = build(branch)
    before = model.SerializeToString()
    view = GraphView(model)
    assert view.changes == expected
    assert model.SerializeToString() == before  # the source is never rewritten
    assert_preprocessing_keeps_outputs(model, view)


def test_every_pass_changes_a_model_planted_with_everything():
    model = build(*(branch for branch, _ in PLANTED.values()))
    view = GraphView(model)
    assert view.changes == tuple(step.name for step in PREPARATION)
    assert_preprocessing_keeps_outputs(model, view)
    ops = [node.op for node in view.graph.nodes]
    assert "Constant" not in ops and "Transpose" not in ops  # materialised, folded
    assert "Shape" not in ops  # both sizes read, the second only once the first was folded
    assert "Slice" not in ops and "Concat" not in ops  # the slice's reader reads b directly


def test_a_view_of_a_prepared_graph_runs_no_pass_and_keeps_its_outputs():
    model = build(*(branch for branch, _ in PLANTED.values()))
    prepared = GraphView(model)
    copy = GraphView(model, prepared=prepared.graph)
    assert copy.changes == ()
    assert [n.op for n in copy.graph.nodes] == [n.op for n in prepared.graph.nodes]
    assert_preprocessing_keeps_outputs(model, copy)


def _unused_initializer_warns(capfd) -> bool:
    """Whether onnxruntime, at its current process-wide severity, prints the warning it gives
    for an unused initializer (a session without its own severity follows the default)."""
    unused = numpy_helper.from_array(np.ones(3, np.float32), "unused")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warns",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [unused])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    capfd.readouterr()
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return "Removing initializer 'unused'" in capfd.readouterr().err


def test_folding_restores_the_log_severity_in_force_before_it(capfd):
    folds = build(transposed_weight)
    assert _unused_initializer_warns(capfd)  # onnxruntime's default: warnings
    assert GraphView(folds).changes == ("fold-constants",)
    assert _unused_initializer_warns(capfd)  # back to warnings, not left at errors
    with ort_log_severity(3):
        assert not _unused_initializer_warns(capfd)
        assert GraphView(folds).changes == ("fold-constants",)
        assert not _unused_initializer_warns(capfd)  # still errors only, not reset to warnings
        with ort_log_severity(0):
            pass
        assert not _unused_initializer_warns(capfd)
    assert _unused_initializer_warns(capfd)


def _node(op: str, inputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, ["out"], **attrs)


@pytest.mark.parametrize(
    ("inputs", "attrs", "present", "values"),
    [
        (["x"], {}, False, None),  # neither input nor attribute: absent
        (["x", ""], {}, False, None),  # an empty input name is an omitted optional input
        (["x"], {"axes": [2, 0]}, True, [2, 0]),  # attribute (older opsets)
        (["x", "k"], {}, True, [1, 3]),  # constant input (newer opsets)
        (["x", "k_id"], {}, True, [1, 3]),  # constant behind an Identity
        (["x", "axes_in"], {}, True, None),  # a graph input: given, not constant
    ],
)
def test_given_says_whether_an_operand_is_absent_constant_or_computed(inputs, attrs, present,
                                                                      values):
    node = _node("Squeeze", inputs, **attrs)
    k = numpy_helper.from_array(np.array([1, 3], np.int64), "k")
    nodes = [helper.make_node("Identity", ["k"], ["k_id"]), node]
    graph = helper.make_graph(nodes, "g", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 1]),
        helper.make_tensor_value_info("axes_in", TensorProto.INT64, [2])], [_out("out")], [k])
    view = GraphView(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    squeeze = next(n for n in view.graph.nodes if n.op == "Squeeze")
    given = view.given(squeeze, 1, "axes")
    assert (given.present, given.ints) == (present, values)
    assert given.constant == (values is not None)
    assert given.computed == (present and values is None)
    if values is not None:
        np.testing.assert_array_equal(given.value, values)


def test_given_properties_and_an_operand_without_attribute():
    absent, constant = Given(False), Given(True, np.array([1.5, 2.0]))
    assert (absent.present, absent.constant, absent.computed, absent.ints) == (False, False, False, None)
    assert (constant.constant, constant.computed, constant.ints) == (True, False, [1, 2])
    conv = helper.make_node("Conv", ["x", "w", "b"], ["out"])
    w = numpy_helper.from_array(_weight((3, 3, 1, 1), 4), "w")
    graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["b"], axes=[0, 2, 3],
                                                keepdims=0), conv], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [_out("out")], [w])
    view = GraphView(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    node = next(n for n in view.graph.nodes if n.op == "Conv")
    assert view.given(node, 2).computed  # a bias computed from the input
    assert not view.given(node, 3).present
