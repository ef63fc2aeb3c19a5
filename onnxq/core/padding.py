"""Padding a ``[K, N]`` weight along K and viewing it as blocks per output column."""
from __future__ import annotations

import numpy as np

__all__ = ["pad_tensor", "weight_to_blocks", "blocks_to_weight"]


def pad_tensor(weight: np.ndarray, group_size: int, k_blocks: int) -> np.ndarray:
    """Zero-pad ``weight: [K, N]`` along K to ``k_blocks * group_size`` rows.

    Same signature as Neural Compressor's ``pad_tensor``; ``group_size == -1``
    means one group spanning all of K (nothing to pad). Returns the input
    itself when no padding is needed (it is never modified).
    """
    if group_size == -1:
        return weight
    rows = weight.shape[0]
    padded_rows = k_blocks * group_size
    if padded_rows < rows:
        raise ValueError(f"k_blocks*group_size = {padded_rows} is smaller than K = {rows}")
    if padded_rows == rows:
        return weight
    return np.pad(weight, ((0, padded_rows - rows), (0, 0)))


def weight_to_blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """``weight: [K, N]`` -> float32 blocks ``[N, k_blocks, block_size]`` (K zero-padded)."""
    rows = weight.shape[0]
    k_blocks = -(-rows // block_size)
    padded = pad_tensor(np.asarray(weight), block_size, k_blocks)
    return np.ascontiguousarray(padded.T, dtype=np.float32).reshape(padded.shape[1], k_blocks, block_size)


def blocks_to_weight(blocks: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`weight_to_blocks`: ``[N, k_blocks, block_size]`` -> ``[K, N]``."""
    n = blocks.shape[0]
    return np.ascontiguousarray(blocks.reshape(n, -1)[:, :k].T)
