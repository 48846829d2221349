"""ONNX Runtime latency of compressed models beside torch exports of the same widths.

    python benchmarks/latency.py                      # MiniLM, BERT-base and a ResNet-style CNN
    python benchmarks/latency.py --models cnn --rounds 5 --no-write

Each model is compressed by ``onnxfib.compress``: the real all-MiniLM-L6-v2 weights by a
data-free ``target_params`` search (``MINILM_KEEP``); BERT-base (``speed.build_bert``) and a
ResNet-style CNN (``ResNet``, random init), both with planted copies, at eps 0, where they return
exactly to their base. The same torch architecture is then built at the widths the compressed
file ends at, *the twin*: each narrowed ``nn.Linear`` replaced by one of the compressed shape,
attention reshaped to the compressed head sizes, the CNN's blocks at their compressed inner
widths. It is exported by the same exporter with the same options as the original, and must hold
the same parameters as the compressed file (the multisets of their float initializers' shapes
agree). ONNX Runtime (CPU, one intra- and one inter-op thread, default graph optimisations) runs
the original, the compressed model and the twin on the same inputs at batch 1 and 32, in turn,
for ``--rounds`` rounds; a round times as many runs as fill about ``ROUND_SECONDS`` of CPU. The
table gives each model's median CPU milliseconds per run and the compressed model's ratio to its
twin: issue 11's goal is at most 1.05. Writes ``results/latency.json`` and the ``latency``
section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from sections import markers, quiet, write_section  # noqa: E402

NAME = "latency"
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
BEGIN, END = markers(NAME)
GOAL = 1.05
BATCHES = (1, 32)
SEQ = 32  # tokens per row for the encoders
CNN_INPUT = (3, 64, 64)
ROUND_SECONDS = 0.5
MINILM_KEEP = 0.85
MODELS = ("minilm", "bert", "cnn")
SEED = 0


def float_shapes(model: onnx.ModelProto) -> Counter:
    """The shapes of the model's float initializers with more than one element, counted."""
    return Counter(tuple(t.dims) for t in model.graph.initializer
                   if t.data_type == TensorProto.FLOAT and int(np.prod(t.dims)) > 1)


def linear_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """``{module: (in, out)}`` of the exported ``nn.Linear`` layers: each ``MatMul`` by an
    initializer followed by an ``Add`` of an initializer named ``<module>.bias``."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    shapes = {}
    for node in model.graph.node:
        bias = [name for name in node.input if name in inits and name.endswith(".bias")]
        fed = [producer.get(name) for name in node.input if name not in inits]
        if node.op_type != "Add" or len(bias) != 1 or len(fed) != 1 or fed[0] is None or fed[0].op_type != "MatMul":
            continue
        weight = [inits[name] for name in fed[0].input if name in inits]
        if len(weight) == 1:
            shapes[bias[0].removesuffix(".bias")] = weight[0]
    return shapes


def narrow_bert(model, shapes: dict[str, tuple[int, int]]):
    """``model`` (a transformers BERT encoder) with every ``nn.Linear`` whose exported twin in
    ``shapes`` (keys ending in the module's name) has another shape replaced by a fresh one of that
    shape, and self-attention reshaping queries and keys, and values, to their own head sizes."""
    import torch
    from transformers.models.bert import modeling_bert

    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        found = [shape for key, shape in shapes.items() if key == name or key.endswith("." + name)]
        if len(found) == 1 and found[0] != (module.in_features, module.out_features):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, torch.nn.Linear(*found[0]))
    for layer in model.encoder.layer:
        attention = layer.attention.self
        heads = attention.num_attention_heads
        query, value = attention.query.out_features, attention.value.out_features
        if attention.key.out_features != query or query % heads or value % heads:
            raise ValueError(f"unequal head widths: query {query}, key {attention.key.out_features}, value {value}")

        def forward(hidden, attention_mask=None, *_, self=attention, qk=query // heads, v=value // heads, **kwargs):
            rows = hidden.shape[:-1]
            q, k = (proj(hidden).view(*rows, -1, qk).transpose(1, 2) for proj in (self.query, self.key))
            values = self.value(hidden).view(*rows, -1, v).transpose(1, 2)
            out, weights = modeling_bert.eager_attention_forward(self, q, k, values, attention_mask, dropout=0.0,
                                                                 scaling=self.scaling)
            return out.reshape(*rows, -1).contiguous(), weights

        attention.forward = forward  # the scaling stays the original head size's
    return model


def resnet_class():
    """``ResNet`` (built on first use: torch is imported late)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        """x + BN(conv(ReLU(BN(conv(x))))), then ReLU; ``inner`` channels between the convs."""

        def __init__(self, channels: int, inner: int) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False), nn.BatchNorm2d(inner)
            self.conv2, self.bn2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    class ResNet(nn.Module):
        """A stride-2 stem, stages of ``STAGES`` channels with ``BLOCKS`` blocks each (a stride-2
        conv between stages), global average pooling and a 10-way linear head; ``inner`` gives each
        block's inner width (default: its stage's channels)."""

        STAGES, BLOCKS = (64, 128, 256), 2

        def __init__(self, inner: tuple[int, ...] | None = None) -> None:
            super().__init__()
            widths = [c for c in self.STAGES for _ in range(self.BLOCKS)]
            inner = tuple(widths) if inner is None else inner
            layers: list[nn.Module] = [nn.Conv2d(3, self.STAGES[0], 3, 2, 1, bias=False),
                                       nn.BatchNorm2d(self.STAGES[0]), nn.ReLU()]
            for stage, channels in enumerate(self.STAGES):
                if stage:
                    layers += [nn.Conv2d(self.STAGES[stage - 1], channels, 3, 2, 1, bias=False),
                               nn.BatchNorm2d(channels), nn.ReLU()]
                layers += [Block(channels, inner[stage * self.BLOCKS + b]) for b in range(self.BLOCKS)]
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(self.STAGES[-1], 10)

        def forward(self, x):
            return self.head(self.features(x).mean(dim=(2, 3)))

        def blocks(self) -> list[Block]:
            return [m for m in self.features if isinstance(m, Block)]

    return ResNet


def drawn_batchnorm(model):
    """``model`` with its BatchNorm parameters and statistics drawn at random (in place), so that
    no two folded conv biases are equal and the exporter shares none."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor, centre in ((module.weight, 1.0), (module.bias, 0.0), (module.running_mean, 0.0)):
                    tensor.normal_(centre, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def export_cnn(model, path: Path) -> None:
    """Legacy TorchScript export, opset 17, dynamic batch (BatchNorm folds into the convs)."""
    import torch

    with quiet(), torch.no_grad():
        torch.onnx.export(model.eval(), torch.zeros(2, *CNN_INPUT), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})


def build_cnn(folder: Path) -> tuple[Path, Path]:
    """The planted ResNet (the last eighth of every block's first conv filters, and their
    BatchNorm, copy its first eighth) and, after an eps-0 compress, its twin at the compressed
    inner widths: ``(compressed, twin)``; the original is ``folder / "cnn.onnx"``."""
    import torch

    import onnxfib

    ResNet = resnet_class()
    torch.manual_seed(SEED)
    model = ResNet().eval()
    drawn_batchnorm(model)
    with torch.no_grad():
        for block in model.blocks():
            copies = block.conv1.out_channels // 8
            block.conv1.weight[-copies:] = block.conv1.weight[:copies].clone()
            for tensor in (block.bn1.weight, block.bn1.bias, block.bn1.running_mean, block.bn1.running_var):
                tensor[-copies:] = tensor[:copies].clone()
    original = folder / "cnn.onnx"
    export_cnn(model, original)
    compressed = folder / "cnn.compressed.onnx"
    kept = onnxfib.compress(original, eps=0.0, input_shapes={"x": (1, *CNN_INPUT)})
    kept.save(compressed)
    dims = {t.name: int(t.dims[0]) for t in kept.model.graph.initializer}
    out_channels = [dims[node.input[1]] for node in kept.model.graph.node if node.op_type == "Conv"]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]  # in the order they run and export
    twin = folder / "cnn.twin.onnx"
    export_cnn(drawn_batchnorm(ResNet(tuple(out_channels[convs.index(b.conv1)] for b in model.blocks()))), twin)
    return compressed, twin


def build_bert_base(folder: Path) -> tuple[Path, Path]:
    """``speed.build_bert``'s planted 12-layer BERT-base compressed at eps 0, and its twin."""
    import speed
    import torch
    from planted_utils import export_hf_encoder
    from transformers import BertConfig, BertModel

    import onnxfib

    original = folder / "bert.onnx"
    speed.build_bert(original, 12)
    compressed = folder / "bert.compressed.onnx"
    kept = onnxfib.compress(original, eps=0.0, check=False, input_shapes={k: (1, SEQ) for k in speed.BERT_INPUTS})
    kept.save(compressed)
    torch.manual_seed(SEED)
    model = speed.drawn_vectors(narrow_bert(BertModel(BertConfig(num_hidden_layers=12, attn_implementation="eager")),
                                            linear_shapes(kept.model)))
    twin = folder / "bert.twin.onnx"
    export_hf_encoder(model, twin, {k: np.ones((1, 16), np.int64) for k in speed.BERT_INPUTS})
    return compressed, twin


def build_minilm(folder: Path, cache: Path) -> tuple[Path, Path]:
    """The real all-MiniLM-L6-v2 compressed by a data-free ``MINILM_KEEP`` search, and its twin."""
    import real_models

    import onnxfib

    original = real_models.minilm_model(cache)
    compressed = folder / "minilm.compressed.onnx"
    kept = onnxfib.compress(original, target_params=MINILM_KEEP, check=False,
                            input_shapes={k: (1, SEQ) for k in real_models.MINILM_INPUTS})
    kept.save(compressed)
    model, _ = real_models.minilm()
    twin = folder / "minilm.twin.onnx"
    real_models.export_minilm(narrow_bert(model, linear_shapes(kept.model)), twin)
    return compressed, twin


def feeds(session: ort.InferenceSession, batch: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Inputs for ``batch`` rows: token ids below 1000 with full masks and zero token types for
    the encoders, standard normal pixels for the CNN."""
    rng = np.random.default_rng(seed)
    out = {}
    for arg in session.get_inputs():
        if arg.name == "x":
            out[arg.name] = rng.standard_normal((batch, *CNN_INPUT)).astype(np.float32)
        elif arg.name == "input_ids":
            out[arg.name] = rng.integers(0, 1000, (batch, SEQ), dtype=np.int64)
        else:
            out[arg.name] = (np.ones if arg.name == "attention_mask" else np.zeros)((batch, SEQ), np.int64)
    return out


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fused_ops(path: Path, folder: Path) -> Counter:
    """The op types ONNX Runtime's extended graph optimisations (its fusions, without the
    machine-specific layouts) leave in ``path``, counted."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / f"{path.stem}.fused.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def timed_rounds(paths: dict[str, Path], batch: int, rounds: int) -> dict[str, float]:
    """Median CPU milliseconds per run of each model at ``batch``, the models taking turns."""
    sessions = {role: session(path) for role, path in paths.items()}
    inputs = feeds(next(iter(sessions.values())), batch)
    runs = {}
    for role, s in sessions.items():
        start = time.process_time()
        s.run(None, inputs)  # warm-up, and how many runs fill a round
        runs[role] = max(1, int(ROUND_SECONDS / max(time.process_time() - start, 1e-4)))
    times: dict[str, list[float]] = {role: [] for role in sessions}
    for _ in range(rounds):
        for role, s in sessions.items():
            start = time.process_time()
            for _ in range(runs[role]):
                s.run(None, inputs)
            times[role].append((time.process_time() - start) / runs[role] * 1e3)
    return {role: round(statistics.median(values), 3) for role, values in times.items()}


def case(name: str, build: Callable[[], tuple[Path, Path]], original: Callable[[], Path], rounds: int) -> dict:
    """Compress ``name``, build its twin, check their parameters agree, count the ops ORT's
    fusions leave in each and time all three."""
    start = time.process_time()
    compressed, twin = build()
    built_s = time.process_time() - start
    shapes = float_shapes(onnx.load(compressed)), float_shapes(onnx.load(twin))
    if shapes[0] != shapes[1]:
        raise SystemExit(f"error: {name}: the twin's parameters differ from the compressed model's: "
                         f"only compressed {dict(shapes[0] - shapes[1])}, only twin {dict(shapes[1] - shapes[0])}")
    paths = {"original": original(), "compressed": compressed, "twin": twin}
    params = [sum(int(np.prod(s)) * n for s, n in c.items()) for c in (float_shapes(onnx.load(paths["original"])),
                                                                       shapes[0])]
    fused = fused_ops(compressed, compressed.parent), fused_ops(twin, twin.parent)
    latency = {str(batch): timed_rounds(paths, batch, rounds) for batch in BATCHES}
    return {"model": name, "params_before": params[0], "params_after": params[1], "build_cpu_s": round(built_s, 1),
            "fused_ops": dict(fused[0]),
            "fused_ops_only_compressed": dict(fused[0] - fused[1]), "fused_ops_only_twin": dict(fused[1] - fused[0]),
            "ms": latency, "ratio": {b: round(t["compressed"] / t["twin"], 3) for b, t in latency.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxfib-bench-minilm")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        import real_models

        builders = {"minilm": (lambda: build_minilm(folder, args.cache), lambda: real_models.minilm_model(args.cache)),
                    "bert": (lambda: build_bert_base(folder), lambda: folder / "bert.onnx"),
                    "cnn": (lambda: build_cnn(folder), lambda: folder / "cnn.onnx")}
        for name in args.models:
            cases.append(case(name, *builders[name], rounds=args.rounds))
            print(json.dumps(cases[-1]), flush=True)
    data = {"cases": cases, "rounds": args.rounds, "cpus": os.cpu_count(), "onnxruntime": ort.__version__,
            "load_at_end": round(os.getloadavg()[0], 1)}
    print(markdown(data))
    if not args.no_write:
        RESULTS_JSON.write_text(json.dumps(data, indent=2) + "\n")
        write_section(NAME, markdown(data))
    return 0 if all(r <= GOAL for c in cases for r in c["ratio"].values()) else 1


def fused_difference(c: dict) -> str:
    """"same", or the ops only one side's fused graph has."""
    if not c["fused_ops_only_compressed"] and not c["fused_ops_only_twin"]:
        return f"same ({sum(c['fused_ops'].values())})"
    return f"only compressed {c['fused_ops_only_compressed']}, only twin {c['fused_ops_only_twin']}"


def markdown(data: dict) -> str:
    lines = [BEGIN, "## ORT latency against torch exports of the same widths (`benchmarks/latency.py`)", "",
             f"ONNX Runtime {data['onnxruntime']}, CPU, one thread, default optimisations; median CPU ms per run "
             f"over {data['rounds']} rounds taken in turn; encoders on {SEQ} tokens a row, the CNN on "
             f"{'x'.join(map(str, CNN_INPUT))} images; {data['cpus']} cores (shared), load {data['load_at_end']} at the end. "
             "*Twin*: the same torch architecture built at the compressed widths and exported the same way, holding the "
             f"same parameter shapes (checked). Goal: compressed / twin at most {GOAL}.", "",
             "*Fused ops*: the ops ONNX Runtime's extended optimisations leave, the compressed model's against the "
             "twin's (same: the same count of every op type).", "",
             "| model | parameters | batch | original ms | compressed ms | twin ms | compressed / twin | fused ops |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for c in data["cases"]:
        for batch, ms in c["ms"].items():
            lines.append(f"| {c['model']} | {c['params_before']:,} -> {c['params_after']:,} | {batch} | "
                         f"{ms['original']:.2f} | {ms['compressed']:.2f} | {ms['twin']:.2f} | {c['ratio'][batch]:.3f} | "
                         f"{fused_difference(c)} |")
    return "\n".join(lines + ["", END])


if __name__ == "__main__":
    raise SystemExit(main())
