"""Loading and saving models safely: clear errors in, atomic writes out.

Large models keep their weights in external data; ``onnx_ir`` reads those
lazily (memory-mapped), so only the weight being quantized is resident. Outputs
are written under a lock, in a temp folder, and renamed into place once complete
(:mod:`onnxq.atomic`): all at the end (:func:`save_model`), or while the model is
being quantized (:class:`StreamedSave`: each packed weight is appended to the
output's external data as soon as it exists, and dropped from memory).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir

from onnxq.atomic import commit, output_lock, temp_folder, write_error
from onnxq.errors import OnnxqError

__all__ = ["load_model", "save_model", "check_external_data", "check_output_path", "external_data_files",
           "wants_external_data", "streams_external_data", "StreamedSave", "EXTERNAL_DATA_THRESHOLD", "EXTERNAL_INPUT_KEY",
           "INLINE_BYTES"]

EXTERNAL_DATA_THRESHOLD = 256 * 1024 * 1024
"""Above this many bytes of weights an output is written with external data (``external_data=None``)."""
EXTERNAL_INPUT_KEY = "onnxq.external_input"
"""``model.meta[EXTERNAL_INPUT_KEY]``: set by :func:`load_model` on a model read from external data."""
INLINE_BYTES = 256
"""Tensors of at most this many bytes stay inside the model file (``onnx_ir.save``'s default threshold)."""


def load_model(model: str | os.PathLike | ir.Model | onnx.ModelProto) -> ir.Model:
    """An ``ir.Model`` from a path, a ModelProto or an ``ir.Model`` (returned as is)."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    path = Path(model)
    if not path.exists():
        raise OnnxqError(f"model file not found: {path}")
    if not path.is_file():
        raise OnnxqError(f"model path is not a file: {path}")
    try:
        if path.stat().st_size == 0:
            raise OnnxqError(f"{path} is empty (0 bytes), not an ONNX model")
        loaded = ir.load(path)
    except PermissionError:
        raise OnnxqError(f"cannot read model file {path}: permission denied") from None
    except OnnxqError:
        raise
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise OnnxqError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {exc})") from None
    if loaded.graph is None or (not len(loaded.graph) and not loaded.graph.outputs):
        raise OnnxqError(f"{path} is not a valid ONNX model (it has an empty graph)")
    check_external_data(loaded)
    if next(_external_tensors(loaded), None) is not None:
        loaded.meta[EXTERNAL_INPUT_KEY] = True
    return loaded


def _external_tensors(model: ir.Model) -> Iterator[tuple[str, ir.ExternalTensor, Path]]:
    """``(initializer name, tensor, data file)`` of every initializer kept in external data."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.name, value.const_value, Path(value.const_value.base_dir) / value.const_value.location


def external_data_files(model: ir.Model) -> list[Path]:
    """The files ``model``'s initializers keep their data in (sorted, each once)."""
    return sorted({path for _, _, path in _external_tensors(model)})


def check_external_data(model: ir.Model) -> None:
    """Every external tensor's file exists and holds its bytes (offset + length), before any work is done.

    Raises:
        OnnxqError: one line naming the tensor and the file.
    """
    sizes: dict[Path, int | None] = {}
    for name, tensor, file in _external_tensors(model):
        if file not in sizes:
            sizes[file] = file.stat().st_size if file.is_file() else None
        if sizes[file] is None:
            raise OnnxqError(f"external data file of tensor {name!r} not found: {file}")
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[file]:
            raise OnnxqError(f"external data file {file} is truncated: tensor {name!r} needs bytes up to "
                             f"{end}, the file has {sizes[file]}")


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def wants_external_data(model: ir.Model) -> bool:
    """What ``external_data=None`` (``--external-data auto``) decides: external data when the model was
    read from external data (:func:`load_model`), still holds tensors there, or its weights exceed
    :data:`EXTERNAL_DATA_THRESHOLD` (256 MiB). Weights are then written one at a time; an embedded
    output is serialized whole, in memory."""
    return (bool(model.meta.get(EXTERNAL_INPUT_KEY)) or next(_external_tensors(model), None) is not None
            or _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD)


def streams_external_data(model: ir.Model, external_data: bool | None) -> bool:
    """Whether an output of ``model`` gets external data, known before it is quantized: ``True``, or
    ``None`` (auto) for a model read from external data (:func:`wants_external_data` is then true
    whatever the weights become), so :class:`StreamedSave` can write it while it is quantized."""
    return external_data is True or (external_data is None and bool(model.meta.get(EXTERNAL_INPUT_KEY)))


def check_output_path(path: str | os.PathLike, data_name: str | None = None) -> None:
    """Refuse before any work is done an output whose folder is missing, or that (or whose ``data_name``,
    default ``<name>.data``) is a directory.

    Raises:
        OnnxqError: one line naming the path.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxqError(f"output folder does not exist: {folder}")
    for target in (path, folder / (data_name or f"{path.name}.data")):
        if target.is_dir():
            raise OnnxqError(f"cannot write {target}: it is a directory")


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None,
               data_name: str | None = None) -> None:
    """Write ``model`` to ``path``, all or nothing.

    ``external_data``: ``True`` writes weights to ``data_name`` (default ``<name>.data``) beside
    the model, ``False`` embeds them (removing a stale ``data_name`` file), ``None`` decides
    (:func:`wants_external_data`). Everything is written under the output's lock into a temporary
    folder ``OUT.onnxq-tmp-<pid>-*`` beside it and renamed into place once complete
    (:mod:`onnxq.atomic`), so a failure or a signal leaves the earlier files (or none).

    Raises:
        OnnxqError: ``cannot write PATH: <reason>`` (no permission, a directory, disk full, ...), or
            ``PATH is being written by pid N``.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    data_name = data_name or f"{path.name}.data"
    check_output_path(path, data_name)
    if external_data is None:
        external_data = wants_external_data(model)
    with output_lock(path), temp_folder(path) as tmp:
        tmp_model = tmp / path.name
        if not external_data:
            # tensors still memory-mapped from the input's external data would otherwise be
            # written as references to a file that is not beside the output
            ir.external_data.load_to_model(model)
        try:
            ir.save(model, tmp_model, external_data=data_name if external_data else None)
            written_data = (tmp / data_name).exists()  # none when no tensor went to external data
            moves = [(tmp / data_name, folder / data_name)] if written_data else []
            commit([*moves, (tmp_model, path)], remove=[] if written_data else [folder / data_name])
        except OSError as exc:
            raise write_error(path, exc) from None


class StreamedSave:
    """Write an output with external data while its model is still being built.

    Used as a context manager around the quantization: it takes the output's lock and a temp
    folder (:mod:`onnxq.atomic`), and :meth:`write` appends an initializer's bytes to
    ``data_name`` (default ``<name>.data``) in a writer thread, then replaces the value's tensor
    by an ``ir.ExternalTensor`` there, so the in-memory copy is freed and the writes overlap the
    quantization of the next weight. :meth:`save` appends what is left (tensors above
    :data:`INLINE_BYTES`, the input's unquantized external tensors), writes the model and
    renames both into place. Leaving the block without :meth:`save` (an error, an interrupt)
    removes everything written; the earlier output, if any, stays.

    Raises:
        OnnxqError: as :func:`save_model` (output folder missing, being written by another
            process, ``cannot write PATH: <reason>``).
    """

    def __init__(self, path: str | os.PathLike, data_name: str | None = None) -> None:
        self.path = Path(path)
        self.data_name = data_name or f"{self.path.name}.data"
        self._stack = ExitStack()
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._size = 0
        self._file = None
        self._tmp: Path | None = None

    def __enter__(self) -> StreamedSave:
        check_output_path(self.path, self.data_name)
        with ExitStack() as stack:
            stack.enter_context(output_lock(self.path))
            self._tmp = stack.enter_context(temp_folder(self.path))
            try:
                self._file = stack.enter_context(open(self._tmp / self.data_name, "wb", buffering=0))
            except OSError as exc:
                raise write_error(self.path, exc) from None
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxq-save")
            stack.callback(self._writer.shutdown, wait=True, cancel_futures=True)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    def write(self, value: ir.Value) -> None:
        """Append ``value``'s tensor to the external data (in the writer thread; never blocks on the disk).

        The value keeps its in-memory tensor until the bytes are written, then reads them from
        the file. Tensors of at most :data:`INLINE_BYTES` are left for the model file.
        """
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= INLINE_BYTES or self._is_written(tensor):
            return
        offset, self._size = self._size, self._size + tensor.nbytes
        self._pending.append(self._writer.submit(self._write, value, tensor, offset))

    def save(self, model: ir.Model) -> None:
        """Finish the data file, write ``model`` beside it and rename both into place (model last).

        Afterwards ``model``'s external tensors read the final data file.
        """
        try:
            for future in self._pending:
                future.result()
            for graph in model.graphs():
                for value in graph.initializers.values():
                    tensor = value.const_value
                    if tensor is None or self._is_written(tensor):
                        continue
                    if tensor.nbytes > INLINE_BYTES:
                        offset, self._size = self._size, self._size + tensor.nbytes
                        self._write(value, tensor, offset)
                    elif isinstance(tensor, ir.ExternalTensor):  # a small tensor of the input's data file
                        value.const_value = ir.external_data.convert_tensors_from_external([tensor])[0]
            self._file.close()
            tmp_model = self._tmp / self.path.name
            ir.save(model, tmp_model)
            folder = self.path.parent if str(self.path.parent) else Path(".")
            written = self._size > 0
            moves = [(self._tmp / self.data_name, folder / self.data_name)] if written else []
            commit([*moves, (tmp_model, self.path)], remove=[] if written else [folder / self.data_name])
        except OSError as exc:
            raise write_error(self.path, exc) from None
        for graph in model.graphs():  # the temp folder goes away: read the committed file from now on
            for value in graph.initializers.values():
                if self._is_written(value.const_value):
                    value.const_value = self._external(value.const_value, value.const_value.offset, folder)

    def _is_written(self, tensor) -> bool:
        return isinstance(tensor, ir.ExternalTensor) and Path(tensor.base_dir) == self._tmp

    def _external(self, tensor, offset: int, base_dir: Path) -> ir.ExternalTensor:
        return ir.ExternalTensor(self.data_name, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                 name=tensor.name, doc_string=tensor.doc_string,
                                 metadata_props=dict(tensor.metadata_props), base_dir=base_dir)

    def _write(self, value: ir.Value, tensor, offset: int) -> None:
        self._file.seek(offset)
        tensor.tofile(self._file)
        if value.const_value is tensor:  # the value reads the file from now on; its array can go
            value.const_value = self._external(tensor, offset, self._tmp)
