"""Model folders as exporters write them: which file is the model, what else must travel with it.

* ONNX Runtime GenAI (model builder): ``genai_config.json`` names the decoder file
  (``model.decoder.filename``), beside tokenizer files and external data;
* Optimum (``text-generation-with-past``): ``model.onnx`` (external data ``model.onnx_data``),
  ``config.json``, tokenizer files;
* any other folder with exactly one ``.onnx`` file.

:func:`open_model_folder` finds the model; :func:`write_model_folder` writes the quantized
model under the input's file name, keeps its external-data file name, and copies every other
file (configs, tokenizer, chat template), all into a temporary folder ``OUT.onnxq-tmp-<pid>-*``
renamed into place once complete, under the output's lock (:mod:`onnxq.atomic`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx_ir as ir

from onnxq.atomic import commit, output_lock, temp_folder, write_error
from onnxq.errors import OnnxqError
from onnxq.io import save_model

__all__ = ["ModelFolder", "open_model_folder", "write_model_folder"]

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"


@dataclass(frozen=True)
class ModelFolder:
    """A model folder: ``kind`` is ``"genai"``, ``"optimum"`` or ``"onnx"`` (a folder with one model)."""

    path: Path
    model_file: Path
    kind: str


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
    return ModelFolder(path, model_file, kind)


def write_model_folder(model: ir.Model, source: ModelFolder, output: str | os.PathLike,
                       source_data: Sequence[Path] = ()) -> Path:
    """Write ``model`` as ``output/<the source model's file name>`` with every other file of ``source`` copied.

    ``source_data``: the external-data files the source model read (``onnxq.io.external_data_files``
    of it, taken before quantizing): they are not copied, and the model keeps the name when there
    was one (e.g. ``model.onnx.data`` or ``model.onnx_data``); else it is written as one file when it fits.
    ``output`` must not exist, or be an empty folder; it appears only once complete.

    Raises:
        OnnxqError: ``output`` exists and is not empty, ``cannot write OUTPUT: <reason>``, or
            ``OUTPUT is being written by pid N``.

    Returns:
        The path of the written model.
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OnnxqError(f"output folder {output} exists and is not empty; choose a new folder")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxqError(f"output folder's parent does not exist: {parent}")
    with output_lock(output), temp_folder(output) as tmp:
        data_names = [p.name for p in source_data if p.parent.resolve() == source.path.resolve()]
        skip = {source.model_file.name, *data_names}
        try:
            for item in sorted(source.path.iterdir()):
                if item.name in skip or item.name.startswith("."):
                    continue
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name)
                else:
                    shutil.copy2(item, tmp / item.name)
        except OSError as exc:
            raise write_error(output, exc) from None
        data_name = data_names[0] if len(data_names) == 1 else None
        save_model(model, tmp / source.model_file.name, external_data=True if data_name else None,
                   data_name=data_name)
        try:
            commit([(tmp, output)])  # a rename onto an empty folder replaces it
        except OSError as exc:
            raise write_error(output, exc) from None
    return output / source.model_file.name
