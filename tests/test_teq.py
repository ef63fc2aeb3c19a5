"""TEQ (trainable equivalent transformation) on real all-MiniLM-L6-v2 layers and their recorded inputs.

References: round-to-nearest from :mod:`onnxq.core`; losses recomputed in float64 from the
definition ``sum_i ||x W_i - (x / s) Q(s W_i)||^2``; the gradient checked against finite
differences of the frozen-rounding function whose derivative the straight-through estimator is,
written here independently in float64.
"""
import numpy as np
import pytest

from onnxq import OnnxqError
from onnxq.algorithms import teq as teq_module
from onnxq.algorithms.autoround import OutputErrorOperator
from onnxq.algorithms.teq import _loss_and_gradient, teq_quantize_weights
from onnxq.core import quantize_weight
from tests.real_layers import output_error, real_layer, real_siblings

SETTINGS = [(4, 32, True), (4, 128, False), (3, 64, False)]


def cases():
    weights, x = real_siblings()
    yield "qkv", [w[:, :48] for w in weights], x
    for name in ("fc1", "fc2"):
        w, x = real_layer(name)
        yield name, [w[:, :96]], x


def direct_loss(weights, x, s, qweights):
    """``sum_i ||x W_i - (x / s) Q_i||^2`` in float64."""
    x64 = x.astype(np.float64)
    xs = x64 / s.astype(np.float64)
    total = 0.0
    for w, qw in zip(weights, qweights):
        diff = x64 @ w.astype(np.float64) - xs @ qw.dequantize().astype(np.float64)
        total += float(np.vdot(diff, diff))
    return total


@pytest.mark.parametrize("case", ["qkv", "fc1", "fc2"])
@pytest.mark.parametrize("bits,block_size,symmetric", SETTINGS)
def test_teq_beats_rtn_on_calibration_and_held_out_rows(case, bits, block_size, symmetric):
    """Calibrate on rows 0..127 (siblings share one scale vector); the summed output error of the
    layers on the held-out rows 128..255 is below RTN's too."""
    name, weights, x = next(c for c in cases() if c[0] == case)
    cal, held = x[:128], x[128:]
    res = teq_quantize_weights(weights, cal, bits, block_size, symmetric, steps=20, lr=0.02)
    assert res.loss < 0.95 * res.loss_rtn
    teq_total = rtn_total = 0.0
    for w, qw in zip(weights, res.qweights):
        teq_total += output_error(held, w, qw.dequantize() / res.scales[:, None])
        rtn_total += output_error(held, w, quantize_weight(w, bits, block_size, symmetric).dequantize())
    assert teq_total < 0.97 * rtn_total


@pytest.mark.parametrize("symmetric,chunk_elements", [(True, None), (False, None), (False, 384 * 20)])
def test_losses_match_direct_computation(symmetric, chunk_elements, monkeypatch):
    """Also with column chunks of 20 that span two sibling weights (48 columns each)."""
    if chunk_elements:
        monkeypatch.setattr(teq_module, "_CHUNK_ELEMENTS", chunk_elements)
    weights, x = real_siblings()
    weights, x = [w[:, :48] for w in weights], x[:96]
    res = teq_quantize_weights(weights, x, 4, 64, symmetric, steps=12)
    assert res.scales.shape == (384,) and res.scales.dtype == np.float32 and np.all(res.scales > 0)
    assert res.loss == pytest.approx(direct_loss(weights, x, res.scales, res.qweights), rel=1e-4)
    rtn = [quantize_weight(w, 4, 64, symmetric) for w in weights]
    assert res.loss_rtn == pytest.approx(direct_loss(weights, x, np.ones(384, np.float32), rtn), rel=1e-4)
    assert res.loss_history.shape == (13,) and res.loss_history[0] == res.loss_rtn
    assert res.loss == res.loss_history.min() < res.loss_rtn
    for w, qw in zip(weights, res.qweights):  # what is returned is RTN of s * W
        again = quantize_weight(res.scales[:, None] * w, 4, 64, symmetric)
        np.testing.assert_array_equal(qw.codes, again.codes)
        np.testing.assert_array_equal(qw.scales, again.scales)


def frozen_loss(weights, x, s, s0, bits, bs):
    """Asymmetric ``L(s)`` with the rounding residuals, clipped codes and zero points frozen at ``s0``."""
    qmax = 2**bits - 1
    total = 0.0
    for w in weights:
        k, n = w.shape

        def parts(scale_vec):
            v = (scale_vec[:, None] * w).reshape(k // bs, bs, n)
            lo, hi = np.minimum(v.min(axis=1), 0), np.maximum(v.max(axis=1), 0)
            return v, (hi - lo) / qmax, lo

        v0, step0, lo0 = parts(s0)
        zero = np.clip(np.floor(-lo0 / step0 + 0.5), 0, qmax)[:, None, :]
        u0 = v0 / step0[:, None, :] + zero
        rounded = np.floor(u0 + 0.5)
        inside = (rounded >= 0) & (rounded <= qmax)
        v, step, _ = parts(s)
        codes = np.where(inside, v / step[:, None, :] + zero + (rounded - u0), np.clip(rounded, 0, qmax))
        effective = ((codes - zero) * step[:, None, :]).reshape(k, n) / s[:, None]
        diff = x @ (w - effective)
        total += float(np.vdot(diff, diff))
    return total


def test_gradient_matches_finite_differences():
    """dL/d log s of the solver against central differences of the frozen-rounding surrogate."""
    rng = np.random.default_rng(1)
    k, bs, bits = 48, 16, 3
    weights = [rng.standard_normal((k, 20)).astype(np.float32), rng.standard_normal((k, 7)).astype(np.float32)]
    x = (rng.standard_normal((30, k)) * rng.uniform(0.2, 3, k)).astype(np.float32)
    s = np.exp(rng.uniform(-0.3, 0.3, k)).astype(np.float32)
    loss, grad = _loss_and_gradient(weights, s, OutputErrorOperator(x, k), bits, bs, False, np.float32)
    w64, x64, s64 = [w.astype(np.float64) for w in weights], x.astype(np.float64), s.astype(np.float64)
    assert loss == pytest.approx(frozen_loss(w64, x64, s64, s64, bits, bs), rel=1e-4)
    eps = 1e-6
    for i in range(0, k, 5):
        e = np.zeros(k)
        e[i] = eps
        up = frozen_loss(w64, x64, s64 * np.exp(e), s64, bits, bs)
        down = frozen_loss(w64, x64, s64 * np.exp(-e), s64, bits, bs)
        assert grad[i] == pytest.approx((up - down) / (2 * eps), rel=2e-3, abs=1e-3 * abs(grad).max())


def test_steps_zero_is_rtn():
    weights, x = real_siblings()
    weights = [w[:, :32] for w in weights]
    res = teq_quantize_weights(weights, x[:64], 4, 32, False, steps=0)
    np.testing.assert_array_equal(res.scales, np.ones(384, np.float32))
    for w, qw in zip(weights, res.qweights):
        rtn = quantize_weight(w, 4, 32, False)
        np.testing.assert_array_equal(qw.codes, rtn.codes)
        np.testing.assert_array_equal(qw.zero_points, rtn.zero_points)


def test_deterministic_and_inputs_untouched():
    w, x = real_layer("fc2")
    w, x = w[:200, :40].copy(), x[:64, :200].copy()  # K = 200: padded blocks
    copies = w.copy(), x.copy()
    a = teq_quantize_weights([w], x, 4, 64, True, steps=6)
    b = teq_quantize_weights([w], x, 4, 64, True, steps=6)
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(a.qweights[0].codes, b.qweights[0].codes)
    assert a.qweights[0].k == 200 and a.qweights[0].codes.shape == (40, 4, 64)
    np.testing.assert_array_equal(w, copies[0])
    np.testing.assert_array_equal(x, copies[1])


def test_bad_inputs_raise_onnxq_error():
    w = np.ones((64, 8), np.float32)
    x = np.ones((10, 64), np.float32)
    with pytest.raises(OnnxqError, match="at least one weight"):
        teq_quantize_weights([], x)
    with pytest.raises(OnnxqError, match=r"\[K=64, N\]"):
        teq_quantize_weights([w, np.ones((32, 8), np.float32)], x)
    with pytest.raises(OnnxqError, match=r"\[T, K=64\]"):
        teq_quantize_weights([w], np.ones((10, 32), np.float32))
    with pytest.raises(OnnxqError, match="lr"):
        teq_quantize_weights([w], x, lr=-1.0)
    with pytest.raises(OnnxqError, match="steps"):
        teq_quantize_weights([w], x, steps=2.5)
