"""Graph passes (onnx_ir in-place passes): the weight-quantization pass, conversion, unpacking.

* :mod:`~onnxq.passes.quantize_weights`: weight sites -> the configured format (one pass for all).
* :mod:`~onnxq.passes.convert`: MatMulNBits / GatherBlockQuantized <-> QDQ, bit-exact.
* :mod:`~onnxq.passes.unpack`: every quantized op back to float.
"""
from onnxq.graph.sites import SkippedNode, WeightSite, find_weight_sites
from onnxq.passes.quantize_weights import (
    PlannedSite,
    QuantizedNodeRecord,
    QuantizeResult,
    QuantizeWeightsPass,
    plan_sites,
    solver_for,
)

__all__ = ["PlannedSite", "QuantizeResult", "QuantizeWeightsPass", "QuantizedNodeRecord", "SkippedNode", "WeightSite",
           "find_weight_sites", "plan_sites", "solver_for"]
