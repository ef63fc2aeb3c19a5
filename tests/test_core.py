"""The numpy quant core: packing round trips, quant_tensor/qdq_tensor semantics, error bounds, clip search."""
import numpy as np
import pytest

from onnxq.core import (
    pack_bits,
    pack_zero_points,
    pad_tensor,
    qdq_tensor,
    quant_tensor,
    quantize_blocks,
    quantize_weight,
    quantize_weight_with_error,
    quantize_with_params,
    search_clip,
    unpack_bits,
    unpack_zero_points,
    weight_to_blocks,
)
from onnxq.core.quantize import relative_error


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("length", [1, 3, 4, 7, 32, 33])
def test_pack_unpack_round_trip(bits, length):
    codes = np.random.default_rng(bits + length).integers(0, 1 << bits, size=(5, 3, length), dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, 3, -(-length * bits // 8))
    np.testing.assert_array_equal(unpack_bits(packed, bits, length), codes)


def test_pack_layout_is_lsb_first():
    assert pack_bits(np.array([1, 2], np.uint8), 4).tolist() == [0x21]
    assert pack_bits(np.array([1, 2, 3, 0], np.uint8), 2).tolist() == [0b00111001]
    assert pack_zero_points(np.array([[5]], np.uint8), 4).tolist() == [[0x85]]  # unused slot = 8
    np.testing.assert_array_equal(unpack_zero_points(pack_zero_points(np.array([[1, 2, 3]], np.uint8), 2), 2, 3), [[1, 2, 3]])


def test_pad_tensor():
    w = np.ones((5, 3), np.float32)
    padded = pad_tensor(w, 4, 2)
    assert padded.shape == (8, 3) and padded[5:].sum() == 0 and padded[:5].sum() == 15
    assert pad_tensor(w, -1, 1) is w
    with pytest.raises(ValueError):
        pad_tensor(w, 2, 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_within_half_step(bits, symmetric):
    """Asymmetric: every element within half a step of its block. Symmetric full range maps the
    largest magnitude to -2^(b-1), so the opposite end can be clipped by up to one step."""
    w = np.random.default_rng(bits).standard_normal((256, 16)).astype(np.float32)
    qw = quantize_weight(w, bits, 32, symmetric)
    steps = np.abs(qw.scales)  # [N, k_blocks]
    err = np.abs(qw.dequantize() - w).T.reshape(16, 8, 32)
    bound = 1.0 if symmetric else 0.5
    assert (err <= steps[..., None] * bound * (1 + 1e-5)).all()
    if bits >= 4:  # clipping at the far end is rare
        assert (err <= steps[..., None] * 0.5 * (1 + 1e-5)).mean() > 0.99


def test_symmetric_uses_full_range():
    """The block's largest-magnitude value maps to code 0 (i.e. -2^(b-1)) exactly."""
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    qw = quantize_weight(w, 4, 32, True)
    blocks = weight_to_blocks(w, 32)
    extreme_at = np.abs(blocks).argmax(-1)
    codes_at = np.take_along_axis(qw.codes, extreme_at[..., None], -1)[..., 0]
    assert (codes_at == 0).all()
    np.testing.assert_allclose(np.take_along_axis(qw.dequantize_blocks(), extreme_at[..., None], -1)[..., 0],
                               np.take_along_axis(blocks, extreme_at[..., None], -1)[..., 0], rtol=1e-6)


def test_quant_tensor_signature_and_semantics():
    data = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    q, scale, zp = quant_tensor(data)  # defaults: 4 bits, group 32, asym, int
    assert q.shape == (16, 32) and scale.shape == (16, 1) and zp.shape == (16, 1) and q.dtype == np.uint8
    assert q.max() <= 15
    np.testing.assert_allclose((q - zp.astype(np.float32)) * scale, data.reshape(16, 32), atol=float(scale.max()) / 2 + 1e-7)
    qs, ss, zs = quant_tensor(data, scheme="sym")
    assert qs.dtype == np.int8 and qs.min() >= -8 and qs.max() <= 7 and not zs.any()
    np.testing.assert_array_equal(qdq_tensor(data, scheme="sym"), (qs * ss).reshape(data.shape))
    per_row = quant_tensor(data, group_size=-1)[0]
    assert per_row.shape == (8, 64)


def test_ratio_clips_the_range():
    data = np.linspace(-1, 1, 32, dtype=np.float32)
    step = 1.0 / 15  # range [-0.5, 0.5] over 15 steps; the zero point rounds by up to half a step
    restored = qdq_tensor(data, 4, 32, "asym", ratio=0.5)
    assert np.abs(restored).max() <= 0.5 + step / 2 + 1e-6
    assert np.abs(qdq_tensor(data, 4, 32, "asym")).max() > 0.9


def test_quantize_with_params_reproduces_codes():
    blocks = np.random.default_rng(2).standard_normal((10, 4, 32)).astype(np.float32)
    for symmetric in (True, False):
        codes, scales, zps = quantize_blocks(blocks, 4, symmetric, 1.0, np.float16)
        np.testing.assert_array_equal(quantize_with_params(blocks, scales, zps, 4), codes)


def test_mse_clip_never_worse_and_helps_on_outliers():
    rng = np.random.default_rng(3)
    w = rng.standard_t(df=2, size=(512, 64)).astype(np.float32)
    plain = relative_error(w, quantize_weight(w, 4, 128, True))
    clipped = relative_error(w, quantize_weight(w, 4, 128, True, mse_clip=True))
    assert clipped < plain * 0.97
    ratio = search_clip(w, 4, 128, "sym")
    assert 0.8 <= ratio <= 1.0


def test_per_channel_and_padded_k():
    w = np.random.default_rng(4).standard_normal((100, 7)).astype(np.float32)
    qw = quantize_weight(w, 8, -1, False)
    assert qw.codes.shape == (7, 1, 100) and qw.dequantize().shape == (100, 7)
    assert relative_error(w, qw) < 0.01
    padded = quantize_weight(w, 4, 32, True)
    assert padded.codes.shape == (7, 4, 32) and padded.dequantize().shape == (100, 7)


def test_inputs_are_not_modified():
    w = np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32)
    before = w.copy()
    quantize_weight(w, 4, 32, False, mse_clip=True)
    qdq_tensor(w)
    np.testing.assert_array_equal(w, before)


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(block_size=0)])
def test_bad_parameters(bad):
    with pytest.raises(ValueError):
        quantize_weight(np.ones((32, 2), np.float32), **bad)


@pytest.mark.parametrize("k,block_size,symmetric", [(256, 32, True), (100, 32, False), (1100, 128, True), (64, -1, False)])
def test_fused_error_equals_relative_error(k, block_size, symmetric):
    w = np.random.default_rng(k).standard_normal((k, 1100)).astype(np.float32)  # > one column chunk
    qw, err = quantize_weight_with_error(w, 4, block_size, symmetric)
    direct = np.linalg.norm(qw.dequantize().astype(np.float64) - w) / np.linalg.norm(w)
    assert err == pytest.approx(direct, rel=1e-5)
    assert relative_error(w, qw) == pytest.approx(direct, rel=1e-5)
    np.testing.assert_array_equal(qw.codes, quantize_weight(w, 4, block_size, symmetric).codes)
