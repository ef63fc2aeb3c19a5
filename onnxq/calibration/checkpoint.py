"""Resumable calibration: each finished block's solutions, and the state needed to go on, on disk.

``--checkpoint DIR`` (``quantize(..., checkpoint=DIR)``) makes the calibration driver write, after
every finished block:

* ``block-NNNN.npz``: the block's solutions, one per weight group: codes, scales, zero points,
  errors, the input scale AWQ/TEQ chose and the note (what :meth:`Algorithm.solve` returned);
* ``state-NNNN/sample-MMMMMM.npz`` (sequential mode): every sample's cached activations after the
  block (the inputs of the blocks still to come);
* ``manifest.json``: the run's fingerprint and the finished blocks, replaced last.

Every file is written under a temporary name and renamed into place, the manifest after the
files it names, so an interrupted write leaves the previous checkpoint intact. Rerunning the
same command replays the saved solutions (the same folds and rewrites, in the same order) and
continues from the first unfinished block; the result equals an uninterrupted run's.

The fingerprint covers the settings (``QuantConfig.to_dict()``), the calibration feeds (every
byte) and the model (its nodes, and each initializer's name, type, shape and first 64 KiB): a
checkpoint made for anything else is refused with one line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxq.atomic import write_error
from onnxq.core import QuantizedWeight
from onnxq.errors import OnnxqError

__all__ = ["Checkpoint", "GroupSolution", "fingerprint", "saved_blocks"]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
FORMAT = 1
_HEAD_BYTES = 64 * 1024


@dataclass
class GroupSolution:
    """One weight group's saved solve: the input tensor, its sites' names and the algorithm's
    :class:`~onnxq.algorithms.Solution` (``qweights``, ``errors``, ``input_scale``, ``note``)."""

    input_name: str
    site_names: tuple[str, ...]
    solution: object


def _digest_array(h, name: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    h.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
    h.update(array.reshape(-1).view(np.uint8).data if array.size else b"")


def fingerprint(model: ir.Model, config_dict: dict, feeds: Iterable[Feed]) -> str:
    """sha256 of the settings, the calibration feeds and the model's structure and weights' heads."""
    h = hashlib.sha256()
    h.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    for i, feed in enumerate(feeds):
        for name in sorted(feed):
            _digest_array(h, f"{i}/{name}", np.asarray(feed[name]))
    for node in model.graph.all_nodes():
        h.update(f"{node.domain}|{node.op_type}|{node.name}|".encode())
        h.update("|".join(v.name if v is not None else "" for v in node.inputs).encode())
        h.update("|".join(v.name for v in node.outputs).encode())
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        h.update(f"init|{name}|".encode())
        if tensor is not None:
            h.update(f"{tensor.dtype}|{tuple(tensor.shape.numpy())}|".encode())
            head = np.asarray(tensor.numpy()).reshape(-1)
            h.update(np.ascontiguousarray(head[: max(_HEAD_BYTES // max(head.itemsize, 1), 1)]).view(np.uint8).data)
    return h.hexdigest()


def saved_blocks(directory: str | os.PathLike) -> tuple[int, int] | None:
    """``(finished blocks, all blocks)`` of the checkpoint in ``directory``; None when it holds none."""
    try:
        found = json.loads((Path(directory) / "manifest.json").read_text())
        return len(found["done"]), int(found["blocks"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _replace_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        error = write_error(path, exc)  # before the temp file, which holds the space, is removed
        tmp.unlink(missing_ok=True)
        raise error from None


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _replace_write(path, write)


class Checkpoint:
    """A checkpoint folder for one run (see the module docstring).

    Args:
        directory: the folder (created if missing).
        run: the run's :func:`fingerprint`.
        blocks: the number of calibration blocks of the run.

    Attributes:
        done: indices of the finished blocks, in the order they finished.

    Raises:
        OnnxqError: the folder holds a checkpoint of another run (model, settings or calibration
            data differ), or cannot be read or written.
    """

    def __init__(self, directory: str | os.PathLike, run: str, blocks: int) -> None:
        self.directory = Path(directory)
        self.run = run
        self.blocks = blocks
        self.done: list[int] = []
        self._state: str | None = None
        manifest = self.directory / "manifest.json"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            found = json.loads(manifest.read_text()) if manifest.exists() else None
        except (OSError, ValueError) as exc:
            raise OnnxqError(f"cannot use checkpoint {self.directory}: {getattr(exc, 'strerror', None) or exc}") from None
        if found is not None:
            if found.get("format") != FORMAT or found.get("fingerprint") != run or found.get("blocks") != blocks:
                raise OnnxqError(f"checkpoint {self.directory} was made for another model, settings or calibration "
                                 f"data: remove it or give another --checkpoint folder")
            self.done = [int(i) for i in found["done"]]
            self._state = found.get("state")
            logger.info("checkpoint %s: %d of %d blocks done, resuming", self.directory, len(self.done), blocks)

    @property
    def complete(self) -> bool:
        return len(self.done) == self.blocks

    def _block_path(self, index: int) -> Path:
        return self.directory / f"block-{index:04d}.npz"

    def save_block(self, index: int, groups: list[GroupSolution], cache: Iterable[tuple[int, Feed]] | None) -> None:
        """Record block ``index`` as finished: its group solutions and (sequential mode) every sample's
        cached activations after it."""
        arrays: dict[str, np.ndarray] = {}
        meta = []
        for g, entry in enumerate(groups):
            solution = entry.solution
            weights = []
            for j, qweight in enumerate(solution.qweights):
                arrays[f"g{g}.w{j}.codes"] = qweight.codes
                arrays[f"g{g}.w{j}.scales"] = qweight.scales
                if qweight.zero_points is not None:
                    arrays[f"g{g}.w{j}.zero_points"] = qweight.zero_points
                weights.append({"bits": qweight.bits, "block_size": qweight.block_size, "k": qweight.k})
            if solution.input_scale is not None:
                arrays[f"g{g}.input_scale"] = solution.input_scale
            meta.append({"input": entry.input_name, "sites": list(entry.site_names), "weights": weights,
                         "errors": [float(e) for e in solution.errors], "note": solution.note})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        _save_npz(self._block_path(index), arrays)
        state = self._state
        if cache is not None:
            state = f"state-{index:04d}"
            self._write_state(state, cache)
        self.done.append(index)
        self._write_manifest(state)
        if cache is not None and self._state not in (None, state):
            shutil.rmtree(self.directory / self._state, ignore_errors=True)
        self._state = state

    def _write_state(self, name: str, cache: Iterable[tuple[int, Feed]]) -> None:
        tmp = self.directory / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            for i, values in cache:  # activation names are paths ("/model/..."): stored by position
                names = np.frombuffer(json.dumps(list(values)).encode(), np.uint8)
                with open(tmp / f"sample-{i:06d}.npz", "wb") as f:
                    np.savez(f, names=names, **{f"a{j}": array for j, array in enumerate(values.values())})
            shutil.rmtree(self.directory / name, ignore_errors=True)
            os.replace(tmp, self.directory / name)
        except OSError as exc:
            error = write_error(self.directory / name, exc)
            shutil.rmtree(tmp, ignore_errors=True)
            raise error from None

    def _write_manifest(self, state: str | None) -> None:
        body = json.dumps({"format": FORMAT, "fingerprint": self.run, "blocks": self.blocks, "done": self.done,
                           "state": state}, indent=1)
        _replace_write(self.directory / "manifest.json", lambda tmp: tmp.write_text(body))

    def load_block(self, index: int) -> list[GroupSolution]:
        """Block ``index``'s saved group solutions, in the order they were solved."""
        from onnxq.algorithms import Solution

        try:
            with np.load(self._block_path(index)) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError) as exc:
            raise OnnxqError(f"cannot read checkpoint {self._block_path(index)}: {exc}") from None
        groups = []
        for g, entry in enumerate(json.loads(arrays["meta"].tobytes())):
            qweights = [QuantizedWeight(arrays[f"g{g}.w{j}.codes"], arrays[f"g{g}.w{j}.scales"],
                                        arrays.get(f"g{g}.w{j}.zero_points"), w["bits"], w["block_size"], w["k"])
                        for j, w in enumerate(entry["weights"])]
            solution = Solution(qweights, entry["errors"], arrays.get(f"g{g}.input_scale"), entry["note"])
            groups.append(GroupSolution(entry["input"], tuple(entry["sites"]), solution))
        return groups

    def load_cache(self, samples: int) -> list[Feed] | None:
        """Every sample's cached activations after the last finished block (``None``: none saved)."""
        if self._state is None:
            return None
        folder = self.directory / self._state
        cache = []
        try:
            for i in range(samples):
                with np.load(folder / f"sample-{i:06d}.npz") as data:
                    names = json.loads(data["names"].tobytes())
                    cache.append({name: data[f"a{j}"] for j, name in enumerate(names)})
        except (OSError, ValueError) as exc:
            raise OnnxqError(f"cannot read checkpoint {folder}: {exc}") from None
        return cache
