"""onnxq: weight-only quantization of ONNX models for ONNX Runtime.

>>> import onnxq
>>> model = onnxq.quantize("model.onnx", onnxq.QuantConfig(bits=4, block_size=32))
>>> onnxq.save(model, "model.q4.onnx")
"""
from onnxq.api import inspect_model, quantize, save
from onnxq.config import QuantConfig
from onnxq.errors import OnnxqError
from onnxq.report import print_quant_summary, quant_summary

__all__ = ["OnnxqError", "QuantConfig", "inspect_model", "print_quant_summary", "quant_summary", "quantize", "quantize_w8a8", "save", "smooth_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``smooth_model`` / ``quantize_w8a8`` load on first use: they import onnxruntime.quantization (~25 MiB)."""
    if name in ("quantize_w8a8", "smooth_model"):
        from onnxq.recipes import smoothquant

        return getattr(smoothquant, name)
    raise AttributeError(f"module 'onnxq' has no attribute {name!r}")


from onnxq.weight_only import awq_quantize, gptq_quantize, rtn_quantize  # noqa: E402  (Neural Compressor's ONNX API)

__all__ += ["awq_quantize", "gptq_quantize", "rtn_quantize"]
