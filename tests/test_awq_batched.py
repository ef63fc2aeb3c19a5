"""AWQ's batched searches (arXiv 2306.00978): every candidate through one Gram matrix, same choices as the definition.

The solvers evaluate all alphas (or all clip ratios of a column chunk) of a weight in one or a few
matrix products through ``G = x^T x`` (or ``x`` itself when it has fewer rows). Checked here on real
all-MiniLM-L6-v2 layers against float64 losses computed straight from the definition, for every
route (Gram, rows, Gram blocks from ``G``, from ``x``, blocks of ``x``), and independent of how the
candidates are batched or threaded.
"""
import logging

import numpy as np
import pytest

from onnxq.algorithms import AWQ_CLIP_RATIOS, awq_clip_search, awq_quantize_weights, awq_scales, awq_search_scale
from onnxq.algorithms import awq as awq_module
from onnxq.core import quantize_blocks, quantize_weight, weight_to_blocks
from tests.real_layers import real_layer, real_siblings


def tall(x):
    """A sample with more rows than channels (T = 2.5 K), so the Gram route is taken."""
    return np.concatenate([x, 0.5 * x[::-1] + 0.1 * x, x[::2] - 0.3 * x[1::2], 0.7 * x[::-1]])


def definition_loss(weights, x, s, bits, bs, symmetric):
    """``sum_i ||x W_i - (x / s) Q(s W_i)||^2`` in float64."""
    x64, xs = x.astype(np.float64), (x / s).astype(np.float64)
    total = 0.0
    for w in weights:
        deq = quantize_weight(s[:, None] * w, bits, bs, symmetric).dequantize().astype(np.float64)
        diff = x64 @ w.astype(np.float64) - xs @ deq
        total += float(np.vdot(diff, diff))
    return total


def block_errors(x, weight, deq_blocks):
    """``[N, k_blocks]``: ``||x_b (w_b - q_b)||^2`` in float64 (``deq_blocks: [N, k_blocks, bs]``)."""
    bs = deq_blocks.shape[2]
    diff = (deq_blocks - weight_to_blocks(weight, bs)).astype(np.float64)
    out = np.einsum("tbi,nbi->tnb", weight_to_blocks(x.T, bs).astype(np.float64), diff)
    return np.einsum("tnb,tnb->nb", out, out)


def definition_block_errors(x, weight, bits, bs, symmetric, ratio):
    """``[N, k_blocks]``: ``||x_b (w_b - Q_r(w_b))||^2`` in float64."""
    codes, scales, zps = quantize_blocks(weight_to_blocks(weight, bs), bits, symmetric, ratio)
    return block_errors(x, weight, (codes.astype(np.float32) - zps[..., None]) * scales[..., None])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
def test_fake_quant_is_quantize_blocks_then_dequantize_bit_for_bit(symmetric, bits, scale_dtype):
    w, _ = real_layer("fc1")
    blocks = awq_module._k_major(w[:200], 32)  # K = 200: padded to 224
    rng = np.random.default_rng(3)
    for ratio in (1.0, 0.85, rng.uniform(0.5, 1.0, (blocks.shape[0], blocks.shape[2])).astype(np.float32)):
        codes, scales, zps = quantize_blocks(blocks, bits, symmetric, ratio, scale_dtype, axis=1)
        expected = (codes.astype(np.float32) - zps[:, None, :]) * scales[:, None, :]
        np.testing.assert_array_equal(awq_module._fake_quant(blocks, bits, symmetric, ratio, scale_dtype), expected)


@pytest.mark.parametrize("rows", ["few", "tall"])
def test_column_and_block_losses_match_the_definition_on_every_route(rows):
    """``T <= K``: through ``x``; ``T > K``: through ``G``; blocks of ``G`` (from ``G`` or from ``x``)
    when ``T > bs``, blocks of ``x`` when ``T <= bs``."""
    w, x = real_layer("fc1")  # K = 384, T = 256
    x = tall(x) if rows == "tall" else x
    objective = awq_module._OutputError(x)
    assert (objective.gram is not None) == (rows == "tall")
    d = (w - quantize_weight(w, 4, 32, True).dequantize())[:, :96]
    direct = np.einsum("tn,tn->n", x.astype(np.float64) @ d.astype(np.float64), x.astype(np.float64) @ d)
    np.testing.assert_allclose(objective.column_losses(d), direct, rtol=2e-4)
    for bs, sample in ((128, x), (64, x[:48])):  # x[:48]: T <= bs, the blocks of x themselves
        objective = awq_module._OutputError(sample)
        blocks = awq_module._k_major(w[:, :96], bs)
        codes, scales, zps = quantize_blocks(blocks, 4, False, 0.9, axis=1)
        diff = (codes.astype(np.float32) - zps[:, None, :]) * scales[:, None, :] - blocks
        expected = definition_block_errors(sample, w[:, :96], 4, bs, False, 0.9).T
        np.testing.assert_allclose(objective.block_losses(diff), expected, rtol=2e-3, atol=1e-6 * expected.max())


@pytest.mark.parametrize("symmetric", [True, False])
def test_batched_scale_search_equals_the_definition_on_a_tall_sample(symmetric):
    weights, x = real_siblings()
    x = tall(x)
    act = np.abs(x).mean(0)
    res = awq_search_scale(weights, x, act, 4, 128, symmetric, grid=8)
    direct = [definition_loss(weights, x, awq_scales(act, a), 4, 128, symmetric) for a in np.linspace(0, 1, 8)]
    np.testing.assert_allclose(res.loss_by_alpha, direct, rtol=1e-4)
    assert res.alpha == np.linspace(0, 1, 8)[int(np.argmin(direct))]


def test_clip_search_picks_the_definitions_best_ratio_through_gram_blocks():
    """fc2 (K = 1536 > T): Gram blocks from ``x``; fc1 on a tall sample: blocks of the full ``G``."""
    for layer, rows in (("fc2", None), ("fc1", tall)):
        w, sample = real_layer(layer)
        sample = rows(sample) if rows else sample
        qw = awq_clip_search(w[:, :48], sample, 4, 128, True)
        assert (awq_module._OutputError(sample).gram is not None) == (rows is not None)
        per_ratio = np.stack([definition_block_errors(sample, w[:, :48], 4, 128, True, r) for r in AWQ_CLIP_RATIOS])
        chosen = np.take_along_axis(per_ratio, np.argmin(per_ratio, axis=0)[None], axis=0)[0]
        np.testing.assert_allclose(block_errors(sample, w[:, :48], qw.dequantize_blocks()), chosen, rtol=1e-3)


def test_results_do_not_depend_on_batching_or_threads(monkeypatch):
    """Alphas split over several products and clip columns over several chunks, one thread or more:
    the same losses (to rounding of the final sums), scales and codes."""
    weights, x = real_siblings()
    act = np.abs(x).mean(0)
    ref = awq_quantize_weights(weights, x, act, 4, 32, False, grid=7)
    monkeypatch.setattr(awq_module, "_BATCH_ELEMENTS", 3 * weights[0].size // 2)
    monkeypatch.setattr(awq_module, "_THREADS", 1)
    small = awq_quantize_weights(weights, x, act, 4, 32, False, grid=7)
    # float32 products summed in another order (batching, threads, the BLAS kernel of the CPU): ~1e-9
    np.testing.assert_allclose(small.search.loss_by_alpha, ref.search.loss_by_alpha, rtol=1e-7)
    np.testing.assert_array_equal(small.scales, ref.scales)
    for a, b in zip(small.qweights, ref.qweights):
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scales, b.scales)
        np.testing.assert_array_equal(a.zero_points, b.zero_points)


def test_a_wide_weight_is_scored_on_a_column_subset_with_a_message(caplog):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((128, 64)).astype(np.float32)
    w = rng.standard_normal((64, 20000)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="onnxq.algorithms.awq"):
        res = awq_search_scale([w], x, np.abs(x).mean(0), 4, 32, True, grid=3)
    assert "scale search on 8192 evenly spaced columns" in caplog.text
    assert res.loss_by_alpha.shape == (3,)
