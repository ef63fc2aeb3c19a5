"""AutoRound: learned rounding offsets and clip factors by signed gradient descent (Cheng et al., arXiv 2309.05516).

Numpy only: an input sample in, a :class:`~onnxq.core.QuantizedWeight` out.

For one linear layer ``y = x @ W`` (``W: [K, N]``, input sample ``x: [T, K]``) AutoRound
minimises the layer's output reconstruction error

    L(V, alpha, beta) = ||x W - x Q(W; V, alpha, beta)||_F^2

over a rounding offset ``V: [K, N]`` in ``[-0.5, 0.5]`` (added before rounding) and, per
output column and block, clip factors ``alpha`` (for the block minimum) and ``beta`` (for the
block maximum) in ``[0.5, 1]``. ``Q`` is onnxq's round-to-nearest (see
:mod:`onnxq.core.quantize`) with the factors applied to the range:

* asymmetric: ``lo = min(min(w) * alpha, 0)``, ``hi = max(max(w) * beta, 0)``,
  ``S = (hi - lo) / (2**b - 1)``, ``z = round(-lo / S)``;
* symmetric: ``S = e * alpha / -2**(b-1)`` with ``e`` the block's value of largest
  magnitude, ``z = 2**(b-1)`` (``beta`` is not used);

``q = clip(round(w / S + z + V), 0, 2**b - 1)``, ``Q = (q - z) * S``. With ``V = 0`` and
``alpha = beta = 1`` this is bit for bit :func:`~onnxq.core.quantize_weight`.

Gradients are analytic, with the straight-through estimator for the rounding of ``q``
(``d round(u) / du = 1`` inside the code range, 0 where the code is clipped) and none through
the rounding of ``z`` (as the reference implementation's ``torch.round``). Writing
``g = dL/dQ = -2 x^T x (W - Q)``:

    dL/dV_j     = g_j * S * [q_j not clipped]
    dL/dS_block = sum_j g_j * ((q_j - z) - [q_j not clipped] * w_j / S)
    dS/dalpha   = -min(min(w), 0) / (2**b - 1)       (symmetric: e / -2**(b-1))
    dS/dbeta    =  max(max(w), 0) / (2**b - 1)

Each step moves every parameter by ``lr_t * sign(gradient)`` (signed SGD, sec. 3) with
``lr_t`` decaying linearly from ``lr`` (default ``1 / steps``) to 0, then clamps it to its
range. The gradient comes from all rows of ``x`` or, as in the reference, from a mini-batch of
rows per step (``batch_size``, rows drawn epoch by epoch from a seeded generator). The loss on
all of ``x`` is measured exactly (no STE there) at every step (every ``ceil(T / batch_size)``
steps with mini-batches, and at the last) and, per output column, the best measured iterate is
kept; step 0 is plain RTN, so no column's calibration loss is ever above RTN's. The loss
separates over output columns, so columns are optimised in independent chunks that bound
memory (a few ``[K, chunk]`` float32 arrays).

:class:`SteBlockQuantizer` (the quantizer and its straight-through gradients) is shared with
TEQ (:mod:`onnxq.algorithms.teq`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, register_algorithm
from onnxq.core import QuantizedWeight, check_quant_params, relative_error
from onnxq.core.quantize import quantize_weight_with_error
from onnxq.errors import OnnxqError

__all__ = ["TuningConfig", "AutoRound", "AutoRoundResult", "rtn_when_too_large", "OutputErrorOperator", "SteBlockQuantizer", "SteState", "autoround_quantize_weight"]

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 3_000_000  # K * columns per chunk: ~10 float32 [K, chunk] arrays stay near 100 MB
_CLIP_RANGE = (0.5, 1.0)  # alpha and beta, as in the paper
_OFFSET_RANGE = 0.5  # |V| <= 0.5


def check_settings(name: str, bits: int, block_size: int) -> None:
    """``check_quant_params`` with the error re-raised as :class:`OnnxqError` naming the algorithm."""
    try:
        check_quant_params(bits, block_size)
    except ValueError as exc:
        raise OnnxqError(f"{name}: {exc}") from None


def check_weight(name: str, weight: np.ndarray, k: int | None = None) -> np.ndarray:
    """A finite 2-D weight ``[K, N]`` (with the given ``K``) as float32 (no copy when it already is)."""
    weight = np.asarray(weight)
    if weight.ndim != 2 or 0 in weight.shape or (k is not None and weight.shape[0] != k):
        want = "[K, N]" if k is None else f"[K={k}, N]"
        raise OnnxqError(f"{name} expected a non-empty 2-D weight {want}, got shape {weight.shape}")
    if not np.all(np.isfinite(weight)):
        raise OnnxqError(f"{name} expected a finite weight, found NaN or inf")
    return weight.astype(np.float32, copy=False)


def check_input(name: str, x: np.ndarray, k: int) -> np.ndarray:
    """A finite input sample ``[T, K]`` with ``T > 0`` as float32."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != k or x.shape[0] == 0:
        raise OnnxqError(f"{name} expected an input sample x of shape [T, K={k}] with T > 0, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise OnnxqError(f"{name} expected a finite input sample x, found NaN or inf")
    return x.astype(np.float32, copy=False)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round ``x`` in place to the nearest integer, halves up (C's ``roundf`` for ``x >= 0``), exactly:
    the rounding :mod:`onnxq.core.quantize` uses for codes and zero points."""
    floor = np.floor(x)
    np.subtract(x, floor, out=x)  # the fraction, exact in floating point
    np.add(floor, x >= np.float32(0.5), out=x)
    return x


def padded_blocks(weight: np.ndarray, bs: int) -> np.ndarray:
    """``weight: [K, N]`` -> float32 K-major blocks ``[k_blocks, bs, N]``, K zero-padded (a view when possible)."""
    k, n = weight.shape
    k_blocks = -(-k // bs)
    if k_blocks * bs != k:
        weight = np.concatenate([weight, np.zeros((k_blocks * bs - k, n), dtype=np.float32)])
    return weight.reshape(k_blocks, bs, n)


class OutputErrorOperator:
    """Applies ``H = x^T x`` (``x: [T, K]``, K zero-padded to ``k_padded``) to ``d: [k_padded, n]``.

    ``H d`` costs ``2 K^2 n`` flops, ``x^T (x d)`` costs ``4 T K n``: ``H`` (computed once, in float64)
    is used when ``K < 2 T``, ``x`` itself otherwise.
    """

    def __init__(self, x: np.ndarray, k_padded: int):
        t, k = x.shape
        padded = np.zeros((t, k_padded), dtype=np.float32)
        padded[:, :k] = x
        self.gram: np.ndarray | None = None
        self.factor: np.ndarray | None = None
        if k < 2 * t:
            x64 = padded.astype(np.float64)
            self.gram = (x64.T @ x64).astype(np.float32)
        else:
            self.factor = padded

    def apply(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(H d: [k_padded, n], ||x d[:, j]||^2 per column: float64 [n])``."""
        if self.gram is not None:
            hd = self.gram @ d
            return hd, np.einsum("kn,kn->n", d, hd, dtype=np.float64)
        e = self.factor @ d
        return self.factor.T @ e, np.einsum("tn,tn->n", e, e, dtype=np.float64)


@dataclass(frozen=True)
class SteState:
    """One forward pass of :class:`SteBlockQuantizer` (all K-major: ``[k_blocks, bs, N]`` / ``[k_blocks, N]``).

    Attributes:
        deq: float32 ``(q - z) * S``.
        centered: float32 ``q - z``.
        codes: float32 ``q`` (integers in ``[0, 2**b)``).
        scale: float32 ``S`` (rounded to the storage dtype); ``recip``: ``1 / S`` (0 where ``S = 0``).
        zero: float32 ``z`` (integers).
        inside: bool, True where the code was not clipped (the STE passes the gradient there).
    """

    deq: np.ndarray
    centered: np.ndarray
    codes: np.ndarray
    scale: np.ndarray
    recip: np.ndarray
    zero: np.ndarray
    inside: np.ndarray


class SteBlockQuantizer:
    """Round-to-nearest of fixed blocks ``[k_blocks, bs, N]`` (one block per ``[b, :, n]``) with
    optional rounding offsets and clip factors, and its straight-through gradients.

    Arithmetic is that of :func:`~onnxq.core.quantize_blocks` (scale rounded to ``scale_dtype``
    before codes are computed, zero point ``round(-lo / S)`` from the unrounded scale, reciprocal
    multiply, round half up, exactly), so without offsets and with unit factors (or equal ones,
    a clip ratio) the codes are the same bit for bit (checked in the tests).
    """

    def __init__(self, blocks: np.ndarray, bits: int, symmetric: bool, scale_dtype: np.dtype | type = np.float32):
        self.blocks = blocks
        self.bits = bits
        self.symmetric = symmetric
        self.scale_dtype = scale_dtype
        self.qmax = np.float32((1 << bits) - 1)
        self.vmin = blocks.min(axis=1)
        self.vmax = blocks.max(axis=1)
        if symmetric:
            self.extreme = np.where(np.abs(self.vmax) > np.abs(self.vmin), self.vmax, self.vmin)

    def forward(
        self,
        offsets: np.ndarray | None = None,
        lo_factor: np.ndarray | None = None,
        hi_factor: np.ndarray | None = None,
    ) -> SteState:
        """Quantize with ``offsets: [k_blocks, bs, N]`` added before rounding and clip factors ``[k_blocks, N]``.

        ``lo_factor`` (alpha) scales the block minimum (symmetric: the extreme value), ``hi_factor``
        (beta) the maximum (asymmetric only); ``None`` means 1.
        """
        if self.symmetric:
            extreme = self.extreme if lo_factor is None else self.extreme * lo_factor
            raw = (extreme / np.float32(-(1 << (self.bits - 1)))).astype(np.float32)
            zero = np.full(raw.shape, 1 << (self.bits - 1), dtype=np.float32)
        else:
            lo = np.minimum(self.vmin if lo_factor is None else self.vmin * lo_factor, np.float32(0))
            hi = np.maximum(self.vmax if hi_factor is None else self.vmax * hi_factor, np.float32(0))
            raw = ((hi - lo) / self.qmax).astype(np.float32)
            zero = np.clip(round_half_away(np.divide(-lo, raw, out=np.zeros_like(raw), where=raw != 0)), 0, self.qmax)
        scale = raw.astype(self.scale_dtype).astype(np.float32)
        recip = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
        codes = self.blocks * recip[:, None, :]
        codes += zero[:, None, :]
        if offsets is not None:
            codes += offsets
        round_half_away(codes)
        inside = (codes >= 0) & (codes <= self.qmax)
        np.clip(codes, 0, self.qmax, out=codes)
        centered = codes - zero[:, None, :]
        deq = centered * scale[:, None, :]
        return SteState(deq, centered, codes, scale, recip, zero, inside)

    def scale_gradient(self, state: SteState, grad: np.ndarray) -> np.ndarray:
        """``dL/dS`` per block ``[k_blocks, N]`` given ``grad = dL/d deq: [k_blocks, bs, N]`` (STE)."""
        residual = self.blocks * state.recip[:, None, :]
        residual *= state.inside
        np.subtract(state.centered, residual, out=residual)
        residual *= grad
        return residual.sum(axis=1)

    def scale_by_lo_factor(self) -> np.ndarray:
        """``dS/d lo_factor`` ``[k_blocks, N]`` (symmetric: ``dS/d alpha``)."""
        if self.symmetric:
            return self.extreme / np.float32(-(1 << (self.bits - 1)))
        return -np.minimum(self.vmin, np.float32(0)) / self.qmax

    def scale_by_hi_factor(self) -> np.ndarray:
        """``dS/d hi_factor`` ``[k_blocks, N]`` (asymmetric only)."""
        return np.maximum(self.vmax, np.float32(0)) / self.qmax

    def value_gradient(self, state: SteState, grad: np.ndarray) -> np.ndarray:
        """``dL/d blocks`` ``[k_blocks, bs, N]`` given ``grad = dL/d deq`` (STE; the block's range moves with
        its extreme values, so they also receive the scale's gradient). Factors are taken as 1."""
        out = grad * state.inside
        through_scale = self.scale_gradient(state, grad)  # [k_blocks, N]
        if self.symmetric:
            larger = np.abs(self.vmax) > np.abs(self.vmin)
            index = np.where(larger, self.blocks.argmax(axis=1), self.blocks.argmin(axis=1))
            _scatter_add(out, index, through_scale / np.float32(-(1 << (self.bits - 1))))
        else:
            _scatter_add(out, self.blocks.argmax(axis=1), np.where(self.vmax > 0, through_scale / self.qmax, 0))
            _scatter_add(out, self.blocks.argmin(axis=1), np.where(self.vmin < 0, -through_scale / self.qmax, 0))
        return out

    def quantized_weight(self, state: SteState, k: int) -> QuantizedWeight:
        """The :class:`~onnxq.core.QuantizedWeight` of ``state`` (codes transposed to ``[N, k_blocks, bs]``)."""
        codes = np.ascontiguousarray(state.codes.astype(np.uint8).transpose(2, 0, 1))
        zero_points = None if self.symmetric else np.ascontiguousarray(state.zero.T.astype(np.uint8))
        return QuantizedWeight(codes, np.ascontiguousarray(state.scale.T), zero_points, self.bits, codes.shape[2], k)


def _scatter_add(out: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """``out[b, index[b, n], n] += values[b, n]`` for ``out: [k_blocks, bs, N]``."""
    index = index[:, None, :]
    np.put_along_axis(out, index, np.take_along_axis(out, index, axis=1) + values[:, None, :], axis=1)


@dataclass(frozen=True)
class TuningConfig:
    """Options of the gradient-based per-layer algorithms (TEQ, AutoRound).

    Attributes:
        steps: optimisation steps per layer (TEQ: per input group).
        lr: learning rate; ``None`` takes the algorithm's default.
        sample_rows: activation rows kept (reservoir sample) per input tensor.
        max_elements: weights with more elements (K*N; e.g. a 50k-vocabulary lm_head) get RTN
            instead: per-layer tuning costs O(steps * T * K * N), minutes for such a weight.
            ``None`` tunes every weight.
    """

    steps: int = 200
    lr: float | None = None
    sample_rows: int = 512
    max_elements: int | None = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise OnnxqError(f"steps must be a positive integer, got {self.steps!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise OnnxqError(f"lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.sample_rows, int) and self.sample_rows >= 16):
            raise OnnxqError(f"sample_rows must be an integer >= 16, got {self.sample_rows!r}")


@dataclass(frozen=True)
class AutoRoundResult:
    """Outcome of :func:`autoround_quantize_weight`.

    Attributes:
        qweight: the quantized weight (per output column, the best evaluated iterate's codes / scales /
            zero points).
        loss_history: float64 ``[steps + 1]``: ``||x W - x Q||^2`` on all of ``x`` of the iterate at each
            step (summed over columns; step 0 is RTN); NaN at steps where it was not evaluated
            (mini-batches: it is evaluated every ``ceil(T / batch_size)`` steps and at the last one).
        loss: ``||x W - x Q||^2`` of ``qweight`` (per-column best, so ``<=`` every evaluated entry).
        loss_rtn: the same for plain RTN (``loss_history[0]``).
    """

    qweight: QuantizedWeight
    loss_history: np.ndarray
    loss: float
    loss_rtn: float


@dataclass(frozen=True)
class _RowBatches:
    """Mini-batch schedule: ``x: [T, K_padded]``, ``rows[step]`` the rows used at that step."""

    x: np.ndarray
    rows: np.ndarray
    period: int


def autoround_quantize_weight(
    weight: np.ndarray,
    x: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    *,
    steps: int = 200,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    scale_dtype: np.dtype | type = np.float32,
) -> AutoRoundResult:
    """AutoRound one weight ``[K, N]`` on its input sample ``x: [T, K]`` (arXiv 2309.05516).

    Args:
        weight: ``[K, N]`` float weight in MatMul orientation; not modified.
        x: ``[T, K]`` input sample (a few hundred rows is the intended size).
        bits, block_size, symmetric, scale_dtype: the quantizer, as :func:`~onnxq.core.quantize_weight`
            (``block_size=-1``: one block over all of K).
        steps: signed-gradient steps (0 gives RTN).
        lr: initial step of ``V``, ``alpha`` and ``beta`` (decays linearly to 0); default ``1 / steps``.
        batch_size: rows of ``x`` per step, drawn without replacement epoch by epoch (the reference
            trains on mini-batches); ``None`` (or ``>= T``) uses all rows every step. A step costs
            ``~min(4 T, 2 K) K N`` flops with all rows and ``~4 batch_size K N`` with mini-batches, plus
            ``2 T K N`` for the exact loss every ``ceil(T / batch_size)`` steps (best iterates are
            chosen among those evaluations).
        seed: seeds the row sampling (only used with mini-batches).

    Returns:
        :class:`AutoRoundResult`; its loss on ``x`` is never above RTN's, column by column.
    """
    check_settings("AutoRound", bits, block_size)
    weight = check_weight("AutoRound", weight)
    k, n = weight.shape
    x = check_input("AutoRound", x, k)
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise OnnxqError(f"AutoRound steps must be an integer >= 0, got {steps!r}")
    steps = int(steps)
    lr = 1.0 / max(steps, 1) if lr is None else lr
    if not (isinstance(lr, (int, float, np.floating)) and np.isfinite(lr) and lr > 0):
        raise OnnxqError(f"AutoRound lr must be a finite number > 0, got {lr!r}")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise OnnxqError(f"AutoRound batch_size must be a positive integer or None, got {batch_size!r}")
    bs = k if block_size == -1 else int(block_size)
    k_blocks = -(-k // bs)
    t = x.shape[0]
    batches = None
    operator = None
    if batch_size is not None and batch_size < t:
        rng = np.random.default_rng(seed)
        epochs = -(-steps * int(batch_size) // t) + 1
        order = np.concatenate([rng.permutation(t) for _ in range(epochs)])
        padded_x = np.zeros((t, k_blocks * bs), dtype=np.float32)
        padded_x[:, :k] = x
        batches = _RowBatches(padded_x, order[: steps * batch_size].reshape(steps, batch_size), -(-t // batch_size))
    else:
        operator = OutputErrorOperator(x, k_blocks * bs)
    chunk = max(1, _CHUNK_ELEMENTS // (k_blocks * bs))
    history = np.zeros(steps + 1, dtype=np.float64)
    codes = np.empty((n, k_blocks, bs), dtype=np.uint8)
    scales = np.empty((n, k_blocks), dtype=np.float32)
    zero_points = None if symmetric else np.empty((n, k_blocks), dtype=np.uint8)
    best_total = 0.0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        quantizer = SteBlockQuantizer(padded_blocks(weight[:, start:stop], bs), bits, symmetric, scale_dtype)
        state, best_loss = _optimise_chunk(quantizer, operator, batches, steps, float(lr), history)
        part = quantizer.quantized_weight(state, k)
        codes[start:stop] = part.codes
        scales[start:stop] = part.scales
        if zero_points is not None:
            zero_points[start:stop] = part.zero_points
        best_total += float(best_loss.sum())
    if batches is not None:
        evaluated = np.arange(steps + 1) % batches.period == 0
        evaluated[-1] = True
        history[~evaluated] = np.nan
    qweight = QuantizedWeight(codes, scales, zero_points, bits, bs, k)
    logger.debug("AutoRound [%d, %d]: loss %.4g -> %.4g (RTN -> best)", k, n, history[0], best_total)
    return AutoRoundResult(qweight=qweight, loss_history=history, loss=best_total, loss_rtn=float(history[0]))


def _optimise_chunk(
    quantizer: SteBlockQuantizer,
    operator: OutputErrorOperator | None,
    batches: _RowBatches | None,
    steps: int,
    lr: float,
    history: np.ndarray,
) -> tuple[SteState, np.ndarray]:
    """Signed SGD on one column chunk (all rows through ``operator``, or mini-batches); adds the loss of
    each evaluated step to ``history``; returns the best evaluated state per column and its loss."""
    k_blocks, bs, n = quantizer.blocks.shape
    offsets = np.zeros((k_blocks, bs, n), dtype=np.float32)
    alpha = np.ones((k_blocks, n), dtype=np.float32)
    beta = np.ones((k_blocks, n), dtype=np.float32)
    best_offsets, best_alpha, best_beta = offsets.copy(), alpha.copy(), beta.copy()
    best_loss = np.full(n, np.inf)
    d_alpha = quantizer.scale_by_lo_factor()
    d_beta = None if quantizer.symmetric else quantizer.scale_by_hi_factor()
    lo, hi = _CLIP_RANGE
    for step in range(steps + 1):
        state = quantizer.forward(offsets, alpha, beta)
        diff = quantizer.blocks - state.deq
        diff = diff.reshape(k_blocks * bs, n)
        if batches is None:
            descent, col_loss = operator.apply(diff)  # x^T x (W - Q) = -dL/dQ / 2: only signs are used
        else:
            col_loss = None
            if step % batches.period == 0 or step == steps:
                out = batches.x @ diff
                col_loss = np.einsum("tn,tn->n", out, out, dtype=np.float64)
            if step < steps:
                rows = batches.rows[step]
                x_batch = batches.x[rows]
                descent = x_batch.T @ (out[rows] if col_loss is not None else x_batch @ diff)
        if col_loss is not None:
            history[step] += col_loss.sum()
            better = col_loss < best_loss
            if better.any():
                np.copyto(best_loss, col_loss, where=better)
                np.copyto(best_offsets, offsets, where=better)
                np.copyto(best_alpha, alpha, where=better)
                np.copyto(best_beta, beta, where=better)
        if step == steps:
            break
        step_size = np.float32(lr * (1.0 - step / steps))
        descent = descent.reshape(k_blocks, bs, n)
        through_scale = quantizer.scale_gradient(state, descent)  # -dL/dS / 2
        if quantizer.symmetric:  # S > 0 for asymmetric blocks (or the block is 0 and so is Q)
            descent *= state.scale[:, None, :]
        np.sign(descent, out=descent)
        descent *= state.inside
        descent *= step_size
        offsets += descent
        np.clip(offsets, -_OFFSET_RANGE, _OFFSET_RANGE, out=offsets)
        alpha += step_size * np.sign(through_scale * d_alpha)
        np.clip(alpha, lo, hi, out=alpha)
        if d_beta is not None:
            beta += step_size * np.sign(through_scale * d_beta)
            np.clip(beta, lo, hi, out=beta)
    return quantizer.forward(best_offsets, best_alpha, best_beta), best_loss


def rtn_when_too_large(algorithm: str, group: SiblingGroup, options: Any) -> Solution | None:
    """RTN for the whole group when a weight has more than ``options.max_elements`` elements, else None.

    Per-layer tuning costs ``O(steps * T * K * N)``: minutes for a 50k-vocabulary lm_head.
    """
    limit = options.max_elements
    large = [(name, w.size) for name, w in zip(group.names, group.weights) if limit is not None and w.size > limit]
    if not large:
        return None
    for name, size in large:
        logger.info("%s: %s has %d weights (> max_elements %d): RTN instead", algorithm, name, size, limit)
    results = [quantize_weight_with_error(w, s.bits, s.block_size, s.symmetric, mse_clip=s.mse_clip,
                                          scale_dtype=group.scale_dtype)
               for w, s in zip(group.weights, group.settings)]
    return Solution([q for q, _ in results], [e for _, e in results], None,
                    f"{group.input_name}: RTN (weights above {algorithm}.max_elements)")


@register_algorithm
class AutoRound(Algorithm):
    """AutoRound (arXiv 2309.05516) per weight on a row sample of its input."""

    name = "autoround"
    statistics = ("rows",)
    options_field = "autoround"
    options_type = TuningConfig

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: Any) -> Solution:
        qweights, errors = [], []
        for name, weight, s in zip(group.names, group.weights, group.settings):
            single = SiblingGroup(group.input_name, (name,), [weight], [s], group.scale_dtype)
            fallback = rtn_when_too_large(self.name, single, options)
            if fallback is not None:
                qweights += fallback.qweights
                errors += fallback.errors
                continue
            result = autoround_quantize_weight(weight, stats["rows"], s.bits, s.block_size, s.symmetric,
                                               steps=options.steps, lr=options.lr, scale_dtype=group.scale_dtype)
            qweights.append(result.qweight)
            errors.append(relative_error(weight, result.qweight))
        return Solution(qweights, errors)
