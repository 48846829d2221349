"""The library's entry points: compress, inspect and validate models. Nothing here prints."""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import NamedTuple, ParamSpec, TypeVar

import numpy as np
import onnx
from onnx import external_data_helper
from onnx_graphsurgeon.logger import G_LOGGER

from onnxfib import io, stats
from onnxfib.analysis import SYMMETRIES, analyze, bind
from onnxfib.calibrate import DEFAULT_RIDGE
from onnxfib.errors import UsageError, ValidationMismatchError
from onnxfib.folding import Folder
from onnxfib.graph import GraphView
from onnxfib.report import (Barrier, CompressionReport, LayerReport, RefitReport, SweepPoint, TargetKind, TargetReport,
                            ValidationReport, to_json)
from onnxfib.rules import default_registry
from onnxfib.targets import HELD_OUT_FOLDS, Evaluates, Evaluator, HeldOut, Outcome, Subsampled, can_deal, search
from onnxfib.targets import sweep as sweep_eps
from onnxfib.validation import (VALIDATION_ELEMENTS, VALIDATION_ROWS, ModelFile, check_data, check_runs, common_rows,
                                generate_inputs, load_data, rows_within, validate_models)

#: ``data`` may be a .npz/.npy path or directory, a list of them (``validation.load_data``: one
#: batch per file), one batch (input name -> array), or a list of batches.
Data = (str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, np.ndarray]
        | Sequence[Mapping[str, np.ndarray]])

#: ``labels`` may be a .npy path or an array: one integer class per sample of ``data``.
Labels = str | os.PathLike | np.ndarray | Sequence[int]

#: What ``compress(check=)`` accepts: a whole-model comparison, one layer at a time, or none.
CHECK_MODES = ("full", "layers", "none")

#: Uniform eps values a sweep visits by default.
SWEEP_EPS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: Without data, a target search or sweep measures on generated inputs whose unknown first axis
#: (the batch) is this long (per distribution), so the error it compares is not that of one sample.
MEASURING_ROWS = 128
#: ... or fewer, as many as one run of the model spends at most this many multiply-accumulates
#: on (2**31: the PP-OCR direction classifier at 48 x 192 still runs 128 rows, its recogniser at
#: 48 x 320 eight): a search runs the model on them a hundred times or more.
MEASURING_MACS = 2**31


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _silent(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``function`` with onnx-graphsurgeon's logger (which prints to stdout) silenced: the
    library never prints, and stdout carries only what a CLI user asked for."""

    @wraps(function)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with G_LOGGER.suppress(G_LOGGER.CRITICAL + 1):
            return function(*args, **kwargs)

    return run


@dataclass
class CompressionResult:
    """A compressed, checked model, the report of the run that made it, the files the input was
    read from, and whether it kept its tensors in external data. A model compressed from external
    data is streamed: its tensors stay on disk in ``directory`` (a private temporary directory that
    lives as long as the result) until :attr:`model` is first read; ``save`` copies them from there."""

    stored: onnx.ModelProto
    report: CompressionReport
    inputs: tuple[Path, ...] = ()
    external_data: bool = False
    directory: Path | None = None
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def model(self) -> onnx.ModelProto:
        """The compressed model in memory (a streamed one's tensors read from ``directory`` now)."""
        if self.directory is not None and io.has_external(self.stored):
            external_data_helper.load_external_data_for_model(self.stored, str(self.directory))
            for tensor in io.all_tensors(self.stored):  # inline as a model read from one file is
                if tensor.data_location == onnx.TensorProto.DEFAULT:
                    tensor.ClearField("data_location")
        return self.stored

    def save(self, path: str | os.PathLike, *, external_data: bool = False,
             size_threshold: int = io.EXTERNAL_THRESHOLD) -> Path:
        """Write the model atomically, its tensors of at least ``size_threshold`` bytes in
        ``<path>.data`` when ``external_data`` is set, the input had external data, or the model
        exceeds 2 GB (else inline, also where a large inline input was streamed); refuses to
        overwrite the input's model or data files."""
        return io.save_model(self.stored, path, external_data=external_data or self.external_data,
                             protect=self.inputs, source=self.directory, size_threshold=size_threshold)


def memory_bytes() -> int:
    """The machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_mode(check: bool | str, model_bytes: int) -> str:
    """The validation ``compress`` runs: "full", "layers" or "none" as given (False is "none");
    True chooses "full", or "layers" for a model larger than half the machine's memory."""
    if check is True:
        return "layers" if model_bytes > memory_bytes() // 2 else "full"
    if check is False:
        return "none"
    if check not in CHECK_MODES:
        raise UsageError(f"check must be one of {', '.join(CHECK_MODES)} (or True/False), got {check!r}")
    return check


def check_eps(eps: float) -> float:
    """Return ``eps`` as a float if it lies in [0, 2) (cosine distance); UsageError otherwise."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise UsageError(f"eps must be a number in [0, 2), got {eps!r}") from None
    if math.isnan(value) or not 0.0 <= value < 2.0:
        raise UsageError(f"eps must be in [0, 2) (a cosine distance), got {eps}")
    return value


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is a non-negative integer (numpy's seeds); UsageError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _number(name: str, value: object) -> float:
    """``value`` as a float; UsageError naming ``name`` when it is not a number."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None


def check_layer_eps(layer_eps: Mapping[str, float] | None) -> dict[str, float]:
    """Per-layer eps (layer name -> eps) checked like ``eps``; layer names are checked by the analysis."""
    return {str(name): check_eps(value) for name, value in (layer_eps or {}).items()}


def _check_fraction(name: str, value: float, *, upper_open: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(number) or not (0.0 < number < 1.0 if upper_open else 0.0 <= number <= 1.0):
        raise UsageError(f"{name} must be in {'(0, 1)' if upper_open else '[0, 1]'}, got {value}")
    return number


def _target(target_params: float | None, max_error: float | None, max_drop: float | None,
            min_agreement: float | None, min_cosine: float | None, has_labels: bool) -> tuple[TargetKind, float] | None:
    """The one target asked for, as (kind, limit); UsageError for several, a bad value, or a
    max_drop without labels."""
    given = [(k, v) for k, v in ((TargetKind.PARAMS, target_params), (TargetKind.ERROR, max_error),
                                 (TargetKind.DROP, max_drop), (TargetKind.AGREEMENT, min_agreement),
                                 (TargetKind.COSINE, min_cosine)) if v is not None]
    if len(given) > 1:
        raise UsageError("give at most one target: target_params, max_error, max_drop, min_agreement or min_cosine")
    if not given:
        return None
    kind, value = given[0]
    if kind is TargetKind.PARAMS:
        return kind, _check_fraction("target_params (the fraction of parameters kept)", value, upper_open=True)
    if kind is TargetKind.DROP:
        if not has_labels:
            raise UsageError("max_drop needs labels (one integer class per sample of the data)")
        return kind, _check_fraction("max_drop (accuracy lost, a fraction: 0.01 is one point)", value)
    if kind is TargetKind.AGREEMENT:
        return kind, _check_fraction("min_agreement (the share of answers equal to the original's)", value)
    if kind is TargetKind.COSINE:
        number = _number("min_cosine", value)
        if math.isnan(number) or not -1.0 <= number <= 1.0:
            raise UsageError(f"min_cosine must be in [-1, 1], got {value}")
        return kind, number
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"max_error must be a number, got {value!r}") from None
    if math.isnan(number) or number < 0:
        raise UsageError(f"max_error must be a non-negative number, got {value}")
    return kind, number


def _labels(labels: Labels | None, batches: list[dict[str, np.ndarray]]) -> np.ndarray | None:
    """Labels as a flat integer array, one per sample of ``batches`` (first axis of the first input)."""
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        if not path.is_file():
            raise UsageError(f"{path}: labels file not found")
        try:
            labels = np.load(path, allow_pickle=False)
        except Exception:
            raise UsageError(f"{path}: not a readable .npy file of integer labels") from None
    array = np.asarray(labels)
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iu":
        raise UsageError(f"labels must be integers (class indices), got dtype {array.dtype}")
    samples = sum(len(next(iter(batch.values()))) for batch in batches)
    if array.size != samples:
        raise UsageError(f"labels hold {array.size} entries but the data holds {samples} samples")
    return array.reshape(-1)


def _check_measuring(symmetry: str, data: Data | None, calibrate: bool, labels: object, ridge: float) -> None:
    """UsageError for a symmetry onnxfib does not know, calibration or labels without data, or a
    ridge that is not a positive number."""
    if symmetry not in SYMMETRIES:
        raise UsageError(f"symmetry must be one of {', '.join(SYMMETRIES)}, got {symmetry!r}")
    if calibrate and data is None:
        raise UsageError("calibrate needs data: the calibration inputs")
    if labels is not None and data is None:
        raise UsageError("labels need data: one label per sample of it")
    ridge = _number("ridge", ridge)
    if math.isnan(ridge) or not ridge > 0:
        raise UsageError(f"ridge must be a positive number, got {ridge}")


def _check_tolerances(rtol: float | None, atol: float | None) -> None:
    """UsageError for a tolerance that is given but not a non-negative number."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None:
            continue
        value = _number(name, value)
        if math.isnan(value) or value < 0:
            raise UsageError(f"{name} must be a non-negative number, got {value}")


def _inputs(
    model: onnx.ModelProto, data: Data | None, input_shapes: Mapping[str, tuple[int, ...]] | None, seed: int,
    measuring: bool = False,
) -> list[dict[str, np.ndarray]]:
    """User data checked against ``model``, or seeded generated batches when ``data`` is None: for
    a search or sweep (``measuring``) MEASURING_ROWS rows, within the generator's cap and
    MEASURING_MACS, also where
    ``input_shapes`` gives a shorter dynamic first axis; for validation VALIDATION_ROWS rows within
    VALIDATION_ELEMENTS, and a first axis ``input_shapes`` gives as given."""
    if data is None:
        if measuring:
            return generate_inputs(model, input_shapes=input_shapes, seed=seed, rows=MEASURING_ROWS,
                                   max_macs=MEASURING_MACS)
        return generate_inputs(model, input_shapes=input_shapes, seed=seed, rows=VALIDATION_ROWS,
                               widen_given=False, max_elements=VALIDATION_ELEMENTS)
    if isinstance(data, (str, os.PathLike)):
        return load_data(data, model)
    batches = [data] if isinstance(data, Mapping) else list(data)
    if batches and all(isinstance(item, (str, os.PathLike)) for item in batches):
        return load_data(batches, model)
    return check_data(model, batches, "data")


def _one_row(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None,
             seed: int) -> list[dict[str, np.ndarray]]:
    """Generated batches whose unknown first axes are one row long: what validation falls back
    to where ORT cannot run a model on VALIDATION_ROWS rows (a batch declared dynamic that is not)."""
    return generate_inputs(model, input_shapes=input_shapes, seed=seed)


def _probe(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None,
           seed: int) -> dict[str, np.ndarray] | None:
    """A generated batch to try the model on, or None where inputs cannot be generated."""
    try:
        return _one_row(model, input_shapes, seed)[0]
    except UsageError:
        return None


@_silent
def compress(
    model_or_path: io.ModelSource,
    *,
    eps: float = 0.0,
    layer_eps: Mapping[str, float] | None = None,
    symmetry: str = "fiber",
    check: bool | str = True,
    rtol: float | None = None,
    atol: float | None = None,
    data: Data | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    calibrate: bool = False,
    ridge: float = DEFAULT_RIDGE,
    target_params: float | None = None,
    max_error: float | None = None,
    max_drop: float | None = None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    labels: Labels | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompressionResult:
    """Merge the model's symmetric neurons (``symmetry`` base, tolerance ``eps``, or ``layer_eps``
    per layer name), check the result and compare it with the original in ONNX Runtime on
    ``data`` (or generated inputs: ``validation.VALIDATION_ROWS`` rows from each of two
    distributions, fewer for large inputs, one where ORT cannot run more): ``check`` "full" runs both models whole, "layers" one layer at a
    time (``validation.run_by_layers``: for models larger than memory), "none" (or False) not at
    all; True is "full", or "layers" for a model larger than half the machine's memory.

    A model with external data given as a path is streamed when no target or calibration asks
    for the model in memory: its weights are read memory-mapped, rewritten ones are written to a
    private temporary directory as they are made, and the result refers to them there
    (``CompressionResult.directory``).

    ``calibrate`` refits the merged layers on ``data`` by ridge least squares (``ridge``) and
    lets the data choose which channels merged layers keep (see ``onnxfib.calibrate``). A target
    chooses every layer's eps (``onnxfib.targets``): keep at most ``target_params`` of the
    parameters (a fraction), keep the largest output error relative to the output's scale
    (``max_abs / max |original output|``) within ``max_error``, the accuracy lost on ``data``
    against ``labels`` within ``max_drop`` (a fraction: 0.01 is one point), or, without labels,
    the share of answers equal to the original's (top-1, per position for sequence outputs) at
    least ``min_agreement``, or the mean cosine of output rows with the original's at least
    ``min_cosine`` (embeddings). A calibrated target other than ``target_params`` is
    measured held out (``targets.HeldOut``: each of 4 parts of the rows on a refit of the other
    three), so the figure is not flattered by the refit having seen the rows it is measured on.
    A calibrated ``target_params`` search, whose figure does not depend on the data, chooses on
    as many of the rows as generated measuring rows would be (``MEASURING_ROWS``, fewer within
    ``MEASURING_MACS``; every k-th row), then refits and measures its choice on all of them
    (``targets.Subsampled``).
    With a target the verdict is the target (an approximate model never matches within
    rtol/atol; the errors are still reported). ``progress``, when given, is called with a
    one-line summary after every step of a target search (searches can take minutes).

    ``rtol``/``atol`` left None follow each output's dtype (``validation.default_tolerances``:
    1e-5 for float32, looser for float16 and bfloat16, whose exact merges round more).

    Raises ValidationMismatchError (with the report) beyond tolerance or when the target is not
    met, UsageError for bad arguments, InvalidModelError for an unreadable or invalid input.
    The input is never modified."""
    start = time.perf_counter()
    eps = check_eps(eps)
    layer_eps = check_layer_eps(layer_eps)
    _check_measuring(symmetry, data, calibrate, labels, ridge)
    _check_tolerances(rtol, atol)
    seed = check_seed(seed)
    goal = _target(target_params, max_error, max_drop, min_agreement, min_cosine, labels is not None)
    if goal is not None and (eps or layer_eps):
        raise UsageError("a target chooses every layer's eps: give no eps or per-layer eps with it")
    check_mode(check, 0)  # a bad value is refused before the model is read
    streamable = goal is None and not calibrate
    scratch = tempfile.TemporaryDirectory(prefix="onnxfib-") if streamable else None
    try:
        loaded = io.open_model(model_or_path, lazy=streamable, spill=None if scratch is None else Path(scratch.name))
        if loaded.directory is None and scratch is not None:  # held in memory after all
            scratch.cleanup()
            scratch = None
        original = loaded.model
        size = sum(f.stat().st_size for f in loaded.files) if loaded.files else io.tensor_bytes(original)
        mode = check_mode(check, size)
        checking = mode != "none"
        reference: ModelFile = loaded.path if loaded.path is not None else original
        batches = _inputs(original, data, input_shapes, seed, goal is not None) if checking or calibrate or goal else None
        fallback = _one_row(original, input_shapes, seed) if checking and data is None and goal is None else None
        label_array = _labels(labels, batches) if batches is not None else None
        if not (checking or calibrate or goal or io.too_large(original) or size > memory_bytes() // 2):
            check_runs(reference, _probe(original, input_shapes, seed))  # else the original runs anyway, first
        storage = None if scratch is None else io.Storage(loaded.directory, Path(scratch.name))
        result = _compress(original, reference, batches, fallback, label_array, storage, eps=eps, layer_eps=layer_eps,
                           symmetry=symmetry, calibrate=calibrate, ridge=ridge, goal=goal, progress=progress,
                           mode=mode, rtol=rtol, atol=atol, start=start)
    except BaseException:
        if scratch is not None:
            scratch.cleanup()
        raise
    result.inputs, result.external_data, result.scratch = loaded.files, loaded.external_data, scratch
    result.directory = None if storage is None else storage.scratch
    return result


def _compress(original: onnx.ModelProto, reference: ModelFile, batches: list[dict[str, np.ndarray]] | None,
              fallback: list[dict[str, np.ndarray]] | None, label_array: np.ndarray | None, storage: io.Storage | None, *, eps: float,
              layer_eps: dict[str, float], symmetry: str, calibrate: bool, ridge: float,
              goal: tuple[TargetKind, float] | None, progress: Callable[[str], None] | None, mode: str,
              rtol: float | None, atol: float | None, start: float) -> CompressionResult:
    """``compress`` once its arguments are checked and the input loaded (``storage``: streamed;
    ``fallback``: see ``validate_models``)."""
    refits: list[RefitReport] = []
    target: TargetReport | None = None
    if goal is not None:
        options = {"symmetry": symmetry, "labels": label_array, "calibrate": calibrate, "ridge": ridge,
                   "folder": Folder(original)}
        search_rows = _search_rows(original, batches) if calibrate and goal[0] is TargetKind.PARAMS else None
        if calibrate and goal[0] is not TargetKind.PARAMS and can_deal(batches, HELD_OUT_FOLDS):
            evaluator: Evaluates = HeldOut(original, batches, folds=HELD_OUT_FOLDS, **options)
        elif search_rows is not None:
            evaluator = subsampled = Subsampled(original, batches, rows=search_rows, **options)
            if progress is not None:
                progress(f"searching on {subsampled.rows} of the {subsampled.total} calibration rows (spread over "
                         "all of them); the result is refit and measured on every row")
        else:
            evaluator = Evaluator(original, batches, **options)
        announce = None if progress is None else lambda step: progress(_step_line(evaluator, step, goal))
        measured = None if progress is None else (
            lambda name, index, total, probe: progress(_probe_line(evaluator, name, index, total, probe, goal)))
        outcome = search(evaluator, *goal, on_step=announce, on_probe=measured)
        analysis, compressed, refits = outcome.analysis, outcome.model, outcome.refit
        target = evaluator.report(outcome, *goal)
    elif calibrate:
        refitting = Evaluator(original, batches, symmetry=symmetry, calibrate=True, ridge=ridge)
        outcome = refitting.finish(refitting(layer_eps, eps))
        analysis, compressed, refits = outcome.analysis, outcome.model, outcome.refit
    else:
        analysis = analyze(original, eps=eps, symmetry=symmetry, layer_eps=layer_eps, storage=storage)
        compressed = analysis.collapse()
    layers = list(analysis.layers)
    del analysis  # its graph holds the working weights (memory-mapped when streamed)
    compressed = _record_settings(compressed, layers, eps=eps, symmetry=symmetry, calibrate=calibrate, goal=goal,
                                  storage=storage)
    candidate = compressed if storage is None else storage.scratch / io.SCRATCH_MODEL
    validation = (validate_models(reference, candidate, batches, rtol=rtol, atol=atol, mode=mode, fallback=fallback)
                  if mode != "none" else None)
    report = CompressionReport(
        eps=eps,
        symmetry=symmetry,
        params_before=stats.count_parameters(original),
        params_after=stats.count_parameters(compressed),
        nodes_before=stats.count_nodes(original),
        nodes_after=stats.count_nodes(compressed),
        ops_before=stats.count_ops(original),
        ops_after=stats.count_ops(compressed),
        layers=layers,
        seconds=time.perf_counter() - start,
        bytes_before=io.stored_bytes(original),
        bytes_after=io.stored_bytes(compressed),
        validation=validation,
        target=target,
        calibrated=calibrate,
        refit=refits,
    )
    if target is not None:
        if not target.met:
            raise ValidationMismatchError(
                f"target not met: {target.describe()} (the closest the search reached)", report)
    elif validation is not None and not validation.ok:
        bad = ", ".join(f"{o.name} (max abs {o.max_abs:.3g}, rtol={o.rtol:g}, atol={o.atol:g})"
                        for o in validation.outputs if not o.ok)
        raise ValidationMismatchError(f"compressed model differs from the original beyond tolerance on {bad}", report)
    return CompressionResult(compressed, report)


def _search_rows(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]]) -> int | None:
    """How many of the calibration rows a calibrated parameter search chooses on
    (``targets.Subsampled``): as many as generated measuring rows would be (MEASURING_ROWS, fewer
    within MEASURING_MACS); None where that is all of them or the rows cannot be dealt."""
    if not can_deal(batches, 2):
        return None
    first = batches[0]
    rows = rows_within(model, {name: np.shape(value) for name, value in first.items()}, list(first),
                       MEASURING_ROWS, MEASURING_MACS)
    return rows if rows < sum(common_rows(batch) or 0 for batch in batches) else None


def _record_settings(model: onnx.ModelProto, layers: Sequence[LayerReport], *, eps: float, symmetry: str,
                     calibrate: bool, goal: tuple[TargetKind, float] | None, storage: io.Storage | None = None
                     ) -> onnx.ModelProto:
    """Record this run in the ``onnxfib.*`` metadata (an earlier run's keys dropped) and finalize
    ``model``: a search records its target (``onnxfib.target``, JSON kind and limit) and the eps
    it chose per layer, and no uniform ``onnxfib.eps``."""
    settings = {p.key: p.value for p in model.metadata_props if not p.key.startswith("onnxfib.")}
    if calibrate:
        settings["onnxfib.calibrated"] = "true"
    if goal is not None or any(layer.eps != eps for layer in layers):
        settings["onnxfib.layer_eps"] = to_json({layer.name: layer.eps for layer in layers}, indent=None)
    if goal is not None:  # strict JSON: a max_error of inf is the string "Infinity"
        settings["onnxfib.target"] = to_json({"kind": goal[0].value, "limit": goal[1]}, indent=None)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, settings)
    model = io.finalize_model(model, eps=eps, symmetry=symmetry, storage=storage)
    if goal is not None:  # the search chose per-layer eps; eps 0.0 would claim an exact run
        kept = [p for p in model.metadata_props if p.key != "onnxfib.eps"]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
    return model


def _step_line(evaluator: Evaluates, outcome: Outcome, goal: tuple[TargetKind, float]) -> str:
    """A search step in a line: the parameters kept, and the output error (for a parameter
    target: the relative mean squared error the search minimises, and the largest error) or where
    the step stands against the error or accuracy target."""
    kind, _ = goal
    where = (f"output error {outcome.mse:.3g} (mean square / variance), max abs {outcome.max_abs:.3g}"
             if kind is TargetKind.PARAMS else evaluator.report(outcome, *goal).describe())
    return f"keeps {outcome.params / evaluator.params_before:.2%} of the parameters; {where}"


def _probe_line(evaluator: Evaluates, name: str, index: int, total: int, probe: Outcome | None,
                goal: tuple[TargetKind, float]) -> str:
    """A layer measured merged alone in a line: which of how many, and its step (or that none
    of its steps meets the target)."""
    where = "no step within the target" if probe is None else _step_line(evaluator, probe, goal)
    return f"measuring layer {index}/{total} ({name}) merged alone: {where}"


@_silent
def sweep(
    model_or_path: io.ModelSource,
    *,
    eps_values: Sequence[float] = SWEEP_EPS,
    symmetry: str = "fiber",
    data: Data | None = None,
    labels: Labels | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    calibrate: bool = False,
    ridge: float = DEFAULT_RIDGE,
    progress: Callable[[str], None] | None = None,
) -> list[SweepPoint]:
    """Parameters kept against output error (and accuracy, with ``labels``) at each uniform eps of
    ``eps_values``, measured on ``data`` (or generated inputs); ``calibrate`` refits each collapse
    on ``data`` first; ``progress``, when given, is called with a line per point measured. The
    input is never modified."""
    values = [check_eps(value) for value in eps_values]
    if not values:
        raise UsageError("a sweep needs at least one eps value")
    _check_measuring(symmetry, data, calibrate, labels, ridge)
    seed = check_seed(seed)
    original = io.open_model(model_or_path).model
    batches = _inputs(original, data, input_shapes, seed, measuring=True)
    evaluator = Evaluator(original, batches, symmetry=symmetry, labels=_labels(labels, batches),
                          calibrate=calibrate, ridge=ridge)
    measured = itertools.count(1)
    announce = None if progress is None else lambda point: progress(
        f"eps {point.eps:g} ({next(measured)}/{len(values)}): keeps {point.params_kept:.2%} of the parameters")
    return sweep_eps(evaluator, values, on_point=announce)


class Inspection(NamedTuple):
    """What ``inspection`` finds: the per-layer figures, the barriers, and, where inputs were
    given, the collapse's output errors against the original on them."""

    layers: list[LayerReport]
    barriers: list[Barrier]
    validation: ValidationReport | None = None


@_silent
def inspection(model_or_path: io.ModelSource, *, eps: float = 0.0, data: Data | None = None,
               input_shapes: Mapping[str, tuple[int, ...]] | None = None, seed: int = 0,
               rtol: float | None = None, atol: float | None = None) -> Inspection:
    """Per-layer fiber, opfiber and cover figures of a model at tolerance ``eps`` and its barriers
    (see ``barriers``), from one load and one analysis (external data read memory-mapped).

    With ``data`` or ``input_shapes`` the collapse at ``eps`` is also run against the original in
    ONNX Runtime on those inputs (``compress`` with its check, the same ``seed``, ``rtol`` and
    ``atol``; the layers come from its report and the barriers from a second binding), and
    ``validation`` holds its per-output errors, whatever the verdict; nothing is written."""
    eps = check_eps(eps)
    if data is not None or input_shapes:
        try:
            result = compress(model_or_path, eps=eps, data=data, input_shapes=input_shapes, seed=seed, rtol=rtol,
                              atol=atol)
            if result.scratch is not None:
                result.scratch.cleanup()
            report = result.report
        except ValidationMismatchError as exc:
            if not isinstance(exc.report, CompressionReport):
                raise
            report = exc.report
        return Inspection(report.layers, barriers(model_or_path), report.validation)
    loaded = io.open_model(model_or_path, lazy=True)
    with tempfile.TemporaryDirectory(prefix="onnxfib-") as scratch:
        storage = None if loaded.directory is None else io.Storage(loaded.directory, Path(scratch))
        analysis = analyze(loaded.model, eps=eps, storage=storage)
        return Inspection(list(analysis.layers), list(analysis.barriers))


def inspect(model_or_path: io.ModelSource, *, eps: float = 0.0) -> list[LayerReport]:
    """Per-layer fiber, opfiber and cover figures of a model at tolerance ``eps`` (external data
    read memory-mapped)."""
    return inspection(model_or_path, eps=eps).layers


@_silent
def barriers(model_or_path: io.ModelSource) -> list[Barrier]:
    """The nodes reading a channel axis that no rule binds, each with the reason (they keep
    their neighbours' widths); the tolerance plays no part in binding."""
    model = io.open_model(model_or_path).model
    return bind(GraphView(model), default_registry())[1]


def validate(
    reference: io.ModelSource,
    candidate: io.ModelSource,
    *,
    data: Data | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> ValidationReport:
    """Compare ``candidate``'s outputs with ``reference``'s on ``data`` (or seeded generated inputs
    shaped from the reference); returns the report, whatever the verdict."""
    _check_tolerances(rtol, atol)
    seed = check_seed(seed)
    ref, cand = io.open_model(reference, lazy=True), io.open_model(candidate, lazy=True)
    batches = _inputs(ref.model, data, input_shapes, seed)
    fallback = _one_row(ref.model, input_shapes, seed) if data is None else None
    return validate_models(ref.model if ref.path is None else ref.path, cand.model if cand.path is None else cand.path,
                           batches, rtol=rtol, atol=atol, fallback=fallback)
