"""Self-generated calibration text (:mod:`onnxq.calibration.generate`, ``onnxq generate``, ``--generate-calib``).

References: the model's own full-sequence forward (a token sampled at a vanishing temperature
is the argmax of the full forward's logits at that position, whether it was decoded through
the KV cache or by recomputing the prefix), and softmax frequencies for the sampler.
"""
import json

import numpy as np
import onnx
import pytest

from onnxq.calibration.generate import _sample, generate_token_ids, start_token
from onnxq.cli import main
from onnxq.errors import OnnxqError
from onnxq.calibration.lm_session import LMSession
from tests.test_kv_models import FORMS, KV
from tests.tiny_transformer import make_tiny_transformer


@pytest.mark.parametrize("form", FORMS)
def test_greedy_limit_follows_the_full_forward(form):
    """KV-cache models (GenAI fp32, Optimum fp16): each token is the full forward's argmax after its prefix."""
    ids = generate_token_ids(KV / form / "model.onnx", samples=3, seq_len=12, start=1, temperature=1e-6, batch=2)
    assert ids.shape == (3, 12) and ids.dtype == np.int64 and (ids[:, 0] == 1).all()
    logits = LMSession(KV / form / "model.onnx", None, "float").logits(ids).astype(np.float64)
    agree = (logits[:, :-1].argmax(-1) == ids[:, 1:]).mean()
    assert agree == 1.0 if form == "genai" else agree >= 0.9, agree  # fp16 logits may tie


def test_a_model_without_kv_cache_recomputes_the_prefix(tmp_path):
    path = tmp_path / "lm.onnx"
    onnx.save(make_tiny_transformer(num_layers=1, hidden=32, heads=2, ffn=32, vocab=50, seed=3), path)
    ids = generate_token_ids(path, samples=2, seq_len=9, start=None, temperature=1e-6, seed=5)
    logits = LMSession(path, None, "float").logits(ids)
    assert (logits[:, :-1].argmax(-1) == ids[:, 1:]).all()
    again = generate_token_ids(path, samples=2, seq_len=9, start=None, temperature=1e-6, seed=5)
    np.testing.assert_array_equal(ids, again)


def test_same_seed_same_ids_other_seed_other_ids():
    model = KV / "genai" / "model.onnx"
    a = generate_token_ids(model, samples=3, seq_len=10, start=1, seed=0, batch=2)
    b = generate_token_ids(model, samples=3, seq_len=10, start=1, seed=0, batch=2)
    c = generate_token_ids(model, samples=3, seq_len=10, start=1, seed=1, batch=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and (0 <= a).all() and (a < 49152).all()


def test_sampler_refuses_nan_or_inf_logits():
    """A broken model's NaN / +inf logits give a one-line error, not an arbitrary token; -inf (a masked
    token) is an ordinary zero probability."""
    rng = np.random.default_rng(0)
    for bad in (np.nan, np.inf):
        logits = np.zeros((2, 5), dtype=np.float32)
        logits[1, 3] = bad
        with pytest.raises(OnnxqError, match="logits hold NaN or \\+inf"):
            _sample(logits, 1.0, rng)
    masked = np.array([[-np.inf, 0.0, -np.inf]], dtype=np.float32)
    assert all(_sample(masked, 1.0, rng)[0, 0] == 1 for _ in range(20))


def test_sampler_frequencies_match_the_softmax():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4, 0.0 + 1e-12]], dtype=np.float32))
    rng = np.random.default_rng(0)
    draws = np.concatenate([_sample(np.repeat(logits, 1000, 0), 1.0, rng) for _ in range(20)])[:, 0]
    freq = np.bincount(draws, minlength=5) / draws.size
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4, 0.0], atol=0.01)
    hot = np.concatenate([_sample(np.repeat(logits, 1000, 0), 2.0, rng) for _ in range(20)])[:, 0]
    expected = np.sqrt([0.1, 0.2, 0.3, 0.4]) / np.sqrt([0.1, 0.2, 0.3, 0.4]).sum()
    np.testing.assert_allclose(np.bincount(hot, minlength=5)[:4] / hot.size, expected, atol=0.01)


def test_start_token_of_real_exporters_folders(tmp_path):
    assert start_token(KV / "genai") == 1 and start_token(KV / "genai" / "model.onnx") == 1  # genai_config.json
    assert start_token(KV / "optimum") == 1  # config.json
    folder = tmp_path / "m"
    folder.mkdir()
    assert start_token(folder / "model.onnx") is None
    (folder / "tokenizer.json").write_bytes((KV / "genai" / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    assert start_token(folder) == 1  # the token named by tokenizer_config.json, looked up in tokenizer.json


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 0}, "samples >= 1"),
    ({"seq_len": 1}, "seq_len >= 2"),
    ({"temperature": 0.0}, "temperature must be"),
    ({"temperature": float("nan")}, "temperature must be"),
    ({"start": 49152}, "outside the model's vocabulary of 49152"),
])
def test_bad_settings_are_named(kwargs, message):
    settings = {"samples": 1, "seq_len": 4, "start": 1, **kwargs}
    with pytest.raises(OnnxqError, match=message):
        generate_token_ids(KV / "genai" / "model.onnx", **settings)


def test_cli_generate_then_calibrate_on_the_file(tmp_path, capsys):
    ids_path = tmp_path / "gen.npy"
    assert main(["generate", str(KV / "genai"), str(ids_path), "--samples", "4", "--seq-len", "16", "--quiet"]) == 0
    ids = np.load(ids_path)
    assert ids.shape == (64,) and (ids.reshape(4, 16)[:, 0] == 1).all()
    np.testing.assert_array_equal(ids.reshape(4, 16), generate_token_ids(KV / "genai" / "model.onnx", samples=4,
                                                                         seq_len=16, start=1))
    assert "quantize --calib-data" in capsys.readouterr().err
    out = tmp_path / "q"
    assert main(["quantize", str(KV / "genai"), str(out), "--quiet", "--algo", "gptq", "--calib-data", str(ids_path),
                 "--seq-len", "16", "--samples", "4"]) == 0, capsys.readouterr().err
    assert (out / "model.onnx").is_file()


def test_quantize_generate_calib_equals_the_saved_ids(tmp_path, capsys):
    """``--generate-calib`` calibrates on the very ids ``onnxq generate`` writes with the same settings."""
    ids_path = tmp_path / "gen.npy"
    assert main(["generate", str(KV / "genai"), str(ids_path), "--samples", "3", "--seq-len", "12", "--quiet"]) == 0
    common = ["--quiet", "--algo", "gptq", "--samples", "3", "--seq-len", "12"]
    assert main(["quantize", str(KV / "genai"), str(tmp_path / "a"), *common, "--generate-calib"]) == 0
    assert main(["quantize", str(KV / "genai"), str(tmp_path / "b"), *common, "--calib-data", str(ids_path)]) == 0
    a, b = (onnx.load(str(tmp_path / name / "model.onnx")) for name in "ab")
    assert {t.name: t.raw_data for t in a.graph.initializer} == {t.name: t.raw_data for t in b.graph.initializer}
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["quantize", "{kv}/genai", "{tmp}/q", "--algo", "gptq", "--generate-calib", "--calib-data", "{tmp}/x.npy"],
     "give --calib-data or --generate-calib, not both"),
    (["quantize", "{tmp}/bare/model.onnx", "{tmp}/q.onnx", "--algo", "gptq", "--generate-calib"],
     "no BOS token id found"),
    (["generate", "{kv}/genai", "{tmp}/ids.txt"], "must be a .npy file"),
    (["generate", "{kv}/genai", "{tmp}/missing/ids.npy"], "folder does not exist"),
    (["generate", "{kv}/genai", "{tmp}/ids.npy", "--temperature", "-1"], "temperature must be"),
    (["generate", "{tmp}/nothing.onnx", "{tmp}/ids.npy"], "model file not found"),
])
def test_errors_are_one_line_and_write_nothing(argv, message, tmp_path, capsys):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "model.onnx").write_bytes((KV / "genai" / "model.onnx").read_bytes())
    (tmp_path / "x.npy").write_bytes(b"")
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([a.format(kv=KV, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("onnxq: error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_sliding_window_cache_model_recomputes_the_prefix(tmp_path):
    """Gemma 3's GenAI form (local attention with a window-sized KV cache, which onnxq cannot continue):
    each step reruns the prefix with the window of zero rows, and follows the plain model's argmax."""
    from tests.test_kv_models import _windowed

    base = onnx.load(str(KV / "genai" / "model.onnx"))
    windowed, plain = tmp_path / "windowed.onnx", tmp_path / "plain.onnx"
    onnx.save(_windowed(base, 8, cache=True), windowed)
    onnx.save(_windowed(base, 8, cache=False), plain)
    ids = generate_token_ids(windowed, samples=2, seq_len=14, start=1, temperature=1e-6)
    logits = LMSession(plain, None, "float").logits(ids)
    assert (logits[:, :-1].argmax(-1) == ids[:, 1:]).all()
