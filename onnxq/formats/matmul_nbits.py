"""com.microsoft MatMulNBits: ``Y = A @ dequant(B)^T (+ bias)``.

Layout (checked bit-exact against ORT's ``quantize_matmul_{2,4,8}bits``):

* ``B``: uint8 ``[N, k_blocks, block_size * bits / 8]``, codes packed LSB-first along K.
* ``scales``: ``[N, k_blocks]`` in A's dtype.
* ``zero_points`` (asymmetric only): uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed
  like B, unused trailing slots set to ``2**(bits-1)``; absent means ``2**(bits-1)``.
* ``g_idx`` is never emitted (deprecated; act-order is baked into the weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.core import QuantizedWeight, pack_bits, pack_zero_points

__all__ = ["initializer_value", "MatMulNBitsInitializers", "make_matmul_nbits_initializers", "make_matmul_nbits_node", "MS_DOMAIN"]

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class MatMulNBitsInitializers:
    """The constant inputs of one MatMulNBits weight (shareable between nodes)."""

    b: ir.Value  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: ir.Value  # [N, k_blocks] in the activation dtype
    zero_points: ir.Value | None  # uint8 [N, ceil(k_blocks * bits / 8)]
    k: int
    n: int
    bits: int
    block_size: int

    def values(self) -> list[ir.Value]:
        return [v for v in (self.b, self.scales, self.zero_points) if v is not None]

    @property
    def nbytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.values())


def initializer_value(array: np.ndarray, name: str, dtype: ir.DataType | None = None) -> ir.Value:
    """A constant ``ir.Value`` holding ``array`` (stored as ``dtype`` when given)."""
    tensor = ir.tensor(array, dtype=dtype, name=name)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def _zero_padding(qweight: QuantizedWeight) -> np.ndarray:
    """Codes with the padded tail of K (never read by the kernel) set to 0, as ORT's packer writes."""
    tail = qweight.k % qweight.block_size
    if not tail:
        return qweight.codes
    codes = qweight.codes.copy()
    codes[:, -1, tail:] = 0
    return codes


def make_matmul_nbits_initializers(
    qweight: QuantizedWeight, scale_dtype: ir.DataType, name_prefix: str
) -> MatMulNBitsInitializers:
    """Pack ``qweight`` into B / scales / zero_points initializer values named ``name_prefix + ...``."""
    bits = qweight.bits
    packed = pack_bits(_zero_padding(qweight), bits)  # [N, k_blocks, block_size*bits/8]
    scales = qweight.scales.astype(scale_dtype.numpy())
    zero_points = None
    if qweight.zero_points is not None and qweight.zero_points.dtype.kind == "f":
        # float zero points (HQQ): [N, k_blocks] in the scales' dtype; dequant is (q - zp) * scale
        zero_points = initializer_value(qweight.zero_points.astype(scale_dtype.numpy()), f"{name_prefix}_zero_points",
                                        scale_dtype)
    elif qweight.zero_points is not None:
        zero_points = initializer_value(pack_zero_points(qweight.zero_points, bits), f"{name_prefix}_zero_points")
    return MatMulNBitsInitializers(
        b=initializer_value(packed, f"{name_prefix}_Q{bits}"),
        scales=initializer_value(scales, f"{name_prefix}_scales", scale_dtype),
        zero_points=zero_points,
        k=qweight.k,
        n=qweight.n,
        bits=bits,
        block_size=qweight.block_size,
    )


def make_matmul_nbits_node(
    activation: ir.Value,
    weights: MatMulNBitsInitializers,
    *,
    accuracy_level: int = 0,
    bias: ir.Value | None = None,
    name: str | None = None,
) -> ir.Node:
    """A MatMulNBits node computing ``activation [..., K] @ dequant(weights) -> [..., N]``."""
    qw = weights
    inputs: list[ir.Value | None] = [activation, weights.b, weights.scales, weights.zero_points]
    if bias is not None:
        inputs += [None, bias]
    while inputs[-1] is None:
        inputs.pop()
    return ir.node(
        "MatMulNBits",
        inputs,
        attributes={
            "K": qw.k,
            "N": qw.n,
            "bits": qw.bits,
            "block_size": qw.block_size,
            "accuracy_level": accuracy_level,
        },
        domain=MS_DOMAIN,
        name=name,
    )
