"""onnxq.eval.metrics and the eval command: perplexity, KL, top-1 and cosine against numpy references.

The references run the models' sessions (or the independent numpy forward of
tests/tiny_transformer.py) on hand-written windows and compute log-softmax, NLL, KL
and cosines directly, so the windowing and scoring of onnxq.eval.metrics are checked, not
reused.
"""
import argparse
import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxq
from onnxq.calibration.lm_session import LMSession
from onnxq.cli import eval as eval_command, main
from onnxq.eval import metrics
from onnxq.eval.metrics import (
    compare_embeddings,
    compare_lm,
    compare_lms,
    gap_recovered_interval,
    lm_windows,
    log_softmax,
    percentile_interval,
    perplexity,
    perplexity_increase_interval,
    resampled_sums,
)
from onnxq.errors import OnnxqError
from tests.graphs import matmul_model, weight
from tests.tiny_transformer import make_tiny_transformer, reference_forward

VOCAB = 97


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Paths of the tiny float decoder and two int4 RTN versions of it."""
    folder = tmp_path_factory.mktemp("evaluate")
    float_proto = make_tiny_transformer(vocab=VOCAB, seed=1)
    paths = {"float": folder / "float.onnx", "q4": folder / "q4.onnx", "q4_b16": folder / "q4_b16.onnx"}
    onnx.save(float_proto, paths["float"])
    onnxq.save(onnxq.quantize(float_proto, onnxq.QuantConfig(bits=4, block_size=32)), paths["q4"])
    onnxq.save(onnxq.quantize(float_proto, onnxq.QuantConfig(bits=4, block_size=16, symmetric=False)),
               paths["q4_b16"])
    paths["proto"] = float_proto
    return paths


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.int64)


def _logits(path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids[None, :]})[0][0].astype(np.float64)


def _ref_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_log_softmax_is_stable_and_exact():
    x = np.array([[1e4, 1e4 - 1.0, -1e4], [0.0, 1.0, 2.0]], np.float32)
    got = log_softmax(x)
    assert got.dtype == np.float64 and np.isfinite(got).all()
    assert np.allclose(np.exp(got).sum(-1), 1.0)
    assert np.allclose(got[1], [0.0 - np.log(1 + np.e + np.e**2), 1 - np.log(1 + np.e + np.e**2),
                                2 - np.log(1 + np.e + np.e**2)])
    assert got[0, 0] == pytest.approx(-np.log1p(np.exp(-1.0)))
    assert x[0, 0] == np.float32(1e4)  # the input is left alone


def test_windows_by_hand():
    assert lm_windows(100, 32) == [(0, 1), (32, 1), (64, 1)]  # tail of 4 tokens dropped
    assert lm_windows(150, 32, stride=16, max_windows=4) == [(0, 1), (32, 16), (80, 16), (112, 16)]
    assert lm_windows(32, 32) == [(0, 1)]
    with pytest.raises(OnnxqError, match="fewer than one window"):
        lm_windows(31, 32)
    with pytest.raises(OnnxqError, match="stride"):
        lm_windows(100, 32, stride=33)


def test_perplexity_matches_numpy_forward(models):
    """Non-overlapping windows against the float64 numpy forward of the decoder."""
    ids = _ids(100)
    result = perplexity(models["float"], ids, context=32)
    nll = []
    for start in (0, 32, 64):  # 3 full windows; targets 1..31 of each
        window = ids[start:start + 32]
        logits, _ = reference_forward(models["proto"], window[None, :])
        logp = _ref_log_softmax(logits[0])
        nll += [-logp[t - 1, window[t]] for t in range(1, 32)]
    assert result.tokens == 93 and result.windows == 3
    assert result.nll == pytest.approx(np.mean(nll), rel=1e-5)
    assert result.ppl == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)


def test_perplexity_strided_subsampled_batched(models):
    ids = _ids(150, seed=1)
    got = perplexity(models["float"], ids, context=32, stride=16, max_windows=4, batch=3)
    nll = []
    for start, first in ((0, 1), (32, 16), (80, 16), (112, 16)):
        window = ids[start:start + 32]
        logp = _ref_log_softmax(_logits(models["float"], window))
        nll += [-logp[t - 1, window[t]] for t in range(first, 32)]
    assert got.tokens == len(nll) == 31 + 3 * 16 and got.windows == 4
    assert got.nll == pytest.approx(np.mean(nll), rel=1e-6)
    same_unbatched = perplexity(models["float"], ids, context=32, stride=16, max_windows=4, batch=1)
    assert same_unbatched.nll == pytest.approx(got.nll, rel=1e-6)


def test_identical_models_have_zero_kl(models):
    result = compare_lm(models["float"], models["float"], _ids(96), context=32)
    assert result.kl_mean == 0.0 and result.top1_agreement == 1.0
    assert result.ppl_float == result.ppl_quant and result.tokens == 93


def test_quantized_model_kl_matches_numpy(models):
    ids = _ids(96, seed=2)
    result = compare_lm(models["float"], models["q4"], ids, context=32, batch=2)
    nll_f, nll_q, kl, agree = [], [], [], []
    for start in (0, 32, 64):
        window = ids[start:start + 32]
        logp = _ref_log_softmax(_logits(models["float"], window))[:-1]
        logq = _ref_log_softmax(_logits(models["q4"], window))[:-1]
        targets = window[1:]
        nll_f += list(-logp[np.arange(31), targets])
        nll_q += list(-logq[np.arange(31), targets])
        kl += list((np.exp(logp) * (logp - logq)).sum(-1))
        agree += list(logp.argmax(-1) == logq.argmax(-1))
    assert result.kl_mean > 1e-4
    assert result.kl_mean == pytest.approx(np.mean(kl), rel=1e-5)
    assert result.top1_agreement == pytest.approx(np.mean(agree))
    assert result.ppl_float == pytest.approx(np.exp(np.mean(nll_f)), rel=1e-6)
    assert result.ppl_quant == pytest.approx(np.exp(np.mean(nll_q)), rel=1e-6)
    # per window, in window order: 31 scored tokens each
    assert result.window_tokens == (31, 31, 31)
    np.testing.assert_allclose(result.window_nll_float, np.reshape(nll_f, (3, 31)).sum(1), rtol=1e-6)
    np.testing.assert_allclose(result.window_nll_quant, np.reshape(nll_q, (3, 31)).sum(1), rtol=1e-6)
    np.testing.assert_allclose(result.window_kl, np.reshape(kl, (3, 31)).sum(1), rtol=1e-5)


def test_compare_lms_equals_separate_comparisons(models):
    ids = _ids(128, seed=3)
    both = compare_lms(models["float"], {"a": models["q4"], "b": models["q4_b16"]}, ids, context=32)
    for name, key in (("a", "q4"), ("b", "q4_b16")):
        alone = compare_lm(models["float"], models[key], ids, context=32)
        assert both[name].kl_mean == pytest.approx(alone.kl_mean, rel=1e-9)
        assert both[name].ppl_quant == pytest.approx(alone.ppl_quant, rel=1e-9)


def test_bootstrap_spread_of_a_mean_is_the_textbook_standard_error():
    """The bootstrap standard error of a mean of W values is sqrt(sum (x - mean)^2) / W (Efron & Tibshirani,
    An Introduction to the Bootstrap, eq. 5.11): resampled sums / W must spread that much."""
    values = np.random.default_rng(0).gamma(2.0, 3.0, size=50)
    means = resampled_sums(values, resamples=20000, seed=1) / len(values)
    expected = np.sqrt(((values - values.mean()) ** 2).sum()) / len(values)
    assert means.std() == pytest.approx(expected, rel=0.03)
    assert means.mean() == pytest.approx(values.mean(), rel=0.01)
    low, high = percentile_interval(means, 0.95)
    assert low < values.mean() < high and high - low == pytest.approx(2 * 1.96 * expected, rel=0.1)


def test_resamples_are_paired_across_arrays_of_the_same_windows():
    tokens = np.array([10, 20, 30, 40.0])
    # the same draws for every array of 4 windows: a multiple of the token counts stays that multiple
    np.testing.assert_allclose(resampled_sums(3 * tokens, seed=5), 3 * resampled_sums(tokens, seed=5))
    assert not np.allclose(resampled_sums(tokens, seed=5), resampled_sums(tokens, seed=6))
    with pytest.raises(OnnxqError, match="non-empty 1-D"):
        resampled_sums([])
    with pytest.raises(OnnxqError, match=r"level must be in \(0, 1\)"):
        percentile_interval(tokens, 95)


def test_perplexity_increase_interval(models):
    ids = _ids(256, seed=8)
    same = compare_lm(models["float"], models["float"], ids, context=32)
    assert perplexity_increase_interval(same) == (0.0, 0.0)
    result = compare_lm(models["float"], models["q4"], ids, context=32)
    low, high = perplexity_increase_interval(result)
    assert result.windows == 8 and low < result.ppl_quant / result.ppl_float - 1 < high and low < high
    narrow = perplexity_increase_interval(result, 0.5)
    assert low <= narrow[0] < narrow[1] <= high
    with pytest.raises(OnnxqError, match="no per-window sums"):
        perplexity_increase_interval(dataclasses.replace(result, window_tokens=()))


def test_gap_recovered_interval_is_paired_over_windows():
    """The reference itself recovers 0% and the float model 100% on every resample (paired windows); a model
    halfway in NLL lands inside its interval, which is a resampling of the explicit formula."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(200, 256, 40).astype(np.float64)
    nll_float = tokens * rng.uniform(3.0, 4.0, 40)
    nll_reference = nll_float + tokens * rng.uniform(0.1, 0.3, 40)
    assert gap_recovered_interval(tokens, nll_float, nll_reference, nll_reference) == (0.0, 0.0)
    assert gap_recovered_interval(tokens, nll_float, nll_reference, nll_float) == pytest.approx((1.0, 1.0))
    halfway = (nll_float + nll_reference) / 2
    low, high = gap_recovered_interval(tokens, nll_float, nll_reference, halfway)
    ppl = [np.exp(v.sum() / tokens.sum()) for v in (nll_float, nll_reference, halfway)]
    assert low < (ppl[1] - ppl[2]) / (ppl[1] - ppl[0]) < high and low < high
    resampled = [np.exp(resampled_sums(v, seed=4) / resampled_sums(tokens, seed=4))
                 for v in (nll_float, nll_reference, halfway)]
    expected = percentile_interval((resampled[1] - resampled[2]) / (resampled[1] - resampled[0]), 0.9)
    assert gap_recovered_interval(tokens, nll_float, nll_reference, halfway, 0.9, seed=4) == pytest.approx(expected)


def test_chunks_of_positions_give_the_same_metrics(models, monkeypatch):
    """Several chunks per window (the last one partial), two quantized models: the same numbers as one chunk."""
    ids = _ids(96, seed=2)
    quant = {"a": models["q4"], "b": models["q4_b16"]}
    whole = compare_lms(models["float"], quant, ids, context=32, batch=2)
    whole_ppl = perplexity(models["q4"], ids, context=32)
    monkeypatch.setattr(metrics, "_CHUNK_LOGITS", 5 * VOCAB)  # 5 positions a chunk: 31 = 6 x 5 + 1
    chunked = compare_lms(models["float"], quant, ids, context=32, batch=2)
    for name in quant:
        for field in ("nll_float", "nll_quant", "kl_mean", "top1_agreement"):
            assert getattr(chunked[name], field) == pytest.approx(getattr(whole[name], field), rel=1e-12), field
        assert chunked[name].tokens == whole[name].tokens == 93
    assert perplexity(models["q4"], ids, context=32).nll == pytest.approx(whole_ppl.nll, rel=1e-12)
    assert whole_ppl.nll == pytest.approx(whole["a"].nll_quant, rel=1e-12)


def test_reused_logits_are_written_over_with_each_windows_values(models):
    lm = LMSession(str(models["q4"]))
    windows = [_ids(32, seed=seed)[None, :] for seed in (5, 6)]
    fresh = [lm.logits(window) for window in windows]
    assert not np.array_equal(fresh[0], fresh[1])
    first = lm.logits(windows[0], reuse=True)
    np.testing.assert_array_equal(first, fresh[0])
    second = lm.logits(windows[1], reuse=True)  # IO binding into the same array
    assert second is first
    np.testing.assert_array_equal(second, fresh[1])
    both = np.concatenate(windows)  # another shape: a new array, which later calls of that shape reuse
    assert lm.logits(both, reuse=True) is not first and lm.logits(both, reuse=True) is lm.logits(both, reuse=True)
    np.testing.assert_allclose(lm.logits(both, reuse=True), np.concatenate(fresh), rtol=1e-5, atol=1e-5)


def test_optional_inputs_are_filled(tmp_path):
    proto = make_tiny_transformer(vocab=VOCAB, attention_mask=True, position_ids=True, seed=4)
    ids = _ids(64, seed=4)
    result = perplexity(proto, ids, context=32)
    nll = []
    for start in (0, 32):
        window = ids[start:start + 32][None, :]
        logits, _ = reference_forward(proto, window, attention_mask=np.ones_like(window),
                                      position_ids=np.arange(32)[None, :])
        logp = _ref_log_softmax(logits[0])
        nll += [-logp[t - 1, window[0, t]] for t in range(1, 32)]
    assert result.nll == pytest.approx(np.mean(nll), rel=1e-5)


def test_model_without_input_ids_is_an_error(tmp_path):
    path = tmp_path / "mm.onnx"
    onnx.save(matmul_model(weight((8, 4), seed=0)), path)
    with pytest.raises(OnnxqError, match="no input named input_ids"):
        perplexity(path, _ids(64), context=32)


def test_embedding_cosines_match_numpy():
    proto = make_tiny_transformer(vocab=VOCAB, attention_mask=True, seed=5)
    quant_proto = ir.to_proto(onnxq.quantize(proto, onnxq.QuantConfig(bits=4, block_size=16)))
    mask = np.ones((2, 12), np.int64)
    mask[1, 9:] = 0
    feeds = [{"input_ids": _ids(24, seed=6).reshape(2, 12), "attention_mask": mask}]
    same = compare_embeddings(proto, proto, feeds, output="logits")
    assert same.cosine_min == pytest.approx(1.0) and same.vectors == 21  # padded tokens left out
    got = compare_embeddings(proto, quant_proto, feeds, output="logits")
    a = ort.InferenceSession(proto.SerializeToString()).run(["logits"], feeds[0])[0][mask != 0].astype(np.float64)
    b = ort.InferenceSession(quant_proto.SerializeToString()).run(["logits"], feeds[0])[0][mask != 0]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert got.cosine_mean == pytest.approx(cos.mean(), rel=1e-6) and got.cosine_min == pytest.approx(cos.min(), rel=1e-6)
    assert got.cosine_min < 1.0


# -- the eval command -------------------------------------------------------------

def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="onnxq")
    eval_command.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_lm_table_and_json(models, tmp_path, capsys):
    ids_path, out = tmp_path / "ids.npy", tmp_path / "out.json"
    ids = _ids(200, seed=7)
    np.save(ids_path, ids)
    code = eval_command.run(_parse(["eval", str(models["float"]), str(models["q4"]), "--data", str(ids_path),
                                    "--context", "64", "--max-windows", "2", "--json", str(out), "--quiet"]))
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity, quantized" in printed and "top-1 agreement" in printed
    values = json.loads(out.read_text())
    expected = compare_lm(models["float"], models["q4"], ids, context=64, max_windows=2)
    assert values["kind"] == "lm" and values["tokens"] == expected.tokens == 126
    assert values["kl_mean"] == pytest.approx(expected.kl_mean) and values["ppl_quant"] == pytest.approx(expected.ppl_quant)
    assert values["window_tokens"] == [63, 63] and len(values["window_nll_quant"]) == 2
    low, high = values["ppl_increase_interval"]
    assert low <= values["ppl_quant"] / values["ppl_float"] - 1 <= high
    assert f"95% interval over windows {100 * low:+.2f}% .. {100 * high:+.2f}%" in printed


@pytest.mark.parametrize("case, message", [
    ("missing_model", "quantized model not found"),
    ("missing_data", "evaluation data not found"),
    ("no_input_ids", "no input named input_ids"),
    ("too_few_tokens", "fewer than one window"),
    ("text_without_tokenizer", "give --tokenizer"),
])
def test_cli_bad_input_exits_2(models, tmp_path, capsys, case, message):
    ids_path = tmp_path / "ids.npy"
    np.save(ids_path, _ids(300 if case != "too_few_tokens" else 100))
    float_model, quant_model, data = models["float"], models["q4"], ids_path
    if case == "missing_model":
        quant_model = tmp_path / "absent.onnx"
    elif case == "missing_data":
        data = tmp_path / "absent.npy"
    elif case == "no_input_ids":
        float_model = quant_model = tmp_path / "mm.onnx"
        onnx.save(matmul_model(weight((8, 4), seed=0)), float_model)
    elif case == "text_without_tokenizer":
        data = tmp_path / "text.txt"
        data.write_text("some text\n")
    argv = ["eval", str(float_model), str(quant_model), "--data", str(data), "--kind", "lm", "--quiet"]
    assert main(argv) == 2  # bad input raises; the CLI's one error handler makes it one line and exit 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxq: error: ") and message in err and "\n" not in err


def test_cli_failed_json_write_names_the_file(models, tmp_path, capsys):
    ids_path, out = tmp_path / "ids.npy", tmp_path / "absent" / "out.json"
    np.save(ids_path, _ids(200))
    argv = ["eval", str(models["float"]), str(models["q4"]), "--data", str(ids_path), "--context", "64",
            "--max-windows", "1", "--json", str(out), "--quiet"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"onnxq: error: cannot read/write {out}: No such file or directory"


def test_cli_embedding_from_token_ids(tmp_path, capsys):
    proto = make_tiny_transformer(vocab=VOCAB, attention_mask=True, seed=8)
    float_path, quant_path, ids_path = tmp_path / "f.onnx", tmp_path / "q.onnx", tmp_path / "ids.npy"
    onnx.save(proto, float_path)
    onnxq.save(onnxq.quantize(proto, onnxq.QuantConfig(bits=4, block_size=16)), quant_path)
    ids = _ids(100, seed=8)
    np.save(ids_path, ids)
    argv = ["eval", str(float_path), str(quant_path), "--data", str(ids_path), "--kind", "embedding",
            "--output", "logits", "--context", "16", "--json", str(tmp_path / "e.json"), "--quiet"]
    assert eval_command.run(_parse(argv)) == 0
    assert "cosine (logits), mean" in capsys.readouterr().out
    values = json.loads((tmp_path / "e.json").read_text())
    feeds = [{"input_ids": ids[s:s + 16][None, :], "attention_mask": np.ones((1, 16), np.int64)}
             for s in range(0, 96, 16)]  # all 6 windows of 16 tokens
    expected = compare_embeddings(float_path, quant_path, feeds, output="logits")
    assert values["vectors"] == expected.vectors == 96
    assert values["cosine_mean"] == pytest.approx(expected.cosine_mean, rel=1e-9)
