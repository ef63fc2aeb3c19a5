"""AWQ's input scales, then GPTQ on the scaled weights: the recipe AutoAWQ and llm-compressor users reach for.

For a sibling group reading ``x: [T, K]`` (e.g. q/k/v), AWQ's scale search (arXiv 2306.00978,
sec. 3.2; :func:`onnxq.algorithms.awq.awq_search_scale`) picks per-input-channel scales ``s``
so that ``x @ W = (x / s) @ (s[:, None] * W)`` quantizes better. GPTQ (arXiv 2210.17323) then
quantizes each ``s[:, None] * W_i`` against the Hessian of the input it will really see,
``x / s``: ``H' = D H D`` with ``D = diag(1 / s)``, ``H = 2/n X^T X``. The clip search of AWQ
is not run: GPTQ's error feedback replaces it. ``alpha = 0`` (scales of one) is plain GPTQ.
Options: ``QuantConfig.awq`` (``grid``, ``scale_search``, ``sample_rows``) and ``QuantConfig.gptq``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from onnxq.algorithms.awq import awq_search_scale
from onnxq.algorithms.gptq import gptq_quantize_weight
from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, effective_error, register_algorithm

__all__ = ["AWQThenGPTQ"]


@register_algorithm
class AWQThenGPTQ(Algorithm):
    """``awq+gptq``: AWQ's scale search per sibling group, then GPTQ per weight on the scaled problem."""

    name = "awq+gptq"
    statistics = ("hessian", "abs_mean", "rows")

    def options_of(self, config: Any) -> tuple[Any, Any]:
        return config.awq, config.gptq

    def sample_rows(self, options: tuple[Any, Any]) -> int:
        return options[0].sample_rows

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: tuple[Any, Any]) -> Solution:
        awq, gptq = options
        first = group.settings[0]
        search = awq_search_scale(group.weights, stats["rows"], stats["abs_mean"], first.bits, first.block_size,
                                  first.symmetric, grid=awq.grid if awq.scale_search else 1,
                                  scale_dtype=group.scale_dtype)
        scale = search.scales if search.alpha > 0 else None
        s = np.ones(group.weights[0].shape[0], dtype=np.float32) if scale is None else scale
        inv = (1.0 / s.astype(np.float64))
        hessian = stats["hessian"] * inv[:, None] * inv[None, :]
        qweights = [
            gptq_quantize_weight(s[:, None] * weight, hessian, st.bits, st.block_size, st.symmetric,
                                 percdamp=gptq.percdamp, lazy_batch=gptq.lazy_batch, act_order=gptq.act_order,
                                 static_groups=gptq.static_groups, mse_clip=st.mse_clip,
                                 scale_dtype=group.scale_dtype, hessian_shrink=gptq.hessian_shrink)
            for weight, st in zip(group.weights, group.settings)
        ]
        errors = [effective_error(w, q, scale) for w, q in zip(group.weights, qweights)]
        return Solution(qweights, errors, scale, f"{group.input_name}: AWQ alpha {search.alpha:.2f}, then GPTQ")
