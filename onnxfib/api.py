"""The library's entry points: compress, inspect and validate models. Nothing here prints."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxfib import io, stats
from onnxfib.analysis import SYMMETRIES, analyze
from onnxfib.errors import UsageError, ValidationMismatchError
from onnxfib.report import CompressionReport, LayerReport, ValidationReport
from onnxfib.validation import DEFAULT_ATOL, DEFAULT_RTOL, check_data, generate_inputs, load_data, validate_models

#: ``data`` may be a .npz/.npy path, one batch (input name -> array), or a list of batches.
Data = str | os.PathLike | Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]]


@dataclass
class CompressionResult:
    """A compressed, checked model, the report of the run that made it, the files the input was
    read from, and whether it kept its tensors in external data."""

    model: onnx.ModelProto
    report: CompressionReport
    inputs: tuple[Path, ...] = ()
    external_data: bool = False

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model atomically (external data if the input had it or it exceeds 2 GB);
        refuses to overwrite the input's model or data files."""
        return io.save_model(self.model, path, external_data=self.external_data, protect=self.inputs)


def check_eps(eps: float) -> float:
    """Return ``eps`` as a float if it lies in [0, 2) (cosine distance); UsageError otherwise."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise UsageError(f"eps must be a number in [0, 2), got {eps!r}") from None
    if math.isnan(value) or not 0.0 <= value < 2.0:
        raise UsageError(f"eps must be in [0, 2) (a cosine distance), got {eps}")
    return value


def _check_tolerances(rtol: float, atol: float) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if math.isnan(value) or value < 0:
            raise UsageError(f"{name} must be a non-negative number, got {value}")


def _inputs(
    model: onnx.ModelProto, data: Data | None, input_shapes: Mapping[str, tuple[int, ...]] | None, seed: int
) -> list[dict[str, np.ndarray]]:
    """User data checked against ``model``, or seeded generated batches when ``data`` is None."""
    if data is None:
        return generate_inputs(model, input_shapes=input_shapes, seed=seed)
    if isinstance(data, (str, os.PathLike)):
        return load_data(data, model)
    batches = [data] if isinstance(data, Mapping) else list(data)
    return check_data(model, batches, "data")


def compress(
    model_or_path: io.ModelSource,
    *,
    eps: float = 0.0,
    symmetry: str = "fiber",
    check: bool = True,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    data: Data | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> CompressionResult:
    """Merge the model's symmetric neurons (``symmetry`` base, tolerance ``eps``), check the result
    and, when ``check`` is set, compare it with the original in ONNX Runtime; raises
    ValidationMismatchError (with the report) beyond tolerance, UsageError for bad arguments,
    InvalidModelError for an unreadable or invalid input. The input is never modified."""
    start = time.perf_counter()
    eps = check_eps(eps)
    if symmetry not in SYMMETRIES:
        raise UsageError(f"symmetry must be one of {', '.join(SYMMETRIES)}, got {symmetry!r}")
    _check_tolerances(rtol, atol)
    loaded = io.open_model(model_or_path)
    original = loaded.model
    batches = _inputs(original, data, input_shapes, seed) if check else None
    analysis = analyze(original, eps=eps, symmetry=symmetry)
    compressed = io.finalize_model(analysis.collapse(), eps=eps, symmetry=symmetry)
    validation = validate_models(original, compressed, batches, rtol=rtol, atol=atol) if check else None
    report = CompressionReport(
        eps=eps,
        symmetry=symmetry,
        params_before=stats.count_parameters(original),
        params_after=stats.count_parameters(compressed),
        nodes_before=stats.count_nodes(original),
        nodes_after=stats.count_nodes(compressed),
        layers=list(analysis.layers),
        seconds=time.perf_counter() - start,
        bytes_before=original.ByteSize(),
        bytes_after=compressed.ByteSize(),
        validation=validation,
    )
    if validation is not None and not validation.ok:
        bad = ", ".join(f"{o.name} (max abs {o.max_abs:.3g})" for o in validation.outputs if not o.ok)
        raise ValidationMismatchError(
            f"compressed model differs from the original beyond rtol={rtol:g}, atol={atol:g} on {bad}",
            report,
        )
    return CompressionResult(compressed, report, loaded.files, loaded.external_data)


def inspect(model_or_path: io.ModelSource, *, eps: float = 0.0) -> list[LayerReport]:
    """Per-layer fiber, opfiber and cover figures of a model at tolerance ``eps``."""
    eps = check_eps(eps)
    model = io.open_model(model_or_path).model
    return list(analyze(model, eps=eps).layers)


def validate(
    reference: io.ModelSource,
    candidate: io.ModelSource,
    *,
    data: Data | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> ValidationReport:
    """Compare ``candidate``'s outputs with ``reference``'s on ``data`` (or seeded generated inputs
    shaped from the reference); returns the report, whatever the verdict."""
    _check_tolerances(rtol, atol)
    ref = io.open_model(reference).model
    cand = io.open_model(candidate).model
    return validate_models(ref, cand, _inputs(ref, data, input_shapes, seed), rtol=rtol, atol=atol)
