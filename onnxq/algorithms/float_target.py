"""The float target: the weight a layer should approximate when its inputs come from a quantized model.

Sequential calibration (GPTQ, AWQ) fits each layer on the inputs ``X_q`` the already quantized
blocks produce, keeping the layer's own float function there. :func:`float_target_weight` gives the
weight whose output on ``X_q`` best matches the *float* model's output ``X_f W`` of the same tokens;
the calibration driver supplies ``C = 2/n X_q^T X_f`` (the ``"cross"`` statistic) for the inputs it
applies to (:mod:`onnxq.calibration.driver`). No graph code here.
"""
from __future__ import annotations

import numpy as np

from onnxq.errors import OnnxqError

__all__ = ["float_target_weight"]


def float_target_weight(weight: np.ndarray, hessian: np.ndarray, cross: np.ndarray,
                        percdamp: float = 0.01) -> np.ndarray:
    """The weight to quantize when its inputs are a quantized model's (asymmetric calibration, as in
    GPTAQ, Li et al., ICML 2025; GPTQ and AWQ quantize it in place of ``weight``).

    Sequential GPTQ minimizes ``||X_q (W_hat - W)||^2``: it keeps the layer's float function on
    the inputs ``X_q: [T, K]`` the quantized model produces. What the model needs is the float
    model's output ``X_f W`` of the same tokens. ``||X_q W_hat - X_f W||^2`` equals
    ``||X_q (W_hat - W*)||^2`` plus a constant, where ``W*`` is the least-squares fit of
    ``X_f W`` on ``X_q``; so GPTQ run on ``W*`` (with the same Hessian) minimizes it. The fit is
    regularized towards ``W`` by each input channel's own energy (a ridge penalty
    ``sum_k H_kk ||W*_k - W_k||^2``, which halves the step of an unregularized fit when the
    channels are uncorrelated): with twice this step, applied to every layer, SmolLM2-135M's output
    broke down (docs/INT4_RESULTS.md, sixth session)::

        W* = W + (H + diag(H) + 2 * percdamp * mean(diag H) * I)^-1 (C - H) W

    Args:
        weight: ``[K, N]`` float weight (``y = x @ weight``).
        hessian: ``[K, K]`` ``H = 2/n X_q^T X_q``.
        cross: ``[K, K]`` ``C = 2/n X_q^T X_f`` on the same rows and scale
            (:class:`~onnxq.calibration.accumulators.CrossAccumulator`); ``C == H`` gives ``W``.
        percdamp: damping as a fraction of ``mean(diag H)`` (GPTQ's).

    Returns:
        ``W*``: ``[K, N]`` float32.

    Raises:
        OnnxqError: shapes that do not match, or non-finite statistics.
    """
    weight = np.asarray(weight, dtype=np.float32)
    k = weight.shape[0] if weight.ndim == 2 else -1
    if weight.ndim != 2 or np.shape(hessian) != (k, k) or np.shape(cross) != (k, k):
        raise OnnxqError(f"float target: weight {np.shape(weight)} needs a [K, K] Hessian and cross product, got "
                         f"{np.shape(hessian)} and {np.shape(cross)}")
    hessian, cross = np.asarray(hessian, np.float64), np.asarray(cross, np.float64)
    if not (np.isfinite(hessian).all() and np.isfinite(cross).all()):
        raise OnnxqError("float target: the Hessian or the cross product holds NaN or Inf")
    diagonal = np.diag(hessian).copy()
    diagonal[diagonal == 0] = 1.0  # an input that was always zero: its row of C - H is zero too
    ridge = hessian + np.diag(diagonal + 2.0 * percdamp * float(diagonal.mean()))
    step = np.linalg.solve(ridge, (cross - hessian) @ weight.astype(np.float64))
    return (weight + step).astype(np.float32)
