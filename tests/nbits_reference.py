"""An independent numpy reader of MatMulNBits nodes: the reference the ORT outputs are checked against.

It reads the packed initializers straight from the rewritten model with plain
bit operations (no onnxq code), so a wrong layout in onnxq cannot cancel out.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir


def nbits_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph.all_nodes() if n.op_type == "MatMulNBits"]


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., B] -> codes [..., B * 8 // bits], LSB first."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def dequantized_weight(node: ir.Node) -> np.ndarray:
    """float64 ``W: [K, N]`` that ``node`` multiplies by, from its initializers and attributes."""
    k, n = node.attributes["K"].as_int(), node.attributes["N"].as_int()
    bits, bs = node.attributes["bits"].as_int(), node.attributes["block_size"].as_int()
    k_blocks = -(-k // bs)
    b = node.inputs[1].const_value.numpy()
    assert b.shape == (n, k_blocks, bs * bits // 8) and b.dtype == np.uint8
    codes = _unpack(b, bits).astype(np.float64)  # [N, k_blocks, bs]
    scales = node.inputs[2].const_value.numpy().astype(np.float64).reshape(n, k_blocks)
    zp_value = node.inputs[3] if len(node.inputs) > 3 else None
    if zp_value is not None and zp_value.const_value.dtype.is_floating_point():
        zps = zp_value.const_value.numpy().astype(np.float64).reshape(n, k_blocks)
    elif zp_value is not None:
        zps = _unpack(zp_value.const_value.numpy(), bits).reshape(n, -1)[:, :k_blocks].astype(np.float64)
    else:
        zps = np.full((n, k_blocks), 2 ** (bits - 1), dtype=np.float64)
    w = (codes - zps[..., None]) * scales[..., None]
    return w.reshape(n, -1)[:, :k].T


def bias_of(node: ir.Node) -> np.ndarray | None:
    if len(node.inputs) > 5 and node.inputs[5] is not None:
        return node.inputs[5].const_value.numpy().astype(np.float64)
    return None
