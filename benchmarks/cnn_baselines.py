"""Baselines that narrow a small CNN's channels and hidden units to given widths, for side-by-side
comparison with onnxfib (numpy, scikit-learn and torch on the trained weights; not part of the
library). The CNN counterpart of ``baselines.py``, whose clustering helpers it reuses.

A CNN is a list of ``(W, b)`` layers: leading 2-D convolutions (``W`` of shape (out, in, k, k),
stride 1, padding k // 2), each followed by ReLU and 2x2 max pooling, then a flatten (NCHW order)
and dense layers (``W`` of shape (out, in)), ReLU after every dense layer but the last: the
network of ``fashion_cnn.py`` with its BatchNorms folded into the convolutions (``from_torch``), as
the legacy torch.onnx export folds them. Every layer but the last has *units*: the output channels
of a convolution, the outputs of a dense layer. The layer after reads unit ``c`` through a block of
its weights (``baselines._blocks``, through which the selection and merge of ``baselines`` serve
both networks): ``W[:, c]`` (a k x k kernel per output channel) for a convolution, the ``H * W``
columns of channel ``c`` for the dense layer after the flatten, column ``c`` otherwise.

Each baseline takes one width per layer with units and returns a ``baselines.Reduced``: the
narrowed layers plus, per such layer, the matrix ``R`` (new width x old width) saying which
combination of the original units' pre-activations each new unit stands for (a selection for
pruning, a cluster mean for merging). ``refit`` uses it to refit every layer after the first by
ridge regression on calibration images (convolutions through im2col).

- ``random_prune``: keep uniformly random units (seeded).
- ``l2_prune``: keep the units whose incoming weights (the whole filter) have the largest L2 norm.
- ``fold``: Model Folding (Wang et al., ICLR 2025): k-means (``baselines.fold_labels``) on each
  unit's incoming filter, bias and outgoing block, merged by the cluster mean (filters, bias)
  while the next layer's blocks are summed; ``repair=True`` adds the data-free approximate REPAIR
  of ``baselines.fold`` (the variance factor on the merged filter's weights, BatchNorm being folded).
- ``plain_collapse``: the fibration paper's collapse (Eq. 10) with plain averaging: a unit's
  signature is its filter summed over the previous layer's clusters per kernel position, plus
  its bias; average-linkage cosine clustering (``baselines.plain_collapse``) cut at the width.
"""

from __future__ import annotations

from collections.abc import Sequence

import baselines
import numpy as np
from baselines import Layer, Reduced, _blocks, _merge, _rows, _select, count_params

__all__ = ["Layer", "Reduced", "count_params", "widths_of", "forward", "from_torch", "to_onnx",
           "random_prune", "l2_prune", "fold_labels", "fold", "plain_collapse", "targets", "refit"]


def widths_of(layers: Sequence[Layer]) -> list[int]:
    """The number of units of every layer but the last."""
    return [len(b) for _, b in layers[:-1]]


def _check(layers: Sequence[Layer], widths: Sequence[int]) -> None:
    hidden = widths_of(layers)
    if len(widths) != len(hidden) or any(not 1 <= k <= n for k, n in zip(widths, hidden)):
        raise ValueError(f"widths {list(widths)} do not fit the layers' units {hidden}")


# --------------------------------------------------------------------------- the network


def _apply(layer: Layer, h, *, last: bool):
    """One layer on ``h`` (torch, in its precision): its pre-activations when ``last``, else its
    output after ReLU (and 2x2 max pooling after a convolution)."""
    import torch
    import torch.nn.functional as F

    w, b = layer
    wt, bt = torch.as_tensor(w, dtype=h.dtype), torch.as_tensor(b, dtype=h.dtype)
    z = F.conv2d(h, wt, bt, padding=w.shape[-1] // 2) if w.ndim == 4 else h.flatten(1) @ wt.T + bt
    if last:
        return z
    z = torch.relu(z)
    return F.max_pool2d(z, 2) if w.ndim == 4 else z


def forward(layers: Sequence[Layer], x: np.ndarray, *, upto: int | None = None) -> np.ndarray:
    """Pre-activations of layer ``upto`` (default: the logits) for images ``x`` (n, c, h, w), in the
    precision of ``x`` (torch on CPU)."""
    import torch

    last = len(layers) - 1 if upto is None else upto
    h = torch.as_tensor(x)
    with torch.no_grad():
        for index, layer in enumerate(layers[: last + 1]):
            h = _apply(layer, h, last=index == last)
    return h.numpy()


def from_torch(model) -> list[Layer]:
    """The ``(W, b)`` layers of a torch ``nn.Sequential`` of Conv2d (each optionally followed by an
    eval-mode BatchNorm2d, folded in), ReLU, MaxPool2d(2), Flatten and Linear modules, float32."""
    import torch

    layers: list[Layer] = []
    for module in model:
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            weight, bias = module.weight.detach().double().numpy(), module.bias.detach().double().numpy()
            layers.append((weight.copy(), bias.copy()))
        elif isinstance(module, torch.nn.BatchNorm2d):
            w, b = layers[-1]
            scale = module.weight.detach().double().numpy() / np.sqrt(module.running_var.double().numpy() + module.eps)
            shift = module.bias.detach().double().numpy() - module.running_mean.double().numpy() * scale
            layers[-1] = (w * scale[:, None, None, None], b * scale + shift)
    return [(w.astype(np.float32), b.astype(np.float32)) for w, b in layers]


def to_onnx(layers: Sequence[Layer], *, opset: int = 17):
    """An ``onnx.ModelProto``: a Conv/Relu/MaxPool/Flatten/Gemm graph ``input`` (batch, c, h, w) ->
    ``logits`` computing the CNN ``layers`` (the ops of the legacy torch export)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, current = [], [], "input"
    flat = False
    for index, (w, b) in enumerate(layers):
        last = index == len(layers) - 1
        out = "logits" if last else f"z{index}"
        inits += [numpy_helper.from_array(np.asarray(w, np.float32), f"W{index}"),
                  numpy_helper.from_array(np.asarray(b, np.float32), f"b{index}")]
        if w.ndim == 4:
            pad = w.shape[-1] // 2
            nodes.append(helper.make_node("Conv", [current, f"W{index}", f"b{index}"], [out],
                                          kernel_shape=list(w.shape[2:]), pads=[pad] * 4, strides=[1, 1]))
        else:
            if not flat:
                nodes.append(helper.make_node("Flatten", [current], [f"f{index}"], axis=1))
                current, flat = f"f{index}", True
            nodes.append(helper.make_node("Gemm", [current, f"W{index}", f"b{index}"], [out], transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"r{index}"]))
            current = f"r{index}"
            if w.ndim == 4:
                nodes.append(helper.make_node("MaxPool", [current], [f"p{index}"], kernel_shape=[2, 2], strides=[2, 2]))
                current = f"p{index}"
    channels = layers[0][0].shape[1]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, None, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", layers[-1][0].shape[0]])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# --------------------------------------------------------------------------- reductions


def random_prune(layers: Sequence[Layer], widths: Sequence[int], *, seed: int = 0) -> Reduced:
    """Keep ``widths[i]`` uniformly random units of layer ``i``."""
    _check(layers, widths)
    rng = np.random.default_rng(seed)
    return _select(layers, [rng.choice(len(b), k, replace=False) for (_, b), k in zip(layers, widths)])


def l2_prune(layers: Sequence[Layer], widths: Sequence[int]) -> Reduced:
    """Keep the ``widths[i]`` units of layer ``i`` whose incoming weights (whole filter, no bias)
    have the largest L2 norm."""
    _check(layers, widths)
    keeps = [np.argsort(-np.linalg.norm(_rows(w), axis=1), kind="stable")[:k] for (w, _), k in zip(layers, widths)]
    return _select(layers, keeps)


def _unit_pair(layers: Sequence[Layer], index: int) -> list[Layer]:
    """Layer ``index`` as the two-layer MLP ``baselines`` describes units with: its filters as rows,
    and a next layer whose column ``c`` is unit ``c``'s outgoing block (all output channels and
    positions). ``baselines._fold_features`` of it is Model Folding's description of the units."""
    w, b = layers[index]
    blocks = _blocks(layers[index + 1][0], len(b))  # (out, n, r)
    outgoing = blocks.transpose(0, 2, 1).reshape(-1, len(b))  # (out * r, n)
    return [(_rows(w), b), (outgoing, np.zeros(len(outgoing), outgoing.dtype))]


def fold_labels(layers: Sequence[Layer], widths: Sequence[int], *, seed: int = 0) -> list[np.ndarray]:
    """Model Folding's clusters: ``baselines.fold_labels`` (k-means++, 10 inits, seeded) of each
    layer's units on their incoming filter, bias and outgoing block, on the original weights."""
    _check(layers, widths)
    return [baselines.fold_labels(_unit_pair(layers, i), [k], seed=seed)[0] for i, k in enumerate(widths)]


def fold(layers: Sequence[Layer], widths: Sequence[int], *, seed: int = 0, repair: bool = False,
         labels: Sequence[np.ndarray] | None = None) -> Reduced:
    """Model Folding: the clusters of ``fold_labels`` (or the given ``labels``) merged by Eq. 10.
    ``repair``: the data-free approximate REPAIR of ``baselines.fold``, a merged cluster of ``n``
    units with mean pairwise cosine ``c`` of their features has its filter (not its bias)
    multiplied by ``sqrt(n / (1 + (n - 1) c))`` (the reference code scales the following
    BatchNorm, folded into the filters here)."""
    labels = fold_labels(layers, widths, seed=seed) if labels is None else labels
    reduced = _merge(layers, labels)
    if repair:
        for index, ((w, _), lab) in enumerate(zip(reduced.layers, labels)):
            features = baselines._fold_features(_unit_pair(layers, index), 0)
            for c in range(len(w)):
                members = np.flatnonzero(lab == c)
                if len(members) > 1:
                    corr = baselines._mean_cosine(features[members])
                    w[c] *= np.sqrt(len(members) / max(1.0 + (len(members) - 1) * corr, 1e-6))
    return reduced


def plain_collapse(layers: Sequence[Layer], widths: Sequence[int]) -> Reduced:
    """The paper's collapse with plain averaging, cut at the requested widths: layer by layer, each
    unit's signature is its filter summed over the previous layer's clusters (per kernel position)
    plus its bias, clustered by average linkage under cosine distance (the clustering of
    ``baselines.plain_collapse``, run on the signatures as a one-layer MLP)."""
    _check(layers, widths)
    labels, onehot = [], None
    for (w, b), k in zip(layers, widths):
        if onehot is not None:
            w = np.einsum("onr,nk->okr", _blocks(w, len(onehot)), onehot)
        rows = _rows(w)
        mlp = [(rows, b), (np.zeros((1, len(b))), np.zeros(1))]
        mean = baselines.plain_collapse(mlp, [k]).maps[0]  # (k, n), one nonzero per column
        labels.append(mean.argmax(0))
        onehot = np.eye(k)[labels[-1]]
    return _merge(layers, labels)


# --------------------------------------------------------------------------- calibration


def _design(w: np.ndarray, h):
    """The rows a layer of weights ``w`` reads from its input ``h`` (torch): im2col patches of a
    convolution (one row per image and position, channel-major like ``w``), the flattened input
    of a dense layer."""
    import torch.nn.functional as F

    if w.ndim == 4:
        cols = F.unfold(h, w.shape[2:], padding=w.shape[-1] // 2)  # (n, c * k * k, positions)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return h.flatten(1)


def _channels_last(z) -> np.ndarray:
    """Pre-activations (n, c[, h, w]) as rows (n * h * w, c)."""
    z = np.asarray(z)
    return z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1]) if z.ndim == 4 else z


def targets(original: Sequence[Layer], x: np.ndarray, *, batch: int = 256) -> list[list[np.ndarray]]:
    """What ``refit`` fits to, computed once for every reduction of ``original`` on images ``x``:
    per layer after the first, per batch of ``batch`` images, the original pre-activations as rows
    (n * positions, channels), float64."""
    import torch

    out: list[list[np.ndarray]] = [[] for _ in original[1:]]
    with torch.no_grad():
        for start in range(0, len(x), batch):
            h = torch.as_tensor(np.asarray(x[start:start + batch], np.float64))
            for index, layer in enumerate(original):
                z = _apply(layer, h, last=True)
                if index:
                    out[index - 1].append(_channels_last(z.numpy()))
                if index < len(original) - 1:
                    h = _apply(layer, h, last=False)
    return out


def refit(reduced: Reduced, original: Sequence[Layer], x: np.ndarray, *, ridge: float = 1e-3,
          batch: int = 256, fitted: list[list[np.ndarray]] | None = None) -> Reduced:
    """Calibrated variant (as ``baselines.refit``): every layer after the first is refit by ridge
    regression (float64, ``ridge`` times the mean diagonal of the Gram matrix), weights and bias,
    so that its pre-activations computed from the reduced network's own inputs on images ``x``
    match the original pre-activations mapped by ``reduced.maps`` (the logits for the last layer);
    a convolution is fit on every position's patch (im2col). The first layer keeps its weights.
    ``fitted``: ``targets(original, x, batch=batch)``, when already computed."""
    import torch

    fitted = targets(original, x, batch=batch) if fitted is None else fitted
    layers: list[Layer] = [reduced.layers[0]]
    with torch.no_grad():
        hs = [_apply(layers[0], torch.as_tensor(np.asarray(x[start:start + batch], np.float64)), last=False)
              for start in range(0, len(x), batch)]
        for index, (w, _) in enumerate(reduced.layers[1:], start=1):
            gram, rhs = 0.0, 0.0
            for h, target in zip(hs, fitted[index - 1]):
                design = _design(w, h).numpy()
                design = np.hstack([design, np.ones((len(design), 1))])
                if index < len(reduced.maps):
                    target = target @ reduced.maps[index].T
                gram = gram + design.T @ design
                rhs = rhs + design.T @ target
            gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
            coef = np.linalg.solve(gram, rhs)  # (in + 1, out)
            layers.append((coef[:-1].T.reshape(w.shape).astype(w.dtype), coef[-1].astype(w.dtype)))
            if index < len(reduced.layers) - 1:
                hs = [_apply(layers[-1], h, last=False) for h in hs]
    return Reduced(layers, reduced.maps)
