"""AutoRound (arXiv 2309.05516) on real all-MiniLM-L6-v2 layers and their recorded inputs.

References: round-to-nearest from :mod:`onnxq.core`; losses recomputed here in float64 straight
from the definition ``||x W - x Q||^2``; the straight-through gradients checked against finite
differences of the function whose derivative the STE defines (rounding residuals, clipped codes
and zero points frozen at the current point), written here independently in float64.
"""
import ml_dtypes
import numpy as np
import pytest

from onnxq import OnnxqError
from onnxq.algorithms import autoround as autoround_module
from onnxq.algorithms.autoround import SteBlockQuantizer, autoround_quantize_weight
from onnxq.core import quantize_blocks, quantize_weight
from tests.real_layers import output_error, real_layer

SETTINGS = [(4, 32, True), (4, 128, False), (3, 64, False)]


def column_losses(x, weight, approx):
    """float64 ``[N]``: ``||x (W - W_hat)[:, n]||^2``."""
    out = x.astype(np.float64) @ (weight.astype(np.float64) - approx.astype(np.float64))
    return (out * out).sum(axis=0)


@pytest.mark.parametrize("layer", ["q", "fc1", "fc2"])
@pytest.mark.parametrize("bits,block_size,symmetric", SETTINGS)
def test_autoround_beats_rtn_on_calibration_and_held_out_rows(layer, bits, block_size, symmetric):
    """Calibrate on rows 0..127, measure on rows 128..255 too (96 output columns of each layer)."""
    w, x = real_layer(layer)
    w = w[:, :96]
    cal, held = x[:128], x[128:]
    res = autoround_quantize_weight(w, cal, bits, block_size, symmetric, steps=40)
    q = res.qweight.dequantize()
    rtn = quantize_weight(w, bits, block_size, symmetric).dequantize()
    assert output_error(cal, w, q) < 0.6 * output_error(cal, w, rtn)
    assert output_error(held, w, q) < 0.95 * output_error(held, w, rtn)


@pytest.mark.parametrize("symmetric,rows", [(True, 100), (False, 100), (False, 256)])
def test_losses_match_direct_computation(symmetric, rows):
    """loss / loss_rtn equal ||x W - x Q||^2 recomputed in float64; no column is worse than RTN;
    loss is below every iterate's loss in the history (per-column best). 100 rows: products with x,
    256 rows (> K / 2): products with x^T x."""
    w, x = real_layer("fc1")
    w, x = w[:, :64], x[:rows]
    res = autoround_quantize_weight(w, x, 4, 64, symmetric, steps=20)
    rtn = quantize_weight(w, 4, 64, symmetric).dequantize()
    ours = column_losses(x, w, res.qweight.dequantize())
    base = column_losses(x, w, rtn)
    assert res.loss == pytest.approx(ours.sum(), rel=1e-4)
    assert res.loss_rtn == pytest.approx(base.sum(), rel=1e-4)
    assert res.loss_history.shape == (21,) and res.loss_history[0] == res.loss_rtn
    assert np.all(ours <= base * (1 + 1e-4))
    assert res.loss <= res.loss_history.min() * (1 + 1e-6)


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_steps_zero_is_rtn_bit_for_bit(symmetric, scale_dtype):
    w, x = real_layer("fc2")
    w, x = w[:200, :40], x[:50, :200]  # K = 200: padded to 256
    res = autoround_quantize_weight(w, x, 4, 64, symmetric, steps=0, scale_dtype=scale_dtype)
    rtn = quantize_weight(w, 4, 64, symmetric, scale_dtype=scale_dtype)
    np.testing.assert_array_equal(res.qweight.codes, rtn.codes)
    np.testing.assert_array_equal(res.qweight.scales, rtn.scales)
    if symmetric:
        assert res.qweight.zero_points is None
    else:
        np.testing.assert_array_equal(res.qweight.zero_points, rtn.zero_points)


def grid_weight(bits, k=256, n=24, block_size=64, seed=0):
    """Weights already on a uniform grid whose ``-min / scale`` and codes sit on exact .5 ties
    (as a dequantized GGUF Q4_1 checkpoint): only the exact rounding reproduces core RTN there."""
    rng = np.random.default_rng(seed)
    levels = (1 << bits) - 1
    step = (rng.random((k // block_size, n)) * 0.02 + 0.001).astype(np.float32)
    zero = rng.integers(0, levels, step.shape) + 0.5
    codes = rng.integers(0, levels + 1, (k, n)).astype(np.float32)
    codes[::block_size], codes[1::block_size] = 0, levels
    return ((codes - zero.repeat(block_size, 0)) * step.repeat(block_size, 0)).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 4])
def test_steps_zero_is_rtn_on_rounding_ties(bits):
    w = grid_weight(bits)
    x = np.random.default_rng(1).standard_normal((16, w.shape[0])).astype(np.float32)
    for symmetric in (False, True):
        res = autoround_quantize_weight(w, x, bits, 64, symmetric, steps=0)
        rtn = quantize_weight(w, bits, 64, symmetric)
        np.testing.assert_array_equal(res.qweight.codes, rtn.codes)
        np.testing.assert_array_equal(res.qweight.effective_zero_points(), rtn.effective_zero_points())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_quantizer_with_clip_factors_is_core_rtn(bits, symmetric):
    """With lo = hi factor r and no offsets, the quantizer is core RTN with clip ratio r, bit for bit."""
    w = real_layer("q")[0][:, :32]
    blocks = w.reshape(6, 64, 32)  # K-major [k_blocks, bs, N]
    ratio = np.linspace(0.5, 1.0, 6 * 32, dtype=np.float32).reshape(6, 32)
    state = SteBlockQuantizer(blocks, bits, symmetric, np.float16).forward(None, ratio, ratio)
    codes, scales, zps = quantize_blocks(blocks, bits, symmetric, ratio, np.float16, axis=1)
    np.testing.assert_array_equal(state.codes.astype(np.uint8), codes)
    np.testing.assert_array_equal(state.scale, scales)
    np.testing.assert_array_equal(state.zero.astype(np.uint8), zps)


def surrogate(v, offsets, alpha, beta, bits, symmetric, frozen):
    """float64 quantize-dequantize of ``v: [kb, bs, n]`` whose derivative is the STE's: rounding
    residuals, clipped codes and zero points are the ones frozen at the reference point."""
    qmax = 2**bits - 1
    vmin, vmax = v.min(axis=1), v.max(axis=1)
    if symmetric:
        extreme = np.where(np.abs(vmax) > np.abs(vmin), vmax, vmin)
        scale = extreme * alpha / -(2 ** (bits - 1))
    else:
        scale = (np.maximum(vmax * beta, 0) - np.minimum(vmin * alpha, 0)) / qmax
    zero, residual, codes, inside = frozen
    smooth = v / scale[:, None, :] + zero[:, None, :] + offsets + residual
    return np.where(inside, smooth, codes) * scale[:, None, :] - zero[:, None, :] * scale[:, None, :]


def freeze(v, offsets, alpha, beta, bits, symmetric):
    qmax = 2**bits - 1
    vmin, vmax = v.min(axis=1), v.max(axis=1)
    if symmetric:
        extreme = np.where(np.abs(vmax) > np.abs(vmin), vmax, vmin)
        scale = extreme * alpha / -(2 ** (bits - 1))
        zero = np.full(scale.shape, 2 ** (bits - 1), np.float64)
    else:
        lo, hi = np.minimum(vmin * alpha, 0), np.maximum(vmax * beta, 0)
        scale = (hi - lo) / qmax
        zero = np.clip(np.floor(-lo / scale + 0.5), 0, qmax)
    u = v / scale[:, None, :] + zero[:, None, :] + offsets
    rounded = np.floor(u + 0.5)
    inside = (rounded >= 0) & (rounded <= qmax)
    return zero, rounded - u, np.clip(rounded, 0, qmax), inside


def central_difference(f, x, index, eps=1e-6):
    e = np.zeros_like(x)
    e[index] = eps
    return (f(x + e) - f(x - e)) / (2 * eps)


@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_gradients_match_finite_differences(symmetric):
    """For the linear loss L = <G, Q>: dL/dV (AutoRound's step direction), dL/d alpha, dL/d beta,
    and dL/dv with unit factors (TEQ) against central differences of the frozen-rounding surrogate."""
    rng = np.random.default_rng(0)
    bits, kb, bs, n = 3, 2, 16, 3
    v = rng.standard_normal((kb, bs, n)).astype(np.float32)
    offsets = rng.uniform(-0.4, 0.4, (kb, bs, n)).astype(np.float32)
    alpha = rng.uniform(0.6, 0.9, (kb, n)).astype(np.float32)
    beta = rng.uniform(0.6, 0.9, (kb, n)).astype(np.float32)
    grad = rng.standard_normal((kb, bs, n)).astype(np.float32)
    v64, off64, a64, b64, g64 = (t.astype(np.float64) for t in (v, offsets, alpha, beta, grad))
    quantizer = SteBlockQuantizer(v, bits, symmetric)

    state = quantizer.forward(offsets, alpha, beta)
    frozen = freeze(v64, off64, a64, b64, bits, symmetric)
    np.testing.assert_array_equal(frozen[2], state.codes)
    assert 0 < state.inside.mean() < 1  # some codes are clipped (alpha, beta < 1)

    def loss(v_, off_, a_, b_):
        return float((g64 * surrogate(v_, off_, a_, b_, bits, symmetric, frozen)).sum())

    through_scale = quantizer.scale_gradient(state, grad)
    d_alpha = through_scale * quantizer.scale_by_lo_factor()
    for index in np.ndindex(kb, n):
        fd = central_difference(lambda a: loss(v64, off64, a, b64), a64, index)
        assert d_alpha[index] == pytest.approx(fd, rel=1e-3, abs=1e-4)
        if not symmetric:
            fd = central_difference(lambda b: loss(v64, off64, a64, b), b64, index)
            assert through_scale[index] * quantizer.scale_by_hi_factor()[index] == pytest.approx(fd, rel=1e-3, abs=1e-4)
    for index in [(0, 3, 1), (1, 7, 2), (1, 0, 0), (0, 11, 0)]:
        fd = central_difference(lambda o: loss(v64, o, a64, b64), off64, index)
        expected = grad[index] * state.scale[index[0], index[2]] * state.inside[index]
        assert expected == pytest.approx(fd, rel=1e-3, abs=1e-5)

    ones = np.ones((kb, n))
    state = quantizer.forward()
    frozen = freeze(v64, 0.0, ones, ones, bits, symmetric)
    np.testing.assert_array_equal(frozen[2], state.codes)
    d_v = quantizer.value_gradient(state, grad)
    for index in np.ndindex(1, bs, n):  # every element of the first block row, extremes included
        fd = central_difference(lambda x: float((g64 * surrogate(x, 0.0, ones, ones, bits, symmetric, frozen)).sum()),
                                v64, index)
        assert d_v[index] == pytest.approx(fd, rel=1e-3, abs=1e-4)


def test_padded_k_and_several_column_chunks(monkeypatch):
    """K = 200 (block 64: padded to 256) and a chunk size that splits N = 70 into 3 chunks."""
    monkeypatch.setattr(autoround_module, "_CHUNK_ELEMENTS", 256 * 30)
    w, x = real_layer("fc2")
    w, x = w[:200, :70], x[:120, :200]
    res = autoround_quantize_weight(w, x, 4, 64, False, steps=15)
    assert res.qweight.codes.shape == (70, 4, 64) and res.qweight.k == 200
    ours = column_losses(x, w, res.qweight.dequantize())
    base = column_losses(x, w, quantize_weight(w, 4, 64, False).dequantize())
    assert res.loss == pytest.approx(ours.sum(), rel=1e-4)
    assert np.all(ours <= base * (1 + 1e-4)) and ours.sum() < 0.7 * base.sum()


def test_mini_batches():
    """Seeded row sampling: same seed, same result; batch_size >= T is the full batch; the loss is
    evaluated on all rows every ceil(T / batch_size) steps (NaN elsewhere) and still never above RTN."""
    w, x = real_layer("fc1")
    w, x = w[:, :48], x[:100]
    a = autoround_quantize_weight(w, x, 4, 64, False, steps=12, batch_size=30, seed=3)
    b = autoround_quantize_weight(w, x, 4, 64, False, steps=12, batch_size=30, seed=3)
    c = autoround_quantize_weight(w, x, 4, 64, False, steps=12, batch_size=30, seed=4)
    np.testing.assert_array_equal(a.qweight.codes, b.qweight.codes)
    assert not np.array_equal(a.loss_history, c.loss_history, equal_nan=True)
    evaluated = np.isfinite(a.loss_history)
    np.testing.assert_array_equal(np.flatnonzero(evaluated), [0, 4, 8, 12])
    ours = column_losses(x, w, a.qweight.dequantize())
    base = column_losses(x, w, quantize_weight(w, 4, 64, False).dequantize())
    assert a.loss == pytest.approx(ours.sum(), rel=1e-4) and a.loss_rtn == pytest.approx(base.sum(), rel=1e-4)
    assert np.all(ours <= base * (1 + 1e-4)) and a.loss < 0.8 * a.loss_rtn
    full = autoround_quantize_weight(w, x, 4, 64, False, steps=12)
    same = autoround_quantize_weight(w, x, 4, 64, False, steps=12, batch_size=100, seed=9)
    np.testing.assert_array_equal(full.qweight.codes, same.qweight.codes)
    np.testing.assert_array_equal(full.loss_history, same.loss_history)


def test_deterministic_and_inputs_untouched():
    w, x = real_layer("q")
    w, x = w[:, :32].copy(), x[:64].copy()
    copies = w.copy(), x.copy()
    a = autoround_quantize_weight(w, x, 4, 32, True, steps=10)
    b = autoround_quantize_weight(w, x, 4, 32, True, steps=10)
    np.testing.assert_array_equal(a.qweight.codes, b.qweight.codes)
    np.testing.assert_array_equal(a.loss_history, b.loss_history)
    np.testing.assert_array_equal(w, copies[0])
    np.testing.assert_array_equal(x, copies[1])


def test_bad_inputs_raise_onnxq_error():
    w = np.ones((64, 8), np.float32)
    x = np.ones((10, 64), np.float32)
    with pytest.raises(OnnxqError, match=r"\[T, K=64\]"):
        autoround_quantize_weight(w, np.ones((10, 32), np.float32))
    with pytest.raises(OnnxqError, match="steps"):
        autoround_quantize_weight(w, x, steps=-1)
    with pytest.raises(OnnxqError, match="lr"):
        autoround_quantize_weight(w, x, lr=0.0)
    with pytest.raises(OnnxqError, match="batch_size"):
        autoround_quantize_weight(w, x, batch_size=0)
    with pytest.raises(OnnxqError, match="bits"):
        autoround_quantize_weight(w, x, bits=1)
    with pytest.raises(OnnxqError, match="finite"):
        autoround_quantize_weight(w, np.full((10, 64), np.inf, np.float32))
