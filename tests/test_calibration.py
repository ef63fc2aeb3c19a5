"""Calibration layer: readers, text reader (real ONNX tokenizers), probes (real ORT sessions), accumulators."""
import json
import logging
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxq.calibration import (
    AbsMaxAccumulator,
    AbsMeanAccumulator,
    ActivationProbe,
    HessianAccumulator,
    MeanSquareAccumulator,
    ListReader,
    NpzReader,
    RowSampler,
    TextReader,
    as_reader,
    collect_statistics,
    materialize,
    save_npz,
    validate_feed,
)
from onnxq.calibration import probe as probe_module
from onnxq.errors import OnnxqError
from onnxq.io import save_model
from onnxq.graph.sites import find_weight_sites
from tests.graphs import make_model, matmul_model, run, weight
from tests.tiny_transformer import make_tiny_transformer, reference_forward


def ids_model(seq=None):
    """A model with inputs input_ids [batch, seq] int64 and attention_mask [batch, seq] int64."""
    return make_tiny_transformer(num_layers=1, attention_mask=True, seq=seq)


# ---------------------------------------------------------------- readers

def test_list_reader_rewinds_and_materialize_limits():
    feeds = [{"x": np.full((1, 7, 4), i, np.float32)} for i in range(5)]
    reader = ListReader(feeds)
    assert [f["x"][0, 0, 0] for f in materialize(reader, 3)] == [0, 1, 2]
    reader.rewind()
    assert len(materialize(reader)) == 5
    assert reader.get_next() is None


def test_npz_per_sample_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 97, (1, n)), "attention_mask": np.ones((1, n), np.int64)} for n in (5, 9, 3)]
    save_npz(tmp_path / "calib.npz", feeds)
    reader = NpzReader(tmp_path / "calib.npz")
    got = materialize(reader, model_inputs=ids_model())
    assert len(got) == len(reader) == 3
    for a, b in zip(got, feeds):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_npz_stacked_layout_splits_batches(tmp_path):
    x = np.arange(6 * 7 * 4, dtype=np.float32).reshape(6, 7, 4)
    np.savez(tmp_path / "stacked.npz", x=x)
    feeds = materialize(NpzReader(tmp_path / "stacked.npz", batch_size=2), model_inputs=matmul_model(weight((4, 3), 0)))
    assert [f["x"].shape for f in feeds] == [(2, 7, 4)] * 3
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    with pytest.raises(OnnxqError, match="do not divide into samples of batch_size 4"):
        NpzReader(tmp_path / "stacked.npz", batch_size=4)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "mixed.npz", **{"0/x": np.zeros(3), "y": np.zeros(3)})
    with pytest.raises(OnnxqError, match="mixes per-sample keys"):
        NpzReader(tmp_path / "mixed.npz")
    np.savez(tmp_path / "ragged.npz", a=np.zeros((4, 2)), b=np.zeros((3, 2)))
    with pytest.raises(OnnxqError, match="same length along axis 0"):
        NpzReader(tmp_path / "ragged.npz")
    with pytest.raises(OnnxqError, match="calibration file not found"):
        NpzReader(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(OnnxqError, match="cannot read calibration file"):
        NpzReader(tmp_path / "bad.npz")


def test_ort_reader_subclass_and_iterables_are_accepted():
    from onnxruntime.quantization import CalibrationDataReader as OrtReader

    class Reader(OrtReader):  # ORT's base class: get_next only, no rewind
        def __init__(self):
            self.data = iter([{"x": np.ones((1, 4), np.float32) * i} for i in range(4)])

        def get_next(self):
            return next(self.data, None)

    reader = as_reader(Reader())
    assert len(materialize(reader, 2)) == 2 and len(materialize(reader)) == 2
    with pytest.raises(OnnxqError, match="cannot be rewound"):
        reader.rewind()
    listed = as_reader([{"x": np.zeros(2)}, {"x": np.ones(2)}])
    assert len(materialize(listed)) == 2
    listed.rewind()
    assert len(materialize(listed)) == 2
    assert len(materialize(({"x": np.zeros(2)} for _ in range(3)), max_samples=2)) == 2
    with pytest.raises(OnnxqError, match="no samples"):
        materialize([])
    with pytest.raises(OnnxqError, match="found a single dict"):
        as_reader({"x": np.zeros(2)})


def test_validate_feed_messages():
    model = ids_model(seq=8)
    ok = {"input_ids": np.zeros((1, 8), np.int64), "attention_mask": np.ones((1, 8), np.int64)}
    validate_feed(ok, model)
    cases = [
        ({**ok, "ids": ok["input_ids"]},
         "calibration input 'ids' is not an input of the model (inputs: input_ids, attention_mask)"),
        ({"input_ids": ok["input_ids"]}, "calibration sample lacks model input 'attention_mask'"),
        ({**ok, "input_ids": ok["input_ids"].astype(np.int32)},
         "calibration input 'input_ids' has dtype int32; the model expects int64"),
        ({**ok, "input_ids": ok["input_ids"][0]},
         "calibration input 'input_ids' has shape (8,) (rank 1); the model expects rank 2 [batch, 8]"),
        ({**ok, "attention_mask": np.ones((1, 5), np.int64)},
         "calibration input 'attention_mask' has shape (1, 5); the model expects [batch, 8]"),
        ({**ok, "input_ids": [[0] * 8]}, "calibration input 'input_ids' must be a numpy array, found list"),
    ]
    for feed, message in cases:
        with pytest.raises(OnnxqError) as info:
            validate_feed(feed, model)
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
    with pytest.raises(OnnxqError, match="not an input of the model"):
        materialize([{**ok, "ids": ok["input_ids"]}], model_inputs=ir.serde.deserialize_model(model))


# ---------------------------------------------------------------- text

def test_text_reader_token_ids_windows(tmp_path):
    stream = np.arange(1000)
    np.save(tmp_path / "ids.npy", stream)
    model = make_tiny_transformer(num_layers=1, attention_mask=True, position_ids=True)
    reader = TextReader(None, model, token_ids=tmp_path / "ids.npy", seq_len=16, samples=5, seed=3)
    feeds = materialize(reader)
    assert len(feeds) == 5
    starts = []
    for feed in feeds:
        assert feed["input_ids"].shape == (1, 16) and feed["input_ids"].dtype == np.int64
        start = int(feed["input_ids"][0, 0])
        assert start % 16 == 0  # aligned, non-overlapping windows ...
        np.testing.assert_array_equal(feed["input_ids"][0], stream[start:start + 16])  # ... of the stream
        np.testing.assert_array_equal(feed["attention_mask"], np.ones((1, 16)))
        np.testing.assert_array_equal(feed["position_ids"], np.arange(16)[None])
        starts.append(start)
    assert starts == sorted(set(starts))
    reader.rewind()
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(materialize(reader), feeds))
    other = materialize(TextReader(None, model, token_ids=stream, seq_len=16, samples=5, seed=4))
    assert any((a["input_ids"] != b["input_ids"]).any() for a, b in zip(other, feeds))
    # the feeds run in the model (with ids folded into its vocabulary)
    feed = {**feeds[0], "input_ids": feeds[0]["input_ids"] % 97}
    (logits,) = run(model, feed)
    ref, _ = reference_forward(model, feed["input_ids"], attention_mask=feed["attention_mask"],
                               position_ids=feed["position_ids"])
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_text_reader_few_windows_and_errors(caplog):
    model = ids_model()
    with caplog.at_level(logging.WARNING):
        reader = TextReader(None, model, token_ids=np.arange(50), seq_len=16, samples=10)
    assert len(reader) == 3 and "only 3 windows" in caplog.text
    with pytest.raises(OnnxqError, match="has 10 tokens, fewer than seq_len=16"):
        TextReader(None, model, token_ids=np.arange(10), seq_len=16)
    with pytest.raises(OnnxqError, match="static length|expects"):
        TextReader(None, ids_model(seq=8), token_ids=np.arange(100), seq_len=16)
    with pytest.raises(OnnxqError, match=r"no input named input_ids \(inputs: x\)"):
        TextReader(None, matmul_model(weight((4, 3), 0)), token_ids=np.arange(100), seq_len=16)
    with pytest.raises(OnnxqError, match="1-D integer array"):
        TextReader(None, model, token_ids=np.zeros((4, 4)), seq_len=2)
    with pytest.raises(OnnxqError, match="needs a tokenizer"):
        TextReader("some text", model)


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s", "a", "dog", "."]


def bert_tokenizer(path):
    extensions = pytest.importorskip("onnxruntime_extensions")
    SingleOpGraph, make_onnx_model = extensions.SingleOpGraph, extensions.make_onnx_model

    graph = SingleOpGraph.build_graph("BertTokenizer", vocab="\n".join(BERT_VOCAB), do_lower_case=1)
    onnx.save(make_onnx_model(graph), path)
    return path


def test_text_reader_with_bert_tokenizer(tmp_path):
    """A real onnxruntime-extensions BertTokenizer; chunks of one line each get [CLS] ... [SEP]."""
    text = "The cats sat on the mat.\nA dog sat on a cat.\n"
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    tok = bert_tokenizer(tmp_path / "tok.onnx")
    v = {w: i for i, w in enumerate(BERT_VOCAB)}
    line1 = ["[CLS]", "the", "cat", "##s", "sat", "on", "the", "mat", ".", "[SEP]"]
    line2 = ["[CLS]", "a", "dog", "sat", "on", "a", "cat", ".", "[SEP]"]
    expected = np.array([v[w] for w in line1 + line2])
    reader = TextReader(tmp_path / "text.txt", ids_model(), tokenizer=tok, seq_len=4, samples=100, chunk_chars=30)
    np.testing.assert_array_equal(reader.tokens, expected)
    feeds = materialize(reader)
    np.testing.assert_array_equal(np.concatenate([f["input_ids"][0] for f in feeds]), expected[:16])
    # the same text given as a string, as one chunk: one [CLS] ... [SEP] around everything
    whole = TextReader(text, ids_model(), tokenizer=str(tok), seq_len=4, chunk_chars=1000)
    np.testing.assert_array_equal(whole.tokens, [v[w] for w in line1[:-1] + line2[1:]])


def gpt2_tokenizer(path):
    """A byte-level BPE (GPT-2) tokenizer with 256 byte tokens and 5 merges."""
    extensions = pytest.importorskip("onnxruntime_extensions")
    SingleOpGraph, make_onnx_model = extensions.SingleOpGraph, extensions.make_onnx_model

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            byte_chars[byte] = chr(byte)
        else:
            byte_chars[byte] = chr(256 + extra)
            extra += 1
    vocab = {byte_chars[b]: b for b in range(256)}
    merges = ["t h", "th e", "Ġ c", "Ġc a", "Ġca t"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    graph = SingleOpGraph.build_graph("GPT2Tokenizer", vocab=json.dumps(vocab), merges="\n".join(merges))
    onnx.save(make_onnx_model(graph), path)
    return vocab


def test_text_reader_with_gpt2_tokenizer(tmp_path):
    """A real BPE tokenizer whose outputs are [batch, len] with an attention mask."""
    vocab = gpt2_tokenizer(tmp_path / "bpe.onnx")
    reader = TextReader("the cat sat\nthe cat", ids_model(), tokenizer=tmp_path / "bpe.onnx", seq_len=3, chunk_chars=12)
    expected = [vocab["the"], vocab["Ġcat"], ord(" "), ord("s"), ord("a"), ord("t"), vocab["Ċ"],
                vocab["the"], vocab["Ġcat"]]
    np.testing.assert_array_equal(reader.tokens, expected)
    assert len(reader) == 3


# ---------------------------------------------------------------- probe

def activation_names(model):
    sites, _ = find_weight_sites(model)
    return {s.name: s.activation.name for s in sites}


def test_probe_matches_numpy_and_leaves_model_alone():
    proto = make_tiny_transformer(norm="decomposed", seed=5)
    model = ir.serde.deserialize_model(proto)
    before = ir.to_proto(model).SerializeToString()
    names = activation_names(model)
    wanted = ["layers.0.self_attn.q_proj", "layers.1.mlp.fc2", "lm_head"]
    probe = ActivationProbe(model, [names[w] for w in wanted])
    ids = np.random.default_rng(1).integers(0, 97, (2, 10))
    got = probe.run({"input_ids": ids})
    _, ref = reference_forward(proto, ids, norm="decomposed")
    for w in wanted:
        np.testing.assert_allclose(got[names[w]], ref[w], rtol=1e-4, atol=1e-4 * np.abs(ref[w]).max())
    assert ir.to_proto(model).SerializeToString() == before
    assert [o.name for o in model.graph.outputs] == ["logits"]


def test_probe_writes_outputs_into_the_callers_arrays():
    model = ir.serde.deserialize_model(make_tiny_transformer(norm="decomposed", seed=5))
    names = activation_names(model)
    probe = ActivationProbe(model, ["logits", names["layers.1.mlp.fc2"]])
    ids = np.random.default_rng(1).integers(0, 97, (2, 10))
    expected = probe.run({"input_ids": ids})
    buffer = np.full_like(expected["logits"], np.nan)
    for _ in range(2):  # the same array each run, filled again
        got = probe.run({"input_ids": ids}, out={"logits": buffer})
        assert got["logits"] is buffer
        np.testing.assert_array_equal(buffer, expected["logits"])
        np.testing.assert_array_equal(got[names["layers.1.mlp.fc2"]], expected[names["layers.1.mlp.fc2"]])
        buffer[...] = np.nan
    with pytest.raises(OnnxqError, match="onnxruntime failed on a calibration sample"):
        probe.run({"input_ids": ids}, out={"logits": np.empty((1, 1, 1), np.float32)})  # the wrong shape


def test_probe_prunes_to_what_the_tensors_need():
    model = ir.serde.deserialize_model(make_tiny_transformer(num_layers=2))
    name = activation_names(model)["layers.0.self_attn.q_proj"]
    probe = ActivationProbe(model, [name])
    nodes = {n.name for n in probe._nodes}
    assert "layers.0.input_layernorm" in nodes and not any(n.startswith("layers.1") or n == "lm_head" for n in nodes)


def test_probe_external_data_and_large_in_memory_weights(tmp_path, caplog):
    """Weights above INLINE_LIMIT reach ORT as OrtValues (memory-mapped from external data)."""
    proto = make_tiny_transformer(num_layers=1, hidden=256, heads=4, ffn=512, vocab=64, seed=2)
    assert 256 * 512 * 4 >= probe_module.INLINE_LIMIT
    save_model(ir.serde.deserialize_model(proto), tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size > 1_000_000
    names = activation_names(ir.serde.deserialize_model(proto))
    tensors = [names["layers.0.mlp.fc2"], names["lm_head"]]
    ids = np.random.default_rng(2).integers(0, 64, (1, 12))
    _, ref = reference_forward(proto, ids)
    in_memory = ir.serde.deserialize_model(proto)
    for graph_value in in_memory.graph.initializers.values():  # numpy-backed ir.Tensor, as a pass would leave
        graph_value.const_value = ir.tensor(graph_value.const_value.numpy(), name=graph_value.name)
    # from disk every initializer is memory-mapped; in memory only q/k/v/o [256, 256] and fc1/fc2 [256, 512]
    for source in (tmp_path / "m.onnx", in_memory):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="onnxq.calibration.probe"):
            got = ActivationProbe(source, tensors).run({"input_ids": ids})
        passed = int(re.search(r"(\d+) initializers passed as OrtValues", caplog.text).group(1))
        assert passed == 6 if source is in_memory else passed > 6
        for site, name in zip(["layers.0.mlp.fc2", "lm_head"], tensors):
            np.testing.assert_allclose(got[name], ref[site], rtol=1e-4, atol=1e-4 * np.abs(ref[site]).max())


def test_probe_inputs_passthrough_and_errors():
    model = matmul_model(weight((8, 4), 0))
    probe = ActivationProbe(model, ["x", "y", "x"])
    assert probe.tensor_names == ["x", "y"] and probe.input_names == ["x"]
    x = np.random.default_rng(0).standard_normal((2, 7, 8)).astype(np.float32)
    got = probe.run({"x": x})
    np.testing.assert_array_equal(got["x"], x)
    np.testing.assert_allclose(got["y"], x @ weight((8, 4), 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(OnnxqError, match="tensor 'nope' is not a value of the model's main graph"):
        ActivationProbe(model, ["nope"])
    with pytest.raises(OnnxqError, match="'W' is an initializer"):
        ActivationProbe(model, ["W"])
    with pytest.raises(OnnxqError, match="the probe needs 'x' in the feed"):
        probe.run({})


def test_probe_cut_input_without_declared_type():
    """Intermediate values of helper-built graphs have no type; the probe takes it from the feed."""
    w1, w2 = weight((8, 8), 1), weight((8, 3), 2)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], {"W1": w1, "W2": w2})
    probe = ActivationProbe(model, ["y"], feed_names=["h"])
    h = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(probe.run({"h": h})["y"], np.maximum(h, 0) @ w2, rtol=1e-5, atol=1e-6)


def test_probe_reads_the_model_as_it_is_now():
    """A probe built after a weight was replaced (as a quantization pass does) runs the new weight."""
    w = weight((8, 4), 0)
    model = ir.serde.deserialize_model(matmul_model(w))
    model.graph.initializers["W"].const_value = ir.tensor(2 * w, name="W")
    x = np.random.default_rng(1).standard_normal((1, 7, 8)).astype(np.float32)
    np.testing.assert_allclose(ActivationProbe(model, ["y"]).run({"x": x})["y"], x @ (2 * w), rtol=1e-5, atol=1e-6)


def test_probe_follows_outer_scope_values_into_subgraphs():
    w = weight((8, 8), 4)

    def branch(op):  # reads "h" from the main graph
        return helper.make_graph([helper.make_node(op, ["h"], [f"{op}_out"])], op, [],
                                 [helper.make_tensor_value_info(f"{op}_out", TensorProto.FLOAT, None)])

    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("If", ["cond"], ["z"], name="if", then_branch=branch("Relu"), else_branch=branch("Neg"))],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])], {"W": w})
    probe = ActivationProbe(model, ["z"])
    assert [n.name for n in probe._nodes] == ["mm", "if"] and probe.input_names == ["x", "cond"]
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    for cond, ref in ((True, np.maximum(x @ w, 0)), (False, -(x @ w))):
        np.testing.assert_allclose(probe.run({"x": x, "cond": np.array(cond)})["z"], ref, rtol=1e-5, atol=1e-6)


def test_iter_samples_streams_one_sample_at_a_time():
    model = matmul_model(weight((8, 4), 0))
    pulled = []

    def feeds():
        for i in range(3):
            pulled.append(i)
            yield {"x": np.full((1, 7, 8), i, np.float32)}

    probe = ActivationProbe(model, ["y"])
    stream = probe.iter_samples(feeds())
    first = next(stream)
    assert pulled == [0] and first["y"].shape == (1, 7, 4)
    assert len(list(stream)) == 2 and pulled == [0, 1, 2]


def test_collect_statistics_skips_padding_rows():
    proto = make_tiny_transformer(num_layers=1, attention_mask=True, seed=7)
    model = ir.serde.deserialize_model(proto)
    names = activation_names(model)
    act = names["layers.0.mlp.fc1"]
    rng = np.random.default_rng(5)
    feeds = []
    for length in (9, 6, 3):
        mask = np.zeros((1, 9), np.int64)
        mask[0, :length] = 1
        feeds.append({"input_ids": rng.integers(0, 97, (1, 9)), "attention_mask": mask})
    hessian, absmean = HessianAccumulator(64), AbsMeanAccumulator()
    count = collect_statistics(ActivationProbe(model, [act]), feeds, {act: [hessian, absmean]})
    rows = []
    for feed in feeds:
        _, ref = reference_forward(proto, feed["input_ids"], attention_mask=feed["attention_mask"])
        rows.append(ref["layers.0.mlp.fc1"][0][feed["attention_mask"][0] == 1])
    x = np.concatenate(rows)
    assert count == 3 and hessian.count == len(x) == 18
    np.testing.assert_allclose(hessian.hessian, 2 / len(x) * x.T @ x, rtol=1e-4, atol=1e-4 * np.abs(x).max() ** 2)
    np.testing.assert_allclose(absmean.value(), np.abs(x).mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(OnnxqError, match="no probe output named 'other'"):
        collect_statistics(ActivationProbe(model, [act]), feeds, {"other": [absmean]})


# ---------------------------------------------------------------- accumulators

def activations(rows=300, k=24, seed=0):
    x = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    x[:, 5] *= 30.0  # an outlier channel
    return x


def chunks(x, sizes):
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == len(x)
    return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("sizes", [[300], [1, 99, 200], [150, 0, 150], [7] * 42 + [6]])
def test_hessian_matches_numpy_for_any_chunking(sizes):
    x = activations()
    acc = HessianAccumulator(24)
    for part in chunks(x, sizes):
        acc.update(part.reshape(1, -1, 24) if len(part) else part)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(acc.hessian, 2.0 / len(x) * x64.T @ x64, rtol=1e-12, atol=1e-12)
    assert acc.count == 300


def test_hessian_float32_product():
    x = activations(seed=5)
    acc = HessianAccumulator(24, dtype=np.float32)
    for part in chunks(x, [100, 200]):
        acc.update(part)
    x64 = x.astype(np.float64)
    ref = 2.0 / len(x) * x64.T @ x64
    assert acc.hessian.dtype == np.float64
    np.testing.assert_allclose(acc.hessian, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(OnnxqError, match="float32 or float64"):
        HessianAccumulator(4, dtype=np.float16)


def test_hessian_update_is_gptq_running_average():
    """H after each update equals 2/n_total * sum X^T X so far (GPTQ's add_batch)."""
    x = activations(40, 6, seed=1).astype(np.float64)
    acc = HessianAccumulator(6)
    for n in (10, 25, 40):
        acc.update(x[acc.count:n])
        np.testing.assert_allclose(acc.hessian, 2.0 / n * x[:n].T @ x[:n], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sizes", [[300], [3, 297], [100, 100, 100]])
def test_abs_mean_and_max_match_numpy(sizes):
    x = activations(seed=2)
    mean, peak = AbsMeanAccumulator(), AbsMaxAccumulator(24)
    for part in chunks(x, sizes):
        mean.update(part[None])
        peak.update(part)
    np.testing.assert_allclose(mean.value(), np.abs(x.astype(np.float64)).mean(0), rtol=1e-13)
    np.testing.assert_array_equal(peak.value(), np.abs(x).max(0))
    assert mean.count == peak.count == 300


def test_mask_drops_rows_in_row_major_order():
    x = activations(2 * 5, 8, seed=3).reshape(2, 5, 8)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    kept = x[mask == 1].astype(np.float64)
    acc, flat = HessianAccumulator(8), HessianAccumulator(8)
    acc.update(x, mask)
    flat.update(x.reshape(10, 8), mask)  # a graph that flattened [batch, seq] keeps the same row order
    np.testing.assert_allclose(acc.hessian, 2 / 7 * kept.T @ kept, rtol=1e-12)
    np.testing.assert_array_equal(acc.hessian, flat.hessian)
    peak = AbsMaxAccumulator()
    peak.update(x, mask)
    np.testing.assert_array_equal(peak.value(), np.abs(kept).max(0))
    with pytest.raises(OnnxqError, match="mask has 9 elements but the activations"):
        acc.update(x, np.ones(9))
    with pytest.raises(OnnxqError, match="K=8"):
        acc.update(np.ones((3, 4)))
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(OnnxqError, match="NaN or Inf"):
        AbsMeanAccumulator().update(bad)


def bottom_k_reference(x, max_rows, seed):
    """The rows with the ``max_rows`` smallest keys of one uniform stream, one draw per row, in row order."""
    keys = np.random.default_rng(seed).random(len(x))
    return x[np.sort(np.argsort(keys, kind="stable")[:max_rows])]


@pytest.mark.parametrize("sizes", [[300], [1, 2, 297], [64] * 4 + [44], [20, 280]])
def test_row_sampler_is_bottom_k_for_any_chunking(sizes):
    x = activations(seed=4)
    sampler = RowSampler(32, seed=9)
    for part in chunks(x, sizes):
        sampler.update(part)
    np.testing.assert_array_equal(sampler.rows(), bottom_k_reference(x, 32, 9))
    assert sampler.count == 300
    small = RowSampler(500, seed=1)
    small.update(x)
    np.testing.assert_array_equal(small.rows(), x)


def _shard_accumulators(samples, shards):
    """Each accumulator kind fed per shard of sample indices, then merged in shard order."""
    makers = [lambda: HessianAccumulator(8, dtype=np.float32), lambda: AbsMeanAccumulator(8),
              lambda: MeanSquareAccumulator(8), lambda: AbsMaxAccumulator(8), lambda: RowSampler(24, seed=3, k=8)]
    merged = []
    for make in makers:
        parts = []
        for shard in shards:
            part = make()
            for i in shard:
                part.update(samples[i], sample=i)
            parts.append(part)
        for part in parts[1:]:
            parts[0].merge(part)
        merged.append(parts[0])
    return merged


def _read(acc):
    if isinstance(acc, HessianAccumulator):
        return acc.hessian
    return acc.rows() if isinstance(acc, RowSampler) else acc.value()


@pytest.mark.parametrize("shards", [[[0, 2, 4], [1, 3, 5, 6]], [[6, 5], [0], [1, 2, 3, 4]], [[0, 1, 2, 3, 4, 5, 6], []]])
def test_merged_shards_equal_one_accumulator(shards):
    """Data-parallel calibration: statistics of disjoint shards of the samples, merged, equal those
    of one accumulator that saw every sample (RowSampler exactly; sums up to float order)."""
    rng = np.random.default_rng(0)
    samples = [rng.standard_normal((int(rng.integers(3, 20)), 8)).astype(np.float32) for _ in range(7)]
    whole = _shard_accumulators(samples, [list(range(7))])
    for one, merged in zip(whole, _shard_accumulators(samples, shards)):
        assert merged.count == one.count == sum(len(s) for s in samples)
        if isinstance(one, RowSampler):
            np.testing.assert_array_equal(_read(merged), _read(one))
        else:
            np.testing.assert_allclose(_read(merged), _read(one), rtol=1e-12, atol=1e-12)


def test_merge_rejects_mismatched_accumulators():
    with pytest.raises(OnnxqError, match="cannot merge"):
        HessianAccumulator(4).merge(HessianAccumulator(5))
    with pytest.raises(OnnxqError, match="cannot merge"):
        AbsMeanAccumulator(4).merge(MeanSquareAccumulator(4))
    streamed = RowSampler(4, k=2)
    streamed.update(np.ones((3, 2), np.float32))
    with pytest.raises(OnnxqError, match="sample indices"):
        RowSampler(4, k=2).merge(streamed)


def test_row_sampler_is_uniform():
    x = np.arange(20, dtype=np.float32)[:, None]
    hits = np.zeros(20)
    for seed in range(2000):
        sampler = RowSampler(5, seed=seed)
        sampler.update(x[:7])
        sampler.update(x[7:])
        hits[sampler.rows()[:, 0].astype(int)] += 1
    np.testing.assert_allclose(hits / 2000, 0.25, atol=0.035)
