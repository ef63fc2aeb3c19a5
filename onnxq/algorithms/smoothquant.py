"""SmoothQuant: migrating activation outliers into the weights (Xiao et al., arXiv 2211.10438).

Numpy only: statistics in, per-channel smoothing scales out; folding ``1 / s`` into the
graph and running the int8 quantizer are the caller's job (:mod:`onnxq.recipes.smoothquant`).

For layers ``y_i = x @ W_i`` sharing one input ``x: [T, K]`` (``W_i: [K, N_i]``, e.g.
the q/k/v projections), SmoothQuant rewrites ``x @ W_i = (x / s) @ (s[:, None] * W_i)``
with (eq. 4 of the paper)

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

where ``max|X_j|`` is the largest ``|x|`` of input channel ``j`` over the calibration
data and ``max|W_j|`` the largest ``|w|`` of row ``j`` over all the siblings' weights.
With ``alpha = 0.5`` the smoothed activation and weight share the same range per
channel, ``max|X_j / s_j| = max|s_j W_j| = sqrt(max|X_j| max|W_j|)``, so the
per-tensor int8 scale of ``x / s`` is no longer set by a few outlier channels.

``alpha`` can be searched per input group (the paper tunes it per model; here per
group, on a grid over ``0.3..0.7``), minimising the W8A8 fake-quant output error

    L(alpha) = sum_i ||x @ W_i - Q8(x / s) @ Q8(s[:, None] * W_i)||_F^2

on a sample of calibration rows, with ``Q8`` symmetric int8 round-to-nearest (levels
``-127..127``): per tensor for the activation (its range ``max_j max|X_j| / s_j`` taken
from the full calibration statistics, as a MinMax calibrator sets it) and per output
column for the weights (as per-channel weight quantization does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from onnxq.errors import OnnxqError

__all__ = [
    "SMOOTHQUANT_ALPHAS",
    "SmoothSearchResult",
    "fake_quant_activation",
    "fake_quant_weight",
    "smooth_scales",
    "smoothquant_search_alpha",
    "w8a8_output_error",
    "weight_row_absmax",
]

SMOOTHQUANT_ALPHAS = tuple(round(0.3 + 0.05 * i, 2) for i in range(9))  # 0.30, 0.35, ..., 0.70
_MIN_STAT = 1e-5  # the reference implementation clamps both statistics from below
_SCALE_RANGE = (1e-5, 1e5)
_QMAX = 127.0


def _vector(name: str, values: np.ndarray, k: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or (k is not None and array.shape[0] != k):
        want = "[K]" if k is None else f"[{k}]"
        raise OnnxqError(f"{name} must have shape {want}, found {array.shape}")
    if not np.isfinite(array).all() or (array < 0).any():
        raise OnnxqError(f"{name} must hold finite values >= 0")
    return array


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= float(alpha) <= 1.0:
        raise OnnxqError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    return float(alpha)


def weight_row_absmax(weights: Sequence[np.ndarray]) -> np.ndarray:
    """``max|W_j|``: float64 ``[K]``, the largest ``|w|`` of row ``j`` over all ``weights`` (each ``[K, N_i]``)."""
    if not weights:
        raise OnnxqError("weight_row_absmax needs at least one weight")
    k = weights[0].shape[0]
    result = np.zeros(k, np.float64)
    for w in weights:
        if w.ndim != 2 or w.shape[0] != k:
            raise OnnxqError(f"sibling weights must all be [K={k}, N], found {w.shape}")
        np.maximum(result, np.abs(w).max(axis=1), out=result)
    return result


def smooth_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel scales ``s: [K]`` float32 (arXiv 2211.10438, eq. 4).

    ``s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)`` with ``act_absmax: [K]`` (max
    ``|x|`` per input channel over the calibration data) and ``weight_absmax: [K]`` (max
    ``|w|`` per row over every sibling weight, :func:`weight_row_absmax`). Both statistics
    are clamped to at least ``1e-5`` as in the reference code, and ``s`` to
    ``[1e-5, 1e5]``. A channel whose activation or weights are all zero gets ``s_j = 1``
    (it carries nothing to migrate, and a tiny ``s_j`` would blow up unseen inputs).
    """
    alpha = _check_alpha(alpha)
    a = _vector("act_absmax", act_absmax)
    w = _vector("weight_absmax", weight_absmax, a.shape[0])
    s = np.maximum(a, _MIN_STAT) ** alpha / np.maximum(w, _MIN_STAT) ** (1.0 - alpha)
    s = np.clip(s, *_SCALE_RANGE)
    s[(a == 0) | (w == 0)] = 1.0
    return s.astype(np.float32)


def fake_quant_activation(x: np.ndarray, absmax: float) -> np.ndarray:
    """``x`` (any shape) through per-tensor symmetric int8 (levels -127..127, step ``absmax / 127``)."""
    if absmax <= 0:
        return np.zeros_like(x)
    step = absmax / _QMAX
    return np.clip(np.rint(x / step), -_QMAX, _QMAX) * step


def fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """``w: [K, N]`` through per-output-column symmetric int8 (step ``max_k |w[k, n]| / 127``)."""
    step = np.abs(w).max(axis=0, keepdims=True) / _QMAX
    safe = np.where(step > 0, step, 1.0)
    return np.clip(np.rint(w / safe), -_QMAX, _QMAX) * step


def _quantized_product(x: np.ndarray, w: np.ndarray, s: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``Q8(x / s) @ Q8(s[:, None] * w)`` in float32 (the int8 grid error dwarfs float32 rounding)."""
    xq = fake_quant_activation(x / s, float((a / s).max())).astype(np.float32)
    wq = fake_quant_weight(s[:, None] * w).astype(np.float32)
    return xq @ wq


def w8a8_output_error(x: np.ndarray, weight: np.ndarray, scales: np.ndarray, act_absmax: np.ndarray) -> float:
    """``||x @ W - Q8(x / s) @ Q8(s[:, None] * W)||_F^2`` for ``x: [T, K]``, ``W: [K, N]``, ``s: [K]``.

    The activation's int8 range is ``max_j act_absmax_j / s_j`` (``act_absmax: [K]``, the
    calibration statistic), not the range of ``x`` alone (see the module docstring).
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    s = np.asarray(scales, dtype=np.float64)
    a = np.asarray(act_absmax, dtype=np.float64)
    return float(np.square(x @ w - _quantized_product(x, w, s, a)).sum())


@dataclass(frozen=True)
class SmoothSearchResult:
    """Outcome of :func:`smoothquant_search_alpha`.

    Attributes:
        scales: float32 ``[K]``: the smoothing scales of the chosen ``alpha``.
        alpha: the chosen exponent.
        alphas: the grid searched.
        loss_by_alpha: float64 ``[len(alphas)]``: the W8A8 output error for each alpha.
        loss_plain: the same error without smoothing (``s = 1``), for reports.
    """

    scales: np.ndarray
    alpha: float
    alphas: tuple[float, ...]
    loss_by_alpha: np.ndarray
    loss_plain: float


def smoothquant_search_alpha(
    x: np.ndarray,
    weights: Sequence[np.ndarray],
    act_absmax: np.ndarray,
    alphas: Sequence[float] = SMOOTHQUANT_ALPHAS,
    *,
    max_columns: int = 4096,
    seed: int = 0,
) -> SmoothSearchResult:
    """Pick SmoothQuant's ``alpha`` for one input group (see the module docstring).

    Args:
        x: ``[T, K]`` sampled input rows shared by the sibling layers.
        weights: the siblings' ``W_i: [K, N_i]``.
        act_absmax: ``[K]`` max ``|x|`` per channel over all calibration data.
        alphas: the grid (default ``0.30, 0.35, ..., 0.70``); ties go to the first.
        max_columns: when the siblings have more output columns in all, the loss is
            summed over this many of them drawn without replacement (``seed``), e.g. for
            a wide lm_head: each column is quantized on its own, so times ``N / max_columns``
            that sum is an unbiased estimate of the full loss (the returned losses are the
            sums over the sample).
        seed: seed of that column draw.

    Returns:
        :class:`SmoothSearchResult`.
    """
    if not len(alphas):
        raise OnnxqError("the SmoothQuant alpha grid is empty")
    alphas = tuple(_check_alpha(a) for a in alphas)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise OnnxqError(f"SmoothQuant search needs activation rows [T, K] with T > 0, found {x.shape}")
    w_max = weight_row_absmax(weights)
    k = w_max.shape[0]
    if x.shape[1] != k:
        raise OnnxqError(f"activation rows have K={x.shape[1]} channels; the weights have K={k}")
    a = _vector("act_absmax", act_absmax, k)
    w = np.concatenate([np.asarray(wi, dtype=np.float64) for wi in weights], axis=1)
    if w.shape[1] > max_columns:
        columns = np.sort(np.random.default_rng(seed).choice(w.shape[1], max_columns, replace=False))
        w = w[:, columns]
    reference = x @ w

    def loss(scales: np.ndarray) -> float:
        return float(np.square(reference - _quantized_product(x, w, np.asarray(scales, np.float64), a)).sum())

    # w_max stays the statistic of all columns: it sets s, whatever columns the loss is measured on
    losses = np.array([loss(smooth_scales(a, w_max, alpha)) for alpha in alphas])
    best = int(np.argmin(losses))
    return SmoothSearchResult(smooth_scales(a, w_max, alphas[best]), alphas[best], alphas, losses, loss(np.ones(k)))
