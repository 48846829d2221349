"""Calibrated merging: refit merged layers by ridge least squares on calibration inputs, and
choose from the same data which channels a merged layer keeps.

After a collapse, every layer (``LinearSite``: Gemm/MatMul on inputs of any rank, Conv plain,
grouped and depthwise) whose input the merge changed (its own input merged, or a layer before it
merged) is refit so that its pre-activations on the calibration inputs match the original
model's: with ``X`` the layer's input in the compressed model (already refit layers upstream
included) and ``T`` the original pre-activations (for merged output channels, the base they are
fitted to under the scale rule, ``Plan.fit_base``), the new weights ``W`` (bias as an extra row)
minimise, per independent block (a group of a grouped or depthwise Conv; the whole layer
otherwise),

    ||X W - T||^2 + lam ||W - W0||^2,    lam = ridge * trace(X^T X) / columns,

where ``W0`` is the merge's own result. ``W0`` costs no penalty, so the refit's calibration error
never exceeds the merge's. ``X^T X`` and ``X^T T`` are summed in float64 over batches (memory
independent of the calibration size) and solved by Cholesky, all blocks of a layer at once.

The layer sites say how (``LinearSite.input_rows``, ``refit_blocks``, ``block_weights``,
``refit_declined``); this module knows no op. Speed: the layers to refit are cut into *fronts*,
layers none of which reads another's output (in a transformer block: Q, K and V; then the output
projection; then each FFN layer). Both models run forward front by front
(:class:`~onnxfib.validation.ForwardRun`): for a front, ONNX Runtime runs only the nodes between
the last front's cut and this front's inputs (the compressed model, all upstream layers already
refit) or outputs (the original, whose targets are kept across refits while they fit in a budget,
see :class:`OriginalActivations`), so each refit runs each model about once (a model declaring
a fixed batch, that many samples at a time). Layers of a front reading one tensor the same way
share ``X^T X``. Memory: one cut of each model over the calibration set (what crosses from one
front to the next, e.g. a transformer's residual stream), or, past
``validation.CUT_BYTES``, one front's activations of one batch, each front then run from the
inputs.
Not refit: ConvTranspose (see its site), and ops outside ``LinearSite`` (LSTM/GRU, embeddings,
attention's own products, LayerNorm), whose merged constants stay as the collapse made them.

:class:`Selector` picks, where a layer feeds one dense reader, the channels to keep from the
data rather than from weight similarity (see there).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.linalg import solve_triangular

from .analysis import Analysis
from .coloring import Coloring
from .folding import sole_reader
from .partition import Partition
from .report import RefitReport
from .rules.base import activation_rows
from .rules.linear import LinearSite
from .validation import Batch, ForwardRun, chunked, node_reads

#: Default ridge strength, relative to the mean diagonal of X^T X.
DEFAULT_RIDGE = 1e-3
#: Bytes of a layer's input rows built at a time (a Conv's patches: kernel size times its input).
ROW_BYTES = 64 << 20


class NormalEquations:
    """``X^T X`` and ``X^T T`` summed in float64 over batches of rows, ``X`` with a column of ones
    appended when ``intercept`` (added blockwise, never materialised), and the targets' sum of
    squares per output and the rows' count, from which any ``W``'s residual ``||X W - T||^2``
    follows. With ``blocks``, every array gains a leading axis: independent problems whose rows
    come together (``add`` takes rows (samples, blocks, columns))."""

    def __init__(self, columns: int, outputs: int, *, intercept: bool, blocks: int | None = None) -> None:
        size = columns + int(intercept)
        lead = () if blocks is None else (blocks,)
        self.intercept = intercept
        self.gram = np.zeros(lead + (size, size))
        self.cross = np.zeros(lead + (size, outputs))
        self.column_energy = np.zeros(lead + (outputs,))
        self.rows = 0

    @property
    def target_energy(self) -> float:
        """The targets' sum of squares."""
        return float(self.column_energy.sum())

    @property
    def samples(self) -> int:
        """Target entries added."""
        return self.rows * int(self.cross[..., 0, :].size)

    def add(self, x: np.ndarray, target: np.ndarray) -> None:
        """Add the rows ``x`` (samples, [blocks,] columns) with their targets (samples, [blocks,]
        outputs)."""
        x, target = np.asarray(x, dtype=np.float64), np.asarray(target, dtype=np.float64)
        n = x.shape[-1]
        xt = np.moveaxis(x, 0, -1)  # ([blocks,] columns, samples): batched BLAS products
        self.gram[..., :n, :n] += xt @ np.moveaxis(x, 0, -2)
        self.cross[..., :n, :] += xt @ np.moveaxis(target, 0, -2)
        if self.intercept:
            total = x.sum(axis=0)
            self.gram[..., :n, n] += total
            self.gram[..., n, :n] += total
            self.gram[..., n, n] += len(x)
            self.cross[..., n, :] += target.sum(axis=0)
        self.column_energy += np.einsum("s...o,s...o->...o", target, target)
        self.rows += len(x)


class OriginalActivations:
    """The original model's tensors on fixed batches, computed on demand (several in one run of
    the model cut to them), and kept for the next refit while they fit in ``budget`` bytes (a
    target search refits against the same ones again and again); tensors that would not fit
    are computed batch by batch each time."""

    def __init__(self, original: onnx.ModelProto, batches: Sequence[Batch], *, budget: int = 256 << 20) -> None:
        self.original = original
        self.pieces = list(chunked(batches))
        self.budget = budget
        self._kept: dict[str, list[np.ndarray]] = {}
        self._forward = ForwardRun(self.pieces, "original")

    def __call__(self, names: Sequence[str]) -> Iterator[list[np.ndarray]]:
        """The tensors ``names`` of the original model, a list per batch piece."""
        missing = [n for n in dict.fromkeys(names) if n not in self._kept]
        runs: Iterable[list[np.ndarray]] = (
            self._forward.tensors(self.original, missing) if missing
            else ([] for _ in self.pieces))
        keep: dict[str, list[np.ndarray]] = {}
        for index, computed in enumerate(runs):
            fresh = dict(zip(missing, computed))
            if index == 0:
                for name, value in fresh.items():
                    size = value.nbytes * len(self.pieces)
                    if size <= self.budget:
                        self.budget -= size
                        keep[name] = []
            for name in keep:
                keep[name].append(fresh[name])
            values = [self._kept[n][index] if n in self._kept else fresh[n] for n in names]
            if index == len(self.pieces) - 1:  # before the last yield: a zip may never resume this
                self._kept.update(keep)
            yield values


def refit(analysis: Analysis, original: onnx.ModelProto, batches: Sequence[Batch], *,
          ridge: float = DEFAULT_RIDGE, activations: OriginalActivations | None = None
          ) -> tuple[onnx.ModelProto, list[RefitReport]]:
    """The analysis's collapsed model with its layers refit on ``batches`` (see the module
    docstring), and a report per refit layer. ``ridge`` must be positive. ``activations``, the
    original's tensors on the same ``batches``, may carry them over from an earlier refit."""
    if not ridge > 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    model = analysis.collapse()
    pieces = list(chunked(batches))
    activations = activations or OriginalActivations(original, pieces, budget=0)
    forward = ForwardRun(pieces, "compressed")
    reports: list[RefitReport] = []
    for front in _fronts(model, _to_refit(analysis)):
        done = list(_refit_front(analysis, front, model, activations, forward, ridge))
        reports.extend(report for _, report in done)
        model = _with_refit_weights(model, analysis, [site for site, _ in done])
    return model, reports


def _with_refit_weights(model: onnx.ModelProto, analysis: Analysis, sites: Sequence[LinearSite]) -> onnx.ModelProto:
    """``model`` (the analysis's collapse, earlier fronts' refits in) with the weights and biases
    the analysis's graph now holds for ``sites`` written into its initializers of the same names,
    in place: a refit changes values only, and exporting the whole graph per front cost more than
    the refit of a small front. The graph is exported instead where a site's tensor is not such
    an initializer (a shared tensor rewritten under a new name)."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    tensors = [node.inputs[index] for site in sites for node, index in filter(None, (site.weight, site.bias))]
    if any(tensor.name not in initializers for tensor in tensors):
        return analysis.graph.export()
    for tensor in tensors:
        initializers[tensor.name].CopyFrom(numpy_helper.from_array(np.asarray(tensor.values), tensor.name))
    return model


def _to_refit(analysis: Analysis) -> list[LinearSite]:
    """The layers whose input the collapse changed (their own input merged, or a layer before
    them changed), in the analysis's order, where their site can refit them; a layer reading
    unchanged inputs is already optimal."""
    chosen: list[LinearSite] = []
    upstream_changed = False
    for site in analysis.sites:
        if not (isinstance(site, LinearSite) and site.layer):
            continue
        in_plan, out_plan = analysis.plan(site.inputs[0]), analysis.plan(site.outputs[0])
        changed_input = upstream_changed or in_plan is not None
        upstream_changed = changed_input or out_plan is not None
        if changed_input and site.refit_declined() is None:
            chosen.append(site)
    return chosen


def _fronts(model: onnx.ModelProto, sites: list[LinearSite]) -> list[list[LinearSite]]:
    """``sites`` cut into fronts: front k holds the layers with k refit layers on their longest
    path from the inputs in ``model`` (so no layer of a front reads another's output)."""
    by_output = {site.outputs[0].name: site for site in sites}
    level: dict[str, int] = {}
    front_of: dict[int, int] = {}
    for node in model.graph.node:
        depth = max((level.get(name, 0) for name in node_reads(node)), default=0)
        for name in node.output:
            level[name] = depth
            site = by_output.get(name)
            if site is not None:
                front_of[id(site)] = level.get(site.inputs[0].name, 0)
                level[name] = max(depth, front_of[id(site)] + 1)
    fronts: dict[int, list[LinearSite]] = {}
    for site in sites:
        if id(site) in front_of:
            fronts.setdefault(front_of[id(site)], []).append(site)
    return [fronts[k] for k in sorted(fronts)]


class _Problem:
    """The layers of a front that read one tensor the same way (``rows_key``) with the same
    blocks and bias freedom: one set of normal equations, their targets side by side."""

    def __init__(self, sites: list[LinearSite]) -> None:
        self.sites = sites
        self.start = [site.block_weights() for site in sites]
        w0, _, free = self.start[0]
        self.free = free
        widths = [w.shape[1] for w, _, _ in self.start]
        self.splits = np.cumsum(widths)[:-1]
        self.equations = NormalEquations(w0.shape[2], sum(widths), intercept=free, blocks=w0.shape[0])

    def add(self, x: np.ndarray, targets: list[np.ndarray]) -> None:
        """Add one batch: the shared input activation and each site's target rows, the input's
        rows built a few samples (leading axis) at a time, about :data:`ROW_BYTES` each."""
        site = self.sites[0]
        samples = len(x) if x.ndim > 1 and x.ndim + site.inputs[0].axis != 0 else 1
        step = samples if samples == 1 else max(1, ROW_BYTES // max(site.input_rows(x[:1]).nbytes, 1))
        per_sample = len(targets[0]) // samples
        for start in range(0, samples, step):
            rows = site.input_rows(x[start:start + step] if samples > 1 else x)
            part = slice(start * per_sample, start * per_sample + len(rows))
            blocks = rows.shape[1]
            parts = []
            for (_, b0, _), target in zip(self.start, targets):
                target = target[part].reshape(len(rows), blocks, -1)
                parts.append(target if self.free else target - b0)
            self.equations.add(rows, np.concatenate(parts, axis=2))


def _refit_front(analysis: Analysis, front: list[LinearSite], model: onnx.ModelProto,
                 activations: OriginalActivations, forward: ForwardRun, ridge: float
                 ) -> Iterator[tuple[LinearSite, RefitReport]]:
    """Refit the layers of one front in place (through their sites), each with its report;
    ``forward`` runs ``model`` (all earlier fronts refit) on the calibration pieces."""
    shared: dict[Hashable, list[LinearSite]] = {}
    for site in front:
        key = (site.inputs[0].name, site.rows_key(), site.refit_blocks(), site.flat()[2])
        shared.setdefault(key, []).append(site)
    problems = [_Problem(sites) for sites in shared.values()]
    inputs = list(dict.fromkeys(site.inputs[0].name for site in front))
    outputs = [site.outputs[0].name for site in front]
    compressed = forward.tensors(model, inputs)
    for xs, ys in zip(compressed, activations(outputs)):
        x_of, y_of = dict(zip(inputs, xs)), dict(zip(outputs, ys))
        for problem in problems:
            targets = []
            for site in problem.sites:
                out, plan = site.outputs[0], analysis.plan(site.outputs[0])
                y = activation_rows(y_of[out.name], out.axis)
                targets.append(y if plan is None else plan.fit_base(y, 1))
            problem.add(x_of[problem.sites[0].inputs[0].name], targets)
    done = {id(site): report for problem in problems for site, report in _solve(analysis, problem, ridge)}
    for site in front:
        if id(site) in done:
            yield site, done[id(site)]


def _solve(analysis: Analysis, problem: _Problem, ridge: float) -> Iterator[tuple[LinearSite, RefitReport]]:
    """Solve a problem's ridge normal equations (all blocks at once, by Cholesky) and store each
    layer's refit weights unless they would raise its calibration error (float rounding)."""
    equations = problem.equations
    if equations.rows == 0:
        return
    gram, cross = equations.gram, equations.cross
    columns = gram.shape[-1]
    start = np.concatenate([np.concatenate([np.swapaxes(w, 1, 2), b[:, None, :]], axis=1) if problem.free
                            else np.swapaxes(w, 1, 2) for w, b, _ in problem.start], axis=2)
    lam = ridge * np.maximum(np.trace(gram, axis1=1, axis2=2) / columns, 1e-12)[:, None, None]
    factor = np.linalg.cholesky(gram + lam * np.eye(columns))
    solved = _cho_solve(factor, cross + lam * start)
    residual = (np.sum(solved * (gram @ solved), axis=(0, 1)) - 2 * np.sum(solved * cross, axis=(0, 1)),
                np.sum(start * (gram @ start), axis=(0, 1)) - 2 * np.sum(start * cross, axis=(0, 1)))
    energy = equations.column_energy.sum(axis=0)
    bounds = [0, *problem.splits, solved.shape[2]]
    for i, site in enumerate(problem.sites):
        part = slice(bounds[i], bounds[i + 1])
        count = equations.rows * gram.shape[0] * (bounds[i + 1] - bounds[i])
        after, before = (float(np.sqrt(max(float(sse[part].sum() + energy[part].sum()), 0.0) / count))
                         for sse in residual)
        if after > before:  # only float rounding can do this: keep the merge
            yield site, RefitReport(site.name, before, before)
            continue
        weights = solved[:, :, part]
        w = np.swapaxes(weights[:, :-1] if problem.free else weights, 1, 2)
        site.set_block_weights(analysis.graph, w, weights[:, -1] if problem.free else None)
        yield site, RefitReport(site.name, before, after)


def _cho_solve(factor: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``(L L^T)^-1 rhs`` for stacks of lower Cholesky factors ``L``."""
    return np.stack([solve_triangular(f, solve_triangular(f, r, lower=True), lower=True, trans="T")
                     for f, r in zip(factor, rhs)])


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
    computed once per reader (the original run forward reader by reader) and cached.
    """

    #: Scale of a folded channel relative to its kept one: small enough to leave the kept row be.
    FOLDED_SCALE = 1e-4

    def __init__(self, original: onnx.ModelProto, batches: Sequence[Batch], *, ridge: float = DEFAULT_RIDGE) -> None:
        self.original = original
        self.batches = list(chunked(batches))
        self.ridge = ridge
        self._stats: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._forward = ForwardRun(self.batches, "original")

    def _statistics(self, reader: LinearSite) -> tuple[np.ndarray, np.ndarray]:
        """``[H, 1]^T [H, 1]`` and ``[H, 1]^T T`` for the reader's input H and pre-activations T."""
        key = (reader.inputs[0].name, reader.outputs[0].name)
        if key not in self._stats:
            equations = NormalEquations(reader.inputs[0].width, reader.outputs[0].width, intercept=True)
            for x, y in self._forward.tensors(self.original, list(key)):
                equations.add(reader.input_rows(x)[:, 0], activation_rows(y, reader.outputs[0].axis))
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
            if reader is None or not reader.dense:
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
    basis = np.zeros((count + 1, n))  # rows a_j: g restricted to the selected columns, orthonormalised
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
        a = (g[pick] - basis[:step].T @ basis[:step, pick]) / norm
        residual_c -= np.outer(a, residual_c[pick] / norm)
        basis[step] = a
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
