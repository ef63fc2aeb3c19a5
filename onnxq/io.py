"""Loading and saving models safely: clear errors in, atomic writes out.

Large models keep their weights in external data; ``onnx_ir`` reads those
lazily (memory-mapped), so only the weight being quantized is resident. Outputs
are written under a lock, in a temp folder, and renamed into place once complete
(:mod:`onnxq.atomic`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir

from onnxq.atomic import commit, output_lock, temp_folder, write_error
from onnxq.errors import OnnxqError

__all__ = ["load_model", "save_model", "check_external_data", "check_output_path", "external_data_files",
           "wants_external_data", "EXTERNAL_DATA_THRESHOLD", "EXTERNAL_INPUT_KEY"]

EXTERNAL_DATA_THRESHOLD = 256 * 1024 * 1024
"""Above this many bytes of weights an output is written with external data (``external_data=None``)."""
EXTERNAL_INPUT_KEY = "onnxq.external_input"
"""``model.meta[EXTERNAL_INPUT_KEY]``: set by :func:`load_model` on a model read from external data."""


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
