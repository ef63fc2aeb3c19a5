"""KV-cache LMs as the real exporters write them: the ONNX Runtime GenAI builder and Optimum.

Fixtures (``models/kv/``, made by ``scripts/export_kv_fixtures.py`` from a tiny random-weight
Llama config and the real SmolLM2 tokenizer): ``genai/`` (GroupQueryAttention, fused QKV,
SkipSimplifiedLayerNormalization, tied embedding ``Gather(Transpose(lm_head weight))``, past
head size left symbolic) and ``optimum/`` (fp16, ``position_ids``, static past dims).
Calibration is from a plain text file with the folder's own ``tokenizer.json``; every
quantized folder must load in onnxruntime, keep every other file byte for byte, and decode
through its KV cache exactly as its full-sequence forward says.
"""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from pydoc_data.topics import topics

from onnxq.calibration import InputFiller, InputSpec, input_specs, tokenize
from onnxq.cli import main
from onnxq.errors import OnnxqError
from onnxq.eval.metrics import decode_check

ROOT = Path(__file__).resolve().parents[1]
KV = ROOT / "models" / "kv"
FORMS = ("genai", "optimum")
TEXT = "\n\n".join(list(topics.values())[:40])  # plain English text of the stdlib (pydoc_data.topics)


def _reference():
    return json.loads((KV / "tokenizer_reference.json").read_text())


@pytest.mark.parametrize("form", FORMS)
def test_tokenizer_json_gives_the_hugging_face_ids(form):
    for sample in _reference()["samples"]:
        ids = tokenize(sample["text"], KV / form)  # the folder: its tokenizer.json
        assert ids.tolist() == sample["ids_with_special_tokens"], sample["text"]


@pytest.mark.parametrize("form,dtype", [("genai", np.float32), ("optimum", np.float16)])
def test_inputs_are_filled_with_an_empty_past_in_the_model_dtype(form, dtype):
    model_file = KV / form / "model.onnx"
    filler = InputFiller(input_specs(model_file))
    assert filler.has_past and {(p.kv_heads, p.head_size) for p in filler.past} == {(1, 16)}
    feed = filler.feed(np.array([[504, 2365, 6354, 16438]]))
    assert all(feed[p.name].shape == (1, 1, 0, 16) and feed[p.name].dtype == dtype for p in filler.past)
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], feed)[0]
    assert logits.shape == (1, 4, 49152) and np.isfinite(logits).all()


def test_unknown_inputs_are_named():
    specs = input_specs(KV / "optimum" / "model.onnx") + [
        InputSpec("cache_position", np.dtype(np.int64), (None,)), InputSpec("token_mask", np.dtype(np.int64), None)]
    with pytest.raises(OnnxqError, match="inputs 'cache_position', 'token_mask' that onnxq cannot fill"):
        InputFiller(specs)


def test_decode_check_catches_a_broken_kv_path(tmp_path):
    """Scaling the cached keys changes nothing in a full forward, everything when decoding from the cache."""
    model = onnx.load(str(KV / "genai" / "model.onnx"))
    scale = onnx.numpy_helper.from_array(np.array(1.5, dtype=np.float32), "broken_scale")
    model.graph.initializer.append(scale)
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and "present.0.key" in node.output:
            node.output[:] = ["broken_present" if name == "present.0.key" else name for name in node.output]
    model.graph.node.append(onnx.helper.make_node("Mul", ["broken_present", "broken_scale"], ["present.0.key"]))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    ids = tokenize(TEXT[:2000], KV / "genai")[:40]
    assert decode_check(KV / "genai" / "model.onnx", ids, steps=8).relative_diff < 1e-5
    assert decode_check(broken, ids, steps=8).relative_diff > 1e-3


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT)
    return path


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "model.onnx"}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("algo", ["rtn", "gptq", "awq"])
def test_quantize_folder_from_text(form, algo, calib_text, tmp_path, capsys):
    out = tmp_path / f"{form}_{algo}"
    flags = [] if algo == "rtn" else ["--algo", algo, "--calib-data", str(calib_text), "--samples", "4",
                                      "--seq-len", "32", "--awq-grid", "4"]
    assert main(["quantize", str(KV / form), str(out), "--quiet", *flags]) == 0, capsys.readouterr().err
    assert _folder_files(out) == _folder_files(KV / form), "every other file is copied unchanged"
    model = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    levels = {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"}
    # the tied table is shared with the lm_head at 8 bits (the default); a GenAI folder runs at
    # accuracy_level 4 (the builder's CPU default), a plain model at 0
    (gather,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    table = next((n.input[0] for n in model.graph.node if n.output[0] == gather.input[0]), gather.input[0])
    (head,) = [n for n in nbits if n.input[1] == table]  # one packed weight, read by both
    bits = {a.name: a.i for n in (gather, head) for a in n.attribute if a.name == "bits"}
    assert levels == ({4} if form == "genai" else {0}) and bits == {"bits": 8} and ops.count("GatherBlockQuantized") == 1
    ids = tokenize(TEXT[-3000:], KV / form)[:48]
    check = decode_check(out / "model.onnx", ids, steps=8)
    if levels == {4}:  # int8 activations are quantized per call: a one-token step rounds differently
        assert check.relative_diff < 5e-2 and check.top1_agreement >= 7 / 9, check
    else:
        assert check.top1_agreement == 1.0 and check.relative_diff < 5e-3, check


def test_eval_on_folders_runs_the_decode_check(calib_text, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(KV / "genai"), str(out), "--quiet"]) == 0
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["eval", str(KV / "genai"), str(out), "--data", str(calib_text), "--context", "48",
                 "--max-windows", "2", "--quiet", "--json", str(report)]) == 0
    values = json.loads(report.read_text())
    assert values["decode_quant"]["top1_agreement"] == 1.0 and values["kl_mean"] < 1.0
    assert "KV-cache decode vs full forward, quant" in capsys.readouterr().out


def test_quantized_genai_folder_generates_with_onnxruntime_genai(tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "q"
    assert main(["quantize", str(KV / "genai"), str(out), "--quiet"]) == 0
    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=24, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode("The quick brown fox"))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 24


@pytest.mark.parametrize("case,message", [
    ("output_not_empty", "exists and is not empty"),
    ("no_model", "no .onnx model in folder"),
    ("two_models", "holds 2 .onnx models"),
    ("bad_genai_config", "does not name the decoder model"),
])
def test_folder_errors_are_one_line(case, message, tmp_path, capsys):
    source, out = KV / "genai", tmp_path / "out"
    if case == "output_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case in ("no_model", "two_models", "bad_genai_config"):
        source = tmp_path / "in"
        source.mkdir()
        (source / "tokenizer.json").write_text("{}")
        if case == "two_models":
            for name in ("a.onnx", "b.onnx"):
                (source / name).write_bytes((KV / "optimum" / "model.onnx").read_bytes())
        if case == "bad_genai_config":
            (source / "genai_config.json").write_text('{"model": {}}')
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["quantize", str(source), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxq: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "nothing written, nothing left behind"


def test_text_calibration_without_a_tokenizer_is_one_line(tmp_path, capsys, calib_text):
    model = tmp_path / "model.onnx"
    model.write_bytes((KV / "optimum" / "model.onnx").read_bytes())
    assert main(["quantize", str(model), str(tmp_path / "q.onnx"), "--quiet", "--algo", "gptq",
                 "--calib-data", str(calib_text)]) == 2
    assert "has no tokenizer.json: give --tokenizer" in capsys.readouterr().err


def test_npz_with_only_input_ids_is_completed_for_a_kv_model(tmp_path):
    from onnxq.calibration import NpzReader, materialize, save_npz

    path = tmp_path / "ids.npz"
    save_npz(path, [{"input_ids": np.array([[504, 2365, 6354, 16438, 27003]], dtype=np.int64)}])
    model = KV / "optimum" / "model.onnx"
    (feed,) = materialize(NpzReader(path), model_inputs=model)
    assert feed["position_ids"].tolist() == [[0, 1, 2, 3, 4]] and feed["attention_mask"].shape == (1, 5)
    assert feed["past_key_values.1.value"].shape == (1, 1, 0, 16) and feed["past_key_values.1.value"].dtype == np.float16
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert session.run(["logits"], feed)[0].shape == (1, 5, 49152)


def test_inspect_and_summary_take_folders(tmp_path, capsys):
    assert main(["inspect", str(KV / "genai")]) == 0
    printed = capsys.readouterr().out
    assert "Transpose+Gather" in printed and "(accuracy_level 4)" in printed  # the GenAI defaults, as quantize
    out = tmp_path / "q"
    assert main(["quantize", str(KV / "genai"), str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["summary", str(out)]) == 0
    assert "1 GatherBlockQuantized, 11 MatMulNBits" in capsys.readouterr().out


def test_head_size_of_split_qkv_with_per_head_norms():
    """Gemma 3 as the GenAI builder writes it: one packed QKV MatMul, Split into q / k / v, q and k
    through per-head norms (Reshape -> SimplifiedLayerNormalization -> Reshape), GroupQueryAttention
    with separate q, k, v and a symbolic head size in the past inputs."""
    from onnx import TensorProto, helper

    from onnxq.calibration.inputs import input_specs
    heads, kv_heads, head, hidden = 4, 1, 16, 64
    nodes = [helper.make_node("MatMul", ["x", "W"], ["qkv"], name="qkv_proj"),
             helper.make_node("Split", ["qkv", "sizes"], ["q0", "k0", "v"], axis=-1, name="split")]
    for name in ("q", "k"):
        nodes += [helper.make_node("Reshape", [f"{name}0", "heads_shape"], [f"{name}1"], name=f"{name}_r1"),
                  helper.make_node("SimplifiedLayerNormalization", [f"{name}1", "gamma"], [f"{name}2"], axis=-1,
                                   name=f"{name}_norm"),
                  helper.make_node("Reshape", [f"{name}2", "flat_shape"], [name], name=f"{name}_r2")]
    nodes.append(helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key_values.0.key",
                                                          "past_key_values.0.value", "seqlens", "total"],
                                  ["out", "present.0.key", "present.0.value"], domain="com.microsoft",
                                  num_heads=heads, kv_num_heads=kv_heads, name="attn"))
    past = [helper.make_tensor_value_info(f"past_key_values.0.{kind}", TensorProto.FLOAT,
                                          ["batch", kv_heads, "past", "kv_cache_dim"]) for kind in ("key", "value")]
    inits = [helper.make_tensor("W", TensorProto.FLOAT, [hidden, (heads + 2 * kv_heads) * head],
                                np.zeros(hidden * (heads + 2 * kv_heads) * head, np.float32)),
             helper.make_tensor("sizes", TensorProto.INT64, [3], [heads * head, kv_heads * head, kv_heads * head]),
             helper.make_tensor("heads_shape", TensorProto.INT64, [4], [1, -1, heads, head]),
             helper.make_tensor("flat_shape", TensorProto.INT64, [3], [1, -1, heads * head]),
             helper.make_tensor("gamma", TensorProto.FLOAT, [head], np.ones(head, np.float32))]
    graph = helper.make_graph(nodes, "gemma_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [1, "seq", hidden]), *past,
                                                    helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
                                                    helper.make_tensor_value_info("total", TensorProto.INT32, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    specs = {s.name: s for s in input_specs(helper.make_model(graph))}
    assert specs["past_key_values.0.key"].shape[1:] == (kv_heads, "past", head)


def test_hqq_float_zero_points_with_the_tied_8bit_table(tmp_path, capsys):
    """The tied table's 8 bits take uint8 zero points (MatMulNBits stores float ones at 2/4 bits only)."""
    out = tmp_path / "q"
    assert main(["quantize", str(KV / "genai"), str(out), "--quiet", "--algo", "hqq", "--asym",
                 "--hqq-zero-point", "float"]) == 0, capsys.readouterr().err
    nodes = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    bits = {next(a.i for a in n.attribute if a.name == "bits") for n in nodes}
    assert bits == {4, 8}


def _windowed(model: onnx.ModelProto, window: int, cache: bool) -> onnx.ModelProto:
    """The fixture with local attention of ``window`` tokens in every GroupQueryAttention, with or without
    the sliding-window KV cache (``sliding_window_cache=1``, as the GenAI builder writes Gemma 3)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            kept = [a for a in node.attribute if a.name not in ("local_window_size", "sliding_window_cache")]
            del node.attribute[:]
            node.attribute.extend(kept + [onnx.helper.make_attribute("local_window_size", window)]
                                  + ([onnx.helper.make_attribute("sliding_window_cache", 1)] if cache else []))
    return model


def test_sliding_window_cache_gets_a_window_of_zero_rows(tmp_path, calib_text):
    """A sliding-window cache refuses an empty past ("KV cache capacity (0) must be at least
    local_window_size"): its empty past is ``local_window_size`` rows of zeros, and the model then computes
    what the same local attention computes without that cache; calibration runs on it."""
    base = onnx.load(str(KV / "genai" / "model.onnx"))
    windowed, plain = _windowed(base, 8, cache=True), _windowed(base, 8, cache=False)
    filler = InputFiller(input_specs(windowed))
    ids = tokenize(TEXT[:2000], KV / "genai")[None, :20]
    feed = filler.feed(ids)
    pasts = [name for name in feed if name.startswith("past_key_values.")]
    assert pasts and all(feed[name].shape[2] == 8 and not feed[name].any() for name in pasts)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    run = lambda m, f: ort.InferenceSession(m.SerializeToString(), options).run(["logits"], f)[0]  # noqa: E731
    empty = {**feed, **{name: feed[name][:, :, :0] for name in pasts}}
    with pytest.raises(Exception, match="capacity"):
        run(windowed, empty)
    np.testing.assert_allclose(run(windowed, feed), run(plain, InputFiller(input_specs(plain)).feed(ids)),
                               rtol=1e-5, atol=1e-5)
    src = tmp_path / "windowed.onnx"
    onnx.save(windowed, src)
    assert main(["quantize", str(src), str(tmp_path / "q.onnx"), "--algo", "gptq", "--calib-data", str(calib_text),
                 "--tokenizer", str(KV / "genai"), "--samples", "2", "--seq-len", "16", "--quiet"]) == 0
