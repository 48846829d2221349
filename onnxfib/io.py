"""Reading, checking and atomically writing ONNX models (with external data when needed)."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
import onnx
from onnx import external_data_helper

from onnxfib._version import __version__
from onnxfib.errors import InternalError, InvalidModelError, UsageError

#: Serialized models at or above this size must keep their tensors in an external data file.
PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF

#: Tensors of at least this many bytes go to the external data file (onnx's own default).
EXTERNAL_THRESHOLD = 1024
#: Tensor bytes held inline from which ``open_model(lazy=True, spill=)`` streams a model (its
#: tensors moved to external data in the spill directory) instead of holding it in memory.
STREAM_INLINE_BYTES = 64 << 20
#: The name of that working copy in the spill directory.
SOURCE_MODEL = "source.onnx"
#: Tensors of at least this many bytes start at a page boundary of the data file, so that readers
#: (numpy, ONNX Runtime) can map them instead of copying them.
ALIGNED_BYTES = 1 << 20
_PAGE = 4096
_COPY_CHUNK = 16 << 20

ModelSource = str | os.PathLike | onnx.ModelProto


class LoadedModel(NamedTuple):
    """A checked model, the file it came from (None when given in memory; for an inline model
    streamed through a spill directory, its working copy there), whether the input kept its
    tensors in external data, every file it was read from (model and data files) and, when its
    tensors were left on disk (``open_model(lazy=True)``), the directory their locations are
    relative to."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool
    files: tuple[Path, ...] = ()
    directory: Path | None = None


class Storage(NamedTuple):
    """Where the tensors of a lazily loaded model live (``source``: the directory its external data
    locations are relative to; absolute locations are read as they are) and a private directory
    (``scratch``) for tensors written while compressing it."""

    source: Path
    scratch: Path


def mapped(tensor: onnx.TensorProto, directory: Path) -> np.ndarray | None:
    """A read-only memory map of an external tensor's values (relative locations resolved against
    ``directory``); None where numpy cannot map it (a dtype numpy does not hold natively, a length
    that disagrees with the shape, a missing file)."""
    info = external_data_helper.ExternalDataInfo(tensor)
    dtype = _numpy_dtype(tensor)
    if dtype is None:
        return None
    dtype = dtype.newbyteorder("<")
    shape = tuple(int(d) for d in tensor.dims)
    length = math.prod(shape) * dtype.itemsize
    if dtype.kind not in "biuf" or (info.length and info.length != length) or length == 0:
        return None
    try:
        return np.asarray(np.memmap(directory / info.location, dtype=dtype, mode="r",
                                    offset=info.offset or 0, shape=shape))
    except (OSError, ValueError):
        return None


def external_ref(name: str, values: np.ndarray, location: Path, offset: int) -> onnx.TensorProto:
    """A tensor named ``name`` whose ``values`` (their dtype and shape) are stored at ``offset`` of the
    file ``location`` (an absolute path: only onnxfib's own writer reads such a tensor)."""
    tensor = onnx.TensorProto(name=name, dims=values.shape,
                              data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype))
    _locate(tensor, str(location), offset, values.nbytes)
    return tensor


def _locate(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Record that ``tensor``'s values are ``length`` bytes at ``offset`` of ``location`` (its
    in-memory bytes, if any, dropped)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _aligned_end(handle, length: int) -> int:
    """Move ``handle`` (an open binary file) to its end, padded to a page boundary when ``length``
    bytes of at least ALIGNED_BYTES are to follow; returns that offset."""
    handle.seek(0, os.SEEK_END)
    offset = handle.tell()
    if length >= ALIGNED_BYTES and offset % _PAGE:
        handle.write(b"\0" * (_PAGE - offset % _PAGE))
        offset = handle.tell()
    return offset


def append_aligned(handle, data: bytes | memoryview) -> int:
    """Write ``data`` at the end of ``handle`` (see ``_aligned_end``); returns where it starts."""
    offset = _aligned_end(handle, len(data))
    handle.write(data)
    return offset


def first_line(exc: BaseException) -> str:
    """An exception's message (its type when empty) on one line, capped at 300 characters."""
    line = " ".join(str(exc).split()) or type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def as_path(value: object, what: str) -> Path:
    """``value`` as a Path when it is a str or os.PathLike naming a str path; UsageError otherwise."""
    try:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    except TypeError:  # a PathLike whose path is bytes
        pass
    raise UsageError(f"{what} must be a str or os.PathLike path, got {type(value).__name__}")


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``model``: initializers and tensor attributes (Constant values)
    of the graph, of its subgraphs (If/Loop/Scan bodies) and of its local functions."""

    def in_graph(graph: onnx.GraphProto | onnx.FunctionProto) -> Iterator[onnx.TensorProto]:
        if isinstance(graph, onnx.GraphProto):
            yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    yield from in_graph(attribute.g)
                for subgraph in attribute.graphs:
                    yield from in_graph(subgraph)

    yield from in_graph(model.graph)
    for function in model.functions:
        yield from in_graph(function)


def has_external(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` keeps its values in external data (not loaded)."""
    return any(external_data_helper.uses_external_data(t) for t in all_tensors(model))


def stored_bytes(model: onnx.ModelProto) -> int:
    """The model's size as stored: its serialized size plus the bytes of its tensors kept in
    external data."""
    return model.ByteSize() + sum(external_data_helper.ExternalDataInfo(t).length or 0
                                  for t in all_tensors(model) if external_data_helper.uses_external_data(t))


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data the main graph holds in memory: initializers' and Constant nodes'
    values (raw ones as their shape and type declare, which the checker holds them to; typed
    ones; external data not loaded counts nothing), read off the tensors without serializing
    the model."""
    tensors = list(model.graph.initializer) + [
        attribute.t for node in model.graph.node if node.op_type == "Constant"
        for attribute in node.attribute if attribute.HasField("t")]
    total = 0
    for tensor in tensors:
        if tensor.HasField("raw_data"):  # from its shape: reading raw_data (or ByteSize) copies it
            total += _declared_bytes(tensor)
        else:
            total += 8 * max(len(tensor.float_data), len(tensor.int32_data), len(tensor.int64_data),
                             len(tensor.double_data), len(tensor.uint64_data)) + sum(map(len, tensor.string_data))
    return total


def _numpy_dtype(tensor: onnx.TensorProto) -> np.dtype | None:
    """The numpy dtype of ``tensor``'s values; None for a type numpy does not hold."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        return None


def _declared_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes of a raw tensor's values as its shape and type declare them (sub-byte types
    counted a byte each); the bytes themselves where numpy has no such type."""
    dtype = _numpy_dtype(tensor)
    return len(tensor.raw_data) if dtype is None else math.prod(tensor.dims) * dtype.itemsize


def too_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` cannot be serialized as a single protobuf (2 GB limit). Decided from
    its tensor bytes where they settle it (at least the limit, or under half of it: the rest of
    a model is never a gigabyte), serializing only in between (``ByteSize`` walks the model)."""
    data = tensor_bytes(model)
    if data >= PROTOBUF_LIMIT or data < PROTOBUF_LIMIT // 2:
        return data >= PROTOBUF_LIMIT
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


def open_model(source: ModelSource, *, lazy: bool = False, spill: Path | None = None) -> LoadedModel:
    """Load ``source`` (a path, or a ModelProto that is copied, never modified) with its external
    data in memory (with ``lazy``, left on disk: ``LoadedModel.directory`` says where) and pass it
    through the full checker; any failure raises InvalidModelError (UsageError for a source of
    another type). With ``lazy`` and a directory ``spill``, a file holding at least
    ``STREAM_INLINE_BYTES`` of tensors inline is streamed too: its tensors are written once to
    ``spill / SOURCE_MODEL`` with external data, and that copy is what ``path`` and
    ``directory`` name (``files`` still name the input)."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        try:
            _check(model, None)
        except Exception as exc:  # the checker raises several unrelated types
            raise InvalidModelError(f"model fails the ONNX checker: {first_line(exc)}") from exc
        return LoadedModel(model, None, False)
    if not isinstance(source, (str, os.PathLike)):
        hint = " (serialized bytes: onnx.load_model_from_string)" if isinstance(source, (bytes, bytearray)) else ""
        raise UsageError(f"the model must be a path or an onnx.ModelProto, got {type(source).__name__}{hint}")
    path = as_path(source, "the model (a path or an onnx.ModelProto)")
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
        for t in all_tensors(model)
        if external_data_helper.uses_external_data(t)
    }
    external = bool(data_files)
    streamed = lazy and spill is not None and not external and tensor_bytes(model) >= STREAM_INLINE_BYTES
    if streamed and spill is not None:  # written out before the checker reads the file again
        copy = spill / SOURCE_MODEL
        try:
            model = write_model(model, copy, external_data=True)  # the proto read from the file goes
        except OSError as exc:
            raise UsageError(f"cannot write the input's working copy ({first_line(exc)})") from exc
    try:  # the working copy, when there is one, holds the same model with its large bytes moved out
        if streamed and spill is not None:
            _check(model, copy)
            _check_moved_lengths(model)  # what the checker would have found in the moved bytes
        else:
            _check(model, path)
    except Exception as exc:
        raise InvalidModelError(f"{path}: model fails the ONNX checker: {first_line(exc)}") from exc
    if streamed and spill is not None:
        return LoadedModel(model, copy, False, (path,), spill)
    if external and lazy:
        try:
            _check_regions(model, path.resolve().parent)
        except (OSError, ValueError) as exc:
            raise InvalidModelError(f"{path}: cannot read its external data ({first_line(exc)})") from exc
        return LoadedModel(model, path, external, (path, *sorted(data_files)), path.resolve().parent)
    try:
        if external:
            external_data_helper.load_external_data_for_model(model, str(path.resolve().parent))
    except Exception as exc:
        raise InvalidModelError(f"{path}: cannot read its external data ({first_line(exc)})") from exc
    return LoadedModel(model, path, external, (path, *sorted(data_files)))


def _value_bits(dtype: np.dtype) -> int:
    """Bits one value of ``dtype`` takes in raw data: 2, 4 and 6-bit types pack several to a byte."""
    if dtype.itemsize == 1:
        for info in (ml_dtypes.iinfo, ml_dtypes.finfo):
            with contextlib.suppress(TypeError, ValueError):
                return int(info(dtype).bits)
    return 8 * dtype.itemsize


def _check_moved_lengths(model: onnx.ModelProto) -> None:
    """ValueError where a tensor ``write_model`` moved to external data holds fewer bytes than
    its shape and type need (sub-byte types packed), as the checker finds for inline bytes."""
    for tensor in all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        dtype = _numpy_dtype(tensor)
        if dtype is None:
            continue
        needed = -(-math.prod(tensor.dims) * _value_bits(dtype) // 8)
        length = external_data_helper.ExternalDataInfo(tensor).length or 0
        if length < needed:
            raise ValueError(f"TensorProto (tensor name: {tensor.name}) raw_data size ({length} bytes) is too "
                             f"small for the declared shape and type ({needed} bytes)")


def _check_regions(model: onnx.ModelProto, directory: Path) -> None:
    """ValueError unless every external tensor's bytes lie inside its data file (what loading it
    would find out), without reading them."""
    for tensor in all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        size = (directory / info.location).stat().st_size
        offset, length = info.offset or 0, info.length
        dtype = _numpy_dtype(tensor)
        if not length and dtype is not None:  # a type numpy lacks: the offset only
            length = math.prod(tensor.dims) * dtype.itemsize
        if offset + (length or 0) > size:
            raise ValueError(f"tensor '{tensor.name}' needs bytes {offset} to {offset + (length or 0)} of "
                             f"{info.location}, which holds {size}")


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
    out = as_path(path, "the output path")
    _refuse_input(out, protect)
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{out}: output directory {parent} does not exist or is not a directory")
    if out.is_dir():
        raise UsageError(f"{out}: output path is a directory")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{out}: output directory {parent} is not writable")
    return out


def _shallow(message, skip: str):
    """A copy of a protobuf ``message`` without its field ``skip``."""
    return _fields(message, lambda field: field.name != skip)


def _fields(message, keep):
    """A copy of a protobuf ``message`` holding only the fields ``keep(field descriptor)`` takes."""
    copy = type(message)()
    for field in message.DESCRIPTOR.fields:  # values are read only where kept (a read copies bytes)
        if not keep(field) or not (len(getattr(message, field.name)) if field.is_repeated
                                   else message.HasField(field.name)):
            continue
        value = getattr(message, field.name)
        if field.is_repeated:
            getattr(copy, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(copy, field.name).CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy


def _copy_region(source: Path, offset: int, length: int, handle) -> int:
    """Append ``length`` bytes of ``source`` from ``offset`` to ``handle`` (aligned as
    ``append_aligned``), a chunk at a time; returns where they start."""
    start = _aligned_end(handle, length)
    _copy_bytes(source, offset, length, handle)
    return start


def _copy_bytes(source: Path, offset: int, length: int, handle) -> None:
    """Write ``length`` bytes of ``source`` from ``offset`` to ``handle``, a chunk at a time."""
    with open(source, "rb") as src:
        src.seek(offset)
        remaining = length
        while remaining:
            chunk = src.read(min(remaining, _COPY_CHUNK))
            if not chunk:
                raise OSError(f"{source}: shorter than its tensors say")
            handle.write(chunk)
            remaining -= len(chunk)


def _varint(value: int) -> bytes:
    """``value`` (non-negative) as a protobuf base-128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(number: int, length: int) -> bytes:
    """The key and length that open a length-delimited protobuf field ``number`` of ``length``
    bytes (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


def _inline_parts(tensor: onnx.TensorProto, source: Path) -> tuple[bytes, Path, int, int, bytes]:
    """An external tensor inline, in pieces: its fields before ``raw_data`` serialized, the file,
    offset and length of its bytes, and its fields after (external_data and data_location
    dropped, as loading the data leaves them)."""
    path, offset, length = _region(tensor, source)
    inline = _fields(tensor, lambda f: f.name not in ("external_data", "data_location", "raw_data"))
    raw = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
    head = _fields(inline, lambda f: f.number < raw).SerializeToString()
    tail = _fields(inline, lambda f: f.number > raw).SerializeToString()
    return head + _delimited(raw, length), path, offset, length, tail


def _region(tensor: onnx.TensorProto, source: Path) -> tuple[Path, int, int]:
    """The file (a relative location resolved against ``source``), offset and length of an
    external tensor's bytes (without a length: to the end of the file)."""
    info = external_data_helper.ExternalDataInfo(tensor)
    path = Path(info.location) if os.path.isabs(info.location) else source / info.location
    offset = info.offset or 0
    return path, offset, info.length or (path.stat().st_size - offset)


def write_inline(model: onnx.ModelProto, target: Path, *, source: Path) -> None:
    """Serialize ``model`` to ``target`` as one protobuf with every tensor inline: the bytes
    ``SerializeToString`` gives once its external data is loaded (locations relative to
    ``source``, or absolute), written a piece at a time, so that no main-graph initializer is
    held in memory whole (their bytes are copied from their files in chunks; other external
    tensors are read in first). ``model`` is not changed."""
    graph_number = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_number = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    rest = _shallow(model, "graph")
    graph = _shallow(model.graph, "initializer")
    rest.graph.CopyFrom(graph)
    if has_external(rest):
        external_data_helper.load_external_data_for_model(rest, str(source))
        graph = rest.graph
    parts = {i: _inline_parts(t, source) for i, t in enumerate(model.graph.initializer)
             if external_data_helper.uses_external_data(t)}
    sizes = [len(parts[i][0]) + parts[i][3] + len(parts[i][4]) if i in parts else t.ByteSize()
             for i, t in enumerate(model.graph.initializer)]
    graph_size = graph.ByteSize() + sum(len(_delimited(init_number, size)) + size for size in sizes)
    with open(target, "wb") as handle:
        handle.write(_fields(rest, lambda f: f.number < graph_number).SerializeToString())
        handle.write(_delimited(graph_number, graph_size))
        handle.write(_fields(graph, lambda f: f.number < init_number).SerializeToString())
        for index, (tensor, size) in enumerate(zip(model.graph.initializer, sizes)):
            handle.write(_delimited(init_number, size))
            if index in parts:
                head, path, offset, length, tail = parts[index]
                handle.write(head)
                _copy_bytes(path, offset, length, handle)
                handle.write(tail)
            else:
                handle.write(tensor.SerializeToString())
        handle.write(_fields(graph, lambda f: f.number > init_number).SerializeToString())
        handle.write(_fields(rest, lambda f: f.number > graph_number).SerializeToString())


def write_model(model: onnx.ModelProto, target: Path, *, external_data: bool,
                location: str | None = None, source: Path | None = None,
                size_threshold: int = EXTERNAL_THRESHOLD, in_place: bool = False) -> onnx.ModelProto:
    """Serialize to ``target`` (not atomic); external data goes to ``location`` beside it (default
    ``<target name>.data``), one tensor at a time: main-graph initializers of at least
    ``size_threshold`` bytes held in memory, and every tensor already stored externally (read from
    its location relative to ``source``, or absolute). With ``in_place``, a tensor stored in a
    file of ``target``'s own directory is not copied: the model reads it where it lies. Returns the
    proto as written (tensors moved out of it); ``model`` is not changed."""
    if not external_data:
        onnx.save_model(model, str(target), format="protobuf")
        return model
    location = location or target.name + ".data"
    written = onnx.ModelProto()
    written.CopyFrom(_shallow(model, "graph"))
    written.graph.CopyFrom(_shallow(model.graph, "initializer"))
    with open(target.parent / location, "wb") as handle:
        def store(tensor: onnx.TensorProto) -> None:
            if external_data_helper.uses_external_data(tensor):
                path, offset, length = _region(tensor, source or target.parent)
                if in_place and path.resolve().parent == target.parent.resolve():
                    _locate(tensor, path.name, offset, length)
                else:
                    _locate(tensor, location, _copy_region(path, offset, length, handle), length)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= size_threshold:
                _locate(tensor, location, append_aligned(handle, tensor.raw_data), len(tensor.raw_data))

        for tensor in model.graph.initializer:  # one tensor's bytes in memory at a time
            copy = written.graph.initializer.add()
            raw = tensor.raw_data if tensor.HasField("raw_data") else None  # each read copies
            if raw is not None and len(raw) >= size_threshold:
                # the bytes go straight to the file: copied into ``written`` they would stay in
                # its memory (protobuf frees a cleared field only with the whole message)
                copy.CopyFrom(_shallow(tensor, "raw_data"))
                _locate(copy, location, append_aligned(handle, raw), len(raw))
            else:
                copy.CopyFrom(tensor)
                store(copy)
        others = itertools.islice(all_tensors(written), len(written.graph.initializer), None)
        for tensor in others:  # tensors in nodes' attributes stay inline unless stored externally
            if external_data_helper.uses_external_data(tensor):
                store(tensor)
        empty = handle.tell() == 0
    if empty:
        (target.parent / location).unlink()
    onnx.save_model(written, str(target), format="protobuf")
    return written


#: Temporary files and directories beside an output are named ``.onnxfib-<pid>-...``.
_TEMPORARY = re.compile(r"^\.onnxfib-(\d+)-")


def _temporary_prefix() -> str:
    return f".onnxfib-{os.getpid()}-"


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temporaries(directory: Path) -> None:
    """Remove the temporary files of onnxfib runs in ``directory`` whose process is gone: a run
    killed by SIGKILL cannot clean up, so the next write into the directory does."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _previous_reads(out: Path) -> set[str]:
    """The external data files the model now at ``out`` reads, as far as replacing it needs to
    know: whether it reads ``<out>.data``. Where that file does not exist (or ``out`` does not,
    or cannot be read) the answer is empty without parsing ``out`` (a large inline model would
    cost a full read)."""
    if not (out.exists() and out.with_name(out.name + ".data").exists()):
        return set()
    try:
        model = onnx.load_model(str(out), format="protobuf", load_external_data=False)
    except Exception:  # a corrupt or foreign file: nothing of it to keep consistent
        return set()
    return {
        os.path.normpath(external_data_helper.ExternalDataInfo(t).location)
        for t in all_tensors(model)
        if external_data_helper.uses_external_data(t)
    }


def _seal(path: Path) -> None:
    """Give ``path`` the umask's mode (onnx writes data files 0600) and sync it to disk."""
    os.chmod(path, _new_file_mode())
    _fsync(path)


def _relocated(written: onnx.ModelProto, location: str) -> bytes:
    """``written`` (tensors already external) serialized with its data file renamed ``location``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(written)
    for tensor in all_tensors(copy):
        if external_data_helper.uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
    return copy.SerializeToString()


def _install_external(model: onnx.ModelProto, out: Path, tmp: Path, protect: tuple, source: Path | None,
                      size_threshold: int) -> None:
    """Write ``model`` with external data over ``out`` so that at every instant the pair on disk
    is wholly old or wholly new. Where the existing ``out`` reads ``<out>.data``, that file cannot
    be replaced first, so the new data goes under a unique name ``<out>.<12 hex>.data`` and the
    new model, reading it, is renamed over ``out``; then a copy of the data replaces
    ``<out>.data`` (read by no model now), a model reading ``<out>.data`` is renamed over ``out``,
    and the unique file is removed (a hard link would save the copy, but onnx refuses data files
    with several links). A run killed in between leaves a consistent pair and a unique file that
    the next save of ``out`` removes."""
    parent, data_name = out.parent, out.name + ".data"
    read_before = _previous_reads(out)
    busy = data_name in read_before
    name = f"{out.name}.{secrets.token_hex(6)}.data" if busy else data_name
    written = write_model(model, tmp / out.name, external_data=True, location=name, source=source,
                          size_threshold=size_threshold)
    for path in tmp.iterdir():
        _seal(path)
    has_data = (tmp / name).exists()  # absent when every tensor is under the size threshold
    if has_data:
        os.replace(tmp / name, parent / name)  # read by no model yet (the old one reads others)
    try:
        os.replace(tmp / out.name, out)  # the switch: from here on the pair is wholly new
    except BaseException:
        if has_data:
            (parent / name).unlink(missing_ok=True)
        raise
    if busy and has_data:  # back to the usual name (onnx refuses hard-linked data: a copy)
        shutil.copyfile(parent / name, tmp / data_name)
        (tmp / out.name).write_bytes(_relocated(written, data_name))
        _seal(tmp / data_name)
        _seal(tmp / out.name)
        os.replace(tmp / data_name, parent / data_name)  # the old data: read by no model now
        os.replace(tmp / out.name, out)
    _remove_unread(out, protect, read_before, {data_name} if has_data else set())  # what ``out`` reads now


def _remove_unread(out: Path, protect: tuple, read_before: set[str], read: set[str]) -> None:
    """Remove the data files of ``out`` that the model now at ``out`` (which reads ``read``) does
    not read: left-over uniquely named ones, and ``<out>.data`` when the model it replaced read
    it (``read_before``); never inputs."""
    pattern = re.compile(re.escape(out.name) + r"\.[0-9a-f]{12}\.data")
    guarded = {Path(p).resolve() for p in protect}
    for entry in os.scandir(out.parent):
        mine = pattern.fullmatch(entry.name) or (entry.name == out.name + ".data" and entry.name in read_before)
        if mine and entry.name not in read and Path(entry.path).resolve() not in guarded:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool,
    protect: Iterable[str | os.PathLike] = (),
    source: Path | None = None,
    size_threshold: int = EXTERNAL_THRESHOLD,
) -> Path:
    """Write ``model`` to ``path`` atomically: files are written in a temporary directory next to
    the target and renamed into place, so the output appears whole or not at all, and a model
    with external data replaces an existing pair wholly (see ``_install_external``). Tensors
    (initializers of at least ``size_threshold`` bytes) go to ``<name>.data`` when
    ``external_data`` is set or the model is too large for one protobuf; otherwise every tensor
    is written inline, those the model keeps in external data (read relative to ``source``)
    streamed in by ``write_inline``. Temporary files of
    killed runs in the directory are removed first. Refuses (UsageError) to overwrite ``protect``,
    to write into a missing/unwritable directory, or a ``size_threshold`` that is not a
    non-negative integer."""
    protect = tuple(protect)
    size_threshold = check_size_threshold(size_threshold)
    out = check_output_path(path, protect=protect)
    use_external = external_data or (stored_bytes(model) >= PROTOBUF_LIMIT if has_external(model) else too_large(model))
    if use_external:
        _refuse_input(out.with_name(out.name + ".data"), protect)
    parent = out.resolve().parent
    target = parent / out.name
    remove_stale_temporaries(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(), dir=parent))
    except OSError as exc:
        raise UsageError(f"{out}: cannot write in its directory ({first_line(exc)})") from exc
    try:
        if use_external:
            _install_external(model, target, tmp, protect, source, size_threshold)
        else:
            read_before = _previous_reads(target)
            if has_external(model):  # its tensors streamed in from their files
                write_inline(model, tmp / out.name, source=source or parent)
            else:
                write_model(model, tmp / out.name, external_data=False)
            _seal(tmp / out.name)
            os.replace(tmp / out.name, target)
            _remove_unread(target, protect, read_before, set())  # every tensor inline
    except OSError as exc:
        raise UsageError(f"{out}: cannot write the output ({first_line(exc)})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_size_threshold(size_threshold: object) -> int:
    """``size_threshold`` (bytes) if it is a non-negative integer; UsageError otherwise."""
    if isinstance(size_threshold, bool) or not isinstance(size_threshold, (int, np.integer)) or size_threshold < 0:
        raise UsageError(f"the external data size threshold must be a non-negative number of bytes, got {size_threshold!r}")
    return int(size_threshold)


def _new_file_mode() -> int:
    """The mode the process's umask gives a new file (0o666 less the umask)."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def _fsync(path: Path) -> None:
    """Flush ``path``'s bytes to disk, so that a rename never exposes a file the OS has not written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``text`` to ``path`` via a temporary file and a rename (UsageError when impossible)."""
    return write_bytes_atomic(path, text.encode("utf-8"), protect=protect)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``data`` to ``path`` via a temporary file, synced to disk and renamed into place, with
    the mode the umask gives any new file (UsageError when impossible)."""
    out = check_output_path(path, protect=protect)
    try:
        remove_stale_temporaries(out.resolve().parent)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(), dir=out.resolve().parent)
    except OSError as exc:
        raise UsageError(f"{out}: cannot write in its directory ({first_line(exc)})") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), _new_file_mode())  # mkstemp makes 0600 files
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise UsageError(f"{out}: cannot write ({first_line(exc)})") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


#: The file a streamed compression writes its model to, inside ``Storage.scratch``.
SCRATCH_MODEL = "model.onnx"


def finalize_model(model: onnx.ModelProto, *, eps: float, symmetry: str,
                   storage: Storage | None = None) -> onnx.ModelProto:
    """Record the run's settings in ``metadata_props`` (``onnxfib.*`` keys, replacing old ones),
    then require the full checker and strict shape inference to pass; a failure is an internal
    bug and raises InternalError. Modifies and returns ``model``; with ``storage`` (a model whose
    tensors are on disk) the model is first written to ``storage.scratch / SCRATCH_MODEL`` with
    its data beside it (tensors already in scratch read where they lie), checked from there, and
    returned as written (data relative to scratch)."""
    settings = {"onnxfib.version": __version__, "onnxfib.eps": repr(float(eps)), "onnxfib.symmetry": symmetry}
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **settings})
    target = None if storage is None else storage.scratch / SCRATCH_MODEL
    try:
        if storage is not None and target is not None:
            model = write_model(model, target, external_data=True, source=storage.source, in_place=True)
            onnx.checker.check_model(str(target), full_check=True)  # strict shape inference included
        else:
            _check(model, None)
            if not too_large(model):
                onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except OSError as exc:
        raise UsageError(f"cannot write the compressed model's working copy ({first_line(exc)})") from exc
    except Exception as exc:
        raise InternalError(
            f"internal error: the compressed model is not valid ONNX ({first_line(exc)}); "
            "please report this with the input model"
        ) from exc
    return model
