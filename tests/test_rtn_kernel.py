"""The tiled RTN kernel (``quantize_weight_with_error``) against the one-shot reference, byte for byte.

The reference quantizes the whole ``[k_blocks, block_size, N]`` view at once with
``quantize_blocks`` (the numerics checked against ORT's packer in test_core_ort_oracle.py) and
packs with ``pack_bits``; the kernel works tile by tile, rounds with one addition instead of
``_round_half_up`` and packs along K inside each tile.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import onnxq.core.quantize as quantize_module
from onnxq.core import (
    PackedQuantizedWeight,
    QuantizedWeight,
    pack_bits,
    quantize_blocks,
    quantize_weight_with_error,
)
from onnxq.core.padding import pad_tensor
from onnxq.core.quantize import ROUNDING_OFFSET, _round_half_up


def _reference(weight: np.ndarray, bits: int, block_size: int, symmetric: bool, scale_dtype) -> QuantizedWeight:
    k, n = weight.shape
    bs = k if block_size == -1 else block_size
    k_blocks = -(-k // bs)
    blocks = pad_tensor(weight.astype(np.float32), bs, k_blocks).reshape(k_blocks, bs, n)
    codes, scales, zps = quantize_blocks(blocks, bits, symmetric, 1.0, scale_dtype, axis=1)
    return QuantizedWeight(np.ascontiguousarray(codes.transpose(2, 0, 1)), np.ascontiguousarray(scales.T),
                           None if symmetric else np.ascontiguousarray(zps.T), bits, bs, k)


def _weight(rng: np.random.Generator, k: int, n: int, dtype) -> np.ndarray:
    w = rng.standard_normal((k, n)) * rng.uniform(0.05, 4.0, size=n)
    w[:, 0] = 0  # an all-zero column: scale 0
    w[:, 1] = np.abs(w[:, 1])  # all positive: asym zero point 0
    w[:3, 2] = [1.5, -1.5, 0.75]  # a tie between max and -min
    return w.astype(dtype)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 2 blocks x 48 columns, so small weights cross many tile edges."""
    monkeypatch.setattr(quantize_module, "_TILE_ELEMENTS", 2 * 32 * 48)
    monkeypatch.setattr(quantize_module, "_TILE_COLUMNS", 48)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,n,block_size", [(256, 100, 32), (200, 131, 32), (100, 37, 16), (130, 64, 128),
                                            (77, 20, -1), (64, 50, 64)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_tiled_equals_one_shot(small_tiles, bits, k, n, block_size, symmetric, dtype):
    rng = np.random.default_rng(k * 1000 + n + bits)
    w = _weight(rng, k, n, dtype)
    scale_dtype = np.float16 if dtype == np.float16 else np.float32
    got, err = quantize_weight_with_error(w, bits, block_size, symmetric, scale_dtype=scale_dtype)
    ref = _reference(w, bits, block_size, symmetric, scale_dtype)
    np.testing.assert_array_equal(got.codes, ref.codes)
    np.testing.assert_array_equal(got.scales, ref.scales)
    assert (got.zero_points is None) == symmetric
    if not symmetric:
        np.testing.assert_array_equal(got.zero_points, ref.zero_points)
    assert (got.n, got.k_blocks, got.k, got.block_size) == (ref.n, ref.k_blocks, ref.k, ref.block_size)
    packs = bits in (2, 4, 8) and (got.block_size * bits) % 16 == 0  # whole uint16 words per block
    assert isinstance(got, PackedQuantizedWeight) == packs
    if bits in (2, 4, 8):  # the MatMulNBits bytes: packed along K, padded tail codes 0
        np.testing.assert_array_equal(got.packed_codes(), ref.packed_codes())
    w64 = w.astype(np.float64)
    direct = np.linalg.norm(ref.dequantize().astype(np.float64) - w64) / max(np.linalg.norm(w64), 1e-30)
    assert err == pytest.approx(direct, rel=1e-4 if bits == 8 else 1e-5)


def test_packed_codes_of_plain_weight_zero_the_tail():
    codes = np.random.default_rng(0).integers(0, 16, size=(3, 2, 16), dtype=np.uint8)
    qweight = QuantizedWeight(codes, np.ones((3, 2), np.float32), None, 4, 16, 20)
    expected = codes.copy()
    expected[:, -1, 4:] = 0
    np.testing.assert_array_equal(qweight.packed_codes(), pack_bits(expected, 4))
    np.testing.assert_array_equal(codes, qweight.codes)  # not modified in place


def test_weight_not_modified_and_threads_agree(monkeypatch):
    w = _weight(np.random.default_rng(5), 512, 2100, np.float32)
    before = w.copy()
    threaded, err_threaded = quantize_weight_with_error(w, 4, 32, True)
    monkeypatch.setattr(quantize_module, "_THREADS", 1)
    single, err_single = quantize_weight_with_error(w, 4, 32, True)
    np.testing.assert_array_equal(w, before)
    np.testing.assert_array_equal(threaded.packed_codes(), single.packed_codes())
    assert err_threaded == pytest.approx(err_single, rel=1e-12)


def test_half_down_rounding_is_round_half_up():
    """``floor(v + 0.49999997f)`` is C's roundf for every float32 in [0.25, 4) (all 2**24 of them; below
    0.25 both give 0) and for the halves and their neighbours up to 256."""
    lo, hi = np.float32(0.25).view(np.uint32), np.float32(4.0).view(np.uint32)
    for start in range(int(lo), int(hi), 1 << 22):
        v = np.arange(start, min(start + (1 << 22), int(hi)), dtype=np.uint32).view(np.float32)
        np.testing.assert_array_equal(np.floor(v + ROUNDING_OFFSET), _round_half_up(v.copy()))
    halves = np.arange(0, 256, dtype=np.float32) + np.float32(0.5)
    near = np.concatenate([halves, np.nextafter(halves, 0), np.nextafter(halves, 300), np.float32([0.0, 1e-30])])
    np.testing.assert_array_equal(np.floor(near + ROUNDING_OFFSET), _round_half_up(near.copy()))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("symmetric", [True, False])
def test_non_finite_weight_gives_nan_error(bad, symmetric):
    """The pass skips its separate finiteness pass for RTN and relies on this."""
    w = _weight(np.random.default_rng(9), 96, 40, np.float32)
    w[70, 33] = bad
    assert np.isnan(quantize_weight_with_error(w, 4, 32, symmetric)[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_transposed_view_equals_contiguous(small_tiles, dtype):
    """A ``[K, N]`` view of an ``[N, K]`` array (Gemm transB=1, Transpose->MatMul) gives the same bytes."""
    w = _weight(np.random.default_rng(3), 200, 131, dtype)
    view = np.ascontiguousarray(w.T).T
    assert not view.flags.c_contiguous
    a, err_a = quantize_weight_with_error(view, 4, 32, False)
    b, err_b = quantize_weight_with_error(w, 4, 32, False)
    np.testing.assert_array_equal(a.packed_codes(), b.packed_codes())
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(a.zero_points, b.zero_points)
    assert err_a == pytest.approx(err_b, rel=1e-9)
