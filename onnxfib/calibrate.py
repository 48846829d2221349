"""Calibrated merging: refit merged layers by ridge least squares on calibration inputs, and
choose from the same data which channels a merged layer keeps.

After a collapse, every dense layer (Gemm/MatMul) and plain Conv whose input the merge changed (its own input
merged, or a layer before it merged) is refit, in topological order, so that its pre-activations
on the calibration inputs match the original model's: with ``X`` the layer's input in the
compressed model (already refit layers upstream included: the refit proceeds along the graph)
and ``T`` the original pre-activations (for merged output channels, the base they are fitted to
under the scale rule, ``Plan.fit_base``), the new weights ``W`` (bias as an extra row) minimise

    ||X W - T||^2 + lam ||W - W0||^2,    lam = ridge * trace(X^T X) / columns,

where ``W0`` is the merge's own result. ``W0`` costs no penalty, so the refit's calibration error
never exceeds the merge's. ``X^T X`` and ``X^T T`` are summed in float64 over batches (memory
independent of the calibration size) and the system is solved by Cholesky.

:class:`Selector` picks, where a layer feeds one dense reader, the channels to keep from the
data rather than from weight similarity (see there). A Conv is refit on its input's patches (im2col); grouped, depthwise
and transposed convolutions are not refit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx
from scipy.linalg import cho_factor, cho_solve

from .analysis import Analysis
from .graph import GraphView
from .coloring import Coloring
from .folding import sole_reader
from .partition import Partition
from .report import RefitReport
from .rules import Plan
from .rules.linear import LinearSite
from .validation import Batch, chunked, run_tensors

#: Default ridge strength, relative to the mean diagonal of X^T X.
DEFAULT_RIDGE = 1e-3


def _rows(values: np.ndarray, axis: int) -> np.ndarray:
    """An activation as float64 (samples, channels): the channel axis last, every other axis a
    sample."""
    moved = np.asarray(np.moveaxis(values, axis, -1), dtype=np.float64)
    return moved.reshape(-1, moved.shape[-1])


class NormalEquations:
    """``X^T X`` and ``X^T T`` summed in float64 over batches of rows, ``X`` with a column of ones
    appended when ``intercept`` (added blockwise, never materialised), and the targets' sum of
    squares and size, from which any ``W``'s residual ``||X W - T||^2`` follows."""

    def __init__(self, columns: int, outputs: int, *, intercept: bool) -> None:
        size = columns + int(intercept)
        self.intercept = intercept
        self.gram = np.zeros((size, size))
        self.cross = np.zeros((size, outputs))
        self.target_energy = 0.0
        self.samples = 0

    def add(self, x: np.ndarray, target: np.ndarray) -> None:
        """Add the rows ``x`` (samples, columns) with their targets (samples, outputs)."""
        x, target = np.asarray(x, dtype=np.float64), np.asarray(target, dtype=np.float64)
        n = x.shape[1]
        self.gram[:n, :n] += x.T @ x
        self.cross[:n] += x.T @ target
        if self.intercept:
            total = x.sum(axis=0)
            self.gram[:n, n] += total
            self.gram[n, :n] += total
            self.gram[n, n] += len(x)
            self.cross[n] += target.sum(axis=0)
        self.target_energy += float(np.vdot(target, target))
        self.samples += target.size


class OriginalActivations:
    """The original model's tensors on fixed batches, computed on demand, and kept for the next
    refit while they fit in ``budget`` bytes (a target search refits against the same ones
    again and again); a tensor that would not fit is streamed batch by batch each time."""

    def __init__(self, original: onnx.ModelProto, batches: Sequence[Batch], *, budget: int = 256 << 20) -> None:
        self.original = original
        self.pieces = list(chunked(batches))
        self.budget = budget
        self._kept: dict[str, list[np.ndarray]] = {}

    def __call__(self, name: str) -> Iterator[np.ndarray]:
        """The tensor ``name`` of the original model, one array per batch piece."""
        if name in self._kept:
            yield from self._kept[name]
            return
        runs = (run[0] for run in run_tensors(self.original, [name], self.pieces, "original"))
        first = next(runs, None)
        if first is None:
            return
        if first.nbytes * len(self.pieces) > self.budget:
            yield first
            yield from runs
            return
        kept = [first, *runs]
        self.budget -= sum(array.nbytes for array in kept)
        self._kept[name] = kept
        yield from kept


def refit(analysis: Analysis, original: onnx.ModelProto, batches: Sequence[Batch], *,
          ridge: float = DEFAULT_RIDGE, activations: OriginalActivations | None = None
          ) -> tuple[onnx.ModelProto, list[RefitReport]]:
    """The analysis's collapsed model with its dense and Conv layers refit on ``batches`` (see the module
    docstring), and a report per refit layer. ``ridge`` must be positive. ``activations``, the
    original's tensors on the same ``batches``, may carry them over from an earlier refit."""
    if not ridge > 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    model = analysis.collapse()
    pieces = list(chunked(batches))
    activations = activations or OriginalActivations(original, pieces, budget=0)
    reports: list[RefitReport] = []
    upstream_changed = False  # a layer reading unchanged inputs is already optimal: skip it
    for site in analysis.sites:
        if not (isinstance(site, LinearSite) and site.layer):
            continue
        in_plan, out_plan = analysis.plan(site.inputs[0]), analysis.plan(site.outputs[0])
        changed_input = upstream_changed or in_plan is not None
        upstream_changed = changed_input or out_plan is not None
        inputs_as_rows = _input_rows(site)
        if not changed_input or inputs_as_rows is None:
            continue
        report = _refit_layer(analysis, site, inputs_as_rows, out_plan, model, activations, pieces, ridge)
        if report is not None:
            reports.append(report)
            model = analysis.graph.export()
    return model, reports


def _input_rows(site: LinearSite) -> Callable[[np.ndarray], np.ndarray] | None:
    """How a layer's input activation becomes rows that its flat weights (``LinearSite.flat``)
    multiply: the channels of a dense layer, the patches of a plain Conv (``_patches``); None
    for the layers not refit (grouped, depthwise and transposed convolutions)."""
    if type(site) is not LinearSite:
        return None
    node = site.nodes[0]
    if node.op in ("Gemm", "MatMul"):
        return lambda x: _rows(x, site.inputs[0].axis)
    if node.op != "Conv" or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    kernel = tuple(GraphView.constant(node.inputs[1]).shape[2:])
    spatial = len(kernel)
    strides = tuple(node.attrs.get("strides", [1] * spatial))
    dilations = tuple(node.attrs.get("dilations", [1] * spatial))
    pads = tuple(node.attrs.get("pads", [0] * (2 * spatial)))
    return lambda x: _patches(x, kernel, strides, pads, dilations)


def _patches(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
             dilations: tuple[int, ...]) -> np.ndarray:
    """The Conv input [N, C, *spatial] as float64 rows of patches [N * out positions, C * kernel
    size] (im2col), each row's entries channel-major like a flattened [C, *kernel] kernel."""
    spatial = len(kernel)
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)]
    padded = np.pad(np.asarray(x, dtype=np.float64), widths)
    window = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    view = np.lib.stride_tricks.sliding_window_view(padded, window, axis=tuple(range(2, 2 + spatial)))
    view = view[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
                + tuple(slice(None, None, d) for d in dilations)]
    view = np.moveaxis(view, 1, 1 + spatial)  # [N, *out positions, C, *kernel]
    return view.reshape(-1, int(np.prod(view.shape[1 + spatial:])))


def _refit_layer(analysis: Analysis, site: LinearSite, input_rows: Callable[[np.ndarray], np.ndarray],
                 out_plan: Plan | None, model: onnx.ModelProto, activations: OriginalActivations,
                 pieces: list[Batch], ridge: float) -> RefitReport | None:
    """Refit one layer in place (through its site); None when it has no activations to fit."""
    w0, b0, free = site.flat()
    inp, out = site.inputs[0], site.outputs[0]
    equations = NormalEquations(w0.shape[1], w0.shape[0], intercept=free)
    compressed_runs = run_tensors(model, [inp.name], pieces, "compressed")
    for (x,), y in zip(compressed_runs, activations(out.name)):
        y = _rows(y, out.axis)
        target = np.asarray(y if out_plan is None else out_plan.fit_base(y, 1), dtype=np.float64)
        equations.add(input_rows(x), target if free else target - b0)
    if equations.samples == 0:
        return None
    gram, cross, columns = equations.gram, equations.cross, len(equations.gram)
    start = np.vstack([w0.T, b0[None, :]]) if free else w0.T
    lam = ridge * max(float(np.trace(gram)) / columns, 1e-12)
    factor = cho_factor(gram + lam * np.eye(columns))
    solved = cho_solve(factor, cross + lam * start)

    def rms(weights: np.ndarray) -> float:  # ||X W - T||^2 from the normal equations
        sse = float(np.sum(weights * (gram @ weights)) - 2 * np.sum(weights * cross) + equations.target_energy)
        return float(np.sqrt(max(sse, 0.0) / equations.samples))

    before, after = rms(start), rms(solved)
    if after > before:  # only float rounding can do this: keep the merge
        return RefitReport(site.name, before, before)
    site.set_flat(analysis.graph, solved[:w0.shape[1]].T, solved[-1] if free else None)
    return RefitReport(site.name, before, after)


class Selector:
    """Chooses, from calibration data, which channels of a merged layer to keep.

    For a dense layer whose output reaches exactly one dense reader through element-wise sites
    only (channel i stays channel i), it keeps as many channels as the layer's collapse keeps:
    those that best reconstruct the reader's pre-activations on the data from the reader's
    inputs (greedy forward selection on the original model's normal equations, an intercept
    always in). Every other channel joins the kept channel whose activity it follows most
    closely, with a vanishing scale, so the kept row stays as it is and the reader's refit
    re-expresses the rest (merging into the most similar kept neuron, Neuron Merging's rule,
    with the coefficients fitted instead of guessed). The original model's statistics are
    computed once per reader and cached.
    """

    #: Scale of a folded channel relative to its kept one: small enough to leave the kept row be.
    FOLDED_SCALE = 1e-4

    def __init__(self, original: onnx.ModelProto, batches: Sequence[Batch], *, ridge: float = DEFAULT_RIDGE) -> None:
        self.original = original
        self.batches = list(chunked(batches))
        self.ridge = ridge
        self._stats: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def _statistics(self, reader: LinearSite) -> tuple[np.ndarray, np.ndarray]:
        """``[H, 1]^T [H, 1]`` and ``[H, 1]^T T`` for the reader's input H and pre-activations T."""
        key = (reader.inputs[0].name, reader.outputs[0].name)
        if key not in self._stats:
            equations = NormalEquations(reader.inputs[0].width, reader.outputs[0].width, intercept=True)
            for x, y in run_tensors(self.original, list(key), self.batches, "original"):
                equations.add(_rows(x, reader.inputs[0].axis), _rows(y, reader.outputs[0].axis))
            self._stats[key] = (equations.gram, equations.cross)
        return self._stats[key]

    def colorings(self, analysis: Analysis) -> dict[str, Coloring]:
        """Layer name -> the output coloring that keeps the selected channels (see the class)."""
        chosen: dict[str, Coloring] = {}
        for site in analysis.sites:
            if not (isinstance(site, LinearSite) and site.layer):
                continue
            plan = analysis.plan(site.outputs[0])
            reader = sole_reader(analysis, site) if plan is not None else None
            if reader is None or reader.nodes[0].op not in ("Gemm", "MatMul"):
                continue
            gram, cross = self._statistics(reader)
            if gram.shape[0] != site.outputs[0].width + 1:
                continue
            keep = _forward_selection(gram, cross, plan.partition.n_colors, self.ridge)
            chosen[site.name] = _fold_into(keep, gram[:-1, :-1], self.FOLDED_SCALE)
        return chosen


def _forward_selection(gram: np.ndarray, cross: np.ndarray, count: int, ridge: float) -> np.ndarray:
    """``count`` columns of ``[H, 1]`` (the last, the intercept, always in and not counted) that
    greedily best reconstruct the targets: each step adds the column that most lowers the ridge
    least-squares residual, through Gram-Schmidt on the normal equations (O(n (k + m)) a step)."""
    n = gram.shape[0]
    g = gram + ridge * max(float(np.trace(gram)) / n, 1e-12) * np.eye(n)
    residual_g = np.diag(g).copy()
    residual_c = cross.copy()
    basis: list[np.ndarray] = []  # rows a_j: g restricted to the selected columns, orthonormalised
    selected: list[int] = []
    for step in range(count + 1):
        if step == 0:
            pick = n - 1
        else:
            gain = np.sum(residual_c * residual_c, axis=1) / np.maximum(residual_g, 1e-300)
            gain[selected] = -np.inf
            gain[n - 1] = -np.inf
            pick = int(np.argmax(gain))
        norm = np.sqrt(max(residual_g[pick], 1e-300))
        a = (g[pick] - sum(row * row[pick] for row in basis)) / norm
        residual_c -= np.outer(a, residual_c[pick] / norm)
        basis.append(a)
        selected.append(pick)
        residual_g = residual_g - a * a
    return np.array(sorted(selected[1:]))


def _fold_into(keep: np.ndarray, gram: np.ndarray, scale: float) -> Coloring:
    """A coloring in which each kept channel has a color of its own (scale 1) and every other
    channel joins the kept one its activity is most aligned with (cosine under ``gram``), at
    ``scale``."""
    norms = np.sqrt(np.maximum(np.diag(gram), 1e-300))
    cosine = gram[:, keep] / np.outer(norms, norms[keep])
    target = keep[np.argmax(cosine, axis=1)]
    target[keep] = keep
    scales = np.where(np.isin(np.arange(len(gram)), keep), 1.0, scale)
    return Coloring(Partition(target), scales)
