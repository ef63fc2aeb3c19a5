"""TEQ: trainable equivalent transformation (Cheng et al., arXiv 2310.10944; Intel Neural Compressor).

Numpy only: an input sample in, per-input-channel scales and
:class:`~onnxq.core.QuantizedWeight` out. As with AWQ, the scales keep the float model
unchanged (``x W = (x / s) (s W)``) and dividing the input by ``s`` is folded into the op that
feeds the layers by the caller (graph) code.

For sibling layers ``y_i = x @ W_i`` (``W_i: [K, N_i]``) sharing an input sample ``x: [T, K]``,
TEQ trains ``s: [K] > 0`` to minimise

    L(s) = sum_i ||x W_i - (x / s) Q(s W_i)||_F^2 = sum_i ||x D_i||_F^2,   D_i = W_i - Q(s W_i) / s

with ``Q`` onnxq's round-to-nearest (:func:`~onnxq.core.quantize_weight`), differentiated with
the straight-through estimator for the rounding (the block range moves with its extreme values;
see :class:`~onnxq.algorithms.autoround.SteBlockQuantizer`). With ``P_i = Q(s W_i) / s``,
``G_i = dL/dP_i = -2 x^T x D_i`` and ``u = log s``:

    dL/du_k = sum_i sum_n ( [dL/dv_i]_kn v_kn - [G_i]_kn [P_i]_kn ),   v = s W_i,  dL/dQ = G / s

``u`` is trained with Adam (the reference trains ``s`` with Adam); working on ``log s`` keeps
``s`` positive. The gradient is normalised by the RTN loss so that ``lr`` does not depend on the
scale of the data. Every iterate's loss is measured exactly; the best one is returned and the
first is ``s = 1`` (plain RTN), so the result is never worse than RTN on ``x``. The columns of
all siblings are processed together in chunks of bounded size (small siblings share one matrix
product per step; large ones never need more than a few ``[K, chunk]`` float32 arrays).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from onnxq.algorithms.autoround import (
    OutputErrorOperator,
    SteBlockQuantizer,
    TuningConfig,
    check_input,
    check_settings,
    check_weight,
    padded_blocks,
    rtn_when_too_large,
)
from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, effective_error, register_algorithm
from onnxq.core import QuantizedWeight, quantize_weight
from onnxq.errors import OnnxqError

__all__ = ["TEQ", "TEQResult", "teq_quantize_weights"]

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 3_000_000  # K * columns handled at once
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


@dataclass(frozen=True)
class TEQResult:
    """Outcome of :func:`teq_quantize_weights`.

    Attributes:
        scales: float32 ``[K]``; the layers compute ``(x / scales) @ qweights[i].dequantize()``.
        qweights: one quantized ``scales[:, None] * W_i`` per sibling, in input order.
        loss_history: float64 ``[steps + 1]``: ``L(s)`` of each iterate (``loss_history[0]`` is RTN).
        loss: ``L`` of the returned scales (``min(loss_history)``).
        loss_rtn: ``L(1)``, plain RTN.
    """

    scales: np.ndarray
    qweights: tuple[QuantizedWeight, ...]
    loss_history: np.ndarray
    loss: float
    loss_rtn: float


def _column_chunks(weights: list[np.ndarray], size: int) -> list[np.ndarray]:
    """The columns of ``[W_1 | W_2 | ...]`` in ``[K, <= size]`` pieces (views, or a copy where a piece
    spans two weights), so small siblings share one matrix product per step."""
    chunks: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    filled = 0
    for weight in weights:
        start = 0
        while start < weight.shape[1]:
            take = min(size - filled, weight.shape[1] - start)
            pending.append(weight[:, start:start + take])
            filled += take
            start += take
            if filled == size:
                chunks.append(pending[0] if len(pending) == 1 else np.concatenate(pending, axis=1))
                pending, filled = [], 0
    if pending:
        chunks.append(pending[0] if len(pending) == 1 else np.concatenate(pending, axis=1))
    return chunks


def _loss_and_gradient(
    chunks: list[np.ndarray],
    s: np.ndarray,
    operator: OutputErrorOperator,
    bits: int,
    bs: int,
    symmetric: bool,
    scale_dtype,
) -> tuple[float, np.ndarray]:
    """``(L(s), dL/d log s: float64 [K])`` summed over column blocks ``[K, n]`` of the weights."""
    k = len(s)
    kp = -(-k // bs) * bs
    loss = 0.0
    grad = np.zeros(k, dtype=np.float64)
    for w in chunks:
        scaled = s[:, None] * w
        quantizer = SteBlockQuantizer(padded_blocks(scaled, bs), bits, symmetric, scale_dtype)
        state = quantizer.forward()
        effective = state.deq.reshape(kp, -1)[:k] / s[:, None]  # P = Q(s W) / s
        diff = np.zeros((kp, w.shape[1]), dtype=np.float32)
        np.subtract(w, effective, out=diff[:k])
        hd, col_loss = operator.apply(diff)
        loss += float(col_loss.sum())
        grad_p = hd[:k]
        grad_p *= np.float32(-2)  # G = dL/dP
        grad_q = np.zeros((kp, w.shape[1]), dtype=np.float32)
        np.divide(grad_p, s[:, None], out=grad_q[:k])  # dL/dQ = G / s
        grad_v = quantizer.value_gradient(state, grad_q.reshape(state.deq.shape)).reshape(kp, -1)[:k]
        grad += np.einsum("kn,kn->k", grad_v, scaled, dtype=np.float64)
        grad -= np.einsum("kn,kn->k", grad_p, effective, dtype=np.float64)
    return loss, grad


def teq_quantize_weights(
    weights: Sequence[np.ndarray],
    x: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    *,
    steps: int = 200,
    lr: float = 0.01,
    scale_dtype: np.dtype | type = np.float32,
) -> TEQResult:
    """Train TEQ's per-input-channel scales for sibling layers sharing ``x`` (arXiv 2310.10944).

    Args:
        weights: sibling weights ``[K, N_i]`` that all read the same input; not modified.
        x: ``[T, K]`` sample of that input (cost per step ``~min(4 T, 2 K) K sum N_i`` flops;
            a few hundred rows is the intended size).
        bits, block_size, symmetric, scale_dtype: the RTN quantizer, as
            :func:`~onnxq.core.quantize_weight`.
        steps: Adam steps on ``log s`` (0 gives RTN).
        lr: Adam's learning rate on ``log s``.

    Returns:
        :class:`TEQResult`; the caller must divide the layers' input by ``result.scales`` (fold it
        into the preceding op) for ``result.qweights`` to compute ``x @ W_i``.
    """
    check_settings("TEQ", bits, block_size)
    if not weights:
        raise OnnxqError("TEQ expected at least one weight sharing the input, got none")
    first = check_weight("TEQ", weights[0])
    k = first.shape[0]
    weights = [first] + [check_weight("TEQ", w, k) for w in weights[1:]]
    x = check_input("TEQ", x, k)
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise OnnxqError(f"TEQ steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float, np.floating)) and np.isfinite(lr) and lr > 0):
        raise OnnxqError(f"TEQ lr must be a finite number > 0, got {lr!r}")
    bs = k if block_size == -1 else int(block_size)
    k_padded = -(-k // bs) * bs
    operator = OutputErrorOperator(x, k_padded)
    chunks = _column_chunks(weights, max(1, _CHUNK_ELEMENTS // k_padded))

    log_s = np.zeros(k, dtype=np.float64)
    moment1 = np.zeros(k, dtype=np.float64)
    moment2 = np.zeros(k, dtype=np.float64)
    history = np.empty(int(steps) + 1, dtype=np.float64)
    best_s = np.ones(k, dtype=np.float32)
    best_loss = np.inf
    norm = 1.0
    for step in range(int(steps) + 1):
        s = np.exp(log_s).astype(np.float32)
        loss, grad = _loss_and_gradient(chunks, s, operator, bits, bs, symmetric, scale_dtype)
        history[step] = loss
        if loss < best_loss:
            best_loss, best_s = loss, s
        if step == 0:
            norm = loss if loss > 0 else 1.0
        if step == steps:
            break
        grad /= norm
        moment1 = _ADAM_BETAS[0] * moment1 + (1 - _ADAM_BETAS[0]) * grad
        moment2 = _ADAM_BETAS[1] * moment2 + (1 - _ADAM_BETAS[1]) * grad * grad
        m_hat = moment1 / (1 - _ADAM_BETAS[0] ** (step + 1))
        v_hat = moment2 / (1 - _ADAM_BETAS[1] ** (step + 1))
        log_s -= lr * m_hat / (np.sqrt(v_hat) + _ADAM_EPS)
    qweights = tuple(
        quantize_weight(best_s[:, None] * w, bits, bs, symmetric, scale_dtype=scale_dtype) for w in weights
    )
    logger.debug("TEQ K=%d, %d weights: loss %.4g -> %.4g (RTN -> best)", k, len(weights), history[0], best_loss)
    return TEQResult(scales=best_s, qweights=qweights, loss_history=history, loss=float(best_loss),
                     loss_rtn=float(history[0]))


@register_algorithm
class TEQ(Algorithm):
    """TEQ (arXiv 2310.10944): trained per-input-channel scales shared by the sibling group."""

    name = "teq"
    statistics = ("rows",)
    options_field = "teq"
    options_type = TuningConfig

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: Any) -> Solution:
        fallback = rtn_when_too_large(self.name, group, options)
        if fallback is not None:
            return fallback
        first = group.settings[0]
        result = teq_quantize_weights(group.weights, stats["rows"], first.bits, first.block_size, first.symmetric,
                                      steps=options.steps, **({"lr": options.lr} if options.lr is not None else {}),
                                      scale_dtype=group.scale_dtype)
        s = result.scales
        qweights = []
        for weight, st, qweight in zip(group.weights, group.settings, result.qweights):
            if st != first:  # a sibling with its own override: RTN of its scaled weight
                qweight = quantize_weight(s[:, None] * weight, st.bits, st.block_size, st.symmetric,
                                          scale_dtype=group.scale_dtype)
            qweights.append(qweight)
        scale = None if np.all(s == 1) else s
        errors = [effective_error(w, q, scale) for w, q in zip(group.weights, qweights)]
        gain = 1 - result.loss / result.loss_rtn if result.loss_rtn > 0 else 0.0
        return Solution(qweights, errors, scale, f"{group.input_name}: TEQ loss -{gain:.1%} vs RTN")
