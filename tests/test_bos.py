"""BOS per window: a decoder whose tokenizer starts every text with a BOS token (Gemma's ``<bos>``)
gets calibration windows and evaluation windows that start with it, as its training texts did."""
import json

import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from onnxq.calibration import TextReader
from onnxq.calibration.tokenizer import bos_token, tokenize
from onnxq.cli import main
from onnxq.eval.metrics import compare_lm, perplexity
from tests.graphs import run
from tests.tiny_transformer import make_tiny_transformer

WORDS = [f"w{i}" for i in range(90)]


def _tokenizer(path, template):
    vocab = {"<bos>": 0, "[CLS]": 1, "[SEP]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<bos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if template is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<bos>", 0), ("[CLS]", 1), ("[SEP]", 2)])
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("bos") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS, 20)) for _ in range(40)))
    return path


def test_bos_token_is_what_the_post_processor_puts_before_every_text(tmp_path):
    assert bos_token(_tokenizer(tmp_path / "bos.json", "<bos> $A")) == 0
    assert bos_token(_tokenizer(tmp_path / "plain.json", None)) is None
    assert bos_token(_tokenizer(tmp_path / "bert.json", "[CLS] $A [SEP]")) is None  # an encoder's, not a BOS


def test_calibration_windows_start_with_bos(tmp_path, text):
    model = make_tiny_transformer(vocab=93)
    tokenizer = _tokenizer(tmp_path / "bos.json", "<bos> $A")
    stream = tokenize(text.read_text(), tokenizer)
    assert stream[0] == 0 and (stream[1:] != 0).all()
    reader = TextReader(text, model, tokenizer=tokenizer, seq_len=16, samples=5)
    assert reader.bos == 0
    for i in range(len(reader)):
        ids = reader.get_next()["input_ids"][0]
        start = int(reader.starts[i])
        assert ids[0] == 0 and len(ids) == 16
        np.testing.assert_array_equal(ids[1:], stream[1 + start:1 + start + 15])  # stream without its own BOS
    plain = TextReader(text, model, tokenizer=tokenizer, seq_len=16, samples=5, bos=None)
    assert plain.bos is None and plain.get_next()["input_ids"].shape == (1, 16)


def _reference_nll(model, ids, context, bos):
    """-mean log p over windows [bos] + ids[s : s + context - 1], every stream token scored."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - (context - 1) + 1, context - 1):
        window = np.concatenate([[bos], ids[start:start + context - 1]])[None, :]
        (logits,) = run(model, {"input_ids": window})
        logits = logits[0].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(context - 1), window[0, 1:]].sum()
        count += context - 1
    return total / count, count


def test_perplexity_with_bos_matches_a_direct_computation():
    model = make_tiny_transformer(vocab=97, seed=2)
    ids = np.random.default_rng(3).integers(1, 97, 70).astype(np.int64)
    nll, count = _reference_nll(model, ids, context=12, bos=0)
    result = perplexity(model, ids, context=12, bos=0)
    assert result.tokens == count == 66 and result.windows == 6
    assert result.nll == pytest.approx(nll, rel=1e-6)
    compared = compare_lm(model, model, ids, context=12, bos=0)
    assert compared.nll_float == pytest.approx(nll, rel=1e-6) and compared.kl_mean == pytest.approx(0, abs=1e-9)
    overlapping = perplexity(model, ids, context=12, stride=5, bos=0)  # later windows score their last 5
    assert overlapping.tokens == 11 + 5 * (overlapping.windows - 1)


def test_cli_eval_bos(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(make_tiny_transformer(vocab=97, seed=2), src)
    np.save(tmp_path / "ids.npy", np.random.default_rng(3).integers(1, 97, 70))
    report = tmp_path / "r.json"
    assert main(["eval", str(src), str(src), "--data", str(tmp_path / "ids.npy"), "--context", "12", "--bos", "0",
                 "--json", str(report), "--quiet"]) == 0
    values = json.loads(report.read_text())
    assert values["bos"] == 0 and values["tokens"] == 66
    assert main(["eval", str(src), str(src), "--data", str(tmp_path / "ids.npy"), "--context", "12", "--json",
                 str(report), "--quiet"]) == 0
    assert json.loads(report.read_text())["bos"] is None  # auto: .npy ids carry no tokenizer
    assert main(["eval", str(src), str(src), "--data", str(tmp_path / "ids.npy"), "--bos", "x"]) == 2
