"""Calibrated merging: refit merged layers by ridge least squares on calibration inputs.

After a collapse, every dense layer (Gemm/MatMul) whose input the merge changed (its own input
merged, or a layer before it merged), in topological order, is refit so that its pre-activations on the calibration inputs match the
original model's: with ``X`` the layer's input in the compressed model (already refit layers
upstream included: the refit proceeds along the graph) and ``T`` the original pre-activations
(for merged output channels, the base they are fitted to under the scale rule, ``Plan.fit_base``),
the new weights ``W`` (bias as an extra row) minimise

    ||X W - T||^2 + lam ||W - W0||^2,    lam = ridge * trace(X^T X) / columns,

where ``W0`` is the merge's own result. ``W0`` costs no penalty, so the refit's calibration error
never exceeds the merge's. ``X^T X`` and ``X^T T`` are summed in float64 over batches (memory
independent of the calibration size) and the system is solved by Cholesky.
"""

from __future__ import annotations

from collections.abc import Sequence
import numpy as np
import onnx
from scipy.linalg import cho_factor, cho_solve

from .analysis import Analysis
from .report import RefitReport
from .rules import Plan
from .rules.linear import LinearSite
from .validation import Batch, chunked, run_tensors

#: Default ridge strength, relative to the mean diagonal of X^T X.
DEFAULT_RIDGE = 1e-3


def _rows(values: np.ndarray, axis: int) -> np.ndarray:
    """An activation as (samples, channels): the channel axis last, every other axis a sample."""
    moved = np.moveaxis(values, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def refit(analysis: Analysis, original: onnx.ModelProto, batches: Sequence[Batch], *,
          ridge: float = DEFAULT_RIDGE) -> tuple[onnx.ModelProto, list[RefitReport]]:
    """The analysis's collapsed model with its dense layers refit on ``batches`` (see the module
    docstring), and a report per refit layer. ``ridge`` must be positive."""
    if not ridge > 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    model = analysis.collapse()
    pieces = list(chunked(batches))
    reports: list[RefitReport] = []
    upstream_changed = False  # a layer reading unchanged inputs is already optimal: skip it
    for site in analysis.sites:
        if not (isinstance(site, LinearSite) and site.layer):
            continue
        in_plan, out_plan = analysis.plan(site.inputs[0]), analysis.plan(site.outputs[0])
        changed_input = upstream_changed or in_plan is not None
        upstream_changed = changed_input or out_plan is not None
        dense = site.dense()
        if not changed_input or dense is None:
            continue
        report = _refit_layer(analysis, site, dense, out_plan, model, original, pieces, ridge)
        if report is not None:
            reports.append(report)
            model = analysis.graph.export()
    return model, reports


def _refit_layer(analysis: Analysis, site: LinearSite, dense: tuple[np.ndarray, np.ndarray, bool], out_plan: Plan | None,
                 model: onnx.ModelProto, original: onnx.ModelProto, pieces: list[Batch],
                 ridge: float) -> RefitReport | None:
    """Refit one layer in place (through its site); None when it has no activations to fit."""
    w0, b0, free = dense
    inp, out = site.inputs[0], site.outputs[0]
    columns = w0.shape[1] + int(free)
    gram = np.zeros((columns, columns))
    cross = np.zeros((columns, w0.shape[0]))
    target_energy, samples = 0.0, 0
    compressed_runs = run_tensors(model, [inp.name], pieces, "compressed")
    original_runs = run_tensors(original, [out.name], pieces, "original")
    for (x,), (y,) in zip(compressed_runs, original_runs):
        x, y = _rows(x, inp.axis), _rows(y, out.axis)
        target = y if out_plan is None else out_plan.fit_base(y, 1)
        if not free:
            target = target - b0
        if free:
            x = np.hstack([x, np.ones((len(x), 1))])
        gram += x.T @ x
        cross += x.T @ target
        target_energy += float(np.sum(target * target))
        samples += target.size
    if samples == 0:
        return None
    start = np.vstack([w0.T, b0[None, :]]) if free else w0.T
    lam = ridge * max(float(np.trace(gram)) / columns, 1e-12)
    factor = cho_factor(gram + lam * np.eye(columns))
    solved = cho_solve(factor, cross + lam * start)

    def rms(weights: np.ndarray) -> float:  # ||X W - T||^2 from the normal equations
        sse = float(np.sum(weights * (gram @ weights)) - 2 * np.sum(weights * cross) + target_energy)
        return float(np.sqrt(max(sse, 0.0) / samples))

    before, after = rms(start), rms(solved)
    if after > before:  # only float rounding can do this: keep the merge
        return RefitReport(site.name, before, before)
    site.set_dense(analysis.graph, solved[:w0.shape[1]].T, solved[-1] if free else None)
    return RefitReport(site.name, before, after)
