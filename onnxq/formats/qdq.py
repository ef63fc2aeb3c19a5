"""Standard ONNX QDQ weights: ``DequantizeLinear(q, scale, zero_point, axis, block_size)`` (opset 21).

Blocked dequantization (ONNX opset 21): for ``q: [D0, .., Di, .., Dn]`` and ``axis = i``
the scale (and zero point) have the same shape except ``ceil(Di / block_size)`` on the
axis; the last block may be partial, so no padding is stored.
``y = (q - zero_point) * scale`` with ``zero_point`` 0 when absent.

onnxq writes a ``[K, N]`` MatMul weight as ``q: [K, N]`` with ``axis=0`` (the layout ORT
fuses with MatMul into MatMulNBits), and a weight read through a Transpose
(``W = B^T``: Gemm transB=1, tied lm_head, embeddings) as ``q: [N, K]`` with ``axis=1``.

Codes (see :mod:`onnxq.core.quantize`): symmetric onnxq codes ``c`` with implied zero
point ``2**(b-1)`` become signed ``q = c - 2**(b-1)`` (int4/int8, no zero point stored:
the full signed range, scale signed); asymmetric codes are stored as they are
(uint4/uint8 with a zero point). 2- and 3-bit codes are stored in 4-bit containers and
5..7-bit codes in 8-bit ones; the node then carries ``metadata_props["onnxq.bits"]`` so a
conversion back to MatMulNBits restores the width.

Limits (ONNX opset 21, checked against onnxruntime 1.32's CPU DequantizeLinear): bits 2..8,
any block_size >= 1; ORT fuses ``DequantizeLinear(axis=0) -> MatMul`` into MatMulNBits only
for 4-bit codes in power-of-two blocks >= 16.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.core import QuantizedWeight
from onnxq.errors import OnnxqError
from onnxq.formats.base import Constant, Format, WeightLayout, WeightSettings, int_attributes
from onnxq.graph.constants import constant_array, constant_value
from onnxq.graph.opset import QDQ_OPSET, upgrade_opset

__all__ = [
    "BITS_METADATA_KEY",
    "QDQFormat",
    "QDQInitializers",
    "QDQWeight",
    "container_dtype",
    "dequantize_linear_constant",
    "is_constant_dequantize",
    "make_dequantize_node",
    "make_qdq_initializers",
    "read_qdq_weight",
]

BITS_METADATA_KEY = "onnxq.bits"

_INT_TYPES = {
    ir.DataType.INT4: (4, True),
    ir.DataType.UINT4: (4, False),
    ir.DataType.INT8: (8, True),
    ir.DataType.UINT8: (8, False),
}


def container_dtype(bits: int, symmetric: bool) -> ir.DataType:
    """The DequantizeLinear input type holding ``bits``-bit codes: int4/uint4 up to 4 bits, else int8/uint8."""
    if not 2 <= bits <= 8:
        raise OnnxqError(f"QDQ weights hold 2..8-bit codes, got bits={bits}")
    if bits <= 4:
        return ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if symmetric else ir.DataType.UINT8


@dataclass(frozen=True)
class QDQInitializers:
    """The constant inputs of one DequantizeLinear weight chain (shareable between consumers)."""

    q: ir.Value
    scale: ir.Value
    zero_point: ir.Value | None
    axis: int
    block_size: int
    qweight: QuantizedWeight

    def values(self) -> list[ir.Value]:
        return [v for v in (self.q, self.scale, self.zero_point) if v is not None]

    @property
    def nbytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.values())


def make_qdq_initializers(
    qweight: QuantizedWeight,
    scale_dtype: ir.DataType,
    name_prefix: str,
    *,
    transposed: bool = False,
    leading_ones: int = 0,
) -> QDQInitializers:
    """q / scale / zero_point values for ``qweight`` (a ``[K, N]`` weight).

    ``transposed=False``: ``q: [K, N]``, ``axis=0``; ``transposed=True``: ``q: [N, K]``, ``axis=1``.
    ``leading_ones`` prepends size-1 axes (a MatMul B of shape ``[1, .., K, N]``).
    """
    bits, k, n = qweight.bits, qweight.k, qweight.n
    dtype = container_dtype(bits, qweight.symmetric)
    codes = qweight.codes.reshape(n, -1)[:, :k]  # [N, K]
    zero_points = None
    if qweight.symmetric:
        q = (codes.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
    else:
        q, zero_points = codes, qweight.zero_points  # [N, K], [N, k_blocks]
    scales = qweight.scales  # [N, k_blocks]
    if not transposed:
        q, scales = q.T, scales.T
        zero_points = None if zero_points is None else zero_points.T
    lead = (1,) * leading_ones
    np_dtype = dtype.numpy()
    q_arr = np.ascontiguousarray(q).astype(np_dtype).reshape(lead + q.shape)
    s_arr = np.ascontiguousarray(scales).astype(scale_dtype.numpy()).reshape(lead + scales.shape)
    zp_value = None
    if zero_points is not None:
        zp_arr = np.ascontiguousarray(zero_points).astype(np_dtype).reshape(lead + zero_points.shape)
        zp_value = constant_value(zp_arr, f"{name_prefix}_zero_point", dtype)
    return QDQInitializers(
        q=constant_value(q_arr, f"{name_prefix}_q{bits}", dtype),
        scale=constant_value(s_arr, f"{name_prefix}_scale", scale_dtype),
        zero_point=zp_value,
        axis=leading_ones + (1 if transposed else 0),
        block_size=qweight.block_size,
        qweight=qweight,
    )


def make_dequantize_node(inits: QDQInitializers, *, name: str | None = None) -> ir.Node:
    """The blocked DequantizeLinear node of ``inits`` (output dtype = the scale's dtype)."""
    inputs = [inits.q, inits.scale] + ([inits.zero_point] if inits.zero_point is not None else [])
    bits = inits.qweight.bits
    metadata = None if bits in (4, 8) else {BITS_METADATA_KEY: str(bits)}
    node = ir.node(
        "DequantizeLinear", inputs, attributes={"axis": inits.axis, "block_size": inits.block_size},
        name=name, metadata_props=metadata,
    )
    out = node.outputs[0]
    out.dtype = inits.scale.dtype
    out.shape = ir.Shape(inits.q.shape)
    return node


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def is_constant_dequantize(node: ir.Node) -> bool:
    """A default-domain DequantizeLinear whose inputs are all constants."""
    return (
        node.op_type == "DequantizeLinear" and node.domain == ""
        and all(v is None or constant_array(v) is not None for v in node.inputs)
        and node.inputs[0] is not None and node.inputs[1] is not None
    )


def dequantize_linear_constant(node: ir.Node) -> np.ndarray:
    """float32 output of a constant DequantizeLinear (per-tensor, per-axis or blocked), per the ONNX spec."""
    x = np.asarray(constant_array(node.inputs[0]))
    scale = np.asarray(constant_array(node.inputs[1]), dtype=np.float32)
    zp_in = node.inputs[2] if len(node.inputs) > 2 else None
    zp = None if zp_in is None else np.asarray(constant_array(zp_in))
    axis = _attr_int(node, "axis", 1)
    block_size = _attr_int(node, "block_size", 0)
    rank = x.ndim
    axis = axis + rank if axis < 0 else axis

    def expand(p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=np.float32)
        if p.size == 1 and p.ndim <= 1:
            return p.reshape(())
        if not block_size:
            shape = [1] * rank
            shape[axis] = p.size
            return p.reshape(shape)
        rep = np.repeat(p, block_size, axis=axis)
        return np.take(rep, np.arange(x.shape[axis]), axis=axis)

    values = x.astype(np.float32)
    if zp is not None:
        values = values - expand(zp)
    return values * expand(scale)


@dataclass(frozen=True)
class QDQWeight:
    """A constant DequantizeLinear read back as a ``[K, N]`` blockwise weight.

    ``transposed`` means the DQ output is ``W^T`` (``q: [N, K]``, ``axis=1``);
    ``leading_ones`` counts size-1 axes before the two matrix axes.
    """

    qweight: QuantizedWeight
    transposed: bool
    leading_ones: int
    scale_dtype: ir.DataType


def read_qdq_weight(node: ir.Node) -> QDQWeight | str:
    """Read a constant 2-D (or ``[1, .., R, C]``) blocked/per-axis DequantizeLinear as a :class:`QDQWeight`.

    Returns a reason string when the node is not such a weight (per-tensor scale,
    unsupported type, ...). Signed codes without a zero point are symmetric onnxq codes
    ``q + 2**(b-1)``; ``b`` is the container width, or ``metadata_props["onnxq.bits"]``
    when the codes fit in it.
    """
    if not is_constant_dequantize(node):
        return "not a DequantizeLinear of constants"
    q = np.asarray(constant_array(node.inputs[0]))
    dtype = ir.DataType.from_numpy(q.dtype)
    if dtype not in _INT_TYPES:
        return f"quantized type {dtype.name} is not int4/uint4/int8/uint8"
    container_bits, signed = _INT_TYPES[dtype]
    if q.ndim < 2 or any(d != 1 for d in q.shape[:-2]):
        return f"quantized tensor has shape {q.shape}; need [R, C] or [1, .., R, C]"
    lead = q.ndim - 2
    axis = _attr_int(node, "axis", 1)
    axis = axis + q.ndim if axis < 0 else axis
    block_size = _attr_int(node, "block_size", 0)
    scale_raw = np.asarray(constant_array(node.inputs[1]))
    zp_in = node.inputs[2] if len(node.inputs) > 2 else None
    zp_raw = None if zp_in is None else np.asarray(constant_array(zp_in))
    if axis not in (lead, lead + 1):
        return f"axis {axis} is not one of the two matrix axes"
    if block_size:
        k_axis = axis  # blocks run along the axis
    elif scale_raw.ndim == 1 and scale_raw.size == q.shape[axis] and scale_raw.size > 1:
        k_axis = 2 * lead + 1 - axis  # per-axis: one scale per index of `axis`, one block along the other
    else:
        return f"scale of shape {scale_raw.shape} is per-tensor, not per-axis or blockwise"
    transposed = k_axis == lead + 1
    mat = q.reshape(q.shape[-2:])
    mat = mat if transposed else mat.T  # [N, K]
    n, k = mat.shape

    def as_nk(p: np.ndarray) -> np.ndarray:
        if not block_size:
            return p.reshape(n, 1)
        p = p.reshape(p.shape[-2:])
        return p if transposed else p.T

    scale = as_nk(scale_raw)
    zp = None if zp_raw is None else as_nk(zp_raw)
    if not block_size:
        block_size = max(16, 1 << (k - 1).bit_length())  # one block spanning K, a power of two as MatMulNBits wants
    k_blocks = -(-k // block_size)
    if scale.shape != (n, k_blocks) or (zp is not None and zp.shape != (n, k_blocks)):
        return f"scale shape {scale_raw.shape} does not match {k_blocks} blocks of {block_size}"
    offset = 1 << (container_bits - 1) if signed else 0
    codes = mat.astype(np.int16) + offset
    zps = None if zp is None else zp.astype(np.int16) + offset
    symmetric = signed and (zp is None or not np.any(zp))
    bits = container_bits
    hint = node.metadata_props.get(BITS_METADATA_KEY)
    if hint is not None and hint.isdigit() and 2 <= int(hint) < container_bits:
        small = int(hint)
        shift = offset - (1 << (small - 1)) if signed else 0
        c2 = codes - shift
        z2 = None if zps is None else zps - shift
        if c2.min() >= 0 and c2.max() < (1 << small) and (z2 is None or (z2.min() >= 0 and z2.max() < (1 << small))):
            bits, codes, zps = small, c2, z2
    if symmetric:
        zps = None
    elif zps is None:
        zps = np.full((n, k_blocks), offset, dtype=np.int16)
    fill = (1 << (bits - 1)) if zps is None else np.repeat(zps, block_size, axis=1)[:, : k_blocks * block_size]
    padded = np.empty((n, k_blocks * block_size), dtype=np.int16)
    padded[:] = fill
    padded[:, :k] = codes
    qweight = QuantizedWeight(
        padded.astype(np.uint8).reshape(n, k_blocks, block_size),
        scale.astype(np.float32),
        None if zps is None else zps.astype(np.uint8),
        bits, block_size, k,
    )
    return QDQWeight(qweight, transposed, lead, ir.DataType.from_numpy(scale_raw.dtype))


_DTYPE_BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}


class QDQFormat(Format):
    """Standard blocked DequantizeLinear (opset 21; see the module docstring): the site keeps its node."""

    name = "qdq"
    op_type = "DequantizeLinear"
    bits = (2, 3, 4, 5, 6, 7, 8)
    dtypes = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    replaces = "weight"
    embedding_format = "qdq"
    domain = ""

    def prepare(self, model: ir.Model) -> bool:
        return upgrade_opset(model, QDQ_OPSET)

    def node_name(self, base: str, settings: WeightSettings) -> str:
        return f"{base}_dq"

    def block_size_reason(self, bits: int, block_size: int) -> str | None:
        if not (isinstance(block_size, (int, np.integer)) and block_size >= 1):
            return f"DequantizeLinear block_size must be a positive integer, got {block_size!r}"
        return None

    def stored_bytes(self, k: int, n: int, settings: WeightSettings, dtype: ir.DataType) -> int:
        container = 4 if settings.bits <= 4 else 8
        k_blocks = -(-k // settings.block_size)
        zero_points = 0 if settings.symmetric else -(-n * k_blocks * container // 8)
        return -(-k * n * container // 8) + n * k_blocks * dtype.itemsize + zero_points

    def pack(self, payload: QuantizedWeight, settings: WeightSettings, dtype: ir.DataType, name: str,
             layout: WeightLayout) -> QDQInitializers:
        return make_qdq_initializers(payload, dtype, name, transposed=layout.transposed,
                                     leading_ones=layout.leading_ones)

    def make_nodes(self, activation, packed: QDQInitializers, settings: WeightSettings, *, name: str,
                   bias: ir.Value | None, constant: Constant) -> tuple[list[ir.Node], ir.Value]:
        node = make_dequantize_node(packed, name=name)
        return [node], node.outputs[0]

    def read(self, node: ir.Node) -> QuantizedWeight:
        read = read_qdq_weight(node)
        if isinstance(read, str):
            raise OnnxqError(f"DequantizeLinear node {node.name!r}: {read}")
        return read.qweight

    def describe_node(self, node: ir.Node) -> tuple[str, str] | None:
        q = node.inputs[0]
        if q is None or q.const_value is None or q.const_value.dtype not in _DTYPE_BITS:
            return None
        block = int_attributes(node).get("block_size", 0)
        granularity = f"block {block}" if block else "per axis"
        scheme = "asym" if len(node.inputs) > 2 and node.inputs[2] is not None else "sym"
        shape = "x".join(str(d) for d in q.const_value.shape)
        return shape, f"{q.const_value.dtype.name.lower()} {granularity} {scheme}"
