"""AWQ's input scales, then GPTQ on the scaled weights: the recipe AutoAWQ and llm-compressor users reach for.

For a sibling group reading ``x: [T, K]`` (e.g. q/k/v), AWQ's scale search (arXiv 2306.00978,
sec. 3.2; :class:`onnxq.algorithms.awq.AWQThen`) picks per-input-channel scales ``s``
so that ``x @ W = (x / s) @ (s[:, None] * W)`` quantizes better. GPTQ (arXiv 2210.17323) then
quantizes each ``s[:, None] * W_i`` against the Hessian of the input it will really see,
``x / s``: ``H' = D H D`` with ``D = diag(1 / s)``, ``H = 2/n X^T X``. The clip search of AWQ
is not run (GPTQ's error feedback stands in for it), unless ``QuantConfig.gptq.clip_search``
runs it on the scaled Hessian, and ``QuantConfig.gptq.float_target`` fits the scaled weight to the
float model's outputs (the cross product scaled as the Hessian is). ``alpha = 0`` (scales of one)
is plain GPTQ.
Options: ``QuantConfig.awq`` (``grid``, ``scale_search``, ``sample_rows``) and ``QuantConfig.gptq``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from onnxq.algorithms.awq import AWQThen
from onnxq.algorithms.float_target import float_target_weight
from onnxq.algorithms.gptq import gptq_with_options
from onnxq.algorithms.registry import register_algorithm
from onnxq.core import QuantizedWeight

__all__ = ["AWQThenGPTQ"]


@register_algorithm
class AWQThenGPTQ(AWQThen):
    """``awq+gptq``: AWQ's scale search per sibling group, then GPTQ per weight on the scaled problem."""

    name = "awq+gptq"
    statistics = ("hessian", "abs_mean", "rows")
    then_options = "gptq"
    then_label = "GPTQ"

    def float_target(self, options: tuple[Any, Any]) -> bool:
        return options[1].float_target

    def solve_scaled(self, weight: np.ndarray, settings: Any, s: np.ndarray, stats: Mapping[str, Any],
                     options: Any, scale_dtype) -> QuantizedWeight:
        inv = 1.0 / s.astype(np.float64)
        hessian = stats["hessian"] * inv[:, None] * inv[None, :]
        if "cross" in stats:
            weight = float_target_weight(weight, hessian, stats["cross"] * inv[:, None] * inv[None, :], options.percdamp)
        return gptq_with_options(weight, hessian, settings, options, scale_dtype)
