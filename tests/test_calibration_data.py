"""Calibration data as users have it: fixed-batch models fed any number of samples, several
files or a directory, memory-mapped arrays, and integer or uint8 inputs in their own dtypes. The
truth is ONNX Runtime run directly: sample by sample on the fixed-batch model, or whole on a
dynamic-batch copy with the same weights."""

from __future__ import annotations

import mmap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import build_mlp
from onnx import TensorProto, helper, numpy_helper

import onnxfib
from onnxfib import validation as v
from onnxfib.errors import UsageError


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _mapped(array: np.ndarray) -> bool:
    """Whether ``array`` reads a memory-mapped file."""
    while array is not None:
        if isinstance(array, mmap.mmap):
            return True
        array = getattr(array, "base", None)
    return False


def _token_model(batch: int | str = "N") -> onnx.ModelProto:
    """ids (int64 [batch, 5]) -> Gather of a [20, 6] table -> MatMul [6, 4] -> y [batch, 5, 4]."""
    rng = np.random.default_rng(2)
    table = numpy_helper.from_array(rng.standard_normal((20, 6)).astype(np.float32), "table")
    weight = numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W"], ["y"])],
        "tokens", [helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5, 4])], [table, weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _image_model() -> onnx.ModelProto:
    """A fixed-batch classifier of uint8 images: img [1, 3, 4, 4] -> Cast -> Flatten -> Gemm -> y [1, 5]."""
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.standard_normal((5, 48)).astype(np.float32) / 100, "W")
    bias = numpy_helper.from_array(np.zeros(5, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["img"], ["f"], to=TensorProto.FLOAT), helper.make_node("Flatten", ["f"], ["v"]),
         helper.make_node("Gemm", ["v", "W", "b"], ["y"], transB=1)],
        "images", [helper.make_tensor_value_info("img", TensorProto.UINT8, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], [weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("batch, samples", [(1, 64), (4, 10)])
def test_fixed_batch_model_runs_any_number_of_samples(batch, samples):
    """64 samples through a batch-1 model, and 10 through a batch-4 one (the last chunk padded):
    the outputs are those of a dynamic-batch copy run on all the rows at once."""
    fixed, dynamic = build_mlp([8, 16, 3], batch=batch), build_mlp([8, 16, 3])
    x = np.random.default_rng(0).standard_normal((samples, 8)).astype(np.float32)
    (batch_data,) = v.check_data(fixed, [{"x": x}], "calib")
    (got,), = v.run_tensors(fixed, ["y"], [batch_data], "model")
    np.testing.assert_allclose(got, _ort(dynamic, {"x": x}), rtol=1e-6, atol=1e-6)
    report = v.validate_models(fixed, dynamic, [batch_data])
    assert report.ok and report.samples == samples


def _calibrated_pair() -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    """A [1, 8] model, its dynamic-batch copy (same weights) and 64 calibration samples."""
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    return build_mlp([8, 32, 24, 3], batch=1), build_mlp([8, 32, 24, 3]), x


def _assert_same_weights(mine: onnx.ModelProto, theirs: onnx.ModelProto) -> None:
    assert [i.name for i in mine.graph.initializer] == [i.name for i in theirs.graph.initializer]
    for a, b in zip(mine.graph.initializer, theirs.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-4, atol=1e-5)


def test_fixed_batch_model_is_calibrated_like_its_dynamic_copy():
    """A batch-1 model calibrated on 64 samples gets the refit its dynamic-batch copy gets from
    the same data, and its outputs, run sample by sample, are that copy's on all rows at once."""
    fixed, dynamic, x = _calibrated_pair()
    mine = onnxfib.compress(fixed, data={"x": x}, calibrate=True, eps=0.4, check=False)
    theirs = onnxfib.compress(dynamic, data={"x": x}, calibrate=True, eps=0.4, check=False)
    assert theirs.report.refit and theirs.report.params_after < theirs.report.params_before
    assert [r.name for r in mine.report.refit] == [r.name for r in theirs.report.refit]
    _assert_same_weights(mine.model, theirs.model)
    expected = np.concatenate([_ort(mine.model, {"x": row[None]}) for row in x])
    np.testing.assert_allclose(expected, _ort(theirs.model, {"x": x}), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fixed_batch_model_is_calibrated_from_the_cli(tmp_path, run_cli):
    """The issue's example: `--calibrate --data calib.npz` with 64 samples for a [1, 8] model."""
    fixed, dynamic, x = _calibrated_pair()
    onnx.save(fixed, tmp_path / "fixed.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    result = run_cli("compress", "fixed.onnx", "out.onnx", "--data", "calib.npz", "--calibrate", "--eps", "0.4",
                     "--no-check")
    assert result.returncode == 0, result.stderr
    _assert_same_weights(onnx.load(tmp_path / "out.onnx"),
                         onnxfib.compress(dynamic, data={"x": x}, calibrate=True, eps=0.4, check=False).model)


def test_several_files_and_a_directory_are_one_batch_each(tmp_path):
    model = build_mlp([8, 16, 3], batch=1)
    rng = np.random.default_rng(4)
    parts = [rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 5)]
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "a.npz", x=parts[0])
    np.save(tmp_path / "d" / "b.npy", parts[1])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    for source in (tmp_path / "d", [tmp_path / "d" / "a.npz", tmp_path / "d" / "b.npy"]):
        batches = v.load_data(source, model)
        assert len(batches) == 2
        for batch, part in zip(batches, parts):
            np.testing.assert_array_equal(batch["x"], part)
    report = onnxfib.validate(model, model, data=[tmp_path / "d" / "a.npz", tmp_path / "d" / "b.npy"])
    assert report.ok and report.samples == 8 and report.batches == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no .npz/.npy"):
        v.load_data(tmp_path / "empty", model)
    two_inputs = _two_input_model()
    with pytest.raises(UsageError, match="feeds one input"):
        v.load_data(tmp_path / "d" / "b.npy", two_inputs)


def _two_input_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["y"])], "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 8]) for n in ("x", "z")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_stored_arrays_are_memory_mapped_and_read_right(tmp_path):
    """np.save and np.savez files are mapped, not read (C and Fortran order alike); a compressed
    .npz is read; the values are numpy's own reading of the files."""
    rng = np.random.default_rng(5)
    x, z = rng.standard_normal((6, 8)).astype(np.float32), np.asfortranarray(rng.standard_normal((6, 8)))
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "xz.npz", x=x, z=z)
    np.savez_compressed(tmp_path / "packed.npz", x=x, z=z)
    (single,) = v.load_data(tmp_path / "x.npy", build_mlp([8, 4, 3]))
    assert _mapped(single["x"])
    np.testing.assert_array_equal(single["x"], np.load(tmp_path / "x.npy"))
    model = _two_input_model()
    for name, mapped in (("xz.npz", True), ("packed.npz", False)):
        (batch,) = v.load_data(tmp_path / name, model)
        with np.load(tmp_path / name) as reference:
            for key in ("x", "z"):
                assert _mapped(batch[key]) == mapped
                np.testing.assert_array_equal(batch[key], reference[key])
        (got,), = v.run_tensors(model, ["y"], [batch], "model")
        np.testing.assert_allclose(got, _ort(model, {"x": x, "z": z.astype(np.float32)}), rtol=1e-6)


def test_integer_inputs_keep_their_dtype_and_lossy_casts_are_refused(tmp_path):
    """uint8 images feed a uint8 model as they are, int32 token ids an int64 input exactly; floats
    for token ids, and values an input's type cannot hold, are one-line UsageErrors."""
    images = np.random.default_rng(6).integers(0, 256, (7, 3, 4, 4), dtype=np.uint8)
    image_model = _image_model()
    (batch,) = v.check_data(image_model, [{"img": images}], "images")
    assert batch["img"].dtype == np.uint8 and batch["img"] is not None
    (got,), = v.run_tensors(image_model, ["y"], [batch], "model")
    per_sample = np.concatenate([_ort(image_model, {"img": im[None]}) for im in images])
    np.testing.assert_allclose(got, per_sample, rtol=1e-5, atol=1e-5)  # float32 sums differ by batch size
    as_ints = images.astype(np.int64)  # int64 values 0..255: uint8 holds them
    (batch,) = v.check_data(image_model, [{"img": as_ints}], "images")
    (again,), = v.run_tensors(image_model, ["y"], [batch], "model")
    np.testing.assert_array_equal(again, got)
    with pytest.raises(UsageError, match="cannot hold exactly"):
        v.check_data(image_model, [{"img": as_ints + 1}], "images")  # 256 does not fit in uint8

    tokens = _token_model()
    ids = np.random.default_rng(7).integers(0, 20, (9, 5)).astype(np.int32)
    np.savez(tmp_path / "ids.npz", ids=ids)
    (batch,) = v.load_data(tmp_path / "ids.npz", tokens)
    (got,), = v.run_tensors(tokens, ["y"], [batch], "model")
    np.testing.assert_array_equal(got, _ort(tokens, {"ids": ids.astype(np.int64)}))
    np.savez(tmp_path / "floats.npz", ids=ids.astype(np.float32))
    with pytest.raises(UsageError, match=r"floats.npz: 'ids' holds floats \(float32\) but the model expects INT64"):
        v.load_data(tmp_path / "floats.npz", tokens)
    with pytest.raises(UsageError, match="dtype bool"):
        v.check_data(tokens, [{"ids": ids > 3}], "mask")


def test_generated_and_user_batches_of_wrong_size_for_a_fixed_batch_model():
    """A fixed-batch model's inputs must agree on the number of samples."""
    model = _two_input_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(UsageError, match="same number of samples"):
        v.check_data(model, [{"x": np.zeros((3, 8), np.float32), "z": np.zeros((2, 8), np.float32)}], "d")
    assert v.declared_batch(model) == 1 and v.declared_batch(_token_model()) is None


def test_a_search_without_data_measures_a_fixed_batch_model_on_many_samples():
    """Generated measuring inputs hold MEASURING_ROWS samples per distribution for a fixed-batch
    model as for a dynamic one; the figures are those of the dynamic-batch copy."""
    fixed, dynamic = build_mlp([8, 16, 3], batch=1), build_mlp([8, 16, 3])
    assert v.generate_inputs(fixed)[0]["x"].shape == (1, 8)
    assert v.generate_inputs(fixed, rows=128)[0]["x"].shape == (128, 8)
    mine = onnxfib.compress(fixed, max_error=0.2)
    theirs = onnxfib.compress(dynamic, max_error=0.2)
    assert mine.report.validation.samples == theirs.report.validation.samples == 2 * onnxfib.api.MEASURING_ROWS
    assert mine.report.params_after == theirs.report.params_after
    assert mine.report.target.achieved == pytest.approx(theirs.report.target.achieved, rel=1e-6)
