"""Baselines that narrow a ReLU MLP's hidden layers to given widths, for side-by-side comparison
with onnxfib (numpy and scikit-learn on the trained weights; not part of the library).

An MLP is a list of ``(W, b)`` layers, ``W`` of shape (out, in), ReLU after every layer but the
last. Each baseline takes the widths its hidden layers must reach and returns a ``Reduced``: the
narrowed layers plus, per hidden layer, the matrix ``R`` (new width x old width) that says which
combination of the original units' pre-activations each new unit stands for (a selection for
pruning, a cluster mean for merging). ``refit`` uses ``R`` to refit every layer that reads a
narrowed layer by ridge regression on calibration inputs (the calibrated variant of any baseline).

- ``random_prune``: drop uniformly random hidden units (seeded).
- ``l2_prune``: keep the units with the largest incoming-weight L2 norm (the row of ``W``).
- ``fold``: Model Folding (Wang et al., ICLR 2025): k-means on each layer's units described by
  their incoming row, bias and outgoing column (as the authors' code concatenates them), merged
  by the cluster mean (rows, bias) while the next layer's columns are summed; ``repair=True``
  adds the data-free approximate REPAIR (see ``fold``).
- ``plain_collapse``: the fibration collapse of the paper's Eq. 10 with plain averaging (no
  scale rule, no refit): signatures aggregated over the input clusters, average-linkage
  clustering under cosine distance cut at the requested width, rows averaged, columns summed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans

Layer = tuple[np.ndarray, np.ndarray]

#: every baseline, in table order
NAMES = ("random pruning", "L2 pruning", "Model Folding", "Model Folding + approx. REPAIR", "plain collapse (Eq. 10)")
#: the seeded baselines (random pruning, Model Folding's k-means) are run with this many seeds
SEEDS = 5


@dataclass
class Reduced:
    """Narrowed layers and, per hidden layer, the map from original to new pre-activations."""

    layers: list[Layer]
    maps: list[np.ndarray]


def count_params(layers: Sequence[Layer]) -> int:
    """Weights plus biases."""
    return int(sum(w.size + b.size for w, b in layers))


def forward(layers: Sequence[Layer], x: np.ndarray, *, upto: int | None = None) -> np.ndarray:
    """Pre-activations of layer ``upto`` (default: the logits) for inputs ``x``."""
    last = len(layers) - 1 if upto is None else upto
    h = x
    for index, (w, b) in enumerate(layers[: last + 1]):
        h = h @ w.T + b
        if index < last:
            h = np.maximum(h, 0.0)
    return h


def _check(layers: Sequence[Layer], widths: Sequence[int]) -> None:
    hidden = [w.shape[0] for w, _ in layers[:-1]]
    if len(widths) != len(hidden) or any(not 1 <= k <= n for k, n in zip(widths, hidden)):
        raise ValueError(f"widths {list(widths)} do not fit hidden layers {hidden}")


def _blocks(w: np.ndarray, units: int) -> np.ndarray:
    """``w`` (a layer reading ``units`` units) as (out, units, block): unit ``c`` is read through
    ``w[:, c]``: one column of a dense layer reading a hidden layer, a kernel for a convolution,
    the channel's flattened positions for a dense layer after a Flatten."""
    return w.reshape(w.shape[0], units, -1)


def _unblock(blocks: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``blocks`` (out, k, block) back in the layout of ``like`` with k input units."""
    if like.ndim == 4:
        return blocks.reshape(blocks.shape[0], blocks.shape[1], *like.shape[2:])
    return blocks.reshape(blocks.shape[0], -1)


def _rows(w: np.ndarray) -> np.ndarray:
    """Each unit's incoming weights as one row."""
    return w.reshape(w.shape[0], -1)


def _select(layers: Sequence[Layer], keeps: Sequence[np.ndarray]) -> Reduced:
    """Keep the listed units of every layer that has units (its rows or filters and biases, the
    next layer's columns or blocks)."""
    out, maps, keep_in = [], [], None
    for index, (w, b) in enumerate(layers):
        if keep_in is not None:
            w = _unblock(_blocks(w, len(layers[index - 1][1]))[:, keep_in], w)
        if index < len(keeps):
            keep = np.sort(keeps[index])
            out.append((w[keep].copy(), b[keep].copy()))
            maps.append(np.eye(len(b))[keep])
            keep_in = keep
        else:
            out.append((w.copy(), b.copy()))
    return Reduced(out, maps)


def _merge(layers: Sequence[Layer], labels: Sequence[np.ndarray]) -> Reduced:
    """Eq. 10: each layer's rows or filters and bias averaged per cluster, the next layer's columns
    or blocks summed per cluster (labels 0..k-1 per layer with units), in the layers' dtype."""
    out, maps, onehot_in = [], [], None
    for index, (w, b) in enumerate(layers):
        if onehot_in is not None:
            w = _unblock(np.einsum("onr,nk->okr", _blocks(w, len(onehot_in)), onehot_in), w).astype(w.dtype)
        if index < len(labels):
            onehot = np.eye(labels[index].max() + 1)[labels[index]]  # (n, k)
            mean = (onehot / onehot.sum(0)).T  # (k, n)
            rows = (mean @ _rows(w)).reshape(len(mean), *w.shape[1:])
            out.append((rows.astype(w.dtype), (mean @ b).astype(b.dtype)))
            maps.append(mean)
            onehot_in = onehot
        else:
            out.append((w.copy(), b.copy()))
    return Reduced(out, maps)


def random_prune(layers: Sequence[Layer], widths: Sequence[int], *, seed: int = 0) -> Reduced:
    """Keep ``widths[i]`` uniformly random units of hidden layer ``i``."""
    _check(layers, widths)
    rng = np.random.default_rng(seed)
    return _select(layers, [rng.choice(w.shape[0], k, replace=False) for (w, _), k in zip(layers, widths)])


def l2_prune(layers: Sequence[Layer], widths: Sequence[int]) -> Reduced:
    """Keep the ``widths[i]`` units of hidden layer ``i`` whose incoming weights have the largest
    L2 norm (norms of the original rows)."""
    _check(layers, widths)
    keeps = [np.argsort(-np.linalg.norm(w, axis=1), kind="stable")[:k] for (w, _), k in zip(layers, widths)]
    return _select(layers, keeps)


def _fold_features(layers: Sequence[Layer], index: int) -> np.ndarray:
    """Model Folding's description of hidden layer ``index``'s units: incoming row, bias and the
    next layer's column, concatenated (original weights), in float64 (scikit-learn's k-means is
    several times slower on float32)."""
    w, b = layers[index]
    return np.hstack([w, b[:, None], layers[index + 1][0].T]).astype(np.float64)


def _mean_cosine(features: np.ndarray) -> float:
    """Average pairwise cosine similarity of the rows (the reference code's cluster correlation)."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    gram = unit @ unit.T
    n = len(unit)
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


def fold_labels(layers: Sequence[Layer], widths: Sequence[int], *, seed: int = 0) -> list[np.ndarray]:
    """Model Folding's clusters: k-means (k-means++, 10 inits, seeded) of each hidden layer's units
    on their concatenated incoming row, bias and outgoing column, all on the original weights;
    labels numbered 0..k-1."""
    _check(layers, widths)
    return [
        np.unique(KMeans(n_clusters=k, n_init=10, random_state=seed).fit(_fold_features(layers, i)).labels_,
                  return_inverse=True)[1]
        for i, k in enumerate(widths)
    ]


def fold(layers: Sequence[Layer], widths: Sequence[int], *, seed: int = 0, repair: bool = False,
         labels: Sequence[np.ndarray] | None = None) -> Reduced:
    """Model Folding: the clusters of ``fold_labels`` (or the given ``labels``, computed by it for
    these widths) merged by Eq. 10 (cluster mean of rows and bias, sum of the next layer's columns).

    ``repair`` applies the paper's data-free approximate REPAIR (Fold-AR): a cluster of ``n``
    units whose weight vectors have mean pairwise correlation ``c`` (cosine similarity of the
    clustering features) shrinks the variance of the merged unit by ``(1 + (n - 1) c) / n``; the
    reference code multiplies the following BatchNorm's scale by ``sqrt(n / (1 + (n - 1) c))``.
    These MLPs have no BatchNorm, so the factor multiplies the merged row's weights (not its
    bias): the same correction for zero-mean inputs."""
    labels = fold_labels(layers, widths, seed=seed) if labels is None else labels
    reduced = _merge(layers, labels)
    if repair:
        for index, ((w, _), lab) in enumerate(zip(reduced.layers, labels)):
            features = _fold_features(layers, index)
            for c in range(len(w)):
                members = np.flatnonzero(lab == c)
                if len(members) > 1:
                    corr = _mean_cosine(features[members])
                    w[c] *= np.sqrt(len(members) / max(1.0 + (len(members) - 1) * corr, 1e-6))
    return reduced


def plain_collapse(layers: Sequence[Layer], widths: Sequence[int]) -> Reduced:
    """The paper's collapse (Eq. 3 signatures, Eq. 10 merge) with plain averaging, cut at the
    requested widths: layer by layer, each unit's signature is its row summed over the previous
    layer's clusters plus its bias; signatures are clustered by average linkage under cosine
    distance into ``widths[i]`` clusters."""
    _check(layers, widths)
    labels, columns = [], np.eye(layers[0][0].shape[1])
    for (w, b), k in zip(layers, widths):
        signature = np.hstack([w @ columns, b[:, None]])
        norms = np.linalg.norm(signature, axis=1, keepdims=True)
        unit = np.divide(signature, norms, out=np.zeros_like(signature), where=norms > 0)
        distance = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
        zero = norms[:, 0] == 0
        distance[np.ix_(zero, ~zero)] = distance[np.ix_(~zero, zero)] = 1.0
        np.fill_diagonal(distance, 0.0)
        if k == len(b):
            lab = np.arange(k)
        else:
            lab = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit(distance).labels_
        labels.append(lab)
        columns = np.eye(k)[lab]
    return _merge(layers, labels)


def fold_labels_per_seed(layers: Sequence, widths: Sequence[int], *, methods: ModuleType | None = None
                         ) -> list[list[np.ndarray]]:
    """``methods.fold_labels`` (this module's, or ``cnn_baselines``' which mirrors it) for each of
    the ``SEEDS`` seeds: Model Folding's k-means lands on a different optimum per seed."""
    methods = methods or sys.modules[__name__]
    return [methods.fold_labels(layers, widths, seed=seed) for seed in range(SEEDS)]


def draws(name: str, layers: Sequence, widths: Sequence[int], folds: Sequence[Sequence[np.ndarray]], *,
          methods: ModuleType | None = None) -> list[Reduced]:
    """The baseline ``name`` (one of ``NAMES``) narrowed to ``widths`` by ``methods`` (this module,
    or ``cnn_baselines``): one reduction per seed for random pruning, one per labelling in
    ``folds`` (``fold_labels_per_seed``) for Model Folding and its REPAIR variant, else one."""
    methods = methods or sys.modules[__name__]
    if name == "random pruning":
        return [methods.random_prune(layers, widths, seed=seed) for seed in range(SEEDS)]
    if name == "L2 pruning":
        return [methods.l2_prune(layers, widths)]
    if name.startswith("Model Folding"):
        return [methods.fold(layers, widths, labels=labels, repair="REPAIR" in name) for labels in folds]
    if name == "plain collapse (Eq. 10)":
        return [methods.plain_collapse(layers, widths)]
    raise ValueError(f"unknown baseline {name!r}")


def refit(reduced: Reduced, original: Sequence[Layer], x: np.ndarray, *, ridge: float = 1e-3) -> Reduced:
    """Calibrated variant: every layer that reads a narrowed layer (all but the first) is refit by
    ridge regression (float64, ``ridge`` times the mean diagonal of the Gram matrix), weights and
    bias, so that its pre-activations computed from the reduced network's own inputs ``x`` match
    the original pre-activations mapped by ``reduced.maps`` (the full logits for the last layer).
    The first layer keeps its weights: its inputs are unchanged."""
    xs = x.astype(np.float64)
    layers: list[Layer] = [reduced.layers[0]]
    h = np.maximum(forward(reduced.layers, xs, upto=0), 0.0)
    for index, (w, _) in enumerate(reduced.layers[1:], start=1):
        target = forward(original, xs, upto=index)
        if index < len(reduced.maps):
            target = target @ reduced.maps[index].T
        design = np.hstack([h, np.ones((len(h), 1))])
        gram = design.T @ design
        gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
        coef = np.linalg.solve(gram, design.T @ target)  # (in + 1, out)
        layers.append((coef[:-1].T.astype(w.dtype), coef[-1].astype(w.dtype)))
        h = np.maximum(design @ coef, 0.0)
    return Reduced(layers, reduced.maps)
