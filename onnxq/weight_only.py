"""Neural Compressor's ONNX weight-only entry points on top of :func:`onnxq.quantize`.

``rtn_quantize``, ``gptq_quantize``, ``awq_quantize`` and ``prepare_inputs`` keep the
signatures and defaults of ``neural_compressor/adaptor/ox_utils/weight_only.py``
(NC 2.x); the work is done by onnxq's passes, so the output is onnxq's MatMulNBits
(bit-exact packing, Gemm and Transpose->MatMul sites too, sequential calibration).

Translation of NC's arguments:

* ``model``: a path, an ``onnx.ModelProto`` (not modified) or an ``onnx_ir.Model``
  (rewritten in place). The result is an ``onnx.ModelProto`` (NC returns its
  ``ONNXModel`` wrapper, whose ``.model`` is the ModelProto); for models above 2 GB
  use :func:`onnxq.quantize` and :func:`onnxq.save`, which keep external data.
* ``weight_config``: ``{node name: {"bits": .., "group_size": .., "scheme": ..} or "fp32"}``
  becomes :class:`~onnxq.config.QuantConfig` overrides keyed ``"re:^<escaped name>$"``;
  ``"fp32"`` leaves the node in float. Keys may be partial (missing ones take the
  function's arguments); an ``"algorithm"`` key must name the function's algorithm.
* ``scheme``: ``"asym"`` stores zero points; ``"sym"`` is onnxq's full-range symmetric
  grid (largest magnitude -> ``-2**(b-1)``), finer than NC's ``2 * amax / (2**b - 1)``.
* ``group_size``: the MatMulNBits block (a power of two >= 16), ``-1`` per channel.
* ``dataloader``: iterable of ``(inputs, label)`` (NC's convention) or of feed dicts;
  ``inputs`` is a dict ``{input name: array}``, one array (single-input models) or a
  sequence of arrays in graph-input order; torch tensors are converted.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.api import quantize, quantize_with_report
from onnxq.calibration import input_specs
from onnxq.config import AWQConfig, CalibrationConfig, GPTQConfig, QuantConfig
from onnxq.core import QuantizedWeight
from onnxq.core.quantize import quantize_weight_with_error
from onnxq.errors import OnnxqError
from onnxq.formats import WeightSettings
from onnxq.io import load_model
from onnxq.graph.sites import WeightSite

__all__ = ["rtn_quantize", "gptq_quantize", "awq_quantize", "prepare_inputs"]

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model
_WEIGHT_CONFIG_KEYS = ("bits", "group_size", "scheme", "algorithm")


def _symmetric(scheme: str, where: str = "") -> bool:
    if scheme not in ("sym", "asym"):
        raise OnnxqError(f"{where}scheme must be 'sym' or 'asym', got {scheme!r}")
    return scheme == "sym"


def _quant_config(
    weight_config: Mapping, algorithms: tuple[str, ...], num_bits: int, group_size: int, scheme: str,
    accuracy_level: int, **options,
) -> QuantConfig:
    """NC's global arguments and per-node ``weight_config`` as a :class:`QuantConfig` (``algorithms[0]``)."""
    if not isinstance(weight_config, Mapping):
        raise OnnxqError(f"weight_config must be a dict of node name -> settings, got {type(weight_config).__name__}")
    overrides: dict[str, dict] = {}
    for name, entry in weight_config.items():
        key = f"re:^{re.escape(name)}$"
        if entry == "fp32":
            overrides[key] = {"skip": True}
            continue
        where = f"weight_config[{name!r}]: "
        if not isinstance(entry, Mapping):
            raise OnnxqError(f"{where}expected 'fp32' or a dict with keys {list(_WEIGHT_CONFIG_KEYS)}, got {entry!r}")
        unknown = set(entry) - set(_WEIGHT_CONFIG_KEYS)
        if unknown:
            raise OnnxqError(f"{where}unknown keys {sorted(unknown)}; allowed: {list(_WEIGHT_CONFIG_KEYS)}")
        if "algorithm" in entry and str(entry["algorithm"]).lower() not in algorithms:
            raise OnnxqError(f"{where}algorithm {entry['algorithm']!r} cannot be mixed in; this function runs "
                             f"{algorithms[0].upper()} (mark the node 'fp32' and quantize it separately)")
        setting: dict = {}
        if "bits" in entry:
            setting["bits"] = entry["bits"]
        if "group_size" in entry:
            setting["block_size"] = entry["group_size"]
        if "scheme" in entry:
            setting["symmetric"] = _symmetric(entry["scheme"], where)
        overrides[key] = setting
    return QuantConfig(bits=num_bits, block_size=group_size, symmetric=_symmetric(scheme),
                       accuracy_level=accuracy_level, algorithm=algorithms[0], overrides=overrides, **options)


def _to_proto(model: ir.Model) -> onnx.ModelProto:
    ir.external_data.load_to_model(model)  # weights still memory-mapped from the input's external data
    return ir.to_proto(model)


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _feed_of(sample, names: list[str]) -> dict[str, np.ndarray]:
    """One dataloader item -> ``{input name: array}``."""
    inputs = sample[0] if isinstance(sample, (tuple, list)) and len(sample) else sample
    if isinstance(inputs, Mapping):
        return {name: _to_numpy(value) for name, value in inputs.items()}
    if isinstance(inputs, np.ndarray) or hasattr(inputs, "detach"):
        if len(names) != 1:
            raise OnnxqError(f"the dataloader gave one array but the model has {len(names)} inputs "
                             f"({', '.join(names)}); give a dict or a sequence of arrays")
        return {names[0]: _to_numpy(inputs)}
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != len(names):
            raise OnnxqError(f"input number mismatch: the model needs {len(names)} inputs ({', '.join(names)}), "
                             f"the dataloader gave {len(inputs)}")
        return {name: _to_numpy(value) for name, value in zip(names, inputs)}
    raise OnnxqError(f"a dataloader item must be (inputs, label) or a dict of arrays, found {type(inputs).__name__}")


def prepare_inputs(model: ModelLike, n_samples: int, dataloader: Iterable, providers: list[str]):
    """Read calibration feeds from an NC-style ``dataloader``.

    Stops before the batch that would take the sample count past ``n_samples``
    (batches of ``dataloader.batch_size``, 1 when it has none); ``n_samples=-1`` reads
    everything. ``providers`` is accepted for NC compatibility: the input names are
    read from the graph, no session is built.

    Returns:
        ``(inputs, so)``: a list of feeds ``{graph input name: np.ndarray}`` and a fresh
        ``onnxruntime.SessionOptions`` (NC returns the options it built its session with).
    """
    import onnxruntime as ort

    names = [spec.name for spec in input_specs(model)]
    batch_size = getattr(dataloader, "batch_size", None) or 1
    inputs = []
    for i, sample in enumerate(dataloader):
        if n_samples != -1 and (i + 1) * batch_size > n_samples:
            break
        inputs.append(_feed_of(sample, names))
    return inputs, ort.SessionOptions()


def _calibration_feeds(model: ir.Model, n_samples: int, dataloader, providers) -> list[dict[str, np.ndarray]]:
    if dataloader is None:
        raise OnnxqError("a dataloader is required (an iterable of (inputs, label) or of feed dicts)")
    feeds, _ = prepare_inputs(model, n_samples, dataloader, providers)
    if not feeds:
        raise OnnxqError(f"the dataloader gave no calibration sample within n_samples={n_samples} "
                         f"(batch_size {getattr(dataloader, 'batch_size', None) or 1})")
    return feeds


def rtn_quantize(
    model: ModelLike,
    weight_config: Mapping = {},
    num_bits: int = 4,
    group_size: int = 32,
    scheme: str = "asym",
    ratios: Mapping[str, float] = {},
    accuracy_level: int = 0,
    providers: list[str] = ["CPUExecutionProvider"],
) -> onnx.ModelProto:
    """Round-to-nearest weight-only quantization to MatMulNBits (NC's ``rtn_quantize``).

    Args:
        model: path, ``onnx.ModelProto`` (not modified) or ``onnx_ir.Model`` (modified).
        weight_config: per-node settings or ``"fp32"`` (see the module docstring).
        num_bits, group_size, scheme: defaults for nodes not in ``weight_config``.
        ratios: ``{weight initializer name: clip ratio}``: the block range is scaled by it
            (NC's ``quantile``; ``awq_quantize`` of NC passes its clip search result here).
        accuracy_level: MatMulNBits compute mode (4 = int8 activations).
        providers: unused (RTN runs no session); kept for NC compatibility.

    Returns:
        The quantized ``onnx.ModelProto``.
    """
    config = _quant_config(weight_config, ("rtn",), num_bits, group_size, scheme, accuracy_level)
    for name, ratio in ratios.items():
        if not (isinstance(ratio, (int, float, np.floating)) and 0 < ratio <= 1):
            raise OnnxqError(f"ratios[{name!r}] must be a clip ratio in (0, 1], got {ratio!r}")

    def solver(site: WeightSite, weight: np.ndarray, settings: WeightSettings) -> tuple[QuantizedWeight, float]:
        return quantize_weight_with_error(
            weight, settings.bits, settings.block_size, settings.symmetric,
            ratio=float(ratios.get(site.source.name, 1.0)), mse_clip=settings.mse_clip,
            scale_dtype=site.dtype.numpy(),
        )

    return _to_proto(quantize_with_report(model, config, solver=solver).model)


def gptq_quantize(
    model: ModelLike,
    dataloader: Iterable,
    weight_config: Mapping = {},
    num_bits: int = 4,
    group_size: int = 32,
    scheme: str = "asym",
    n_samples: int = 128,
    percdamp: float = 0.01,
    blocksize: int = 128,
    actorder: bool = False,
    mse: bool = False,
    perchannel: bool = True,
    accuracy_level: int = 0,
    providers: list[str] = ["CPUExecutionProvider"],
) -> onnx.ModelProto:
    """GPTQ (arXiv 2210.17323) to MatMulNBits, calibrated through onnxruntime (NC's ``gptq_quantize``).

    ``percdamp``, ``blocksize`` (the lazy batch, ``GPTQConfig.lazy_batch``) and ``actorder`` go to
    :class:`~onnxq.config.GPTQConfig`
    (act-order with static groups: no ``g_idx``); ``mse`` is onnxq's per-block MSE clip
    choice; ``perchannel=False`` (NC: one grid for a whole group across all outputs, then
    re-quantized per column at export) is not reproduced: a warning is logged and the
    grid stays per output column and block, which is what MatMulNBits stores.
    Calibration is sequential (each block sees the quantized outputs of the blocks
    before it) and the model stores the solver's own codes.

    Returns:
        The quantized ``onnx.ModelProto``.
    """
    if not perchannel:
        logger.warning("gptq_quantize: perchannel=False is not supported; quantization grids are per output "
                       "column and block (MatMulNBits' layout)")
    config = _quant_config(
        weight_config, ("gptq",), num_bits, group_size, scheme, accuracy_level, mse_clip=bool(mse),
        gptq=GPTQConfig(percdamp=percdamp, lazy_batch=blocksize, act_order=bool(actorder)),
    )
    ir_model = load_model(model)
    feeds = _calibration_feeds(ir_model, n_samples, dataloader, providers)
    config = config.with_updates(calibration=CalibrationConfig(samples=len(feeds)))
    return _to_proto(quantize(ir_model, config, feeds, providers=list(providers)))


def awq_quantize(
    model: ModelLike,
    dataloader: Iterable,
    weight_config: Mapping = {},
    num_bits: int = 4,
    group_size: int = 32,
    scheme: str = "asym",
    n_samples: int = 128,
    enable_auto_scale: bool = True,
    enable_mse_search: bool = True,
    accuracy_level: int = 0,
    providers: list[str] = ["CPUExecutionProvider"],
) -> onnx.ModelProto:
    """AWQ (arXiv 2306.00978) to MatMulNBits, calibrated through onnxruntime (NC's ``awq_quantize``).

    ``enable_auto_scale``: the per-input-channel scale search (folded into the producing
    norm / Mul / MatMul, or a Mul inserted); ``enable_mse_search``: the per-(column, block)
    clip search on the output error. Both off: plain RTN (the dataloader is not read).
    The clip search alone (``enable_auto_scale=False, enable_mse_search=True``) keeps scales of 1.

    Returns:
        The quantized ``onnx.ModelProto``.
    """
    if not enable_auto_scale and not enable_mse_search:
        logger.warning("awq_quantize: scale and clip search both disabled: plain RTN, the dataloader is not used")
        config = _quant_config(weight_config, ("rtn", "awq"), num_bits, group_size, scheme, accuracy_level)
        return _to_proto(quantize(model, config))
    config = _quant_config(
        weight_config, ("awq",), num_bits, group_size, scheme, accuracy_level,
        awq=AWQConfig(clip=bool(enable_mse_search), scale_search=bool(enable_auto_scale)),
    )
    ir_model = load_model(model)
    feeds = _calibration_feeds(ir_model, n_samples, dataloader, providers)
    config = config.with_updates(calibration=CalibrationConfig(samples=len(feeds)))
    return _to_proto(quantize(ir_model, config, feeds, providers=list(providers)))
