"""com.microsoft GatherBlockQuantized: quantized embedding tables.

``Y = dequant(data)[indices]`` with ``gather_axis=0`` and ``quantize_axis`` the last axis.
For uint8 ``data`` (the only type onnxq writes; ``bits`` 2, 4 or 8 on ORT's CPU kernel,
block_size a power of two >= 16):

* ``data``: uint8 ``[V, D * bits / 8]``, codes packed LSB-first along the last axis;
* ``scales``: ``[V, ceil(D / block_size)]`` in the output dtype (float32/float16 on CPU);
* ``zero_points`` (optional): uint8 ``[V, ceil(k_blocks * bits / 8)]`` packed the same way;
  absent means ``2**(bits-1)``.

That is MatMulNBits' layout for ``W = table^T`` (``N = V``, ``K = D``): MatMulNBits'
``B [N, k_blocks, block_size*bits/8]`` reshaped to ``[N, -1]`` is GatherBlockQuantized's
``data``, and scales / zero points are the same tensors. A tied embedding / lm_head
therefore stores one packed initializer: the Gather reads it through a ``Reshape``.
When ``D`` is not a multiple of ``block_size`` the packed rows include the zero padding
of the last block and a ``Slice`` drops the padded columns of the output.
ORT's kernel returns zeros for out-of-range indices.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxq.core import QuantizedWeight, unpack_bits, unpack_zero_points
from onnxq.errors import OnnxqError
from onnxq.formats.base import MS_DOMAIN, Constant, Format, WeightLayout, WeightSettings, int_attributes
from onnxq.formats.matmul_nbits import (
    MatMulNBitsInitializers,
    covering_block_size,
    make_matmul_nbits_initializers,
    nbits_stored_bytes,
    power_of_two_block_reason,
    qweight_from_nbits_layout,
)
from onnxq.graph.constants import constant_value

__all__ = [
    "GatherBlockQuantizedFormat",
    "make_gather_block_quantized_initializers",
    "make_gather_block_quantized_nodes",
    "read_gather_block_quantized",
]


def make_gather_block_quantized_initializers(
    qweight: QuantizedWeight, scale_dtype: ir.DataType, name_prefix: str
) -> MatMulNBitsInitializers:
    """data / scales / zero_points for ``qweight`` (``W = table^T``): MatMulNBits' arrays, data stored 2-D."""
    nbits = make_matmul_nbits_initializers(qweight, scale_dtype, name_prefix)
    packed = nbits.b.const_value.numpy().reshape(qweight.n, -1)
    return MatMulNBitsInitializers(constant_value(packed, nbits.b.name), nbits.scales, nbits.zero_points,
                                   qweight.k, qweight.n, qweight.bits, qweight.block_size)


def make_gather_block_quantized_nodes(
    inits: MatMulNBitsInitializers,
    indices: ir.Value,
    *,
    name: str,
    constant: Constant,
) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing ``table[indices]`` (``[..., D]``) from ``inits``, and the output value.

    ``constant(array, name) -> ir.Value`` registers a small int64 constant (Reshape
    shape, Slice bounds) in the graph.
    """
    qw = inits
    nodes: list[ir.Node] = []
    data = inits.b
    if data.shape is not None and len(data.shape) == 3:
        shape = constant(np.array([qw.n, -1], dtype=np.int64), f"{name}_data_shape")
        reshape = ir.node("Reshape", [data, shape], name=f"{name}_data_reshape")
        nodes.append(reshape)
        data = reshape.outputs[0]
    inputs = [data, indices, inits.scales] + ([inits.zero_points] if inits.zero_points is not None else [])
    gather = ir.node(
        "GatherBlockQuantized", inputs,
        attributes={"bits": qw.bits, "block_size": qw.block_size, "gather_axis": 0, "quantize_axis": 1},
        domain=MS_DOMAIN, name=name,
    )
    nodes.append(gather)
    out = gather.outputs[0]
    if qw.k % qw.block_size:
        starts = constant(np.array([0], dtype=np.int64), f"{name}_slice_starts")
        ends = constant(np.array([qw.k], dtype=np.int64), f"{name}_slice_ends")
        axes = constant(np.array([-1], dtype=np.int64), f"{name}_slice_axes")
        sl = ir.node("Slice", [out, starts, ends, axes], name=f"{name}_slice")
        nodes.append(sl)
        out = sl.outputs[0]
    return nodes, out


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape" and producer.domain == "":
        inner = _const(producer.inputs[0])
        return None if inner is None else inner.reshape(inner.shape[0], -1)
    return None


def _padded_qweight(
    codes: np.ndarray, scales: np.ndarray, zps: np.ndarray | None, bits: int, bs: int
) -> QuantizedWeight:
    """codes ``[N, K]``, zero points ``[N, k_blocks]`` (None: implied ``2**(bits-1)``) -> padded QuantizedWeight."""
    n, k = codes.shape
    k_blocks = -(-k // bs)
    fill = np.full((n, k_blocks), 1 << (bits - 1), dtype=np.int16) if zps is None else zps
    padded = np.repeat(fill.astype(np.int16), bs, axis=1)
    padded[:, :k] = codes
    return QuantizedWeight(padded.astype(np.uint8).reshape(n, k_blocks, bs),
                           np.asarray(scales, dtype=np.float32).reshape(n, k_blocks),
                           None if zps is None else zps.astype(np.uint8), bits, bs, k)


def read_gather_block_quantized(node: ir.Node) -> QuantizedWeight:
    """``W = table^T: [D, V]`` of a GatherBlockQuantized node (2-D table, gather_axis 0, quantize_axis 1).

    ``data`` is uint8 (bits 2/4/8, MatMulNBits layout; an initializer or a ``Reshape`` of a
    shared MatMulNBits B) or int4/uint4 (one code per element, zero point default 0).
    """
    attrs = int_attributes(node)
    bits, bs = attrs.get("bits", 4), attrs.get("block_size", 128)
    data = _const(node.inputs[0])
    scales = _const(node.inputs[2])
    has_zp = len(node.inputs) > 3 and node.inputs[3] is not None
    zero_points = _const(node.inputs[3]) if has_zp else None
    if data is None or scales is None or (has_zp and zero_points is None):
        raise OnnxqError(f"GatherBlockQuantized node {node.name!r}: data/scales/zero_points are not constants")
    if data.ndim != 2 or attrs.get("gather_axis", 0) != 0 or attrs.get("quantize_axis", 1) not in (1, -1):
        raise OnnxqError(f"GatherBlockQuantized node {node.name!r}: need 2-D data, gather_axis=0, quantize_axis=1")
    n = data.shape[0]
    if data.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
        offset = 8 if data.dtype == ml_dtypes.int4 else 0
        k = data.shape[1]
        k_blocks = -(-k // bs)
        codes = data.astype(np.int16) + offset
        zps = None if zero_points is None else zero_points.astype(np.int16).reshape(n, k_blocks) + offset
        if offset and zps is not None and np.all(zps == offset):
            zps = None
        if not offset and zps is None:
            zps = np.zeros((n, k_blocks), dtype=np.int16)
        return _padded_qweight(codes, scales, zps, 4, bs)
    if data.dtype != np.uint8:
        raise OnnxqError(f"GatherBlockQuantized node {node.name!r}: data type {data.dtype} is not uint8/int4/uint4")
    k = data.shape[1] * 8 // bits
    k_blocks = -(-k // bs)
    if scales.size != n * k_blocks:
        raise OnnxqError(f"GatherBlockQuantized node {node.name!r}: scales have {scales.size} values, "
                         f"expected {n}x{k_blocks}")
    if k == k_blocks * bs:
        return qweight_from_nbits_layout(data, scales, zero_points, bits, bs, k, n)
    zps = None if zero_points is None else unpack_zero_points(zero_points.reshape(n, -1), bits, k_blocks)
    return _padded_qweight(unpack_bits(data, bits, k), scales, zps, bits, bs)


class GatherBlockQuantizedFormat(Format):
    """com.microsoft GatherBlockQuantized with uint8 data (see the module docstring): embeddings only."""

    name = "gather"
    op_type = "GatherBlockQuantized"
    bits = (2, 4, 8)
    sites = "gather"
    layout = "nbits"

    def resolve_block_size(self, block_size: int, k: int | None) -> int | None:
        """-1 and blocks larger than the table's D: one block over D (:func:`covering_block_size`)."""
        return covering_block_size(super().resolve_block_size(block_size, k), k)

    def block_size_reason(self, bits: int, block_size: int) -> str | None:
        return power_of_two_block_reason(self.op_type, block_size)

    def stored_bytes(self, k: int, n: int, settings: WeightSettings, dtype: ir.DataType) -> int:
        return nbits_stored_bytes(k, n, settings, dtype)

    def pack(self, payload: QuantizedWeight, settings: WeightSettings, dtype: ir.DataType, name: str,
             layout: WeightLayout) -> MatMulNBitsInitializers:
        return make_gather_block_quantized_initializers(payload, dtype, name)

    def make_nodes(self, activation, packed: MatMulNBitsInitializers, settings: WeightSettings, *, name: str,
                   bias: ir.Value | None, constant: Constant) -> tuple[list[ir.Node], ir.Value]:
        return make_gather_block_quantized_nodes(packed, activation, name=name, constant=constant)

    def read(self, node: ir.Node) -> QuantizedWeight:
        return read_gather_block_quantized(node)

    def describe_node(self, node: ir.Node) -> tuple[str, str] | None:
        data = node.inputs[0]
        shape = "x".join(str(d) for d in data.shape) if data is not None and data.shape is not None else "?"
        attrs = int_attributes(node)
        return shape, f"int{attrs.get('bits', 4)} block {attrs.get('block_size')}"
