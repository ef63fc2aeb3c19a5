"""Weight-quantization solvers: weights and statistics in, :class:`~onnxq.core.QuantizedWeight` out.

No graph or onnxruntime code lives here: the quantization pass and the calibration
driver collect the statistics (Hessians, activation samples, mean |x|) and ask the
registry (:mod:`onnxq.algorithms.registry`) for the algorithm by name. Importing this
package registers rtn, hqq, gptq, awq, teq, autoround, awq+gptq, k_quant and awq+k_quant.
"""
from onnxq.algorithms import rtn  # noqa: F401  (registration order: the CLI lists them so)
from onnxq.algorithms.hqq import HQQ, HQQConfig, HQQResult, hqq_quantize_weight
from onnxq.algorithms.gptq import GPTQ, GPTQConfig, GPTQResult, gptq_quantize_weight, gptq_solve
from onnxq.algorithms.awq import (
    AWQ,
    AWQ_CLIP_RATIOS,
    AWQConfig,
    AWQResult,
    AWQScaleResult,
    awq_clip_search,
    awq_quantize_weights,
    awq_scales,
    awq_search_scale,
)
from onnxq.algorithms.teq import TEQ, TEQResult, teq_quantize_weights
from onnxq.algorithms.autoround import AutoRound, AutoRoundResult, TuningConfig, autoround_quantize_weight
from onnxq.algorithms.awq_gptq import AWQThenGPTQ
from onnxq.algorithms.kquant import KQuant, KQuantConfig, KQuantResult, kquant_quantize_weight
from onnxq.algorithms.awq_kquant import AWQThenKQuant
from onnxq.algorithms.registry import (
    Algorithm,
    SiblingGroup,
    Solution,
    algorithm_names,
    get_algorithm,
    register_algorithm,
)

__all__ = [
    "AWQ",
    "AWQ_CLIP_RATIOS",
    "AWQConfig",
    "AWQResult",
    "AWQScaleResult",
    "AWQThenKQuant",
    "AWQThenGPTQ",
    "Algorithm",
    "AutoRound",
    "AutoRoundResult",
    "GPTQ",
    "GPTQConfig",
    "GPTQResult",
    "HQQ",
    "HQQConfig",
    "HQQResult",
    "KQuant",
    "KQuantConfig",
    "KQuantResult",
    "SiblingGroup",
    "Solution",
    "TEQ",
    "TEQResult",
    "TuningConfig",
    "algorithm_names",
    "autoround_quantize_weight",
    "awq_clip_search",
    "awq_quantize_weights",
    "awq_scales",
    "awq_search_scale",
    "get_algorithm",
    "gptq_quantize_weight",
    "gptq_solve",
    "hqq_quantize_weight",
    "kquant_quantize_weight",
    "register_algorithm",
    "teq_quantize_weights",
]
