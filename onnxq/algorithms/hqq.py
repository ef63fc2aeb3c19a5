"""HQQ: half-quadratic quantization (Badri & Shaji 2023, "Half-Quadratic Quantization of Large
Machine Learning Models", reference code mobiusml/hqq ``optimize_weights_proximal_legacy``, the
algorithm of ONNX Runtime's ``HQQWeightOnlyQuantizer``); calibration-free.

Numpy only: a weight in, a :class:`~onnxq.core.QuantizedWeight` out, no data needed.

For each block ``w`` (``block_size`` consecutive rows of K in one output column) HQQ fixes the
min-max scale ``S`` and optimises the zero point ``z`` for a robust ``l_p`` error (``p < 1``),
``min_z ||w - Q_z(w)||_p^p`` with ``Q_z(w) = (clip(round(w / S + z), 0, 2**b - 1) - z) * S``,
by half-quadratic splitting (an auxiliary ``W_e ~ w - Q_z(w)``) and alternating:

    q     = clip(round(w / S + z), 0, 2**b - 1)
    W_e   = shrink_p(w - (q - z) * S, beta)      shrink_p(x) = sign(x) relu(|x| - |x|**(p-1) / beta)
    z     = mean(q - (w - W_e) / S)              (the exact minimiser of the quadratic part)
    beta *= kappa

``z`` starts at ``round(-min(w) / S)`` (``round_zero``, as ONNX Runtime calls the reference; RTN's zero
point when the block's range includes 0). A block stops when its mean ``|w - Q_z(w)|`` (the
reference's criterion, which the reference applies to the whole tensor at once) stops decreasing,
and keeps its iterate of lowest criterion. Unlike ONNX Runtime, which zero-pads K to a multiple of
the block, the padding takes no part in a block's range, zero point or error.

The work runs in the scaled domain ``w / S`` (one multiply per weight, then per iteration only an
add, a rounding, a subtraction and row sums), on thousands of blocks at once; blocks that stopped
leave the working set. ``shrink_p`` is zero wherever ``|x| <= beta**(-1 / (2 - p))``; since an
unclipped error is at most ``S / 2``, only blocks whose clipped extremes overshoot that bound (known
from the block's range, no pass over the data) evaluate the power.

Zero points:

* ``zero_point="float"`` (the reference's and ONNX Runtime's HQQ): the above; ``z`` stays a float,
  rounded to ``scale_dtype`` (the dtype MatMulNBits stores float zero points in: the activation's,
  input T3 ``[N, k_blocks]``); its CPU kernel (1.32) runs them for 2 and 4 bits.
* ``zero_point="int"``: the same iterations from RTN's scale and zero point (the range includes 0, so
  ``z`` fits the codes ``[0, 2**b - 1]``), the result rounded to an integer and stored as uint8.
  HQQ's zero point moves less than half a step from its start, so this is RTN's zero point on almost
  every block (SmolLM2-135M int4 block 128: 93 of 450,816 blocks differ, none with a lower error).
* ``symmetric=True``: the implied zero point ``2**(b-1)`` cannot move, so HQQ has nothing to optimise
  and the result is RTN's.

The scale is never refitted. A least-squares (or half-quadratic) scale fit lowers the weight error
further but moves the block's extremes, and on SmolLM2-135M (int4 block 128, KL to the float model
over 16 windows of the shakespeare eval split) it made the quantized model worse: float zero points
0.5528 with per-iterate refits against 0.5466 without; uint8 zero points 0.5715 with scale steps
against RTN's 0.5464; symmetric 0.7591 against RTN's 0.6751 (RTN maps each block's extreme exactly).

Finally each block keeps, of RTN (:func:`~onnxq.core.quantize_weight`) and HQQ's result, the one of
lower squared error ``||w - Q(w)||^2``: never worse than RTN on the weight MSE, block by block. Codes
are computed by :func:`~onnxq.core.quantize_with_params` (RTN's rounding) for the scale and zero
point as stored, so ``qweight.dequantize()`` is what the runtime computes. Padded rows of K take no
part: the last, partial block of each column is solved as a shorter block. Column chunks run on
up to 4 threads (numpy releases the GIL), one chunk's temporaries per thread.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, register_algorithm
from onnxq.core import QuantizedWeight, check_quant_params, quantize_blocks, quantize_with_params, weight_to_blocks
from onnxq.errors import OnnxqError

__all__ = ["HQQConfig", "HQQ", "HQQResult", "hqq_quantize_weight"]

_COLUMN_ELEMENTS = 1 << 21  # weights per column chunk (8 MB in float32), one chunk per thread at a time
_ITER_BLOCKS = 4096  # blocks iterated together: each working array (2 MB at block 128) stays in cache
_THREADS = min(4, os.cpu_count() or 1)


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


@dataclass(frozen=True)
class _Params:
    """The settings of one :func:`hqq_quantize_weight` call, checked."""

    bits: int
    symmetric: bool
    float_zero: bool
    iters: int
    lp_norm: float
    beta: float
    kappa: float
    scale_dtype: Any

    @property
    def qmax(self) -> np.float32:
        return np.float32((1 << self.bits) - 1)

    def outlier_bound(self, beta: float) -> float:
        """``|x|`` above which ``shrink_p(x, beta)`` is not 0: ``beta**(-1 / (2 - p))``."""
        return beta ** (-1.0 / (2.0 - self.lp_norm))


def _to_dtype(values: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).astype(dtype).astype(np.float32)


def _reciprocal(scale: np.ndarray) -> np.ndarray:
    return np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)


def _row_sum(values: np.ndarray) -> np.ndarray:
    return np.einsum("ij->i", values)


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """``shrink_p(x, beta) = sign(x) relu(|x| - |x|**(p-1) / beta)``: the ``l_p`` proximal step
    (``p = 1``: soft thresholding at ``1 / beta``)."""
    magnitude = np.abs(x)
    if p == 1:
        threshold = np.float32(1.0 / beta)
    else:
        with np.errstate(divide="ignore"):
            threshold = np.power(magnitude, np.float32(p - 1))  # inf at 0: the result is 0 there
        threshold *= np.float32(1.0 / beta)
    np.subtract(magnitude, threshold, out=magnitude)
    np.maximum(magnitude, 0, out=magnitude)
    return np.copysign(magnitude, x, out=magnitude)


def _squared_errors(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: np.float32) -> np.ndarray:
    """float64 ``||x - Q(x)||^2`` per row of ``x: [m, L]`` for ``scale, zero: [m]``. The codes come from
    ``rint``, which differs from the stored rounding only on exact ties, where ``|x - Q(x)|`` is the same."""
    work = x * _reciprocal(scale)[:, None]
    work += zero[:, None]
    np.rint(work, out=work)
    np.clip(work, 0, qmax, out=work)
    work -= zero[:, None]
    work *= scale[:, None]
    np.subtract(x, work, out=work)
    return np.einsum("ij,ij->i", work, work, dtype=np.float64)


def _zero_steps(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, prm: _Params) -> np.ndarray:
    """HQQ's zero-point iterations on ``x: [m, L]`` for fixed ``scale: [m]``, from ``zero: [m]``; returns
    each row's zero point of lowest mean ``|x - Q(x)|`` (float32 ``[m]``, in ``scale_dtype``'s values)."""
    m, length = x.shape
    beta = prm.beta
    zero = _to_dtype(zero, prm.scale_dtype)
    best_zero = zero.copy()
    best_crit = np.full(m, np.inf, dtype=np.float32)
    rows = np.arange(m)  # the working rows, as indices into x
    scaled = x * _reciprocal(scale)[:, None]  # w / S
    low, high = scaled.min(axis=1), scaled.max(axis=1)
    step = scale.copy()
    active = np.ones(m, dtype=bool)  # over the working rows
    work, codes = np.empty_like(scaled), np.empty_like(scaled)
    for _ in range(prm.iters):
        np.add(scaled, zero[:, None], out=work)
        np.rint(work, out=codes)  # a tie gives |d| = 0.5 either way: the criterion does not change
        np.clip(codes, 0, prm.qmax, out=codes)
        np.subtract(work, codes, out=work)  # d = (w - W_r) / S
        np.abs(work, out=codes)
        crit = _row_sum(codes)  # sum |w - W_r| / S: the row's criterion up to its constant S
        active &= crit < best_crit[rows]
        if not active.any():
            break
        best_crit[rows[active]] = crit[active]
        best_zero[rows[active]] = zero[active]
        # z <- mean(q - (w - W_e) / S) = z - mean(d) + mean(W_e / S)
        update = _row_sum(work)
        # |d| <= 1/2 where nothing is clipped and is the overshoot of a clipped extreme otherwise
        overshoot = np.maximum(np.maximum(high + zero - prm.qmax, -(low + zero)), np.float32(0.5))
        outliers = np.flatnonzero(active & (overshoot * step > prm.outlier_bound(beta)))
        if outliers.size:
            s = step[outliers, None]
            update[outliers] -= _row_sum(_shrink(work[outliers] * s, beta, prm.lp_norm) / s)
        zero = _to_dtype(zero - update / np.float32(length), prm.scale_dtype)
        beta *= prm.kappa
        if active.sum() < 0.75 * rows.size:  # stopped rows leave the working set
            rows, scaled, zero, step = rows[active], scaled[active], zero[active], step[active]
            low, high = low[active], high[active]
            active = np.ones(rows.size, dtype=bool)
            work, codes = np.empty_like(scaled), np.empty_like(scaled)
    return best_zero


def _solve(x: np.ndarray, prm: _Params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scale, zero, squared error)`` float32/float32/float64 ``[m]`` for the blocks ``x: [m, L]``."""
    _, rtn_scale, rtn_zero = quantize_blocks(x, prm.bits, prm.symmetric, 1.0, prm.scale_dtype)
    rtn_zero = rtn_zero.astype(np.float32)
    rtn_err = _squared_errors(x, rtn_scale, rtn_zero, prm.qmax)
    if prm.iters == 0 or prm.symmetric:
        return rtn_scale, rtn_zero, rtn_err
    if prm.float_zero:
        vmin = x.min(axis=1)
        scale = _to_dtype((x.max(axis=1) - vmin) / prm.qmax, prm.scale_dtype)
        zero = _zero_steps(x, scale, np.rint(-vmin * _reciprocal(scale)), prm)
    else:
        scale = rtn_scale
        zero = np.clip(np.rint(_zero_steps(x, scale, rtn_zero, prm)), 0, prm.qmax)
    err = _squared_errors(x, scale, zero, prm.qmax)
    better = err < rtn_err
    return np.where(better, scale, rtn_scale), np.where(better, zero, rtn_zero), np.where(better, err, rtn_err)


def _solve_blocks(x: np.ndarray, prm: _Params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_solve` on ``x: [m, L]`` in groups of ``_ITER_BLOCKS`` rows."""
    parts = [_solve(x[i:i + _ITER_BLOCKS], prm) for i in range(0, x.shape[0], _ITER_BLOCKS)]
    return tuple(np.concatenate(values) for values in zip(*parts))


def _map_columns(work: Callable[[int, int], Any], n: int, chunk: int) -> list[Any]:
    """``work(start, stop)`` on chunks of ``n`` columns, on up to ``_THREADS`` threads."""
    spans = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    if len(spans) == 1 or _THREADS == 1:
        return [work(*span) for span in spans]
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        return [future.result() for future in [pool.submit(work, *span) for span in spans]]


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
        symmetric: implied zero point ``2**(b-1)``: nothing for HQQ to move, the result is RTN's.
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
    prm = _Params(int(bits), bool(symmetric), zero_point == "float", int(iters), float(lp_norm), float(beta),
                  float(kappa), scale_dtype)
    k, n = weight.shape
    bs = k if block_size == -1 else int(block_size)
    k_blocks, full, tail = -(-k // bs), k // bs, k % bs
    codes = np.empty((n, k_blocks, bs), dtype=np.uint8)
    scales = np.empty((n, k_blocks), dtype=np.float32)
    zeros = np.empty((n, k_blocks), dtype=np.float32)

    def work(start: int, stop: int) -> tuple[float, float]:
        blocks = weight_to_blocks(weight[:, start:stop], bs)  # [c, k_blocks, bs], K zero-padded
        err = 0.0
        for part, length in ((slice(0, full), bs), (slice(full, k_blocks), tail)):
            if part.start == part.stop or length == 0:
                continue
            x = np.ascontiguousarray(blocks[:, part, :length]).reshape(-1, length)
            scale, zero, block_err = _solve_blocks(x, prm)
            scales[start:stop, part] = scale.reshape(stop - start, -1)
            zeros[start:stop, part] = zero.reshape(stop - start, -1)
            err += float(block_err.sum())
        codes[start:stop] = quantize_with_params(blocks, scales[start:stop], zeros[start:stop], prm.bits)
        return err, float(np.einsum("ijk,ijk->", blocks, blocks, dtype=np.float64))

    sums = _map_columns(work, n, max(1, _COLUMN_ELEMENTS // (k_blocks * bs)))
    err, ref = sum(s[0] for s in sums), sum(s[1] for s in sums)
    if symmetric:
        zero_points = None
    elif prm.float_zero:
        zero_points = zeros
    else:
        zero_points = zeros.astype(np.uint8)
    qweight = QuantizedWeight(codes, scales, zero_points, prm.bits, bs, k)
    error = float(np.sqrt(err / ref)) if ref > 0 else float(np.sqrt(err))
    return HQQResult(qweight=qweight, float_zero_points=zeros if prm.float_zero else None, error=error)


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
