"""NF4/FP4 core: Neural Compressor's quantize_4bit transcribed as reference; bnb4 bit-exact vs ORT's packer."""
import numpy as np
import pytest
from onnxruntime.capi._pybind_state import quantize_matmul_bnb4

from onnxq.core.nf4 import (
    FLOAT_MAPPING,
    INT_MAPPING,
    dequantize_bnb4,
    pack_bnb4,
    quant_type_of,
    quantize_4bit,
    quantize_bnb4,
    quantize_weight_bnb4,
    unpack_bnb4,
)


def nc_quantize_4bit_reference(tensor, quantile, data_type, return_int):
    """Neural Compressor's algorithm step by step (float32 throughout, as torch does)."""
    allow = FLOAT_MAPPING[data_type]
    bits = INT_MAPPING[data_type]
    tensor = tensor.astype(np.float32)
    scale = (np.abs(tensor).max(1) * np.float32(quantile) / np.float32(max(allow)))[:, None].astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = tensor / scale
    mid = [np.float32((allow[i] + allow[i + 1]) / 2) for i in range(len(allow) - 1)]
    q = np.zeros_like(t)
    for i in range(len(allow)):
        data = bits[i] if return_int else allow[i]
        if i == 0:
            q += np.where(t <= mid[i], data, 0)
        elif i == len(allow) - 1:
            q += np.where(t > mid[i - 1], data, 0)
        else:
            q += np.where((mid[i - 1] < t) & (t <= mid[i]), data, 0)
    if return_int:
        return q.astype(np.int8), scale
    return q * scale


@pytest.mark.parametrize("data_type", ["nf4", "fp4", "fp4_e2m1"])
@pytest.mark.parametrize("quantile", [1.0, 0.9])
def test_quantize_4bit_matches_neural_compressor(data_type, quantile):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((40, 32)) * rng.uniform(0.01, 5, (40, 1))).astype(np.float32)
    x[3] = 0.0  # all-zero group: NC returns zeros
    table = np.asarray(FLOAT_MAPPING[data_type], dtype=np.float32)
    x[5, :15] = table[:15] / table.max() * np.abs(x[5]).max()  # exact table points
    got = quantize_4bit(x, quantile, data_type)
    np.testing.assert_array_equal(got, nc_quantize_4bit_reference(x, quantile, data_type, False))
    q, scale, zp = quantize_4bit(x, quantile, data_type, return_int=True)
    ref_q, ref_scale = nc_quantize_4bit_reference(x, quantile, data_type, True)
    assert zp is None and q.dtype == np.int8 and scale.shape == (40, 1)
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_array_equal(scale, ref_scale)
    assert not got[3].any()


def test_quantize_4bit_rejects_bad_input():
    with pytest.raises(ValueError, match="data_type"):
        quantize_4bit(np.ones((2, 4)), data_type="int4")
    with pytest.raises(ValueError, match="2-D"):
        quantize_4bit(np.ones(8))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("quant_type", [0, 1])
@pytest.mark.parametrize("k,n,block_size", [(64, 32, 64), (100, 37, 64), (33, 5, 16), (7, 3, 16), (256, 24, 256)])
def test_bnb4_bit_exact_with_ort(dtype, quant_type, k, n, block_size):
    """Blocks span rows of W^T when K % block_size != 0; odd N*K leaves one padding nibble."""
    rng = np.random.default_rng(k * n + quant_type)
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 3)).astype(dtype)
    w[:, 1] = 0.0
    numel = k * n
    packed = np.zeros((numel + 1) // 2, np.uint8)
    absmax = np.zeros(-(-numel // block_size), dtype)
    quantize_matmul_bnb4(packed, np.ascontiguousarray(w.T), absmax, block_size, quant_type, n, k)
    ours = quantize_weight_bnb4(w, quant_type, block_size, dtype)
    np.testing.assert_array_equal(ours.packed, packed)
    np.testing.assert_array_equal(ours.absmax, absmax.astype(np.float32))


def test_bnb4_pack_roundtrip_and_dequant_bounds():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, 101).astype(np.uint8)
    packed = pack_bnb4(codes)
    assert packed.shape == (51,) and packed[0] >> 4 == codes[0] and packed[0] & 15 == codes[1]
    np.testing.assert_array_equal(unpack_bnb4(packed, 101), codes)
    x = rng.standard_normal(4096).astype(np.float32)
    for qt, bound in ((1, 0.12), (0, 0.2)):
        c, am = quantize_bnb4(x, 64, qt)
        deq = dequantize_bnb4(c, am, 64, qt)
        assert np.all(np.abs(deq) <= np.repeat(am, 64) + 0)  # |table| <= 1
        assert np.linalg.norm(deq - x) / np.linalg.norm(x) < bound
        # every block's extreme value is reproduced exactly (table holds +-1)
        idx = np.abs(x.reshape(-1, 64)).argmax(1) + np.arange(0, 4096, 64)
        np.testing.assert_array_equal(deq[idx], x[idx])


def test_quant_type_names():
    assert quant_type_of("NF4") == 1 and quant_type_of("fp4") == 0 and quant_type_of(1) == 1
    with pytest.raises(ValueError):
        quant_type_of("int4")
