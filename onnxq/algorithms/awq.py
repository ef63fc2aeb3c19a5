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

Both losses are quadratic forms of the input's Gram matrix: ``||x D||_F^2 = tr(D^T G D)`` with
``G = x^T x`` (float32 ``[K, K]``, one ``syrk``), used when ``T > K``, ``x`` itself otherwise; the
clip search uses the ``[bs, bs]`` diagonal blocks of ``G`` (or the ``[T, bs]`` column blocks of
``x`` when ``T <= bs``). ``G`` is formed once per sibling group and serves both searches (the
scaled input ``x / s`` has the Gram matrix ``G / (s s^T)``). Candidates are evaluated together:
the errors ``D`` of several alphas (siblings' columns side by side), or of all clip ratios of a
column chunk, are stacked into one ``[K, candidates * columns]`` array and multiplied by ``G`` in
one matrix product (one batched product over K-blocks for the clip search), at most
``2**24`` float32 elements at a time. The cost is ``2 min(T, K) K N`` flops per alpha and
``2 min(T, bs) K N`` per clip ratio, plus elementwise round-to-nearest; there is no per-candidate
ONNX Runtime run. A weight with more than ``max_columns`` output columns (an lm_head with a large
vocabulary) is scored on evenly spaced columns in the scale search, so that search costs the same
for any vocabulary; its clip search is linear in the number of columns.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from onnxq.algorithms.float_target import float_target_weight
from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, effective_error, register_algorithm
from onnxq.core import QuantizedWeight, check_quant_params, pad_tensor, quantize_blocks, quantize_weight
from onnxq.errors import OnnxqError

__all__ = [
    "AWQ",
    "AWQConfig",
    "AWQ_CLIP_RATIOS",
    "AWQResult",
    "AWQScaleResult",
    "AWQThen",
    "awq_clip_search",
    "awq_quantize_weights",
    "awq_scales",
    "awq_search_scale",
    "awq_weight_mean",
]

AWQ_CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.00, 0.95, ..., 0.50
_MIN_SCALE = 1e-4  # the reference clamps a**alpha from below before normalising
_BATCH_ELEMENTS = 1 << 24  # float32 elements of stacked candidate errors multiplied at once (64 MiB)
_THREADS = min(4, os.cpu_count() or 1)  # candidates rounded in parallel (numpy releases the GIL)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQConfig:
    """AWQ options (arXiv 2306.00978); see :func:`onnxq.algorithms.awq.awq_quantize_weights`.

    Attributes:
        grid: number of alphas in ``[0, 1]`` tried by the scale search.
        scale_search: search the per-input-channel scales (off: scales of 1, clip search only).
        clip: run the per-(channel, block) clip search after scaling.
        sample_rows: activation rows kept (reservoir sample) per input tensor for the losses.
        duo_scaling: AutoAWQ's scales ``a**alpha / w**(1 - alpha)`` (:func:`awq_scales`) instead of
            the paper's ``a**alpha``; ``alpha = 0`` stays plain RTN.
        float_target: in sequential calibration, the weights that read a normalization's output are
            searched and quantized as :func:`~onnxq.algorithms.float_target.float_target_weight`
            (fitted to the float model's outputs; needs the Hessian as well). On SmolLM2 it took
            perplexity 53.53 -> 53.00 and KL 0.221 -> 0.183 (docs/INT4_RESULTS.md, sixth
            session); off by default.
    """

    grid: int = 20
    scale_search: bool = True
    clip: bool = True
    sample_rows: int = 4096
    duo_scaling: bool = False
    float_target: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.grid, int) and self.grid >= 2):
            raise OnnxqError(f"awq.grid must be an integer >= 2, got {self.grid!r}")
        if not (isinstance(self.sample_rows, int) and self.sample_rows >= 16):
            raise OnnxqError(f"awq.sample_rows must be an integer >= 16, got {self.sample_rows!r}")
        for name in ("scale_search", "clip", "duo_scaling", "float_target"):
            if not isinstance(getattr(self, name), bool):
                raise OnnxqError(f"awq.{name} must be true or false, got {getattr(self, name)!r}")


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


def _k_major(weight: np.ndarray, bs: int) -> np.ndarray:
    """``weight: [K, N]`` -> float32 ``[k_blocks, bs, N]``, K zero-padded (a view when possible)."""
    k_blocks = -(-weight.shape[0] // bs)
    return pad_tensor(weight, bs, k_blocks).reshape(k_blocks, bs, weight.shape[1])


def _round_half_up(x: np.ndarray) -> np.ndarray:
    """C's ``roundf`` for ``x >= 0`` in place, exactly (the rounding of :func:`~onnxq.core.quantize_blocks`)."""
    floor = np.floor(x)
    np.subtract(x, floor, out=x)
    np.add(floor, x >= np.float32(0.5), out=x)
    return x


def _map(work, items) -> None:
    """``work(item)`` for every item, on up to ``_THREADS`` threads (numpy releases the GIL)."""
    items = list(items)
    if _THREADS == 1 or len(items) == 1:
        for item in items:
            work(item)
        return
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(items))) as pool:
        for future in [pool.submit(work, item) for item in items]:
            future.result()


def _fake_quant(blocks: np.ndarray, bits: int, symmetric: bool, ratio, scale_dtype) -> np.ndarray:
    """``dequantize(quantize_blocks(blocks, ..., axis=1))`` for K-major ``blocks: [k_blocks, bs, N]``.

    The arithmetic of :func:`~onnxq.core.quantize_blocks` (scale rounded to ``scale_dtype`` first,
    reciprocal multiply, round half up, zero point from the unrounded scale) without the uint8
    round trip: float32 ``[k_blocks, bs, N]``, bit-identical (tested). ``ratio``: a scalar or
    ``[k_blocks, N]``.
    """
    qmax = np.float32((1 << bits) - 1)
    ratio = np.asarray(ratio, dtype=np.float32)
    vmin = blocks.min(axis=1)
    vmax = blocks.max(axis=1)
    if symmetric:
        extreme = np.where(np.abs(vmax) > np.abs(vmin), vmax, vmin) * ratio
        raw = (extreme / np.float32(-(1 << (bits - 1)))).astype(np.float32)
        zero = np.full(raw.shape, 1 << (bits - 1), dtype=np.float32)
    else:
        lo = np.minimum(vmin * ratio, np.float32(0))
        hi = np.maximum(vmax * ratio, np.float32(0))
        raw = ((hi - lo) / qmax).astype(np.float32)
        zero = np.clip(_round_half_up(np.divide(-lo, raw, out=np.zeros_like(raw), where=raw != 0)), 0, qmax)
    scale = raw.astype(scale_dtype).astype(np.float32)
    recip = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    out = blocks * recip[:, None, :]
    out += zero[:, None, :]
    np.clip(_round_half_up(out), 0, qmax, out=out)
    out -= zero[:, None, :]
    out *= scale[:, None, :]
    return out


class _OutputError:
    """``||x d||^2`` per output column of ``d: [K, n]`` for an input sample ``x: [T, K]``.

    Through ``G = x^T x`` (float32 ``[K, K]``, ``d^T G d``) when ``T > K``, else through ``x``
    (``||x d||^2``); per K-block (clip search) through the ``[bs, bs]`` diagonal blocks of ``G``
    when ``T > bs``, else the ``[T, bs]`` column blocks of ``x``. The cheaper form is used each time.
    With ``x = None`` the objective is ``d^T G d`` for the ``gram`` given (e.g. GPTQ's Hessian).
    """

    def __init__(self, x: np.ndarray | None, gram: np.ndarray | None = None):
        self.x = x
        self.gram = gram if gram is not None or x.shape[0] <= x.shape[1] else x.T @ x  # numpy: syrk
        self._blocks: dict[int, tuple[np.ndarray, bool]] = {}

    def scaled(self, s: np.ndarray) -> _OutputError:
        """The same for the input ``x / s`` (Gram matrix ``G / (s s^T)``)."""
        inv = np.float32(1) / s
        return _OutputError(None if self.x is None else self.x * inv,
                            None if self.gram is None else self.gram * inv[:, None] * inv[None, :])

    def column_losses(self, d: np.ndarray) -> np.ndarray:
        """float64 ``[n]``: ``||x d[:, j]||^2`` for ``d: [K, n]`` (one matrix product)."""
        if self.gram is not None:
            out = self.gram @ d
            out *= d
        else:
            out = self.x @ d
            np.square(out, out=out)
        return out.sum(axis=0, dtype=np.float64)

    def block_losses(self, d: np.ndarray) -> np.ndarray:
        """float32 ``[k_blocks, n]``: ``||x_b d[b]||^2`` for K-major ``d: [k_blocks, bs, n]`` (K zero-padded;
        one batched matrix product)."""
        operators, is_gram = self._block_operators(d.shape[0], d.shape[1])
        out = operators @ d
        if is_gram:
            out *= d
        else:
            np.square(out, out=out)
        return out.sum(axis=1)

    def _block_operators(self, k_blocks: int, bs: int) -> tuple[np.ndarray, bool]:
        """``([k_blocks, bs, bs] Gram blocks, True)`` or ``([k_blocks, T, bs] blocks of x, False)``."""
        if bs not in self._blocks:
            k = self.gram.shape[0] if self.x is None else self.x.shape[1]
            if self.x is None or self.x.shape[0] > bs:
                ops = np.zeros((k_blocks, bs, bs), dtype=np.float32)
                for b in range(k_blocks):
                    lo, hi = b * bs, min(k, (b + 1) * bs)
                    if self.gram is not None:
                        ops[b, :hi - lo, :hi - lo] = self.gram[lo:hi, lo:hi]
                    else:
                        ops[b, :hi - lo, :hi - lo] = self.x[:, lo:hi].T @ self.x[:, lo:hi]
                self._blocks[bs] = ops, True
            else:
                t = self.x.shape[0]
                padded = np.zeros((t, k_blocks * bs), dtype=np.float32)
                padded[:, :k] = self.x
                self._blocks[bs] = np.ascontiguousarray(padded.reshape(t, k_blocks, bs).transpose(1, 0, 2)), False
        return self._blocks[bs]


def awq_scales(act_mean_abs: np.ndarray, alpha: float, weight_mean: np.ndarray | None = None) -> np.ndarray:
    """AWQ's per-channel scales ``s = a**alpha / sqrt(max * min)`` (arXiv 2306.00978 eq. 5).

    ``a**alpha`` is clamped to ``>= 1e-4`` before normalising, as in the reference code.
    Returns float32 ``[K]``; ``alpha = 0`` gives exactly 1 everywhere.

    With ``weight_mean`` (``[K]``, :func:`awq_weight_mean`) for ``alpha > 0``: AutoAWQ's "duo
    scaling", ``s = a**alpha / (weight_mean**(1 - alpha) + 1e-4)``, clamped and normalised the same
    way, which also shrinks the input channels whose weights are large within their blocks.
    """
    a = np.asarray(act_mean_abs, dtype=np.float64)
    if weight_mean is None or alpha == 0:
        powered = np.maximum(a ** alpha, _MIN_SCALE)
    else:
        powered = np.maximum(a ** alpha / (np.asarray(weight_mean, np.float64) ** (1 - alpha) + _MIN_SCALE),
                             _MIN_SCALE)
    return (powered / np.sqrt(powered.max() * powered.min())).astype(np.float32)


def awq_weight_mean(weights: Sequence[np.ndarray], block_size: int) -> np.ndarray:
    """``[K]``: mean over all sibling columns of ``|w| / max |w|`` of each weight's K-block (AutoAWQ's
    ``w_mean``, the weight side of duo scaling); ``weights``: ``[K, N_i]``, ``block_size`` -1 = all of K."""
    k = weights[0].shape[0]
    bs = k if block_size == -1 else int(block_size)
    total = np.zeros(k, dtype=np.float64)
    columns = 0
    for w in weights:
        blocks = np.abs(_k_major(w, bs))  # [k_blocks, bs, N]
        peak = blocks.max(axis=1, keepdims=True)
        normalized = np.divide(blocks, peak, out=np.zeros_like(blocks), where=peak > 0)
        total += normalized.sum(axis=2, dtype=np.float64).reshape(-1)[:k]
        columns += w.shape[1]
    return total / columns


def _scaled_error(weight: np.ndarray, s: np.ndarray, bits: int, bs: int, symmetric: bool, scale_dtype,
                  out: np.ndarray) -> None:
    """``out[:] = W - Q(s W) / s`` for ``weight: [K, n]`` (``out``: a ``[K, n]`` view)."""
    k, n = weight.shape
    deq = _fake_quant(_k_major(s[:, None] * weight, bs), bits, symmetric, 1.0, scale_dtype)
    deq = deq.reshape(-1, n)[:k]
    np.divide(deq, s[:, None], out=deq)
    np.subtract(weight, deq, out=out)


def _check_search(weights: Sequence[np.ndarray], x: np.ndarray, act_mean_abs: np.ndarray,
                  bits: int, block_size: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    _check(bits, block_size)
    if not weights:
        raise OnnxqError("AWQ expected at least one weight sharing the input, got none")
    first = _as_weight(weights[0])
    k = first.shape[0]
    weights = [first] + [_as_weight(w, k) for w in weights[1:]]
    x = _as_input(x, k)
    act_mean_abs = np.asarray(act_mean_abs)
    if act_mean_abs.shape != (k,) or not np.all(np.isfinite(act_mean_abs)) or np.any(act_mean_abs < 0):
        raise OnnxqError(
            f"AWQ expected act_mean_abs of shape [K={k}] with finite values >= 0, got shape {act_mean_abs.shape}"
        )
    return weights, x, act_mean_abs


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
    duo_scaling: bool = False,
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
        duo_scaling: score AutoAWQ's ``a**alpha / w**(1 - alpha)`` scales for ``alpha > 0``
            (:func:`awq_scales`, :func:`awq_weight_mean`).

    Returns:
        :class:`AWQScaleResult` with the scales of the alpha of lowest loss (the first on a tie).
    """
    weights, x, act_mean_abs = _check_search(weights, x, act_mean_abs, bits, block_size)
    return _search_scale(weights, _OutputError(x), act_mean_abs, bits, block_size, symmetric, grid, scale_dtype,
                         max_columns, duo_scaling)


def _search_scale(weights: list[np.ndarray], objective: _OutputError, act_mean_abs: np.ndarray, bits: int,
                  block_size: int, symmetric: bool, grid: int, scale_dtype, max_columns: int | None,
                  duo_scaling: bool = False) -> AWQScaleResult:
    """:func:`awq_search_scale` on checked inputs, the objective given."""
    if not isinstance(grid, (int, np.integer)) or grid < 1:
        raise OnnxqError(f"AWQ grid must be a positive integer, got {grid!r}")
    weight_mean = awq_weight_mean(weights, block_size) if duo_scaling and grid > 1 else None
    k = weights[0].shape[0]
    bs = k if block_size == -1 else int(block_size)
    columns, column_weight = [], []  # the scored columns of all siblings side by side, and their loss weights
    for w in weights:
        n = w.shape[1]
        if max_columns is not None and n > max_columns:
            logger.info("AWQ: a [K=%d, N=%d] weight: scale search on %d evenly spaced columns (loss scaled by "
                        "%.1f), clip search on all", k, n, max_columns, n / max_columns)
            columns.append(w[:, np.linspace(0, n - 1, max_columns).round().astype(np.int64)])
            column_weight.append(np.full(max_columns, n / max_columns))
        else:
            columns.append(w)
            column_weight.append(np.ones(n))
    scored = columns[0] if len(columns) == 1 else np.concatenate(columns, axis=1)
    column_weight = np.concatenate(column_weight)
    n = scored.shape[1]
    alphas = np.linspace(0.0, 1.0, grid) if grid > 1 else np.zeros(1)
    losses = np.empty(len(alphas), dtype=np.float64)
    per_product = max(1, _BATCH_ELEMENTS // scored.size)
    for first in range(0, len(alphas), per_product):
        batch = alphas[first:first + per_product]
        errors = np.empty((k, len(batch) * n), dtype=np.float32)  # D of each alpha, side by side

        def fill(j: int, batch=batch, errors=errors) -> None:
            s = awq_scales(act_mean_abs, float(batch[j]), weight_mean)
            _scaled_error(scored, s, bits, bs, symmetric, scale_dtype, errors[:, j * n:(j + 1) * n])

        _map(fill, range(len(batch)))
        losses[first:first + len(batch)] = objective.column_losses(errors).reshape(len(batch), n) @ column_weight
    best = int(np.argmin(losses))
    return AWQScaleResult(
        scales=awq_scales(act_mean_abs, float(alphas[best]), weight_mean),
        alpha=float(alphas[best]),
        loss_by_alpha=losses,
        loss_rtn=float(losses[0]),
    )


def awq_clip_search(
    weight: np.ndarray,
    x: np.ndarray | None,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    *,
    ratios: Sequence[float] = AWQ_CLIP_RATIOS,
    scale_dtype: np.dtype | type = np.float32,
    gram: np.ndarray | None = None,
) -> QuantizedWeight:
    """RTN with a per-(output column, block) clip ratio chosen on the output error (arXiv 2306.00978).

    For every output column ``n`` and K-block ``b`` the ratio ``r`` in ``ratios`` minimising
    ``||x[:, b] @ (w[b, n] - Q_r(w[b, n]))||^2`` is kept (the first one on a tie, so with
    ``1.0`` first no block is worse than RTN on its own term).

    Args:
        weight: ``[K, N]``; not modified.
        x: ``[T, K]`` sample of the input this weight sees, or None with ``gram``.
        bits, block_size, symmetric, scale_dtype: as :func:`~onnxq.core.quantize_weight`.
        ratios: clip ratios tried (each in ``(0, 1]``).
        gram: instead of ``x``, its Gram matrix ``x^T x`` ``[K, K]`` or any positive multiple (GPTQ's
            Hessian): the losses become ``d^T G_bb d`` on its diagonal blocks.
    """
    _check(bits, block_size)
    weight = _as_weight(weight)
    k = weight.shape[0]
    if (x is None) == (gram is None):
        raise OnnxqError("AWQ's clip search takes an input sample x or its Gram matrix, exactly one of them")
    if gram is not None and np.shape(gram) != (k, k):
        raise OnnxqError(f"AWQ expected a Gram matrix of shape [K={k}, K], got {np.shape(gram)}")
    objective = _OutputError(_as_input(x, k)) if x is not None else _OutputError(None, np.asarray(gram))
    return _clip_search(weight, objective, bits, block_size, symmetric, ratios, scale_dtype)


def _clip_search(weight: np.ndarray, objective: _OutputError, bits: int, block_size: int, symmetric: bool,
                 ratios: Sequence[float], scale_dtype) -> QuantizedWeight:
    """:func:`awq_clip_search` on checked inputs, the objective given."""
    ratios = [float(r) for r in ratios]
    if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
        raise OnnxqError(f"AWQ clip ratios must be a non-empty list of values in (0, 1], got {ratios}")
    k, n = weight.shape
    bs = k if block_size == -1 else int(block_size)
    k_blocks = -(-k // bs)
    codes = np.empty((n, k_blocks, bs), dtype=np.uint8)
    scales = np.empty((n, k_blocks), dtype=np.float32)
    zero_points = np.empty((n, k_blocks), dtype=np.uint8)
    ratio_values = np.asarray(ratios, dtype=np.float32)
    chunk = max(1, _BATCH_ELEMENTS // (len(ratios) * k_blocks * bs))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        c = stop - start
        blocks = _k_major(weight[:, start:stop], bs)  # [k_blocks, bs, c]
        diff = np.empty((k_blocks, bs, len(ratios) * c), dtype=np.float32)  # every ratio's error, side by side

        def fill(j: int, blocks=blocks, diff=diff, c=c) -> None:
            np.subtract(_fake_quant(blocks, bits, symmetric, ratios[j], scale_dtype), blocks,
                        out=diff[:, :, j * c:(j + 1) * c])

        _map(fill, range(len(ratios)))
        err = objective.block_losses(diff).reshape(k_blocks, len(ratios), c)
        best_ratio = ratio_values[np.argmin(err, axis=1)]  # [k_blocks, c], the first ratio on a tie
        chunk_codes, chunk_scales, chunk_zps = quantize_blocks(blocks, bits, symmetric, best_ratio, scale_dtype, 1)
        codes[start:stop] = chunk_codes.transpose(2, 0, 1)
        scales[start:stop] = chunk_scales.T
        zero_points[start:stop] = chunk_zps.T
    return QuantizedWeight(codes, scales, None if symmetric else zero_points, bits, bs, k)


def _quantize_scaled(weights: list[np.ndarray], settings: Sequence[tuple[int, int, bool]],
                     objective: _OutputError, s: np.ndarray, clip: bool, clip_ratios: Sequence[float],
                     scale_dtype) -> list[QuantizedWeight]:
    """Each ``s[:, None] * W_i`` quantized with its ``(bits, block_size, symmetric)``: clip search on ``x / s``
    (the objective scaled once for all siblings), or RTN."""
    scaled_objective = objective.scaled(s) if clip else None
    qweights = []
    for weight, (bits, block_size, symmetric) in zip(weights, settings):
        scaled = s[:, None] * weight
        if clip:
            qweights.append(_clip_search(scaled, scaled_objective, bits, block_size, symmetric, clip_ratios,
                                         scale_dtype))
        else:
            qweights.append(quantize_weight(scaled, bits, block_size, symmetric, scale_dtype=scale_dtype))
    return qweights


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
    The input's Gram matrix is formed once for both searches.
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
    weights, x, act_mean_abs = _check_search(weights, x, act_mean_abs, bits, block_size)
    objective = _OutputError(x)
    search = _search_scale(weights, objective, act_mean_abs, bits, block_size, symmetric, grid, scale_dtype, 8192)
    qweights = _quantize_scaled(weights, [(bits, block_size, symmetric)] * len(weights), objective, search.scales,
                                clip, clip_ratios, scale_dtype)
    return AWQResult(scales=search.scales, qweights=tuple(qweights), search=search)


@register_algorithm
class AWQ(Algorithm):
    """AWQ (arXiv 2306.00978): one scale search per sibling group, then a clip search (or RTN) per weight."""

    name = "awq"
    statistics = ("abs_mean", "rows")
    options_field = "awq"
    options_type = AWQConfig

    def float_target(self, options: Any) -> bool:
        return options.float_target

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: Any) -> Solution:
        """Scale search, then clip search; with ``stats["cross"]`` (the float target), both on
        :func:`~onnxq.algorithms.float_target.float_target_weight` of each weight."""
        first = group.settings[0]
        targets = group.weights if "cross" not in stats else [
            float_target_weight(weight, stats["hessian"], stats["cross"]) for weight in group.weights]
        weights, x, act_mean_abs = _check_search(targets, stats["rows"], stats["abs_mean"], first.bits,
                                                 first.block_size)
        objective = _OutputError(x)
        search = _search_scale(weights, objective, act_mean_abs, first.bits, first.block_size, first.symmetric,
                               options.grid if options.scale_search else 1, group.scale_dtype, 8192,
                               options.duo_scaling)
        scale = search.scales if search.alpha > 0 else None
        s = np.ones_like(search.scales) if scale is None else scale
        settings = [(st.bits, st.block_size, st.symmetric) for st in group.settings]
        qweights = _quantize_scaled(weights, settings, objective, s, options.clip, AWQ_CLIP_RATIOS, group.scale_dtype)
        errors = [effective_error(w, q, s) for w, q in zip(group.weights, qweights)]
        gain = 1 - search.loss_by_alpha.min() / search.loss_rtn if search.loss_rtn > 0 else 0.0
        note = f"{group.input_name}: alpha {search.alpha:.2f} (loss -{gain:.1%} vs RTN)"
        return Solution(qweights, errors, scale, note)


class AWQThen(Algorithm):
    """AWQ's scale search per sibling group (arXiv 2306.00978 sec. 3.2), then another solver per scaled weight.

    For a group reading ``x: [T, K]``, the search picks scales ``s: [K]`` with
    ``x @ W = (x / s) @ (s[:, None] * W)``; :meth:`solve_scaled` quantizes each ``s[:, None] * W_i``
    against the statistics of the input it will see, ``x / s``. ``alpha = 0`` (scales of one) is the
    second solver alone. Subclasses name the second solver's options field (``then_options``) and
    its label (``then_label``); AWQ's clip search is not run (the second solver replaces it).
    """

    then_options: str
    then_label: str

    def options_of(self, config: Any) -> tuple[Any, Any]:
        return config.awq, getattr(config, self.then_options)

    def sample_rows(self, options: tuple[Any, Any]) -> int:
        return options[0].sample_rows

    def solve_scaled(self, weight: np.ndarray, settings: Any, s: np.ndarray, stats: Mapping[str, Any],
                     options: Any, scale_dtype) -> QuantizedWeight:
        """Quantize ``weight = s[:, None] * W: [K, N]`` (``s: [K]`` float32) for the input ``x / s``."""
        raise NotImplementedError

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: tuple[Any, Any]) -> Solution:
        awq, then = options
        first = group.settings[0]
        search = awq_search_scale(group.weights, stats["rows"], stats["abs_mean"], first.bits, first.block_size,
                                  first.symmetric, grid=awq.grid if awq.scale_search else 1,
                                  scale_dtype=group.scale_dtype, duo_scaling=awq.duo_scaling)
        scale = search.scales if search.alpha > 0 else None
        s = np.ones(group.weights[0].shape[0], dtype=np.float32) if scale is None else scale
        qweights = [self.solve_scaled(s[:, None] * weight, st, s, stats, then, group.scale_dtype)
                    for weight, st in zip(group.weights, group.settings)]
        errors = [effective_error(w, q, scale) for w, q in zip(group.weights, qweights)]
        return Solution(qweights, errors, scale,
                        f"{group.input_name}: AWQ alpha {search.alpha:.2f}, then {self.then_label}")
