"""What a quantized model holds, read from its graph (ModelOpt's ``print_quant_summary`` idea).

Works on any model, whether onnxq produced it in this process or it was loaded
from disk: every MatMulNBits, MatMulBnb4, MatMulFpQ4, GatherBlockQuantized and
constant blocked DequantizeLinear node is listed with its shape and format.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TextIO

import onnx
import onnx_ir as ir

from onnxq.io import load_model
from onnxq.report import format_table

__all__ = ["QuantizedNodeInfo", "quant_summary", "print_quant_summary"]

_INT_BITS = {
    ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8,
    ir.DataType.INT2: 2, ir.DataType.UINT2: 2,
}


@dataclass(frozen=True)
class QuantizedNodeInfo:
    """One quantized node of a model."""

    name: str
    op_type: str
    shape: str  # "K x N" for matmuls, "rows x cols" for embeddings / DQ weights
    data_format: str  # e.g. "int4 block 32 asym", "nf4 block 64"
    accuracy_level: int | None
    stored_bytes: int


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _const_bytes(node: ir.Node) -> int:
    total = 0
    for value in node.inputs:
        if value is not None and value.const_value is not None:
            total += value.const_value.nbytes
    return total


def _info(node: ir.Node) -> QuantizedNodeInfo | None:
    op = node.op_type
    if op == "MatMulNBits":
        k, n, bits, bs = (_attr(node, a) for a in ("K", "N", "bits", "block_size"))
        scheme = "asym" if len(node.inputs) > 3 and node.inputs[3] is not None else "sym"
        return QuantizedNodeInfo(node.name, op, f"{k}x{n}", f"int{bits} block {bs} {scheme}",
                                 _attr(node, "accuracy_level", 0), _const_bytes(node))
    if op == "MatMulBnb4":
        k, n, bs = (_attr(node, a) for a in ("K", "N", "block_size"))
        kind = {0: "fp4", 1: "nf4"}.get(_attr(node, "quant_type"), "?")
        return QuantizedNodeInfo(node.name, op, f"{k}x{n}", f"{kind} block {bs}", None, _const_bytes(node))
    if op == "MatMulFpQ4":
        return QuantizedNodeInfo(node.name, op, "-", "int4 block 32 (MLAS blob)", None, _const_bytes(node))
    if op == "GatherBlockQuantized":
        data = node.inputs[0]
        shape = "x".join(str(d) for d in data.shape) if data is not None and data.shape is not None else "?"
        bits = _attr(node, "bits", 4)
        return QuantizedNodeInfo(node.name, op, shape, f"int{bits} block {_attr(node, 'block_size')}", None,
                                 _const_bytes(node))
    if op == "DequantizeLinear" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
        tensor = node.inputs[0].const_value
        bits = _INT_BITS.get(tensor.dtype)
        if bits is None:
            return None
        block = _attr(node, "block_size", 0)
        granularity = f"block {block}" if block else "per axis"
        scheme = "asym" if len(node.inputs) > 2 and node.inputs[2] is not None else "sym"
        shape = "x".join(str(d) for d in tensor.shape)
        return QuantizedNodeInfo(node.name, op, shape, f"{tensor.dtype.name.lower()} {granularity} {scheme}", None,
                                 _const_bytes(node))
    return None


def quant_summary(model: ir.Model | onnx.ModelProto | str | os.PathLike) -> list[QuantizedNodeInfo]:
    """Every quantized node of ``model`` (subgraphs included), in graph order."""
    ir_model = load_model(model)
    return [info for node in ir_model.graph.all_nodes() if (info := _info(node)) is not None]


def print_quant_summary(model: ir.Model | onnx.ModelProto | str | os.PathLike, file: TextIO | None = None) -> None:
    """Write a table of the quantized nodes of ``model`` and totals to ``file`` (default stdout)."""
    out = file or sys.stdout
    infos = quant_summary(model)
    rows = [(i.name, i.op_type, i.shape, i.data_format, "-" if i.accuracy_level is None else i.accuracy_level,
             i.stored_bytes) for i in infos]
    out.write(format_table(("node", "op", "shape", "format", "acc_lvl", "stored bytes"), rows) + "\n")
    per_op: dict[str, int] = {}
    for info in infos:
        per_op[info.op_type] = per_op.get(info.op_type, 0) + 1
    counts = ", ".join(f"{count} {op}" for op, count in per_op.items()) or "no quantized nodes"
    out.write(f"{counts}\n")
