"""AWQ's input scales, then k-quant's importance-weighted scale search on the scaled weights.

For a sibling group reading ``x: [T, K]`` (e.g. q/k/v), AWQ's scale search (arXiv 2306.00978,
sec. 3.2; :class:`onnxq.algorithms.awq.AWQThen`) picks per-input-channel scales ``s``
so that ``x @ W = (x / s) @ (s[:, None] * W)`` quantizes better. k-quant (llama.cpp's weighted
least-squares scale search, :func:`onnxq.algorithms.kquant.kquant_quantize_weight`) then
quantizes each ``s[:, None] * W_i`` with the importance of the input it will really see,
``E[(x / s)_k^2] = E[x_k^2] / s_k^2``. AWQ's own clip search is not run: k-quant's per-block
scale fit replaces it. ``alpha = 0`` (scales of one) is plain calibrated k-quant.
Options: ``QuantConfig.awq`` (``grid``, ``scale_search``, ``sample_rows``) and ``QuantConfig.k_quant``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from onnxq.algorithms.awq import AWQThen
from onnxq.algorithms.kquant import kquant_quantize_weight
from onnxq.algorithms.registry import register_algorithm
from onnxq.core import QuantizedWeight

__all__ = ["AWQThenKQuant"]


@register_algorithm
class AWQThenKQuant(AWQThen):
    """``awq+k_quant``: AWQ's scale search per sibling group, then k-quant per weight on the scaled problem."""

    name = "awq+k_quant"
    statistics = ("sq_mean", "abs_mean", "rows")
    then_options = "k_quant"
    then_label = "k-quant"

    def solve_scaled(self, weight: np.ndarray, settings: Any, s: np.ndarray, stats: Mapping[str, Any],
                     options: Any, scale_dtype) -> QuantizedWeight:
        importance = np.asarray(stats["sq_mean"], dtype=np.float64) / np.square(s.astype(np.float64))
        return kquant_quantize_weight(weight, settings.bits, settings.block_size, settings.symmetric,
                                      importance=importance, options=options, scale_dtype=scale_dtype).qweight
