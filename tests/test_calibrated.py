"""GPTQ and AWQ calibrated through onnxruntime, end to end on a small transformer.

The model is a real-structured decoder (LayerNorm, q/k/v sharing one input,
attention, MLP, residuals, lm_head; tests/tiny_transformer.py); ORT runs the
quantized model and its output error against the float model must beat RTN's.
"""
import numpy as np
import onnx
import pytest

import onnxq
import onnxq.algorithms.awq
import onnxq.algorithms.gptq
from onnxq import OnnxqError, QuantConfig
from onnxq.api import records_of
from onnxq.calibration import save_npz
from onnxq.cli import main
from onnxq.config import AWQConfig, CalibrationConfig
from tests.graphs import run
from tests.nbits_reference import dequantized_weight, nbits_nodes
from tests.tiny_transformer import make_tiny_transformer

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=2, hidden=128, ffn=256, vocab=VOCAB, seed=3)


def token_feeds(count, seq, seed):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (1, seq)).astype(np.int64)} for _ in range(count)]


@pytest.fixture(scope="module")
def held_out(model):
    feed = {"input_ids": np.random.default_rng(99).integers(0, VOCAB, (4, 32)).astype(np.int64)}
    return feed, run(model, feed)[0]


def output_error(quantized, held_out) -> float:
    feed, reference = held_out
    (y,) = run(quantized, feed)
    return float(np.linalg.norm(y - reference) / np.linalg.norm(reference))


def config(algorithm, sequential=True, **kw):
    kw.setdefault("awq", AWQConfig(grid=10))  # a coarser alpha grid keeps the test fast
    return QuantConfig(algorithm=algorithm, block_size=32, calibration=CalibrationConfig(samples=16, sequential=sequential), **kw)


@pytest.fixture(scope="module")
def rtn_error(model, held_out):
    return output_error(onnxq.quantize(model, QuantConfig(block_size=32)), held_out)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
@pytest.mark.parametrize("sequential", [True, False])
def test_calibrated_beats_rtn(model, held_out, rtn_error, algorithm, sequential):
    quantized = onnxq.quantize(model, config(algorithm, sequential), token_feeds(16, 32, seed=1))
    onnx.checker.check_model(onnxq.api.ir.to_proto(quantized))
    error = output_error(quantized, held_out)
    assert error < rtn_error * 0.8, (algorithm, sequential, error, rtn_error)
    records, _ = records_of(quantized)
    assert len(records) == 13  # 2 x (q, k, v, o, fc1, fc2) + lm_head, all MatMulNBits
    assert {n.op_type for n in quantized.graph} >= {"MatMulNBits"}
    assert "MatMul" not in {n.op_type for n in quantized.graph if n.name.endswith("_proj") or "fc" in n.name}


def test_gptq_nodes_hold_exactly_the_solver_output(model, monkeypatch):
    """What MatMulNBits computes with is bit for bit the solver's dequantized weight (never re-quantized)."""
    solved = {}
    real_solve = onnxq.algorithms.gptq.GPTQ.solve

    def spy(self, group, stats, options):
        solution = real_solve(self, group, stats, options)
        solved.update(zip(group.names, solution.qweights))
        return solution

    monkeypatch.setattr(onnxq.algorithms.gptq.GPTQ, "solve", spy)
    quantized = onnxq.quantize(model, config("gptq", symmetric=False), token_feeds(8, 32, seed=2))
    nodes = {n.name.rsplit("_Q", 1)[0]: n for n in nbits_nodes(quantized)}
    assert set(nodes) == set(solved)
    for name, qweight in solved.items():
        np.testing.assert_array_equal(dequantized_weight(nodes[name]).astype(np.float32), qweight.dequantize())


def test_awq_nodes_hold_the_scaled_solver_output(model, monkeypatch):
    solved = []
    real_clip = onnxq.algorithms.awq._clip_search  # AWQ.solve's clip search on the group's scaled objective

    def spy(weight, objective, *args, **kwargs):
        result = real_clip(weight, objective, *args, **kwargs)
        solved.append(result)
        return result

    monkeypatch.setattr(onnxq.algorithms.awq, "_clip_search", spy)
    quantized = onnxq.quantize(model, config("awq"), token_feeds(8, 32, seed=2))
    exported = sorted(dequantized_weight(n).astype(np.float32).tobytes() for n in nbits_nodes(quantized))
    assert exported == sorted(q.dequantize().tobytes() for q in solved)


def test_awq_without_clip_and_asym(model, held_out, rtn_error):
    cfg = config("awq", symmetric=False, awq=AWQConfig(clip=False, grid=10))
    quantized = onnxq.quantize(model, cfg, token_feeds(16, 32, seed=1))
    asym_rtn = output_error(onnxq.quantize(model, QuantConfig(block_size=32, symmetric=False)), held_out)
    assert output_error(quantized, held_out) < asym_rtn


def test_calibration_input_names_are_checked(model):
    with pytest.raises(OnnxqError, match="ids.*input_ids"):
        onnxq.quantize(model, config("gptq"), [{"ids": np.zeros((1, 8), np.int64)}])


def test_calibrated_algorithms_need_data(model):
    with pytest.raises(OnnxqError, match="needs calibration data"):
        onnxq.quantize(model, config("awq"))


def test_cli_gptq_with_npz(model, tmp_path, capsys, held_out, rtn_error):
    src, out, data = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    save_npz(data, token_feeds(16, 32, seed=1))
    assert main(["quantize", str(src), str(out), "--algo", "gptq", "--calib-data", str(data), "--samples", "16",
                 "--quiet"]) == 0
    assert output_error(out, held_out) < rtn_error * 0.8
    assert main(["quantize", str(src), str(out), "--algo", "awq"]) == 2
    assert "needs calibration data" in capsys.readouterr().err


def _chain_model(d: int = 128, seed: int = 0) -> onnx.ModelProto:
    """``LayerNorm -> MatMul(W1) -> MatMul(W2)`` with two outlier norm channels (two sites in one chain)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    gamma = np.ones(d, np.float32)
    gamma[[3, 17]] = 10
    arrays = {"g": gamma, "b": np.zeros(d, np.float32),
              "W1": (rng.standard_normal((d, d)) * 0.1).astype(np.float32),
              "W2": (rng.standard_normal((d, d)) * 0.1).astype(np.float32)}
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["n", "W1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, d])],
                              [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("algorithm", ["awq", "teq"])
def test_input_scale_is_never_folded_into_a_weight_being_quantized(algorithm):
    """mm2's input scale used to be folded into mm1's float weight after mm1 was solved: the fold was lost
    and the model was worse than RTN. Folding must go elsewhere (here: a Mul) and beat RTN on the calibration data."""
    model = _chain_model()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((24, 128)).astype(np.float32)} for _ in range(16)]
    x = np.concatenate([feed["x"] for feed in calib])

    def error(quantized) -> float:
        (y,) = run(quantized, {"x": x})
        (ref,) = run(model, {"x": x})
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

    rtn = error(onnxq.quantize(model, QuantConfig(block_size=32)))
    cfg = QuantConfig(algorithm=algorithm, block_size=32, awq=AWQConfig(grid=10),
                      teq=onnxq.config.TuningConfig(steps=50), calibration=CalibrationConfig(samples=16))
    quantized = onnxq.quantize(model, cfg, calib)
    assert error(quantized) < rtn
    assert "Mul" in [n.op_type for n in quantized.graph]  # mm2's scale: mm1 is itself quantized, so a Mul


def test_awq_then_gptq_beats_rtn_and_awq_alone(model, held_out, rtn_error):
    """AWQ's scales, then GPTQ on the scaled weights with the scaled Hessian (the AutoAWQ recipe)."""
    feeds = token_feeds(16, 32, seed=1)
    combined = output_error(onnxq.quantize(model, config("awq+gptq"), feeds), held_out)
    awq_alone = output_error(onnxq.quantize(model, config("awq"), feeds), held_out)
    assert combined < rtn_error * 0.8 and combined < awq_alone, (combined, awq_alone, rtn_error)


def test_awq_then_kquant_beats_rtn_and_is_kquant_without_scales(model, held_out, rtn_error):
    """AWQ's scales, then k-quant with the scaled input's importance E[x^2] / s^2.

    With the scale search off (alpha 0) it is calibrated k-quant, byte for byte."""
    feeds = token_feeds(16, 32, seed=1)
    combined = onnxq.quantize(model, config("awq+k_quant"), feeds)
    assert output_error(combined, held_out) < rtn_error * 0.8, (output_error(combined, held_out), rtn_error)
    no_scales = onnxq.quantize(model, config("awq+k_quant", awq=AWQConfig(scale_search=False)), feeds)
    k_quant = onnxq.quantize(model, config("k_quant"), feeds)
    assert [n.op_type for n in no_scales.graph] == [n.op_type for n in k_quant.graph]  # no Mul for scales of one

    def initializers(m):
        return {name: v.const_value.numpy().tobytes() for name, v in m.graph.initializers.items()}

    assert initializers(no_scales) == initializers(k_quant)
