"""Bit-exact agreement of our packed B / scales / zero points with ORT's own C++ packer.

``onnxruntime.capi._pybind_state.quantize_matmul_{2,4,8}bits`` is the RTN packer
behind ORT's ``MatMulNBitsQuantizer``; for float32 and float16 weights our numpy
core plus the MatMulNBits format code must produce the very same bytes.
"""
import numpy as np
import pytest
from onnxruntime.capi import _pybind_state as ort_c

import onnx_ir as ir

from onnxq.core import quantize_weight
from onnxq.formats.matmul_nbits import make_matmul_nbits_initializers

ORT_PACKERS = {2: ort_c.quantize_matmul_2bits, 4: ort_c.quantize_matmul_4bits, 8: ort_c.quantize_matmul_8bits}


def ort_pack(weight: np.ndarray, bits: int, block_size: int, symmetric: bool, dtype=np.float32):
    k, n = weight.shape
    k_blocks = -(-k // block_size)
    packed = np.zeros((n, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros(n * k_blocks, dtype=dtype)
    zero_points = np.zeros(n * (-(-k_blocks * bits // 8)), dtype=np.uint8)
    ORT_PACKERS[bits](packed, np.ascontiguousarray(weight.astype(dtype)), scales, zero_points, block_size, n, k, symmetric)
    return packed, scales.reshape(n, k_blocks), zero_points.reshape(n, -1)


def onnxq_pack(weight: np.ndarray, bits: int, block_size: int, symmetric: bool, dtype=np.float32):
    scale_type = ir.DataType.FLOAT if dtype == np.float32 else ir.DataType.FLOAT16
    qw = quantize_weight(weight.astype(np.float32), bits, block_size, symmetric, scale_dtype=dtype)
    inits = make_matmul_nbits_initializers(qw, scale_type, "w")
    zp = inits.zero_points.const_value.numpy() if inits.zero_points is not None else None
    return inits.b.const_value.numpy(), inits.scales.const_value.numpy(), zp


def heavy_tailed(shape, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(df=3, size=shape).astype(np.float32) * 0.02
    w[rng.random(shape) < 0.01] *= 20  # outliers, as in real LLM weights
    return w


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("block_size,k,n", [(16, 64, 24), (32, 100, 40), (64, 256, 33), (128, 384, 16), (256, 200, 8)])
def test_packed_bytes_match_ort(bits, symmetric, dtype, block_size, k, n):
    w = heavy_tailed((k, n), seed=bits * 1000 + block_size + k).astype(dtype)
    b, scales, zp = onnxq_pack(w, bits, block_size, symmetric, dtype)
    ref_b, ref_scales, ref_zp = ort_pack(w, bits, block_size, symmetric, dtype)
    np.testing.assert_array_equal(b, ref_b)
    np.testing.assert_array_equal(scales, ref_scales)
    if symmetric:  # no zero points stored; ORT leaves its buffer untouched
        assert zp is None
    else:
        np.testing.assert_array_equal(zp, ref_zp)


@pytest.mark.parametrize("symmetric", [True, False])
def test_special_blocks_match_ort(symmetric):
    """All-zero, constant, all-positive, all-negative blocks and exact ties."""
    w = np.zeros((128, 6), np.float32)
    w[:32, 1] = 0.5
    w[32:64, 2] = np.linspace(0.1, 2.0, 32)
    w[64:96, 3] = -np.linspace(0.1, 2.0, 32)
    w[96:, 4] = np.tile([1.0, -1.0], 16)  # |max| == |min|: the minimum wins
    w[:, 5] = np.arange(128) - 64.0
    b, scales, zp = onnxq_pack(w, 4, 32, symmetric)
    ref_b, ref_scales, ref_zp = ort_pack(w, 4, 32, symmetric)
    np.testing.assert_array_equal(b, ref_b)
    np.testing.assert_array_equal(scales, ref_scales)
    if not symmetric:
        np.testing.assert_array_equal(zp, ref_zp)


@pytest.mark.parametrize("bits,block_size,symmetric", [(4, 32, False), (4, 128, False), (2, 32, False), (4, 32, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_grid_weights_with_rounding_ties_match_ort(bits, block_size, symmetric, dtype):
    """Weights that already sit on a uniform grid (like a GGUF Q4_1 checkpoint dequantized) put the
    zero point ``-min / scale`` and the codes on exact .5 ties: the rounding must be ORT's
    (C roundf of a true division), not a reciprocal multiply and ``floor(x + 0.5)``."""
    rng = np.random.default_rng(bits * 7 + block_size)
    levels = (1 << bits) - 1
    k, n = 512, 64
    blocks = k // block_size
    step = (rng.random((blocks, n)) * 0.02 + 0.001).astype(np.float32)
    zero = rng.integers(0, levels, (blocks, n)) + 0.5  # -min / scale = z + 0.5 exactly
    codes = rng.integers(0, levels + 1, (k, n)).astype(np.float32)
    codes[::block_size] = 0  # every block spans the whole grid
    codes[1::block_size] = levels
    w = ((codes - zero.repeat(block_size, 0)) * step.repeat(block_size, 0)).astype(dtype)
    b, scales, zp = onnxq_pack(w, bits, block_size, symmetric, dtype)
    ref_b, ref_scales, ref_zp = ort_pack(w, bits, block_size, symmetric, dtype)
    np.testing.assert_array_equal(b, ref_b)
    np.testing.assert_array_equal(scales, ref_scales)
    if not symmetric:
        np.testing.assert_array_equal(zp, ref_zp)
