"""k-quant: importance-weighted least-squares scale (and zero-point) search per block, as llama.cpp's
k-quants do it (``make_qkx2_quants`` / ``make_qkx3_quants`` for scale + min, ``make_qx_quants`` for a
symmetric scale, ggml-quants.c) and as onnxruntime ships it as ``KQuantWeightOnlyQuantConfig``
(``quant_tensor_k_quant_cpu`` in onnxruntime.quantization.neural_compressor.weight_only).

Numpy only: a weight and, optionally, per-input-channel activation statistics in, a
:class:`~onnxq.core.QuantizedWeight` out.

For each block ``x: [bs]`` (``block_size`` consecutive rows of K in one output column) with
element importances ``w: [bs]``, k-quant minimises the weighted error
``E = sum_i w_i (x_i - x_hat_i)^2`` over a grid of candidates:

* asymmetric (``x_hat = (q - z) * S``, integer ``z`` in ``[0, 2**b - 1]``, stored as MatMulNBits
  uint8 zero points): with ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, each candidate
  ``t = 2**b - 1 + rmin + j * rdelta`` (``j = 0 .. grid - 1``) rounds ``l = clip(round(t (x - lo) /
  (hi - lo)), 0, 2**b - 1)`` and fits ``x ~ S l + m`` by weighted least squares (llama.cpp's
  closed form, ``m <= 0`` kept as llama.cpp keeps it). MatMulNBits stores the minimum as an
  integer zero point, so ``z = clip(round(-m / S), 0, 2**b - 1)`` and the scale is fitted again
  for that ``z``: ``S = <w x, l - z> / <w, (l - z)^2>``.
* symmetric (``z = 2**(b-1)`` implied, the full-range signed scale of RTN): each candidate maps
  the block's extreme ``e`` to ``-(2**(b-1) + rmin + j * rdelta)``, rounds
  ``l = clip(round(x t / e), -2**(b-1), 2**(b-1) - 1)`` and fits ``S = <w x, l> / <w, l^2>``
  (``make_qx_quants``).

Every candidate ``(S, z)`` is judged by the error it really gives: ``S`` rounded to the dtype the
scales are stored in, codes recomputed by RTN's rounding (:func:`~onnxq.core.quantize_with_params`:
for fixed ``S, z`` the nearest code is best for any weighting), ``E`` summed. Each block keeps the
best of RTN's own ``(S, z)`` and all candidates, so its weighted error is never above RTN's; the
winner is then refined by alternating least squares (codes for ``S``, ``S`` for the codes) while
``E`` decreases.

Importance (``w``):

* no calibration data: llama.cpp's default for its reference quantizers (and onnxruntime's),
  ``w_i = rms(x) + |x_i|`` with ``rms`` over the block;
* with calibration data: the mean square of each input channel ``a_k = E[x_k^2]`` (the diagonal of
  GPTQ's Hessian: to first order the output error ``E||X (W - W_hat)||^2`` is
  ``sum_k a_k (W_k - W_hat_k)^2``), times llama.cpp's ``sqrt(sigma^2 + x_i^2)`` with
  ``sigma^2 = 2 mean(x^2)`` over the block (its ``quantize_row_q4_K_impl`` with an importance
  matrix).

Calibration is optional: the algorithm declares ``"sq_mean"`` as an *optional* statistic
(:attr:`~onnxq.algorithms.registry.Algorithm.optional_statistics`). Without data the quantization
pass solves each weight alone with ``stats == {}``; with data the calibration driver collects the
statistic block by block on the already quantized model and solves with it.

Padded rows of K (``K % block_size != 0``, any number of blocks) get importance 0: they neither
count in the error nor in the fits. Work is done on chunks of output columns that bound memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, register_algorithm
from onnxq.core import QuantizedWeight, check_quant_params, quantize_blocks, quantize_with_params, weight_to_blocks
from onnxq.errors import OnnxqError

__all__ = ["KQuant", "KQuantConfig", "KQuantResult", "kquant_quantize_weight"]

_CHUNK_ELEMENTS = 2_000_000  # K * columns handled at once: ~10 float32 temporaries stay near 80 MB
_REFINE_STEPS = 2  # alternating least-squares steps on each block's winner


@dataclass(frozen=True)
class KQuantConfig:
    """k-quant options: the candidate grid ``t = levels + rmin + j * rdelta``, ``j = 0 .. grid - 1``.

    The defaults are llama.cpp's ``make_qkx2_quants`` grid for Q4_K (``rmin=-1, rdelta=0.1,
    nstep=20``), which onnxruntime's k_quant uses too.
    """

    grid: int = 20
    rmin: float = -1.0
    rdelta: float = 0.1

    def __post_init__(self) -> None:
        if not (isinstance(self.grid, int) and not isinstance(self.grid, bool) and self.grid >= 0):
            raise OnnxqError(f"k_quant.grid must be a non-negative integer, got {self.grid!r}")
        if not (np.isfinite(self.rmin) and np.isfinite(self.rdelta) and self.rdelta >= 0):
            raise OnnxqError(f"k_quant expected finite rmin and rdelta >= 0, got rmin={self.rmin!r}, "
                             f"rdelta={self.rdelta!r}")


@dataclass(frozen=True)
class KQuantResult:
    """Outcome of :func:`kquant_quantize_weight`.

    Attributes:
        qweight: the quantized weight (uint8 zero points when asymmetric).
        error: ``||W - dequant||_F / ||W||_F`` (unweighted).
        weighted_error: ``sqrt(sum w (W - dequant)^2 / sum w W^2)`` with the importances used.
    """

    qweight: QuantizedWeight
    error: float
    weighted_error: float


def _to_dtype(values: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).astype(dtype).astype(np.float32)


def _importance(blocks: np.ndarray, valid: np.ndarray | None, channel: np.ndarray | None) -> np.ndarray:
    """Element importances ``[n, k_blocks, bs]`` (0 on padded rows); see the module docstring."""
    count = np.float32(blocks.shape[-1]) if valid is None else np.maximum(valid.sum(-1), 1).astype(np.float32)
    mean_sq = np.einsum("...i,...i->...", blocks, blocks) / count  # padded rows are 0
    if channel is None:
        weights = np.abs(blocks) + np.sqrt(mean_sq)[..., None]
    else:
        weights = np.sqrt(np.float32(2) * mean_sq[..., None] + blocks * blocks) * channel
    if valid is not None:
        weights *= valid
    return weights


def _rows_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_i a[r, i] b[r, i]`` per row of ``[m, bs]`` float32 arrays (float32)."""
    return np.einsum("ij,ij->i", a, b)


def _centered_codes(x, scale, zero, qmax) -> np.ndarray:
    """Nearest codes minus the zero point, ``clip(rint(x / S + z), 0, qmax) - z`` float32 (the search's rounding)."""
    recip = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    t = x * recip[:, None]
    t += zero[:, None]
    np.rint(t, out=t)
    np.clip(t, 0, qmax, out=t)
    t -= zero[:, None]
    return t


def _search_error(x, w, scale, zero, qmax) -> np.ndarray:
    """Weighted squared error ``[m]`` of ``(S, z)`` with nearest codes, in float32 (the candidate search)."""
    t = _centered_codes(x, scale, zero, qmax)
    t *= scale[:, None]
    t -= x
    return _rows_dot(w * t, t)


def _exact_error(x, w, scale, zero, bits) -> np.ndarray:
    """Weighted squared error ``[m]`` float64 with the codes RTN's rounding gives (what is stored)."""
    codes = quantize_with_params(x, scale, zero, bits).astype(np.float32)
    diff = (codes - zero[:, None]) * scale[:, None] - x
    return np.einsum("ij,ij->i", w * diff, diff, dtype=np.float64)


def _divide(a, b, ok):
    """``a / b`` where ``ok``, else 0 (float32, shaped like ``b``)."""
    return np.divide(a, b, out=np.zeros(np.shape(b), np.float32), where=ok)


def _asym_candidates(x, w, steps, qmax):
    """``(S, z, ok)`` per grid step: codes for ``(qmax + step) / span``, llama.cpp's joint (S, m) fit, ``z`` the
    integer nearest ``-m / S``, and ``S`` fitted again for that ``z`` (from the same sums: no extra pass)."""
    lo = np.minimum(x.min(-1), np.float32(0))
    span = np.maximum(x.max(-1), np.float32(0)) - lo
    shifted = x - lo[:, None]
    sum_w = w.sum(-1)
    wx = w * x
    sum_x = wx.sum(-1)
    for step in steps:
        iscale = _divide(np.float32(qmax + step), span, span > 0)
        codes = shifted * iscale[:, None]
        np.rint(codes, out=codes)
        np.clip(codes, 0, qmax, out=codes)
        sum_l = _rows_dot(w, codes)
        sum_l2 = _rows_dot(w * codes, codes)
        sum_xl = _rows_dot(wx, codes)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        scale = _divide(sum_w * sum_xl - sum_x * sum_l, det, ok)
        minimum = _divide(sum_l2 * sum_x - sum_l * sum_xl, det, ok)
        positive = minimum > 0  # llama.cpp keeps the minimum <= 0 (then 0 lies in the range)
        scale = np.where(positive, _divide(sum_xl, sum_l2, sum_l2 > 0), scale)
        minimum = np.where(positive, np.float32(0), minimum)
        ok &= scale > 0
        zero = np.clip(np.rint(_divide(-minimum, scale, ok)), 0, qmax).astype(np.float32)
        numerator = sum_xl - zero * sum_x  # <w x, l - z>
        denominator = sum_l2 - 2 * zero * sum_l + zero * zero * sum_w  # <w, (l - z)^2>
        refit = _divide(numerator, denominator, denominator > 0)
        yield refit, zero, ok & (refit > 0)


def _sym_candidates(x, w, steps, half):
    """``(S, ok)`` per grid step: the extreme ``e -> -(half + step)``, codes in ``[-half, half - 1]``, ``S`` fitted."""
    vmin, vmax = x.min(-1), x.max(-1)
    extreme = np.where(np.abs(vmax) > np.abs(vmin), vmax, vmin)
    wx = w * x
    for step in steps:
        iscale = _divide(np.float32(-(half + step)), extreme, extreme != 0)
        codes = x * iscale[:, None]
        np.rint(codes, out=codes)
        np.clip(codes, -half, half - 1, out=codes)
        denominator = _rows_dot(w * codes, codes)
        ok = denominator > 0
        yield _divide(_rows_dot(wx, codes), denominator, ok), ok


def _kquant_blocks(
    x: np.ndarray,
    w: np.ndarray,
    bits: int,
    symmetric: bool,
    options: KQuantConfig,
    scale_dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """k-quant of blocks ``x: [m, bs]`` with importances ``w`` (same shape).

    Returns ``(codes uint8 [m, bs], scales float32 [m], zero points float32 [m], weighted squared
    error float64 [m])``.
    """
    qmax = (1 << bits) - 1
    half = 1 << (bits - 1)
    _, rtn_scale, rtn_zero = quantize_blocks(x, bits, symmetric, 1.0, scale_dtype)
    rtn_zero = rtn_zero.astype(np.float32)
    best_scale, best_zero = rtn_scale, rtn_zero
    best_err = _search_error(x, w, best_scale, best_zero, qmax)

    def consider(scale, zero, ok):
        nonlocal best_scale, best_zero, best_err
        scale = _to_dtype(scale, scale_dtype)
        err = _search_error(x, w, scale, zero, qmax)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)

    steps = [options.rmin + j * options.rdelta for j in range(options.grid)]
    if symmetric:
        zero = np.full(best_scale.shape, half, dtype=np.float32)
        for scale, ok in _sym_candidates(x, w, steps, half):
            consider(scale, zero, ok)
    else:
        for scale, zero, ok in _asym_candidates(x, w, steps, qmax):
            consider(scale, zero, ok)
    for _ in range(_REFINE_STEPS):  # alternating least squares on the winner: S for its codes, codes for S
        codes = _centered_codes(x, best_scale, best_zero, qmax)
        denominator = _rows_dot(w * codes, codes)
        scale = _divide(_rows_dot(w * x, codes), denominator, denominator > 0)
        consider(scale, best_zero, (denominator > 0) & ((scale != 0) if symmetric else (scale > 0)))
    # the search compared in float32 with round-half-even; the stored codes round half up: keep RTN
    # wherever it is not worse in exact terms, so no block ends up above RTN's weighted error
    err = _exact_error(x, w, best_scale, best_zero, bits)
    rtn_err = _exact_error(x, w, rtn_scale, rtn_zero, bits)
    keep_rtn = rtn_err <= err
    best_scale = np.where(keep_rtn, rtn_scale, best_scale)
    best_zero = np.where(keep_rtn, rtn_zero, best_zero)
    codes = quantize_with_params(x, best_scale, best_zero, bits)
    return codes, best_scale.astype(np.float32), best_zero, np.minimum(err, rtn_err)


def kquant_quantize_weight(
    weight: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = False,
    *,
    importance: np.ndarray | None = None,
    options: KQuantConfig | None = None,
    scale_dtype: np.dtype | type = np.float32,
) -> KQuantResult:
    """k-quant ``weight: [K, N]`` in blocks of ``block_size`` along K (see the module docstring).

    Args:
        weight: ``[K, N]`` float weight in MatMul orientation; not modified.
        bits: code width, 2..8.
        block_size: rows of K per block (any positive size; K need not be a multiple); ``-1`` = all of K.
        symmetric: implied zero point ``2**(bits-1)``; else uint8 zero points.
        importance: ``[K]`` non-negative per-input-channel activation mean square ``E[x_k^2]``, or
            None (llama.cpp's weight-only importance).
        options: the candidate grid (:class:`KQuantConfig`).
        scale_dtype: dtype the scales are stored in; candidates are judged with scales rounded to it.

    Returns:
        :class:`KQuantResult`; per block, its weighted error is never above RTN's.
    """
    try:
        check_quant_params(bits, block_size)
    except ValueError as exc:
        raise OnnxqError(f"k_quant: {exc}") from None
    options = options or KQuantConfig()
    weight = np.asarray(weight)
    if weight.ndim != 2 or 0 in weight.shape:
        raise OnnxqError(f"k_quant expected a non-empty 2-D weight [K, N], got shape {weight.shape}")
    if not np.all(np.isfinite(weight)):
        raise OnnxqError("k_quant expected a finite weight, found NaN or inf")
    k, n = weight.shape
    bs = k if block_size == -1 else int(block_size)
    k_blocks = -(-k // bs)
    valid = (np.arange(k_blocks * bs) < k).reshape(k_blocks, bs).astype(np.float32) if k_blocks * bs != k else None
    channel = None
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float64)
        if importance.shape != (k,) or not np.all(np.isfinite(importance)) or np.any(importance < 0):
            raise OnnxqError(f"k_quant importance must be finite, non-negative and of shape ({k},), "
                             f"got shape {importance.shape}")
        peak = importance.max()
        scaled = importance / peak if peak > 0 else np.ones(k)  # only ratios matter; keeps float32 sums in range
        channel = np.zeros(k_blocks * bs, np.float32)
        channel[:k] = scaled
        channel = channel.reshape(k_blocks, bs)
    codes = np.empty((n, k_blocks, bs), dtype=np.uint8)
    scales = np.empty((n, k_blocks), dtype=np.float32)
    zeros = np.empty((n, k_blocks), dtype=np.float32)
    err = ref = weighted = weighted_ref = 0.0
    chunk = max(1, _CHUNK_ELEMENTS // (k_blocks * bs))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        blocks = weight_to_blocks(weight[:, start:stop], bs)
        weights = _importance(blocks, valid, channel)
        shape = blocks.shape
        block_codes, block_scales, block_zeros, block_err = _kquant_blocks(
            blocks.reshape(-1, bs), weights.reshape(-1, bs), bits, symmetric, options, scale_dtype)
        codes[start:stop] = block_codes.reshape(shape)
        scales[start:stop] = block_scales.reshape(shape[:2])
        zeros[start:stop] = block_zeros.reshape(shape[:2])
        diff = blocks - (codes[start:stop].astype(np.float32) - zeros[start:stop, :, None]) * scales[start:stop, :, None]
        err += float(np.vdot(diff, diff))  # padded rows: 0 - 0
        ref += float(np.vdot(blocks, blocks))
        weighted += float(block_err.sum())
        weighted_ref += float(np.vdot(weights * blocks, blocks))
    qweight = QuantizedWeight(codes, scales, None if symmetric else zeros.astype(np.uint8), bits, bs, k)
    return KQuantResult(qweight, float(np.sqrt(err / ref)) if ref > 0 else float(np.sqrt(err)),
                        float(np.sqrt(weighted / weighted_ref)) if weighted_ref > 0 else float(np.sqrt(weighted)))


@register_algorithm
class KQuant(Algorithm):
    """``k_quant``: llama.cpp's weighted least-squares scale search per weight; calibration optional."""

    separable = True

    name = "k_quant"
    optional_statistics = ("sq_mean",)
    options_field = "k_quant"
    options_type = KQuantConfig

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: KQuantConfig) -> Solution:
        importance = stats.get("sq_mean")
        results = [kquant_quantize_weight(w, s.bits, s.block_size, s.symmetric, importance=importance,
                                          options=options, scale_dtype=group.scale_dtype)
                   for w, s in zip(group.weights, group.settings)]
        return Solution([r.qweight for r in results], [r.error for r in results])
