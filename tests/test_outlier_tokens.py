"""Massive-activation tokens in calibration data (Sun et al., arXiv 2402.17762).

LLMs put activations hundreds of times the usual norm on the first token of a sequence in the
inputs of a few ``down_proj`` layers. Such a token then *is* GPTQ's Hessian. ``outlier_token_ratio``
caps these rows (direction kept) in the Hessian; these tests check the cap itself, that the
calibration executor applies it to the Hessian and to no other statistic, and that on a layer
whose calibration data has one massive token per sample GPTQ with the cap fits ordinary tokens
better than without, while data without outliers gives the same model either way.
"""
import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxq
from onnxq import OnnxqError, QuantConfig
from onnxq.calibration import ActivationProbe, cap_outlier_tokens
from onnxq.calibration.executor import StatisticsPlan, accumulate_shard
from onnxq.cli import main
from tests.graphs import matmul_model, run

K, N, SEQ = 64, 48, 32


def test_cap_scales_only_the_outlier_rows_to_the_cap():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((SEQ, K)).astype(np.float32)
    rows[0] *= 40.0  # squared norm ~1600x the others
    rows[5] *= 12.0  # ~144x
    original = rows.copy()
    capped = cap_outlier_tokens(rows, 100.0)
    np.testing.assert_array_equal(rows, original)  # the input is not modified
    norms = np.einsum("tk,tk->t", rows, rows, dtype=np.float64)
    cap = 100.0 * np.median(norms)
    new_norms = np.einsum("tk,tk->t", capped, capped, dtype=np.float64)
    np.testing.assert_allclose(new_norms[[0, 5]], cap, rtol=1e-5)
    keep = np.setdiff1d(np.arange(SEQ), [0, 5])
    np.testing.assert_array_equal(capped[keep], rows[keep])
    for t in (0, 5):  # direction kept
        cos = capped[t] @ rows[t] / np.linalg.norm(capped[t]) / np.linalg.norm(rows[t])
        assert cos == pytest.approx(1.0, abs=1e-6)
    assert cap_outlier_tokens(rows, 0.0) is rows
    assert cap_outlier_tokens(rows, 1e6) is rows  # nothing over the cap: no copy


def _identity_probe():
    """A real probe (onnxruntime) of ``y = Identity(x)``: the statistics of ``y`` are those of the feed."""
    value_info = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, "seq", K]) for name in "xy"]
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "identity",
                                   value_info[:1], value_info[1:])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    example = {"x": np.zeros((1, SEQ, K), np.float32)}
    return ActivationProbe(ir.from_proto(model), ["y"]).spec(example)


def test_the_hessian_sees_the_capped_rows_and_the_other_statistics_the_rows():
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal((1, SEQ, K)).astype(np.float32) for _ in range(3)]
    for x in samples:
        x[0, 0] *= 50.0
    statistics = ("hessian", "abs_mean", "sq_mean", "rows")
    capped_plan = StatisticsPlan(("y",), statistics, sample_rows=16, outlier_token_ratio=100.0)
    plain_plan = StatisticsPlan(("y",), statistics, sample_rows=16)
    probe = _identity_probe()
    feeds = [{"x": x} for x in samples]
    capped_feeds = [{"x": cap_outlier_tokens(x[0], 100.0)[None]} for x in samples]
    got, _ = accumulate_shard(probe, capped_plan, feeds, [{}] * 3, [0, 1, 2])
    want, _ = accumulate_shard(probe, plain_plan, capped_feeds, [{}] * 3, [0, 1, 2])
    np.testing.assert_allclose(got["y"]["hessian"].hessian, want["y"]["hessian"].hessian, rtol=1e-6)
    plain, _ = accumulate_shard(probe, plain_plan, feeds, [{}] * 3, [0, 1, 2])
    assert plain["y"]["hessian"].hessian[0, 0] > 10 * got["y"]["hessian"].hessian[0, 0]
    np.testing.assert_array_equal(got["y"]["abs_mean"].value(), plain["y"]["abs_mean"].value())
    np.testing.assert_array_equal(got["y"]["sq_mean"].value(), plain["y"]["sq_mean"].value())
    np.testing.assert_array_equal(got["y"]["rows"].rows(), plain["y"]["rows"].rows())


def _layer_and_data(seed=2):
    """A weight and calibration samples whose first token is massive in a few channels, as the
    first token of an LLM's down_proj input is; held-out ordinary tokens from the same distribution."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)).astype(np.float32) / np.sqrt(K)  # correlated channels
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)

    def tokens(count):
        return (rng.standard_normal((count, K)).astype(np.float32) @ mix).astype(np.float32)

    feeds = []
    for _ in range(8):
        x = tokens(SEQ)
        x[0, :3] = 200.0  # the massive first token
        feeds.append({"x": x[None]})
    return w, feeds, tokens(512)[None]


def _ordinary_error(model, w, held_out):
    want = held_out @ w
    got = run(model, {"x": held_out})[0]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_gptq_with_the_cap_fits_ordinary_tokens_better():
    w, feeds, held_out = _layer_and_data()
    model = matmul_model(w, m_shape=(1, "seq"))
    errors = {}
    for ratio in (0.0, 100.0):
        errors[ratio] = _ordinary_error(onnxq.quantize(model, _gptq(ratio), feeds), w, held_out)
    rtn = _ordinary_error(onnxq.quantize(model, QuantConfig(bits=4, block_size=32)), w, held_out)
    assert errors[100.0] < 0.8 * errors[0.0], errors
    assert errors[100.0] < rtn, (errors, rtn)


def _gptq(ratio):
    return QuantConfig.from_dict({"bits": 4, "block_size": 32, "algorithm": "gptq", "gptq": {"refine": 0},
                                  "calibration": {"outlier_token_ratio": ratio}})


def test_the_cap_changes_nothing_without_outliers():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    feeds = [{"x": rng.standard_normal((1, SEQ, K)).astype(np.float32)} for _ in range(4)]
    model = matmul_model(w, m_shape=(1, "seq"))
    outputs = []
    for ratio in (0.0, 100.0):
        quantized = onnxq.quantize(model, _gptq(ratio), feeds)
        outputs.append({name: v.const_value.numpy().tobytes() for name, v in quantized.graph.initializers.items()})
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("ratio", [-1.0, 0.5, True, "100"])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(OnnxqError, match="outlier_token_ratio"):
        _gptq(ratio)


def test_cli_flag(tmp_path, capsys):
    w, feeds, _ = _layer_and_data()
    path = tmp_path / "m.onnx"
    onnx.save(matmul_model(w, m_shape=(1, "seq")), path)
    np.savez(tmp_path / "calib.npz", x=np.concatenate([f["x"] for f in feeds]))
    assert main(["quantize", str(path), str(tmp_path / "bad.onnx"), "--algo", "gptq", "--calib-data",
                 str(tmp_path / "calib.npz"), "--outlier-tokens", "-3", "--quiet"]) == 2
    assert "outlier_token_ratio" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
    assert main(["quantize", str(path), str(tmp_path / "q.onnx"), "--algo", "gptq", "--calib-data",
                 str(tmp_path / "calib.npz"), "--outlier-tokens", "100", "--quiet"]) == 0
    x = feeds[0]["x"]
    (y,) = run(str(tmp_path / "q.onnx"), {"x": x})  # onnxruntime runs the written model
    assert np.linalg.norm(y - x @ w) < 0.2 * np.linalg.norm(x @ w)
