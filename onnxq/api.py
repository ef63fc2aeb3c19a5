"""The Python API: ``quantize(model, config) -> ir.Model`` and ``save(model, path)``."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import onnx
import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.errors import OnnxqError
from onnxq.io import load_model, save_model
from onnxq.passes import MatMulToNBitsPass, QuantizedNodeRecord, SkippedNode, find_weight_sites
from onnxq.passes.bnb4 import MatMulToBnb4Pass
from onnxq.passes.calibrated import CalibratedNBitsPass
from onnxq.passes.convert import convert_model
from onnxq.passes.fpq4 import MatMulToFpQ4Pass
from onnxq.passes.gather_quantized import quantize_embeddings
from onnxq.passes.qdq import MatMulToQDQPass
from onnxq.passes.matmul_nbits import Progress, hqq_weight_quantizer, rtn_weight_quantizer

__all__ = ["quantize", "save", "inspect_model", "records_of", "REPORT_KEY"]

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
) -> ir.Model:
    """Quantize the MatMul/Gemm weights of ``model`` to MatMulNBits.

    Args:
        model: a path (external data is read memory-mapped), an ``onnx.ModelProto``
            (not modified) or an ``onnx_ir.Model`` (modified in place and returned).
        config: a :class:`QuantConfig` (default: 4 bits, block 32, symmetric, RTN), or a
            ModelOpt-style mapping of node-name wildcards to formats, e.g.
            ``{"*": "int4_b128", "*lm_head*": {"enable": False}, "algorithm": "awq"}``
            (see :meth:`QuantConfig.from_wildcards`).
        calibration_data_reader: for ``algorithm="gptq"``/``"awq"``: an onnxruntime
            ``CalibrationDataReader`` (``get_next()`` / ``rewind()``), a list of feeds, or
            any iterable of ``{graph input name: array}`` (see :mod:`onnxq.calibration`).
        progress: ``tqdm.tqdm``-like wrapper for progress (called with ``desc`` and ``unit``).
        providers: onnxruntime execution providers used for calibration (default CPU).

    Returns:
        The rewritten model. ``model.meta["onnxq.report"]`` holds the per-node records.

    Raises:
        OnnxqError: unreadable model, nothing to quantize, NaN/Inf weights, bad settings,
            calibration data missing or not matching the model's inputs.
    """
    if isinstance(config, Mapping):
        config = QuantConfig.from_wildcards(config)
    config = config or QuantConfig()
    if config.needs_calibration and calibration_data_reader is None:
        raise OnnxqError(
            f"algorithm {config.algorithm!r} needs calibration data (calibration_data_reader, or --calib-data)"
        )
    if not config.needs_calibration and calibration_data_reader is not None:
        logger.warning("algorithm %r does not use calibration data; the reader is ignored", config.algorithm)
    ir_model = load_model(model)
    records, skipped = _run_passes(ir_model, config, calibration_data_reader, progress, providers)
    ir_model.meta[REPORT_KEY] = (records, skipped)
    ir_model.metadata_props["onnxq.config"] = json.dumps(config.to_dict())
    return ir_model


def _run_passes(model: ir.Model, config: QuantConfig, reader, progress, providers):
    """Run the passes ``config`` asks for; returns ``(records, skipped)``."""
    quantizer = hqq_weight_quantizer(config.hqq) if config.algorithm == "hqq" else rtn_weight_quantizer
    if config.needs_calibration:
        main_pass = CalibratedNBitsPass(config, reader, progress=progress, providers=providers)
    elif config.format == "qdq":
        main_pass = MatMulToQDQPass(config, weight_quantizer=quantizer, quantize_embeddings=config.quantize_embeddings)
    elif config.format == "bnb4":
        main_pass = MatMulToBnb4Pass(config, quant_type=config.quant_type)
    elif config.format == "fpq4":
        main_pass = MatMulToFpQ4Pass(config)
    else:
        main_pass = MatMulToNBitsPass(config, weight_quantizer=quantizer, progress=progress)
    result = main_pass(model)
    if not result.modified:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in main_pass.skipped[:5])
        found = f" (skipped: {reasons})" if reasons else " (no MatMul or Gemm nodes)"
        raise OnnxqError(f"no quantizable MatMul/Gemm node found{found}")
    records = list(main_pass.records)
    if config.quantize_embeddings:
        if config.format == "nbits" or (config.format == "qdq" and config.needs_calibration):
            # GatherBlockQuantized, sharing a tied lm_head's packed weight (qdq: converted below)
            records += quantize_embeddings(model, config, shared=getattr(main_pass, "quantized_weights", None))
        elif config.format in ("bnb4", "fpq4"):
            logger.warning("format %r has no quantized Gather; embeddings are left in float", config.format)
    if config.needs_calibration and config.format == "qdq":
        convert_model(model, "qdq")
    return records, list(main_pass.skipped)


def save(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None) -> None:
    """Write ``model`` atomically; see :func:`onnxq.io.save_model`."""
    save_model(model, path, external_data)


def inspect_model(
    model: str | os.PathLike | ir.Model | onnx.ModelProto, config: QuantConfig | None = None
) -> tuple[list[tuple[str, str, int, int, str]], list[SkippedNode]]:
    """What ``quantize`` would do, without changing anything.

    Returns ``(planned, skipped)``: planned rows are ``(name, kind, K, N, settings)``.
    """
    config = config or QuantConfig()
    sites, skipped = find_weight_sites(load_model(model))
    planned = []
    for site in sites:
        settings = config.settings_for(site.name)
        if settings is None:
            skipped.append(SkippedNode(site.name, site.node.op_type, config.skip_reason(site.name)))
            continue
        desc = f"int{settings.bits} block {settings.block_size} {'sym' if settings.symmetric else 'asym'}"
        planned.append((site.name, site.kind, site.k, site.n, desc))
    return planned, skipped


def records_of(model: ir.Model) -> tuple[list[QuantizedNodeRecord], list[SkippedNode]]:
    """The per-node records ``quantize`` left on ``model``."""
    if REPORT_KEY not in model.meta:
        raise OnnxqError("model carries no onnxq report (was it produced by onnxq.quantize in this process?)")
    return model.meta[REPORT_KEY]
