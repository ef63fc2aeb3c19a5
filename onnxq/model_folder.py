"""Model folders as exporters write them: which file is the model, what else must travel with it.

* ONNX Runtime GenAI (model builder): ``genai_config.json`` names the decoder file
  (``model.decoder.filename``), beside tokenizer files and external data;
* Optimum (``text-generation-with-past``): ``model.onnx`` (external data ``model.onnx_data``),
  ``config.json``, tokenizer files;
* any other folder with exactly one ``.onnx`` file.

:func:`open_model_folder` finds the model; :func:`write_model_folder` writes the quantized
model under the input's file name, keeps its external-data file name, and copies every other
file (configs, tokenizer, chat template), all into a temporary folder renamed into place once
complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.io import save_model

__all__ = ["ModelFolder", "external_data_files", "open_model_folder", "write_model_folder"]

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"


@dataclass(frozen=True)
class ModelFolder:
    """A model folder: ``kind`` is ``"genai"``, ``"optimum"`` or ``"onnx"`` (a folder with one model)."""

    path: Path
    model_file: Path
    kind: str
    external_data: tuple[str, ...]  # external-data file names the model references (relative to the folder)


def external_data_files(model_file: Path) -> tuple[str, ...]:
    """File names the model's initializers keep their data in (read from the protobuf, no data loaded)."""
    proto = onnx.load(str(model_file), load_external_data=False)
    return tuple(sorted({entry.value for tensor in proto.graph.initializer
                         if tensor.data_location == onnx.TensorProto.EXTERNAL
                         for entry in tensor.external_data if entry.key == "location"}))


def open_model_folder(path: str | os.PathLike) -> ModelFolder:
    """The model of the folder ``path`` (see the module docstring).

    Raises:
        OnnxqError: no model, or several and nothing says which.
    """
    path = Path(path)
    config = path / GENAI_CONFIG
    if config.is_file():
        try:
            filename = json.loads(config.read_text())["model"]["decoder"]["filename"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OnnxqError(f"{config} does not name the decoder model (model.decoder.filename): {exc}") from None
        model_file, kind = path / filename, "genai"
    else:
        models = sorted(p for p in path.glob("*.onnx") if p.is_file())
        if not models:
            raise OnnxqError(f"no .onnx model in folder {path}")
        if len(models) > 1 and (path / "model.onnx").is_file():
            models = [path / "model.onnx"]
        if len(models) > 1:
            raise OnnxqError(f"folder {path} holds {len(models)} .onnx models ({', '.join(p.name for p in models)}); "
                             "give the model file instead")
        model_file = models[0]
        kind = "optimum" if (path / "config.json").is_file() else "onnx"
    if not model_file.is_file():
        raise OnnxqError(f"model file not found: {model_file}")
    try:
        external = external_data_files(model_file)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise OnnxqError(f"{model_file} is not a valid ONNX model ({type(exc).__name__}: {exc})") from None
    return ModelFolder(path, model_file, kind, external)


def write_model_folder(model: ir.Model, source: ModelFolder, output: str | os.PathLike) -> Path:
    """Write ``model`` as ``output/<the source model's file name>`` with every other file of ``source`` copied.

    The model keeps its external-data file name when the source had one (one file, e.g.
    ``model.onnx.data`` or ``model.onnx_data``), else it is written as one file when it fits.
    ``output`` must not exist, or be an empty folder; it appears only once complete.

    Returns:
        The path of the written model.
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OnnxqError(f"output folder {output} exists and is not empty; choose a new folder")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxqError(f"output folder's parent does not exist: {parent}")
    tmp = parent / f".{output.name}.onnxq-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        skip = {source.model_file.name, *source.external_data}
        for item in sorted(source.path.iterdir()):
            if item.name in skip or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        data_name = source.external_data[0] if len(source.external_data) == 1 else None
        save_model(model, tmp / source.model_file.name, external_data=True if data_name else None, data_name=data_name)
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output / source.model_file.name
