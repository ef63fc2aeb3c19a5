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

from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxq.core import QuantizedWeight, unpack_bits, unpack_zero_points
from onnxq.errors import OnnxqError
from onnxq.formats.matmul_nbits import MS_DOMAIN, MatMulNBitsInitializers, make_matmul_nbits_initializers

__all__ = [
    "GBQ_DTYPES",
    "GatherBlockQuantizedInitializers",
    "make_gather_block_quantized_initializers",
    "gather_initializers_from_nbits",
    "make_gather_block_quantized_nodes",
    "qweight_from_nbits_layout",
    "read_gather_block_quantized",
]

GBQ_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
"""Output (scale) dtypes ORT's CPU kernel runs."""


@dataclass(frozen=True)
class GatherBlockQuantizedInitializers:
    """``data`` is either 2-D ``[V, Kpad*bits/8]`` or MatMulNBits' 3-D B (read through a Reshape).

    ``k`` (= D), ``n`` (= V), ``bits``, ``block_size`` describe ``W = table^T``.
    """

    data: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None
    k: int
    n: int
    bits: int
    block_size: int

    def values(self) -> list[ir.Value]:
        return [v for v in (self.data, self.scales, self.zero_points) if v is not None]

    @property
    def nbytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.values())

    def qweight(self) -> QuantizedWeight:
        """The codes / scales / zero points these initializers hold, as a ``[K, N]`` weight."""
        zp = None if self.zero_points is None else self.zero_points.const_value.numpy()
        return qweight_from_nbits_layout(self.data.const_value.numpy(), self.scales.const_value.numpy(), zp,
                                         self.bits, self.block_size, self.k, self.n)


def _check(bits: int, block_size: int, scale_dtype: ir.DataType) -> None:
    if bits not in (2, 4, 8):
        raise OnnxqError(f"GatherBlockQuantized holds 2, 4 or 8-bit codes, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise OnnxqError(f"GatherBlockQuantized needs a power-of-two block_size >= 16, got {block_size}")
    if scale_dtype not in GBQ_DTYPES:
        raise OnnxqError(f"GatherBlockQuantized runs float32/float16 tables, got {scale_dtype.name}")


def make_gather_block_quantized_initializers(
    qweight: QuantizedWeight, scale_dtype: ir.DataType, name_prefix: str
) -> GatherBlockQuantizedInitializers:
    """data / scales / zero_points for ``qweight`` (``W = table^T``): MatMulNBits' arrays, data stored 2-D."""
    _check(qweight.bits, qweight.block_size, scale_dtype)
    nbits = make_matmul_nbits_initializers(qweight, scale_dtype, name_prefix)
    packed = nbits.b.const_value.numpy().reshape(qweight.n, -1)
    data = ir.Value(name=nbits.b.name, shape=ir.Shape(packed.shape), type=ir.TensorType(ir.DataType.UINT8),
                    const_value=ir.tensor(packed, name=nbits.b.name))
    return GatherBlockQuantizedInitializers(data, nbits.scales, nbits.zero_points, qweight.k, qweight.n,
                                            qweight.bits, qweight.block_size)


def gather_initializers_from_nbits(inits: MatMulNBitsInitializers) -> GatherBlockQuantizedInitializers:
    """Share a MatMulNBits weight (``W = table^T``) with GatherBlockQuantized: the same three values."""
    _check(inits.bits, inits.block_size, inits.scales.dtype)
    return GatherBlockQuantizedInitializers(inits.b, inits.scales, inits.zero_points, inits.k, inits.n,
                                            inits.bits, inits.block_size)


def make_gather_block_quantized_nodes(
    inits: GatherBlockQuantizedInitializers,
    indices: ir.Value,
    *,
    name: str,
    constant: Callable[[np.ndarray, str], ir.Value],
) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing ``table[indices]`` (``[..., D]``) from ``inits``, and the output value.

    ``constant(array, name) -> ir.Value`` registers a small int64 constant (Reshape
    shape, Slice bounds) in the graph.
    """
    qw = inits
    nodes: list[ir.Node] = []
    data = inits.data
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
    attrs = {k: v.as_int() for k, v in node.attributes.items()}
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
