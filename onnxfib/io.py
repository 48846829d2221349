"""Reading, checking and atomically writing ONNX models (with external data when needed)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import onnx
from onnx import external_data_helper

from onnxfib._version import __version__
from onnxfib.errors import InternalError, InvalidModelError, UsageError

#: Serialized models at or above this size must keep their tensors in an external data file.
PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF

#: Tensors of at least this many bytes go to the external data file (onnx's own default).
EXTERNAL_THRESHOLD = 1024

ModelSource = str | os.PathLike | onnx.ModelProto


class LoadedModel(NamedTuple):
    """A checked model, the file it came from (None when given in memory), whether that file kept
    its tensors in external data, and every file it was read from (model and data files)."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool
    files: tuple[Path, ...] = ()


def first_line(exc: BaseException) -> str:
    """An exception's message (its type when empty) on one line, capped at 300 characters."""
    line = " ".join(str(exc).split()) or type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def too_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` cannot be serialized as a single protobuf (2 GB limit)."""
    return model.ByteSize() >= PROTOBUF_LIMIT


def _check(model: onnx.ModelProto, path: Path | None) -> None:
    """Run the full checker on ``path`` (handles external data and > 2 GB) or on ``model``."""
    if path is not None:
        onnx.checker.check_model(str(path), full_check=True)
    elif too_large(model):
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "model.onnx"
            write_model(model, target, external_data=True)
            onnx.checker.check_model(str(target), full_check=True)
    else:
        onnx.checker.check_model(model, full_check=True)


def open_model(source: ModelSource) -> LoadedModel:
    """Load ``source`` (a path, or a ModelProto that is copied, never modified) with its external
    data in memory and pass it through the full checker; any failure raises InvalidModelError."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        try:
            _check(model, None)
        except Exception as exc:  # the checker raises several unrelated types
            raise InvalidModelError(f"model fails the ONNX checker: {first_line(exc)}") from exc
        return LoadedModel(model, None, False)
    path = Path(source)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if not path.is_file():
        raise InvalidModelError(f"{path}: not a regular file")
    try:
        model = onnx.load_model(str(path), format="protobuf", load_external_data=False)
    except Exception as exc:
        raise InvalidModelError(f"{path}: not a readable ONNX model ({first_line(exc)})") from exc
    data_files = {
        path.resolve().parent / external_data_helper.ExternalDataInfo(t).location
        for t in external_data_helper._get_all_tensors(model)  # no public walker in onnx 1.23
        if external_data_helper.uses_external_data(t)
    }
    external = bool(data_files)
    try:
        if external:
            external_data_helper.load_external_data_for_model(model, str(path.resolve().parent))
    except Exception as exc:
        raise InvalidModelError(f"{path}: cannot read its external data ({first_line(exc)})") from exc
    try:
        _check(model, path)
    except Exception as exc:
        raise InvalidModelError(f"{path}: model fails the ONNX checker: {first_line(exc)}") from exc
    return LoadedModel(model, path, external, (path, *sorted(data_files)))


def load_model(source: ModelSource) -> tuple[onnx.ModelProto, Path | None]:
    """Load and check a model (see ``open_model``); returns the model and its file, if any."""
    loaded = open_model(source)
    return loaded.model, loaded.path


def _refuse_input(out: Path, protect: Iterable[str | os.PathLike]) -> None:
    if out.resolve() in {Path(p).resolve() for p in protect}:
        raise UsageError(f"{out}: output path is an input file; choose another output path")


def check_output_path(path: str | os.PathLike, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Return ``path`` if a file may be written there: its directory exists and it is none of the
    (symlink- and relative-path-resolved) input files ``protect``; UsageError otherwise."""
    out = Path(path)
    _refuse_input(out, protect)
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{out}: output directory {parent} does not exist or is not a directory")
    if out.is_dir():
        raise UsageError(f"{out}: output path is a directory")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{out}: output directory {parent} is not writable")
    return out


def write_model(model: onnx.ModelProto, target: Path, *, external_data: bool) -> None:
    """Serialize to ``target`` (not atomic); external data goes to ``<target name>.data`` beside it."""
    if external_data:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving moves tensor bytes out of the proto it is given
        # Mark the tensors ourselves: onnx's save_as_external_data refuses when a file of the
        # data file's name exists in the *working* directory, not next to the model.
        for tensor in copy.graph.initializer:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                external_data_helper.set_external_data(tensor, target.name + ".data")
        onnx.save_model(copy, str(target), format="protobuf")
    else:
        onnx.save_model(model, str(target), format="protobuf")


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``model`` to ``path`` atomically: files are written in a temporary directory next to
    the target and renamed into place, so the output appears whole or not at all. Tensors go to
    ``<name>.data`` when ``external_data`` is set or the model is too large for one protobuf.
    Refuses (UsageError) to overwrite ``protect`` or to write into a missing/unwritable directory."""
    protect = tuple(protect)
    out = check_output_path(path, protect=protect)
    use_external = external_data or too_large(model)
    data_out = out.with_name(out.name + ".data")
    if use_external:
        _refuse_input(data_out, protect)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".onnxfib-", dir=out.resolve().parent))
    except OSError as exc:
        raise UsageError(f"{out}: cannot write in its directory ({first_line(exc)})") from exc
    try:
        write_model(model, tmp / out.name, external_data=use_external)
        if (tmp / data_out.name).exists():  # absent when every tensor is under onnx's 1 KB threshold
            os.replace(tmp / data_out.name, data_out)
        os.replace(tmp / out.name, out)
    except OSError as exc:
        if use_external and not out.exists():
            data_out.unlink(missing_ok=True)
        raise UsageError(f"{out}: cannot write the output ({first_line(exc)})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_text_atomic(path: str | os.PathLike, text: str, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``text`` to ``path`` via a temporary file and a rename (UsageError when impossible)."""
    return write_bytes_atomic(path, text.encode("utf-8"), protect=protect)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``data`` to ``path`` via a temporary file and a rename (UsageError when impossible)."""
    out = check_output_path(path, protect=protect)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxfib-", dir=out.resolve().parent)
    except OSError as exc:
        raise UsageError(f"{out}: cannot write in its directory ({first_line(exc)})") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, out)
    except OSError as exc:
        raise UsageError(f"{out}: cannot write ({first_line(exc)})") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def finalize_model(model: onnx.ModelProto, *, eps: float, symmetry: str) -> onnx.ModelProto:
    """Record the run's settings in ``metadata_props`` (``onnxfib.*`` keys, replacing old ones),
    then require the full checker and strict shape inference to pass; a failure is an internal
    bug and raises InternalError. Modifies and returns ``model``."""
    settings = {"onnxfib.version": __version__, "onnxfib.eps": repr(float(eps)), "onnxfib.symmetry": symmetry}
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **settings})
    try:
        _check(model, None)
        if not too_large(model):
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise InternalError(
            f"internal error: the compressed model is not valid ONNX ({first_line(exc)}); "
            "please report this with the input model"
        ) from exc
    return model
