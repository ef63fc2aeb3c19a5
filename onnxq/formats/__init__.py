"""Target-op builders: the only code that knows a quantized op's byte layout."""
from onnxq.formats.matmul_nbits import MatMulNBitsInitializers, make_matmul_nbits_initializers, make_matmul_nbits_node

__all__ = ["MatMulNBitsInitializers", "make_matmul_nbits_initializers", "make_matmul_nbits_node"]
