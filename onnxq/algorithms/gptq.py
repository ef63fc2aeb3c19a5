"""GPTQ: second-order error-compensating weight quantization (Frantar et al., arXiv 2210.17323).

Numpy only: the Hessian comes in as statistics, a :class:`~onnxq.core.QuantizedWeight`
goes out, no graph and no session code.

For a linear layer ``y = x @ W`` with ``W: [K, N]`` and calibration inputs
``X: [n, K]``, GPTQ minimises ``||X W - X Q||_F^2 = n/2 * sum_j D[:, j]^T H D[:, j]``
(``D = W - Q``, ``H = 2/n X^T X``), quantizing one input row ``k`` of ``W`` at a time (all ``N``
output columns at once) and spreading the rounding error of that row over the rows
not yet quantized:

    U = chol_upper(H_damped^-1)           (H^-1 = U^T U)
    e_k = (w_k - q_k) / U[k, k]           q_k = Q(w_k) with the block's fixed scale / zero point
    w_j -= U[k, j] * e_k                  for every j processed after k

Here the same algorithm runs left-looking, at BLAS speed. With ``M = U^-T`` (lower
triangular, ``H_damped = M^T M``, a Cholesky factor of ``H`` itself: no inverse is formed),
``E = M D`` and the value row ``k`` has when it is quantized is

    w'_k = w_k + (M[k, :k] @ D[:k]) / M[k, k]        e_k = (w'_k - q_k) * M[k, k]

(the same numbers as above in exact arithmetic). Per lazy batch of ``lazy_batch`` rows (the
paper's "lazy batch", sec. 4, step 2) ``M[batch, :start] @ D[:start]`` is one GEMM; inside the
batch, each panel of ``_PANEL`` rows gathers the earlier rows of its batch with one more GEMM,
and only the rows of its own panel are matrix-vector products. The factor is a blocked float64
Cholesky (LAPACK per block, ``syrk`` updates); the products run in float32, like the reference
implementation's on GPU. Whatever the order and batching, the solver's loss has the closed form
``(W - Q)[:, n]^T H_damped (W - Q)[:, n] = sum_k e_k[n]^2``: :class:`GPTQResult.loss`.

Conventions kept from :mod:`onnxq.core.quantize`: scales are rounded to
``scale_dtype`` before any code is computed, codes use the same reciprocal
multiply and round-half-up (:func:`~onnxq.core.quantize_with_params`), and the
float weight a row is reconstructed to is computed exactly as
:meth:`QuantizedWeight.dequantize` computes it, so the returned codes are the ones
whose error was propagated and ``dequantize()`` is the solver's ``Q`` bit for bit.

Groups (quantization blocks) are always contiguous runs of ``block_size`` rows in
the original K order, so the result needs no ``g_idx``:

* ``static_groups=True`` (the reference implementation's ``static_groups``): the
  scale / zero point of every block is computed up front from the original weights
  (after dead rows are zeroed).
* ``static_groups=False``: the parameters of a block are computed when the first of
  its rows is reached in processing order, from the current, error-updated rows of
  the whole block (``w - (M^-1)[rows, :i] @ E[:i]``, from the explicit ``M^-1``, which only
  this mode computes). Without ``act_order`` this is the classic GPTQ group quantization.

``act_order=True`` processes rows by descending ``diag(H)`` (the paper's "desc_act"):
large-activation inputs are quantized first, while many rows are still free to absorb
their error. Only the processing order changes; the blocks stay as above.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, register_algorithm
from onnxq.core import QuantizedWeight, check_quant_params, quantize_weight, quantize_with_params, relative_error
from onnxq.errors import OnnxqError

__all__ = ["GPTQConfig", "GPTQ", "GPTQResult", "gptq_solve", "gptq_quantize_weight"]

logger = logging.getLogger(__name__)

_CHOLESKY_RETRIES = 4  # damping tried: d, 10 d, 100 d, 1000 d
_TRIANGULAR_BASE = 128  # below this size a triangular inverse is done by LAPACK directly
_FACTOR_BLOCK = 256  # rows per LAPACK Cholesky in the blocked factor
_PANEL = 16  # rows of a lazy batch whose mutual updates are matrix-vector products; the rest are GEMMs


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ options (arXiv 2210.17323); see :func:`gptq_solve`.

    Attributes:
        percdamp: diagonal damping as a fraction of ``mean(diag H)`` (raised 10x on Cholesky failure).
        lazy_batch: rows per lazy batch (the paper's ``B``; config files may still say ``blocksize``).
        act_order: process input channels by descending ``diag(H)``; groups stay contiguous
            (static groups), so no ``g_idx`` is emitted.
        static_groups: block scales from the original weights up front (True) or when a
            block is first reached (False).
    """

    percdamp: float = 0.01
    lazy_batch: int = 128
    act_order: bool = False
    static_groups: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.percdamp, (int, float)) and 0 < self.percdamp < 1):
            raise OnnxqError(f"gptq.percdamp must be in (0, 1), got {self.percdamp!r}")
        if not (isinstance(self.lazy_batch, int) and self.lazy_batch >= 1):
            raise OnnxqError(f"gptq.lazy_batch must be a positive integer, got {self.lazy_batch!r}")


@dataclass(frozen=True)
class GPTQResult:
    """What the solver produced.

    Attributes:
        qweight: the quantized weight (``dequantize()`` is the solver's final ``Q``).
        loss: float64 ``[N]``: ``sum_k e_k[n]^2``, which equals
            ``(W' - Q)[:, n]^T H' (W' - Q)[:, n]`` where ``W'`` is the weight with dead rows
            zeroed and ``H'`` the Hessian with dead diagonal entries set to 1 plus ``damp * I``.
        damp: the damping actually added to the diagonal (after any Cholesky retries).
        order: int64 ``[K]``: the original row index processed at each step.
    """

    qweight: QuantizedWeight
    loss: np.ndarray
    damp: float
    order: np.ndarray


def _inv_lower(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular ``[n, n]`` matrix by 2x2 block recursion (matrix products only)."""
    n = lower.shape[0]
    if n <= _TRIANGULAR_BASE:
        return np.tril(np.linalg.inv(lower))
    m = n // 2
    top = _inv_lower(lower[:m, :m])
    bottom = _inv_lower(lower[m:, m:])
    out = np.zeros_like(lower)
    out[:m, :m] = top
    out[m:, m:] = bottom
    out[m:, :m] = -(bottom @ lower[m:, :m]) @ top
    return out


def _reverse_cholesky(hessian: np.ndarray) -> np.ndarray:
    """float64 ``M`` lower triangular with ``hessian = M^T M`` (``LinAlgError`` if not SPD).

    With ``J`` the reversal permutation and ``J H J = L L^T`` (LAPACK ``potrf``): ``M = J L^T J``.
    """
    lower = np.linalg.cholesky(np.ascontiguousarray(hessian[::-1, ::-1]))
    return lower.T[::-1, ::-1]


def _blocked_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
    """float32 ``M`` lower triangular with ``hessian + damp I = M^T M`` (``LinAlgError`` if not SPD).

    ``M = U^-T`` for the reference's ``U = chol_upper(H^-1)``, so no inverse is needed (the
    reference's inverse and second Cholesky disappear). Blocked from the bottom right, in
    float64: with ``H = [[A, B^T], [B, C]]`` and ``C = M_C^T M_C`` (LAPACK ``potrf`` of a
    ``_FACTOR_BLOCK`` block, :func:`_reverse_cholesky`): ``M_B = M_C^-T B``, and
    ``A - M_B^T M_B`` (one ``syrk``) is factored next. K^3/3 FLOP like one LAPACK call on the
    whole matrix, without reversing and transposing ``[K, K]`` copies around it.
    float64 because a float32 factor, measured on the rank-deficient test Hessians (256 rows,
    K = 1536), moved the objective by up to 1% and flipped 0.5% of the codes.
    """
    a = hessian.copy()
    diagonal = np.arange(len(a))
    a[diagonal, diagonal] += damp
    for stop in range(len(a), 0, -_FACTOR_BLOCK):
        start = max(stop - _FACTOR_BLOCK, 0)
        block = _reverse_cholesky(a[start:stop, start:stop])
        if start:
            below = np.linalg.inv(block).T @ a[start:stop, :start]  # M_B: [b, start]
            a[start:stop, :start] = below
            a[:start, :start] -= below.T @ below
        a[start:stop, start:stop] = block
    return np.tril(a).astype(np.float32)


def _damped_factor(hessian: np.ndarray, percdamp: float) -> tuple[np.ndarray, float]:
    """Add ``percdamp * mean(diag H)`` to the diagonal and factor; retry with 10x damping on failure."""
    mean_diag = float(np.mean(np.diag(hessian)))  # > 0: the diagonal is >= 0 and dead entries are 1
    for attempt in range(_CHOLESKY_RETRIES):
        damp = percdamp * mean_diag * 10.0**attempt
        try:
            return _blocked_factor(hessian, damp), damp
        except np.linalg.LinAlgError:
            logger.warning("GPTQ: Hessian not positive definite with damping %g; retrying with 10x damping", damp)
    raise OnnxqError(
        f"GPTQ expected a positive semi-definite Hessian [K, K] (2/n X^T X); Cholesky failed even with "
        f"damping {damp:g} added to the diagonal (mean diagonal {mean_diag:g})"
    )


def _check_inputs(weight, hessian, bits, block_size, percdamp, lazy_batch) -> tuple[np.ndarray, np.ndarray]:
    try:
        check_quant_params(bits, block_size)
    except ValueError as exc:
        raise OnnxqError(str(exc)) from None
    weight = np.asarray(weight)
    hessian = np.asarray(hessian)
    if weight.ndim != 2 or 0 in weight.shape:
        raise OnnxqError(f"GPTQ expected a non-empty 2-D weight [K, N], got shape {weight.shape}")
    k = weight.shape[0]
    if hessian.shape != (k, k):
        raise OnnxqError(f"GPTQ expected a Hessian of shape [K, K] = {(k, k)}, got {hessian.shape}")
    if not np.all(np.isfinite(hessian)):
        raise OnnxqError("GPTQ expected a finite Hessian, found NaN or inf")
    if np.any(np.diag(hessian) < 0):
        raise OnnxqError("GPTQ expected a Hessian 2/n X^T X with a diagonal >= 0, found negative entries")
    if not np.all(np.isfinite(weight)):
        raise OnnxqError("GPTQ expected a finite weight, found NaN or inf")
    if not percdamp > 0:
        raise OnnxqError(f"GPTQ percdamp must be > 0, got {percdamp!r}")
    if not isinstance(lazy_batch, (int, np.integer)) or lazy_batch < 1:
        raise OnnxqError(f"GPTQ lazy_batch must be a positive integer, got {lazy_batch!r}")
    return weight.astype(np.float32), hessian.astype(np.float64)  # private copies


def gptq_solve(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    *,
    percdamp: float = 0.01,
    lazy_batch: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
    mse_clip: bool = False,
    scale_dtype: np.dtype | type = np.float32,
    blocksize: int | None = None,
) -> GPTQResult:
    """Run GPTQ (arXiv 2210.17323, Algorithm 1) on one weight and return the result with diagnostics.

    Args:
        weight: ``[K, N]`` float weight in MatMul orientation (``y = x @ weight``); not modified.
        hessian: ``[K, K]`` ``H = 2/n X^T X`` of the layer's inputs (any positive scale works).
        bits: code width, 2..8.
        block_size: rows of K per scale (a quantization group); ``-1`` = one block over all of K.
            K is zero-padded to a multiple of it (padded rows get an identity Hessian).
        symmetric: full-range symmetric codes (no zero points) or asymmetric.
        percdamp: damping ``percdamp * mean(diag H)`` added to the diagonal of ``H``.
        lazy_batch: rows per lazy batch (the paper's ``B``; not the quantization ``block_size``).
        act_order: process rows by descending ``diag(H)``.
        static_groups: block parameters from the original weights up front (True) or from the
            current rows when a block is first reached (False); see the module docstring.
        mse_clip: choose each block's clip ratio by weight MSE (:func:`~onnxq.core.quantize_weight`).
        scale_dtype: dtype the scales will be stored in; they are rounded to it before use.
        blocksize: the former name of ``lazy_batch`` (still accepted; it wins when given).

    Returns:
        :class:`GPTQResult`. Rows of K whose ``H_kk == 0`` (inputs that were always zero) are
        zeroed before quantization, as in the reference implementation.
    """
    lazy_batch = lazy_batch if blocksize is None else blocksize
    weight, hessian = _check_inputs(weight, hessian, bits, block_size, percdamp, lazy_batch)
    k, n = weight.shape
    bs = k if block_size == -1 else int(block_size)
    k_blocks = -(-k // bs)
    kp = k_blocks * bs

    dead = np.diag(hessian) == 0  # inputs that were always zero: H_kk = 1, weight row 0
    hessian[dead, dead] = 1.0  # `hessian` is already a private copy
    # Padded rows: zero weight, identity Hessian, hence decoupled (U is block diagonal).
    padded = np.zeros((kp, n), dtype=np.float32)
    padded[:k] = weight
    padded[:k][dead] = 0.0

    scales = np.empty((n, k_blocks), dtype=np.float32)
    zero_points = np.empty((n, k_blocks), dtype=np.uint8)
    have_params = np.zeros(k_blocks, dtype=bool)

    def set_params(block: slice, rows: np.ndarray) -> None:
        """Scales / zero points of ``block`` (a slice of block indices) from ``rows: [*, N]``."""
        qw = quantize_weight(rows, bits, bs, symmetric, mse_clip=mse_clip, scale_dtype=scale_dtype)
        scales[:, block] = qw.scales
        zero_points[:, block] = qw.effective_zero_points()
        have_params[block] = True

    if static_groups:
        set_params(slice(0, k_blocks), padded)

    if act_order:
        order = np.argsort(-np.diag(hessian), kind="stable")
        hessian = hessian[np.ix_(order, order)]
        order = np.concatenate([order, np.arange(k, kp)])
    else:
        order = np.arange(kp)
    factor, damp = _damped_factor(hessian, percdamp)
    if kp == k:
        m = factor
    else:  # padded rows: identity, decoupled from the real ones
        m = np.eye(kp, dtype=np.float32)
        m[:k, :k] = factor
    diag = np.diag(m).copy()
    inv_diag = np.float32(1) / diag
    # Dynamic groups need the current value of rows not yet reached: -(M^-1)[rows, :i] @ E[:i].
    m_inv = None if static_groups else _inv_lower(m.astype(np.float64)).astype(np.float32)
    position = np.empty(kp, dtype=np.int64)
    position[order] = np.arange(kp)
    work = padded[order]  # row i of work is original row order[i]; never modified

    codes_rows = np.empty((kp, n), dtype=np.uint8)
    diffs = np.empty((kp, n), dtype=np.float32)  # D = W - Q, processing order
    errors = np.empty((kp, n), dtype=np.float32)  # E = M D
    for i1 in range(0, kp, lazy_batch):
        i2 = min(i1 + lazy_batch, kp)
        # acc[r - i1] = M[r, :c] @ D[:c], c = i1, then the start of r's panel: one GEMM each
        acc = m[i1:i2, :i1] @ diffs[:i1] if i1 else np.zeros((i2 - i1, n), np.float32)
        for p1 in range(i1, i2, _PANEL):
            p2 = min(p1 + _PANEL, i2)
            if p1 > i1:
                acc[p1 - i1:p2 - i1] += m[p1:p2, i1:p1] @ diffs[i1:p1]
            for i in range(p1, p2):
                row = int(order[i])
                block = row // bs
                if not have_params[block]:
                    pos = position[block * bs:(block + 1) * bs]  # all >= i: the block is first reached now
                    current = work[pos] - m_inv[pos, :i] @ errors[:i] if i else work[pos]
                    set_params(slice(block, block + 1), current)
                sc = scales[:, block]
                zp = zero_points[:, block]
                update = acc[i - i1] + m[i, p1:i] @ diffs[p1:i] if i > p1 else acc[i - i1]
                w = work[i] + update * inv_diag[i]
                codes = quantize_with_params(w[:, None], sc, zp, bits)[:, 0]
                q = (codes.astype(np.float32) - zp.astype(np.float32)) * sc  # as QuantizedWeight.dequantize
                codes_rows[row] = codes
                diffs[i] = work[i] - q
                errors[i] = (w - q) * diag[i]

    loss = np.einsum("kn,kn->n", errors, errors, dtype=np.float64)
    codes = np.ascontiguousarray(codes_rows.T).reshape(n, k_blocks, bs)
    qweight = QuantizedWeight(codes, scales, None if symmetric else zero_points, bits, bs, k)
    return GPTQResult(qweight=qweight, loss=loss, damp=float(damp), order=order[:k].copy())


def gptq_quantize_weight(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    *,
    percdamp: float = 0.01,
    lazy_batch: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
    mse_clip: bool = False,
    scale_dtype: np.dtype | type = np.float32,
    blocksize: int | None = None,
) -> QuantizedWeight:
    """GPTQ-quantize ``weight: [K, N]`` given ``hessian: [K, K] = 2/n X^T X`` (arXiv 2210.17323).

    Same arguments as :func:`gptq_solve`; returns only the :class:`~onnxq.core.QuantizedWeight`,
    whose codes, scales and zero points are exactly those the solver propagated errors for.
    """
    return gptq_solve(
        weight, hessian, bits, block_size, symmetric, percdamp=percdamp, lazy_batch=lazy_batch,
        blocksize=blocksize, act_order=act_order, static_groups=static_groups, mse_clip=mse_clip, scale_dtype=scale_dtype,
    ).qweight


@register_algorithm
class GPTQ(Algorithm):
    """GPTQ (arXiv 2210.17323) on each weight of the group, from its input's Hessian."""

    separable = True

    name = "gptq"
    statistics = ("hessian",)
    options_field = "gptq"
    options_type = GPTQConfig

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: Any) -> Solution:
        qweights = [
            gptq_quantize_weight(weight, stats["hessian"], s.bits, s.block_size, s.symmetric,
                                 percdamp=options.percdamp, lazy_batch=options.lazy_batch,
                                 act_order=options.act_order, static_groups=options.static_groups,
                                 mse_clip=s.mse_clip, scale_dtype=group.scale_dtype)
            for weight, s in zip(group.weights, group.settings)
        ]
        return Solution(qweights, [relative_error(w, q) for w, q in zip(group.weights, qweights)])
