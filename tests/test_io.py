"""onnxfib.io: loading with checks, atomic saving, external data, finalize_model."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import build_mlp, sha256

from onnxfib import cli, io
from onnxfib.errors import InvalidModelError, OnnxfibError, UsageError


def test_load_model_from_path_and_proto(mlp_path, mlp_model):
    model, path = io.load_model(mlp_path)
    assert path == mlp_path
    assert model.graph.output[0].name == "y"
    copy, none = io.load_model(mlp_model)
    assert none is None
    copy.graph.name = "changed"
    assert mlp_model.graph.name == "mlp"  # the caller's proto is never modified


def test_open_model_reports_external_data(write_model, mlp_model):
    path = write_model(mlp_model, "ext.onnx", external_data=True)
    loaded = io.open_model(path)
    assert loaded.external_data and loaded.files == (path, path.parent / "ext.onnx.data")
    assert all(not onnx.external_data_helper.uses_external_data(t) for t in loaded.model.graph.initializer)
    assert not io.open_model(write_model(mlp_model, "inline.onnx")).external_data


def test_missing_external_data_is_invalid(write_model, mlp_model):
    path = write_model(mlp_model, "ext.onnx", external_data=True)
    (path.parent / "ext.onnx.data").unlink()
    with pytest.raises(InvalidModelError, match="ext.onnx"):
        io.load_model(path)


@pytest.mark.parametrize("kind", ["missing", "directory", "text", "truncated", "checker"])
def test_load_failures_name_the_file(tmp_path, mlp_path, kind):
    target = {"missing": tmp_path / "nope.onnx", "directory": tmp_path}.get(kind, tmp_path / "bad.onnx")
    if kind == "text":
        target.write_bytes(b"this is not an onnx model\n" * 10)
    elif kind == "truncated":
        data = mlp_path.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif kind == "checker":
        model = build_mlp([8, 16, 3])
        model.graph.node[0].input[1] = "no_such_tensor"
        onnx.save_model(model, str(target))
    with pytest.raises(InvalidModelError) as info:
        io.load_model(target)
    message = str(info.value)
    assert target.name in message and "\n" not in message


def test_save_model_roundtrip_and_no_temp_left(tmp_path, mlp_model):
    out = io.save_model(mlp_model, tmp_path / "out.onnx", external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert onnx.load_model(str(out)) == mlp_model


def test_save_model_external_data(tmp_path):
    mlp_model = build_mlp([8, 64, 3])  # W0 is 2 KB: above onnx's 1 KB external-data threshold
    out = io.save_model(mlp_model, tmp_path / "out.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert any(onnx.external_data_helper.uses_external_data(t) for t in onnx.load_model(str(out), load_external_data=False).graph.initializer)
    loaded = io.open_model(out)
    assert loaded.external_data
    for a, b in zip(loaded.model.graph.initializer, mlp_model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    # the caller's proto keeps its tensors inline
    assert all(t.raw_data for t in mlp_model.graph.initializer)


def test_save_model_refuses_input_path_also_through_symlink_and_relative(tmp_path, mlp_path, mlp_model, monkeypatch):
    before = sha256(mlp_path)
    link = tmp_path / "link.onnx"
    link.symlink_to(mlp_path)
    monkeypatch.chdir(tmp_path)
    for target in (mlp_path, link, "mlp.onnx", "./sub/../mlp.onnx"):
        with pytest.raises(UsageError, match="input file"):
            io.save_model(mlp_model, target, external_data=False, protect=[mlp_path])
    assert sha256(mlp_path) == before


@pytest.mark.parametrize("where", ["missing_dir", "under_file", "is_dir"])
def test_save_model_unwritable_target(tmp_path, mlp_model, where):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "adir").mkdir()
    target = {
        "missing_dir": tmp_path / "nope" / "out.onnx",
        "under_file": tmp_path / "plain.txt" / "out.onnx",
        "is_dir": tmp_path / "adir",
    }[where]
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(UsageError):
        io.save_model(mlp_model, target, external_data=False)
    assert sorted(os.listdir(tmp_path)) == listing
    assert os.listdir(tmp_path / "adir") == []


def test_save_model_replaces_existing_output_whole(tmp_path, mlp_model, plain_model):
    out = tmp_path / "out.onnx"
    io.save_model(plain_model, out, external_data=False)
    io.save_model(mlp_model, out, external_data=False)
    assert onnx.load_model(str(out)) == mlp_model


def test_write_text_atomic(tmp_path):
    out = io.write_text_atomic(tmp_path / "r.json", "{}")
    assert out.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    with pytest.raises(UsageError):
        io.write_text_atomic(tmp_path / "r.json" / "x.json", "{}")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_files_get_the_mode_the_umask_gives(tmp_path, mlp_model, umask):
    old = os.umask(umask)
    try:
        paths = [io.write_text_atomic(tmp_path / "r.json", "{}"), io.write_bytes_atomic(tmp_path / "p.png", b"x"),
                 io.save_model(mlp_model, tmp_path / "m.onnx", external_data=False),
                 io.save_model(build_mlp([8, 64, 3]), tmp_path / "e.onnx", external_data=True)]
        paths += [tmp_path / "e.onnx.data"]
        (tmp_path / "plain.txt").write_text("")  # any new file, for comparison
    finally:
        os.umask(old)
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert {path.name: path.stat().st_mode & 0o777 for path in paths} == {path.name: 0o666 & ~umask for path in paths}


def test_finalize_model_sets_namespaced_metadata(mlp_model):
    onnx.helper.set_model_props(mlp_model, {"author": "me", "onnxfib.eps": "old"})
    io.finalize_model(mlp_model, eps=0.25, symmetry="cover")
    props = {p.key: p.value for p in mlp_model.metadata_props}
    assert props["author"] == "me"
    assert props["onnxfib.eps"] == "0.25"
    assert props["onnxfib.symmetry"] == "cover"
    assert props["onnxfib.version"]
    assert [p.key for p in mlp_model.metadata_props].count("onnxfib.eps") == 1


def test_finalize_model_rejects_invalid_model_as_internal_error(mlp_model):
    mlp_model.graph.node[0].input[1] = "dangling"
    with pytest.raises(OnnxfibError, match="internal error") as info:
        io.finalize_model(mlp_model, eps=0.0, symmetry="fiber")
    assert not isinstance(info.value, (InvalidModelError, UsageError))
    assert info.value.exit_code == 3


def test_models_over_the_protobuf_limit_are_written_with_external_data(tmp_path, write_model, monkeypatch):
    """The 2 GB rule, exercised with the limit lowered to a few KB so the real code path runs:
    an inline input whose result is 'too large' comes out with external data, checked and
    validated (onnxruntime reads it from a temporary external-data file too)."""
    import onnxfib

    mlp_path = write_model(build_mlp([64, 48, 48, 10]), "inline.onnx")  # tensors over onnx's 1 KB threshold
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 2_000)
    result = onnxfib.compress(mlp_path, eps=0.0, input_shapes={"x": (3, 64)})
    assert not result.external_data and result.report.validation.ok
    out = result.save(tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    assert any(onnx.external_data_helper.uses_external_data(t)
               for t in onnx.load_model(str(out), load_external_data=False).graph.initializer)
    monkeypatch.undo()
    reloaded = io.open_model(out)
    assert reloaded.external_data
    assert onnxfib.validate(mlp_path, out, input_shapes={"x": (3, 64)}).ok


def test_saving_again_over_an_external_data_output_works_from_its_directory(tmp_path, write_model, monkeypatch):
    """Re-running a compression into the same output, from the output's own directory, must
    replace the model and its data file (onnx's own saver refuses when the working directory
    holds a file of the data file's name)."""
    import onnxfib

    source = write_model(build_mlp([64, 48, 48, 10]), "ext.onnx", external_data=True)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        out = onnxfib.compress(source, input_shapes={"x": (3, 64)}).save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").stat().st_size > 0
    assert onnxfib.validate(source, out, input_shapes={"x": (3, 64)}).ok


def _weights(path) -> list[np.ndarray]:
    return [onnx.numpy_helper.to_array(t) for t in io.open_model(path).model.graph.initializer]


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_replacing_an_external_data_output_is_wholly_old_or_wholly_new(tmp_path, monkeypatch, fail_at):
    """The process dies (an exception no handler catches) at the n-th rename of a save over an
    existing model + data pair: the pair on disk still loads, as the old model or the new one."""
    old, new = build_mlp([8, 64, 3], seed=1), build_mlp([8, 64, 3], seed=2)
    out = io.save_model(old, tmp_path / "out.onnx", external_data=True)
    expected = {"old": _weights(out), "new": [onnx.numpy_helper.to_array(t) for t in new.graph.initializer]}
    calls, real = [], os.replace

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise KeyboardInterrupt  # not an OSError: nothing after it runs but finally blocks
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", dying_replace)
    with contextlib.suppress(KeyboardInterrupt):
        io.save_model(new, out, external_data=True)
    monkeypatch.undo()
    assert len(calls) >= min(fail_at, 2)  # the save got as far as the rename that fails
    found = _weights(out)  # loads: the model and the data it references agree
    assert any(all(np.array_equal(a, b) for a, b in zip(found, want)) for want in expected.values())


def test_saving_over_an_external_data_output_keeps_its_layout_and_cleans_up(tmp_path):
    out = tmp_path / "out.onnx"
    for seed in range(3):
        model = build_mlp([8, 64, 3], seed=seed)
        io.save_model(model, out, external_data=True)
        assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
        for a, b in zip(_weights(out), model.graph.initializer):
            np.testing.assert_array_equal(a, onnx.numpy_helper.to_array(b))
    (tmp_path / "out.onnx.0123456789ab.data").write_bytes(b"left by a killed run")
    io.save_model(build_mlp([8, 64, 3]), out, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    io.save_model(build_mlp([8, 64, 3]), out, external_data=False)  # the old pair's data goes with it
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


def test_stale_temporary_files_of_dead_runs_are_removed(tmp_path, mlp_model):
    """A run killed with SIGKILL cannot clean up; the next write into that directory does."""
    (tmp_path / ".onnxfib-999999999-abc").mkdir()  # no such process: pids stay below 2**22
    (tmp_path / ".onnxfib-999999999-abc" / "out.onnx").write_bytes(b"partial")
    (tmp_path / ".onnxfib-999999999-def").write_bytes(b"partial report")
    (tmp_path / f".onnxfib-{os.getpid()}-mine").mkdir()  # a live run's: left alone
    io.save_model(mlp_model, tmp_path / "out.onnx", external_data=False)
    io.write_text_atomic(tmp_path / "r.json", "{}")
    assert sorted(os.listdir(tmp_path)) == [f".onnxfib-{os.getpid()}-mine", "out.onnx", "r.json"]


@pytest.mark.slow
def test_killed_run_leaves_nothing_the_next_run_keeps(tmp_path):
    """A real SIGKILL while the output is being written; the next save removes its leftovers."""
    code = (  # noqa: UP031 (a %r template of Python source)
        "import sys, time; sys.path.insert(0, %r); from conftest import build_mlp; from onnxfib import io\n"
        "real = io.write_model\n"
        "def slow(*a, **k):\n    real(*a, **k); print('written', flush=True); time.sleep(60)\n"
        "io.write_model = slow\n"
        "io.save_model(build_mlp([8, 64, 3]), %r, external_data=True)\n"
    ) % (os.path.dirname(__file__), str(tmp_path / "out.onnx"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.kill()
        proc.wait()
    assert any(name.startswith(".onnxfib-") for name in os.listdir(tmp_path))
    io.save_model(build_mlp([8, 16, 3]), tmp_path / "other.onnx", external_data=False)
    assert sorted(os.listdir(tmp_path)) == ["other.onnx"]


def test_internal_errors_exit_3(tmp_path, monkeypatch, mlp_model):
    """A compressed model that fails the checker is onnxfib's bug: exit 3, nothing written."""
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(mlp_model, str(source))
    finalize = io.finalize_model

    def broken(model, **kwargs):
        model.graph.node[0].input[1] = "dangling"
        return finalize(model, **kwargs)

    monkeypatch.setattr(io, "finalize_model", broken)
    assert cli.main(["compress", str(source), str(target)]) == 3
    assert not target.exists()


@pytest.mark.parametrize("limit_at", ["below the tensors", "between", "just above the model", "far above"])
def test_too_large_agrees_with_the_serialized_size(monkeypatch, mlp_model, limit_at):
    size, data = mlp_model.ByteSize(), io.tensor_bytes(mlp_model)
    assert 0 < data < size  # the weights, then the graph around them
    limit = {"below the tensors": data, "between": size, "just above the model": size + 1,
             "far above": 4 * size}[limit_at]
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", limit)
    assert io.too_large(mlp_model) == (size >= limit)


def test_all_tensors_walks_initializers_constants_subgraphs_and_functions():
    from onnx import TensorProto, helper, numpy_helper

    def tensor(name):
        return numpy_helper.from_array(np.zeros(2, np.float32), name)

    def constant(name):
        return helper.make_node("Constant", [], [name], value=tensor(name))

    then_graph = helper.make_graph([constant("in_then")], "then", [], [helper.make_tensor_value_info("in_then", TensorProto.FLOAT, [2])],
                                   initializer=[tensor("then_init")])
    else_graph = helper.make_graph([constant("in_else")], "else", [], [helper.make_tensor_value_info("in_else", TensorProto.FLOAT, [2])])
    branch = helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)
    listed = helper.make_node("Dummy", [], ["z"], domain="x", tensors=[tensor("listed")], bodies=[else_graph])
    graph = helper.make_graph([constant("top"), branch, listed], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializer=[tensor("init")])
    function = helper.make_function("local", "f", [], ["k"], [constant("in_function")], [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, functions=[function])
    names = sorted(t.name for t in io.all_tensors(model))
    assert names == sorted(["init", "top", "then_init", "in_then", "in_else", "listed", "in_else", "in_function"])


def _external_sizes(path) -> dict[str, bool]:
    """Initializer name -> whether the model at ``path`` keeps it in external data."""
    model = onnx.load_model(str(path), load_external_data=False)
    return {t.name: onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer}


@pytest.mark.parametrize("threshold", [0, 1024, 10**9])
def test_compress_save_as_external_data_with_a_size_threshold(tmp_path, threshold):
    """``--save-as-external-data`` writes OUT with OUT.data beside it, holding exactly the
    initializers of at least ``--size-threshold`` bytes (none: no data file); the checker passes,
    ONNX Runtime loads the pair from its path, and its outputs equal those of the model
    written inline; the input is untouched."""
    import onnxruntime as ort

    source, inline, out = tmp_path / "in.onnx", tmp_path / "inline.onnx", tmp_path / "out.onnx"
    onnx.save(build_mlp([8, 64, 3]), str(source))  # W0 2 KB, W1 768 B, biases smaller
    before = sha256(source)
    assert cli.main(["compress", str(source), str(inline), "-q"]) == 0
    argv = ["compress", str(source), str(out), "-q", "--save-as-external-data", "--size-threshold", str(threshold)]
    assert cli.main(argv) == 0
    assert sha256(source) == before
    model = onnx.load_model(str(inline))
    expected = {t.name: t.ByteSize() > 0 and len(t.raw_data) >= threshold for t in model.graph.initializer}
    assert _external_sizes(out) == expected
    assert (tmp_path / "out.onnx.data").exists() == any(expected.values())
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    pair = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    whole = ort.InferenceSession(str(inline), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(pair, whole)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".onnxfib-")]
    assert leftovers == []


def test_save_as_external_data_leaves_nothing_on_failure_and_refuses_bad_thresholds(tmp_path, capsys):
    """A run that fails validation (exit 1) or is given a bad threshold (exit 2) writes neither
    OUT nor OUT.data; nor does a save into a directory that cannot take the files."""
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(build_mlp([8, 64, 3], planted=False), str(source))
    argv = ["compress", str(source), str(out), "-q", "--save-as-external-data", "--size-threshold", "0"]
    assert cli.main([*argv, "--eps", "1.5", "--rtol", "0", "--atol", "0"]) == 1
    assert cli.main([*argv[:-1], "-1"]) == 2
    assert "non-negative number of bytes" in capsys.readouterr().err
    assert cli.main([*argv, "--report", str(tmp_path / "out.onnx.data")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]
    with pytest.raises(UsageError, match="size threshold"):
        io.save_model(build_mlp([8, 4, 3]), out, external_data=True, size_threshold=1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]
