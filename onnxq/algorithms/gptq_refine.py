"""Coordinate-descent refinement of a GPTQ result on GPTQ's own objective (QuantEase, Behdin et al.,
arXiv 2309.01885), with a least-squares refit of the block scales between passes.

GPTQ visits each input row once and never revisits a rounding decision: a row quantized early
cannot take back its choice when the rows after it moved. For fixed block scales, the objective
``(W - Q)[:, n]^T H (W - Q)[:, n]`` is a quadratic in each row ``q_k`` alone, minimized over the
grid by rounding ``q_k + (H (W - Q))_k / H_kk`` to it (the others held): cyclic coordinate descent
over the rows, started from GPTQ's codes, can only lower the objective. Each pass is a lazy-batch
sweep like GPTQ's own (rank-1 updates inside a batch of rows, one GEMM for the rest), ``K^2 N``
FLOP. With the codes fixed, the scales of one output column's blocks are the solution of a
``k_blocks x k_blocks`` least-squares system (``q = sum_b s_b v_b``, ``v = code - zero point``),
which again can only lower the objective (up to the scales' storage rounding).

Numpy only: weights and statistics in, a :class:`~onnxq.core.QuantizedWeight` out.
"""
from __future__ import annotations

import numpy as np

from onnxq.core import QuantizedWeight

__all__ = ["refine_quantized_weight", "gptq_objective"]

_SWEEP_BATCH = 128  # rows per lazy batch of a sweep: the rows outside it are updated by one GEMM per batch
_SWEEP_PANEL = 16  # rows of a batch whose mutual updates are elementwise; the rest of the batch is GEMMs
_COLUMN_CHUNK = 4096  # output columns refined together (they are independent): bounds the [K, chunk] buffers


def _shrunk_hessian(hessian: np.ndarray, shrink: float, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """``(H', dead)``: ``(1 - shrink) H + shrink diag(H) + damp I`` in float32 with the diagonal of inputs that
    were always zero set to ``1 + damp`` (as :func:`~onnxq.algorithms.gptq.gptq_solve` factors it)."""
    hessian = np.asarray(hessian, dtype=np.float64)
    diagonal = np.diag(hessian).copy()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    shrunk = (1.0 - shrink) * hessian
    shrunk[np.diag_indices_from(shrunk)] = diagonal + damp
    return shrunk.astype(np.float32), dead


def gptq_objective(weight: np.ndarray, dequantized: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """float64 ``[N]``: ``(W - Q)[:, n]^T H (W - Q)[:, n]`` for ``weight``, ``dequantized: [K, N]``, ``hessian: [K, K]``."""
    diff = np.asarray(weight, dtype=np.float32) - dequantized
    return _column_dots(diff, np.asarray(hessian, dtype=np.float32) @ diff)


def _column_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 ``[N]``: ``sum_k a[k, n] b[k, n]`` (summed in float32: numpy's float64 einsum of float32
    operands converts them first, several times slower)."""
    return np.einsum("kn,kn->n", a, b).astype(np.float64)


def _block_sums(a: np.ndarray, b: np.ndarray, block_size: int, buffer: np.ndarray) -> np.ndarray:
    """float64 ``[K / block_size, N]``: ``sum_k a[k, n] b[k, n]`` over each block of ``block_size`` rows
    (``K`` a multiple of it), summed in float32 like :func:`_column_dots`: one product (into ``buffer``,
    float32 with at least ``K`` rows) and one reduction over the middle axis of ``[blocks, block_size, N]``,
    which numpy runs along contiguous rows, instead of one strided dot product per block."""
    k, n = a.shape
    product = np.multiply(a, b, out=buffer[:k])
    return product.reshape(k // block_size, block_size, n).sum(axis=1).astype(np.float64)


def _sweep(hessian: np.ndarray, levels: np.ndarray, dequantized: np.ndarray, gradient: np.ndarray,
           scales: np.ndarray, low: np.ndarray, high: np.ndarray, row_block: np.ndarray, order: np.ndarray) -> None:
    """One coordinate-descent pass over the rows in ``order``, in place on ``levels`` (``code - zero point``),
    ``dequantized`` (``levels * scale``) and ``gradient`` (``H (W - Q)``), all float32 ``[K, N]``;
    ``scales`` / ``low`` / ``high``: ``[k_blocks, N]`` (the levels' clip bounds).

    ``gradient`` is exact for every row at the start of a lazy batch; inside it, a panel's rows get the
    batch's earlier changes by one GEMM, the panel's later rows each row's change by one elementwise
    update, and every row gets the batch's changes by one GEMM at its end."""
    recips = np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales != 0)
    inv_diag = np.float32(1) / np.diag(hessian)
    half = np.full(levels.shape[1], 0.5, dtype=np.float32)
    for b1 in range(0, len(order), _SWEEP_BATCH):
        rows = order[b1:b1 + _SWEEP_BATCH]
        h_batch = hessian[np.ix_(rows, rows)]
        deltas = np.empty((len(rows), levels.shape[1]), dtype=np.float32)
        for p1 in range(0, len(rows), _SWEEP_PANEL):
            p2 = min(p1 + _SWEEP_PANEL, len(rows))
            local = gradient[rows[p1:p2]]
            if p1:
                local -= h_batch[p1:p2, :p1] @ deltas[:p1]
            for j in range(p1, p2):
                k, block = rows[j], row_block[rows[j]]
                best = local[j - p1]  # holds the changes of the panel's earlier rows (below)
                best *= inv_diag[k]
                best += dequantized[k]  # the row's best unconstrained value, the others held
                level = np.multiply(best, recips[block], out=best)
                level += half
                np.floor(level, out=level)
                np.maximum(level, low[block], out=level)
                np.minimum(level, high[block], out=level)
                levels[k] = level
                new = np.multiply(level, scales[block], out=level)
                np.subtract(new, dequantized[k], out=deltas[j])
                dequantized[k] = new
                if j + 1 < p2:  # elementwise, not a BLAS call per row: a threaded BLAS waits on a busy core
                    local[j + 1 - p1:] -= h_batch[j + 1:p2, j, None] * deltas[j]
        gradient -= hessian[:, rows] @ deltas


def _refit_scales(h_target: np.ndarray, hessian: np.ndarray, levels: np.ndarray, scales: np.ndarray,
                  block_size: int, scale_dtype) -> np.ndarray:
    """Per output column, the block scales ``[k_blocks, N]`` minimizing the objective for fixed ``levels``:
    ``q = sum_b s_b v_b`` (``v_b`` the levels of block ``b``) gives the normal equations
    ``(v_a^T H v_b) s = v_a^T H w``, one ``k_blocks x k_blocks`` system per column (``h_target = H w``)."""
    k, n = levels.shape
    k_blocks = scales.shape[0]
    padded = k_blocks * block_size
    if padded != k:  # zero rows complete the last block: they add nothing to any sum
        levels = np.concatenate([levels, np.zeros((padded - k, n), np.float32)])
        h_target = np.concatenate([h_target, np.zeros((padded - k, n), np.float32)])
        hessian = np.pad(hessian, ((0, padded - k), (0, padded - k)))
    system = np.empty((n, k_blocks, k_blocks))
    buffer, h_level = np.empty((2, padded, n), np.float32)  # reused: no fresh pages per block
    rhs = _block_sums(levels, h_target, block_size, buffer).T  # [N, k_blocks]
    for b in range(k_blocks):
        a, z = b * block_size, (b + 1) * block_size
        np.matmul(hessian[:z, a:z], levels[a:z], out=h_level[:z])  # the rows of H v_b that blocks 0..b read
        dots = _block_sums(levels[:z], h_level[:z], block_size, buffer).T  # v_c^T H v_b for c <= b, [N, b + 1]
        system[:, :b + 1, b] = dots
        system[:, b, :b + 1] = dots
    # a block whose levels are all zero has no say in the output: keep its scale
    column, block = np.nonzero(np.diagonal(system, axis1=1, axis2=2) == 0)
    system[column, block, :] = 0.0
    system[column, :, block] = 0.0
    system[column, block, block] = 1.0
    rhs[column, block] = scales[block, column]
    refit = np.linalg.solve(system, rhs[..., None])[..., 0].T
    return refit.astype(scale_dtype).astype(np.float32)


def refine_quantized_weight(weight: np.ndarray, hessian: np.ndarray, qweight: QuantizedWeight, *,
                            passes: int = 2, shrink: float = 0.0, damp: float = 0.0,
                            order: np.ndarray | None = None, refit_scales: bool = True,
                            scale_dtype: np.dtype | type = np.float32) -> tuple[QuantizedWeight, np.ndarray]:
    """Lower GPTQ's objective for ``qweight`` by coordinate descent on its codes and a refit of its scales.

    QuantEase (arXiv 2309.01885) cyclic coordinate descent, started from GPTQ's codes
    (arXiv 2210.17323), each pass followed by the least-squares block scales for the codes found.

    Args:
        weight: ``[K, N]`` float weight the codes approximate (GPTQ's input, e.g. a float target).
        hessian: ``[K, K]`` ``H = 2/n X^T X`` as given to GPTQ.
        qweight: GPTQ's result for ``weight`` (any blockwise result works).
        passes: coordinate-descent passes (each one sweep over the rows, then the scale refit).
        shrink, damp: the objective's Hessian is GPTQ's, ``(1 - shrink) H + shrink diag(H) + damp I``
            (inputs that were always zero: diagonal ``1 + damp``, weight row zero).
        order: the rows' visiting order (GPTQ's processing order); ``None`` = ``0..K-1``.
        refit_scales: refit the block scales after each sweep (zero points stay).
        scale_dtype: dtype the scales are stored in; refitted scales are rounded to it.

    Returns:
        ``(refined QuantizedWeight, objective [N] float64)``. Per output column the result is never
        worse on the objective than ``qweight``: a column the refinement did not improve (float
        rounding, scale storage rounding) keeps its input codes and scales.
    """
    h_used, dead = _shrunk_hessian(hessian, shrink, damp)
    k, n = np.shape(weight)
    bs = qweight.block_size
    maxq = np.float32((1 << qweight.bits) - 1)
    row_block = np.arange(k) // bs
    order = np.arange(k) if order is None else np.asarray(order)[np.asarray(order) < k]
    weight = np.asarray(weight)
    all_zero_points = qweight.effective_zero_points()  # [N, k_blocks]
    codes, scales_out = qweight.codes.copy(), qweight.scales.copy()
    objective = np.empty(n)
    for c1 in range(0, n, _COLUMN_CHUNK):
        columns = slice(c1, min(c1 + _COLUMN_CHUNK, n))
        target = np.array(weight[:, columns], dtype=np.float32)
        target[dead] = 0.0
        h_target = h_used @ target
        zero_points = all_zero_points[columns].T.astype(np.float32)  # [k_blocks, chunk]
        chunk_codes = codes[columns].reshape(target.shape[1], -1)[:, :k]  # [chunk, K], a view of codes
        levels = chunk_codes.T.astype(np.float32, order="C")  # rows contiguous: the sweep writes one row at a time
        levels -= zero_points[row_block]
        scales = qweight.scales[columns].T.astype(np.float32)
        dequantized = levels * scales[row_block]
        gradient = h_target - h_used @ dequantized  # H (W - Q)
        start = _column_dots(target - dequantized, gradient)
        current = start
        for _ in range(passes):
            _sweep(h_used, levels, dequantized, gradient, scales, -zero_points, maxq - zero_points, row_block, order)
            current = _column_dots(target - dequantized, gradient)
            if refit_scales:
                refit = _refit_scales(h_target, h_used, levels, scales, bs, scale_dtype)
                refit_dequantized = levels * refit[row_block]
                refit_gradient = h_target - h_used @ refit_dequantized
                refit_objective = _column_dots(target - refit_dequantized, refit_gradient)
                better = refit_objective < current
                if better.all():  # usually: take the refit's arrays as they are
                    scales, dequantized, gradient = refit, refit_dequantized, refit_gradient
                else:  # per column, a contiguous masked copy (a boolean column index would gather)
                    for kept, refitted in ((scales, refit), (dequantized, refit_dequantized),
                                           (gradient, refit_gradient)):
                        np.copyto(kept, refitted, where=better)
                current = np.where(better, refit_objective, current)
        keep = current < start  # a column the refinement did not improve keeps its input
        np.copyto(chunk_codes, (levels + zero_points[row_block]).T.astype(np.uint8), where=keep[:, None])
        scales_out[columns][keep] = scales.T[keep]
        objective[columns] = np.where(keep, current, start)
    refined = QuantizedWeight(codes, scales_out, qweight.zero_points, qweight.bits, bs, qweight.k)
    return refined, objective
