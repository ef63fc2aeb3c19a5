"""Calibrated weight-quantization solvers: statistics in, :class:`~onnxq.core.QuantizedWeight` out.

No graph or onnxruntime code lives here: the passes collect the statistics
(Hessians, activation samples, mean |x|) and call these functions per weight.
"""
from onnxq.algorithms.awq import (
    AWQ_CLIP_RATIOS,
    AWQResult,
    AWQScaleResult,
    awq_clip_search,
    awq_quantize_weights,
    awq_scales,
    awq_search_scale,
)
from onnxq.algorithms.gptq import GPTQResult, gptq_quantize_weight, gptq_solve

__all__ = [
    "AWQ_CLIP_RATIOS",
    "AWQResult",
    "AWQScaleResult",
    "GPTQResult",
    "awq_clip_search",
    "awq_quantize_weights",
    "awq_scales",
    "awq_search_scale",
    "gptq_quantize_weight",
    "gptq_solve",
]
