"""Planted redundancy: lift a dense network so that its fibration base is the original.

A *lift* of a network adds neurons to its hidden layers that copy existing ones. For each hidden
layer, every new neuron picks an original neuron ``i`` and copies its incoming weight row and bias
(so it fires exactly like ``i`` on every input: same fiber), and the consumer's column ``i`` is
shared among ``i`` and its copies by random positive fractions summing to 1. The lifted network
computes the same function as the original (up to float rounding), and collapsing its fibers
(DESIGN.md Eq. 10: rows by their mean, columns by their sum) gives back the original network,
with exactly the original parameter count.

The *proportional* lift (for positively homogeneous activations: ReLU, LeakyReLU) makes every
member of a cluster a positive multiple ``s * row`` (and ``s * bias``) of the original and divides
its column share by ``s``; those neurons are not in one exact fiber, but they merge exactly by the
scale rule of DESIGN.md section 2.

Everything works on plain numpy weight lists in the torch layout (``W`` of shape
``(out_features, in_features)``); thin wrappers adapt torch ``nn.Sequential`` models and
scikit-learn ``MLPClassifier``/``MLPRegressor`` (whose ``coefs_`` are ``(in, out)``), and
:func:`onnx_mlp` builds the same network as a hand-made ONNX graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Lift",
    "lift_layers",
    "lift_mlp",
    "lift_mlp_proportional",
    "lift_sklearn_mlp",
    "onnx_mlp",
    "dense_param_count",
]


@dataclass
class Lift:
    """How one hidden layer was lifted: ``source[j]`` is the original neuron that lifted neuron
    ``j`` copies (``source[:n] == arange(n)``), ``fraction[j]`` its share of the consumer column,
    ``scale[j]`` its row multiplier (all ones for the plain lift)."""

    source: np.ndarray
    fraction: np.ndarray
    scale: np.ndarray


def _random_fractions(source: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positive shares per lifted neuron, summing to 1 over each original neuron's copies.

    Shares are drawn from [0.5, 1.5] before normalising, so no share is tiny (a tiny share would
    make the lifted model's rounding noticeably different from the base's, not a property we are
    testing)."""
    raw = rng.uniform(0.5, 1.5, size=source.shape[0])
    totals = np.zeros(n)
    np.add.at(totals, source, raw)
    return raw / totals[source]


def lift_layers(
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    extra: list[int],
    rng: np.random.Generator,
    proportional: bool = False,
    scale_range: tuple[float, float] = (0.25, 4.0),
) -> tuple[list[np.ndarray], list[np.ndarray], list[Lift]]:
    """Lift a dense network given as weight matrices ``(out, in)`` and bias vectors.

    ``extra[l]`` new neurons are added to hidden layer ``l`` (the output of ``weights[l]``, for
    ``l < len(weights) - 1``); ``extra`` has one entry per hidden layer. Returns the lifted weights,
    biases (float64 copies; cast as needed) and the :class:`Lift` of each hidden layer.

    With ``proportional=True`` every neuron of a hidden layer (originals too) gets a row multiplier
    ``s`` drawn log-uniformly from ``scale_range`` and its column share is divided by ``s``; this
    is only function-preserving for positively homogeneous activations.
    """
    n_hidden = len(weights) - 1
    if len(extra) != n_hidden:
        raise ValueError(f"extra has {len(extra)} entries, the network has {n_hidden} hidden layers")
    if any(e < 0 for e in extra):
        raise ValueError("extra counts must be non-negative")
    Ws = [np.asarray(w, dtype=np.float64).copy() for w in weights]
    bs = [np.asarray(b, dtype=np.float64).copy() for b in biases]
    lifts: list[Lift] = []
    for layer in range(n_hidden):
        n = Ws[layer].shape[0]
        source = np.concatenate([np.arange(n), rng.integers(0, n, size=extra[layer])])
        fraction = _random_fractions(source, n, rng)
        if proportional:
            lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
            scale = np.exp(rng.uniform(lo, hi, size=source.shape[0]))
        else:
            scale = np.ones(source.shape[0])
        # Rows of the producer: copies (times their scale).
        Ws[layer] = Ws[layer][source] * scale[:, None]
        bs[layer] = bs[layer][source] * scale
        # Columns of the consumer: shares of the original column (divided by the scale).
        Ws[layer + 1] = Ws[layer + 1][:, source] * (fraction / scale)[None, :]
        lifts.append(Lift(source=source, fraction=fraction, scale=scale))
    return Ws, bs, lifts


def dense_param_count(weights: list[np.ndarray], biases: list[np.ndarray]) -> int:
    return int(sum(np.size(w) for w in weights) + sum(np.size(b) for b in biases))


# --------------------------------------------------------------------------------------- torch


_ELEMENTWISE = ("ReLU", "Tanh", "Sigmoid", "GELU", "LeakyReLU", "ELU", "SiLU", "Softplus", "Identity")
_HOMOGENEOUS = ("ReLU", "LeakyReLU", "Identity")


def _split_sequential(model):
    import torch.nn as nn

    linears = [m for m in model if isinstance(m, nn.Linear)]
    for m in model:
        if not isinstance(m, nn.Linear) and type(m).__name__ not in _ELEMENTWISE + ("Dropout",):
            raise TypeError(f"lift_mlp supports Linear and element-wise activations, not {type(m).__name__}")
    if len(linears) < 2:
        raise ValueError("a network with at least one hidden layer is needed")
    if not isinstance(model[-1], nn.Linear) and type(model[-1]).__name__ not in _ELEMENTWISE:
        raise TypeError("unexpected last module")
    return linears


def _lift_torch(model, extra, rng, proportional):
    import torch
    import torch.nn as nn

    linears = _split_sequential(model)
    if proportional:
        bad = [type(m).__name__ for m in model if not isinstance(m, nn.Linear)
               and type(m).__name__ not in _HOMOGENEOUS + ("Dropout",)]
        if bad:
            raise TypeError(f"proportional lift needs positively homogeneous activations, got {bad}")
    Ws = [m.weight.detach().double().numpy() for m in linears]
    bs = [m.bias.detach().double().numpy() if m.bias is not None else np.zeros(m.out_features) for m in linears]
    Ws, bs, _ = lift_layers(Ws, bs, list(extra), rng, proportional=proportional)
    dtype = linears[0].weight.dtype
    new_linears = []
    for w, b, old in zip(Ws, bs, linears):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w).to(dtype))
            if old.bias is not None:
                lin.bias.copy_(torch.from_numpy(b).to(dtype))
        new_linears.append(lin)
    modules = []
    it = iter(new_linears)
    for m in model:
        modules.append(next(it) if isinstance(m, nn.Linear) else copy.deepcopy(m))
    return nn.Sequential(*modules).eval()


def lift_mlp(model, extra: list[int], rng: np.random.Generator):
    """Lift a ``torch.nn.Sequential`` of ``Linear`` layers and element-wise activations.

    Each hidden ``Linear`` gets ``extra[l]`` copies of randomly chosen neurons; the consumer's
    columns are split by random positive fractions. The result computes the same function with
    any element-wise activation, and its fibration base is ``model``.
    """
    return _lift_torch(model, extra, rng, proportional=False)


def lift_mlp_proportional(model, extra: list[int], rng: np.random.Generator):
    """Proportional lift for ReLU/LeakyReLU networks: cluster members are ``s * row`` (and
    ``s * bias``) with random ``s > 0``, their column shares are divided by ``s``."""
    return _lift_torch(model, extra, rng, proportional=True)


# ------------------------------------------------------------------------------- scikit-learn


def lift_sklearn_mlp(clf, extra: list[int], rng: np.random.Generator, proportional: bool = False):
    """Lift a fitted ``MLPClassifier``/``MLPRegressor``; returns a new fitted estimator.

    ``coefs_`` (``(in, out)`` matrices) and ``intercepts_`` are replaced, ``hidden_layer_sizes``
    is updated; ``predict`` and skl2onnx see the lifted network. ``proportional=True`` requires
    ``activation='relu'`` (or ``'identity'``).
    """
    if proportional and clf.activation not in ("relu", "identity"):
        raise TypeError(f"proportional lift needs a homogeneous activation, got {clf.activation!r}")
    Ws = [np.asarray(c, dtype=np.float64).T for c in clf.coefs_]
    bs = [np.asarray(b, dtype=np.float64) for b in clf.intercepts_]
    Ws, bs, _ = lift_layers(Ws, bs, list(extra), rng, proportional=proportional)
    dtype = clf.coefs_[0].dtype
    lifted = copy.deepcopy(clf)
    lifted.coefs_ = [np.ascontiguousarray(w.T).astype(dtype) for w in Ws]
    lifted.intercepts_ = [b.astype(dtype) for b in bs]
    lifted.hidden_layer_sizes = tuple(int(w.shape[0]) for w in Ws[:-1])
    # Optimiser state refers to the old shapes; a lifted model is for inference only.
    for attr in ("_optimizer", "_best_coefs", "_best_intercepts"):
        if hasattr(lifted, attr):
            setattr(lifted, attr, None)
    return lifted


# ------------------------------------------------------------------------------ plain ONNX


_ONNX_ACT = {
    "relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "logistic": "Sigmoid",
    "leakyrelu": "LeakyRelu", "identity": "Identity",
}


def onnx_mlp(weights, biases, activation: str = "relu", use_gemm: bool = True, opset: int = 17,
             input_name: str = "input", output_name: str = "logits", dtype=np.float32):
    """A hand-made ONNX MLP: ``Gemm`` (transB=1) or ``MatMul`` + ``Add`` per layer, ``activation``
    between layers (none after the last). ``weights`` are ``(out, in)`` matrices."""
    import onnx
    from onnx import helper, numpy_helper

    act = _ONNX_ACT[activation.lower()]
    nodes, inits = [], []
    cur = input_name
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases)):
        w = np.asarray(w, dtype=dtype)
        b = np.asarray(b, dtype=dtype)
        out = output_name if i == last else f"h{i}"
        if use_gemm:
            inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"b{i}"], [out if i == last else f"z{i}"],
                                          transB=1, name=f"fc{i}"))
        else:
            inits += [numpy_helper.from_array(np.ascontiguousarray(w.T), f"W{i}"),
                      numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"], name=f"mm{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out if i == last else f"z{i}"],
                                          name=f"add{i}"))
        if i != last:
            nodes.append(helper.make_node(act, [f"z{i}"], [out], name=f"act{i}"))
        cur = out
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info(input_name, elem, ["batch", int(np.shape(weights[0])[1])])],
        [helper.make_tensor_value_info(output_name, elem, ["batch", int(np.shape(weights[-1])[0])])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
