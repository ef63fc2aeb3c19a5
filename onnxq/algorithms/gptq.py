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
paper's "lazy batch", sec. 4, step 2) ``M[batch, :start] @ D[:start]`` is one GEMM, written into
the rows' own buffer; inside the batch, each panel of ``_PANEL`` rows gathers the earlier rows of
its batch with one more GEMM, and only the rows of its own panel are matrix-vector products; each
row's own step is a fixed dozen of in-place numpy calls on preallocated rows (``out=``, reciprocal
scales precomputed per block, the rounding offset and the clip bounds as rows: numpy's scalar
operands cost microseconds a call). The feedback terms are summed before the division by
``M[k, k]`` and before ``w_k`` is added, in this order on purpose, as they can cancel each other:
with ``w_k`` added first, 0.17% of the codes flipped against the float64 Algorithm 1 on the real
layers, and with ``M``'s rows pre-divided 2.1% of SmolLM2's codes changed (docs/SPEED.md). The
products run in float32, like the reference implementation's on GPU; ``E`` is only
kept for the current lazy batch (all of it only for dynamic groups). Whatever the order and
batching, the solver's loss has the closed form
``(W - Q)[:, n]^T H_damped (W - Q)[:, n] = sum_k e_k[n]^2``: :class:`GPTQResult.loss`.

The factor ``M`` is a left-looking blocked Cholesky from the bottom right in float64 (LAPACK
``potrf`` per block, ``syrk`` / GEMM updates, a recursive triangular solve), K^3/3 FLOP, on
one private float64 copy of ``H``'s lower block triangle; it is rounded to float32 block row by
block row. It stays float64 because float32 is measurably not accurate enough: the Schur
complements ``C = H_SS - M_TS^T M_TS`` that each block factors cancel down to about the
damping when ``H`` is (nearly) rank deficient, so a float32 update (absolute error about
``eps32 * |H|``) leaves ``C`` with a relative error of about ``eps32 * cond(H_damped)``. On the
real MiniLM layers (256 calibration rows, K = 384 and 1536) every float32 variant tried (all
float32; float64 diagonal blocks; float64 subtraction and triangular solve with float32
products; float64 accumulation of float32 products over 512-row slices) flipped 0.51-0.70% of
the codes against the float64 Algorithm 1 and moved the objective by up to 1%, against none
flipped in float64 (the bound in ``tests/test_gptq_speed_equivalence.py`` is 0.1%); see
docs/SPEED.md.

A shrunk Hessian (``hessian_shrink`` ``s``, the default of :class:`GPTQConfig`) cannot cancel
that far: ``H' - s diag(H) = (1 - s) H + damp I`` is positive semi-definite, and a Schur
complement only grows with its matrix (in the Loewner order), so every ``C`` the factor takes
is at least ``s diag(H)_SS`` and each pivot keeps at least a fraction ``s`` of its diagonal
entry. With ``float32_factor=True`` (allowed from ``s >= 0.25``, :data:`_FLOAT32_FACTOR_SHRINK`)
the factor is float32, about twice as fast as float64 with half the memory; on the same real
layers and settings it flipped at most 0.043% of the codes at ``s = 0.5`` and 0.078% at
``s = 0.25`` (0.109% at ``s = 0.1``), against Algorithm 1 run in float64 on the same shrunk
Hessian. It is off by default: on the real LMs GPTQ's perplexity came out 0.1-1.0% higher with it
in all five comparisons made (docs/INT4_RESULTS.md), small but always on the same side.

Conventions kept from :mod:`onnxq.core.quantize`: scales are rounded to
``scale_dtype`` before any code is computed, codes use the same reciprocal
multiply and round-half-up (:func:`~onnxq.core.quantize_with_params`; here as
``floor(v + 0.49999997)``, the same codes), and the
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

from onnxq.algorithms.awq import awq_clip_search
from onnxq.algorithms.float_target import float_target_weight
from onnxq.algorithms.gptq_refine import refine_quantized_weight
from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, register_algorithm
from onnxq.core import ROUNDING_OFFSET, QuantizedWeight, check_quant_params, quantize_weight, relative_error
from onnxq.errors import OnnxqError

__all__ = ["GPTQConfig", "GPTQ", "GPTQResult", "gptq_solve", "gptq_quantize_weight", "gptq_with_options"]

logger = logging.getLogger(__name__)

_CHOLESKY_RETRIES = 4  # damping tried: d, 10 d, 100 d, 1000 d
_TRIANGULAR_BASE = 128  # below this size a triangular inverse is done by LAPACK directly
_FACTOR_BLOCK = 256  # rows per LAPACK Cholesky in the blocked factor
_FLOAT32_FACTOR_SHRINK = 0.25
"""The smallest ``hessian_shrink`` with which ``float32_factor`` is allowed: every pivot the factor
takes is at least ``shrink * H_kk`` (module docstring), so float32 loses at most a factor
``1 / shrink`` of precision to cancellation. Measured: no more codes flipped against the float64
Algorithm 1 than the test's 0.1% bound (0.043% at 0.5, 0.078% at 0.25; 0.109% at 0.1)."""
_PANEL = 16  # rows of a lazy batch whose mutual updates are matrix-vector products; the rest are GEMMs


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ options (arXiv 2210.17323); see :func:`gptq_solve`.

    Attributes:
        percdamp: diagonal damping as a fraction of ``mean(diag H)`` (raised 10x on Cholesky failure).
        lazy_batch: rows per lazy batch (the paper's ``B``; config files may still say ``blocksize``).
        act_order: process input channels by descending ``diag(H)``; groups stay contiguous
            (static groups), so no ``g_idx`` is emitted and the model runs as fast. On by
            default: it lowered the KL to the float model on both real LMs and both eval
            domains (docs/INT4_RESULTS.md); :func:`gptq_solve` keeps the paper's order by default.
        static_groups: block scales from the original weights up front (True) or when a
            block is first reached (False).
        hessian_shrink: shrink the Hessian's off-diagonal entries by this fraction (0 = the paper;
            see :func:`gptq_solve`). 0.5 by default: against 0 it lowered perplexity and KL on
            both real LMs, on the calibration domain and on another one, with text or
            self-generated calibration (SmolLM2, pydoc calibration: Shakespeare 57.25 -> 49.03,
            pydoc 16.04 -> 15.25; self-generated calibration: Shakespeare 49.84 -> 44.90;
            Gemma 3: 73.95 -> 71.61; docs/INT4_RESULTS.md). :func:`gptq_solve` keeps the paper's 0.
        float32_factor: factor the shrunk Hessian in float32 (needs ``hessian_shrink >= 0.25``):
            1.3-1.7x faster solves on large K (docs/SPEED.md), perplexity 0.1-1.0% higher on the
            real LMs measured; off by default.
        clip_search: each static group's clip ratio chosen on the block's output error through the
            Hessian before the solve (:func:`gptq_solve`); off by default.
        float_target: in sequential calibration, a weight that reads a normalization's output is
            fitted to the float model's output of the same tokens, not to its own float output on
            the quantized model's inputs (:func:`~onnxq.algorithms.float_target.float_target_weight`,
            then GPTQ on it). On the real LMs it lowered the KL to the float model by 20% (SmolLM2
            0.204 -> 0.162, Gemma 3 0.215 -> 0.175) while perplexity moved both ways (SmolLM2
            49.80 -> 50.67, Gemma 3 57.95 -> 57.45; docs/INT4_RESULTS.md, sixth session); off by
            default.
        refine: passes of coordinate descent on GPTQ's own objective after the solve, each followed by
            a least-squares refit of the block scales (QuantEase, arXiv 2309.01885;
            :func:`~onnxq.algorithms.gptq_refine.refine_quantized_weight`); 0 = GPTQ alone. 2 by default:
            on both real LMs it lowered perplexity and KL against GPTQ alone, paired on the same windows
            (self-generated calibration, Shakespeare: SmolLM2 49.91 -> 48.74, KL 0.205 -> 0.188; Gemma 3
            57.95 -> 56.67, KL 0.215 -> 0.201; docs/INT4_RESULTS.md, seventh session). It costs about 21 s
            of SmolLM2's whole process (78.4 s -> 99.9 s; docs/SPEED.md, eighth session).
    """

    percdamp: float = 0.01
    lazy_batch: int = 128
    act_order: bool = True
    static_groups: bool = True
    hessian_shrink: float = 0.5
    float32_factor: bool = False
    clip_search: bool = False
    float_target: bool = False
    refine: int = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.percdamp, (int, float)) and 0 < self.percdamp < 1):
            raise OnnxqError(f"gptq.percdamp must be in (0, 1), got {self.percdamp!r}")
        if not (isinstance(self.lazy_batch, int) and self.lazy_batch >= 1):
            raise OnnxqError(f"gptq.lazy_batch must be a positive integer, got {self.lazy_batch!r}")
        if not (isinstance(self.hessian_shrink, (int, float)) and 0 <= self.hessian_shrink <= 1):
            raise OnnxqError(f"gptq.hessian_shrink must be in [0, 1], got {self.hessian_shrink!r}")
        _check_float32_factor(self.float32_factor, self.hessian_shrink, "gptq.")
        _check_clip_search(self.clip_search, self.static_groups, "gptq.")
        if not (isinstance(self.refine, int) and not isinstance(self.refine, bool) and 0 <= self.refine <= 16):
            raise OnnxqError(f"gptq.refine must be an integer in [0, 16] (coordinate-descent passes), got {self.refine!r}")


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


def _solve_transposed(lower: np.ndarray, rhs: np.ndarray) -> None:
    """``rhs <- lower^-T @ rhs`` in place for a lower-triangular ``[n, n]`` and ``rhs: [n, m]``.

    2x2 block recursion (``lower^T`` is upper triangular: the bottom half first), ``n^2 m`` FLOP
    in matrix products; blocks of at most ``_TRIANGULAR_BASE / 2`` rows by an explicit inverse.
    """
    n = lower.shape[0]
    if n <= _TRIANGULAR_BASE // 2:
        rhs[...] = np.linalg.inv(lower).T @ rhs
        return
    m = n // 2
    _solve_transposed(lower[m:, m:], rhs[m:])
    rhs[:m] -= lower[m:, :m].T @ rhs[m:]
    _solve_transposed(lower[:m, :m], rhs[:m])


def _reverse_cholesky(hessian: np.ndarray) -> np.ndarray:
    """``M`` lower triangular with ``hessian = M^T M`` (``LinAlgError`` if not SPD).

    With ``J`` the reversal permutation and ``J H J = L L^T`` (LAPACK ``potrf``): ``M = J L^T J``.
    """
    lower = np.linalg.cholesky(np.ascontiguousarray(hessian[::-1, ::-1]))
    return lower.T[::-1, ::-1]


def _blocked_factor(hessian: np.ndarray, diagonal: np.ndarray, order: np.ndarray | None, kp: int,
                    damp: float, shrink: float = 0.0, dtype=np.float64) -> np.ndarray:
    """float32 ``M: [kp, kp]`` lower triangular with ``H' = M^T M`` (``LinAlgError`` if not SPD).

    ``H'`` is ``hessian: [K, K]`` with rows and columns taken in ``order`` (None: as they are),
    ``diagonal: [K]`` (the Hessian's diagonal in that order, dead entries set to 1) plus ``damp``
    on the diagonal, its off-diagonal entries times ``1 - shrink``, and an identity for the padded
    rows ``K..kp``. ``M = U^-T`` for the reference's ``U = chol_upper(H'^-1)``, so no inverse is needed. Left-looking, blocked from
    the bottom right, in float64 on one private ``[kp, kp]`` buffer (only its lower block
    triangle is ever filled): for the block ``S`` of ``_FACTOR_BLOCK`` rows above the finished
    rows ``T``, ``C = H'_SS - M_TS^T M_TS`` (``syrk``), ``M_SS`` from LAPACK ``potrf`` of ``C``
    (:func:`_reverse_cholesky`), and ``M_S,<S = M_SS^-T (H'_S,<S - M_TS^T M_T,<S)`` (one GEMM
    and a triangular solve, :func:`_solve_transposed`). K^3/3 FLOP like one LAPACK
    call, without its reversed copies; each finished block row goes to the float32 result (a
    float32 factor is computed in the result itself: no second ``[kp, kp]`` buffer).
    ``dtype``: float64, or float32 where the shrink bounds the cancellation (``float32_factor``, from
    :data:`_FLOAT32_FACTOR_SHRINK`: see the module docstring).
    """
    k = len(diagonal)
    in_place = np.dtype(dtype) == np.float32  # the float32 factor is computed in the result itself
    # zeros: the result's upper block triangle (never written; calloc'd pages are not touched) and padded rows
    a = np.zeros((kp, kp), dtype=dtype) if in_place or kp != k else np.empty((kp, kp), dtype=dtype)
    out = a if in_place else np.zeros((kp, kp), dtype=np.float32)
    blocks = [(max(stop - _FACTOR_BLOCK, 0), stop) for stop in range(kp, 0, -_FACTOR_BLOCK)]
    for start, stop in blocks:  # the lower block triangle of H', rows start:stop
        real = min(stop, k)
        if start < real:
            a[start:real, :real] = (hessian[start:real, :real] if order is None  # np.take: 5x faster than np.ix_
                                    else np.take(np.take(hessian, order[start:real], axis=0), order[:real], axis=1))
            if shrink:
                a[start:real, :real] *= 1.0 - shrink  # the diagonal is set below
    index = np.arange(kp)
    a[index, index] = 1.0  # padded rows
    a[index[:k], index[:k]] = diagonal + damp
    for start, stop in blocks:
        c = a[start:stop, start:stop]
        left = a[start:stop, :start]
        if stop < kp:
            below = a[stop:, start:stop]  # M_TS
            c -= below.T @ below
            if start:
                left -= below.T @ a[stop:, :start]
        block = _reverse_cholesky(c)
        if start:
            _solve_transposed(block, left)
        c[...] = block
        if not in_place:
            out[start:stop, :stop] = a[start:stop, :stop]
    return out


def _check_clip_search(clip_search: bool, static_groups: bool, prefix: str = "") -> None:
    """Raise OnnxqError when ``clip_search`` is asked for without static groups (it sets every block's scales
    before the solve)."""
    if clip_search and not static_groups:
        raise OnnxqError(f"{prefix}clip_search sets the block scales up front: it needs {prefix}static_groups")


def _check_float32_factor(float32_factor: Any, shrink: float, prefix: str = "") -> None:
    """Raise OnnxqError unless ``float32_factor`` is a bool allowed with ``shrink`` (:data:`_FLOAT32_FACTOR_SHRINK`)."""
    if not isinstance(float32_factor, bool):
        raise OnnxqError(f"{prefix}float32_factor must be true or false, got {float32_factor!r}")
    if float32_factor and shrink < _FLOAT32_FACTOR_SHRINK:
        raise OnnxqError(f"GPTQ's float32 factor needs hessian_shrink >= {_FLOAT32_FACTOR_SHRINK} (its accuracy "
                         f"rests on the shrink), got {shrink}")


def _damped_factor(hessian: np.ndarray, diagonal: np.ndarray, order: np.ndarray | None,
                   kp: int, percdamp: float, shrink: float = 0.0, dtype=np.float64) -> tuple[np.ndarray, float]:
    """Add ``percdamp * mean(diagonal)`` to the diagonal and factor; retry with 10x damping on failure."""
    mean_diag = float(np.mean(diagonal))  # > 0: the diagonal is >= 0 and dead entries are 1
    for attempt in range(_CHOLESKY_RETRIES):
        damp = percdamp * mean_diag * 10.0**attempt
        try:
            return _blocked_factor(hessian, diagonal, order, kp, damp, shrink, dtype), damp
        except np.linalg.LinAlgError:
            logger.warning("GPTQ: Hessian not positive definite with damping %g; retrying with 10x damping", damp)
    raise OnnxqError(
        f"GPTQ expected a positive semi-definite Hessian [K, K] (2/n X^T X); Cholesky failed even with "
        f"damping {damp:g} added to the diagonal (mean diagonal {mean_diag:g})"
    )


def _check_inputs(weight, hessian, bits, block_size, percdamp, lazy_batch,
                  hessian_shrink) -> tuple[np.ndarray, np.ndarray]:
    """``(weight as float32, hessian)``, both the caller's arrays where no conversion is needed."""
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
    if not _all_finite(hessian):
        raise OnnxqError("GPTQ expected a finite Hessian, found NaN or inf")
    if np.any(np.diag(hessian) < 0):
        raise OnnxqError("GPTQ expected a Hessian 2/n X^T X with a diagonal >= 0, found negative entries")
    if not _all_finite(weight):
        raise OnnxqError("GPTQ expected a finite weight, found NaN or inf")
    if not percdamp > 0:
        raise OnnxqError(f"GPTQ percdamp must be > 0, got {percdamp!r}")
    if not isinstance(lazy_batch, (int, np.integer)) or lazy_batch < 1:
        raise OnnxqError(f"GPTQ lazy_batch must be a positive integer, got {lazy_batch!r}")
    if not (isinstance(hessian_shrink, (int, float)) and 0 <= hessian_shrink <= 1):
        raise OnnxqError(f"GPTQ hessian_shrink must be in [0, 1], got {hessian_shrink!r}")
    return np.asarray(weight, dtype=np.float32), hessian  # read only: never modified


def _all_finite(values: np.ndarray) -> bool:
    """No NaN or inf in ``values``: one sum (NaN and inf propagate), the elementwise test only if it overflows."""
    with np.errstate(all="ignore"):
        return bool(np.isfinite(np.sum(values))) or bool(np.all(np.isfinite(values)))


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
    hessian_shrink: float = 0.0,
    float32_factor: bool = False,
    clip_search: bool = False,
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
        hessian_shrink: ``lambda`` in ``[0, 1]``: the Hessian used is ``(1 - lambda) H + lambda diag(H)``
            (a shrinkage estimate, as Ledoit and Wolf shrink a sample covariance towards its
            diagonal): each input channel keeps its weight, the cross-channel correlations that
            steer the error feedback are trusted less. ``1`` is RTN with the same scales; ``0`` the paper.
        float32_factor: the Cholesky factor in float32 (about twice as fast, half the memory; allowed
            from ``hessian_shrink >= 0.25``: see the module docstring).
        clip_search: static groups only: each (output column, block)'s scale from the clip ratio in
            :data:`~onnxq.algorithms.awq.AWQ_CLIP_RATIOS` whose round-to-nearest error ``d`` has the
            least output error ``d^T H_bb d`` on the block's diagonal block of the (unshrunk) Hessian:
            AWQ's clip search (arXiv 2306.00978, sec. 3.3; :func:`~onnxq.algorithms.awq.awq_clip_search`
            with ``gram=H``) on GPTQ's own statistic, before the solve.

    Returns:
        :class:`GPTQResult`. Rows of K whose ``H_kk == 0`` (inputs that were always zero) are
        zeroed before quantization, as in the reference implementation.
    """
    lazy_batch = lazy_batch if blocksize is None else blocksize
    weight, hessian = _check_inputs(weight, hessian, bits, block_size, percdamp, lazy_batch, hessian_shrink)
    _check_float32_factor(float32_factor, hessian_shrink)
    _check_clip_search(clip_search, static_groups)
    k, n = weight.shape
    bs = k if block_size == -1 else int(block_size)
    k_blocks = -(-k // bs)
    kp = k_blocks * bs
    maxq = np.float32((1 << bits) - 1)

    diagonal = np.diag(hessian).astype(np.float64)
    dead = diagonal == 0  # inputs that were always zero: H_kk = 1, weight row 0
    diagonal[dead] = 1.0
    if kp == k and not dead.any():
        padded = np.ascontiguousarray(weight)  # read only; rows are read in place
    else:  # padded rows: zero weight, identity Hessian, hence decoupled (M is block diagonal)
        padded = np.zeros((kp, n), dtype=np.float32)
        padded[:k] = weight
        padded[:k][dead] = 0.0

    scales = np.empty((n, k_blocks), dtype=np.float32)
    zero_points = np.empty((n, k_blocks), dtype=np.uint8)
    # per block, contiguous [k_blocks, N] float32: scale, zero point, 1/scale (0 where the scale is 0)
    block_scales = np.empty((k_blocks, n), dtype=np.float32)
    block_zps = np.empty((k_blocks, n), dtype=np.float32)
    block_recips = np.zeros((k_blocks, n), dtype=np.float32)
    have_params = np.zeros(k_blocks, dtype=bool)

    def store_params(block: slice, block_scales_t: np.ndarray, block_zps_t: np.ndarray) -> None:
        """Keep the scales / zero points ``[N, blocks]`` of ``block`` (a slice of block indices)."""
        scales[:, block] = block_scales_t
        zero_points[:, block] = block_zps_t
        block_scales[block] = scales[:, block].T
        block_zps[block] = zero_points[:, block].T
        np.divide(np.float32(1), block_scales[block], out=block_recips[block], where=block_scales[block] != 0)
        have_params[block] = True

    def set_params(block: slice, rows: np.ndarray) -> None:
        """Scales / zero points of ``block`` from ``rows: [*, N]`` (round-to-nearest, or MSE clip)."""
        qw = quantize_weight(rows, bits, bs, symmetric, mse_clip=mse_clip, scale_dtype=scale_dtype)
        store_params(block, qw.scales, qw.effective_zero_points())

    if static_groups and clip_search:  # dead rows are zero in padded, and in H
        clipped = awq_clip_search(padded[:k], None, bits, bs, symmetric, scale_dtype=scale_dtype, gram=hessian)
        store_params(slice(0, k_blocks), clipped.scales, clipped.effective_zero_points())
    elif static_groups:
        set_params(slice(0, k_blocks), padded)

    if act_order:
        order = np.argsort(-diagonal, kind="stable")
        diagonal = diagonal[order]
        order = np.concatenate([order, np.arange(k, kp)])
    else:
        order = np.arange(kp)
    # the row processed at step i is padded[source[i]], read in place: a permuted copy of the weight
    # cost a [K, N] buffer's allocation, first touch and copy per solve
    source = order.tolist()
    m, damp = _damped_factor(hessian, diagonal, order if act_order else None, kp, percdamp, float(hessian_shrink),
                             np.float32 if float32_factor else np.float64)
    diag = np.diag(m).copy()
    inv_diag = np.float32(1) / diag
    # Dynamic groups need the current value of rows not yet reached: -(M^-1)[rows, :i] @ E[:i].
    m_inv = None if static_groups else _inv_lower(m.astype(np.float64)).astype(np.float32)
    position = np.empty(kp, dtype=np.int64)
    position[order] = np.arange(kp)
    row_blocks = (order // bs).tolist()  # the block of the row processed at each step

    codes_t = np.empty((n, kp), dtype=np.uint8)  # codes, original row order, [N, K] as QuantizedWeight keeps them
    # act order: codes by original row first (row writes), transposed into codes_t in slabs at the end; a
    # column scatter straight into codes_t took 3x as long (0.21 s against 0.07 s at 4096x4096)
    codes_rows = np.empty((kp, n), dtype=np.uint8) if act_order else None
    diffs = np.empty((kp, n), dtype=np.float32)  # D = W - Q, processing order
    # E = M D, a row holding w' (as far as it is known) until its panel is finished: all rows for dynamic
    # groups, else one batch
    errors = np.empty((kp if m_inv is not None else min(lazy_batch, kp), n), dtype=np.float32)
    codes_f = np.empty((min(lazy_batch, kp), n), dtype=np.float32)  # the codes of the current batch, as floats
    q_panel = np.empty((_PANEL, n), dtype=np.float32)  # Q of the current panel
    update = np.empty(n, dtype=np.float32)
    # operands of the per-row steps as rows, not scalars: numpy's scalar path costs 2-4 us more a call
    offset_row, zero_row, maxq_row = (np.full(n, value, dtype=np.float32) for value in (ROUNDING_OFFSET, 0, maxq))
    loss = np.zeros(n)
    base = finished = 0  # errors[r - base] is row r; errors[:finished - base] hold E

    def finish_errors(stop: int) -> None:
        """``E = (w' - q) * M_kk`` for the rows ``finished:stop`` (all in the current panel)."""
        nonlocal finished
        rows = errors[finished - base:stop - base]
        np.subtract(rows, q_panel[finished - p1:stop - p1], out=rows)
        np.multiply(rows, diag[finished:stop, None], out=rows)
        finished = stop

    for i1 in range(0, kp, lazy_batch):
        i2 = min(i1 + lazy_batch, kp)
        base = 0 if m_inv is not None else i1
        # errors[r - base] = M[r, :c] @ D[:c], c = i1, then the start of r's panel: one GEMM each (the rows
        # become w' below; the feedback is summed before the division and w_r: its terms can cancel)
        batch_rows = errors[i1 - base:i2 - base]
        if i1:
            np.matmul(m[i1:i2, :i1], diffs[:i1], out=batch_rows)
        else:
            batch_rows[...] = 0.0
        for p1 in range(i1, i2, _PANEL):
            p2 = min(p1 + _PANEL, i2)
            if p1 > i1:
                errors[p1 - base:p2 - base] += m[p1:p2, i1:p1] @ diffs[i1:p1]
            for i in range(p1, p2):
                block = row_blocks[i]
                if not have_params[block]:
                    pos = position[block * bs:(block + 1) * bs]  # all >= i: the block is first reached now
                    finish_errors(i)
                    rows = padded[block * bs:(block + 1) * bs]  # original rows r, at steps pos = position[r]
                    current = rows - m_inv[pos, :i] @ errors[:i] if i else rows
                    set_params(slice(block, block + 1), current)
                w = errors[i - base]
                row = padded[source[i]]
                if i > p1:  # w' = w + (M[i, :i] @ D[:i]) / M_ii, the panel's own rows last
                    np.matmul(m[i, p1:i], diffs[p1:i], out=update)
                    np.add(w, update, out=w)
                np.multiply(w, inv_diag[i], out=w)
                np.add(row, w, out=w)
                # codes as quantize_with_params: w / scale + zero point, rounded half up, clipped
                codes = np.multiply(w, block_recips[block], out=codes_f[i - i1])
                np.add(codes, block_zps[block], out=codes)
                np.add(codes, offset_row, out=codes)
                np.floor(codes, out=codes)
                np.maximum(codes, zero_row, out=codes)
                np.minimum(codes, maxq_row, out=codes)
                q = np.subtract(codes, block_zps[block], out=q_panel[i - p1])  # as QuantizedWeight.dequantize
                np.multiply(q, block_scales[block], out=q)
                np.subtract(row, q, out=diffs[i])
            finish_errors(p2)
        batch_errors = errors[i1 - base:i2 - base]
        loss += np.einsum("kn,kn->n", batch_errors, batch_errors, dtype=np.float64)
        if codes_rows is not None:
            codes_rows[order[i1:i2]] = codes_f[:i2 - i1]
        else:
            codes_t[:, i1:i2] = codes_f[:i2 - i1].T

    if codes_rows is not None:
        for start in range(0, kp, lazy_batch):
            codes_t[:, start:start + lazy_batch] = codes_rows[start:start + lazy_batch].T
    codes = codes_t.reshape(n, k_blocks, bs)
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
    hessian_shrink: float = 0.0,
    float32_factor: bool = False,
    clip_search: bool = False,
) -> QuantizedWeight:
    """GPTQ-quantize ``weight: [K, N]`` given ``hessian: [K, K] = 2/n X^T X`` (arXiv 2210.17323).

    Same arguments as :func:`gptq_solve`; returns only the :class:`~onnxq.core.QuantizedWeight`,
    whose codes, scales and zero points are exactly those the solver propagated errors for.
    """
    return gptq_solve(
        weight, hessian, bits, block_size, symmetric, percdamp=percdamp, lazy_batch=lazy_batch,
        blocksize=blocksize, act_order=act_order, static_groups=static_groups, mse_clip=mse_clip, scale_dtype=scale_dtype,
        hessian_shrink=hessian_shrink, float32_factor=float32_factor, clip_search=clip_search,
    ).qweight


def gptq_with_options(weight: np.ndarray, hessian: np.ndarray, settings: Any, options: GPTQConfig,
                      scale_dtype: np.dtype | type = np.float32) -> QuantizedWeight:
    """GPTQ as :class:`GPTQConfig` configures it: :func:`gptq_solve` (arXiv 2210.17323), then ``options.refine``
    passes of :func:`~onnxq.algorithms.gptq_refine.refine_quantized_weight` (QuantEase's coordinate descent,
    arXiv 2309.01885, with the block scales refitted) on the same objective.

    Args:
        weight: ``[K, N]`` float weight; hessian: ``[K, K]`` ``2/n X^T X``.
        settings: the node's quantization settings (``bits``, ``block_size``, ``symmetric``, ``mse_clip``).
        options: the GPTQ options; scale_dtype: the dtype the scales are stored in.
    """
    result = gptq_solve(weight, hessian, settings.bits, settings.block_size, settings.symmetric,
                        percdamp=options.percdamp, lazy_batch=options.lazy_batch, act_order=options.act_order,
                        static_groups=options.static_groups, mse_clip=settings.mse_clip, scale_dtype=scale_dtype,
                        hessian_shrink=options.hessian_shrink, float32_factor=options.float32_factor,
                        clip_search=options.clip_search)
    if not options.refine:
        return result.qweight
    refined, _ = refine_quantized_weight(weight, hessian, result.qweight, passes=options.refine,
                                         shrink=options.hessian_shrink, damp=result.damp, order=result.order,
                                         scale_dtype=scale_dtype)
    return refined


@register_algorithm
class GPTQ(Algorithm):
    """GPTQ (arXiv 2210.17323) on each weight of the group, from its input's Hessian, then ``refine`` passes of
    coordinate descent (:func:`gptq_with_options`)."""

    separable = True

    name = "gptq"
    statistics = ("hessian",)
    options_field = "gptq"
    options_type = GPTQConfig

    def float_target(self, options: Any) -> bool:
        return options.float_target

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: Any) -> Solution:
        """GPTQ per weight; with ``stats["cross"]`` (the float target), on :func:`float_target_weight`."""
        targets = group.weights if "cross" not in stats else [
            float_target_weight(weight, stats["hessian"], stats["cross"], options.percdamp) for weight in group.weights]
        qweights = [gptq_with_options(weight, stats["hessian"], s, options, group.scale_dtype)
                    for weight, s in zip(targets, group.settings)]
        return Solution(qweights, [relative_error(w, q) for w, q in zip(group.weights, qweights)])
