"""The result every algorithm returns: integer codes plus per-block scales/zero points."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from onnxq.core.packing import pack_bits, unpack_bits
from onnxq.core.padding import blocks_to_weight

__all__ = ["PackedQuantizedWeight", "QuantizedWeight"]


@dataclass(frozen=True)
class QuantizedWeight:
    """A blockwise-quantized ``[K, N]`` weight in MatMulNBits orientation.

    Attributes:
        codes: uint8 ``[N, k_blocks, block_size]`` unsigned codes in ``[0, 2**bits)``.
        scales: float32 ``[N, k_blocks]`` (already rounded to the dtype they are stored in).
        zero_points: uint8 ``[N, k_blocks]``, or float32 ``[N, k_blocks]`` (HQQ's float zero
            points, stored unpacked in the scales' dtype), or ``None`` for symmetric weights whose
            zero point is the implied ``2**(bits-1)``.
        bits: 2..8.
        block_size: elements of K per block.
        k: the unpadded K.

    ``dequantize()[k, n] = (codes[n, k // bs, k % bs] - zp[n, k // bs]) * scales[n, k // bs]``.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    k: int

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def k_blocks(self) -> int:
        return self.codes.shape[1]

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def packed_codes(self) -> np.ndarray:
        """uint8 ``[N, k_blocks, block_size * bits / 8]``: the codes packed LSB-first along K
        (:func:`~onnxq.core.packing.pack_bits`), the padded tail of K set to code 0 as ORT's packer
        writes it (the MatMulNBits ``B`` layout). ``bits`` must be 2, 4 or 8."""
        codes = self.codes
        tail = self.k % self.block_size
        if tail:
            codes = codes.copy()
            codes[:, -1, tail:] = 0
        return pack_bits(codes, self.bits)

    def effective_zero_points(self) -> np.ndarray:
        """Zero points ``[N, k_blocks]`` with the implied symmetric value filled in."""
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)

    def dequantize_blocks(self) -> np.ndarray:
        """float32 ``[N, k_blocks, block_size]``."""
        out = self.codes.astype(np.float32)  # then in place: (code - zero point) * scale
        out -= self.effective_zero_points().astype(np.float32)[..., None]
        out *= self.scales.astype(np.float32)[..., None]
        return out

    def dequantize(self) -> np.ndarray:
        """float32 ``[K, N]``: the weight the quantized op computes with."""
        return blocks_to_weight(self.dequantize_blocks(), self.k)


class PackedQuantizedWeight(QuantizedWeight):
    """A :class:`QuantizedWeight` whose quantizer wrote its codes packed (:meth:`packed_codes`'s
    layout), so a format storing that layout takes the bytes as they are; ``codes`` unpacks them
    on first use (the padded tail of K gets its block's zero point back: the code of 0).

    Args:
        packed: uint8 ``[N, k_blocks, block_size * bits / 8]``, padded codes 0.
        scales, zero_points, bits, block_size, k: as :class:`QuantizedWeight`.
    """

    def __init__(self, packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                 block_size: int, k: int) -> None:
        for name, value in (("scales", scales), ("zero_points", zero_points), ("bits", bits),
                            ("block_size", block_size), ("k", k), ("_packed", packed)):
            object.__setattr__(self, name, value)

    @cached_property
    def codes(self) -> np.ndarray:  # type: ignore[override]
        codes = unpack_bits(self._packed, self.bits, self.block_size)
        tail = self.k % self.block_size
        if tail:
            codes[:, -1, tail:] = self.effective_zero_points()[:, -1:]
        return codes

    @property
    def n(self) -> int:
        return self._packed.shape[0]

    @property
    def k_blocks(self) -> int:
        return self._packed.shape[1]

    def packed_codes(self) -> np.ndarray:
        return self._packed
