"""Every bad input ends in exit 2 with one ``error:`` line on stderr, no traceback, the input file
unchanged and nothing new in its directory; a real mismatch ends in exit 1 with nothing written."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from conftest import build_mlp, sha256


#: case name -> command line; the files it names are made by the ``workdir`` fixture.
CASES = {
    "missing input": ["compress", "nope.onnx", "out.onnx"],
    "input is a directory": ["compress", "adir", "out.onnx"],
    "not onnx bytes": ["compress", "text.onnx", "out.onnx"],
    "truncated model": ["compress", "half.onnx", "out.onnx"],
    "fails the checker": ["compress", "unchecked.onnx", "out.onnx"],
    "missing external data": ["compress", "ext.onnx", "out.onnx"],
    "output is the input": ["compress", "mlp.onnx", "mlp.onnx"],
    "output is the input, relative": ["compress", "mlp.onnx", "./adir/../mlp.onnx"],
    "output is the input, symlink": ["compress", "mlp.onnx", "link.onnx"],
    "output under a regular file": ["compress", "mlp.onnx", "afile/out.onnx"],
    "output directory missing": ["compress", "mlp.onnx", "nodir/out.onnx"],
    "output is a directory": ["compress", "mlp.onnx", "adir"],
    "output is the input's data file": ["compress", "extok.onnx", "extok.onnx.data"],
    "report under a regular file": ["compress", "mlp.onnx", "out.onnx", "--report", "afile/r.json"],
    "eps negative": ["compress", "mlp.onnx", "out.onnx", "--eps", "-0.1"],
    "eps 2": ["compress", "mlp.onnx", "out.onnx", "--eps", "2.0"],
    "eps nan": ["compress", "mlp.onnx", "out.onnx", "--eps", "nan"],
    "eps not a number": ["compress", "mlp.onnx", "out.onnx", "--eps", "abc"],
    "unknown symmetry": ["compress", "mlp.onnx", "out.onnx", "--symmetry", "orbit"],
    "unknown option": ["compress", "mlp.onnx", "out.onnx", "--bogus"],
    "negative atol": ["compress", "mlp.onnx", "out.onnx", "--atol", "-1"],
    "input shape without colon": ["compress", "mlp.onnx", "out.onnx", "--input-shape", "x"],
    "input shape not ints": ["compress", "mlp.onnx", "out.onnx", "--input-shape", "x:1,a"],
    "input shape wrong rank": ["compress", "mlp.onnx", "out.onnx", "--input-shape", "x:1,8,1"],
    "input shape unknown name": ["compress", "mlp.onnx", "out.onnx", "--input-shape", "zz:1,8"],
    "data wrong names": ["compress", "mlp.onnx", "out.onnx", "--data", "names.npz"],
    "data wrong shape": ["compress", "mlp.onnx", "out.onnx", "--data", "shape.npz"],
    "data wrong dtype": ["compress", "mlp.onnx", "out.onnx", "--data", "dtype.npz"],
    "data missing": ["compress", "mlp.onnx", "out.onnx", "--data", "none.npz"],
    "data not numpy": ["compress", "mlp.onnx", "out.onnx", "--data", "text.onnx"],
    "data directory without arrays": ["compress", "mlp.onnx", "out.onnx", "--data", "adir"],
    "data one of two files missing": ["compress", "mlp.onnx", "out.onnx", "--data", "good.npz", "--data", "none.npz"],
    "target params 0": ["compress", "mlp.onnx", "out.onnx", "--target-params", "0"],
    "two targets": ["compress", "mlp.onnx", "out.onnx", "--target-params", "0.5", "--max-error", "1"],
    "max drop without labels": ["compress", "mlp.onnx", "out.onnx", "--data", "good.npz", "--max-drop", "0.01"],
    "labels wrong count": ["compress", "mlp.onnx", "out.onnx", "--data", "good.npz", "--labels", "short.npy",
                           "--max-drop", "0.01"],
    "labels not integers": ["compress", "mlp.onnx", "out.onnx", "--data", "good.npz", "--labels", "floats.npy",
                            "--max-drop", "0.01"],
    "calibrate without data": ["compress", "mlp.onnx", "out.onnx", "--calibrate"],
    "ridge zero": ["compress", "mlp.onnx", "out.onnx", "--data", "good.npz", "--calibrate", "--ridge", "0"],
    "layer eps malformed": ["compress", "mlp.onnx", "out.onnx", "--layer-eps", "fc0"],
    "layer eps unknown layer": ["compress", "mlp.onnx", "out.onnx", "--layer-eps", "nope=0.1"],
    "sweep eps malformed": ["sweep", "mlp.onnx", "--eps", "0,a"],
    "sweep plot directory missing": ["sweep", "mlp.onnx", "--plot", "nodir/p.png"],
    "sweep json is the input": ["sweep", "mlp.onnx", "--json", "mlp.onnx"],
    "inspect not onnx": ["inspect", "text.onnx"],
    "inspect eps 2": ["inspect", "mlp.onnx", "--eps", "2"],
    "validate missing candidate": ["validate", "mlp.onnx", "nope.onnx"],
    "validate truncated": ["validate", "mlp.onnx", "half.onnx"],
    "validate wrong data": ["validate", "mlp.onnx", "mlp.onnx", "--data", "shape.npz"],
    "huge declared batch": ["compress", "huge.onnx", "out.onnx"],
    "huge input shape": ["compress", "mlp.onnx", "out.onnx", "--input-shape", "x:1099511627776,8"],
    "validate huge declared batch": ["validate", "huge.onnx", "huge.onnx"],
    "conv kernel disagrees with group": ["compress", "badgroup.onnx", "out.onnx"],
    "conv kernel disagrees with group, no check": ["compress", "badgroup.onnx", "out.onnx", "--no-check"],
}


def _bad_group_model() -> onnx.ModelProto:
    """Conv(3->4), Relu, then a group-2 Conv whose kernel [8, 4, 3, 3] reads 8 channels (group 2
    over 4 channels wants [8, 2, 3, 3]): the full checker accepts it, ONNX Runtime cannot run it."""
    rng = np.random.default_rng(0)
    weights = {"W0": (4, 3, 3, 3), "W": (8, 4, 3, 3), "W2": (2, 8, 1, 1)}
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in weights.items()]
    make = onnx.helper.make_node
    nodes = [make("Conv", ["x", "W0"], ["h0"], pads=[1, 1, 1, 1], name="conv0"), make("Relu", ["h0"], ["r0"]),
             make("Conv", ["r0", "W"], ["h"], group=2, pads=[1, 1, 1, 1], name="conv"), make("Relu", ["h"], ["r"]),
             make("Conv", ["r", "W2"], ["y"], name="conv2")]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 5, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 5, 5])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def workdir(tmp_path, write_model, mlp_model):
    """tmp_path filled with one good model and every kind of bad file the cases name."""
    good = write_model(mlp_model, "mlp.onnx")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("a regular file\n")
    (tmp_path / "link.onnx").symlink_to(good)
    (tmp_path / "text.onnx").write_bytes(b"definitely not a protobuf\n" * 20)
    data = good.read_bytes()
    (tmp_path / "half.onnx").write_bytes(data[: len(data) // 2])
    unchecked = build_mlp([8, 16, 3])
    unchecked.graph.node[0].input[1] = "no_such_tensor"
    onnx.save_model(unchecked, str(tmp_path / "unchecked.onnx"))
    write_model(build_mlp([8, 64, 3]), "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    write_model(build_mlp([8, 64, 3]), "extok.onnx", external_data=True)
    write_model(build_mlp([8, 16, 3], batch=2**40), "huge.onnx")
    write_model(_bad_group_model(), "badgroup.onnx")
    np.savez(tmp_path / "names.npz", input=np.zeros((2, 8), np.float32))
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 7), np.float32))
    np.savez(tmp_path / "dtype.npz", x=np.full((2, 8), 2**30 + 1, np.int32))  # float32 cannot hold it
    np.savez(tmp_path / "good.npz", x=np.zeros((4, 8), np.float32))
    np.save(tmp_path / "short.npy", np.zeros(3, np.int64))
    np.save(tmp_path / "floats.npy", np.zeros(4, np.float32))
    return tmp_path


def _snapshot(directory):
    return {name: sha256(directory / name) for name in sorted(os.listdir(directory)) if (directory / name).is_file()}


#: one CLI child process each; the rest are marked slow
FAST = ("fails the checker",)


@pytest.mark.parametrize("case", [case if case in FAST else pytest.param(case, marks=pytest.mark.slow) for case in CASES])
def test_bad_input_exits_2_cleanly(workdir, run_cli, case):
    before = _snapshot(workdir)
    listing = sorted(os.listdir(workdir))
    result = run_cli(*CASES[case])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert sorted(os.listdir(workdir)) == listing  # no output, no temporary file left
    assert _snapshot(workdir) == before  # every file, the input included, byte-for-byte unchanged
    assert os.listdir(workdir / "adir") == []
    if "huge" in case:  # too large to generate: say how to feed smaller inputs
        assert "--input-shape" in lines[0] and "--data" in lines[0]
    if "group" in case:  # validation runs the original first; without it, one run before analysis
        assert "ONNX Runtime cannot run the " + ("input" if "no check" in case else "reference") + " model" in lines[0]


@pytest.mark.slow
def test_inspect_conv_kernel_disagreeing_with_group_is_a_barrier(tmp_path, write_model, run_cli):
    """inspect does not run the model: the Conv it cannot read keeps its neighbours' widths."""
    write_model(_bad_group_model(), "badgroup.onnx")
    result = run_cli("inspect", "badgroup.onnx", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    layers = {layer["name"]: layer for layer in shown["layers"]}
    assert "conv" not in layers and "feeds Conv 'conv'" in layers["conv0"]["frozen"]
    barriers = {barrier["name"]: barrier["reason"] for barrier in shown["barriers"]}
    assert "Conv kernel reads 8 channels" in barriers["conv"], barriers


@pytest.mark.slow
def test_compress_mismatch_exits_1_and_writes_no_model(tmp_path, write_model, plain_model, run_cli):
    """A large eps on a model without redundancy merges unrelated neurons: lossy, caught by ORT."""
    source = write_model(plain_model, "plain.onnx")
    before = sha256(source)
    result = run_cli("compress", "plain.onnx", "out.onnx", "--eps", "1.9", "--atol", "1e-6", "--report", "r.json")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "validation mismatch" in lines[0] and "nothing written" in lines[0]
    report = json.loads((tmp_path / "r.json").read_text())
    gain = f"would have kept {report['params_after']:,} of {report['params_before']:,} parameters"
    assert gain in lines[0] and "--no-check" in lines[0] and "--max-error" in lines[0]  # what to do
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()
    assert sha256(source) == before
    report = json.loads((tmp_path / "r.json").read_text())  # the report documents the failure
    assert report["validation"]["ok"] is False and report["eps"] == 1.9
    assert sorted(os.listdir(tmp_path)) == ["plain.onnx", "r.json"]


@pytest.mark.slow
def test_target_not_met_exits_1_and_writes_no_model(tmp_path, write_model, plain_model, run_cli):
    source = write_model(plain_model, "plain.onnx")
    before = sha256(source)
    result = run_cli("compress", "plain.onnx", "out.onnx", "--target-params", "0.01", "--report", "r.json")
    assert result.returncode == 1, result.stderr
    *progress, error = result.stderr.splitlines()  # piped: the search's plain progress lines first
    assert all(line.startswith("searching: ") for line in progress)
    assert error.startswith("error: ") and "target not met" in error and "nothing written" in error
    assert sorted(os.listdir(tmp_path)) == ["plain.onnx", "r.json"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"]["met"] is False and report["target"]["limit"] == 0.01
    assert sha256(source) == before


@pytest.mark.slow
def test_validate_different_models_exits_1(tmp_path, write_model, run_cli):
    write_model(build_mlp([8, 16, 3], seed=1), "a.onnx")
    write_model(build_mlp([8, 16, 3], seed=2), "b.onnx")
    result = run_cli("validate", "a.onnx", "b.onnx")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: validation mismatch")
    assert "NO" in result.stdout
