"""onnxfib.validation: input generation, user data, output comparison in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import build_mlp
from onnx import TensorProto, helper, numpy_helper

from onnxfib import validation as v
from onnxfib.errors import InvalidModelError, UsageError


def _model(inputs: list[onnx.ValueInfoProto], initializers=()) -> onnx.ModelProto:
    """Identity on the first input; the other inputs are declared but unused."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [inputs[0].name], ["out"])],
        "g",
        inputs,
        [helper.make_tensor_value_info("out", inputs[0].type.tensor_type.elem_type, None)],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("x:1,64", ("x", (1, 64))), ("input:0:2,3", ("input:0", (2, 3))), ("s:", ("s", ())), ("a: 3 ", ("a", (3,)))],
)
def test_parse_input_shape(text, expected):
    assert v.parse_input_shape(text) == expected


@pytest.mark.parametrize("text", ["x", ":1,2", "x:1,a", "x:0,3", "x:-1", "x:1,,2"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(UsageError, match="--input-shape"):
        v.parse_input_shape(text)


def test_generate_inputs_dtypes_and_shapes():
    model = _model(
        [
            helper.make_tensor_value_info("f", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT16, [2, 3]),
            helper.make_tensor_value_info("i", TensorProto.INT64, ["N", "S"]),
            helper.make_tensor_value_info("b", TensorProto.BOOL, [5]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3]),
        ],
        [numpy_helper.from_array(np.zeros(3, np.float32), "w")],
    )
    first, second = v.generate_inputs(model, input_shapes={"i": (2, 7)}, seed=3)
    assert set(first) == {"f", "h", "i", "b"}  # initializer-backed "w" is not fed
    assert first["f"].shape == (1, 4) and first["f"].dtype == np.float32
    assert first["h"].dtype == np.float16 and first["i"].shape == (2, 7) and first["i"].dtype == np.int64
    assert set(np.unique(first["i"])) <= {0, 1} and first["b"].dtype == bool
    assert np.all(np.abs(second["f"]) <= 1.0)
    again, _ = v.generate_inputs(model, input_shapes={"i": (2, 7)}, seed=3)
    np.testing.assert_array_equal(first["f"], again["f"])
    many, _ = v.generate_inputs(model, input_shapes={"i": (2, 7)}, seed=3, rows=64)
    assert many["f"].shape == (64, 4) and many["h"].shape == (2, 3)  # only an unknown first axis grows
    assert many["i"].shape == (64, 7)  # given 2, but the model leaves it open: measuring needs rows


def test_given_first_axis_widens_to_measuring_rows_within_the_element_cap(monkeypatch):
    """``--input-shape x:1,3,8,8`` on a model with a dynamic batch names the image size; a search
    (rows > 1) still measures on ``rows`` samples, as many as the element cap allows, and never
    on fewer than given. A declared batch grows alike (its samples run that many at a time)."""
    dynamic = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    assert v.generate_inputs(dynamic, input_shapes={"x": (1, 3, 8, 8)})[0]["x"].shape == (1, 3, 8, 8)
    assert v.generate_inputs(dynamic, input_shapes={"x": (1, 3, 8, 8)}, rows=128)[0]["x"].shape == (128, 3, 8, 8)
    monkeypatch.setattr(v, "MAX_GENERATED_ELEMENTS", 3 * 8 * 8 * 10)
    assert v.generate_inputs(dynamic, input_shapes={"x": (1, 3, 8, 8)}, rows=128)[0]["x"].shape == (10, 3, 8, 8)
    assert v.generate_inputs(dynamic, input_shapes={"x": (10, 3, 8, 8)}, rows=128)[0]["x"].shape == (10, 3, 8, 8)
    fixed = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, "H", "W"])])
    assert v.generate_inputs(fixed, input_shapes={"x": (2, 3, 8, 8)})[0]["x"].shape == (2, 3, 8, 8)
    assert v.generate_inputs(fixed, input_shapes={"x": (2, 3, 8, 8)}, rows=128)[0]["x"].shape == (10, 3, 8, 8)


def _conv_gemm_matmul(batch: object = "N") -> onnx.ModelProto:
    """Conv 3->8 (3x3, pad 1) on 3x16x16, Flatten, Gemm 2048->10 (transB), then a MatMul of the
    (N, 10) result by a 10x4 weight: multiply-accumulates per row by hand
    8*16*16*3*3*3 + 2048*10 + 10*4 = 75,816."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w", (8, 3, 3, 3)), ("g", (10, 2048)), ("m", (10, 4)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["h"], transB=1),
             helper.make_node("MatMul", ["h", "m"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_count_macs_sums_conv_gemm_and_matmul_by_their_shapes():
    """The hand count of ``_conv_gemm_matmul``, linear in the rows."""
    from onnxfib.stats import count_macs

    model = _conv_gemm_matmul()
    per_row = 8 * 16 * 16 * 3 * 3 * 3 + 2048 * 10 + 10 * 4
    assert count_macs(model, {"x": (1, 3, 16, 16)}) == per_row
    assert count_macs(model, {"x": (5, 3, 16, 16)}) == 5 * per_row


def test_a_budget_of_multiply_accumulates_cuts_the_measuring_rows():
    """``max_macs`` keeps a generated batch within that many multiply-accumulates of one run (the
    rows of a search on a costly model), never fewer than FEWEST_BUDGETED_ROWS rows, and leaves a
    cheap model its ``rows``."""
    model = _conv_gemm_matmul()
    per_row = 75_816
    shape = {"x": (1, 3, 16, 16)}
    assert v.generate_inputs(model, input_shapes=shape, rows=128, max_macs=20 * per_row)[0]["x"].shape[0] == 20
    assert v.generate_inputs(model, input_shapes=shape, rows=128, max_macs=per_row)[0]["x"].shape[0] == \
        v.FEWEST_BUDGETED_ROWS
    assert v.generate_inputs(model, input_shapes=shape, rows=128, max_macs=1000 * per_row)[0]["x"].shape[0] == 128
    assert v.generate_inputs(model, input_shapes={"x": (30, 3, 16, 16)}, rows=128,
                             max_macs=20 * per_row)[0]["x"].shape[0] == 30  # never fewer than given


def test_default_validation_compares_many_generated_inputs_within_its_element_budget(monkeypatch, mlp_model):
    """Validation without data compares VALIDATION_ROWS rows per distribution on an unknown first
    axis, fewer where a batch would pass VALIDATION_ELEMENTS; a first axis --input-shape gives is
    kept; a fixed-batch model gets a multiple of its batch (fed that many at a time)."""
    import onnxfib

    report = onnxfib.validate(mlp_model, mlp_model)
    assert report.ok and report.batches == 2 and report.samples == 2 * v.VALIDATION_ROWS == 64
    assert onnxfib.compress(mlp_model).report.validation.samples == 64
    assert onnxfib.validate(mlp_model, mlp_model, input_shapes={"x": (4, 8)}).samples == 8
    fixed = build_mlp([8, 16, 3], batch=3)
    assert onnxfib.validate(fixed, fixed).samples == 2 * 30
    wide = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    shape = v.generate_inputs(wide, input_shapes={"x": (1, 3, 512, 512)}, rows=v.VALIDATION_ROWS,
                              widen_given=False, max_elements=v.VALIDATION_ELEMENTS)[0]["x"].shape
    assert shape == (1, 3, 512, 512)
    deep = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 256, 256])])
    shape = v.generate_inputs(deep, rows=v.VALIDATION_ROWS, max_elements=v.VALIDATION_ELEMENTS)[0]["x"].shape
    assert shape == (v.VALIDATION_ELEMENTS // (3 * 256 * 256), 3, 256, 256) == (5, 3, 256, 256)
    monkeypatch.setattr(v, "MAX_GENERATED_ELEMENTS", 3 * 8 * 8 * 10)  # a search's rows shrink to the cap too
    deep = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])])
    assert v.generate_inputs(deep, rows=128)[0]["x"].shape == (10, 3, 8, 8)


def test_validation_falls_back_to_one_row_where_a_declared_dynamic_batch_is_not():
    """A model that declares x[N, 8] but reshapes it to [1, 8] runs only one sample: ORT cannot
    run it on VALIDATION_ROWS rows, so the verdict comes from one row per distribution (as before
    the wider default), for compress and validate alike; the merge is still checked."""
    import onnxfib

    model = build_mlp([8, 16, 3])
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 8], np.int64), "one_row"))
    model.graph.node.insert(0, helper.make_node("Reshape", ["x", "one_row"], ["x1"], name="pin"))
    model.graph.node[1].input[0] = "x1"
    report = onnxfib.validate(model, model)
    assert report.ok and report.samples == 2
    result = onnxfib.compress(model)
    assert result.report.validation.ok and result.report.validation.samples == 2
    assert result.report.params_after < result.report.params_before


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ({}, "dynamic axis 1"),
        ({"i": (2, 7, 1)}, "declares"),
        ({"zz": (1, 2)}, "unknown input"),
    ],
)
def test_generate_inputs_needs_shapes(shapes, match):
    model = _model([helper.make_tensor_value_info("i", TensorProto.INT64, ["N", "S"])])
    with pytest.raises(UsageError, match=match):
        v.generate_inputs(model, input_shapes=shapes)


def test_fixed_dims_must_agree_with_input_shape(mlp_model):
    with pytest.raises(UsageError, match="declares"):
        v.generate_inputs(mlp_model, input_shapes={"x": (2, 9)})
    assert v.generate_inputs(mlp_model, input_shapes={"x": (5, 8)})[0]["x"].shape == (5, 8)


def test_load_data_npz_and_npy(tmp_path, mlp_model):
    """float64 data is kept as read and cast to the input's float32 as it runs: the outputs are
    ONNX Runtime's on the float32 copy."""
    x = np.random.default_rng(0).standard_normal((4, 8))
    np.savez(tmp_path / "d.npz", x=x)
    np.save(tmp_path / "d.npy", x)
    (expected,), = v.run_tensors(mlp_model, ["y"], [{"x": x.astype(np.float32)}], "model")
    for name in ("d.npz", "d.npy"):
        (batch,) = v.load_data(tmp_path / name, mlp_model)
        assert batch["x"].shape == (4, 8)
        (got,), = v.run_tensors(mlp_model, ["y"], [batch], "model")
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"wrong": np.zeros((1, 8), np.float32)}, "model's inputs"),
        ({"x": np.zeros((1, 9), np.float32)}, "shape"),
        ({"x": np.zeros((8,), np.float32)}, "shape"),
        ({"x": np.zeros((1, 8), bool)}, "dtype bool"),
        ({"x": np.full((1, 8), 2**40 + 1, np.int64)}, "cannot hold exactly"),
    ],
)
def test_load_data_rejects(tmp_path, mlp_model, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UsageError, match=match) as info:
        v.load_data(tmp_path / "d.npz", mlp_model)
    assert "d.npz" in str(info.value)


def test_load_data_unreadable(tmp_path, mlp_model):
    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    with pytest.raises(UsageError, match="junk.npz"):
        v.load_data(tmp_path / "junk.npz", mlp_model)
    with pytest.raises(UsageError, match="not found"):
        v.load_data(tmp_path / "none.npz", mlp_model)


def test_validate_identical_models_is_exact(mlp_model):
    inputs = v.generate_inputs(mlp_model)
    report = v.validate_models(mlp_model, mlp_model, inputs)
    assert report.ok and report.batches == 2
    assert report.outputs[0].name == "y" and report.outputs[0].max_abs == 0.0


def test_validate_different_models_mismatch(mlp_model):
    other = build_mlp([8, 16, 12, 3], seed=5)
    report = v.validate_models(mlp_model, other, v.generate_inputs(mlp_model))
    assert not report.ok
    assert report.outputs[0].max_abs > 1e-3 and report.outputs[0].max_rel > 1e-3


def test_compare_outputs_tolerance_scales_with_output_magnitude():
    ref = np.array([1000.0, 0.0])
    assert v.compare_outputs("o", [ref], [ref + [0.0, 5e-3]], rtol=1e-5, atol=1e-5).ok  # 5e-3 <= 1e-5 * 1000
    assert not v.compare_outputs("o", [ref], [ref + [0.0, 2e-2]], rtol=1e-5, atol=1e-5).ok
    small = np.array([0.5, 0.0])
    assert not v.compare_outputs("o", [small], [small + [0.0, 2e-5]], rtol=1e-5, atol=1e-5).ok
    nan = np.array([np.nan, 1.0])
    assert v.compare_outputs("o", [nan], [nan.copy()], rtol=0, atol=0).ok
    out = v.compare_outputs("o", [nan], [np.array([1.0, 1.0])], rtol=0, atol=0)
    assert not out.ok and out.max_abs == np.inf
    assert not v.compare_outputs("o", [ref], [ref[:1]], rtol=1, atol=1).ok


def test_validate_rejects_models_with_different_outputs(mlp_model):
    other = build_mlp([8, 16, 12, 3])
    other.graph.output[0].name = "z"
    other.graph.node[-1].output[0] = "z"
    with pytest.raises(UsageError, match="different outputs"):
        v.validate_models(mlp_model, other, v.generate_inputs(mlp_model))


def test_validate_model_ort_cannot_load(mlp_model):
    broken = build_mlp([8, 16, 12, 3])
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(InvalidModelError, match="candidate"):
        v.validate_models(mlp_model, broken, v.generate_inputs(mlp_model))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # comparing outputs warns of nothing
def test_validate_sklearn_classifier_with_zipmap_output():
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    clf = LogisticRegression(max_iter=200).fit(x[:300], y[:300])
    model = to_onnx(clf, x[:1].astype(np.float32), target_opset=17)
    inputs = v.check_data(model, [{"X": x[:20]}], "digits")
    report = v.validate_models(model, model, inputs)
    assert report.ok and [o.name for o in report.outputs] == ["output_label", "output_probability"]


def _infinite_outputs_model() -> onnx.ModelProto:
    """``build_mlp`` whose output y feeds Log(Relu(y)) (-inf where y <= 0) and
    Reciprocal(Relu(y)) (+inf there): outputs ``lo`` and ``hi``."""
    model = build_mlp([8, 16, 3])
    graph = model.graph
    graph.node.extend([
        helper.make_node("Relu", ["y"], ["ry"], name="relu_out"),
        helper.make_node("Log", ["ry"], ["lo"], name="log_out"),
        helper.make_node("Reciprocal", ["ry"], ["hi"], name="recip_out"),
    ])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("lo", "hi")])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_compare_outputs_equal_infinities_and_nans_agree():
    ref = np.array([np.inf, -np.inf, np.nan, 1.0])
    with np.errstate(all="raise"):  # no RuntimeWarning either
        out = v.compare_outputs("o", [ref], [ref.copy()], rtol=0, atol=0)
    assert out.ok and out.max_abs == 0.0
    for cand in ([-np.inf, -np.inf, np.nan, 1.0], [np.inf, 5.0, np.nan, 1.0], [np.inf, -np.inf, 0.0, 1.0]):
        with np.errstate(all="raise"):
            out = v.compare_outputs("o", [ref], [np.array(cand)], rtol=1, atol=1)
        assert not out.ok and out.max_abs == np.inf


@pytest.mark.slow
def test_models_with_infinite_outputs_validate_and_compress(tmp_path, run_cli):
    model = _infinite_outputs_model()
    inputs = v.generate_inputs(model, rows=8)
    runs = [v.run_tensors(model, ["lo", "hi"], inputs, "reference")]
    assert any(np.isinf(t).any() for batch in runs[0] for t in batch)  # the model really yields inf
    onnx.save_model(model, str(tmp_path / "inf.onnx"))
    result = run_cli("validate", "inf.onnx", "inf.onnx", "--input-shape", "x:8,8")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    result = run_cli("compress", "inf.onnx", "out.onnx", "--input-shape", "x:8,8", "-q")
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.slow
def test_validate_json_is_strict_json_where_an_error_is_infinite(tmp_path, run_cli):
    """A candidate that gives finite values where the reference gives +inf has an infinite max
    error; ``validate --json`` still prints strict JSON (no bare Infinity/NaN), the error as the
    string "Infinity", and exits 1."""
    import json

    reference = _infinite_outputs_model()
    candidate = _infinite_outputs_model()
    next(n for n in candidate.graph.node if n.name == "recip_out").op_type = "Relu"  # finite where y <= 0
    onnx.save_model(reference, str(tmp_path / "ref.onnx"))
    onnx.save_model(candidate, str(tmp_path / "cand.onnx"))
    result = run_cli("validate", "ref.onnx", "cand.onnx", "--input-shape", "x:8,8", "--json")
    assert result.returncode == 1, result.stderr

    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: bare {constant}")

    report = json.loads(result.stdout, parse_constant=refuse)
    hi = next(o for o in report["outputs"] if o["name"] == "hi")
    assert hi["max_abs"] == "Infinity" and float(hi["max_abs"]) == np.inf and not report["ok"]


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with float16 weights, input and output."""
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    return model


def test_fp16_exact_merge_passes_the_default_tolerances_and_matches_ort(tmp_path, capsys):
    import onnxfib
    import onnxruntime as ort

    model = _fp16(build_mlp([64, 128, 128, 10]))  # planted duplicate and proportional neurons
    result = onnxfib.compress(model, input_shapes={"x": (256, 64)})  # eps 0, default rtol/atol
    assert result.report.params_after < result.report.params_before
    out = result.report.validation.outputs[0]
    assert out.ok and (out.rtol, out.atol) == v.default_tolerances(TensorProto.FLOAT16)
    x = np.random.default_rng(7).standard_normal((512, 64)).astype(np.float16)
    ref, cand = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                 for m in (model, result.model))
    assert 0 < np.abs(cand.astype(np.float64) - ref).max() <= 1e-2 * np.abs(ref).max()  # fp16 rounding, no more
    with pytest.raises(onnxfib.ValidationMismatchError):  # a lossy merge still fails at fp16 defaults
        onnxfib.compress(_fp16(build_mlp([8, 6, 3], seed=1, planted=False)), eps=1.9)
    float32 = onnxfib.compress(build_mlp([64, 128, 128, 10]), input_shapes={"x": (256, 64)}).report.validation
    assert (float32.outputs[0].rtol, float32.outputs[0].atol) == (v.DEFAULT_RTOL, v.DEFAULT_ATOL)
    onnx.save_model(model, str(tmp_path / "fp16.onnx"))
    from onnxfib.cli import main

    assert main(["compress", str(tmp_path / "fp16.onnx"), str(tmp_path / "out.onnx"), "--input-shape", "x:256,64"]) == 0
    assert "rtol 0.01, atol 0.01 for the output dtype" in " ".join(capsys.readouterr().out.split())  # table says so


def _whole(model: onnx.ModelProto, names: list[str], pieces: list[dict]) -> list[list[np.ndarray]]:
    """The tensors ``names`` of ``model`` from one ORT session of the whole model, per piece."""
    return [list(values) for values in v.run_tensors(model, names, pieces, "test")]


def _assert_same(got, expected) -> None:
    assert len(got) == len(expected)
    for got_piece, expected_piece in zip(got, expected):
        for a, b in zip(got_piece, expected_piece):
            np.testing.assert_array_equal(a, b)


def _reweighted(model: onnx.ModelProto, name: str, scale: float) -> onnx.ModelProto:
    """``model`` with the initializer ``name`` multiplied by ``scale`` (a refit's new weights)."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for index, tensor in enumerate(changed.graph.initializer):
        if tensor.name == name:
            changed.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(scale), name))
    return changed


@pytest.mark.parametrize("budget", [v.CUT_BYTES, 0])
def test_forward_run_gives_each_call_the_tensors_of_the_model_it_is_given(budget):
    """Called front by front while later weights change (as a refit does), every call's tensors
    equal one ORT session of the model as it is at that call, with the cut kept or (budget 0)
    every prefix run from the inputs; asking for a tensor behind the cut starts again."""
    model = build_mlp([6, 8, 8, 8, 3], planted=False)
    rng = np.random.default_rng(0)
    pieces = [{"x": rng.standard_normal((rows, 6)).astype(np.float32)} for rows in (5, 3)]
    forward = v.ForwardRun(pieces, "test", budget=budget)
    for names, changed in ((["r0"], "W1"), (["r1", "h1"], "W2"), (["r2"], "W3"), (["y", "r2"], None)):
        _assert_same(list(forward.tensors(model, names)), _whole(model, names, pieces))
        if changed:
            model = _reweighted(model, changed, 0.5)
    _assert_same(list(forward.tensors(model, ["h0", "y"])), _whole(model, ["h0", "y"], pieces))


def test_forward_run_does_not_run_a_node_twice():
    """The contract that makes it cheap: the nodes an earlier call ran are not run again, so a
    change to their weights reaches no later call, while a model run whole sees it."""
    model = build_mlp([6, 8, 8, 3], planted=False)
    pieces = [{"x": np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)}]
    forward = v.ForwardRun(pieces, "test")
    for _ in zip(range(len(pieces)), forward.tensors(model, ["r0"])):  # as a refit reads it: the
        pass  # generator is not resumed after its last piece
    changed = _reweighted(model, "W0", 2.0)
    _assert_same(list(forward.tensors(changed, ["y"])), _whole(model, ["y"], pieces))
    assert not np.array_equal(_whole(changed, ["y"], pieces)[0][0], _whole(model, ["y"], pieces)[0][0])


def test_forward_run_of_a_fixed_batch_model_runs_its_batch_at_a_time():
    """A model declaring batch 2 whose Reshape names it runs 2 samples at a time, the last chunk of
    each piece padded, each chunk's cut kept: every call equals running the samples in pairs
    alone, also after a weight the next segment reads has changed."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "V"], ["g"], transB=1),
         helper.make_node("Reshape", ["g", "shape"], ["y"])],
        "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 2])],
        [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "V"),
         numpy_helper.from_array(np.array([2, 2, 2], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    pairs = [x[i:i + 2] if i + 2 <= len(x) else np.concatenate([x[i:], x[-1:]]) for i in range(0, len(x), 2)]

    def alone(model: onnx.ModelProto, name: str) -> np.ndarray:
        return np.concatenate([_whole(model, [name], [{"x": pair}])[0][0] for pair in pairs])

    forward = v.ForwardRun([{"x": x[:3]}, {"x": x[3:]}], "test")
    (first, second), = zip(*forward.tensors(model, ["r"]))
    np.testing.assert_array_equal(np.concatenate([first, second]), alone(model, "r")[:5])
    model = _reweighted(model, "V", 3.0)
    got = [values[0] for values in forward.tensors(model, ["y"])]
    np.testing.assert_array_equal(np.concatenate(got), alone(model, "y")[:5])


def test_forward_run_whose_cut_holds_a_sequence_runs_from_the_inputs():
    """A cut that would keep a tensor sequence cannot feed the next segment as a tensor: the
    calls give, from the inputs, what the whole model gives."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("SequenceConstruct", ["r", "x"], ["s"]),
         helper.make_node("SequenceAt", ["s", "zero"], ["t"]),
         helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=1)],
        "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(np.array(0, np.int64), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    pieces = [{"x": np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)}]
    forward = v.ForwardRun(pieces, "test")
    for names in (["t"], ["y"]):
        _assert_same(list(forward.tensors(model, names)), _whole(model, names, pieces))
