"""Loading and saving models safely: clear errors in, atomic writes out.

Large models keep their weights in external data; ``onnx_ir`` reads those
lazily (memory-mapped), so only the weight being quantized is resident.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError

__all__ = ["load_model", "save_model", "check_external_data", "external_data_files", "EXTERNAL_DATA_THRESHOLD"]

EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024  # above this, weights go to external data (protobuf limit: 2 GB)


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
        loaded = ir.load(path)
    except PermissionError:
        raise OnnxqError(f"cannot read model file {path}: permission denied") from None
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise OnnxqError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {exc})") from None
    if loaded.graph is None or (not len(loaded.graph) and not loaded.graph.outputs):
        raise OnnxqError(f"{path} is not a valid ONNX model (it has an empty graph)")
    check_external_data(loaded)
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


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None,
               data_name: str | None = None) -> None:
    """Write ``model`` to ``path`` atomically.

    ``external_data``: ``True`` writes weights to ``data_name`` (default ``<name>.data``) beside
    the model, ``False`` embeds them, ``None`` decides by size (external above 1.5 GB).
    Everything is written to a temporary folder in the destination's folder and
    renamed into place only once complete, so a failure leaves nothing half-written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxqError(f"output folder does not exist: {folder}")
    data_name = data_name or f"{path.name}.data"
    for target in (path, folder / data_name):
        if target.is_dir():
            raise OnnxqError(f"cannot write {target}: it is a directory")
    if external_data is None:
        external_data = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    try:
        tmp_model = tmp / path.name
        if not external_data:
            # tensors still memory-mapped from the input's external data would otherwise be
            # written as references to a file that is not beside the output
            ir.external_data.load_to_model(model)
        ir.save(model, tmp_model, external_data=data_name if external_data else None)
        if external_data:
            os.replace(tmp / data_name, folder / data_name)
        elif (folder / data_name).exists():
            (folder / data_name).unlink()  # a stale data file from an earlier external save
        try:
            os.replace(tmp_model, path)
        except OSError:
            if external_data:  # no data file without its model
                (folder / data_name).unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
