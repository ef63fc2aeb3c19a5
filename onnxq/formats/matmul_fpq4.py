"""com.microsoft MatMulFpQ4 (legacy): ``Y = A @ dequant(B)`` with MLAS int4 blobs, float32 only.

Emit only on request: ORT's kernel exists only where MLAS has an FpQ4 GEMM dispatch
(x86-64 hosts with AVX-512); elsewhere the session loads and ``run`` fails with
"Operator MatMulFpQ4 not yet supported on this hardware platform". MatMulNBits
replaced it.

Inputs: ``A`` float32 ``[..., K]``, ``B`` uint8 1-D blob, ``B_shape`` int64 ``[K, N]``.
Attribute ``blk_quant_type``: 0 = ``BlkQ4Sym`` (block 32, scale, no zero point),
anything else = ``BlkQ4Zp8`` (block 32, scale and a uint8 zero point).
Blob layout (MLAS ``MlasQ4GemmPackB``, q4common.h): for each column ``n``, for each
block of 32 rows of K: ``float32 scale``, then (type 1) ``uint8 zero point``, then 16
bytes where byte ``l`` holds row ``l`` in its low nibble and row ``l + 16`` in its
high nibble. ``dequant = (code - zp) * scale`` with ``zp = 8`` for type 0. The last
block of a column is zero-padded. Same codes and scales as onnxq's 4-bit block-32
quantization (full-range symmetric: ``scale = max / -8``).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dataclasses import dataclass

from onnxq.core import QuantizedWeight
from onnxq.errors import OnnxqError
from onnxq.formats.base import MS_DOMAIN, Constant, Format, WeightLayout, WeightSettings
from onnxq.graph.constants import constant_value

__all__ = ["FPQ4_BLOCK", "FpQ4Initializers", "MatMulFpQ4Format", "pack_fpq4", "unpack_fpq4", "fpq4_blob_size",
           "make_matmul_fpq4_node", "read_matmul_fpq4"]

FPQ4_BLOCK = 32


def fpq4_blob_size(k: int, n: int, symmetric: bool) -> int:
    """Bytes of the packed blob: ``N * ceil(K / 32) * (16 + 4 (+ 1 for a zero point))``."""
    return n * -(-k // FPQ4_BLOCK) * (20 if symmetric else 21)


def pack_fpq4(qweight: QuantizedWeight) -> tuple[np.ndarray, int]:
    """``(blob uint8 [size], blk_quant_type)`` for a 4-bit, block-32 ``qweight``."""
    if qweight.bits != 4 or qweight.block_size != FPQ4_BLOCK:
        raise OnnxqError(f"MatMulFpQ4 stores 4-bit codes in blocks of 32, got bits={qweight.bits}, "
                         f"block_size={qweight.block_size}")
    n, k_blocks = qweight.n, qweight.k_blocks
    codes = qweight.codes.reshape(n, k_blocks, 2, 16)  # rows l and l + 16 of each block
    data = (codes[:, :, 0] | (codes[:, :, 1] << np.uint8(4))).astype(np.uint8)  # [N, kb, 16]
    scale = qweight.scales.astype(np.float32).reshape(n, k_blocks, 1).view(np.uint8)  # [N, kb, 4]
    parts = [scale]
    if qweight.zero_points is not None:
        parts.append(qweight.zero_points.reshape(n, k_blocks, 1))
    parts.append(data)
    blob = np.concatenate(parts, axis=2).reshape(-1)
    return blob, 0 if qweight.symmetric else 1


def unpack_fpq4(blob: np.ndarray, k: int, n: int, blk_quant_type: int) -> QuantizedWeight:
    """Inverse of :func:`pack_fpq4`."""
    symmetric = blk_quant_type == 0
    blob = np.asarray(blob, dtype=np.uint8).reshape(-1)
    if blob.size != fpq4_blob_size(k, n, symmetric):
        raise OnnxqError(f"MatMulFpQ4 blob has {blob.size} bytes, expected {fpq4_blob_size(k, n, symmetric)} "
                         f"for K={k}, N={n}, blk_quant_type={blk_quant_type}")
    k_blocks = -(-k // FPQ4_BLOCK)
    rows = blob.reshape(n, k_blocks, -1)
    scales = np.ascontiguousarray(rows[:, :, :4]).view(np.float32).reshape(n, k_blocks)
    zero_points = None if symmetric else rows[:, :, 4].copy()
    data = rows[:, :, -16:]
    codes = np.stack([data & np.uint8(0x0F), data >> np.uint8(4)], axis=2).reshape(n, k_blocks, FPQ4_BLOCK)
    return QuantizedWeight(codes, scales.copy(), zero_points, 4, FPQ4_BLOCK, k)


def make_matmul_fpq4_node(
    activation: ir.Value, blob: ir.Value, b_shape: ir.Value, blk_quant_type: int, *, name: str | None = None
) -> ir.Node:
    """A MatMulFpQ4 node computing ``activation [..., K] @ dequant(blob) -> [..., N]``."""
    return ir.node("MatMulFpQ4", [activation, blob, b_shape], attributes={"blk_quant_type": blk_quant_type},
                   domain=MS_DOMAIN, name=name)


def read_matmul_fpq4(node: ir.Node) -> QuantizedWeight:
    """The ``[K, N]`` weight a MatMulFpQ4 node computes with (blob and shape must be initializers)."""
    blob, shape = node.inputs[1], node.inputs[2]
    if blob is None or blob.const_value is None or shape is None or shape.const_value is None:
        raise OnnxqError(f"MatMulFpQ4 node {node.name!r}: B and B_shape must be initializers")
    k, n = (int(d) for d in shape.const_value.numpy().reshape(-1))
    attr = node.attributes.get("blk_quant_type")
    return unpack_fpq4(blob.const_value.numpy(), k, n, 1 if attr is None else attr.as_int())


@dataclass(frozen=True)
class FpQ4Initializers:
    """The constant inputs of one MatMulFpQ4 weight: the blob, ``B_shape`` ``[K, N]`` and the blob type."""

    blob: ir.Value
    shape: ir.Value
    blk_quant_type: int

    def values(self) -> list[ir.Value]:
        return [self.blob, self.shape]

    @property
    def nbytes(self) -> int:
        return self.blob.const_value.nbytes


class MatMulFpQ4Format(Format):
    """Legacy com.microsoft MatMulFpQ4 (see the module docstring): emit only on request."""

    name = "fpq4"
    op_type = "MatMulFpQ4"
    bits = (4,)
    dtypes = (ir.DataType.FLOAT,)

    def resolve_block_size(self, block_size: int, k: int | None) -> int:
        return block_size  # one layout only: -1 is refused, not rounded

    def block_size_reason(self, bits: int, block_size: int) -> str | None:
        if block_size != FPQ4_BLOCK:
            return f"MatMulFpQ4 stores 4-bit codes in blocks of {FPQ4_BLOCK}, got block_size={block_size}"
        return None

    def node_name(self, base: str, settings: WeightSettings) -> str:
        return f"{base}_FpQ4"

    def stored_bytes(self, k: int, n: int, settings: WeightSettings, dtype: ir.DataType) -> int:
        return fpq4_blob_size(k, n, settings.symmetric)

    def pack(self, payload: QuantizedWeight, settings: WeightSettings, dtype: ir.DataType, name: str,
             layout: WeightLayout) -> FpQ4Initializers:
        blob, blk_quant_type = pack_fpq4(payload)
        shape = constant_value(np.array([payload.k, payload.n], dtype=np.int64), f"{name}_FpQ4_shape")
        return FpQ4Initializers(constant_value(blob, f"{name}_FpQ4"), shape, blk_quant_type)

    def make_nodes(self, activation, packed: FpQ4Initializers, settings: WeightSettings, *, name: str,
                   bias: ir.Value | None, constant: Constant) -> tuple[list[ir.Node], ir.Value]:
        node = make_matmul_fpq4_node(activation, packed.blob, packed.shape, packed.blk_quant_type, name=name)
        return [node], node.outputs[0]

    def read(self, node: ir.Node) -> QuantizedWeight:
        return read_matmul_fpq4(node)

    def describe_node(self, node: ir.Node) -> tuple[str, str] | None:
        return "-", "int4 block 32 (MLAS blob)"
