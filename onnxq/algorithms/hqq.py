"""HQQ: half-quadratic quantization (Badri & Shaji 2023, "Half-Quadratic Quantization of Large
Machine Learning Models", reference code mobiusml/hqq); calibration-free.

Numpy only: a weight in, a :class:`~onnxq.core.QuantizedWeight` out, no data needed.

For each block ``w`` (``block_size`` consecutive rows of K in one output column) HQQ keeps the
min-max scale ``S`` and optimises the zero point ``z`` for a robust ``l_p`` (``p < 1``) error,
``min_z ||w - Q_z(w)||_p^p`` with ``Q_z(w) = (clip(round(w / S + z), 0, 2**b - 1) - z) * S``,
by half-quadratic splitting (an auxiliary ``W_e ~ w - Q_z(w)``) and alternating:

    q     = clip(round(w / S + z), 0, 2**b - 1)
    W_e   = shrink_p(w - (q - z) * S, beta)          shrink_p(x) = sign(x) relu(|x| - |x|**(p-1) / beta)
    z     = mean(q - (w - W_e) / S)                  (the exact minimiser of the quadratic part)
    beta *= kappa

(the reference's ``optimize_weights_proximal_legacy`` with its scale written as ``1 / S``). A block
stops as soon as its mean ``|w - Q_z(w)|`` (the reference's stopping criterion) stops decreasing.

Zero points (asymmetric):

* ``zero_point="float"``: ``S = (max(w) - min(w)) / (2**b - 1)``, ``z`` starts at ``-min(w) / S`` and
  stays a float, rounded to ``scale_dtype`` (the dtype MatMulNBits wants for float zero points,
  the activation's). ONNX Runtime's MatMulNBits accepts such zero points (input ``zero_points``
  of type T3 = the scales' type, unpacked ``[N, k_blocks]``) and dequantizes
  ``(q - z) * S`` exactly as for uint8 zero points; its CPU kernel (1.32) accepts them for 2 and
  4 bits and rejects them for 8 bits.
* ``zero_point="int"``: ``S`` is RTN's scale (the range includes 0, so ``z`` fits the codes
  ``[0, 2**b - 1]``); every iterate's ``z`` is rounded to an integer and the codes recomputed,
  which is what is stored as uint8 zero points.

``symmetric=True`` keeps the implied zero point ``2**(b-1)`` and applies the same splitting to the
scale instead: ``S = <q - z, w - W_e> / ||q - z||^2`` (the least-squares minimiser of the
quadratic part; an extension, the reference only updates ``z``).

Every iterate ``(S, z)`` (``z`` rounded in the integer mode) gives two candidates per block: itself,
and the same ``z`` with the scale refitted by least squares to ``w`` for that iterate's codes,
``S' = <q - z, w> / ||q - z||^2`` (then the codes are recomputed for ``S'``). Each block keeps,
among RTN (:func:`~onnxq.core.quantize_weight`) and all candidates, the one of lowest squared
error ``||w - Q(w)||^2``: the result is never worse than RTN on the weight MSE, block by block.
(Without the refit, rounding ``z`` to an integer gives back RTN's zero point almost everywhere,
so the integer mode would be RTN; the refit is what makes it pay.)

Codes are computed by :func:`~onnxq.core.quantize_with_params` (RTN's rounding) for the scale,
and float zero point, already rounded to ``scale_dtype``, so
``qweight.dequantize()`` is what the runtime computes. Padded rows of K take no part in the
statistics. Work is done on chunks of output columns that bound memory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, register_algorithm
from onnxq.core import QuantizedWeight, check_quant_params, quantize_blocks, quantize_with_params, weight_to_blocks
from onnxq.errors import OnnxqError

__all__ = ["HQQConfig", "HQQ", "HQQResult", "hqq_quantize_weight"]

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 3_000_000  # K * columns handled at once: ~8 float32 temporaries stay near 100 MB


@dataclass(frozen=True)
class HQQConfig:
    """HQQ options (half-quadratic zero-point optimisation, calibration-free).

    Attributes:
        iters: half-quadratic iterations at most.
        zero_point: ``"int"`` (uint8 zero points) or ``"float"`` (float zero points in the
            scales' dtype, which MatMulNBits also accepts; asymmetric only).
    """

    iters: int = 20
    zero_point: str = "int"

    def __post_init__(self) -> None:
        if not (isinstance(self.iters, int) and self.iters >= 0):
            raise OnnxqError(f"hqq.iters must be a non-negative integer, got {self.iters!r}")
        if self.zero_point not in ("int", "float"):
            raise OnnxqError(f"hqq.zero_point must be 'int' or 'float', got {self.zero_point!r}")


@dataclass(frozen=True)
class HQQResult:
    """Outcome of :func:`hqq_quantize_weight`.

    Attributes:
        qweight: the quantized weight. With ``zero_point="float"`` its ``zero_points`` are those
            float zero points (float32 ``[N, k_blocks]``, not uint8), so ``dequantize()`` is still
            ``(codes - zp) * scales``; a format must store them as float zero points (MatMulNBits T3
            in the scales' dtype), never pack them as uint8.
        float_zero_points: float32 ``[N, k_blocks]`` (values already rounded to ``scale_dtype``) with
            ``zero_point="float"``, else ``None``.
        error: ``||W - dequant||_F / ||W||_F``.
    """

    qweight: QuantizedWeight
    float_zero_points: np.ndarray | None
    error: float


def _shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Generalised soft thresholding ``sign(x) relu(|x| - |x|**(p-1) / beta)`` (the l_p proximal step)."""
    magnitude = np.abs(x)
    if p == 1:
        threshold = np.full_like(magnitude, np.float32(1.0 / beta))
    else:
        with np.errstate(divide="ignore"):
            threshold = np.power(magnitude, np.float32(p - 1))  # inf at 0: the result is 0 there
        threshold *= np.float32(1.0 / beta)
    np.subtract(magnitude, threshold, out=magnitude)
    np.maximum(magnitude, 0, out=magnitude)
    return np.copysign(magnitude, x, out=magnitude)


def _to_dtype(values: np.ndarray, dtype) -> np.ndarray:
    return values.astype(dtype).astype(np.float32)


def _codes(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """float32 codes of ``blocks: [..., bs]`` for fixed (float) scales and zero points, rounded exactly as
    :func:`~onnxq.core.quantize_with_params` (and so as RTN) rounds them."""
    return quantize_with_params(blocks, scale, zero, bits).astype(np.float32)


def _reciprocal(scale: np.ndarray) -> np.ndarray:
    return np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)


def _masked_sum(values: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    if valid is not None:
        values = values * valid
    return values.sum(axis=-1, dtype=np.float64)


def _candidates(
    blocks: np.ndarray,
    valid: np.ndarray | None,
    scale: np.ndarray,
    zero: np.ndarray,
    centered: np.ndarray,
    bits: int,
    scale_dtype,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(scale, zero, squared error)`` of an iterate (``centered`` = its codes minus ``zero``), and of the
    same zero with the scale refitted by least squares for those codes (``S = <q - z, w> / ||q - z||^2``)."""
    diff = blocks - centered * scale[..., None]
    out = [(scale, zero, _masked_sum(diff * diff, valid))]
    numerator = _masked_sum(centered * blocks, valid)
    denominator = _masked_sum(centered * centered, valid)
    refit = np.divide(numerator, denominator, out=scale.astype(np.float64), where=denominator > 0)
    refit = _to_dtype(refit, scale_dtype)
    diff = blocks - (_codes(blocks, refit, zero, bits) - zero[..., None]) * refit[..., None]
    out.append((refit, zero, _masked_sum(diff * diff, valid)))
    return out


def _hqq_blocks(
    blocks: np.ndarray,
    valid: np.ndarray | None,
    bits: int,
    symmetric: bool,
    float_zero: bool,
    iters: int,
    lp_norm: float,
    beta: float,
    kappa: float,
    scale_dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HQQ on ``blocks: [n, k_blocks, bs]``; ``valid: [k_blocks, bs]`` marks real (unpadded) rows.

    Returns ``(codes uint8 [n, k_blocks, bs], scales [n, k_blocks], zero points float32 [n, k_blocks],
    squared error float64 [n, k_blocks])``.
    """
    qmax = np.float32((1 << bits) - 1)
    count = np.float32(blocks.shape[-1]) if valid is None else valid.sum(axis=-1).astype(np.float32)
    rtn_codes, rtn_scales, rtn_zps = quantize_blocks(blocks, bits, symmetric, 1.0, scale_dtype)
    best_scale, best_zero = rtn_scales, rtn_zps.astype(np.float32)
    rtn_diff = blocks - (rtn_codes.astype(np.float32) - best_zero[..., None]) * best_scale[..., None]
    best_err = _masked_sum(rtn_diff * rtn_diff, valid)
    del rtn_codes, rtn_diff

    if symmetric:
        scale, zero = rtn_scales, best_zero.copy()
    elif float_zero:
        if valid is None:
            vmin, vmax = blocks.min(axis=-1), blocks.max(axis=-1)
        else:
            vmin = np.where(valid, blocks, np.inf).min(axis=-1).astype(np.float32)
            vmax = np.where(valid, blocks, -np.inf).max(axis=-1).astype(np.float32)
        scale = _to_dtype((vmax - vmin) / qmax, scale_dtype)
        zero = _to_dtype(-vmin * _reciprocal(scale), scale_dtype)
    else:
        scale = rtn_scales
        zero = -np.minimum(blocks.min(axis=-1), np.float32(0)) * _reciprocal(scale)
    previous = np.full(scale.shape, np.inf)
    active = np.ones(scale.shape, dtype=bool)
    for _ in range(iters):
        recip = _reciprocal(scale)
        codes = _codes(blocks, scale, zero, bits)
        centered = codes - zero[..., None]
        diff = blocks - centered * scale[..., None]  # w - W_r
        if valid is not None:
            diff *= valid
        if float_zero or symmetric:
            stored_zero, stored_centered = zero, centered
        else:
            stored_zero = np.clip(np.floor(zero + np.float32(0.5)), 0, qmax)
            stored_centered = _codes(blocks, scale, stored_zero, bits) - stored_zero[..., None]
        for candidate_scale, candidate_zero, candidate_err in _candidates(
            blocks, valid, scale, stored_zero, stored_centered, bits, scale_dtype
        ):
            better = candidate_err < best_err
            best_err = np.where(better, candidate_err, best_err)
            best_scale = np.where(better, candidate_scale, best_scale)
            best_zero = np.where(better, candidate_zero, best_zero)

        criterion = np.abs(diff).sum(axis=-1, dtype=np.float64)
        active &= criterion < previous
        if not active.any():
            break
        previous = np.where(active, criterion, previous)
        target = blocks - _shrink_lp(diff, beta, lp_norm)  # w - W_e
        if symmetric:
            numerator = _masked_sum(centered * target, valid)
            denominator = _masked_sum(centered * centered, valid)
            fitted = np.divide(numerator, denominator, out=scale.astype(np.float64), where=denominator > 0)
            scale = np.where(active, _to_dtype(fitted, scale_dtype), scale)
        else:
            target *= recip[..., None]
            np.subtract(codes, target, out=target)
            updated = (_masked_sum(target, valid) / count).astype(np.float32)
            if float_zero:
                updated = _to_dtype(updated, scale_dtype)
            zero = np.where(active, updated, zero)
        beta *= kappa

    codes = quantize_with_params(blocks, best_scale, best_zero, bits)
    return codes, best_scale.astype(np.float32), best_zero.astype(np.float32), best_err


def hqq_quantize_weight(
    weight: np.ndarray,
    bits: int = 4,
    block_size: int = 64,
    symmetric: bool = False,
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    scale_dtype: np.dtype | type = np.float32,
    zero_point: str = "int",
) -> HQQResult:
    """HQQ-quantize ``weight: [K, N]`` in blocks of ``block_size`` along K (no calibration data).

    Args:
        weight: ``[K, N]`` float weight in MatMul orientation; not modified.
        bits: code width, 2..8.
        block_size: rows of K per block; ``-1`` = one block over all of K.
        symmetric: implied zero point ``2**(b-1)``, the scale is optimised instead (see the module docstring).
        iters: half-quadratic iterations at most (0 gives RTN).
        lp_norm: ``p`` of the robust error (``0 < p <= 1``; the reference's default 0.7).
        beta, kappa: initial penalty of the splitting and its growth per iteration (``kappa >= 1``).
        scale_dtype: dtype the scales (and float zero points) are stored in; values are rounded to it.
        zero_point: ``"int"`` (uint8 zero points, the usual MatMulNBits input) or ``"float"`` (float
            zero points in ``scale_dtype``; asymmetric only).

    Returns:
        :class:`HQQResult`; per block, its squared weight error is never above RTN's.
    """
    try:
        check_quant_params(bits, block_size)
    except ValueError as exc:
        raise OnnxqError(f"HQQ: {exc}") from None
    if zero_point not in ("int", "float"):
        raise OnnxqError(f"HQQ zero_point must be 'int' or 'float', got {zero_point!r}")
    if symmetric and zero_point == "float":
        raise OnnxqError("HQQ zero_point='float' needs symmetric=False (symmetric weights have no zero points)")
    if not isinstance(iters, (int, np.integer)) or iters < 0:
        raise OnnxqError(f"HQQ iters must be an integer >= 0, got {iters!r}")
    if not 0 < lp_norm <= 1:
        raise OnnxqError(f"HQQ lp_norm must be in (0, 1], got {lp_norm!r}")
    if not (beta > 0 and kappa >= 1 and np.isfinite(beta) and np.isfinite(kappa)):
        raise OnnxqError(f"HQQ expected beta > 0 and kappa >= 1, got beta={beta!r}, kappa={kappa!r}")
    weight = np.asarray(weight)
    if weight.ndim != 2 or 0 in weight.shape:
        raise OnnxqError(f"HQQ expected a non-empty 2-D weight [K, N], got shape {weight.shape}")
    if not np.all(np.isfinite(weight)):
        raise OnnxqError("HQQ expected a finite weight, found NaN or inf")
    k, n = weight.shape
    bs = k if block_size == -1 else int(block_size)
    k_blocks = -(-k // bs)
    valid = None
    if k_blocks * bs != k:
        valid = (np.arange(k_blocks * bs) < k).reshape(k_blocks, bs)
    float_zero = zero_point == "float"
    codes = np.empty((n, k_blocks, bs), dtype=np.uint8)
    scales = np.empty((n, k_blocks), dtype=np.float32)
    zeros = np.empty((n, k_blocks), dtype=np.float32)
    err = ref = 0.0
    chunk = max(1, _CHUNK_ELEMENTS // (k_blocks * bs))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        blocks = weight_to_blocks(weight[:, start:stop], bs)
        codes[start:stop], scales[start:stop], zeros[start:stop], block_err = _hqq_blocks(
            blocks, valid, bits, symmetric, float_zero, int(iters), float(lp_norm), float(beta), float(kappa),
            scale_dtype,
        )
        err += float(block_err.sum())
        ref += float(np.square(blocks).sum(dtype=np.float64))
    if symmetric:
        zero_points = None
    elif float_zero:
        zero_points = zeros
    else:
        zero_points = zeros.astype(np.uint8)
    qweight = QuantizedWeight(codes, scales, zero_points, bits, bs, k)
    error = float(np.sqrt(err / ref)) if ref > 0 else float(np.sqrt(err))
    return HQQResult(qweight=qweight, float_zero_points=zeros if float_zero else None, error=error)


@register_algorithm
class HQQ(Algorithm):
    """HQQ, calibration-free, per weight; float zero points where the settings ask for them."""

    name = "hqq"
    options_field = "hqq"
    options_type = HQQConfig

    def float_zero_points(self, options: HQQConfig) -> bool:
        return options.zero_point == "float"

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: Any) -> Solution:
        results = [hqq_quantize_weight(w, s.bits, s.block_size, s.symmetric, iters=options.iters,
                                       scale_dtype=group.scale_dtype,
                                       zero_point="float" if s.float_zero_points else "int")
                   for w, s in zip(group.weights, group.settings)]
        return Solution([r.qweight for r in results], [r.error for r in results])
