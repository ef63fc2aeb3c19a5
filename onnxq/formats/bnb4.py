"""com.microsoft MatMulBnb4: ``Y = A @ dequant(B)`` with NF4/FP4 blockwise-absmax weights.

Layout (checked bit-exact against ORT's ``quantize_matmul_bnb4``; see :mod:`onnxq.core.nf4`):

* ``B``: uint8 ``[(N*K + 1) // 2]``: codes of ``W^T: [N, K]`` flattened row-major, two per
  byte with the even flat index in the high nibble.
* ``absmax``: ``[ceil(N*K / block_size)]`` in A's dtype; blocks run along the flattened
  ``W^T`` and may span two rows.
* attributes ``K``, ``N``, ``block_size``, ``quant_type`` (0 FP4, 1 NF4).

CPU kernel limits (onnxruntime 1.32): float32 only (the schema and CUDA also take float16); block_size
16, 32, 64, 128 or 256; 4-bit codes of its own codebook (NF4/FP4), so only RTN.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.core.nf4 import Bnb4Weight, quant_type_of, quantize_weight_bnb4
from onnxq.errors import OnnxqError
from onnxq.formats.base import MS_DOMAIN, Constant, Format, WeightLayout, WeightSettings, int_attributes
from onnxq.graph.constants import constant_value

__all__ = [
    "BNB4_BLOCK_SIZES",
    "Bnb4Initializers",
    "MatMulBnb4Format",
    "make_bnb4_initializers",
    "make_matmul_bnb4_node",
    "read_matmul_bnb4",
]

BNB4_BLOCK_SIZES = (16, 32, 64, 128, 256)
"""Block sizes ORT's CPU kernel runs ("only block size 16, 32, 64, 128, 256 are supported")."""


@dataclass(frozen=True)
class Bnb4Initializers:
    """The constant inputs of one MatMulBnb4 weight (shareable between nodes)."""

    b: ir.Value
    absmax: ir.Value
    weight: Bnb4Weight

    def values(self) -> list[ir.Value]:
        return [self.b, self.absmax]

    @property
    def nbytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.values())


def make_bnb4_initializers(weight: Bnb4Weight, dtype: ir.DataType, name_prefix: str) -> Bnb4Initializers:
    """B / absmax initializer values for ``weight``; absmax is stored in ``dtype`` (A's dtype)."""
    return Bnb4Initializers(
        b=constant_value(weight.packed, f"{name_prefix}_Bnb4"),
        absmax=constant_value(weight.absmax.astype(dtype.numpy()), f"{name_prefix}_absmax", dtype),
        weight=weight,
    )


def make_matmul_bnb4_node(activation: ir.Value, inits: Bnb4Initializers, *, name: str | None = None) -> ir.Node:
    """A MatMulBnb4 node computing ``activation [..., K] @ dequant(inits) -> [..., N]``."""
    w = inits.weight
    return ir.node(
        "MatMulBnb4",
        [activation, inits.b, inits.absmax],
        attributes={"K": w.k, "N": w.n, "block_size": w.block_size, "quant_type": w.quant_type},
        domain=MS_DOMAIN,
        name=name,
    )


def _const(value: ir.Value | None, what: str, node: ir.Node) -> np.ndarray:
    if value is None or value.const_value is None:
        raise OnnxqError(f"{node.op_type} node {node.name!r}: input {what} is not a constant initializer")
    return value.const_value.numpy()


def read_matmul_bnb4(node: ir.Node) -> Bnb4Weight:
    """The :class:`Bnb4Weight` a MatMulBnb4 node computes with (its inputs must be initializers)."""
    attrs = node.attributes
    k, n = attrs["K"].as_int(), attrs["N"].as_int()
    block_size, quant_type = attrs["block_size"].as_int(), attrs["quant_type"].as_int()
    transb = attrs["transB"].as_int() if attrs.get("transB") is not None else 1
    if transb != 1 or (attrs.get("training_mode") is not None and attrs["training_mode"].as_int() != 0):
        raise OnnxqError(f"MatMulBnb4 node {node.name!r}: only transB=1, training_mode=0 is supported")
    packed = _const(node.inputs[1], "B", node).reshape(-1)
    absmax = _const(node.inputs[2], "absmax", node).astype(np.float32).reshape(-1)
    if packed.size != (k * n + 1) // 2 or absmax.size != -(-k * n // block_size):
        raise OnnxqError(
            f"MatMulBnb4 node {node.name!r}: B has {packed.size} bytes and absmax {absmax.size} values; "
            f"expected {(k * n + 1) // 2} and {-(-k * n // block_size)} for K={k}, N={n}, block_size={block_size}"
        )
    return Bnb4Weight(packed, absmax, quant_type, block_size, k, n)


class MatMulBnb4Format(Format):
    """com.microsoft MatMulBnb4, NF4/FP4 (QLoRA arXiv 2305.14314; see the module docstring)."""

    name = "bnb4"
    op_type = "MatMulBnb4"
    bits = (4,)
    int_codes = False

    def block_size_reason(self, bits: int, block_size: int) -> str | None:
        if block_size not in BNB4_BLOCK_SIZES:
            return f"MatMulBnb4 block_size must be one of {', '.join(map(str, BNB4_BLOCK_SIZES))}, got {block_size!r}"
        return None

    def validate(self, settings: WeightSettings, k: int, n: int) -> str | None:
        if settings.quant_type not in ("nf4", "fp4"):
            return f"MatMulBnb4 quant_type must be 'nf4' or 'fp4', got {settings.quant_type!r}"
        return super().validate(settings, k, n)

    def node_name(self, base: str, settings: WeightSettings) -> str:
        return f"{base}_Bnb4"

    def stored_bytes(self, k: int, n: int, settings: WeightSettings, dtype: ir.DataType) -> int:
        return (k * n + 1) // 2 + -(-k * n // settings.block_size) * dtype.itemsize

    def describe(self, settings: WeightSettings) -> str:
        return f"{settings.quant_type} block {settings.block_size}"

    def quantize(self, weight: np.ndarray, settings: WeightSettings, scale_dtype: ir.DataType) -> Bnb4Weight:
        return quantize_weight_bnb4(weight, quant_type_of(settings.quant_type), settings.block_size,
                                    scale_dtype.numpy())

    def pack(self, payload: Bnb4Weight, settings: WeightSettings, dtype: ir.DataType, name: str,
             layout: WeightLayout) -> Bnb4Initializers:
        return make_bnb4_initializers(payload, dtype, name)

    def make_nodes(self, activation, packed: Bnb4Initializers, settings: WeightSettings, *, name: str,
                   bias: ir.Value | None, constant: Constant) -> tuple[list[ir.Node], ir.Value]:
        node = make_matmul_bnb4_node(activation, packed, name=name)
        return [node], node.outputs[0]

    def read(self, node: ir.Node) -> Bnb4Weight:
        return read_matmul_bnb4(node)

    def describe_node(self, node: ir.Node) -> tuple[str, str] | None:
        attrs = int_attributes(node)
        kind = {0: "fp4", 1: "nf4"}.get(attrs.get("quant_type"), "?")
        return f"{attrs.get('K')}x{attrs.get('N')}", f"{kind} block {attrs.get('block_size')}"
