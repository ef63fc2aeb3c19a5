"""AWQ: activation-aware weight quantization (Lin et al., arXiv 2306.00978).

Numpy only: activation samples and statistics in, scales and
:class:`~onnxq.core.QuantizedWeight` out; folding ``1 / s`` into the op that feeds
the layers is the caller's (graph) job.

Two searches, both on a sample ``x: [T, K]`` of the input shared by sibling
layers ``y_i = x @ W_i`` (``W_i: [K, N_i]``, e.g. the q/k/v projections):

1. Scale search (sec. 3.2): with ``a = act_mean_abs`` (mean ``|x|`` per input channel over
   all calibration data) and ``s(alpha) = a**alpha / sqrt(max(a**alpha) * min(a**alpha))``,
   pick ``alpha`` on a grid in ``[0, 1]`` minimising
   ``sum_i ||x @ W_i - (x / s) @ Q(s[:, None] * W_i)||_F^2`` (``Q``: round-to-nearest,
   dequantized). ``alpha = 0`` gives ``s = 1``, plain RTN, and ties go to the smallest
   ``alpha``, so the chosen scales are never worse than RTN on this objective.
2. Clip search (sec. 3.3, the reference ``auto_clip``): per output column and block, pick
   the clip ratio minimising that block's contribution to the output error,
   ``||x_blk @ (w_blk - Q_r(w_blk))||^2``. For asymmetric blocks both ends of the range
   are scaled by the ratio.

Both losses are computed through a factor ``R`` with ``R^T R = x^T x`` (``R = x`` when
it is the smaller one, else the ``[K, K]`` QR factor), and the clip search uses one
``[min(T, bs), bs]`` factor per block, so the cost is ``O(min(T, K) K N)`` per alpha and
``O(min(T, bs) K N)`` per clip ratio. Output columns are processed in chunks so memory
stays bounded by a few ``[K, chunk]`` arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, effective_error, register_algorithm
from onnxq.core import (
    QuantizedWeight,
    check_quant_params,
    dequantize_blocks,
    quantize_blocks,
    quantize_weight,
    weight_to_blocks,
)
from onnxq.errors import OnnxqError

__all__ = [
    "AWQ",
    "AWQConfig",
    "AWQ_CLIP_RATIOS",
    "AWQResult",
    "AWQScaleResult",
    "awq_clip_search",
    "awq_quantize_weights",
    "awq_scales",
    "awq_search_scale",
]

AWQ_CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.00, 0.95, ..., 0.50
_MIN_SCALE = 1e-4  # the reference clamps a**alpha from below before normalising
_COLUMN_CHUNK = 512  # output columns handled at once


@dataclass(frozen=True)
class AWQConfig:
    """AWQ options (arXiv 2306.00978); see :func:`onnxq.algorithms.awq.awq_quantize_weights`.

    Attributes:
        grid: number of alphas in ``[0, 1]`` tried by the scale search.
        scale_search: search the per-input-channel scales (off: scales of 1, clip search only).
        clip: run the per-(channel, block) clip search after scaling.
        sample_rows: activation rows kept (reservoir sample) per input tensor for the losses.
    """

    grid: int = 20
    scale_search: bool = True
    clip: bool = True
    sample_rows: int = 4096

    def __post_init__(self) -> None:
        if not (isinstance(self.grid, int) and self.grid >= 2):
            raise OnnxqError(f"awq.grid must be an integer >= 2, got {self.grid!r}")
        if not (isinstance(self.sample_rows, int) and self.sample_rows >= 16):
            raise OnnxqError(f"awq.sample_rows must be an integer >= 16, got {self.sample_rows!r}")


@dataclass(frozen=True)
class AWQScaleResult:
    """Outcome of :func:`awq_search_scale`.

    Attributes:
        scales: float32 ``[K]``: multiply the weights' rows by it and divide the input by it.
        alpha: the chosen exponent.
        loss_by_alpha: float64 ``[grid]``: the objective for each alpha of ``linspace(0, 1, grid)``.
        loss_rtn: the objective of plain RTN (``loss_by_alpha[0]``, alpha = 0).
    """

    scales: np.ndarray
    alpha: float
    loss_by_alpha: np.ndarray
    loss_rtn: float


@dataclass(frozen=True)
class AWQResult:
    """Outcome of :func:`awq_quantize_weights`.

    Attributes:
        scales: float32 ``[K]``; the layers compute ``(x / scales) @ qweights[i].dequantize()``.
        qweights: one quantized ``scales[:, None] * W_i`` per sibling, in input order.
        search: the scale search's details.
    """

    scales: np.ndarray
    qweights: tuple[QuantizedWeight, ...]
    search: AWQScaleResult


def _check(bits: int, block_size: int) -> None:
    try:
        check_quant_params(bits, block_size)
    except ValueError as exc:
        raise OnnxqError(str(exc)) from None


def _as_input(x: np.ndarray, k: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != k or x.shape[0] == 0:
        raise OnnxqError(f"AWQ expected an input sample x of shape [T, K={k}] with T > 0, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise OnnxqError("AWQ expected a finite input sample x, found NaN or inf")
    return x.astype(np.float32, copy=False)


def _as_weight(weight: np.ndarray, k: int | None = None) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.ndim != 2 or (k is not None and weight.shape[0] != k):
        want = "[K, N]" if k is None else f"[K={k}, N]"
        raise OnnxqError(f"AWQ expected a 2-D weight {want}, got shape {weight.shape}")
    if not np.all(np.isfinite(weight)):
        raise OnnxqError("AWQ expected a finite weight, found NaN or inf")
    return weight.astype(np.float32, copy=False)


def _row_factor(x: np.ndarray) -> np.ndarray:
    """``R: [min(T, K), K]`` with ``R^T R = x^T x`` (``x`` itself when ``T <= K``)."""
    if x.shape[0] <= x.shape[1]:
        return x
    return np.linalg.qr(x.astype(np.float64), mode="r").astype(np.float32)


def awq_scales(act_mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's per-channel scales ``s = a**alpha / sqrt(max * min)`` (arXiv 2306.00978 eq. 5).

    ``a**alpha`` is clamped to ``>= 1e-4`` before normalising, as in the reference code.
    Returns float32 ``[K]``; ``alpha = 0`` gives exactly 1 everywhere.
    """
    powered = np.maximum(np.asarray(act_mean_abs, dtype=np.float64) ** alpha, _MIN_SCALE)
    return (powered / np.sqrt(powered.max() * powered.min())).astype(np.float32)


def _scaled_loss(
    factor: np.ndarray, weight: np.ndarray, s: np.ndarray, bits: int, block_size: int, symmetric: bool, scale_dtype
) -> float:
    """``||R (W - Q(s W) / s)||_F^2`` = ``||x W - (x / s) Q(s W)||_F^2``, chunked over N."""
    total = 0.0
    for start in range(0, weight.shape[1], _COLUMN_CHUNK):
        chunk = weight[:, start:start + _COLUMN_CHUNK]
        deq = quantize_weight(s[:, None] * chunk, bits, block_size, symmetric, scale_dtype=scale_dtype).dequantize()
        out = factor @ (chunk - deq / s[:, None])
        total += float(np.vdot(out, out))
    return total


def awq_search_scale(
    weights: Sequence[np.ndarray],
    x: np.ndarray,
    act_mean_abs: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    *,
    grid: int = 20,
    scale_dtype: np.dtype | type = np.float32,
    max_columns: int | None = 8192,
) -> AWQScaleResult:
    """Grid-search AWQ's per-input-channel scale for layers sharing one input (arXiv 2306.00978 sec. 3.2).

    Args:
        weights: sibling weights ``[K, N_i]`` that all read the same input.
        x: ``[T, K]`` sample of that input (the objective is measured on it).
        act_mean_abs: ``[K]`` mean ``|x|`` per channel over all calibration data.
        bits, block_size, symmetric, scale_dtype: the RTN quantizer ``Q`` (see
            :func:`~onnxq.core.quantize_weight`).
        grid: number of alphas in ``linspace(0, 1, grid)`` (>= 1; alpha = 0 is always tried).
        max_columns: a weight with more output columns (e.g. an lm_head with a 50k vocabulary)
            is scored on this many evenly spaced columns, its loss scaled by ``N / max_columns``
            so siblings stay comparable (the same columns for every alpha); ``None``: all.

    Returns:
        :class:`AWQScaleResult` with the scales of the alpha of lowest loss (the first on a tie).
    """
    _check(bits, block_size)
    if not weights:
        raise OnnxqError("AWQ expected at least one weight sharing the input, got none")
    if not isinstance(grid, (int, np.integer)) or grid < 1:
        raise OnnxqError(f"AWQ grid must be a positive integer, got {grid!r}")
    first = _as_weight(weights[0])
    k = first.shape[0]
    weights = [first] + [_as_weight(w, k) for w in weights[1:]]
    x = _as_input(x, k)
    act_mean_abs = np.asarray(act_mean_abs)
    if act_mean_abs.shape != (k,) or not np.all(np.isfinite(act_mean_abs)) or np.any(act_mean_abs < 0):
        raise OnnxqError(
            f"AWQ expected act_mean_abs of shape [K={k}] with finite values >= 0, got shape {act_mean_abs.shape}"
        )
    factor = _row_factor(x)
    scored = []  # (columns scored, weight of their loss)
    for w in weights:
        n = w.shape[1]
        if max_columns is not None and n > max_columns:
            columns = np.linspace(0, n - 1, max_columns).round().astype(np.int64)
            scored.append((w[:, columns], n / max_columns))
        else:
            scored.append((w, 1.0))
    alphas = np.linspace(0.0, 1.0, grid) if grid > 1 else np.zeros(1)
    losses = np.empty(len(alphas), dtype=np.float64)
    for j, alpha in enumerate(alphas):
        s = awq_scales(act_mean_abs, float(alpha))
        losses[j] = sum(factor_weight * _scaled_loss(factor, w, s, bits, block_size, symmetric, scale_dtype)
                        for w, factor_weight in scored)
    best = int(np.argmin(losses))
    return AWQScaleResult(
        scales=awq_scales(act_mean_abs, float(alphas[best])),
        alpha=float(alphas[best]),
        loss_by_alpha=losses,
        loss_rtn=float(losses[0]),
    )


def _block_factors(x: np.ndarray, bs: int, k_blocks: int) -> np.ndarray:
    """``[k_blocks, min(T, bs), bs]`` factors with ``R_b^T R_b = x_b^T x_b`` for each K-block of ``x``."""
    t, k = x.shape
    padded = np.zeros((t, k_blocks * bs), dtype=np.float32)
    padded[:, :k] = x
    blocks = padded.reshape(t, k_blocks, bs).transpose(1, 0, 2)  # [k_blocks, T, bs]
    if t <= bs:
        return np.ascontiguousarray(blocks)
    return np.linalg.qr(blocks.astype(np.float64), mode="r").astype(np.float32)


def awq_clip_search(
    weight: np.ndarray,
    x: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    *,
    ratios: Sequence[float] = AWQ_CLIP_RATIOS,
    scale_dtype: np.dtype | type = np.float32,
) -> QuantizedWeight:
    """RTN with a per-(output column, block) clip ratio chosen on the output error (arXiv 2306.00978).

    For every output column ``n`` and K-block ``b`` the ratio ``r`` in ``ratios`` minimising
    ``||x[:, b] @ (w[b, n] - Q_r(w[b, n]))||^2`` is kept (the first one on a tie, so with
    ``1.0`` first no block is worse than RTN on its own term).

    Args:
        weight: ``[K, N]``; not modified.
        x: ``[T, K]`` sample of the input this weight sees.
        bits, block_size, symmetric, scale_dtype: as :func:`~onnxq.core.quantize_weight`.
        ratios: clip ratios tried (each in ``(0, 1]``).
    """
    _check(bits, block_size)
    weight = _as_weight(weight)
    k, n = weight.shape
    x = _as_input(x, k)
    ratios = [float(r) for r in ratios]
    if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
        raise OnnxqError(f"AWQ clip ratios must be a non-empty list of values in (0, 1], got {ratios}")
    bs = k if block_size == -1 else int(block_size)
    k_blocks = -(-k // bs)
    factors = _block_factors(x, bs, k_blocks)  # [k_blocks, r, bs]
    codes = np.empty((n, k_blocks, bs), dtype=np.uint8)
    scales = np.empty((n, k_blocks), dtype=np.float32)
    zero_points = np.empty((n, k_blocks), dtype=np.uint8)
    for start in range(0, n, _COLUMN_CHUNK):
        stop = min(start + _COLUMN_CHUNK, n)
        blocks = weight_to_blocks(weight[:, start:stop], bs)  # [chunk, k_blocks, bs]
        best_err = np.full((stop - start, k_blocks), np.inf, dtype=np.float32)
        best_ratio = np.ones((stop - start, k_blocks), dtype=np.float32)
        for ratio in ratios:
            diff = dequantize_blocks(*quantize_blocks(blocks, bits, symmetric, ratio, scale_dtype)) - blocks
            out = factors @ diff.transpose(1, 2, 0)  # [k_blocks, r, chunk]
            err = np.einsum("brc,brc->cb", out, out)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_ratio = np.where(better, np.float32(ratio), best_ratio)
        codes[start:stop], scales[start:stop], zero_points[start:stop] = quantize_blocks(
            blocks, bits, symmetric, best_ratio, scale_dtype
        )
    return QuantizedWeight(codes, scales, None if symmetric else zero_points, bits, bs, k)


def awq_quantize_weights(
    weights: Sequence[np.ndarray],
    x: np.ndarray,
    act_mean_abs: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    *,
    grid: int = 20,
    clip: bool = True,
    clip_ratios: Sequence[float] = AWQ_CLIP_RATIOS,
    scale_dtype: np.dtype | type = np.float32,
) -> AWQResult:
    """AWQ for sibling layers sharing one input: scale search, then clip search (arXiv 2306.00978).

    Runs :func:`awq_search_scale`, scales every ``W_i`` to ``s[:, None] * W_i`` and quantizes it
    with :func:`awq_clip_search` on the scaled input ``x / s`` (plain RTN when ``clip`` is False).
    The caller must divide the layers' input by ``result.scales`` (e.g. fold it into the
    preceding LayerNorm / Mul) for ``result.qweights`` to compute ``x @ W_i``.

    Args:
        weights: sibling weights ``[K, N_i]``; not modified.
        x: ``[T, K]`` input sample; act_mean_abs: ``[K]`` mean ``|x|`` over all calibration data.
        bits, block_size, symmetric, scale_dtype: the quantizer.
        grid: alphas tried by the scale search.
        clip: run the clip search (the reference skips it for q/k projections).
        clip_ratios: ratios tried by the clip search.
    """
    search = awq_search_scale(
        weights, x, act_mean_abs, bits, block_size, symmetric, grid=grid, scale_dtype=scale_dtype
    )
    s = search.scales
    scaled_x = np.asarray(x, dtype=np.float32) / s
    qweights = []
    for weight in weights:
        scaled = s[:, None] * np.asarray(weight, dtype=np.float32)
        if clip:
            qw = awq_clip_search(
                scaled, scaled_x, bits, block_size, symmetric, ratios=clip_ratios, scale_dtype=scale_dtype
            )
        else:
            qw = quantize_weight(scaled, bits, block_size, symmetric, scale_dtype=scale_dtype)
        qweights.append(qw)
    return AWQResult(scales=s, qweights=tuple(qweights), search=search)


@register_algorithm
class AWQ(Algorithm):
    """AWQ (arXiv 2306.00978): one scale search per sibling group, then a clip search (or RTN) per weight."""

    name = "awq"
    statistics = ("abs_mean", "rows")
    options_field = "awq"
    options_type = AWQConfig

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: Any) -> Solution:
        x, first = stats["rows"], group.settings[0]
        search = awq_search_scale(group.weights, x, stats["abs_mean"], first.bits, first.block_size, first.symmetric,
                                  grid=options.grid if options.scale_search else 1, scale_dtype=group.scale_dtype)
        scale = search.scales if search.alpha > 0 else None
        s = np.ones_like(search.scales) if scale is None else scale
        scaled_x = x / s
        qweights = []
        for weight, st in zip(group.weights, group.settings):
            scaled = s[:, None] * weight
            if options.clip:
                qweights.append(awq_clip_search(scaled, scaled_x, st.bits, st.block_size, st.symmetric,
                                                scale_dtype=group.scale_dtype))
            else:
                qweights.append(quantize_weight(scaled, st.bits, st.block_size, st.symmetric,
                                                scale_dtype=group.scale_dtype))
        errors = [effective_error(w, q, s) for w, q in zip(group.weights, qweights)]
        gain = 1 - search.loss_by_alpha.min() / search.loss_rtn if search.loss_rtn > 0 else 0.0
        note = f"{group.input_name}: alpha {search.alpha:.2f} (loss -{gain:.1%} vs RTN)"
        return Solution(qweights, errors, scale, note)
