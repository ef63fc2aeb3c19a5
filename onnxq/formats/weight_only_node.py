"""Neural Compressor's ``make_matmul_weight_only_node``: NC-shaped codes in, a MatMulNBits ``NodeProto`` out.

Takes the arrays Neural Compressor's ONNX RTN produces
(``quant_tensor(pad_tensor(W, group_size, k_blocks).T, ..., "uint")``: codes
``[N * k_blocks, group_size]``, scales and zero points ``[N * k_blocks, 1]``) and
packs them with onnxq's MatMulNBits writer (:mod:`onnxq.formats.matmul_nbits`), so the
bytes are those onnxq (and ORT's own packer) write. Names follow NC:
``<weight>_Q<bits>G<group_size>``, ``<weight>_scale``, ``<weight>_zp`` and node
``<node>_Q<bits>``.

Differences from NC: 2-bit codes are packed too (NC logs an error and writes
nothing usable); zero points are packed per output row, ``ceil(k_blocks * bits / 8)``
bytes each, as the kernel reads them (NC packs 4-bit zero points across rows,
which is wrong when ``k_blocks`` is odd); the codes of the zero padding of K are
written as 0, as ORT's packer does (never read by the kernel); ``accuracy_level`` is
always set (NC omits the attribute when it is 0, which means the same); the
MatMulFpQ4 branch for onnxruntime 1.16.0/1.16.1 does not exist (see
:mod:`onnxq.formats.matmul_fpq4`).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.core import QuantizedWeight
from onnxq.errors import OnnxqError
from onnxq.formats.base import MS_DOMAIN, WeightSettings
from onnxq.formats.matmul_nbits import MatMulNBitsFormat, make_matmul_nbits_initializers

__all__ = ["make_matmul_weight_only_node"]


def _check(num_bits: int, group_size: int, k_blocks: int, weight_shape) -> tuple[int, int]:
    reason = MatMulNBitsFormat().validate(WeightSettings(num_bits, group_size, True), None, None)
    if reason is not None:
        raise OnnxqError(f"num_bits={num_bits}, group_size={group_size}: {reason}")
    if len(weight_shape) != 2:
        raise OnnxqError(f"weight_shape must be (K, N), got {tuple(weight_shape)}")
    k, n = (int(d) for d in weight_shape)
    if k_blocks != -(-k // group_size):
        raise OnnxqError(f"k_blocks must be ceil(K / group_size) = {-(-k // group_size)} for K={k}, got {k_blocks}")
    return k, n


def make_matmul_weight_only_node(
    node: onnx.NodeProto,
    weight_shape: tuple[int, int],
    num_bits: int,
    group_size: int,
    k_blocks: int,
    q_weight: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    accuracy_level: int = 0,
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """Build the MatMulNBits node that replaces ``node`` (``Y = A @ W``, ``W: [K, N]``).

    Args:
        node: the original MatMul (its ``input[0]`` is the activation, ``input[1]`` the weight
            name the new initializers are named after; its outputs are kept).
        weight_shape: ``(K, N)`` of the unpadded weight.
        num_bits: 2, 4 or 8.
        group_size: elements of K per scale (the MatMulNBits ``block_size``).
        k_blocks: ``ceil(K / group_size)``.
        q_weight: unsigned codes ``[N * k_blocks, group_size]`` (any shape with that many
            elements in that order: output column, block, position in block).
        scale: ``[N * k_blocks]`` (or ``[N * k_blocks, 1]``); its dtype is the stored scales'
            dtype, which must be the activation's (float32 or float16).
        zero_point: ``[N * k_blocks]`` codes, or ``None`` (symmetric: implied ``2**(bits-1)``).
        accuracy_level: MatMulNBits compute mode (0..4; 4 = int8 activations).

    Returns:
        ``(matmul_nbits_node, [scale, zero_point (if any), packed weight] TensorProtos)``,
        the initializers in NC's order.
    """
    k, n = _check(num_bits, group_size, k_blocks, weight_shape)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise OnnxqError(f"accuracy_level must be in 0..4, got {accuracy_level!r}")
    codes = np.asarray(q_weight)
    if codes.size != n * k_blocks * group_size:
        raise OnnxqError(f"q_weight must hold N*k_blocks*group_size = {n * k_blocks * group_size} codes "
                         f"([{n * k_blocks}, {group_size}]), got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << num_bits):
        raise OnnxqError(f"q_weight codes must be in [0, {(1 << num_bits) - 1}], found [{codes.min()}, {codes.max()}]")
    scale = np.asarray(scale)
    if scale.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise OnnxqError(f"scale dtype must be the activation's, float32 or float16; got {scale.dtype} "
                         "(cast it, as NC does with scale.astype(weight.dtype))")
    if scale.size != n * k_blocks:
        raise OnnxqError(f"scale must hold N*k_blocks = {n * k_blocks} values, got shape {scale.shape}")
    zps = None
    if zero_point is not None:
        zps = np.asarray(zero_point)
        if zps.size != n * k_blocks:
            raise OnnxqError(f"zero_point must hold N*k_blocks = {n * k_blocks} values, got shape {zps.shape}")
        if zps.min() < 0 or zps.max() >= 1 << num_bits:
            raise OnnxqError(f"zero_point values must be in [0, {(1 << num_bits) - 1}], "
                             f"found [{zps.min()}, {zps.max()}]")
        zps = zps.astype(np.uint8).reshape(n, k_blocks)
    qweight = QuantizedWeight(
        codes.astype(np.uint8).reshape(n, k_blocks, group_size),
        scale.astype(np.float32).reshape(n, k_blocks),
        zps,
        num_bits,
        group_size,
        k,
    )
    scale_dtype = ir.DataType.from_numpy(scale.dtype)
    inits = make_matmul_nbits_initializers(qweight, scale_dtype, node.input[1])
    names = {"b": f"{node.input[1]}_Q{num_bits}G{group_size}", "scales": f"{node.input[1]}_scale",
             "zero_points": f"{node.input[1]}_zp"}
    protos = {}
    for field, name in names.items():
        value = getattr(inits, field)
        if value is not None:
            proto = ir.serde.serialize_tensor(value.const_value)
            proto.name = name
            protos[field] = proto
    inputs = [node.input[0], names["b"], names["scales"]] + ([names["zero_points"]] if "zero_points" in protos else [])
    new_node = onnx.helper.make_node(
        "MatMulNBits",
        inputs=inputs,
        outputs=list(node.output),
        name=f"{node.name}_Q{num_bits}" if node.name else f"_Q{num_bits}",
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=num_bits,
        block_size=group_size,
        accuracy_level=accuracy_level,
    )
    return new_node, [protos[f] for f in ("scales", "zero_points", "b") if f in protos]
