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
from onnxq.algorithms.autoround import AutoRoundResult, autoround_quantize_weight
from onnxq.algorithms.gptq import GPTQResult, gptq_quantize_weight, gptq_solve
from onnxq.algorithms.hqq import HQQResult, hqq_quantize_weight
from onnxq.algorithms.teq import TEQResult, teq_quantize_weights

__all__ = [
    "AWQ_CLIP_RATIOS",
    "AWQResult",
    "AWQScaleResult",
    "AutoRoundResult",
    "GPTQResult",
    "HQQResult",
    "TEQResult",
    "awq_clip_search",
    "awq_quantize_weights",
    "awq_scales",
    "awq_search_scale",
    "autoround_quantize_weight",
    "gptq_quantize_weight",
    "gptq_solve",
    "hqq_quantize_weight",
    "teq_quantize_weights",
]
