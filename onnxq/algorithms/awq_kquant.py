"""AWQ's input scales, then k-quant's importance-weighted scale search on the scaled weights.

For a sibling group reading ``x: [T, K]`` (e.g. q/k/v), AWQ's scale search (arXiv 2306.00978,
sec. 3.2; :func:`onnxq.algorithms.awq.awq_search_scale`) picks per-input-channel scales ``s``
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

from onnxq.algorithms.awq import awq_search_scale
from onnxq.algorithms.kquant import kquant_quantize_weight
from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, effective_error, register_algorithm

__all__ = ["AWQThenKQuant"]


@register_algorithm
class AWQThenKQuant(Algorithm):
    """``awq+k_quant``: AWQ's scale search per sibling group, then k-quant per weight on the scaled problem."""

    name = "awq+k_quant"
    statistics = ("sq_mean", "abs_mean", "rows")

    def options_of(self, config: Any) -> tuple[Any, Any]:
        return config.awq, config.k_quant

    def sample_rows(self, options: tuple[Any, Any]) -> int:
        return options[0].sample_rows

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: tuple[Any, Any]) -> Solution:
        awq, k_quant = options
        first = group.settings[0]
        search = awq_search_scale(group.weights, stats["rows"], stats["abs_mean"], first.bits, first.block_size,
                                  first.symmetric, grid=awq.grid if awq.scale_search else 1,
                                  scale_dtype=group.scale_dtype)
        scale = search.scales if search.alpha > 0 else None
        s = np.ones(group.weights[0].shape[0], dtype=np.float32) if scale is None else scale
        importance = np.asarray(stats["sq_mean"], dtype=np.float64) / np.square(s.astype(np.float64))
        qweights = [
            kquant_quantize_weight(s[:, None] * weight, st.bits, st.block_size, st.symmetric, importance=importance,
                                   options=k_quant, scale_dtype=group.scale_dtype).qweight
            for weight, st in zip(group.weights, group.settings)
        ]
        errors = [effective_error(w, q, scale) for w, q in zip(group.weights, qweights)]
        return Solution(qweights, errors, scale, f"{group.input_name}: AWQ alpha {search.alpha:.2f}, then k-quant")
