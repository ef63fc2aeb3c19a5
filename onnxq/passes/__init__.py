"""Graph passes (onnx_ir in-place passes) that rewrite weight sites into quantized ops."""
from onnxq.passes.matmul_nbits import MatMulToNBitsPass, QuantizedNodeRecord
from onnxq.graph.sites import SkippedNode, WeightSite, find_weight_sites

__all__ = ["MatMulToNBitsPass", "QuantizedNodeRecord", "SkippedNode", "WeightSite", "find_weight_sites"]
