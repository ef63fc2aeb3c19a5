"""onnxq: weight-only quantization of ONNX models for ONNX Runtime.

>>> import onnxq
>>> model = onnxq.quantize("model.onnx", onnxq.QuantConfig(bits=4, block_size=32))
>>> onnxq.save(model, "model.q4.onnx")

The public names load on first use (PEP 562), so ``import onnxq`` itself imports nothing
heavy: ``python -m onnxq`` can then catch a Ctrl-C during the CLI's imports, and
``quantize_w8a8`` / ``smooth_model`` import onnxruntime.quantization (~25 MiB) only when used.
"""
import importlib

_EXPORTS = {
    "OnnxqError": "onnxq.errors",
    "QuantConfig": "onnxq.config",
    "inspect_model": "onnxq.api",
    "quantize": "onnxq.api",
    "save": "onnxq.api",
    "print_quant_summary": "onnxq.report",
    "quant_summary": "onnxq.report",
    "quantize_w8a8": "onnxq.recipes.smoothquant",
    "smooth_model": "onnxq.recipes.smoothquant",
    # Neural Compressor's ONNX API
    "awq_quantize": "onnxq.weight_only",
    "gptq_quantize": "onnxq.weight_only",
    "rtn_quantize": "onnxq.weight_only",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    """A public name (imported from its module on first use), or a submodule (``onnxq.api``)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'onnxq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
