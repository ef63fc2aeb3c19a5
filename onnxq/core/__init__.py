"""Numpy-only quantization core: no onnx or onnxruntime import lives here.

Everything below works on plain ``numpy`` arrays so that it can be reused by
any graph layer (and tested without one).
"""
from onnxq.core.packing import pack_bits, pack_zero_points, unpack_bits, unpack_zero_points
from onnxq.core.padding import blocks_to_weight, pad_tensor, weight_to_blocks
from onnxq.core.quantize import (
    ROUNDING_OFFSET,
    check_quant_params,
    quantize_with_params,
    dequantize_blocks,
    qdq_tensor,
    quant_tensor,
    quantize_blocks,
    quantize_weight,
    quantize_weight_with_error,
    relative_error,
    search_clip,
)
from onnxq.core.weight import PackedQuantizedWeight, QuantizedWeight

__all__ = [
    "ROUNDING_OFFSET",
    "PackedQuantizedWeight",
    "QuantizedWeight",
    "blocks_to_weight",
    "check_quant_params",
    "quantize_with_params",
    "dequantize_blocks",
    "pack_bits",
    "pack_zero_points",
    "pad_tensor",
    "qdq_tensor",
    "quant_tensor",
    "quantize_blocks",
    "quantize_weight",
    "quantize_weight_with_error",
    "relative_error",
    "search_clip",
    "unpack_bits",
    "unpack_zero_points",
    "weight_to_blocks",
]

from onnxq.core.nc_weight import (  # noqa: E402  (Neural Compressor's torch weight-only helpers, [out, in] weights)
    qdq_weight_actor,
    qdq_weight_asym,
    qdq_weight_sym,
    quant_weight,
    quant_weight_w_scale,
)

__all__ += ["qdq_weight_actor", "qdq_weight_asym", "qdq_weight_sym", "quant_weight", "quant_weight_w_scale"]
