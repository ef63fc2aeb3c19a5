"""Formats by name, and by the op they write (for readers: unpack, convert, summaries)."""
from __future__ import annotations

import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.formats.base import Format

__all__ = ["register_format", "get_format", "weight_format_names", "format_of_node",
           "registered_formats"]

_BY_NAME: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add ``fmt`` under ``fmt.name``; returns it."""
    if fmt.name in _BY_NAME:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    _BY_NAME[fmt.name] = fmt
    return fmt


def registered_formats() -> list[Format]:
    """Every registered format, in registration order."""
    return list(_BY_NAME.values())


def weight_format_names() -> tuple[str, ...]:
    """Formats that quantize MatMul / Gemm weights (the choices of ``--format``)."""
    return tuple(name for name, fmt in _BY_NAME.items() if fmt.sites == "matmul")


def get_format(name: str) -> Format:
    """The format registered as ``name``.

    Raises:
        OnnxqError: no such format.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise OnnxqError(f"format must be one of {weight_format_names()}, got {name!r}") from None


def format_of_node(node: ir.Node) -> Format | None:
    """The format whose op ``node`` is (com.microsoft ops, or a default-domain DequantizeLinear), else None."""
    for fmt in _BY_NAME.values():
        if node.op_type == fmt.op_type and node.domain == fmt.domain:
            return fmt
    return None
