"""com.microsoft MatMulBnb4: ``Y = A @ dequant(B)`` with NF4/FP4 blockwise-absmax weights.

Layout (checked bit-exact against ORT's ``quantize_matmul_bnb4``; see :mod:`onnxq.core.nf4`):

* ``B``: uint8 ``[(N*K + 1) // 2]``: codes of ``W^T: [N, K]`` flattened row-major, two per
  byte with the even flat index in the high nibble.
* ``absmax``: ``[ceil(N*K / block_size)]`` in A's dtype; blocks run along the flattened
  ``W^T`` and may span two rows.
* attributes ``K``, ``N``, ``block_size`` (a power of two >= 16), ``quant_type`` (0 FP4, 1 NF4).

ONNX Runtime's CPU kernel is registered for float32 only (CUDA also runs float16).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.core.nf4 import Bnb4Weight
from onnxq.errors import OnnxqError
from onnxq.formats.matmul_nbits import MS_DOMAIN, initializer_value

__all__ = [
    "BNB4_DTYPES",
    "Bnb4Initializers",
    "check_bnb4_block_size",
    "make_bnb4_initializers",
    "make_matmul_bnb4_node",
    "read_matmul_bnb4",
]

BNB4_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
"""Activation dtypes the op's schema allows (ORT's CPU kernel: float32 only)."""


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


def check_bnb4_block_size(block_size: int) -> None:
    """MatMulBnb4 needs a power-of-two block of at least 16 elements."""
    if not isinstance(block_size, (int, np.integer)) or block_size < 16 or block_size & (block_size - 1):
        raise OnnxqError(f"MatMulBnb4 block_size must be a power of two >= 16, got {block_size!r}")


def make_bnb4_initializers(weight: Bnb4Weight, dtype: ir.DataType, name_prefix: str) -> Bnb4Initializers:
    """B / absmax initializer values for ``weight``; absmax is stored in ``dtype`` (A's dtype)."""
    if dtype not in BNB4_DTYPES:
        raise OnnxqError(f"MatMulBnb4 needs float32 or float16 activations, got {dtype.name}")
    return Bnb4Initializers(
        b=initializer_value(weight.packed, f"{name_prefix}_Bnb4"),
        absmax=initializer_value(weight.absmax.astype(dtype.numpy()), f"{name_prefix}_absmax", dtype),
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
