"""Bit packing in the MatMulNBits layout: LSB-first along the last axis.

For 4 bits, element ``2j`` sits in the low nibble of byte ``j`` and element
``2j+1`` in the high nibble; for 2 bits, element ``4j+i`` sits in bits
``2i..2i+1`` of byte ``j``; 8 bits are stored as they are.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SUPPORTED_BITS", "pack_bits", "unpack_bits", "pack_zero_points", "unpack_zero_points"]

SUPPORTED_BITS = (2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} for packing, got {bits}")
    return 8 // bits


def pack_bits(codes: np.ndarray, bits: int, fill: int = 0) -> np.ndarray:
    """Pack unsigned codes ``[..., L]`` (values < 2**bits) into bytes ``[..., ceil(L*bits/8)]``.

    The last axis is padded with ``fill`` codes up to a multiple of ``8 // bits``. The
    ``8 // bits`` codes of one byte are read as one little-endian integer ``v`` and folded into its
    low byte (``v | v >> 4`` for 4 bits): two integer passes instead of one per code.
    """
    per_byte = _check_bits(bits)
    codes = np.asarray(codes, dtype=np.uint8)
    if per_byte == 1:
        return codes.copy()
    length = codes.shape[-1]
    padded = -(-length // per_byte) * per_byte
    if padded != length:
        pad = [(0, 0)] * (codes.ndim - 1) + [(0, padded - length)]
        codes = np.pad(codes, pad, constant_values=fill)
    words = np.ascontiguousarray(codes).view(np.uint16 if per_byte == 2 else np.uint32)
    if words.dtype.byteorder == ">" or (words.dtype.byteorder == "=" and np.little_endian is False):
        words = words.byteswap()  # the codes of one byte, lowest first, whatever the host's order
    folded = words >> np.uint8(8 - bits)
    folded |= words
    for i in range(2, per_byte):
        folded |= words >> np.uint8(i * (8 - bits))
    return folded.astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: bytes ``[..., B]`` -> codes ``[..., length]`` (uint8)."""
    per_byte = _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    if per_byte == 1:
        return packed[..., :length].copy()
    mask = np.uint8((1 << bits) - 1)
    codes = np.empty((*packed.shape, per_byte), dtype=np.uint8)
    for i in range(per_byte):
        codes[..., i] = (packed >> np.uint8(i * bits)) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :length]


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Pack zero points ``[N, k_blocks]`` into MatMulNBits' ``[N, ceil(k_blocks*bits/8)]``.

    Unused trailing slots hold the default zero point ``2**(bits-1)``, as ORT's packer writes.
    """
    return pack_bits(zero_points, bits, fill=1 << (bits - 1))


def unpack_zero_points(packed: np.ndarray, bits: int, k_blocks: int) -> np.ndarray:
    """Unpack MatMulNBits zero points ``[N, ceil(k_blocks*bits/8)]`` -> ``[N, k_blocks]``."""
    return unpack_bits(packed, bits, k_blocks)
