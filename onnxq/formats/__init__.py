"""Target formats: the only code that knows a quantized op's byte layout and kernel limits.

Each module holds one op and registers one :class:`~onnxq.formats.base.Format`:
``nbits`` (MatMulNBits), ``gather`` (GatherBlockQuantized), ``bnb4`` (MatMulBnb4),
``qdq`` (opset-21 DequantizeLinear) and ``fpq4`` (legacy MatMulFpQ4).
"""
from onnxq.formats.base import MS_DOMAIN, Format, PackedWeight, WeightLayout, WeightSettings
from onnxq.formats.bnb4 import MatMulBnb4Format
from onnxq.formats.gather_block_quantized import GatherBlockQuantizedFormat
from onnxq.formats.matmul_fpq4 import MatMulFpQ4Format
from onnxq.formats.matmul_nbits import MatMulNBitsFormat, MatMulNBitsInitializers, make_matmul_nbits_initializers
from onnxq.formats.qdq import QDQFormat
from onnxq.formats.registry import (
    format_of_node,
    get_format,
    register_format,
    registered_formats,
    weight_format_names,
)

for _format in (MatMulNBitsFormat(), QDQFormat(), MatMulBnb4Format(), MatMulFpQ4Format(), GatherBlockQuantizedFormat()):
    register_format(_format)

__all__ = [
    "MS_DOMAIN",
    "Format",
    "GatherBlockQuantizedFormat",
    "MatMulBnb4Format",
    "MatMulFpQ4Format",
    "MatMulNBitsFormat",
    "MatMulNBitsInitializers",
    "PackedWeight",
    "QDQFormat",
    "WeightLayout",
    "WeightSettings",
    "format_of_node",
    "get_format",
    "make_matmul_nbits_initializers",
    "register_format",
    "registered_formats",
    "weight_format_names",
]
