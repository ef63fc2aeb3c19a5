"""The Python API: ``quantize(model, config) -> ir.Model`` and ``save(model, path)``."""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any, Callable, Mapping

import onnx
import onnx_ir as ir

from onnxq.calibration.driver import calibrate_and_quantize
from onnxq.config import QuantConfig
from onnxq.errors import OnnxqError
from onnxq.formats.registry import format_of_node
from onnxq.io import load_model, save_model
from onnxq.graph.sites import SkippedNode
from onnxq.passes.quantize_weights import (
    Progress,
    QuantizedNodeRecord,
    QuantizeResult,
    QuantizeWeightsPass,
    WeightSolver,
    plan_sites,
)

__all__ = ["quantize", "quantize_with_report", "save", "inspect_model", "why_nothing_to_quantize", "records_of",
           "REPORT_KEY"]

logger = logging.getLogger(__name__)

REPORT_KEY = "onnxq.report"
"""``model.meta[REPORT_KEY]``: ``(records, skipped)`` of the last quantization (not saved to disk)."""


def quantize(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    config: QuantConfig | Mapping[str, Any] | None = None,
    calibration_data_reader=None,
    *,
    progress: Progress | None = None,
    providers: list[str] | None = None,
    executor: Any = None,
    checkpoint: str | os.PathLike | None = None,
) -> ir.Model:
    """Quantize the MatMul/Gemm (and, on request, Gather) weights of ``model`` into ``config.format``.

    Args:
        model: a path (external data is read memory-mapped), an ``onnx.ModelProto``
            (not modified) or an ``onnx_ir.Model`` (modified in place and returned).
        config: a :class:`QuantConfig` (default: 4 bits, block 32, symmetric, RTN, MatMulNBits), or
            a ModelOpt-style mapping of node-name wildcards to formats, e.g.
            ``{"*": "int4_b128", "*lm_head*": {"enable": False}, "algorithm": "awq"}``
            (see :meth:`QuantConfig.from_wildcards`).
        calibration_data_reader: for calibrated algorithms (gptq, awq, teq, autoround; optional for
            k_quant): an
            onnxruntime ``CalibrationDataReader`` (``get_next()`` / ``rewind()``), a list of feeds, or
            any iterable of ``{graph input name: array}`` (see :mod:`onnxq.calibration`).
        progress: ``tqdm.tqdm``-like wrapper for progress (called with ``desc`` and ``unit``).
        providers: onnxruntime execution providers used for calibration (default CPU).
        executor: where calibration runs: ``None`` (this process), ``"ray"`` (a local Ray instance,
            started on demand: ``pip install 'onnxq[ray]'``), ``"ray://HOST:PORT"`` (a Ray cluster), or an
            executor object such as ``onnxq.calibration.ray_executor.RayExecutor(workers=4)``; the
            result is the same (docs/SCALING.md).
        checkpoint: a folder where calibration saves each finished block; calling again with the same
            model, settings and data resumes after the last saved block.

    Returns:
        The rewritten model. ``model.meta["onnxq.report"]`` holds ``(records, skipped)``
        (:func:`records_of`); :func:`quantize_with_report` returns them instead.

    Raises:
        OnnxqError: unreadable model, nothing to quantize, NaN/Inf weights, settings the format's
            kernel cannot run, calibration data missing or not matching the model's inputs.
    """
    result = quantize_with_report(model, config, calibration_data_reader, progress=progress, providers=providers,
                                  executor=executor, checkpoint=checkpoint)
    result.model.meta[REPORT_KEY] = (result.records, result.skipped)
    return result.model


def why_nothing_to_quantize(model: ir.Model, skipped: list[SkippedNode]) -> str:
    """Why ``model`` has nothing to quantize, as a parenthesised clause for a message: the skipped
    nodes' reasons (``skipped``: what the plan left in float), or that the model is already
    quantized (its quantized ops by type), or that it has no MatMul or Gemm at all."""
    if skipped:
        return " (skipped: " + "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) + ")"
    quantized = Counter(node.op_type for node in model.graph.all_nodes() if format_of_node(node) is not None)
    if quantized:
        ops = ", ".join(f"{count} {op}" for op, count in quantized.most_common())
        return (f" (the model is already quantized: {ops}; `python -m onnxq summary` lists them, `unpack` "
                "restores float weights)")
    return " (no MatMul or Gemm nodes)"


def quantize_with_report(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    config: QuantConfig | Mapping[str, Any] | None = None,
    calibration_data_reader=None,
    *,
    progress: Progress | None = None,
    providers: list[str] | None = None,
    solver: WeightSolver | None = None,
    executor: Any = None,
    checkpoint: str | os.PathLike | None = None,
    sink: Callable[[ir.Value], None] | None = None,
) -> QuantizeResult:
    """:func:`quantize`, returning the :class:`QuantizeResult` (model, per-node records, skipped nodes).

    ``solver`` replaces a calibration-free algorithm's per-weight solve (e.g. Neural Compressor's
    per-weight clip ratios in :func:`onnxq.weight_only.rtn_quantize`). ``sink`` gets each packed
    initializer as soon as it exists (calibration-free algorithms; e.g.
    :meth:`onnxq.io.StreamedSave.write`).
    """
    if isinstance(config, Mapping):
        config = QuantConfig.from_wildcards(config)
    config = config or QuantConfig()
    if config.needs_calibration and calibration_data_reader is None:
        raise OnnxqError(
            f"algorithm {config.algorithm!r} needs calibration data (calibration_data_reader, or --calib-data "
            "or --generate-calib)"
        )
    calibrated = calibration_data_reader is not None and config.uses_calibration
    if not calibrated and (executor is not None or checkpoint is not None):
        logger.warning("executor and checkpoint apply to calibration; %r runs without it here", config.algorithm)
    if calibration_data_reader is not None and not calibrated:
        logger.warning("algorithm %r does not use calibration data; the reader is ignored", config.algorithm)
    ir_model = load_model(model)
    if calibrated:
        result = calibrate_and_quantize(ir_model, config, calibration_data_reader, progress=progress,
                                        providers=providers, executor=executor, checkpoint=checkpoint)
    else:
        result = QuantizeWeightsPass(config, solver, progress=progress, sink=sink)(ir_model)
    if not result.records:
        raise OnnxqError(f"no quantizable MatMul/Gemm node found{why_nothing_to_quantize(ir_model, result.skipped)}")
    ir_model.metadata_props["onnxq.config"] = json.dumps(config.to_dict())
    return result


def save(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None) -> None:
    """Write ``model`` atomically; see :func:`onnxq.io.save_model`.

    ``external_data``: ``True`` weights in ``<path>.data``, ``False`` one file, ``None`` external data
    when the model was read from external data or its weights exceed 256 MiB.

    Raises:
        OnnxqError: ``cannot write PATH: <reason>`` (permission, a directory, disk full, ...), or
            ``PATH is being written by pid N``; nothing is left behind.
    """
    save_model(model, path, external_data)


def inspect_model(
    model: str | os.PathLike | ir.Model | onnx.ModelProto, config: QuantConfig | None = None
) -> tuple[list[tuple[str, str, int, int, str]], list[SkippedNode]]:
    """What ``quantize`` would do, without changing anything: the same plan, settings resolved per weight.

    Returns ``(planned, skipped)``: planned rows are ``(name, kind, K, N, format description)``,
    e.g. ``"int4 block 512 sym"`` for ``block_size=-1`` on K=500 (the block ``quantize`` writes).

    Raises:
        OnnxqError: settings the format's kernel cannot run on some node.
    """
    config = config or QuantConfig()
    planned, skipped = plan_sites(load_model(model), config)
    rows = [(p.site.name, p.site.kind, p.site.k, p.site.n, p.format.describe(p.settings)) for p in planned]
    return rows, skipped


def records_of(model: ir.Model) -> tuple[list[QuantizedNodeRecord], list[SkippedNode]]:
    """The per-node records ``quantize`` left on ``model``."""
    if REPORT_KEY not in model.meta:
        raise OnnxqError("model carries no onnxq report (was it produced by onnxq.quantize in this process?)")
    return model.meta[REPORT_KEY]
