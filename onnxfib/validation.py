"""Comparing two models' outputs in ONNX Runtime on generated or user-supplied inputs.

Error figures, per output, over every element of every batch (``ref`` = reference output):

- ``max_abs`` = max |cand - ref|;
- ``max_rel`` = max_abs / max |ref|, the worst error relative to the output's own scale (an
  element-wise ratio explodes wherever ``ref`` crosses zero, so it says little);
- an output is ok iff every element satisfies |cand - ref| <= atol * scale + rtol * |ref|, with
  scale = max(1, max |ref|): np.allclose, except that atol is measured in units of the output's
  magnitude when that exceeds 1.

Why scale ``atol``: merging neurons reorders float sums, so an exact (eps = 0) merge moves each
element by a few ulps of the *terms* summed, not of the result; entries near zero in an output
whose typical magnitude is 100 then differ by ~1e-5 absolute. A fixed atol would fail exact
merges of real models purely on the output's units; atol = 1e-5 of the output's scale is still
two orders of magnitude below any real approximation error, and rtol = 1e-5 is invariant 1.
Equal infinities and NaN in the same place in both outputs count as equal (a model whose outputs
are infinite or NaN on some input agrees with itself); any other non-finite difference is an
infinite error.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxfib.errors import InvalidModelError, UsageError
from onnxfib.graph import outer_names
from onnxfib.io import first_line, too_large, write_model
from onnxfib.report import OutputError, ValidationReport
from onnxfib.stats import count_macs

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
#: Default (rtol, atol) of outputs whose dtype rounds more coarsely than float32: about ten units
#: in the last place, since an exact merge reorders sums at the output's own precision.
DTYPE_TOLERANCES = {onnx.TensorProto.FLOAT16: (1e-2, 1e-2), onnx.TensorProto.BFLOAT16: (8e-2, 8e-2)}
#: The most elements one generated batch holds over all inputs (2**26: 512 MB as float64 while
#: drawn); larger declared or requested shapes are refused rather than exhausting memory.
MAX_GENERATED_ELEMENTS = 2**26
#: Generated validation inputs hold this many rows per distribution on an unknown (or a declared
#: fixed) first axis: a verdict on 64 inputs, not 2 ...
VALIDATION_ROWS = 32
#: ... or fewer, as many as keep a generated batch within this many elements (4 MB as float32: a
#: fixed-batch 224x224 image model runs 6 samples per distribution, each a session run).
VALIDATION_ELEMENTS = 2**20
#: ``run_by_layers`` cuts a model after the node at which its sub-model's weights reach this many bytes.
LAYER_BYTES = 64 << 20
#: ``ForwardRun`` keeps a cut of the model over all its pieces up to this many bytes.
CUT_BYTES = 1 << 30

Batch = dict[str, np.ndarray]
Shape = tuple[int | str | None, ...]

_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
_INT = (
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
)
_KINDS = {**{t: "f" for t in _FLOAT}, **{t: "iu" for t in _INT}, onnx.TensorProto.BOOL: "b"}


def graph_inputs(model: onnx.ModelProto) -> dict[str, tuple[int, Shape | None]]:
    """The inputs a caller must feed (initializer-backed ones excluded): name -> (elem_type,
    dims or None when the rank is unknown); a dim is an int, a dim_param name, or None."""
    initializers = {t.name for t in model.graph.initializer}
    result: dict[str, tuple[int, Shape | None]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise UsageError(f"input '{value.name}' is not a tensor; onnxfib cannot feed it")
        tensor = value.type.tensor_type
        shape = None
        if tensor.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
            )
        result[value.name] = (tensor.elem_type, shape)
    return result


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``name:1,64`` (the name may itself contain ':'; ``name:`` is a scalar) into
    (name, shape) with positive dims; UsageError on anything else."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise UsageError(f"malformed --input-shape '{text}': expected NAME:D1,D2,... e.g. input:1,64")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
    except ValueError:
        raise UsageError(f"malformed --input-shape '{text}': dims must be integers, e.g. input:1,64") from None
    if any(d <= 0 for d in shape):
        raise UsageError(f"malformed --input-shape '{text}': dims must be positive")
    return name, shape


def _resolve_shape(name: str, shape: Shape | None, given: tuple[int, ...] | None, rows: int) -> tuple[int, ...]:
    if given is not None:
        if shape is not None and (
            len(given) != len(shape) or any(isinstance(s, int) and s > 0 and s != g for s, g in zip(shape, given))
        ):
            raise UsageError(f"--input-shape for '{name}' is {list(given)} but the model declares {list(shape)}")
        return given
    if shape is None:
        raise UsageError(f"input '{name}' has no declared shape; pass --input-shape {name}:D1,D2,...")
    dims = []
    for axis, dim in enumerate(shape):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif axis == 0:
            dims.append(rows)
        else:
            raise UsageError(
                f"input '{name}' has dynamic axis {axis} ({dim or '?'}); pass --input-shape {name}:D1,D2,..."
            )
    return tuple(dims)


def _widened(inputs: Mapping[str, tuple[int, Shape | None]], given: Mapping[str, tuple[int, ...]], rows: int,
             batch_size: int | None, *, widen_given: bool) -> list[str]:
    """The inputs whose first axis is widened to ``rows``: every input where the model declares a
    fixed ``batch_size`` smaller than ``rows`` (its samples run that many at a time), else each
    input the model leaves dynamic that ``input_shapes`` does not give, or, with
    ``widen_given``, gives shorter (``--input-shape x:1,3,48,192`` names the image size; a search
    still measures on many samples)."""
    if batch_size is not None and batch_size < rows:
        return list(inputs)
    return [name for name, (_, shape) in inputs.items()
            if shape and not (isinstance(shape[0], int) and shape[0] > 0)
            and (name not in given or (widen_given and given[name] and given[name][0] < rows))]


def _measuring_rows(resolved: dict[str, tuple[int, ...]], widened: Sequence[str], rows: int,
                    batch_size: int | None, *, max_elements: int) -> dict[str, tuple[int, ...]]:
    """``resolved`` with the first axis of the ``widened`` inputs made ``rows`` long, or as many
    rows as fit in ``max_elements`` (never fewer than it has; a multiple of a declared
    ``batch_size`` smaller than ``rows``)."""
    if not widened:
        return resolved
    fixed = sum(math.prod(dims) for name, dims in resolved.items() if name not in widened)
    per_row = sum(math.prod(resolved[name][1:]) for name in widened)
    length = min(rows, max(1, (max_elements - fixed) // max(per_row, 1)))
    if batch_size is not None and batch_size < rows:
        length = max(batch_size, length - length % batch_size)
    return {name: (max(dims[0], length), *dims[1:]) if name in widened else dims
            for name, dims in resolved.items()}


#: A budget of multiply-accumulates (``generate_inputs(max_macs=)``) never cuts the rows below this.
FEWEST_BUDGETED_ROWS = 8


def rows_within(model: onnx.ModelProto, resolved: Mapping[str, tuple[int, ...]], widened: Sequence[str],
                 rows: int, max_macs: int) -> int:
    """``rows``, or as many as one run of ``model`` spends at most ``max_macs`` on
    (``stats.count_macs`` of one row: the ``widened`` inputs of ``resolved`` one row long), at
    least ``FEWEST_BUDGETED_ROWS``."""
    per_row = count_macs(model, {name: (1, *dims[1:]) if name in widened else dims for name, dims in resolved.items()})
    if not per_row:
        return rows
    return min(rows, max(FEWEST_BUDGETED_ROWS, max_macs // per_row))


def generate_inputs(
    model: onnx.ModelProto, *, input_shapes: Mapping[str, tuple[int, ...]] | None = None, seed: int = 0,
    rows: int = 1, widen_given: bool = True, max_elements: int | None = None, max_macs: int | None = None,
) -> list[Batch]:
    """Two seeded batches for ``model``'s inputs: floats from N(0, 1), then from U(-1, 1); ints and
    bools in {0, 1} (valid as token ids, type ids and masks alike). Dynamic dims come from
    ``input_shapes``; an unknown first axis is ``rows`` long, and so is one ``input_shapes`` gives
    fewer (with ``widen_given``), or a ``declared_batch`` smaller than ``rows`` (such a model runs
    its samples that many at a time), as far as ``max_elements`` (default
    ``MAX_GENERATED_ELEMENTS``) allows (:func:`_measuring_rows`), and ``max_macs`` (the
    multiply-accumulates of one run, estimated: a search runs its model on the batches again and
    again) at least ``FEWEST_BUDGETED_ROWS``; any other unknown dim, or a batch over
    ``MAX_GENERATED_ELEMENTS`` elements, is a UsageError."""
    inputs = graph_inputs(model)
    given = dict(input_shapes or {})
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise UsageError(f"--input-shape names unknown input(s) {unknown}; the model's inputs are {sorted(inputs)}")
    resolved = {name: _resolve_shape(name, shape, given.get(name), 1) for name, (_, shape) in inputs.items()}
    batch_size = declared_batch(model)
    widened = _widened(inputs, given, rows, batch_size, widen_given=widen_given)
    if max_macs is not None and widened:
        rows = rows_within(model, resolved, widened, rows, max_macs)
        widened = _widened(inputs, given, rows, batch_size, widen_given=widen_given)
    resolved = _measuring_rows(resolved, widened, rows, batch_size,
                               max_elements=MAX_GENERATED_ELEMENTS if max_elements is None else max_elements)
    total = sum(math.prod(dims) for dims in resolved.values())
    if total > MAX_GENERATED_ELEMENTS:
        name, dims = max(resolved.items(), key=lambda item: math.prod(item[1]))
        raise UsageError(
            f"generated inputs would hold {total:,} elements (input '{name}' has shape {list(dims)}), more than "
            f"the {MAX_GENERATED_ELEMENTS:,} onnxfib generates; pass a smaller --input-shape "
            f"{name}:D1,D2,... or your own inputs with --data"
        )
    rng = np.random.default_rng(seed)
    batches: list[Batch] = [{}, {}]
    for name, (elem_type, _) in inputs.items():
        dims = resolved[name]
        if elem_type not in _KINDS:
            raise UsageError(
                f"input '{name}' has type {onnx.TensorProto.DataType.Name(elem_type)}; pass values with --data"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        for index, batch in enumerate(batches):
            if elem_type in _FLOAT:
                values = rng.standard_normal(dims) if index == 0 else rng.uniform(-1.0, 1.0, dims)
            else:
                values = rng.integers(0, 2, dims)
            batch[name] = np.asarray(values).astype(dtype)
    return batches


def declared_batch(model: onnx.ModelProto) -> int | None:
    """The batch every input of ``model`` declares as its fixed first dim, None when an input is a
    scalar, of unknown rank, or has a dynamic or different first dim. Such a model takes any number
    of samples: ``run_tensors`` and ``validate_models`` feed it ``declared_batch`` at a time."""
    firsts = set()
    for _, shape in graph_inputs(model).values():
        if not shape or not isinstance(shape[0], int) or shape[0] <= 0:
            return None
        firsts.add(shape[0])
    return firsts.pop() if len(firsts) == 1 else None


def _lossless(array: np.ndarray, dtype: np.dtype) -> bool:
    """Whether casting ``array`` to ``dtype`` keeps every value (read in slices, so a memory-mapped
    array is never loaded whole)."""
    if np.can_cast(array.dtype, dtype, "safe"):
        return True
    flat = np.ravel(array, order="K")  # a view of C- and Fortran-ordered arrays alike
    step = 1 << 20
    return all(np.array_equal(part.astype(dtype).astype(array.dtype), part)
               for part in (flat[i:i + step] for i in range(0, flat.size, step)))


def _check_dtype(array: np.ndarray, elem_type: int, name: str, source: str) -> None:
    """UsageError unless ``array`` may feed an input of ONNX type ``elem_type``: the same kind of
    values, floats to any float (rounded as always), or integers that the input's type holds exactly."""
    expected = onnx.TensorProto.DataType.Name(elem_type)
    if elem_type not in _KINDS:
        raise UsageError(f"{source}: '{name}' has dtype {array.dtype} but the model expects {expected}")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    kind = array.dtype.kind
    if kind == "f" and dtype.kind == "f":
        return
    if kind == "f" and dtype.kind in "iu":
        raise UsageError(f"{source}: '{name}' holds floats ({array.dtype}) but the model expects {expected} "
                         "(e.g. token ids); pass integers")
    if not (kind == dtype.kind == "b" or (kind in "iu" and dtype.kind in "iuf")):
        raise UsageError(f"{source}: '{name}' has dtype {array.dtype} but the model expects {expected}")
    if not _lossless(array, dtype):
        raise UsageError(f"{source}: '{name}' holds {array.dtype} values that {expected} cannot hold exactly; "
                         f"pass {dtype} data")


def check_data(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], source: str) -> list[Batch]:
    """Check user batches against ``model``'s inputs (same names, rank, fixed dims, a dtype the
    input can take without loss: ``_check_dtype``) and return them with each array in its own
    dtype (cast per run, so memory-mapped data stays mapped); UsageError naming ``source``
    otherwise. A model with a ``declared_batch`` takes any number of samples on the first axis."""
    inputs = graph_inputs(model)
    batch_size = declared_batch(model)
    checked: list[Batch] = []
    for batch in batches:
        if set(batch) != set(inputs):
            raise UsageError(f"{source}: holds inputs {sorted(batch)} but the model's inputs are {sorted(inputs)}")
        out: Batch = {}
        for name, (elem_type, shape) in inputs.items():
            array = np.asarray(batch[name])
            _check_dtype(array, elem_type, name, source)
            fixed = shape if batch_size is None or shape is None else (None, *shape[1:])
            if shape is not None and (
                array.ndim != len(shape)
                or any(isinstance(s, int) and s > 0 and s != a for s, a in zip(fixed, array.shape))
            ):
                declared = [s if isinstance(s, int) and s > 0 else (s or "?") for s in shape]
                many = "" if batch_size is None else " (any number of samples on the first axis)"
                raise UsageError(
                    f"{source}: '{name}' has shape {list(array.shape)} but the model expects {declared}{many}")
            out[name] = array
        if batch_size is not None and (common_rows(out) or 0) < 1:
            raise UsageError(f"{source}: the inputs must hold the same number of samples (at least one) on "
                             f"their first axis; the model runs {batch_size} at a time")
        checked.append(out)
    if not checked:
        raise UsageError(f"{source}: holds no input batches")
    return checked


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz``: members stored uncompressed (``numpy.savez``) memory-mapped,
    compressed ones (``numpy.savez_compressed``) read."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            raw.seek(info.header_offset)
            local = raw.read(30)  # the local file header: its name and extra field lengths end it
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(
                local[28:30], "little")
            raw.seek(start)
            version = np.lib.format.read_magic(raw)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(raw)
            if dtype.hasobject:
                raise ValueError("object arrays need pickle")
            arrays[name] = (np.zeros(shape, dtype) if 0 in shape else
                            np.memmap(path, dtype, "r", raw.tell(), shape, "F" if fortran else "C"))
    return arrays


def data_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The ``.npz``/``.npy`` files ``paths`` name: files as given, a directory's such files in name
    order; UsageError for a path that does not exist or a directory without any."""
    files: list[Path] = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
            if not found:
                raise UsageError(f"{path}: --data directory holds no .npz/.npy files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{path}: --data file not found")
    if not files:
        raise UsageError("--data names no files")
    return files


def load_data(paths: str | os.PathLike | Sequence[str | os.PathLike], model: onnx.ModelProto) -> list[Batch]:
    """One batch per file of ``paths`` (see ``data_files``): ``.npz`` keyed by input name, ``.npy``
    for models with one input, memory-mapped where numpy stored them uncompressed (data larger
    than memory is read batch by batch as the model runs), each checked against ``model`` (see
    ``check_data``); any problem is a one-line UsageError naming the file."""
    names = list(graph_inputs(model))
    batches: list[Batch] = []
    for path in data_files(paths):
        try:
            if zipfile.is_zipfile(path):
                arrays: dict[str | None, np.ndarray] = dict(_npz_arrays(path))
            else:
                arrays = {None: np.load(path, mmap_mode="r", allow_pickle=False)}
        except Exception as exc:
            raise UsageError(
                f"{path}: not a readable .npz/.npy file (arrays saved by numpy.savez or numpy.save)") from exc
        if None in arrays:
            if len(names) != 1:
                raise UsageError(f"{path}: a .npy file feeds one input, but the model has {len(names)}; use .npz")
            arrays = {names[0]: arrays[None]}
        batches += check_data(model, [{str(key): value for key, value in arrays.items()}], str(path))
    return batches


#: A model to run: in memory, or a file (its external data beside it), which ORT reads itself.
ModelFile = onnx.ModelProto | Path


def _skeleton(model: ModelFile) -> onnx.ModelProto:
    """The model's graph (a file's read without its external data)."""
    return model if isinstance(model, onnx.ModelProto) else onnx.load_model(str(model), load_external_data=False)


def _session(model: ModelFile, role: str) -> tuple[ort.InferenceSession, tempfile.TemporaryDirectory | None]:
    """An ORT CPU session; a file is read by ORT itself, models too large for one protobuf go
    through a temporary file."""
    holder = None
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures reach the caller as exceptions; keep stderr clean
    # idle ORT threads must not spin: numpy's BLAS runs between ORT calls (refits) on the same cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # no second, pre-packed copy of every weight: a check runs each model a few times only
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        if isinstance(model, Path):
            return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]), None
        if too_large(model):
            holder = tempfile.TemporaryDirectory()
            target = Path(holder.name) / "model.onnx"
            write_model(model, target, external_data=True)
            return ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"]), holder
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), None
    except Exception as exc:
        if holder is not None:
            holder.cleanup()
        raise InvalidModelError(f"ONNX Runtime cannot load the {role} model: {first_line(exc)}") from exc


def check_runs(model: ModelFile, batch: Mapping[str, np.ndarray] | None = None) -> None:
    """Load ``model`` in ONNX Runtime and, given ``batch``, run it on that batch (whole: a static
    batch axis takes no fewer rows); InvalidModelError naming the input model when ORT cannot
    (the checker accepts some models ORT refuses, e.g. a Conv kernel that disagrees with ``group``)."""
    session, holder = _session(model, "input")
    try:
        if batch is not None:
            session.run(None, dict(batch))
    except Exception as exc:
        raise InvalidModelError(f"ONNX Runtime cannot run the input model: {first_line(exc)}") from exc
    finally:
        if holder is not None:
            holder.cleanup()


def _native(value: object) -> np.ndarray:
    """ORT outputs as arrays of their own dtype; sequences of maps (e.g. ZipMap probabilities)
    become float64 rows."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return np.array([[row[k] for k in sorted(row)] for row in value], dtype=np.float64)
    return np.asarray(value)


def default_tolerances(elem_type: int) -> tuple[float, float]:
    """The default (rtol, atol) of an output of ONNX type ``elem_type``: DEFAULT_RTOL/ATOL, or
    looser ones for float16 and bfloat16 (``DTYPE_TOLERANCES``)."""
    return DTYPE_TOLERANCES.get(elem_type, (DEFAULT_RTOL, DEFAULT_ATOL))


def compare_outputs(name: str, refs: list[np.ndarray], cands: list[np.ndarray], *, rtol: float, atol: float) -> OutputError:
    """Error figures of one output over all batches (see the module docstring)."""
    max_abs, scale, ok = 0.0, 0.0, True
    for ref, cand in zip(refs, cands):
        if ref.shape != cand.shape:
            return OutputError(name, float("inf"), float("inf"), False, rtol, atol)
        same = (cand == ref) | (np.isnan(ref) & np.isnan(cand))  # equal infinities, NaN at NaN
        finite = np.isfinite(ref) & np.isfinite(cand)
        diff = np.full(ref.shape, np.inf)
        # finite differences near the float limits may overflow; masked-out (non-finite) lanes
        # may still raise the invalid flag in numpy's vector loops, and their results are unused
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(cand, ref, out=diff, where=finite)
        diff = np.where(same, 0.0, np.abs(diff))
        finite_ref = np.where(np.isfinite(ref), np.abs(ref), 0.0)
        out_scale = max(1.0, float(finite_ref.max(initial=0.0)))
        ok &= bool(np.all(diff <= atol * out_scale + rtol * finite_ref))
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        scale = max(scale, float(finite_ref.max(initial=0.0)))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputError(name, max_abs, max_rel, ok, rtol, atol)


def _outputs(model: ModelFile, feed: _Feed, names: Sequence[str], inputs: Sequence[Mapping[str, np.ndarray]],
             role: str) -> list[dict[str, np.ndarray]]:
    """The named outputs of ``model`` on every batch (one session, closed before returning), fed
    as ``feed`` (the model's :class:`_Feed`) says, in their own dtypes."""
    session, holder = _session(model, role)
    try:
        return [dict(zip(names, feed.run(session, list(names), batch, role, None))) for batch in inputs]
    finally:
        del session
        if holder is not None:
            holder.cleanup()


def validate_models(
    reference: ModelFile,
    candidate: ModelFile,
    inputs: Sequence[Mapping[str, np.ndarray]],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    mode: str = "full",
    layer_bytes: int = LAYER_BYTES,
    fallback: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> ValidationReport:
    """Run both models in ONNX Runtime (CPU) on every batch, one after the other, and compare
    outputs by name, within ``rtol``/``atol`` or, where None, the defaults of each reference
    output's dtype (``default_tolerances``). ``mode`` "layers" runs each model as a chain of
    sub-models of about ``layer_bytes`` of weights each (``run_by_layers``: at most one layer's
    weights in memory), "full" as whole sessions. ``fallback``: batches to compare on instead
    where ORT cannot run the reference on ``inputs`` (generated inputs of one row, for a model
    that declares a dynamic batch but runs only one sample). InvalidModelError if ORT cannot load
    or run a model; UsageError if their outputs differ in name."""
    ref_graph, cand_graph = _skeleton(reference), _skeleton(candidate)
    ref_names = [o.name for o in ref_graph.graph.output]
    cand_names = [o.name for o in cand_graph.graph.output]
    if sorted(ref_names) != sorted(cand_names):
        raise UsageError(f"the models have different outputs: {ref_names} vs {cand_names}")
    def run(model: ModelFile, graph: onnx.ModelProto, role: str) -> list[dict[str, np.ndarray]]:
        if mode == "layers":
            return run_by_layers(model, ref_names, inputs, role, layer_bytes, graph=graph)
        return _outputs(model, _Feed(graph), ref_names, inputs, role)

    try:
        ref_runs = run(reference, ref_graph, "reference")
    except InvalidModelError:
        if fallback is None:
            raise
        inputs = fallback
        ref_runs = run(reference, ref_graph, "reference")
    cand_runs = run(candidate, cand_graph, "candidate")
    types = {o.name: o.type.tensor_type.elem_type for o in ref_graph.graph.output}
    outputs = []
    for name in ref_names:
        default_rtol, default_atol = default_tolerances(types[name])
        outputs.append(compare_outputs(
            name,
            [r[name] for r in ref_runs],
            [c[name] for c in cand_runs],
            rtol=default_rtol if rtol is None else rtol,
            atol=default_atol if atol is None else atol,
        ))
    samples = sum(common_rows(batch) or 1 for batch in inputs)
    return ValidationReport(outputs=outputs, rtol=rtol, atol=atol, batches=len(inputs), samples=samples, mode=mode)


def common_rows(batch: Mapping[str, np.ndarray]) -> int | None:
    """The length of the first axis all of a batch's inputs share; None when they differ or one
    is a scalar."""
    lengths = {np.shape(v)[0] if np.ndim(v) else None for v in batch.values()}
    return None if len(lengths) != 1 or None in lengths else lengths.pop()


def concatenated(batches: Sequence[Mapping[str, np.ndarray]]) -> Batch:
    """One batch holding the rows of ``batches`` (same inputs, one first axis each) in order."""
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def chunked(batches: Iterable[Mapping[str, np.ndarray]], rows: int = 256) -> Iterator[Batch]:
    """The batches cut along their first axis into pieces of at most ``rows`` (a batch whose
    inputs differ in first-axis length, or are scalars, passes whole)."""
    for batch in batches:
        total = common_rows(batch)
        if total is None:
            yield dict(batch)
            continue
        for start in range(0, max(total, 1), rows):
            yield {name: value[start:start + rows] for name, value in batch.items()}


def run_tensors(model: onnx.ModelProto, names: Sequence[str], batches: Iterable[Mapping[str, np.ndarray]],
                role: str, dtype: type | None = np.float64) -> Iterator[list[np.ndarray]]:
    """For each batch, the named tensors of ``model`` (outputs or intermediate activations) as
    ``dtype`` arrays (None: their own dtypes), computed by ONNX Runtime; InvalidModelError if it
    cannot load or run it."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    listed = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in listed)
    feed = _Feed(probe)
    session, holder = _session(probe, role)
    try:
        for batch in batches:
            yield feed.run(session, list(names), batch, role, dtype)
    finally:
        if holder is not None:
            holder.cleanup()


def prefix(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``model`` cut to the nodes its tensors ``names`` need, which become its only outputs (a
    new model; initializers no kept node reads are left out)."""
    needed = set(names)
    kept: list[onnx.NodeProto] = []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node_reads(node))
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    graph = cut.graph
    del graph.node[:], graph.output[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names))
    return cut


class ForwardRun:
    """A model's tensors on fixed batch ``pieces``, computed forward a segment at a time.

    Each :meth:`tensors` call runs only the nodes its tensors need that no earlier call ran, fed
    with what the earlier calls left: per piece, every tensor that a node not yet run still reads
    (one cut of the model over all pieces, kept while it fits in ``budget`` bytes). The model may
    change between calls in nodes not yet run (a refit's new weights); a call asking for what
    lies behind the cut starts again from the inputs. A model that declares a fixed batch runs
    that many samples at a time (its reshapes may name the batch), the cut kept per chunk, as
    :func:`run_tensors` feeds it. Where a cut would hold an activation that is not a tensor, or
    would not fit, calls run the model cut to their tensors from the inputs (:func:`prefix`): the
    same values, at the cost of the whole prefix each time."""

    def __init__(self, pieces: Sequence[Batch], role: str, *, budget: int = CUT_BYTES) -> None:
        self.pieces = list(pieces)
        self.role = role
        self.budget = budget
        self._whole = False
        self._reset()

    def _reset(self) -> None:
        self._ran: set[str] = set()
        self._kept: list[Batch] | None = None  # per chunk fed, the cut

    def _chunks(self, model: onnx.ModelProto) -> tuple[list[Batch], list[tuple[int, int]], int | None]:
        """The pieces as ``model`` is fed (:func:`fed_chunks`), per chunk its piece and the
        padding rows it carries, and the model's declared batch."""
        feed = _Feed(model)
        chunks, owners = [], []
        for index, piece in enumerate(self.pieces):
            for chunk, short in fed_chunks(feed.cast(piece), feed.size):
                chunks.append(chunk)
                owners.append((index, short))
        return chunks, owners, feed.size

    def tensors(self, model: onnx.ModelProto, names: Sequence[str]) -> Iterator[list[np.ndarray]]:
        """The tensors ``names`` of ``model`` as float64 arrays, a list per piece."""
        names = list(dict.fromkeys(names))
        if self._whole:
            yield from run_tensors(prefix(model, names), names, self.pieces, self.role)
            return
        segment = self._segment(model, names)
        if segment is None:  # it needs nodes that ran, whose tensors are gone
            self._reset()
            segment = self._segment(model, names)
            assert segment is not None, "from the inputs every node is still to run"
        chunks, owners, size = self._chunks(model)
        kept = self._kept if self._kept is not None else chunks
        ran = self._ran | {o for node in segment for o in node.output if o}
        self._reset()  # until every chunk has its new cut
        later = {n for node in model.graph.node if not ran.intersection(node.output) for n in node_reads(node)}
        keep = [n for n in dict.fromkeys([*kept[0], *(o for node in segment for o in node.output if o)])
                if n in later]
        made = [n for n in dict.fromkeys([*names, *keep]) if n not in kept[0]]
        runs = self._run(model, segment, made, kept) if segment else ([] for _ in kept)
        cut: list[Batch] | None = []
        parts: list[list[np.ndarray]] = []
        for index, (old, computed) in enumerate(zip(kept, runs)):
            values = {**old, **dict(zip(made, computed))}
            if index == 0:
                if any(not isinstance(values[n], np.ndarray) for n in keep):
                    runs.close()
                    self._whole = True
                    yield from self.tensors(model, names)
                    return
                if sum(values[n].nbytes for n in keep) * len(kept) > self.budget:
                    cut = None
            if cut is not None:
                cut.append({n: values[n] for n in keep})
                if index == len(kept) - 1:  # before the last yield: a zip may never resume this
                    self._ran, self._kept = ran, cut
            piece, short = owners[index]
            parts.append([_unpadded(np.asarray(values[n]), short, size) for n in names])
            if index == len(kept) - 1 or owners[index + 1][0] != piece:
                yield _joined(parts, np.float64)
                parts = []

    def _segment(self, model: onnx.ModelProto, names: list[str]) -> list[onnx.NodeProto] | None:
        """The nodes, in graph order, that ``names`` need beyond the kept tensors; None when one of
        them ran already (its output dropped)."""
        have = set(self._kept[0]) if self._kept is not None else set(graph_inputs(model))
        have.update(t.name for t in model.graph.initializer)
        producer = {o: node for node in model.graph.node for o in node.output if o}
        needed: dict[int, onnx.NodeProto] = {}
        stack = [n for n in names if n not in have]
        while stack:
            node = producer.get(stack.pop())
            if node is None or id(node) in needed:
                continue
            if self._ran.intersection(node.output):
                return None
            needed[id(node)] = node
            stack.extend(n for n in node_reads(node) if n not in have)
        return [node for node in model.graph.node if id(node) in needed]

    def _run(self, model: onnx.ModelProto, segment: list[onnx.NodeProto], names: list[str],
             kept: list[Batch]) -> Generator[list[object], None, None]:
        """The tensors ``names`` of the sub-model of ``segment`` fed from ``kept``, per piece."""
        initializers = {t.name: t for t in model.graph.initializer}
        sub, feeds = sub_model(model, segment, names, initializers, kept[0])
        session, holder = _session(sub, self.role)
        try:
            for piece in kept:
                try:
                    yield session.run(names, {n: piece[n] for n in feeds})
                except Exception as exc:
                    raise InvalidModelError(f"ONNX Runtime cannot run the {self.role} model: {first_line(exc)}") from exc
        finally:
            del session
            if holder is not None:
                holder.cleanup()


def fed_chunks(batch: Mapping[str, np.ndarray], size: int | None) -> Iterator[tuple[Batch, int]]:
    """``batch`` as a model declaring a fixed batch of ``size`` is fed, with the padding rows of
    each chunk: whole where ``size`` is None, the inputs share no first axis or it holds ``size``
    rows; otherwise ``size`` samples at a time, the last chunk padded with copies of its last
    sample."""
    rows = None if size is None else common_rows(batch)
    if size is None or rows is None or rows == size:
        yield dict(batch), 0
        return
    for start in range(0, rows, size):
        chunk = {name: value[start:start + size] for name, value in batch.items()}
        short = size - min(size, rows - start)
        if short:
            chunk = {name: np.concatenate([value, np.repeat(value[-1:], short, axis=0)])
                     for name, value in chunk.items()}
        yield chunk, short


def _unpadded(value: np.ndarray, short: int, size: int | None) -> np.ndarray:
    """A chunk's tensor without the rows its ``short`` padding samples gave (a UsageError where
    its first axis is not the chunk's ``size`` samples)."""
    if not short:
        return value
    if value.ndim == 0 or len(value) != size:
        raise UsageError("the model runs a fixed number of samples at a time and some of its tensors "
                         "have no batch axis; give a multiple of that many samples")
    return value[:len(value) - short]


def _joined(chunks: Sequence[Sequence[np.ndarray]], dtype: type | None = None) -> list[np.ndarray]:
    """The tensors of a batch's chunks joined along their first axis (stacked where scalar), as
    ``dtype`` when given (cast in the one copy that joins them)."""
    if len(chunks) == 1:
        return [np.asarray(value, dtype=dtype) for value in chunks[0]]
    return [np.concatenate(parts, dtype=dtype, casting="unsafe") if parts[0].ndim
            else np.stack(parts, dtype=dtype, casting="unsafe") for parts in zip(*chunks)]


class _Feed:
    """How batches go into a model's session: each input cast to its declared dtype and, for a
    model with a ``declared_batch``, ``size`` samples at a time."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.dtypes = {name: onnx.helper.tensor_dtype_to_np_dtype(elem_type) if elem_type in _KINDS else None
                       for name, (elem_type, _) in graph_inputs(model).items()}
        self.size = declared_batch(model)

    def cast(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` with every input as the model declares its dtype."""
        return {name: np.ascontiguousarray(value, dtype=self.dtypes.get(name)) for name, value in batch.items()}

    def run(self, session: ort.InferenceSession, names: list[str], batch: Mapping[str, np.ndarray],
            role: str, dtype: type | None = np.float64) -> list[np.ndarray]:
        """The named tensors on ``batch`` as ``dtype`` arrays (None: their own dtypes). With a declared batch the samples go in
        ``size`` at a time, the last chunk padded with copies of its last sample, and the chunks'
        tensors are joined along their first axis (the padding's rows dropped; a tensor without
        that axis cannot be cut, a UsageError). InvalidModelError if ORT cannot run the model."""
        return _joined([[_unpadded(_native(v), short, self.size) for v in self._run(session, names, chunk, role)]
                        for chunk, short in fed_chunks(batch, self.size)], dtype)

    def _run(self, session: ort.InferenceSession, names: list[str], batch: Mapping[str, np.ndarray],
             role: str) -> list:
        try:
            return session.run(names, self.cast(batch))
        except Exception as exc:
            raise InvalidModelError(f"ONNX Runtime cannot run the {role} model: {first_line(exc)}") from exc
def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's values from its dims and type (nothing read or serialized)."""
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return math.prod(tensor.dims) * itemsize


def layers(model: onnx.ModelProto, layer_bytes: int = LAYER_BYTES) -> list[list[onnx.NodeProto]]:
    """The main graph's nodes in their (topological) order, cut after every node at which the
    weights read since the last cut reach ``layer_bytes``."""
    sizes = {t.name: _tensor_nbytes(t) for t in model.graph.initializer}
    layers: list[list[onnx.NodeProto]] = [[]]
    weights = 0
    seen: set[str] = set()
    for node in model.graph.node:
        layers[-1].append(node)
        for name in node_reads(node):
            if name in sizes and name not in seen:
                seen.add(name)
                weights += sizes[name]
        if weights >= layer_bytes:
            layers.append([])
            weights, seen = 0, set()
    return [layer for layer in layers if layer]


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The names a node reads: its inputs and what its subgraphs read from the outer scope."""
    subgraphs = [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]
    return [n for n in node.input if n] + sorted(set().union(*(outer_names(g) for g in subgraphs)))


def sub_model(model: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: Sequence[str],
              initializers: Mapping[str, onnx.TensorProto], values: Mapping[str, object]
              ) -> tuple[onnx.ModelProto, list[str]]:
    """The model of ``nodes`` (in order) computing ``outputs``, with the initializers they read,
    and the names it is fed: the other tensors they read from outside, each typed like its entry
    in ``values`` (every axis of unknown size; a missing or non-tensor entry is the caller's to
    refuse before running it)."""
    made = {o for node in nodes for o in node.output if o}
    reads = list(dict.fromkeys(n for node in nodes for n in node_reads(node) if n not in made))
    feeds = [n for n in reads if n not in initializers]
    typed = [n for n in feeds if isinstance(values.get(n), np.ndarray)]
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, f"{model.graph.name}_part",
                               [_value_info(n, np.asarray(values[n])) for n in typed],
                               [onnx.ValueInfoProto(name=n) for n in outputs],
                               [initializers[n] for n in reads if n in initializers]),
        opset_imports=model.opset_import, ir_version=max(model.ir_version, 4), functions=model.functions)
    return sub, feeds


def _value_info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    """A graph input typed like ``value``, every axis of unknown size."""
    dims = [f"{name}_d{axis}" for axis in range(value.ndim)]
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), dims)


def run_by_layers(model: ModelFile, names: Sequence[str], inputs: Sequence[Mapping[str, np.ndarray]],
                  role: str, layer_bytes: int = LAYER_BYTES, *, graph: onnx.ModelProto | None = None
                  ) -> list[dict[str, np.ndarray]]:
    """The named outputs of ``model`` on every batch, computed one layer at a time: the graph is cut
    into sub-models of about ``layer_bytes`` of weights each (``layers``), each written to a
    temporary file with only its own weights and run on the activations the earlier ones computed,
    which are dropped once no later layer reads them. The same values as one whole session, with at
    most one layer's weights in memory. Models whose outputs are not all computed by nodes, whose
    activations are not all tensors, or that declare a fixed batch (their reshapes may name it) run
    whole. ``graph`` is the model read without its external data, where the caller has it."""
    graph = _skeleton(model) if graph is None else graph
    source = model.resolve().parent if isinstance(model, Path) else None
    initializers = {t.name: t for t in graph.graph.initializer}
    produced = {name for node in graph.graph.node for name in node.output}
    feed = _Feed(graph)
    if any(name not in produced for name in names) or feed.size is not None:
        return _outputs(model, feed, names, inputs, role)
    parts = layers(graph, layer_bytes)
    later: list[set[str]] = [set(names)]  # later[i]: read by parts after i, or asked for
    for layer in reversed(parts[1:]):
        later.insert(0, later[0] | {n for node in layer for n in node_reads(node)})
    values: list[dict[str, np.ndarray]] = [feed.cast(batch) for batch in inputs]
    with tempfile.TemporaryDirectory() as tmp:
        for layer, needed in zip(parts, later):
            outs = [n for n in dict.fromkeys(o for node in layer for o in node.output) if n in needed]
            if not outs:
                continue
            sub, feeds = sub_model(graph, layer, outs, initializers, values[0])
            if any(not isinstance(values[0].get(n), np.ndarray) for n in feeds):
                return _outputs(model, feed, names, inputs, role)
            target = Path(tmp) / "layer.onnx"
            write_model(sub, target, external_data=True, source=source)
            sub_feed = _Feed(sub)
            del sub
            pieces = [{n: v[n] for n in feeds} for v in values]
            for batch, got in zip(values, _outputs(target, sub_feed, outs, pieces, role)):
                batch.update(got)
                for name in [n for n in batch if n not in needed]:
                    del batch[name]
    return [{name: batch[name] for name in names} for batch in values]
