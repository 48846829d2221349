"""Fuzz the command line with mutated models and check its contract on every run.

Each case takes a seed model (the shipped ``models/*.onnx`` or a tiny built MLP/CNN), applies one
to three mutations at structure level (inputs dropped or renamed, dims and dtypes changed, NaN/Inf
weights, cycles, unknown ops, duplicate outputs, huge dims, opset 7/25, an empty graph, ...) or
byte level (truncated, flipped or empty bytes, a broken external-data file), and runs
``python -m onnxfib`` on it in a subprocess with a timeout. The contract (``check``): exit 0, 1 or
2; no traceback on stderr; no hang; the input files byte for byte unchanged; nothing at OUT (nor
OUT.data, nor a temporary file) after a non-zero exit; on exit 0 OUT passes ``onnx.checker``'s
full check and, at eps 0, its outputs match ONNX Runtime's on the input model.

    python benchmarks/fuzz.py --cases 1000 --seed 0 --jobs 2 --json benchmarks/results/fuzz.json

Exit status 0 when every case kept the contract; each broken case is printed with the command
that reproduces it (its mutated model is kept under ``--keep``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
#: Seconds one onnxfib run may take before it counts as a hang (the seeds are tiny: a run takes
#: the interpreter's start-up, a few seconds, even on a loaded machine).
TIMEOUT = 120.0

Rng = np.random.Generator
Mutation = Callable[[onnx.ModelProto, Rng], onnx.ModelProto]


# -- seed models ---------------------------------------------------------------------------------


def tiny_mlp() -> onnx.ModelProto:
    """x[N,6] -> Gemm(8) -> Relu -> Gemm(3): hidden neuron 1 copies neuron 0 (one exact merge)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 6)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w1[1], b1[1] = w1[0], b1[0]
    w2 = rng.standard_normal((3, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2", transB=1)],
        "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "b1"),
         numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(np.zeros(3, np.float32), "b2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def tiny_cnn() -> onnx.ModelProto:
    """x[N,2,6,6] -> Conv(4) -> Relu -> Conv(2): channel 1 copies channel 0 (one exact merge)."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    w1[1] = w1[0]
    w2 = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2")],
        "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def seeds() -> dict[str, onnx.ModelProto]:
    """Every seed model by name, external data loaded into memory."""
    models = {"tiny_mlp": tiny_mlp(), "tiny_cnn": tiny_cnn()}
    for path in sorted(MODELS.glob("*.onnx")):
        models[path.stem] = onnx.load(str(path))
    return models


# -- structure-level mutations ----------------------------------------------------------------------


def _pick(rng: Rng, items):
    return items[int(rng.integers(len(items)))]


def _float_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
            and np.prod(t.dims) > 0]


def drop_input(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    del model.graph.input[int(rng.integers(len(model.graph.input)))]
    return model


def rename_input(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    value = _pick(rng, list(model.graph.input))
    if rng.random() < 0.5:  # consistently: every reader follows (a valid model)
        old = value.name
        for node in model.graph.node:
            node.input[:] = ["renamed" if name == old else name for name in node.input]
    value.name = "renamed"
    return model


def _dims(model: onnx.ModelProto) -> list[onnx.TensorShapeProto.Dimension]:
    return [dim for value in [*model.graph.input, *model.graph.output]
            if value.type.HasField("tensor_type") for dim in value.type.tensor_type.shape.dim]


def change_dim(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    dims = _dims(model)
    if dims:
        dim = _pick(rng, dims)
        choice = int(rng.integers(4))
        if choice == 0:
            dim.dim_param = "free"
        else:
            dim.dim_value = (0, 1, 5)[choice - 1]
    return model


def huge_dim(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    dims = [dim for value in model.graph.input for dim in value.type.tensor_type.shape.dim]
    if dims:
        _pick(rng, dims[:1] if rng.random() < 0.5 else dims).dim_value = int(_pick(rng, [2**31, 2**40, 2**62]))
    return model


DTYPES = (TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT8, TensorProto.BOOL,
          TensorProto.STRING, TensorProto.UINT8, TensorProto.BFLOAT16, TensorProto.COMPLEX64,
          TensorProto.FLOAT8E4M3FN, TensorProto.UNDEFINED)


def change_dtype(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    value = _pick(rng, [*model.graph.input, *model.graph.output])
    value.type.tensor_type.elem_type = int(_pick(rng, DTYPES))
    return model


def to_float16(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    """Every float tensor and float input/output as float16: a valid fp16 model."""
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def nonfinite_weight(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    tensors = _float_initializers(model)
    if tensors:
        tensor = _pick(rng, tensors)
        values = numpy_helper.to_array(tensor).copy()
        flat = values.reshape(-1)
        where = rng.integers(flat.size, size=int(rng.integers(1, 4)))
        flat[where] = _pick(rng, [np.nan, np.inf, -np.inf])
        if rng.random() < 0.3:  # a whole row, as a duplicated non-finite neuron
            values[0] = np.nan if values.ndim else values
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model


def cycle(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    nodes = model.graph.node
    if len(nodes) >= 2:
        late = int(rng.integers(1, len(nodes)))
        early = int(rng.integers(late))
        nodes[early].input[0] = nodes[late].output[0]
    elif nodes:
        nodes[0].input[0] = nodes[0].output[0]
    return model


def unknown_op(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    if model.graph.node:
        node = _pick(rng, list(model.graph.node))
        if rng.random() < 0.5:
            node.op_type = "NoSuchOp"
        else:
            node.domain = "com.example.fuzz"
            model.opset_import.append(helper.make_opsetid("com.example.fuzz", 1))
    return model


def duplicate_output(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    if rng.random() < 0.5:
        model.graph.output.append(model.graph.output[0])
    elif model.graph.node:  # an intermediate tensor also as an output
        name = _pick(rng, list(model.graph.node)).output[0]
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model


def opset(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    version = int(_pick(rng, [1, 7, 11, 25, 99]))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version
    return model


def ir_version(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    model.ir_version = int(_pick(rng, [0, 3, 7, 11, 99]))
    return model


def empty_graph(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    del model.graph.node[:]
    if rng.random() < 0.5:
        del model.graph.output[:]
        del model.graph.initializer[:]
    return model


def drop_node(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    if model.graph.node:
        del model.graph.node[int(rng.integers(len(model.graph.node)))]
    return model


def drop_initializer(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    if model.graph.initializer:
        del model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
    return model


def reshape_weight(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    """A weight's values under other dims: the product kept (consistent shapes elsewhere broken) or not."""
    tensors = _float_initializers(model)
    if tensors:
        tensor = _pick(rng, tensors)
        values = numpy_helper.to_array(tensor).reshape(-1)
        if rng.random() < 0.5 and values.size > 1:
            values = values[: values.size - 1]
        tensor.CopyFrom(numpy_helper.from_array(values.copy(), tensor.name))
    return model


def shuffle_nodes(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    nodes = list(model.graph.node)
    order = rng.permutation(len(nodes))
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)
    return model


def change_attribute(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    attributes = [a for node in model.graph.node for a in node.attribute]
    if attributes:
        attribute = _pick(rng, attributes)
        if attribute.type == onnx.AttributeProto.INT:
            attribute.i = int(_pick(rng, [0, 1, 2, -1, 7]))
        elif attribute.type == onnx.AttributeProto.FLOAT:
            attribute.f = float(_pick(rng, [0.0, -1.0, np.nan, np.inf]))
        elif attribute.type == onnx.AttributeProto.INTS and attribute.ints:
            attribute.ints[int(rng.integers(len(attribute.ints)))] = int(_pick(rng, [0, 2, -1, 9]))
    elif model.graph.node:  # a Conv's group disagreeing with its weight, and the like
        model.graph.node[0].attribute.append(helper.make_attribute("group", 2))
    return model


def duplicate_names(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    nodes = model.graph.node
    if len(nodes) >= 2:
        if rng.random() < 0.5:
            nodes[1].name = nodes[0].name
        else:
            nodes[1].output[0] = nodes[0].output[0]
    return model


def tensor_as_constant(model: onnx.ModelProto, rng: Rng) -> onnx.ModelProto:
    """An initializer moved into a Constant node (a valid model)."""
    if model.graph.initializer:
        tensor = model.graph.initializer.pop(int(rng.integers(len(model.graph.initializer))))
        model.graph.node.insert(0, helper.make_node("Constant", [], [tensor.name], value=tensor))
    return model


STRUCTURE: dict[str, Mutation] = {f.__name__: f for f in (
    drop_input, rename_input, change_dim, huge_dim, change_dtype, to_float16, nonfinite_weight, cycle,
    unknown_op, duplicate_output, opset, ir_version, empty_graph, drop_node, drop_initializer,
    reshape_weight, shuffle_nodes, change_attribute, duplicate_names, tensor_as_constant)}


# -- byte-level mutations (on the serialized model) -------------------------------------------------


def truncate(data: bytes, rng: Rng) -> bytes:
    return data[: int(rng.integers(len(data)))] if data else data


def flip_bytes(data: bytes, rng: Rng) -> bytes:
    array = bytearray(data)
    for where in rng.integers(len(array), size=int(rng.integers(1, 9))) if array else ():
        array[where] = int(rng.integers(256))
    return bytes(array)


def append_garbage(data: bytes, rng: Rng) -> bytes:
    return data + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()


def empty_file(data: bytes, rng: Rng) -> bytes:
    return b""


BYTES: dict[str, Callable[[bytes, Rng], bytes]] = {f.__name__: f for f in (truncate, flip_bytes, append_garbage, empty_file)}
#: Mutations of a model saved with external data: of its data file, or of where it points.
EXTERNAL = ("data_truncated", "data_missing", "data_outside")
KINDS = (*STRUCTURE, *BYTES, *EXTERNAL)
#: What a case runs: compress at eps 0 (checked against ONNX Runtime), compress at eps 0.3
#: without validation, inspect --json, validate IN IN.
COMMANDS = ("compress", "compress", "compress", "compress_eps", "inspect", "validate")


@dataclasses.dataclass
class Case:
    """One fuzz case: a seed, its mutations (kinds applied in order), a command and a seed for both."""

    index: int
    seed_model: str
    kinds: tuple[str, ...]
    command: str
    rng_seed: int

    def label(self) -> str:
        return f"#{self.index} {self.seed_model} {'+'.join(self.kinds)} {self.command}"


def cases(count: int, seed: int = 0) -> list[Case]:
    """``count`` seeded cases; the first ``len(KINDS)`` apply each kind once (seed models in turn)."""
    rng = np.random.default_rng(seed)
    names = sorted(seeds_names())
    result = []
    for index in range(count):
        if index < len(KINDS):
            kinds: tuple[str, ...] = (KINDS[index],)
        else:
            kinds = tuple(str(k) for k in rng.choice(KINDS, size=int(rng.integers(1, 4))))
        result.append(Case(index, names[index % len(names)], kinds, str(_pick(rng, COMMANDS)),
                           int(rng.integers(2**31))))
    return result


def seeds_names() -> list[str]:
    return ["tiny_mlp", "tiny_cnn", *(p.stem for p in sorted(MODELS.glob("*.onnx")))]


def materialize(case: Case, model: onnx.ModelProto, directory: Path) -> Path:
    """Write ``case``'s mutant of ``model`` under ``directory``; returns the model's path. Structure
    mutations apply in order (one that finds nothing to change, such as dropping an input of a
    model without inputs, leaves the model as it was), then byte mutations or an external-data
    mutation (the last wins)."""
    rng = np.random.default_rng(case.rng_seed)
    mutant = onnx.ModelProto()
    mutant.CopyFrom(model)
    for kind in case.kinds:
        if kind in STRUCTURE:
            copy = onnx.ModelProto()
            copy.CopyFrom(mutant)
            try:
                mutant = STRUCTURE[kind](copy, rng)
            except (IndexError, ValueError):  # nothing to mutate (no inputs left, say): unchanged
                pass
    path = directory / "in.onnx"
    external = [k for k in case.kinds if k in EXTERNAL]
    if external:
        onnx.save_model(mutant, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="in.onnx.data", size_threshold=0)
        data = directory / "in.onnx.data"
        if external[-1] == "data_truncated" and data.exists():
            data.write_bytes(data.read_bytes()[: int(rng.integers(max(data.stat().st_size, 1)))])
        elif external[-1] == "data_missing":
            data.unlink(missing_ok=True)
        else:  # a location outside the model's directory
            loaded = onnx.load(str(path), load_external_data=False)
            for tensor in loaded.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = _pick(rng, ["../in.onnx.data", "/etc/passwd", "sub/../../x.data"])
            path.write_bytes(loaded.SerializeToString())
    else:
        data_bytes = mutant.SerializeToString()
        for kind in case.kinds:
            if kind in BYTES:
                data_bytes = BYTES[kind](data_bytes, rng)
        path.write_bytes(data_bytes)
    return path


# -- the contract ------------------------------------------------------------------------------


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _feeds(session: ort.InferenceSession, rng: Rng) -> dict[str, np.ndarray]:
    """Inputs for ``session``: every unknown dim 2, floats N(0, 1), integers and bools in {0, 1}."""
    feeds = {}
    for value in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else 2 for d in value.shape]
        kind = value.type[len("tensor("):-1]
        dtype = {"float": np.float32, "double": np.float64, "float16": np.float16, "bool": np.bool_}.get(kind)
        if dtype is None:
            dtype = np.dtype(kind)
        values = rng.standard_normal(dims) if np.dtype(dtype).kind == "f" else rng.integers(0, 2, dims)
        feeds[value.name] = np.asarray(values).astype(dtype)
    return feeds


def _agree(ref: np.ndarray, out: np.ndarray) -> bool:
    """Equal shapes; equal NaN and infinity positions; finite values within 1e-4 of the output's
    scale (1e-2 for float16) plus 1e-4 relative."""
    if ref.shape != out.shape:
        return False
    if ref.dtype.kind not in "fc":
        return bool(np.array_equal(ref, out))
    tol = 1e-2 if ref.dtype == np.float16 else 1e-4
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(np.isnan(ref), np.isnan(out)) or not np.array_equal(ref[np.isinf(ref)], out[np.isinf(ref)]):
        return False
    scale = max(1.0, float(np.abs(ref[finite]).max(initial=0.0)))
    return bool(np.all(np.abs(out[finite] - ref[finite]) <= tol * scale + tol * np.abs(ref[finite])))


def _matches_ort(source: Path, output: Path, rng_seed: int) -> str | None:
    """None when ``output``'s outputs equal ``source``'s in ONNX Runtime on generated inputs, else why not."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    ref = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    out = ort.InferenceSession(str(output), options, providers=["CPUExecutionProvider"])
    feeds = _feeds(ref, np.random.default_rng(rng_seed))
    names = [o.name for o in ref.get_outputs()]
    if [o.name for o in out.get_outputs()] != names or [i.name for i in out.get_inputs()] != list(feeds):
        return "the output model's inputs or outputs differ from the input model's"
    for name, a, b in zip(names, ref.run(None, feeds), out.run(None, feeds)):
        if not _agree(np.asarray(a), np.asarray(b)):
            return f"output '{name}' differs from ONNX Runtime's on the input model"
    return None


def argv(case: Case, source: Path, out: Path) -> list[str]:
    """The onnxfib command line ``case`` runs."""
    if case.command == "compress":
        return ["compress", str(source), str(out), "-q"]
    if case.command == "compress_eps":
        return ["compress", str(source), str(out), "--eps", "0.3", "--no-check", "-q"]
    if case.command == "inspect":
        return ["inspect", str(source), "--json"]
    return ["validate", str(source), str(source), "--json"]


def _spawned(arguments: list[str], directory: Path, timeout: float) -> tuple[int | None, str, str, float]:
    """Exit code (None after a timeout), stdout and stderr of ``python -m onnxfib arguments`` (CPU
    seconds not measured: NaN)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "onnxfib", *arguments], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=directory, stdin=subprocess.DEVNULL)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        code = None
    return code, stdout, stderr, float("nan")


def _child(arguments: list[str], directory: str) -> None:
    """In a forked child: run the command line with stdout and stderr in files of ``directory``."""
    os.chdir(directory)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout = open(1, "w", closefd=False)  # the child's own stdout until it exits
    sys.stderr = open(2, "w", closefd=False)
    from onnxfib.cli import main as cli_main

    code = 120
    try:
        code = cli_main(arguments)
    except BaseException:
        import traceback

        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path("cpu").write_text(f"{usage.ru_utime + usage.ru_stime:.3f}")
    Path("code").write_text(str(code))  # the forkserver can lose an exit status under load
    os._exit(code)


_SERVER = multiprocessing.get_context("forkserver")
_SERVER.set_forkserver_preload(["onnxfib.cli"])


def _forked(arguments: list[str], directory: Path, timeout: float) -> tuple[int | None, str, str, float]:
    """As ``_spawned``, but the command line runs in a child forked from a server that imported
    onnxfib once (the interpreter's start-up is most of a run on the tiny seeds); with the
    child's CPU seconds."""
    logs = directory / "logs"
    logs.mkdir()
    process = _SERVER.Process(target=_child, args=(arguments, str(logs)))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        code = None
    else:
        code = process.exitcode
    read = [(logs / name).read_text(errors="replace") if (logs / name).exists() else ""
            for name in ("stdout", "stderr", "cpu", "code")]
    shutil.rmtree(logs)
    if code is not None and read[3]:  # what the child said it exited with: the forkserver reads
        code = int(read[3])  # 255 when its report of the status fails (seen once in CI)
    return code, read[0], read[1], float(read[2] or "nan")


def run_case(case: Case, model: onnx.ModelProto, directory: Path, timeout: float = TIMEOUT,
             spawn: bool = False) -> dict:
    """Materialize and run ``case`` in ``directory`` (in a forked child, or with ``spawn`` through
    ``python -m onnxfib``); returns its record (``problems`` empty when the contract held)."""
    inputs, outputs = directory / "in", directory / "out"
    inputs.mkdir()
    outputs.mkdir()
    source = materialize(case, model, inputs)
    out = outputs / "out.onnx"
    before = _hashes(inputs)
    arguments = argv(case, source, out)
    command = [sys.executable, "-m", "onnxfib", *arguments]
    problems: list[str] = []
    start = time.monotonic()
    code, stdout, stderr, cpu = (_spawned if spawn else _forked)(arguments, directory, timeout)
    if code is None:
        problems.append(f"no exit within {timeout:g} s (a hang)")
    seconds = time.monotonic() - start
    if code is not None and code not in (0, 1, 2):
        problems.append(f"exit {code}")
    if "Traceback" in stderr:
        problems.append("a traceback on stderr")
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if code in (1, 2) and not last.startswith("error: "):
        problems.append("the last stderr line is not one 'error: ...' line")
    if _hashes(inputs) != before:
        problems.append("the input files changed")
    left = sorted(p.name for p in outputs.iterdir())
    if code != 0 and left:
        problems.append(f"files left at OUT's directory after exit {code}: {left}")
    if code == 0 and any(name.startswith(".onnxfib-") for name in left):
        problems.append(f"temporary files left beside OUT: {left}")
    if code == 0 and case.command.startswith("compress"):
        problems += _check_output(out, source, case)
    if code == 0 and case.command in ("inspect", "validate"):
        try:
            json.loads(stdout, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
        except ValueError as exc:
            problems.append(f"stdout is not strict JSON ({exc})")
    return {"case": case.label(), "kinds": list(case.kinds), "command": case.command, "exit": code,
            "seconds": round(seconds, 2), "cpu_s": round(cpu, 3), "problems": problems,
            "error": next((l for l in reversed(stderr.splitlines()) if l.startswith("error: ")), None),
            "argv": command}


def _check_output(out: Path, source: Path, case: Case) -> list[str]:
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except Exception as exc:
        return [f"the output fails onnx.checker's full check ({str(exc).splitlines()[0][:200]})"]
    if case.command != "compress":
        return []
    try:
        why = _matches_ort(source, out, case.rng_seed)
    except Exception as exc:
        return [f"ONNX Runtime cannot run the input or output model ({str(exc).splitlines()[0][:200]})"]
    return [why] if why else []


def fuzz(selected: list[Case], jobs: int = 2, keep: Path | None = None, timeout: float = TIMEOUT,
         on_record: Callable[[dict], None] | None = None, spawn: bool = False) -> list[dict]:
    """Run ``selected`` cases ``jobs`` at a time; returns their records in order. Broken cases'
    directories are copied under ``keep``."""
    models = seeds()

    def one(case: Case) -> dict:
        with tempfile.TemporaryDirectory(prefix="onnxfib-fuzz-") as tmp:
            try:
                record = run_case(case, models[case.seed_model], Path(tmp), timeout, spawn)
            except Exception as exc:  # the harness's own failure: reported as a broken case, not lost
                record = {"case": case.label(), "kinds": list(case.kinds), "command": case.command,
                          "exit": None, "seconds": 0.0, "cpu_s": float("nan"), "error": None, "argv": [],
                          "problems": [f"the fuzzer itself failed: {type(exc).__name__}: {exc}"]}
            if record["problems"] and keep is not None:
                shutil.copytree(tmp, keep / f"case{case.index}", dirs_exist_ok=True)
        if on_record is not None:
            on_record(record)
        return record

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, selected))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=TIMEOUT)
    parser.add_argument("--json", type=Path, help="Write the summary and every broken case here.")
    parser.add_argument("--spawn", action="store_true",
                        help="Run each case as `python -m onnxfib` (slower: an interpreter start each).")
    parser.add_argument("--keep", type=Path, help="Copy each broken case's files under this directory.")
    args = parser.parse_args()
    start = time.monotonic()

    def show(record: dict) -> None:
        mark = "BROKEN " + "; ".join(record["problems"]) if record["problems"] else "ok"
        print(f"{record['case']}: exit {record['exit']} {record['seconds']:.1f} s {mark}", flush=True)

    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    records = fuzz(cases(args.cases, args.seed), jobs=args.jobs, keep=args.keep, timeout=args.timeout,
                   on_record=show, spawn=args.spawn)
    broken = [r for r in records if r["problems"]]
    exits = {str(code): sum(r["exit"] == code for r in records) for code in sorted({r["exit"] for r in records}, key=str)}
    summary = {
        "cases": len(records), "clean": len(records) - len(broken), "seed": args.seed, "exits": exits,
        "kinds": {kind: sum(kind in r["kinds"] for r in records) for kind in KINDS},
        "commands": {c: sum(r["command"] == c for r in records) for c in dict.fromkeys(COMMANDS)},
        "wall_s": round(time.monotonic() - start, 1),
        "onnxfib_cpu_s": round(sum(r["cpu_s"] for r in records if r["cpu_s"] == r["cpu_s"]), 1),
        "broken": broken,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "broken"}, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
