"""k_quant (llama.cpp's importance-weighted least-squares scale search): ORT runs what it writes, it is never
worse than RTN on the weighted error it minimises, odd K / block, sym / asym, 2-8 bits, with and without data."""
import logging

import numpy as np
import onnx
import pytest

import onnxq
from onnxq import OnnxqError, QuantConfig
from onnxq.algorithms import KQuantConfig, kquant_quantize_weight
from onnxq.calibration import MeanSquareAccumulator, save_npz
from onnxq.cli import main
from onnxq.config import CalibrationConfig
from onnxq.core import quantize_weight
from tests.graphs import matmul_model, run, weight
from tests.nbits_reference import dequantized_weight, nbits_nodes
from tests.real_layers import LAYERS, output_error, real_layer
from tests.tiny_transformer import make_tiny_transformer

VOCAB = 97
COLUMNS = 96  # of each real layer's output columns (all of K): enough blocks, a fast test


def real(layer):
    w, x = real_layer(layer)
    return np.ascontiguousarray(w[:, :COLUMNS]), x


def importance(w: np.ndarray, block_size: int, channel: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's element importances for ``w: [K, N]`` (an independent copy of the module's rule):
    ``rms(block) + |w|`` without data, ``a_k sqrt(2 mean(block^2) + w^2)`` with channel statistics ``a``."""
    k, n = w.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((k_blocks * block_size, n), np.float64)
    padded[:k] = w
    blocks = padded.reshape(k_blocks, block_size, n)
    count = np.minimum(block_size, k - np.arange(k_blocks) * block_size)[:, None, None]
    mean_sq = (blocks ** 2).sum(axis=1, keepdims=True) / count
    if channel is None:
        weights = np.sqrt(mean_sq) + np.abs(blocks)
    else:
        a = np.zeros(k_blocks * block_size)
        a[:k] = channel / channel.max()
        weights = np.sqrt(2 * mean_sq + blocks ** 2) * a.reshape(k_blocks, block_size, 1)
    return weights.reshape(-1, n)[:k]


def weighted_error(w: np.ndarray, approx: np.ndarray, weights: np.ndarray) -> float:
    diff = w.astype(np.float64) - approx
    return float(np.sqrt((weights * diff ** 2).sum() / (weights * w.astype(np.float64) ** 2).sum()))


def block_errors(w, approx, weights, block_size) -> np.ndarray:
    """Weighted squared error per block ``[k_blocks, N]``."""
    k, n = w.shape
    err = np.zeros((-(-k // block_size) * block_size, n))
    err[:k] = weights * (w.astype(np.float64) - approx) ** 2
    return err.reshape(-1, block_size, n).sum(axis=1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k, block_size", [(640, 128), (100, 32), (96, 32)])
def test_ort_runs_what_k_quant_solved(bits, symmetric, k, block_size):
    """ORT's MatMulNBits output equals ``x @ dequant`` read back from the bytes, and that is the solver's weight;
    K=640 at block 128 is 5 blocks (onnxruntime's own k_quant crashes on an odd count), K=100 pads."""
    w = weight((k, 24), seed=k + bits)
    quantized = onnxq.quantize(matmul_model(w), QuantConfig(algorithm="k_quant", bits=bits, block_size=block_size,
                                                            symmetric=symmetric))
    onnx.checker.check_model(onnxq.api.ir.to_proto(quantized))
    (node,) = nbits_nodes(quantized)
    assert (len(node.inputs) > 3 and node.inputs[3] is not None) == (not symmetric)
    x = np.random.default_rng(1).standard_normal((3, 7, k)).astype(np.float32)
    (y,) = run(quantized, {"x": x})
    reference = dequantized_weight(node)
    np.testing.assert_allclose(y, x @ reference, rtol=1e-4, atol=1e-4)
    solved = kquant_quantize_weight(w, bits, block_size, symmetric).qweight.dequantize()
    np.testing.assert_array_equal(reference.astype(np.float32), solved)


def test_float16_model_scales_are_what_ort_uses():
    w = weight((320, 40), seed=3, dtype=np.float16)
    quantized = onnxq.quantize(matmul_model(w), QuantConfig(algorithm="k_quant", block_size=64, symmetric=False))
    (node,) = nbits_nodes(quantized)
    assert node.inputs[2].const_value.dtype == onnxq.api.ir.DataType.FLOAT16
    x = np.random.default_rng(2).standard_normal((2, 7, 320)).astype(np.float16)
    (y,) = run(quantized, {"x": x})
    expected = x.astype(np.float64) @ dequantized_weight(node)
    np.testing.assert_allclose(y.astype(np.float64), expected, rtol=2e-2, atol=2e-2)
    solved = kquant_quantize_weight(w, 4, 64, False, scale_dtype=np.float16).qweight.dequantize()
    np.testing.assert_array_equal(dequantized_weight(node).astype(np.float32), solved)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weighted_error_never_above_rtn_on_real_weights(layer, bits, symmetric):
    """Real MiniLM weights (K=384 at block 128: 3 blocks), block by block, without and with activation statistics."""
    w, x = real(layer)
    channel = (x.astype(np.float64) ** 2).mean(axis=0)
    rtn = quantize_weight(w, bits, 128, symmetric).dequantize().astype(np.float64)
    for stats in (None, channel):
        weights = importance(w, 128, stats)
        result = kquant_quantize_weight(w, bits, 128, symmetric, importance=stats)
        kq = result.qweight.dequantize().astype(np.float64)
        assert np.all(block_errors(w, kq, weights, 128) <= block_errors(w, rtn, weights, 128) * (1 + 1e-6))
        ours, theirs = weighted_error(w, kq, weights), weighted_error(w, rtn, weights)
        assert ours == pytest.approx(result.weighted_error, rel=1e-4)
        assert ours < theirs * (0.995 if bits < 8 else 1.0), (stats is None, ours, theirs)
        assert result.qweight.codes.max() < 2 ** bits
        assert result.error == pytest.approx(np.linalg.norm(kq - w) / np.linalg.norm(w), rel=1e-5)


@pytest.mark.parametrize("layer", LAYERS)
def test_activation_statistics_lower_the_output_error(layer):
    """With mean x^2 per channel (what ``--calib-data`` gives), the output error on real inputs beats RTN and
    the weight-only importance."""
    w, x = real(layer)
    channel = (x.astype(np.float64) ** 2).mean(axis=0)
    rtn = output_error(x, w, quantize_weight(w, 4, 128, False).dequantize())
    plain = output_error(x, w, kquant_quantize_weight(w, 4, 128, False).qweight.dequantize())
    aware = output_error(x, w, kquant_quantize_weight(w, 4, 128, False, importance=channel).qweight.dequantize())
    assert aware < plain < rtn, (aware, plain, rtn)


def test_per_channel_and_options():
    w = weight((200, 16), seed=9)
    per_channel = kquant_quantize_weight(w, 4, -1, False)
    assert per_channel.qweight.block_size == 200 and per_channel.qweight.k_blocks == 1
    no_grid = kquant_quantize_weight(w, 4, 64, False, options=KQuantConfig(grid=0))
    assert no_grid.weighted_error >= kquant_quantize_weight(w, 4, 64, False).weighted_error
    with pytest.raises(OnnxqError, match="grid"):
        KQuantConfig(grid=-1)
    with pytest.raises(OnnxqError, match="importance"):
        kquant_quantize_weight(w, 4, 64, importance=np.ones(3))
    with pytest.raises(OnnxqError, match="finite"):
        kquant_quantize_weight(np.full((4, 4), np.nan, np.float32))
    config = QuantConfig(algorithm="k_quant", k_quant=KQuantConfig(grid=8))
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert not config.needs_calibration and config.uses_calibration


def test_mean_square_accumulator_drops_masked_rows():
    acc = MeanSquareAccumulator()
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    acc.update(x, mask=np.array([[1, 0, 1]]))
    acc.update(np.ones((2, 4), np.float32))
    rows = np.concatenate([x[0, [0, 2]], np.ones((2, 4))])
    np.testing.assert_allclose(acc.value(), (rows ** 2).mean(axis=0))
    assert acc.count == 4


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=2, hidden=64, ffn=128, vocab=VOCAB, seed=3)


def feeds(count, seed):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (1, 32)).astype(np.int64)} for _ in range(count)]


def test_calibration_is_optional(model, caplog):
    """Without data each weight is solved alone; with data the driver collects mean x^2 and the output error
    falls below both RTN's and the data-free k_quant's (the tiny model has outlier channels)."""
    held_out = feeds(1, seed=99)[0]
    (reference,) = run(model, held_out)

    def error(quantized):
        return float(np.linalg.norm(run(quantized, held_out)[0] - reference) / np.linalg.norm(reference))

    config = QuantConfig(algorithm="k_quant", block_size=32, symmetric=False, calibration=CalibrationConfig(samples=8))
    rtn = error(onnxq.quantize(model, QuantConfig(block_size=32, symmetric=False)))
    plain = error(onnxq.quantize(model, config))
    with caplog.at_level(logging.INFO, logger="onnxq"):
        aware = error(onnxq.quantize(model, config, feeds(8, seed=1)))
    assert "k_quant: 8 calibration samples" in caplog.text
    assert aware < plain < rtn, (aware, plain, rtn)


def test_cli_with_and_without_calibration_data(model, tmp_path, capsys):
    src, data = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(model, src)
    save_npz(data, feeds(4, seed=2))
    outputs = {}
    for name, flags in {"plain": [], "data": ["--calib-data", str(data), "--samples", "4"]}.items():
        out = tmp_path / f"{name}.onnx"
        assert main(["quantize", str(src), str(out), "--algo", "k_quant", "--asym", "--block-size", "32", *flags]) == 0
        captured = capsys.readouterr()
        assert ("4 calibration samples" in captured.err) == (name == "data"), captured.err
        quantized = onnx.load(str(out))
        assert sum(n.op_type == "MatMulNBits" for n in quantized.graph.node) == 13
        outputs[name] = run(quantized, feeds(1, seed=5)[0])[0]
    assert not np.array_equal(outputs["plain"], outputs["data"])
    assert main(["quantize", "--help"]) == 0
    assert "k_quant" in capsys.readouterr().out
