"""The result every algorithm returns: integer codes plus per-block scales/zero points."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.core.padding import blocks_to_weight

__all__ = ["QuantizedWeight"]


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

    def effective_zero_points(self) -> np.ndarray:
        """Zero points ``[N, k_blocks]`` with the implied symmetric value filled in."""
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)

    def dequantize_blocks(self) -> np.ndarray:
        """float32 ``[N, k_blocks, block_size]``."""
        zp = self.effective_zero_points().astype(np.float32)[..., None]
        return (self.codes.astype(np.float32) - zp) * self.scales.astype(np.float32)[..., None]

    def dequantize(self) -> np.ndarray:
        """float32 ``[K, N]``: the weight the quantized op computes with."""
        return blocks_to_weight(self.dequantize_blocks(), self.k)
