"""HQQ, TEQ and AutoRound through the graph passes: ORT runs the result and it beats RTN end to end."""
import numpy as np
import onnx
import pytest

import onnxq
from onnxq import OnnxqError, QuantConfig
from onnxq.config import CalibrationConfig, HQQConfig, TuningConfig
from tests.graphs import matmul_model, run, weight
from tests.nbits_reference import dequantized_weight, nbits_nodes
from tests.tiny_transformer import make_tiny_transformer

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=2, hidden=64, ffn=128, vocab=VOCAB, seed=3)


@pytest.fixture(scope="module")
def held_out(model):
    feed = {"input_ids": np.random.default_rng(99).integers(0, VOCAB, (4, 32)).astype(np.int64)}
    return feed, run(model, feed)[0]


def error(quantized, held_out):
    feed, reference = held_out
    return float(np.linalg.norm(run(quantized, feed)[0] - reference) / np.linalg.norm(reference))


def feeds(count=16):
    rng = np.random.default_rng(1)
    return [{"input_ids": rng.integers(0, VOCAB, (1, 32)).astype(np.int64)} for _ in range(count)]


@pytest.mark.parametrize("zero_point", ["int", "float"])
def test_hqq_node_matches_numpy_and_beats_rtn_on_weights(zero_point):
    w = weight((256, 48), seed=5)
    w[np.random.default_rng(6).random(w.shape) < 0.01] *= 8  # outliers: where HQQ's robust loss helps
    config = QuantConfig(algorithm="hqq", block_size=64, symmetric=False, hqq=HQQConfig(zero_point=zero_point))
    quantized = onnxq.quantize(matmul_model(w), config)
    onnx.checker.check_model(onnxq.api.ir.to_proto(quantized))
    (node,) = nbits_nodes(quantized)
    zp = node.inputs[3].const_value
    assert (zp.dtype == onnxq.api.ir.DataType.FLOAT) == (zero_point == "float")
    x = np.random.default_rng(7).standard_normal((2, 7, 256)).astype(np.float32)
    (y,) = run(quantized, {"x": x})
    np.testing.assert_allclose(y, x @ dequantized_weight(node), rtol=1e-5, atol=1e-5)
    rtn = dequantized_weight(nbits_nodes(onnxq.quantize(matmul_model(w), QuantConfig(block_size=64, symmetric=False)))[0])
    assert np.linalg.norm(dequantized_weight(node) - w) <= np.linalg.norm(rtn - w)


def test_hqq_float_zero_points_need_asym():
    with pytest.raises(OnnxqError, match="needs asymmetric"):
        QuantConfig(algorithm="hqq", hqq=HQQConfig(zero_point="float"))


@pytest.mark.parametrize("algorithm", ["teq", "autoround"])
def test_tuned_algorithms_beat_rtn(model, held_out, algorithm):
    rtn = error(onnxq.quantize(model, QuantConfig(block_size=32)), held_out)
    config = QuantConfig(algorithm=algorithm, block_size=32, calibration=CalibrationConfig(samples=16),
                         **{algorithm: TuningConfig(steps=60, sample_rows=256)})
    quantized = onnxq.quantize(model, config, feeds())
    assert error(quantized, held_out) < rtn


def test_cli_hqq_and_autoround(model, tmp_path):
    from onnxq.calibration import save_npz
    from onnxq.cli import main

    src, data = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(model, src)
    save_npz(data, feeds(8))
    assert main(["quantize", str(src), str(tmp_path / "h.onnx"), "--algo", "hqq", "--asym", "--quiet"]) == 0
    assert main(["quantize", str(src), str(tmp_path / "a.onnx"), "--algo", "autoround", "--steps", "20",
                 "--calib-data", str(data), "--quiet"]) == 0
    assert main(["quantize", str(src), str(tmp_path / "t.onnx"), "--algo", "teq", "--quiet"]) == 2


def test_tuning_skips_weights_above_max_elements(model, held_out):
    """A weight above autoround.max_elements gets exactly RTN's codes (the lm_head here: 64 x 97)."""
    config = QuantConfig(algorithm="autoround", block_size=32, calibration=CalibrationConfig(samples=4),
                         autoround=TuningConfig(steps=5, max_elements=64 * 96))
    quantized = onnxq.quantize(model, config, feeds(4))
    rtn = onnxq.quantize(model, QuantConfig(block_size=32))
    lm = [n for n in nbits_nodes(quantized) if n.name.startswith("lm_head")][0]
    lm_rtn = [n for n in nbits_nodes(rtn) if n.name.startswith("lm_head")][0]
    np.testing.assert_array_equal(dequantized_weight(lm), dequantized_weight(lm_rtn))


def test_hqq_float_zero_points_refuse_8_bits():
    with pytest.raises(OnnxqError, match="2 or 4 bits"):
        QuantConfig(algorithm="hqq", bits=8, symmetric=False, hqq=HQQConfig(zero_point="float"))
