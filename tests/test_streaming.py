"""Models with external data: streamed compression (weights memory-mapped, rewritten ones written
as they are made) and the layer-by-layer check, against ONNX Runtime on the original model."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import build_mlp, sha256

import onnxfib
import onnxfib.analysis
from onnxfib import validation
from onnxfib.api import check_mode, memory_bytes
from onnxfib.errors import UsageError
from onnxfib.stats import count_parameters

#: Hidden layers of 512: each weight is 1 MiB, so rewritten weights go to the scratch file.
SIZES = [32, 512, 512, 8]
#: build_mlp plants two mergeable neurons in each hidden layer (a copy and a double).
BASE = [32, 510, 510, 8]


def _params(sizes: list[int]) -> int:
    return sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _run_proto(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _inputs() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((5, SIZES[0])).astype(np.float32)


@pytest.fixture
def external_mlp(write_model) -> Path:
    return write_model(build_mlp(SIZES), "big.onnx", external_data=True)


@pytest.mark.parametrize("check", ["full", "layers"])
def test_external_model_streams_to_its_base(external_mlp: Path, tmp_path: Path, check: str) -> None:
    before = {p: sha256(p) for p in (external_mlp, external_mlp.with_name("big.onnx.data"))}
    result = onnxfib.compress(external_mlp, eps=0.0, check=check)
    assert result.directory is not None  # streamed: the model's tensors are on disk
    assert result.report.validation.ok and result.report.validation.mode == check
    out = result.save(tmp_path / "out.onnx")
    assert result.report.params_after == _params(BASE) == count_parameters(result.model)
    onnx.checker.check_model(result.model, full_check=True)  # read into memory on use: self-contained
    x = _inputs()
    np.testing.assert_allclose(_run_proto(result.model, x), _run(external_mlp, x), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "out.onnx.data").is_file()
    onnx.checker.check_model(str(out), full_check=True)
    np.testing.assert_allclose(_run(out, x), _run(external_mlp, x), rtol=1e-5, atol=1e-5)
    assert {p: sha256(p) for p in before} == before  # the input is untouched


def test_layer_check_cuts_the_model_and_matches_a_whole_session(external_mlp: Path) -> None:
    graph = onnx.load(str(external_mlp), load_external_data=False)
    assert len(validation.layers(graph, layer_bytes=1 << 16)) == 3  # one sub-model per Gemm
    batches = validation.generate_inputs(graph, input_shapes={"x": (4, SIZES[0])})
    by_layers = validation.run_by_layers(external_mlp, ["y"], batches, "model", layer_bytes=1 << 16)
    for batch, got in zip(batches, by_layers):
        np.testing.assert_allclose(got["y"], _run(external_mlp, batch["x"]), rtol=1e-5, atol=1e-6)  # float rounding


def _corrupt_weight(path: Path, name: str) -> None:
    """Change one value of initializer ``name`` in the model's external data file, in place."""
    tensor = next(t for t in onnx.load(str(path), load_external_data=False).graph.initializer if t.name == name)
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    with open(path.parent / info.location, "r+b") as handle:
        handle.seek(info.offset)
        value = np.frombuffer(handle.read(4), np.float32)[0]
        handle.seek(info.offset)
        handle.write(np.float32(value + 0.5).tobytes())


def test_layer_check_fails_on_a_changed_weight(external_mlp: Path, tmp_path: Path) -> None:
    out = onnxfib.compress(external_mlp, check="none").save(tmp_path / "out.onnx")
    _corrupt_weight(out, "W1")
    batches = validation.generate_inputs(onnx.load(str(external_mlp), load_external_data=False))
    for mode in ("layers", "full"):
        report = validation.validate_models(external_mlp, out, batches, mode=mode, layer_bytes=1 << 16)
        assert not report.ok and report.outputs[0].max_abs > 1e-3, mode


@pytest.mark.slow
def test_cli_check_layers_says_so_and_refuses_contradictions(external_mlp: Path, run_cli) -> None:
    done = run_cli("compress", external_mlp, "out.onnx", "--check", "layers")
    assert done.returncode == 0, done.stderr
    assert "one layer at a time" in " ".join(done.stdout.split())
    for args in (["--check", "sometimes"], ["--check", "full", "--no-check"]):
        bad = run_cli("compress", external_mlp, "bad.onnx", *args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert not (external_mlp.parent / "bad.onnx").exists()
    with pytest.raises(UsageError):
        onnxfib.compress(external_mlp, check="sometimes")


def test_default_check_is_layers_only_past_half_the_machines_memory() -> None:
    assert check_mode(True, memory_bytes() // 2) == "full"
    assert check_mode(True, memory_bytes() // 2 + 1) == "layers"
    assert check_mode(False, 1) == check_mode("none", 1) == "none"
    assert check_mode("layers", 1) == "layers"


@pytest.mark.slow
def test_streamed_mismatch_writes_nothing_and_leaves_no_scratch(external_mlp: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = subprocess.run([sys.executable, "-m", "onnxfib", "compress", str(external_mlp), "out.onnx", "--eps", "0.6",
                           "--check", "layers"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(scratch)})
    assert done.returncode == 1 and "validation mismatch" in done.stderr, done.stderr
    assert not any(tmp_path.glob("out.onnx*"))
    assert [p.name for p in scratch.iterdir()] in ([], [".ses"])  # importing onnxruntime leaves .ses there


@pytest.mark.slow
def test_truncated_external_data_is_a_one_line_error(external_mlp: Path, tmp_path: Path, run_cli) -> None:
    data = external_mlp.with_name("big.onnx.data")
    data.write_bytes(data.read_bytes()[:500_000])
    done = run_cli("compress", external_mlp, "out.onnx")
    assert done.returncode == 2 and "cannot read its external data" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not any(tmp_path.glob("out.onnx*"))


@pytest.mark.parametrize("planted", [True, False])
def test_a_large_inline_model_is_streamed_and_saved_inline_as_held_in_memory(
        write_model, tmp_path: Path, monkeypatch, planted: bool) -> None:
    # Past STREAM_INLINE_BYTES an inline file's tensors go to a working copy with external data
    # (set to 0 here, so this small model takes that path); the saved model must be inline and
    # byte for byte the one compress makes holding the model in memory (given as a proto).
    path = write_model(build_mlp(SIZES, planted=planted), "inline.onnx")
    before = sha256(path)
    in_memory = onnxfib.compress(onnx.load(str(path)), eps=0.0)
    assert in_memory.directory is None
    monkeypatch.setattr(onnxfib.io, "STREAM_INLINE_BYTES", 0)
    streamed = onnxfib.compress(path, eps=0.0)
    assert streamed.directory is not None and streamed.report.validation.ok
    assert streamed.report.params_after == (_params(BASE) if planted else _params(SIZES))
    out = streamed.save(tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx.data").exists()  # inline, as the input was
    expected = in_memory.save(tmp_path / "expected.onnx")
    assert out.read_bytes() == expected.read_bytes()
    x = _inputs()
    np.testing.assert_allclose(_run(out, x), _run(path, x), rtol=1e-5, atol=1e-5)
    assert sha256(path) == before


def test_write_inline_gives_the_bytes_of_the_loaded_model(external_mlp: Path, tmp_path: Path) -> None:
    skeleton = onnx.load(str(external_mlp), load_external_data=False)
    onnxfib.io.write_inline(skeleton, tmp_path / "inline.onnx", source=external_mlp.parent)
    loaded = onnx.load(str(external_mlp))
    for tensor in onnxfib.io.all_tensors(loaded):
        tensor.ClearField("data_location")  # what loading sets; a model written inline lacks it
    assert (tmp_path / "inline.onnx").read_bytes() == loaded.SerializeToString()


@pytest.mark.parametrize("stream_from", [0, 1 << 40])
@pytest.mark.slow
def test_a_short_tensor_is_the_checkers_error_whether_streamed_or_not(
        write_model, tmp_path: Path, monkeypatch, run_cli, stream_from: int) -> None:
    # A streamed file is checked through its working copy, whose moved bytes the checker does
    # not measure: the error must be the one the checker gives the inline file (and no output).
    model = build_mlp(SIZES)
    weight = next(t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == 512 == t.dims[1])
    weight.raw_data = weight.raw_data[:-4]
    path = write_model(model, "short.onnx")
    with pytest.raises(Exception) as inline:
        onnx.checker.check_model(str(path), full_check=True)
    monkeypatch.setattr(onnxfib.io, "STREAM_INLINE_BYTES", stream_from)
    with pytest.raises(onnxfib.errors.InvalidModelError, match="too small for the declared shape") as caught:
        onnxfib.compress(path, eps=0.0)
    assert weight.name in str(caught.value) and "too small" in str(inline.value)
    done = run_cli("compress", path, "out.onnx")
    assert done.returncode == 2 and "too small" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.glob("out.onnx*"))


def _resident_kib(path: Path) -> int:
    """KiB of ``path`` that this process maps and holds resident (Linux's /proc/self/smaps)."""
    total, mapping = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            mapping = fields[5] if len(fields) > 5 else None
        elif fields[0] == "Rss:" and mapping == str(path.resolve()):
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_a_collapse_hands_back_the_pages_of_the_weights_it_rewrites(write_model, tmp_path: Path,
                                                                  monkeypatch) -> None:
    # A Shape node left after the first fold (a dynamic batch) makes the preparation fold again
    # after it re-imports the graph; graphsurgeon's fold works on a copy of the graph, which it
    # drops as cyclic garbage still holding every mapped weight. A weight that the collapse
    # rewrites leaves the view's maps, so the pages its rewrite read stayed resident until the
    # garbage collector ran (a 1.1B-parameter Llama's --check layers peaked at 3.5 GiB, its MLP
    # weights, against 0.9 GiB).
    model = build_mlp(SIZES)
    model.graph.node[-1].output[0] = "y0"
    model.graph.node.extend([onnx.helper.make_node("Shape", ["y0"], ["s"], name="shape"),
                             onnx.helper.make_node("Reshape", ["y0", "s"], ["y"], name="reshape")])
    path = write_model(model, "shaped.onnx", external_data=True)
    data = path.with_name("shaped.onnx.data")
    resident: list[int] = []
    collapse = onnxfib.analysis.Analysis.collapse

    def measured(self):
        collapsed = collapse(self)
        resident.append(_resident_kib(data))
        return collapsed

    monkeypatch.setattr(onnxfib.analysis.Analysis, "collapse", measured)
    gc.disable()  # as between two of the collector's runs
    try:
        result = onnxfib.compress(path, eps=0.0, check="full")
    finally:
        gc.enable()
    assert result.directory is not None and result.report.validation.ok
    assert resident and resident[0] <= 64, resident  # KiB: the rewritten weights hold over 1 MiB
    assert result.report.params_after == _params(BASE)
    out = result.save(tmp_path / "out.onnx")
    x = _inputs()
    np.testing.assert_allclose(_run(out, x), _run(path, x), rtol=1e-5, atol=1e-5)
