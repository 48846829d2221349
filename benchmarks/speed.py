"""Speed and memory: the onnxfib CLI against onnxslim on BERT and wide MLPs with planted copies.

    python benchmarks/speed.py                  # BERT 2/4/8/12 layers, MLPs of widths 256 ... 16384
    python benchmarks/speed.py --quick          # BERT 2 layers, MLPs 256 and 1024: a few minutes
    python benchmarks/speed.py --only mlp --widths 256 1024 --no-write
    python benchmarks/speed.py --large          # also a 4 x 12288 x 12288 MLP (external data, ~10 GB)
    python benchmarks/speed.py --streaming      # external-data MLPs 4 x 4096 and 4 x 12288, --check full/layers
    python benchmarks/speed.py --streaming --llama   # and a 1.1B Llama (4.1 GiB; ~10 min, ~7 GB to export)

Every model is built into a temporary directory with planted copies, so that eps 0 has something
to merge and the fibration base's parameter count is known: BERT (``transformers.BertConfig()``
defaults but the number of layers, random init, seed 0, eager attention, legacy TorchScript export)
with the last eighth of every layer's ``intermediate.dense`` rows copied from its first eighth; Gemm/
Relu MLPs 256 -> w -> w -> 256 (and ``--large``'s 12288^5) whose hidden layers have the same copies.
Each model is compressed by ``onnxfib compress IN OUT --eps 0`` (validation on, the default),
``onnxfib compress IN OUT --eps 0.3 --no-check`` and ``onnxslim IN OUT``, each a child process (tools
alternating per repeat), measured by ``os.wait4``: CPU seconds (user + sys, all threads), wall
seconds and the child's peak RSS. eps 0 must reach exactly the planted base. Writes
``results/speed.json`` and the ``speed`` section of ``RESULTS.md``.

``--streaming`` measures models kept in external data instead (the MLPs 4096^5 and 12288^5 with the
same planted copies, always written with external data): ``onnxfib compress --eps 0`` with
``--check full`` and with ``--check layers``, peak RSS against the files' size and against issue 11's
goals (at most 2x the files with full validation, at most 1 GiB plus the largest layer with layers).
With ``--llama`` also a Llama-shaped decoder (``build_llama``: TinyLlama-1.1B's shape, planted copies
in every MLP, exported in a child process whose CPU time and peak RSS are recorded; ``--llama-layers``
makes it shallower). Writes ``results/speed_streaming.json`` and the ``streaming`` section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from planted_utils import MINILM_INPUTS as BERT_INPUTS  # noqa: E402
from planted_utils import export_hf_encoder, quiet  # noqa: E402
from sections import markers, write_section  # noqa: E402

import onnxfib  # noqa: E402
from onnxfib.stats import count_parameters  # noqa: E402

NAME = "speed"
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
BEGIN, END = markers(NAME)
SEED = 0
PLANTED = 8  # one row in PLANTED of every planted layer is a copy
BERT_LAYERS = (2, 4, 8, 12)
MLP_WIDTHS = (256, 1024, 4096, 8192, 16384)
MLP_IO = 256
LARGE = (12288,) * 5
SEQ = 128  # onnxfib validates BERT on batches of 1 x SEQ tokens
TIMEOUT = 600.0
FIT_PARAMS = 10_000_000  # scaling exponents are fitted over models at least this large
EXTERNAL_BYTES = 1 << 30  # models with more weight bytes are written with external data
TOOLS = {
    "onnxfib eps 0": ["-m", "onnxfib", "compress", "{in}", "{out}", "--eps", "0", "--report", "{report}", "-q"],
    "onnxslim": ["-m", "onnxslim", "{in}", "{out}"],
    "onnxfib eps 0.3 --no-check": ["-m", "onnxfib", "compress", "{in}", "{out}", "--eps", "0.3", "--no-check",
                                   "--report", "{report}", "-q"],
}
EXACT, SLIM, TOLERANT = TOOLS
STREAMING = "streaming"
STREAMING_JSON = HERE / "results" / f"speed_{STREAMING}.json"
STREAMED = ((4096,) * 5, LARGE)
CHECKS = ("full", "layers")


@dataclasses.dataclass
class Case:
    """A built model: its family and name, file, parameters before and in the planted base, and
    the CLI options onnxfib needs for it (input shapes)."""

    family: str
    name: str
    path: Path
    params: int
    base_params: int
    options: list[str] = dataclasses.field(default_factory=list)
    external: bool = False

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))


#: A small Python process that runs argv[3:], kills it after argv[2] seconds, and writes its rusage
#: and whether it timed out to argv[1] as JSON. The tool is started from it, not from this process:
#: Linux counts the memory of the process that calls exec in the child's ``ru_maxrss``, so a child
#: forked from a benchmark holding a model or torch would inherit that figure.
LAUNCHER = """import json, os, signal, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[3], sys.argv[3:])
stopped = []
def stop(*_):
    stopped.append(True)
    os.kill(pid, signal.SIGKILL)
signal.signal(signal.SIGALRM, stop)
signal.setitimer(signal.ITIMER_REAL, float(sys.argv[2]))
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump([usage.ru_utime, usage.ru_stime, usage.ru_maxrss, bool(stopped)], f)
sys.exit(os.waitstatus_to_exitcode(status) & 255)
"""


def measure(argv: list[str], timeout: float = TIMEOUT) -> dict:
    """Run ``argv`` (``argv[0]`` an executable path) as a grandchild, through LAUNCHER, and return
    its CPU seconds (user + sys of all its threads and waited-for children, ``os.wait4``), wall
    seconds, peak RSS (MiB, its ``ru_maxrss``), exit code and, on failure, the tail of its output.
    Past ``timeout`` seconds it is killed and the result says ``timed_out``, with the CPU seconds
    and memory it had used by then."""
    with tempfile.TemporaryDirectory() as tmp:
        usage_path, log_path = Path(tmp) / "usage.json", Path(tmp) / "log"
        with log_path.open("wb") as log:
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(usage_path), str(timeout), *argv],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout + 60)
            except subprocess.TimeoutExpired:  # the launcher itself hung: stop everything
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
            wall = time.perf_counter() - start
        usage = json.loads(usage_path.read_text()) if usage_path.exists() else None
        tail = log_path.read_text(errors="replace")[-600:]
    result = {"wall_s": round(wall, 3), "exit": code, "timed_out": usage is None or usage[3]}
    if usage is not None:
        user, system, maxrss, _ = usage
        result |= {"cpu_s": round(user + system, 3), "user_s": round(user, 3), "sys_s": round(system, 3),
                   "peak_rss_mb": round(maxrss / 1024, 1)}
    return result | ({"output": tail} if code else {})


#: A child process that times one layer's two clusterings at one eps (argv: model, weight, bias,
#: eps) and prints them as JSON: its fibers (each output row of the weight with its bias, the
#: signature the analysis builds where the layer's input colors are all distinct) and its opfibers
#: (each input column), CPU seconds of this process (user + sys, all threads) around each call.
CLUSTER_LAYER = """import json, resource, sys
import numpy as np, onnx
from onnx import numpy_helper
from onnxfib.coloring import Tolerance
path, weight, bias, eps = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
tensors = {t.name: t for t in onnx.load(path).graph.initializer}
w, b = numpy_helper.to_array(tensors[weight]), numpy_helper.to_array(tensors[bias])
def timed(signature):
    before = resource.getrusage(resource.RUSAGE_SELF)
    colors = Tolerance(eps).cluster(signature, overwrite=True).partition.n_colors
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": round(after.ru_utime - before.ru_utime, 3),
            "sys_s": round(after.ru_stime - before.ru_stime, 3), "colors": colors}
rows = np.empty((w.shape[0], w.shape[1] + 1))
rows[:, :-1], rows[:, -1] = w, b
result = {"rows": w.shape[0], "eps": eps, "fibers": timed(rows)}
del rows
result["opfibers"] = timed(np.ascontiguousarray(w.T, dtype=np.float64))  # rows as the analysis lays them out
print(json.dumps(result))
"""


def cluster_layer(path: Path, weight: str, bias: str, eps: float = 0.3, repeat: int = 1) -> dict:
    """:data:`CLUSTER_LAYER` on one layer of ``path``, ``repeat`` times (each its own child): the
    run of median total CPU seconds, with its fibers' and opfibers' figures, their sum
    (``cpu_s``) and the colors each found, and every run's total (``runs_cpu_s``);
    ``{"error": ...}`` if a run fails."""
    runs = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-c", CLUSTER_LAYER, str(path), weight, bias, str(eps)],
                              capture_output=True, text=True, timeout=TIMEOUT)
        if done.returncode:
            return {"error": done.stderr[-600:]}
        result = json.loads(done.stdout)
        runs.append(result | {"cpu_s": round(sum(result[k]["user_s"] + result[k]["sys_s"]
                                                 for k in ("fibers", "opfibers")), 3)})
    totals = [run["cpu_s"] for run in runs]
    return sorted(runs, key=lambda run: run["cpu_s"])[(len(runs) - 1) // 2] | {"runs_cpu_s": totals}


def exponent(params: list[int], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) against log(params); None with fewer than two points."""
    if len(params) < 2:
        return None
    return float(np.polyfit(np.log(params), np.log(seconds), 1)[0])


def _planted(rows: int) -> int:
    return rows // PLANTED


def save(model: onnx.ModelProto, path: Path, external: bool | None = None) -> bool:
    """Write ``model`` to ``path``, with its weights in ``path.data`` past EXTERNAL_BYTES (or as
    ``external`` says); whether it did."""
    if external is None:
        external = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_BYTES
    onnx.save_model(model, str(path), save_as_external_data=external, location=path.name + ".data")
    return external


def build_mlp(path: Path, sizes: tuple[int, ...], seed: int = SEED, external: bool | None = None) -> Case:
    """A Gemm/Relu MLP through ``sizes``; in every hidden layer the last 1/PLANTED rows (and biases)
    copy the first ones, so the base drops those rows and the matching columns of the next layer."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        weight = rng.standard_normal((fan_out, fan_in), dtype=np.float32) / np.float32(np.sqrt(fan_in))
        bias = rng.uniform(-0.5, 0.5, fan_out).astype(np.float32)
        hidden = index < len(sizes) - 2
        out = f"h{index}" if hidden else "y"
        if hidden:
            copies = _planted(fan_out)
            weight[fan_out - copies:], bias[fan_out - copies:] = weight[:copies], bias[:copies]
        inits += [numpy_helper.from_array(weight, f"W{index}"), numpy_helper.from_array(bias, f"b{index}")]
        nodes.append(helper.make_node("Gemm", [current, f"W{index}", f"b{index}"], [out], name=f"fc{index}", transB=1))
        if hidden:
            nodes.append(helper.make_node("Relu", [out], [f"r{index}"], name=f"relu{index}"))
            out = f"r{index}"
        current = out
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", sizes[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    external = save(model, path, external)
    del model, inits
    base = [sizes[0], *(w - _planted(w) for w in sizes[1:-1]), sizes[-1]]
    params = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
    assert params == count_parameters(onnx.load(str(path), load_external_data=False))
    return Case("mlp", "x".join(map(str, sizes)), path, params, sum(i * o + o for i, o in zip(base[:-1], base[1:])),
                ["--input-shape", f"x:1,{sizes[0]}"], external)


def build_bert(path: Path, layers: int, seed: int = SEED, **config) -> Case:
    """BertModel(BertConfig(num_hidden_layers=layers, **config)), random init from ``seed`` (biases
    and LayerNorm parameters drawn too, so that no two initializers are equal and the exporter
    shares none), eager attention, exported by the tests' ``export_hf_encoder`` (legacy exporter,
    opset 17, dynamic batch and sequence axes); in every layer the last 1/PLANTED rows of
    ``intermediate.dense`` copy the first ones, so the base drops them and the matching columns of
    ``output.dense``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(num_hidden_layers=layers, attn_implementation="eager", **config)).eval()
    removed = 0
    drawn_vectors(model)
    with torch.no_grad():
        for layer in model.encoder.layer:
            dense = layer.intermediate.dense
            copies = _planted(dense.out_features)
            dense.weight[-copies:], dense.bias[-copies:] = dense.weight[:copies].clone(), dense.bias[:copies].clone()
            removed += copies * (dense.in_features + 1 + layer.output.dense.out_features)

    export_hf_encoder(model, path, {k: np.ones((1, 16), np.int64) for k in BERT_INPUTS})
    params = count_parameters(onnx.load(str(path), load_external_data=False))
    seq = min(SEQ, model.config.max_position_embeddings)
    options = [arg for k in BERT_INPUTS for arg in ("--input-shape", f"{k}:1,{seq}")]
    return Case("bert", f"BERT {layers} layers", path, params, params - removed, options)


def drawn_vectors(model):
    """``model`` with its biases and LayerNorm parameters drawn at random (in place): they start
    constant, and the exporter would share equal initializers."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.normal_(1.0 if "LayerNorm.weight" in name else 0.0, 0.02)
    return model


LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B's shape: 1,100,048,384 parameters


def _single_data_file(path: Path) -> None:
    """Gather the external tensors of ``path`` (the legacy exporter writes one file per tensor past
    2 GB) into ``path.data``, a tensor at a time, and drop the per-tensor files."""
    from onnx.external_data_helper import ExternalDataInfo

    model = onnx.load(str(path), load_external_data=False)
    target, olds = path.parent / (path.name + ".data"), set()
    with target.open("wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            info = ExternalDataInfo(tensor)
            source = path.parent / info.location
            if source == target:
                raise ValueError(f"{path} already keeps a tensor in {target.name}")
            with source.open("rb") as f:
                f.seek(info.offset or 0)
                data = f.read(info.length) if info.length else f.read()
            offset = out.tell()
            out.write(data)
            out.write(b"\0" * (-out.tell() % 64))  # keep every tensor aligned for mapping
            del tensor.external_data[:]  # (set_external_data wants raw_data, which an external tensor lacks)
            for key, value in (("location", target.name), ("offset", offset), ("length", len(data))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            olds.add(source)
    onnx.save_model(model, str(path))
    for source in olds:
        source.unlink()


def build_llama(path: Path, seed: int = SEED, seq: int = SEQ, **config) -> Case:
    """LlamaForCausalLM(LlamaConfig(**(LLAMA | config))), random init from ``seed`` (the RMSNorm
    weights drawn too, so that no two initializers are equal), eager attention, no cache, exported
    by the legacy exporter (opset 17, dynamic batch and sequence axes) with input ``input_ids`` and
    output ``logits``, its weights always in one external ``path.data``; in every layer the last
    1/PLANTED rows of ``mlp.gate_proj`` and ``mlp.up_proj`` copy the first ones, so the base drops
    them and the matching columns of ``mlp.down_proj``. Validated on 1 x ``seq`` tokens."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = LLAMA | {"attn_implementation": "eager", "use_cache": False, "tie_word_embeddings": False} | config
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    removed = 0
    with torch.no_grad():
        for param in model.parameters():  # RMSNorm weights start at one: make them differ
            if param.dim() == 1:
                param.normal_(1.0, 0.02)
        for layer in model.model.layers:
            mlp = layer.mlp
            assert mlp.gate_proj.bias is None and mlp.up_proj.bias is None and mlp.down_proj.bias is None
            copies = _planted(mlp.gate_proj.out_features)
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[-copies:] = proj.weight[:copies].clone()
            removed += copies * (2 * mlp.gate_proj.in_features + mlp.down_proj.out_features)

    class _Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):  # an all-ones mask: without one, transformers traces aten::diff (no ONNX)
            mask = torch.ones_like(input_ids)
            return self.inner(input_ids=input_ids, attention_mask=mask, use_cache=False, return_dict=False)[0]

    axes = {0: "batch", 1: "seq"}
    with quiet(), torch.no_grad():
        torch.onnx.export(_Logits(model).eval(), (torch.ones((1, 16), dtype=torch.int64),), str(path), dynamo=False,
                          opset_version=17, input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": axes, "logits": axes})
    expected = sum(p.numel() for p in model.parameters())
    del model
    external = any(t.data_location == TensorProto.EXTERNAL
                   for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    if external:
        _single_data_file(path)
    else:  # onnx.save_model appends to an existing data file
        small = onnx.load(str(path))
        (path.parent / (path.name + ".data")).unlink(missing_ok=True)
        onnx.save_model(small, str(path), save_as_external_data=True, location=path.name + ".data")
        del small
    exported = onnx.load(str(path), load_external_data=False)
    weights = sum(int(np.prod(t.dims)) for t in exported.graph.initializer if t.data_type == TensorProto.FLOAT)
    assert weights == expected, (weights, expected)  # every torch parameter is one initializer, none shared
    params = count_parameters(exported)  # and the graph's float constants (rotary inv_freq, eps, ...)
    layers = settings["num_hidden_layers"]
    return Case("llama", f"Llama {layers} layers, hidden {settings['hidden_size']}", path, params, params - removed,
                ["--input-shape", f"input_ids:1,{seq}"], True)


def run_case(case: Case, tmp: Path, repeat: int, timeout: float) -> dict:
    """Every tool on ``case``, ``repeat`` times (tools alternating), with the parameters each left."""
    runs: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
    for index in range(repeat):
        for tool, template in TOOLS.items():
            out, report = tmp / f"out_{index}.onnx", tmp / "report.json"
            argv = [sys.executable] + [a.format(**{"in": case.path, "out": out, "report": report}) for a in template]
            if tool == SLIM and case.external:
                argv.append("--save-as-external-data")
            result = measure(argv + (case.options if tool != SLIM else []), timeout)
            if result["exit"] == 0:
                result["params_after"] = (json.loads(report.read_text())["params_after"] if tool != SLIM else
                                          count_parameters(onnx.load(str(out), load_external_data=False)))
            for path in (report, *tmp.glob(out.name + "*")):
                path.unlink(missing_ok=True)
            runs[tool].append(result)
            print(f"  {case.name}: {tool}: {_status(result)}", file=sys.stderr)
    size = case.file_bytes
    summary = {}
    for tool, results in runs.items():
        done = [r for r in results if r["exit"] == 0]
        summary[tool] = {"ok": len(done) == len(results)} | ({
            "cpu_s": statistics.median(r["cpu_s"] for r in done),
            "wall_s": statistics.median(r["wall_s"] for r in done),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in done),
            "rss_over_file": max(r["peak_rss_mb"] for r in done) * 2**20 / size,
            "params_after": done[0]["params_after"],
        } if done else {})
    for tool in (EXACT, TOLERANT):
        if summary[tool]["ok"] and summary[SLIM]["ok"]:
            summary[tool]["cpu_ratio_vs_onnxslim"] = summary[tool]["cpu_s"] / summary[SLIM]["cpu_s"]
            summary[tool]["rss_ratio_vs_onnxslim"] = summary[tool]["peak_rss_mb"] / summary[SLIM]["peak_rss_mb"]
    return {"family": case.family, "name": case.name, "params": case.params, "base_params": case.base_params,
            "file_mb": round(size / 2**20, 1), "external_data": case.external,
            "base_reached": summary[EXACT].get("params_after") == case.base_params if summary[EXACT]["ok"] else None,
            "summary": summary, "runs": runs}


def _status(result: dict) -> str:
    if result["timed_out"]:
        return f"timed out after {result['wall_s']:.0f} s wall ({result.get('cpu_s', 0):.0f} CPU s)"
    text = f"{result['cpu_s']:.1f} CPU s, {result['wall_s']:.1f} s wall, {result['peak_rss_mb']:.0f} MiB"
    return text if result["exit"] == 0 else f"exit {result['exit']} ({text}): {result['output'].strip()[-200:]}"


def machine() -> dict:
    """The CPU model, cores this process may use, total memory and load average, from /proc."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gb": round(mem_kb / 2**20, 1),
            "load_average_at_start": list(os.getloadavg())}


def scaling(cases: list[dict]) -> dict:
    """Per family and tool: the log-log slope of median CPU seconds against parameters, over the
    models of at least FIT_PARAMS parameters (below, start-up dominates) and over all of them."""
    fits: dict[str, dict] = {}
    for family in dict.fromkeys(c["family"] for c in cases):
        for tool in TOOLS:
            points = [(c["params"], c["summary"][tool]["cpu_s"]) for c in cases
                      if c["family"] == family and c["summary"][tool]["ok"]]
            large = [p for p in points if p[0] >= FIT_PARAMS]
            fits.setdefault(family, {})[tool] = {
                "exponent": exponent(*zip(*large)) if len(large) > 1 else None, "points": len(large),
                "exponent_all": exponent(*zip(*points)) if len(points) > 1 else None, "points_all": len(points)}
    return fits


def goals(data: dict) -> list[dict]:
    """The issue's goals, each with the measured figure and whether it is met (None: not measured)."""
    by_name = {c["name"]: c["summary"] for c in data["cases"]}
    bert = by_name.get("BERT 12 layers", {})
    wide_case = next((c for c in data["cases"] if c["name"] == "256x16384x16384x256"), {})
    wide = wide_case.get("summary", {}).get(TOLERANT, {})
    layer = wide_case.get("layer_clustering", {})
    measured = [c for c in data["cases"] if c["summary"][EXACT]["ok"]]
    largest = max(measured, key=lambda c: c["file_mb"]) if measured else None
    rows = [("BERT-base, eps 0 with validation: CPU time / onnxslim's", "<= 1.0",
             bert.get(EXACT, {}).get("cpu_ratio_vs_onnxslim"), 1.0),
            ("BERT-base, eps 0.3 --no-check: CPU time / onnxslim's", "<= 1.5",
             bert.get(TOLERANT, {}).get("cpu_ratio_vs_onnxslim"), 1.5),
            (f"peak RSS / model file, eps 0, largest model ({largest['name'] if largest else '–'})", "<= 3",
             largest["summary"][EXACT]["rss_over_file"] if largest else None, 3.0),
            *((f"CPU time exponent in parameters, {family}, eps 0 ({fit[EXACT]['points']} models of "
               f">= {FIT_PARAMS / 1e6:.0f}M parameters)", "<= 1.1", fit[EXACT]["exponent"], 1.1)
              for family, fit in data["scaling"].items()),
            ("a 16384-wide layer (16384 x 16384, of the model below) clusters at eps 0.3: CPU s of its fibers' "
             "and opfibers' clusterings", "< 10", layer.get("cpu_s"), 10.0),
            ("(for comparison, no goal) the whole `compress --eps 0.3 --no-check` run of 256x16384x16384x256: "
             "CPU s", "–", wide.get("cpu_s"), None)]
    return [{"goal": goal, "target": target, "measured": value,
             "met": None if value is None or limit is None else value <= limit}
            for goal, target, value, limit in rows]


def run(families: list[str], layers: tuple[int, ...], widths: tuple[int, ...], repeat: int, timeout: float,
        checkpoint: Path | None = None) -> dict:
    """Build and measure every model of ``families``; the figures so far (``"partial": true``) go to
    ``checkpoint`` after each model, so that a run stopped early still leaves its JSON."""
    start, cases = time.perf_counter(), []
    info = machine()
    startup = {tool: measure([sys.executable, "-m", tool, "--help"]) for tool in ("onnxfib", "onnxslim")}
    plan = ([("bert", n) for n in layers] if "bert" in families else []) + \
           ([("mlp", (MLP_IO, w, w, MLP_IO)) for w in widths] if "mlp" in families else []) + \
           ([("mlp", LARGE)] if "large" in families else [])
    for index, (family, size) in enumerate(plan):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            t0 = time.perf_counter()
            case = build_bert(tmp / "bert.onnx", size) if family == "bert" else build_mlp(tmp / "mlp.onnx", size)
            print(f"{case.name}: {case.params:,} parameters, {case.file_bytes / 2**20:.0f} MiB, built in "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
            cases.append(run_case(case, tmp, repeat, timeout))
            if family == "mlp" and size[1] == max(widths):  # its square hidden layer, W1
                cases[-1]["layer_clustering"] = cluster_layer(case.path, "W1", "b1", repeat=repeat)
        data = summarize(info, startup, cases, repeat, timeout, time.perf_counter() - start)
        if checkpoint and index < len(plan) - 1:
            checkpoint.write_text(json.dumps(data | {"partial": True}, indent=2) + "\n")
    return data


def summarize(info: dict, startup: dict, cases: list[dict], repeat: int, timeout: float, seconds: float) -> dict:
    """The benchmark's JSON: settings, machine, start-up, cases, scaling fits, goals and versions."""
    import onnxruntime
    import onnxslim
    import torch
    import transformers

    data = {"benchmark": NAME, "machine": info, "repeat": repeat, "timeout_s": timeout, "seq": SEQ,
            "planted_share": 1 / PLANTED, "tools": {tool: " ".join(args[1:]) for tool, args in TOOLS.items()},
            "startup": startup, "cases": cases, "scaling": scaling(cases), "seconds": round(seconds, 1),
            "versions": {"onnxfib": onnxfib.__version__, "onnxslim": onnxslim.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()}}
    return data | {"goals": goals(data)}


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        BEGIN, "## Speed and memory against onnxslim (`benchmarks/speed.py`)", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB memory, load average "
        f"{m['load_average_at_start'][0]:.1f} at the start (shared machine: other processes ran meanwhile). "
        "Each tool runs as a child process; CPU seconds are user + sys of all its threads (`os.wait4`), "
        f"the median of {data['repeat']} run(s), tools alternating; peak RSS is the child's `ru_maxrss`. "
        f"Models carry planted copies (the last {data['planted_share']:.1%} of every FFN or hidden layer's rows "
        f"copy the first ones); onnxfib validates BERT on 1 x {data['seq']} tokens. "
        f"A run over {data['timeout_s']:.0f} s is stopped and shown as timed out."
        + (f" **Partial run**: {data['partial'] if isinstance(data['partial'], str) else 'stopped early'}."
           if data.get("partial") else ""), "",
        "### Goals (issue 11)", "", "| goal | target | measured | met |", "|---|---|---:|---|",
        *(f"| {g['goal']} | {g['target']} | {_num(g['measured'])} | "
          f"{'–' if g['met'] is None else ('yes' if g['met'] else '**no**')} |" for g in data["goals"]),
        *([] if not (layer := next((c["layer_clustering"] for c in data["cases"] if "layer_clustering" in c), None))
          or "error" in layer else
          ["", "The layer's clustering runs in a child process on its own weight (the signature the analysis "
           "builds where the layer's input colors are all distinct, in float64)"
           + (f", {len(runs)} times, the run of median CPU time shown (all: {', '.join(f'{t:.1f}' for t in runs)} s)"
              if (runs := layer.get("runs_cpu_s", [])) else "")
           + f": fibers of its {layer['rows']:,} rows {layer['fibers']['user_s']:.1f} + {layer['fibers']['sys_s']:.1f} CPU s (user + sys), "
           f"{layer['fibers']['colors']:,} colors; opfibers of its columns {layer['opfibers']['user_s']:.1f} + "
           f"{layer['opfibers']['sys_s']:.1f} CPU s, {layer['opfibers']['colors']:,} colors."]),
        "", "The ratios count system time, and system time is what varies most between runs on a shared "
        "host (onnxslim's above all: the page faults of its in-memory copies); the table below splits each "
        "figure into user + sys.",
        "", "### Per model", "",
        "| model | parameters | base (planted) | file MiB | tool | CPU s (user + sys) | wall s | peak RSS MiB | RSS / file "
        "| parameters after | CPU / onnxslim | RSS / onnxslim |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in data["cases"]:
        for tool, s in case["summary"].items():
            first = tool == EXACT
            head = (f"| {case['name']} | {case['params']:,} | {case['base_params']:,} | {case['file_mb']:,.0f} "
                    if first else "| | | | ")
            if not s["ok"]:
                last = case["runs"][tool][-1]
                used = f", {last['cpu_s']:.0f} CPU s" if "cpu_s" in last else ""
                why = f"timed out ({last['wall_s']:.0f} s wall{used})" if last["timed_out"] else f"failed (exit {last['exit']})"
                lines.append(head + f"| {tool} | {why} | | | | | | |")
                continue
            after = f"{s['params_after']:,}" + (" (base)" if first and case["base_reached"] else
                                                " (**not the base**)" if first else "")
            done = [r for r in case["runs"][tool] if r["exit"] == 0]
            split = (f" ({statistics.median(r['user_s'] for r in done):.1f} + "
                     f"{statistics.median(r['sys_s'] for r in done):.1f})")
            lines.append(head + f"| {tool} | {s['cpu_s']:.1f}{split} | {s['wall_s']:.1f} | {s['peak_rss_mb']:,.0f} | "
                         f"{s['rss_over_file']:.2f} | {after} | {_num(s.get('cpu_ratio_vs_onnxslim'))} | "
                         f"{_num(s.get('rss_ratio_vs_onnxslim'))} |")
    lines += ["", f"Scaling exponents (least-squares slope of log CPU s against log parameters, models of "
              f">= {FIT_PARAMS / 1e6:.0f}M parameters; over all models in brackets): " + "; ".join(
        f"{family}: " + ", ".join(f"{tool} {_num(fit['exponent'])} ({_num(fit['exponent_all'])})"
                                  for tool, fit in fits.items())
        for family, fits in data["scaling"].items()) + ". Start-up alone (`python -m TOOL --help`): " + ", ".join(
        f"{tool} {r['cpu_s']:.1f} CPU s, {r['peak_rss_mb']:.0f} MiB" for tool, r in data["startup"].items()) + ".", "",
        f"Regenerate: `python benchmarks/speed.py` ({data['seconds']:.0f} s here; onnxfib "
        f"{data['versions']['onnxfib']}, onnxslim {data['versions']['onnxslim']}, onnxruntime "
        f"{data['versions']['onnxruntime']}, torch {data['versions']['torch']}).", END]
    return "\n".join(lines)


#: Run as a child by _build_llama_child: build_llama(argv[2], **json(argv[3])), its Case to argv[4].
LLAMA_CHILD = """import dataclasses, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import speed
case = speed.build_llama(Path(sys.argv[2]), **json.loads(sys.argv[3]))
Path(sys.argv[4]).write_text(json.dumps(dataclasses.asdict(case) | {"path": str(case.path)}))
"""


def _build_llama_child(path: Path, config: dict, timeout: float) -> tuple[Case | None, dict]:
    """build_llama in a child process (torch and the exporter's memory leave with it), measured
    like a tool: the Case (None if the export failed) and the export's figures."""
    result_path = path.with_name("case.json")
    export = measure([sys.executable, "-c", LLAMA_CHILD, str(HERE), str(path), json.dumps(config), str(result_path)],
                     timeout)
    if export["exit"] != 0 or not result_path.exists():
        return None, export
    fields = json.loads(result_path.read_text())
    return Case(**(fields | {"path": Path(fields["path"])})), export


def largest_tensor_bytes(path: Path) -> int:
    """Bytes of the largest initializer of the model at ``path`` (its external data not read)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return max(int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
               for t in graph.initializer)


def run_streaming(timeout: float, llama: dict | None = None) -> dict:
    """Every model of STREAMED, built with external data, compressed at eps 0 with each of CHECKS;
    with ``llama`` (build_llama's config overrides, ``{}`` for TinyLlama's shape) a Llama too."""
    start, cases = time.perf_counter(), []
    builders = [lambda path, sizes=sizes: (build_mlp(path, sizes, external=True), None) for sizes in STREAMED]
    if llama is not None:
        builders.append(lambda path: _build_llama_child(path, llama, timeout))
    for builder in builders:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            case, export = builder(tmp / "model.onnx")
            if case is None:
                print(f"Llama export failed: {_status(export)}", file=sys.stderr)
                cases.append({"name": "Llama", "export": export, "exit": export["exit"]})
                continue
            size = case.file_bytes
            largest = largest_tensor_bytes(case.path)
            print(f"{case.name}: {case.params:,} parameters, {size / 2**20:.0f} MiB"
                  + (f" (export: {_status(export)})" if export else ""), file=sys.stderr)
            for check in CHECKS:
                out, report = tmp / "out.onnx", tmp / "report.json"
                argv = [sys.executable, "-m", "onnxfib", "compress", str(case.path), str(out), "--eps", "0",
                        "--check", check, "--report", str(report), "-q", *case.options]
                result = measure(argv, timeout)
                print(f"  --check {check}: {_status(result)}", file=sys.stderr)
                limit = 2 * size if check == "full" else (1 << 30) + largest
                row = {"name": case.name, "params": case.params, "base_params": case.base_params,
                       "file_mb": round(size / 2**20, 1), "largest_layer_mb": round(largest / 2**20, 1),
                       "check": check, "limit_mb": round(limit / 2**20, 1)} | result
                if export:
                    row["export"] = export
                if result["exit"] == 0:
                    done = json.loads(report.read_text())
                    row |= {"params_after": done["params_after"], "base_reached": done["params_after"] == case.base_params,
                            "validation_ok": done["validation"]["ok"], "validation_mode": done["validation"]["mode"],
                            "max_abs_error": done["validation"]["outputs"][0]["max_abs"],
                            "rss_over_file": result["peak_rss_mb"] * 2**20 / size,
                            "goal_met": result["peak_rss_mb"] * 2**20 <= limit}
                cases.append(row)
                for path in (report, *tmp.glob(out.name + "*")):
                    path.unlink(missing_ok=True)
    return {"benchmark": STREAMING, "machine": machine(), "timeout_s": timeout, "cases": cases,
            "seconds": round(time.perf_counter() - start, 1), "onnxfib": onnxfib.__version__}


def streaming_markdown(data: dict) -> str:
    begin, end = markers(STREAMING)
    m = data["machine"]
    lines = [begin, "## Models in external data (`benchmarks/speed.py --streaming`)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB memory, load average "
             f"{m['load_average_at_start'][0]:.1f} at the start (shared). Gemm/Relu MLPs whose hidden layers carry "
             "planted copies (the last eighth of the rows copy the first), written with external data; "
             "`onnxfib compress IN OUT --eps 0 --check full|layers` as a child process, peak RSS its `ru_maxrss` "
             "(memory-mapped weights it touched count). Goals (issue 11): peak at most 2x the files with "
             "`--check full`, at most 1 GiB plus the largest layer with `--check layers`.", "",
             "| model | parameters | base (planted) | files MiB | check | CPU s | wall s | peak RSS MiB | RSS / files "
             "| goal MiB | met | parameters after | max abs error |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    exports = {}
    for c in data["cases"]:
        if "export" in c:
            exports[c["name"]] = c["export"]
        if "check" not in c:  # its export failed
            continue
        if c["exit"] != 0:
            why = "timed out" if c["timed_out"] else f"failed (exit {c['exit']})"
            lines.append(f"| {c['name']} | {c['params']:,} | {c['base_params']:,} | {c['file_mb']:,.0f} | {c['check']} "
                         f"| {why} | | {c.get('peak_rss_mb', 0):,.0f} | | {c['limit_mb']:,.0f} | **no** | | |")
            continue
        after = f"{c['params_after']:,}" + (" (base)" if c["base_reached"] else " (**not the base**)")
        lines.append(f"| {c['name']} | {c['params']:,} | {c['base_params']:,} | {c['file_mb']:,.0f} | {c['check']} "
                     f"| {c['cpu_s']:.1f} | {c['wall_s']:.1f} | {c['peak_rss_mb']:,.0f} | {c['rss_over_file']:.2f} "
                     f"| {c['limit_mb']:,.0f} | {'yes' if c['goal_met'] else '**no**'} | {after} "
                     f"| {c['max_abs_error']:.3g} |")
    for name, e in exports.items():
        lines += ["", f"{name}: `transformers` LlamaForCausalLM, random init (seed 0), eager attention, no cache, "
                  "input_ids 1 x 128, the last eighth of every MLP's gate_proj and up_proj rows copying the first; "
                  "exported by torch's legacy exporter (opset 17) in a child process: "
                  + (f"{e['cpu_s']:.1f} CPU s ({e['user_s']:.1f} user + {e['sys_s']:.1f} sys), {e['wall_s']:.0f} s "
                     f"wall, peak RSS {e['peak_rss_mb']:,.0f} MiB." if e["exit"] == 0 else
                     f"**failed** (exit {e['exit']}): {e.get('output', '')[-200:]!r}.")]
    lines += ["", f"Regenerate: `python benchmarks/speed.py --streaming{' --llama' if exports else ''}` "
              f"({data['seconds']:.0f} s here; onnxfib {data['onnxfib']}).", end]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=("bert", "mlp"), default=["bert", "mlp"])
    parser.add_argument("--layers", type=int, nargs="+", default=list(BERT_LAYERS), help="BERT depths")
    parser.add_argument("--widths", type=int, nargs="+", default=list(MLP_WIDTHS), help="MLP widths")
    parser.add_argument("--quick", action="store_true", help="BERT 2 layers, MLP widths 256 and 1024")
    parser.add_argument("--large", action="store_true", help="also the 4 x 12288 x 12288 MLP (~10 GB)")
    parser.add_argument("--streaming", action="store_true",
                        help="only the external-data MLPs (4096^5, 12288^5) with --check full and layers")
    parser.add_argument("--llama", action="store_true",
                        help="with --streaming: also the 1.1B Llama-shaped decoder (build_llama)")
    parser.add_argument("--llama-layers", type=int, default=None,
                        help="with --llama: this many decoder layers instead of TinyLlama's 22")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and model (median)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per run")
    parser.add_argument("--no-write", action="store_true", help="print the section, write nothing")
    parser.add_argument("--section", action="store_true", help="rewrite the RESULTS.md section from the JSON only")
    args = parser.parse_args(argv)
    if args.streaming:
        if args.section:
            write_section(STREAMING, streaming_markdown(json.loads(STREAMING_JSON.read_text())))
            return 0
        llama = None if not args.llama else ({} if args.llama_layers is None else
                                              {"num_hidden_layers": args.llama_layers})
        data = run_streaming(args.timeout, llama)
        section = streaming_markdown(data)
        print(section)
        if not args.no_write:
            STREAMING_JSON.parent.mkdir(parents=True, exist_ok=True)
            STREAMING_JSON.write_text(json.dumps(data, indent=2) + "\n")
            write_section(STREAMING, section)
        return 0 if all(c.get("base_reached") and c.get("validation_ok") for c in data["cases"]) else 1
    if args.section:
        write_section(NAME, markdown(json.loads(RESULTS_JSON.read_text())))
        return 0
    if args.quick:
        args.layers, args.widths = [2], [256, 1024]
    data = run(args.only + (["large"] if args.large else []), tuple(args.layers), tuple(args.widths),
               args.repeat, args.timeout, None if args.no_write else RESULTS_JSON)
    section = markdown(data)
    print(section)
    if not args.no_write:
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(data, indent=2) + "\n")
        write_section(NAME, section)
    missed = [c["name"] for c in data["cases"] if c["base_reached"] is False]
    if missed:
        print(f"eps 0 did not reach the planted base on: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
