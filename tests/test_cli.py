"""The command line and the library API on real files in ONNX Runtime (in-process via ``main``,
plus real processes for ``python -m onnxfib`` and the console script)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import build_mlp, sha256

import onnxfib
from onnxfib.cli import _PlainProgress, main
from onnxfib.errors import UsageError, ValidationMismatchError


def _props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_model(str(path)).metadata_props}


def test_compress_writes_checked_smaller_model_and_report(tmp_path, mlp_path, capsys):
    before = sha256(mlp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["compress", str(mlp_path), str(out), "--report", str(report)]) == 0
    stdout = capsys.readouterr().out
    for text in ("parameters", "nodes", "size", "time", "fc0", "16 -> 14", "max abs error", "yes", "64 inputs"):
        assert text in stdout
    assert sha256(mlp_path) == before
    cells = [line.replace("│", " ").split() for line in stdout.splitlines() if line.startswith("│   ")]
    rows = {cell[0]: cell[1:] for cell in cells}
    assert rows == {"Gemm": ["3", "3", "+0.0%"], "Relu": ["2", "2", "+0.0%"]}  # nodes per op type
    onnx.checker.check_model(str(out), full_check=True)
    assert _props(out)["onnxfib.eps"] == "0.0" and _props(out)["onnxfib.symmetry"] == "fiber"
    data = json.loads(report.read_text())
    assert data["params_after"] < data["params_before"] and data["validation"]["ok"] is True
    assert {layer["name"]: layer["width_after"] for layer in data["layers"]}["fc0"] == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out.onnx", "report.json"]
    assert onnxfib.validate(mlp_path, out).ok


def test_compress_quiet_no_check_and_verbose(tmp_path, mlp_path, capsys):
    assert main(["compress", str(mlp_path), str(tmp_path / "q.onnx"), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["compress", str(mlp_path), str(tmp_path / "v.onnx"), "--no-check", "-v"]) == 0
    stdout = capsys.readouterr().out
    assert "Validation skipped" in stdout and "fc2" in stdout  # -v lists the unchanged layer too


def test_compress_with_data_input_shape_seed_and_cover(tmp_path, mlp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    argv = ["compress", str(mlp_path), str(tmp_path / "a.onnx"), "--data", str(tmp_path / "d.npz")]
    assert main(argv) == 0
    assert "32 inputs" in capsys.readouterr().out  # the samples compared, not the batches
    argv = ["compress", str(mlp_path), str(tmp_path / "b.onnx"), "--input-shape", "x:4,8", "--seed", "7", "-q"]
    assert main(argv) == 0
    argv = ["compress", str(mlp_path), str(tmp_path / "c.onnx"), "--symmetry", "cover", "-q"]
    assert main(argv) == 0
    assert _props(tmp_path / "c.onnx")["onnxfib.symmetry"] == "cover"


def test_compress_keeps_external_data_layout(tmp_path, write_model):
    source = write_model(build_mlp([8, 64, 32, 3]), "big.onnx", external_data=True)
    out = tmp_path / "small.onnx"
    assert main(["compress", str(source), str(out), "-q"]) == 0
    assert (tmp_path / "small.onnx.data").is_file()
    assert onnxfib.validate(source, out).ok


def test_inspect_table_and_json(mlp_path, capsys):
    assert main(["inspect", str(mlp_path)]) == 0
    table = capsys.readouterr().out
    assert "fibers" in table and "opfibers" in table and "fc1" in table
    assert main(["inspect", str(mlp_path), "--json", "--eps", "0.1"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [layer["name"] for layer in layers] == ["fc0", "fc1", "fc2"]
    assert layers[0]["width"] == 16 and layers[0]["fibers"] <= 14


def test_inspect_preprocesses_the_model_once_and_finds_what_separate_calls_find(tmp_path, write_model, monkeypatch):
    """One GraphView (one preprocessing) for the layers and the barriers together; the same
    figures and barriers as ``inspect`` and ``barriers`` called one by one."""
    from onnxfib import analysis, api

    model = build_mlp([6, 8, 4])
    model.graph.node[1].op_type = "Hardmax"  # no rule: a barrier between the layers
    path = write_model(model)
    separate = [layer.to_dict() for layer in api.inspect(path)], [b.to_dict() for b in api.barriers(path)]
    made = []
    real = analysis.GraphView

    def counted(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis, "GraphView", counted)
    together = api.inspection(path)
    assert len(made) == 1
    assert ([layer.to_dict() for layer in together.layers], [b.to_dict() for b in together.barriers]) == separate
    assert [b["op_type"] for b in separate[1]] == ["Hardmax"]


def test_inspect_with_data_measures_the_collapse_against_the_original_in_ort(tmp_path, mlp_path, capsys):
    """With --data, inspect runs the collapse at --eps against the original: exact at eps 0 on the
    planted MLP; at a large eps the errors it reports are those of the collapsed model run here in
    ONNX Runtime beside the original, the exit is 0, and nothing is written."""
    import onnxruntime as ort

    from onnxfib import api

    x = np.random.default_rng(3).standard_normal((40, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    before, listing = sha256(mlp_path), sorted(p.name for p in tmp_path.iterdir())
    exact = api.inspection(mlp_path, data=[tmp_path / "d.npz"])
    assert exact.validation is not None and exact.validation.ok and exact.validation.samples == 40
    assert exact.validation.outputs[0].max_abs < 1e-5
    loose = api.inspection(mlp_path, eps=1.0, data=[tmp_path / "d.npz"])
    collapsed = api.compress(mlp_path, eps=1.0, check=False).model

    def run(model):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    truth = float(np.max(np.abs(run(collapsed) - run(onnx.load_model(str(mlp_path))))))
    assert loose.validation is not None and not loose.validation.ok and truth > 1e-3
    assert loose.validation.outputs[0].max_abs == pytest.approx(truth, rel=1e-5)
    free = api.inspection(mlp_path, eps=1.0)
    assert [layer.to_dict() for layer in loose.layers] == [layer.to_dict() for layer in free.layers]
    assert main(["inspect", str(mlp_path), "--eps", "1", "--data", str(tmp_path / "d.npz"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["validation"]["ok"] is False and printed["validation"]["outputs"][0]["max_abs"] == pytest.approx(truth)
    assert main(["inspect", str(mlp_path), "--input-shape", "x:5,8"]) == 0
    assert "max abs error" in capsys.readouterr().out
    assert "validation" not in json.loads((main(["inspect", str(mlp_path), "--json"]), capsys.readouterr().out)[1])
    assert sha256(mlp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == listing


@pytest.mark.slow
def test_search_metadata_is_strict_json_for_an_infinite_error_target(mlp_model):
    """``max_error=inf`` is met by any collapse; its limit is recorded as the string "Infinity"
    (strict JSON), not as a bare Infinity."""

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    result = onnxfib.compress(mlp_model, max_error=float("inf"))
    props = {p.key: p.value for p in result.model.metadata_props}
    target = json.loads(props["onnxfib.target"], parse_constant=refuse)
    assert target == {"kind": "error", "limit": "Infinity"} and float(target["limit"]) == np.inf
    json.loads(props["onnxfib.layer_eps"], parse_constant=refuse)


def _bfloat16_tail_model() -> onnx.ModelProto:
    """``build_mlp`` whose output passes through bfloat16 and back: onnx-graphsurgeon warns (on
    stdout) that it has no NumPy type for BFLOAT16."""
    model = build_mlp([8, 16, 3])
    model.graph.node.extend([onnx.helper.make_node("Cast", ["y"], ["yb"], to=onnx.TensorProto.BFLOAT16),
                             onnx.helper.make_node("Cast", ["yb"], ["z"], to=onnx.TensorProto.FLOAT)])
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 3]))
    return model


@pytest.mark.slow
def test_graphsurgeon_warnings_stay_off_stdout(tmp_path, write_model, run_cli):
    write_model(_bfloat16_tail_model(), "bf16.onnx")
    result = run_cli("inspect", "bf16.onnx", "--json")
    assert result.returncode == 0, result.stderr
    assert {layer["name"] for layer in json.loads(result.stdout)["layers"]} == {"fc0", "fc1"}  # stdout is the JSON only
    result = run_cli("compress", "bf16.onnx", "out.onnx", "-q")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def test_validate_same_model(mlp_path, capsys):
    assert main(["validate", str(mlp_path), str(mlp_path), "--input-shape", "x:3,8"]) == 0
    assert "y" in capsys.readouterr().out


@pytest.mark.slow
def test_validate_json_is_the_report_on_stdout_with_unchanged_exit_codes(tmp_path, mlp_path, write_model, run_cli):
    result = run_cli("validate", mlp_path, mlp_path, "--json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["samples"] == 2 * onnxfib.validation.VALIDATION_ROWS
    assert report["outputs"] == [{"name": "y", "max_abs": 0.0, "max_rel": 0.0, "ok": True, "rtol": 1e-5, "atol": 1e-5}]
    write_model(build_mlp([8, 16, 12, 3], seed=5), "other.onnx")
    result = run_cli("validate", mlp_path, "other.onnx", "--json", "--rtol", "0.01")
    assert result.returncode == 1 and result.stderr.startswith("error: validation mismatch")
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["rtol"] == 0.01 and report["outputs"][0]["max_abs"] > 0


def test_every_command_takes_quiet_and_verbose(tmp_path, mlp_path, write_model, capsys):
    other = write_model(build_mlp([8, 16, 12, 3], seed=5), "other.onnx")
    assert main(["validate", str(mlp_path), str(other), "-q"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: validation mismatch")
    assert main(["validate", str(mlp_path), str(mlp_path), "-v"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "max abs error" in line)
    assert "rtol" in header and "atol" in header  # -v: each output's tolerances, even where all agree
    for argv in (["inspect", str(mlp_path)], ["rules"], ["sweep", str(mlp_path), "--eps", "0"]):
        assert main([*argv, "-q", "-v"]) == 0
        assert capsys.readouterr() == ("", ""), argv
    assert main(["inspect", str(mlp_path), "-q", "--json"]) == 0  # what --json asks for still prints
    assert len(json.loads(capsys.readouterr().out)["layers"]) == 3


def test_rules_lists_the_registry(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    assert "Gemm" in out and "MatMul" in out and "Softmax" not in out


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"onnxfib {onnxfib.__version__}"
    assert main(["compress", "--help"]) == 0
    assert "--input-shape" in capsys.readouterr().out
    assert main([]) == 2  # no command: help, and the usage-error exit code


@pytest.mark.slow
def test_help_shows_choices_metavars_and_an_example(run_cli, capsys):
    for command in ("inspect", "validate", "sweep", "rules"):
        assert main([command, "--help"]) == 0
        assert f"Example: onnxfib {command}" in capsys.readouterr().out
    result = run_cli("compress", "--help")
    assert result.returncode == 0 and "Example: onnxfib compress" in result.stdout, result.stdout
    for text in ("[fiber|cover]", "FLOAT", "PATH", "NAME:D1,D2", "NAME=EPS", "{IN} {OUT}"):
        assert text in result.stdout, text
    assert result.stdout.count("<bool>") == 1  # typer's own --help; onnxfib's flags show no value
    result = run_cli("compress", "in.onnx", "out.onnx", "--symmetry", "base")
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: symmetry must be one of fiber, cover, got 'base'"], result.stderr


@pytest.mark.slow
def test_search_progress_shows_in_a_terminal_and_not_in_a_pipe(tmp_path, mlp_path, run_cli):
    """The status line of a target search renders on a terminal's stderr (piped: see below)."""
    leader, follower = os.openpty()
    process = subprocess.Popen([sys.executable, "-m", "onnxfib", "compress", str(mlp_path), "tty.onnx",
                                "--target-params", "0.6"], cwd=tmp_path, stdout=follower, stderr=follower,
                               env={**os.environ, "TERM": "xterm"})
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert process.wait(timeout=300) == 0
    assert b"searching: keeps" in shown


@pytest.mark.slow
def test_search_progress_in_a_pipe_is_plain_lines_and_quiet_silences_it(tmp_path, mlp_path, run_cli):
    """Piped stderr gets plain progress lines (the first probe at once, the last step at the
    end); stdout is the same summary as without them; -q prints nothing at all."""
    piped = run_cli("compress", mlp_path, "piped.onnx", "--target-params", "0.6")
    assert piped.returncode == 0, piped.stderr
    lines = piped.stderr.splitlines()
    assert lines and all(line.startswith("searching: ") for line in lines), piped.stderr
    assert lines[0].startswith("searching: measuring layer 1/") and lines[-1].startswith("searching: keeps ")
    assert "searching" not in piped.stdout and re.search(r"Target: keeps [\d.]+% of the parameters, asked at most 60\.00%",
                                                          piped.stdout)
    quiet = run_cli("compress", mlp_path, "quiet.onnx", "--target-params", "0.6", "-q")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert sha256(tmp_path / "piped.onnx") == sha256(tmp_path / "quiet.onnx")


def test_plain_progress_is_rate_limited_and_prints_the_last_step():
    now = [0.0]
    stream = io.StringIO()
    progress = _PlainProgress("searching", stream, interval=5.0, clock=lambda: now[0])
    for step, at in enumerate([0.0, 1.0, 4.9, 5.5, 6.0, 7.0]):
        now[0] = at
        progress(f"step {step}")
    progress.close()
    assert stream.getvalue().splitlines() == ["searching: step 0", "searching: step 3", "searching: step 5"]
    progress.close()  # nothing held back any more
    assert stream.getvalue().count("\n") == 3


@pytest.mark.slow
def test_python_dash_m_and_console_script(tmp_path, mlp_path, run_cli):
    result = run_cli("compress", mlp_path, "out.onnx")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "parameters" in result.stdout
    script = shutil.which("onnxfib")
    if script is None:
        pytest.skip("console script not installed (pip install -e .)")
    result = subprocess.run([script, "inspect", "missing.onnx"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == "error: missing.onnx: no such file\n"


@pytest.mark.slow
def test_compress_target_params_meets_target_and_reports_layer_eps(tmp_path, mlp_path, capsys):
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main(["compress", str(mlp_path), str(out), "--data", str(tmp_path / "data.npz"),
                 "--target-params", "0.6", "--calibrate", "--report", str(report)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert re.search(r"Target: keeps [\d.]+% of the parameters, asked at most 60\.00%", stdout)
    assert "met" in stdout and "eps" in stdout
    data = json.loads(report.read_text())
    assert data["params_after"] <= 0.6 * data["params_before"]
    assert data["target"]["met"] is True and data["calibrated"] is True
    assert any(layer["eps"] > 0 for layer in data["layers"])
    props = _props(out)
    assert json.loads(props["onnxfib.layer_eps"]) == {layer["name"]: layer["eps"] for layer in data["layers"]}
    assert props["onnxfib.calibrated"] == "true"


def test_search_records_its_target_and_layer_eps_not_eps_zero(tmp_path, mlp_path):
    out, again, report = tmp_path / "out.onnx", tmp_path / "again.onnx", tmp_path / "r.json"
    assert main(["compress", str(mlp_path), str(out), "--target-params", "0.6", "-q", "--report", str(report)]) == 0
    props = _props(out)
    assert json.loads(props["onnxfib.target"]) == {"kind": "params", "limit": 0.6}
    layers = json.loads(report.read_text())["layers"]
    assert json.loads(props["onnxfib.layer_eps"]) == {layer["name"]: layer["eps"] for layer in layers}
    assert any(layer["eps"] > 0 for layer in layers)
    assert "onnxfib.eps" not in props and props["onnxfib.symmetry"] == "fiber"
    assert main(["compress", str(out), str(again), "-q"]) == 0  # a plain run after it records no stale target
    props = _props(again)
    assert props["onnxfib.eps"] == "0.0" and "onnxfib.target" not in props and "onnxfib.layer_eps" not in props


def test_compress_layer_eps_and_calibrated_exact_merge(tmp_path, mlp_path, capsys):
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
    out = tmp_path / "out.onnx"
    assert main(["compress", str(mlp_path), str(out), "--layer-eps", "fc0=0", "--data",
                 str(tmp_path / "data.npz"), "--calibrate", "-v"]) == 0
    stdout = capsys.readouterr().out
    assert "calibrated" in stdout and "yes" in stdout  # exact merges refit stay within rtol


def test_library_compress_from_proto_and_save(tmp_path, mlp_model):
    snapshot = mlp_model.SerializeToString()
    result = onnxfib.compress(mlp_model)
    assert mlp_model.SerializeToString() == snapshot  # the caller's model is untouched
    assert result.report.params_after < result.report.params_before
    assert result.report.validation.ok and result.report.seconds > 0
    path = result.save(tmp_path / "c.onnx")
    assert onnxfib.validate(mlp_model, path).ok


def test_library_save_refuses_input_path(mlp_path):
    result = onnxfib.compress(mlp_path)
    before = sha256(mlp_path)
    with pytest.raises(UsageError):
        result.save(mlp_path)
    assert sha256(mlp_path) == before


def test_library_mismatch_carries_report(plain_model):
    with pytest.raises(ValidationMismatchError) as info:
        onnxfib.compress(plain_model, eps=1.9, atol=1e-6)
    assert info.value.exit_code == 1
    assert info.value.report.validation is not None and not info.value.report.validation.ok


def test_library_data_as_dict_and_list(mlp_model):
    x = np.ones((2, 8), np.float32)
    assert onnxfib.compress(mlp_model, data={"x": x}).report.validation.batches == 1
    assert onnxfib.validate(mlp_model, mlp_model, data=[{"x": x}, {"x": -x}]).batches == 2
    with pytest.raises(UsageError):
        onnxfib.compress(mlp_model, data={"x": np.ones((2, 9), np.float32)})


@pytest.mark.parametrize("eps", [-0.1, 2.0, float("nan")])
def test_library_rejects_eps(mlp_model, eps):
    with pytest.raises(UsageError, match="eps"):
        onnxfib.compress(mlp_model, eps=eps)
    with pytest.raises(UsageError, match="eps"):
        onnxfib.inspect(mlp_model, eps=eps)


def test_library_compresses_a_model_with_a_static_batch():
    """The ORT run before analysis feeds whole batches: a static batch axis takes no fewer rows."""
    result = onnxfib.compress(build_mlp([8, 16, 3], batch=4))
    assert result.report.validation.ok and result.report.validation.samples == 2 * onnxfib.validation.VALIDATION_ROWS


@pytest.mark.parametrize("source", [None, 42, {}, b"\x08\x08", onnx.GraphProto()], ids=repr)
def test_library_rejects_a_model_of_the_wrong_type(source):
    for call in (onnxfib.compress, onnxfib.inspect, onnxfib.sweep):
        with pytest.raises(UsageError, match="path or an onnx.ModelProto"):
            call(source)
    with pytest.raises(UsageError, match="path or an onnx.ModelProto"):
        onnxfib.validate(source, source)


@pytest.mark.parametrize("path", [None, 42, b"out.onnx", ["out.onnx"]], ids=repr)
def test_library_save_rejects_a_path_of_the_wrong_type(tmp_path, mlp_model, path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = onnxfib.compress(mlp_model, check=False)
    with pytest.raises(UsageError, match="output path"):
        result.save(path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("name", "value"), [("seed", "x"), ("seed", -1), ("seed", 1.5), ("seed", None),
                                             ("rtol", "x"), ("atol", [1]), ("ridge", "x")])
def test_library_rejects_arguments_of_the_wrong_type(mlp_model, name, value):
    with pytest.raises(UsageError, match=name):
        onnxfib.compress(mlp_model, **{name: value})


def test_cli_negative_seed_is_a_usage_error(mlp_path, capsys):
    assert main(["compress", str(mlp_path), str(mlp_path.parent / "o.onnx"), "--seed", "-1"]) == 2
    assert "seed" in capsys.readouterr().err


@pytest.mark.slow
def test_library_and_cli_import_without_matplotlib():
    code = "import sys; sys.modules['matplotlib'] = None; import onnxfib, onnxfib.cli; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow
def test_library_and_cli_import_without_torch():
    code = "import sys; sys.modules['torch'] = None; import onnxfib, onnxfib.cli; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
