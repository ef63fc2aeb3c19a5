"""com.microsoft MatMulNBits: ``Y = A @ dequant(B)^T (+ bias)``.

Layout (checked bit-exact against ORT's ``quantize_matmul_{2,4,8}bits``):

* ``B``: uint8 ``[N, k_blocks, block_size * bits / 8]``, codes packed LSB-first along K.
* ``scales``: ``[N, k_blocks]`` in A's dtype.
* ``zero_points`` (asymmetric only): uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed
  like B, unused trailing slots set to ``2**(bits-1)``; absent means ``2**(bits-1)``.
  HQQ's float zero points are stored unpacked, ``[N, k_blocks]`` in the scales' dtype.
* ``g_idx`` is never emitted (deprecated; act-order is baked into the weights).

CPU kernel limits (onnxruntime 1.32): bits 2, 4 or 8; block_size a power of two >= 16;
2-bit needs block_size <= 256; float zero points only with 2 or 4 bits. A block larger than
K is written as one block over K (the smallest power of two >= 16 covering K): the same values
without the padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.core import QuantizedWeight, pack_zero_points, unpack_bits, unpack_zero_points
from onnxq.errors import OnnxqError
from onnxq.formats.base import (
    MS_DOMAIN,
    Constant,
    Format,
    WeightLayout,
    WeightSettings,
    int_attributes,
    next_power_of_two_block,
)
from onnxq.graph.constants import constant_value

__all__ = [
    "MS_DOMAIN",
    "MatMulNBitsFormat",
    "MatMulNBitsInitializers",
    "covering_block_size",
    "make_matmul_nbits_initializers",
    "make_matmul_nbits_node",
    "nbits_block_size_reason",
    "power_of_two_block_reason",
    "qweight_from_nbits_layout",
    "read_matmul_nbits",
]


@dataclass(frozen=True)
class MatMulNBitsInitializers:
    """The constant inputs of one MatMulNBits weight (shareable between nodes, and with GatherBlockQuantized).

    ``b`` is ``[N, k_blocks, blob]`` as MatMulNBits reads it, or ``[N, k_blocks * blob]`` as
    GatherBlockQuantized's ``data``; the bytes are the same.
    """

    b: ir.Value
    scales: ir.Value  # [N, k_blocks] in the activation dtype
    zero_points: ir.Value | None  # uint8 [N, ceil(k_blocks * bits / 8)], or float [N, k_blocks]
    k: int
    n: int
    bits: int
    block_size: int

    def values(self) -> list[ir.Value]:
        return [v for v in (self.b, self.scales, self.zero_points) if v is not None]

    @property
    def nbytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.values())

    def qweight(self) -> QuantizedWeight:
        """The codes / scales / zero points these initializers hold, as a ``[K, N]`` weight."""
        zp = None if self.zero_points is None else self.zero_points.const_value.numpy()
        return qweight_from_nbits_layout(self.b.const_value.numpy(), self.scales.const_value.numpy(), zp,
                                         self.bits, self.block_size, self.k, self.n)


def power_of_two_block_reason(op_type: str, block_size: int) -> str | None:
    """The rule ORT's MatMulNBits and GatherBlockQuantized kernels share: a power of two >= 16."""
    if not (isinstance(block_size, (int, np.integer)) and block_size >= 16 and block_size & (block_size - 1) == 0):
        return f"{op_type} block_size must be a power of two >= 16, got {block_size!r}"
    return None


def covering_block_size(block_size: int | None, k: int | None) -> int | None:
    """``block_size``, or one block over K when a valid ``block_size`` is larger than that block.

    MatMulNBits' layout (and GatherBlockQuantized's) pads K up to a multiple of the block, so a
    block larger than the smallest power of two >= K covering K only stores padding: the same
    scales and codes in up to block/K times the bytes (8192 on K=256: 4x the float weight).
    """
    if block_size is None or k is None or power_of_two_block_reason("", block_size) is not None:
        return block_size
    return min(block_size, next_power_of_two_block(k))


def nbits_block_size_reason(bits: int, block_size: int) -> str | None:
    """MatMulNBits' block rule: a power of two >= 16; 2-bit needs <= 256."""
    reason = power_of_two_block_reason("MatMulNBits", block_size)
    if reason is not None:
        return reason
    if bits == 2 and block_size > 256:
        return f"2-bit MatMulNBits needs block_size <= 256, got {block_size}"
    return None


def make_matmul_nbits_initializers(
    qweight: QuantizedWeight, scale_dtype: ir.DataType, name_prefix: str
) -> MatMulNBitsInitializers:
    """Pack ``qweight`` into B / scales / zero_points initializer values named ``name_prefix + ...``."""
    bits = qweight.bits
    packed = qweight.packed_codes()  # [N, k_blocks, block_size*bits/8]; the padded tail of K (never read) is 0
    scales = qweight.scales.astype(scale_dtype.numpy())
    zero_points = None
    if qweight.zero_points is not None and qweight.zero_points.dtype.kind == "f":
        # float zero points (HQQ): [N, k_blocks] in the scales' dtype; dequant is (q - zp) * scale
        zero_points = constant_value(qweight.zero_points.astype(scale_dtype.numpy()), f"{name_prefix}_zero_points",
                                     scale_dtype)
    elif qweight.zero_points is not None:
        zero_points = constant_value(pack_zero_points(qweight.zero_points, bits), f"{name_prefix}_zero_points")
    return MatMulNBitsInitializers(
        b=constant_value(packed, f"{name_prefix}_Q{bits}"),
        scales=constant_value(scales, f"{name_prefix}_scales", scale_dtype),
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
    inputs: list[ir.Value | None] = [activation, weights.b, weights.scales, weights.zero_points]
    if bias is not None:
        inputs += [None, bias]
    while inputs[-1] is None:
        inputs.pop()
    return ir.node(
        "MatMulNBits",
        inputs,
        attributes={"K": weights.k, "N": weights.n, "bits": weights.bits, "block_size": weights.block_size,
                    "accuracy_level": accuracy_level},
        domain=MS_DOMAIN,
        name=name,
    )


def qweight_from_nbits_layout(
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    block_size: int,
    k: int,
    n: int,
) -> QuantizedWeight:
    """A :class:`QuantizedWeight` from MatMulNBits-layout arrays (B may be ``[N, kb, blob]`` or ``[N, kb*blob]``)."""
    k_blocks = -(-k // block_size)
    blob = block_size * bits // 8
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.size != n * k_blocks * blob:
        raise OnnxqError(f"packed weight has {packed.size} bytes, expected N*k_blocks*blob = {n * k_blocks * blob}")
    codes = unpack_bits(packed.reshape(n, k_blocks, blob), bits, block_size)
    scales = np.asarray(scales, dtype=np.float32).reshape(n, k_blocks)
    zps = None
    if zero_points is not None:
        zp = np.asarray(zero_points)
        if zp.dtype.kind == "f":  # float zero points (HQQ): [N, k_blocks] as they are
            zps = zp.astype(np.float32).reshape(n, k_blocks)
        elif zp.dtype == np.uint8:
            zps = unpack_zero_points(zp.reshape(n, -1), bits, k_blocks)
        else:
            raise OnnxqError(f"MatMulNBits zero points must be packed uint8 or float, got {zp.dtype}")
    return QuantizedWeight(codes, scales, zps, bits, block_size, k)


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _array(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def read_matmul_nbits(node: ir.Node) -> QuantizedWeight:
    """The ``[K, N]`` weight of a MatMulNBits node (B / scales / zero_points must be initializers).

    Raises:
        OnnxqError: non-constant inputs or ``g_idx``.
    """
    attrs = int_attributes(node)
    k, n, bits, bs = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    b, scales, zp_value = _input(node, 1), _input(node, 2), _input(node, 3)
    if _input(node, 4) is not None:
        raise OnnxqError(f"MatMulNBits node {node.name!r} has g_idx (deprecated); onnxq does not read it")
    if _array(b) is None or _array(scales) is None or (zp_value is not None and _array(zp_value) is None):
        raise OnnxqError(f"MatMulNBits node {node.name!r}: B, scales and zero_points must be initializers")
    return qweight_from_nbits_layout(_array(b), _array(scales), _array(zp_value), bits, bs, k, n)


def nbits_stored_bytes(k: int, n: int, settings: WeightSettings, dtype: ir.DataType) -> int:
    """Bytes of B, scales and zero points in MatMulNBits' layout (GatherBlockQuantized stores the same)."""
    k_blocks = -(-k // settings.block_size)
    scale_bytes = n * k_blocks * dtype.itemsize
    zp_bytes = 0
    if settings.float_zero_points:
        zp_bytes = scale_bytes
    elif not settings.symmetric:
        zp_bytes = n * -(-k_blocks * settings.bits // 8)
    return n * k_blocks * settings.block_size * settings.bits // 8 + scale_bytes + zp_bytes


class MatMulNBitsFormat(Format):
    """com.microsoft MatMulNBits (see the module docstring)."""

    name = "nbits"
    op_type = "MatMulNBits"
    bits = (2, 4, 8)
    dtypes = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    takes_bias = True
    uses_accuracy_level = True
    embedding_format = "gather"
    layout = "nbits"
    float_zero_point_bits = (2, 4)

    def resolve_block_size(self, block_size: int, k: int | None) -> int | None:
        """-1 and blocks larger than K: one block over K (:func:`covering_block_size`)."""
        return covering_block_size(super().resolve_block_size(block_size, k), k)

    def block_size_reason(self, bits: int, block_size: int) -> str | None:
        return nbits_block_size_reason(bits, block_size)

    def stored_bytes(self, k: int, n: int, settings: WeightSettings, dtype: ir.DataType) -> int:
        return nbits_stored_bytes(k, n, settings, dtype)

    def pack(self, payload: QuantizedWeight, settings: WeightSettings, dtype: ir.DataType, name: str,
             layout: WeightLayout) -> MatMulNBitsInitializers:
        return make_matmul_nbits_initializers(payload, dtype, name)

    def make_nodes(self, activation, packed: MatMulNBitsInitializers, settings: WeightSettings, *, name: str,
                   bias: ir.Value | None, constant: Constant) -> tuple[list[ir.Node], ir.Value]:
        node = make_matmul_nbits_node(activation, packed, accuracy_level=settings.accuracy_level, bias=bias,
                                      name=name)
        return [node], node.outputs[0]

    def read(self, node: ir.Node) -> QuantizedWeight:
        return read_matmul_nbits(node)

    def describe_node(self, node: ir.Node) -> tuple[str, str] | None:
        attrs = int_attributes(node)
        scheme = "asym" if _input(node, 3) is not None else "sym"
        data_format = f"int{attrs.get('bits', 4)} block {attrs.get('block_size')} {scheme}"
        return f"{attrs.get('K')}x{attrs.get('N')}", data_format
