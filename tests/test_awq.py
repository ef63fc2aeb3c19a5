"""AWQ solvers (arXiv 2306.00978) on real all-MiniLM-L6-v2 layers and their recorded inputs.

Losses are recomputed here directly (``x @ W - (x / s) @ Q(s W)``, per-block products with
the raw ``x``) and compared with the solvers' numbers, which go through Gram matrices; the
quantized result is compared with round-to-nearest from :mod:`onnxq.core`.
"""
import numpy as np
import pytest

from onnxq import OnnxqError
from onnxq.algorithms import AWQ_CLIP_RATIOS, awq_clip_search, awq_quantize_weights, awq_scales, awq_search_scale
from onnxq.algorithms.awq import awq_weight_mean
from onnxq.core import QuantizedWeight, quantize_blocks, quantize_weight, weight_to_blocks
from tests.real_layers import output_error, real_layer, real_siblings

SETTINGS = [(4, 32, True), (4, 32, False), (4, 128, True), (4, 128, False)]


def rtn(weight, bits, block_size, symmetric):
    return quantize_weight(weight, bits, block_size, symmetric).dequantize()


def awq_effective(result, i):
    """The float weight the AWQ-quantized layer ``i`` applies to the unscaled input."""
    return result.qweights[i].dequantize() / result.scales[:, None]


def direct_loss(weights, x, s, bits, block_size, symmetric):
    """``sum_i ||x W_i - (x / s) Q(s W_i)||^2`` in float64, straight from the definition."""
    total = 0.0
    x64 = x.astype(np.float64)
    xs = (x / s).astype(np.float64)
    for w in weights:
        diff = x64 @ w.astype(np.float64) - xs @ rtn(s[:, None] * w, bits, block_size, symmetric).astype(np.float64)
        total += float(np.vdot(diff, diff))
    return total


def block_output_errors(x, weight, qweight):
    """``[N, k_blocks]``: ``||x_b @ (w_b - q_b)||^2`` per output column and K-block, directly."""
    bs = qweight.block_size
    w_blocks = weight_to_blocks(weight, bs)
    x_blocks = weight_to_blocks(x.T, bs)  # [T, k_blocks, bs]
    diff = (w_blocks - qweight.dequantize_blocks()).astype(np.float64)
    out = np.einsum("tbi,nbi->tnb", x_blocks.astype(np.float64), diff)
    return np.einsum("tnb,tnb->nb", out, out)


@pytest.mark.parametrize("bits,block_size,symmetric", SETTINGS)
def test_awq_beats_rtn_on_attention_siblings(bits, block_size, symmetric):
    """q/k/v share one scale; each layer's output error (calibration rows) is below RTN's,
    and so is the held-out error when calibrating on half the rows."""
    weights, x = real_siblings()
    res = awq_quantize_weights(weights, x, np.abs(x).mean(0), bits, block_size, symmetric)
    total_awq = sum(output_error(x, w, awq_effective(res, i)) for i, w in enumerate(weights))
    total_rtn = sum(output_error(x, w, rtn(w, bits, block_size, symmetric)) for w in weights)
    assert total_awq < 0.95 * total_rtn
    half = len(x) // 2
    held = awq_quantize_weights(weights, x[:half], np.abs(x[:half]).mean(0), bits, block_size, symmetric)
    held_awq = sum(output_error(x[half:], w, awq_effective(held, i)) for i, w in enumerate(weights))
    held_rtn = sum(output_error(x[half:], w, rtn(w, bits, block_size, symmetric)) for w in weights)
    assert held_awq < held_rtn


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
@pytest.mark.parametrize("bits,block_size,symmetric", SETTINGS)
def test_awq_beats_rtn_on_mlp(layer, bits, block_size, symmetric):
    w, x = real_layer(layer)
    res = awq_quantize_weights([w], x, np.abs(x).mean(0), bits, block_size, symmetric)
    assert output_error(x, w, awq_effective(res, 0)) < 0.95 * output_error(x, w, rtn(w, bits, block_size, symmetric))


@pytest.mark.parametrize("symmetric", [True, False])
def test_search_losses_match_direct_computation(symmetric):
    """loss_by_alpha (computed through x or its Gram matrix) equals the definition, for T < K and
    for T > K (Gram path); alpha = 0 is plain RTN; the chosen alpha has the lowest loss."""
    weights, x = real_siblings()
    act = np.abs(x).mean(0)
    tall = np.concatenate([x, 0.5 * x[::-1] + 0.1 * x])  # T = 512 > K = 384
    for sample in (x, tall):
        res = awq_search_scale(weights, sample, act, 4, 32, symmetric, grid=5)
        alphas = np.linspace(0, 1, 5)
        direct = [direct_loss(weights, sample, awq_scales(act, a), 4, 32, symmetric) for a in alphas]
        np.testing.assert_allclose(res.loss_by_alpha, direct, rtol=1e-4)
        ones = np.ones(len(act), np.float32)
        assert res.loss_rtn == pytest.approx(direct_loss(weights, sample, ones, 4, 32, symmetric), rel=1e-4)
        assert res.alpha == alphas[int(np.argmin(res.loss_by_alpha))]
        assert res.alpha > 0 and min(res.loss_by_alpha) < res.loss_rtn
        np.testing.assert_array_equal(res.scales, awq_scales(act, res.alpha))


def test_alpha_zero_reproduces_rtn_exactly():
    weights, x = real_siblings()
    act = np.abs(x).mean(0)
    np.testing.assert_array_equal(awq_scales(act, 0.0), np.ones(len(act), np.float32))
    res = awq_quantize_weights(weights, x, act, 4, 32, False, grid=1, clip=False)
    assert res.search.alpha == 0.0
    for w, qw in zip(weights, res.qweights):
        ref = quantize_weight(w, 4, 32, False)
        np.testing.assert_array_equal(qw.codes, ref.codes)
        np.testing.assert_array_equal(qw.scales, ref.scales)
        np.testing.assert_array_equal(qw.zero_points, ref.zero_points)


def test_scales_normalisation():
    """s = a**alpha / sqrt(max * min), with a**alpha clamped to >= 1e-4 (dead channels)."""
    act = np.array([0.0, 0.5, 2.0, 8.0], np.float32)
    s = awq_scales(act, 0.5)
    powered = np.maximum(act.astype(np.float64) ** 0.5, 1e-4)
    np.testing.assert_allclose(s, powered / np.sqrt(powered.max() * powered.min()), rtol=1e-6)
    assert s.max() * s.min() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [32, 128])
def test_clip_search_picks_best_ratio_per_block(symmetric, block_size):
    """Per (column, block) the chosen ratio's output error is the minimum over all ratios
    (brute force, straight from the definition), hence never above RTN's."""
    w, x = real_layer("fc1")
    w = w[:, :64]
    qw = awq_clip_search(w, x, 4, block_size, symmetric)
    chosen = block_output_errors(x, w, qw)
    blocks = weight_to_blocks(w, block_size)
    per_ratio = []
    for r in AWQ_CLIP_RATIOS:
        codes, scales, zps = quantize_blocks(blocks, 4, symmetric, r)
        candidate = QuantizedWeight(codes, scales, None if symmetric else zps, 4, block_size, w.shape[0])
        per_ratio.append(block_output_errors(x, w, candidate))
    best = np.min(per_ratio, axis=0)
    np.testing.assert_allclose(chosen, best, rtol=1e-3)
    assert np.all(chosen <= per_ratio[0] * (1 + 1e-4))  # ratio 1.0 is RTN
    assert np.mean(chosen < per_ratio[0] * (1 - 1e-3)) > 0.1  # clipping helps a real share of blocks
    assert output_error(x, w, qw.dequantize()) < output_error(x, w, rtn(w, 4, block_size, symmetric))


def test_clip_search_padded_k_and_chunked_n():
    """K = 200 (padded to 224 for block 32) and N = 1536 (several column chunks)."""
    w, x = real_layer("fc1")
    w, x = w[:200], x[:, :200]
    qw = awq_clip_search(w, x, 4, 32, False)
    assert qw.k == 200 and qw.codes.shape == (1536, 7, 32)
    rtn_q = quantize_weight(w, 4, 32, False)
    assert np.all(block_output_errors(x, w, qw) <= block_output_errors(x, w, rtn_q) * (1 + 1e-4))


def test_clip_search_on_a_gram_matrix():
    """``gram=`` (GPTQ's Hessian, any positive multiple of x^T x) in place of x: the same objective, so the same
    scales (up to float rounding near ties) at K = 200 padded to block 32; exactly one of x, gram."""
    w, x = real_layer("fc1")
    w, x = w[:200, :256], x[:, :200]
    from_x = awq_clip_search(w, x, 4, 32, True)
    x64 = x.astype(np.float64)
    from_gram = awq_clip_search(w, None, 4, 32, True, gram=2.0 / len(x) * x64.T @ x64)
    assert np.isclose(from_gram.scales, from_x.scales, rtol=1e-6).mean() > 0.99
    with pytest.raises(OnnxqError, match="exactly one of them"):
        awq_clip_search(w, x, 4, 32, True, gram=x64.T @ x64)
    with pytest.raises(OnnxqError, match="exactly one of them"):
        awq_clip_search(w, None, 4, 32, True)
    with pytest.raises(OnnxqError, match=r"Gram matrix of shape \[K=200, K\]"):
        awq_clip_search(w, None, 4, 32, True, gram=np.eye(100))


def test_scaled_weights_are_what_is_quantized():
    """Each returned QuantizedWeight is the clip-searched quantization of s * W_i on input x / s."""
    weights, x = real_siblings()
    act = np.abs(x).mean(0)
    res = awq_quantize_weights(weights, x, act, 4, 32, True, grid=4)
    for w, qw in zip(weights, res.qweights):
        again = awq_clip_search(res.scales[:, None] * w, x / res.scales, 4, 32, True)
        np.testing.assert_array_equal(qw.codes, again.codes)
        np.testing.assert_array_equal(qw.scales, again.scales)


def test_deterministic_and_inputs_untouched():
    weights, x = real_siblings()
    act = np.abs(x).mean(0)
    copies = [w.copy() for w in weights], x.copy(), act.copy()
    a = awq_quantize_weights(weights, x, act, 4, 128, False, grid=6)
    b = awq_quantize_weights(weights, x, act, 4, 128, False, grid=6)
    np.testing.assert_array_equal(a.scales, b.scales)
    for qa, qb in zip(a.qweights, b.qweights):
        np.testing.assert_array_equal(qa.codes, qb.codes)
    for w, w0 in zip(weights, copies[0]):
        np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(x, copies[1])
    np.testing.assert_array_equal(act, copies[2])


def test_bad_inputs_raise_onnxq_error():
    w = np.ones((64, 8), np.float32)
    x = np.ones((10, 64), np.float32)
    with pytest.raises(OnnxqError, match=r"\[T, K=64\]"):
        awq_search_scale([w], np.ones((10, 32), np.float32), np.ones(64), 4, 32)
    with pytest.raises(OnnxqError, match="act_mean_abs"):
        awq_search_scale([w], x, np.ones(63), 4, 32)
    with pytest.raises(OnnxqError, match=r"\[K=64, N\]"):
        awq_search_scale([w, np.ones((32, 8), np.float32)], x, np.ones(64), 4, 32)
    with pytest.raises(OnnxqError, match="clip ratios"):
        awq_clip_search(w, x, 4, 32, ratios=(1.0, 1.5))
    with pytest.raises(OnnxqError, match="at least one weight"):
        awq_search_scale([], x, np.ones(64), 4, 32)


def test_wide_weight_scale_search_on_a_column_subset():
    """An lm_head-like weight (many columns) is scored on a column subset: same choice, far less work."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((256, 64)) * np.exp(rng.normal(0, 1, 64))).astype(np.float32)
    w = rng.standard_normal((64, 4096)).astype(np.float32)
    mean_abs = np.abs(x).mean(0)
    full = awq_search_scale([w], x, mean_abs, 4, 32, True, grid=6, max_columns=None)
    sub = awq_search_scale([w], x, mean_abs, 4, 32, True, grid=6, max_columns=1024)
    assert sub.alpha == full.alpha
    np.testing.assert_allclose(sub.loss_by_alpha, full.loss_by_alpha, rtol=0.1)


def autoawq_w_mean(weights, group_size):
    """AutoAWQ's ``w_mean`` from its own [out, in] layout: ``|w| / max |w|`` per group of ``group_size``
    input channels of each output row, then the mean over all output rows of the siblings."""
    stacked = np.concatenate([w.T for w in weights]).astype(np.float64)  # [sum N_i, K]
    groups = np.abs(stacked).reshape(-1, group_size)
    normalized = groups / (groups.max(axis=1, keepdims=True) + 1e-6)
    return normalized.reshape(stacked.shape).mean(axis=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_duo_scaling_search_against_the_definitions(symmetric):
    """Duo scaling (AutoAWQ): w_mean as AutoAWQ computes it, each alpha's loss as the definition gives it
    for s = a**alpha / w_mean**(1 - alpha), alpha = 0 plain RTN (so never worse than RTN on the
    objective), and on these real q/k/v layers a lower loss than RTN."""
    weights, x = real_siblings()
    act = np.abs(x).mean(0)
    w_mean = awq_weight_mean(weights, 32)
    np.testing.assert_allclose(w_mean, autoawq_w_mean(weights, 32), rtol=1e-5)
    res = awq_search_scale(weights, x, act, 4, 32, symmetric, grid=5, duo_scaling=True)
    alphas = np.linspace(0, 1, 5)
    duo = [np.ones(len(act)) if a == 0 else
           np.maximum(act.astype(np.float64) ** a / (w_mean ** (1 - a) + 1e-4), 1e-4) for a in alphas]
    duo = [(s / np.sqrt(s.max() * s.min())).astype(np.float32) for s in duo]
    direct = [direct_loss(weights, x, s, 4, 32, symmetric) for s in duo]
    np.testing.assert_allclose(res.loss_by_alpha, direct, rtol=1e-4)
    assert res.loss_rtn == res.loss_by_alpha[0] and min(res.loss_by_alpha) < res.loss_rtn
    np.testing.assert_array_equal(res.scales, duo[int(np.argmin(res.loss_by_alpha))])


def test_duo_scaling_in_the_config():
    """``awq.duo_scaling`` is read from a config and checked (a bool)."""
    from onnxq import QuantConfig
    assert QuantConfig.from_dict({"awq": {"duo_scaling": True}}).awq.duo_scaling is True
    with pytest.raises(OnnxqError):
        QuantConfig.from_dict({"awq": {"duo_scaling": "yes"}})
