"""Mixed precision under an effective-bits budget: plan validity, reuse as a config, and accuracy vs uniform int4."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from onnxq import OnnxqError, QuantConfig
from onnxq.api import records_of
from onnxq.calibration import save_npz
from onnxq.cli import main
from onnxq.formats import get_format
from onnxq.io import load_model
from onnxq.recipes import mixed_precision
from onnxq.recipes.mixed_precision import _KL, parse_candidates, search_mixed_precision
from onnxq.recipes.presets import layer_index, upgraded_layers
from tests.graphs import run
from tests.tiny_transformer import make_tiny_transformer

VOCAB = 97
KV = Path(__file__).resolve().parents[1] / "models" / "kv"


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=2, hidden=128, ffn=256, vocab=VOCAB, seed=3)


def feeds(count, seed):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (1, 32)).astype(np.int64)} for _ in range(count)]


def kl(reference, output):
    a = reference - reference.max(-1, keepdims=True)
    a -= np.log(np.exp(a).sum(-1, keepdims=True))
    b = output - output.max(-1, keepdims=True)
    b -= np.log(np.exp(b).sum(-1, keepdims=True))
    return float((np.exp(a) * (a - b)).sum(-1).mean())


def test_bits_per_weight_are_exact():
    base = QuantConfig()
    int4, int8_asym, flt = parse_candidates("int4_b128,int8_b32_asym,float", base)
    site = type("Site", (), {"name": "mm", "k": 256, "n": 8, "dtype": onnxq.api.ir.DataType.FLOAT})()
    fmt = get_format("nbits")
    assert int4.bits_per_weight(site, fmt) == 4 + 32 / 128
    assert int8_asym.bits_per_weight(site, fmt) == 8 + 32 / 32 + 8 / 32
    assert flt.bits_per_weight(site, fmt) == 32
    with pytest.raises(OnnxqError, match="unknown format candidate"):
        parse_candidates("int3_b32,float", base)


def test_nominal_bits_are_modelopts():
    base = QuantConfig()
    int4, int8, flt = parse_candidates("int4_b128,int8_b32_asym,float", base)
    site = type("Site", (), {"name": "mm", "k": 200, "n": 8, "dtype": onnxq.api.ir.DataType.FLOAT})()
    fmt = get_format("nbits")
    assert [c.bits_per_weight(site, fmt, "nominal") for c in (int4, int8, flt)] == [4, 8, 16]
    assert int4.bits_per_weight(site, fmt) == 4 * 256 / 200 + 32 * 2 / 200  # K = 200 pads to 256
    (default4, default8) = parse_candidates("int4,int8", QuantConfig(block_size=64))
    assert (default4.block_size, default8.block_size) == (64, 64)


@pytest.mark.parametrize("counting,low", [("nominal", 4.0), ("stored", 4.25)])
def test_plan_respects_budget_and_groups_and_beats_uniform_int4(model, counting, low):
    base = QuantConfig(block_size=128)
    plan = search_mixed_precision(load_model(model), base, feeds(4, 1), 4.8, "int4_b128,int8_b128", counting=counting)
    assert low <= plan.effective_bits <= 4.8 and plan.counting == counting
    assert set(plan.assignments.values()) == {"int4_b128", "int8_b128"}
    qkv = [g for g in plan.groups if any(name.endswith("q_proj") for name in g)]
    for group in qkv:  # siblings share one format
        assert len(group) == 3 and len({plan.assignments[name] for name in group}) == 1
    held_out = {"input_ids": np.random.default_rng(9).integers(0, VOCAB, (4, 32)).astype(np.int64)}
    (reference,) = run(model, held_out)
    uniform = run(onnxq.quantize(model, base), held_out)[0]
    mixed_model = onnxq.quantize(model, plan.to_config(base))
    mixed = run(mixed_model, held_out)[0]
    assert kl(reference, mixed) < kl(reference, uniform) * 0.8
    records = records_of(mixed_model)[0]
    bits = {r.name: r.bits for r in records}
    assert {name: ("int8_b128" if b == 8 else "int4_b128") for name, b in bits.items()} == plan.assignments
    # the plan's average under both countings, against what the quantized model holds
    weights = sum(r.k * r.n for r in records if r.shared_with is None)
    assert plan.bits_per_weight == pytest.approx({
        "nominal": sum(r.k * r.n * r.bits for r in records if r.shared_with is None) / weights,
        "stored": sum(8 * r.bytes_after for r in records if r.shared_with is None) / weights})
    assert plan.bits_per_weight[counting] == plan.effective_bits


def test_equally_cheap_candidates_go_to_the_lower_loss(model):
    # nominal counting: int4 costs 4 bits at block 32 as at block 128, so the search takes the lower loss
    assert mixed_precision._choose([[0.5, 0.2, 0.01]], [[4.0, 4.0, 8.0]], 4.0) == ([1], 4.0)
    plan = search_mixed_precision(load_model(model), QuantConfig(block_size=128), feeds(2, 1), 4.0,
                                  "int4_b128,int4_b32,int8_b128")
    for group in plan.groups:
        losses = plan.sensitivity[group[0]]
        best = min(("int4_b128", "int4_b32"), key=losses.get)
        assert {plan.assignments[name] for name in group} == {best}
    assert "int4_b32" in plan.assignments.values() and plan.effective_bits == 4.0


def test_budget_below_the_floor_is_an_error(model):
    with pytest.raises(OnnxqError, match="stored bits per weight 4.0 is below the smallest possible"):
        search_mixed_precision(load_model(model), QuantConfig(), feeds(2, 1), 4.0, "int4_b32,int8_b32",
                               counting="stored")
    with pytest.raises(OnnxqError, match="nominal bits per weight 3.9 is below the smallest possible 4.000"):
        search_mixed_precision(load_model(model), QuantConfig(), feeds(2, 1), 3.9, "int4_b32,int8_b32")


def _alone_kl(model, config, group, candidate, feed, reference):
    """KL of the whole model with only ``group`` quantized to ``candidate`` (everything else float)."""
    bits, block = {"int4_b128": (4, 128), "int4_b32": (4, 32), "int8_b128": (8, 128)}[candidate]
    alone = config.with_updates(include=tuple(f"^{name}$" for name in group), bits=bits, block_size=block)
    (out,) = run(onnxq.quantize(model, alone), feed)
    return kl(reference, out)


@pytest.mark.parametrize("noise", [1e-3, 1e-1, 3.0])
def test_kl_matches_a_float64_reference(noise, monkeypatch):
    """The search's KL (one max, dot and exp per logit, chunks of positions in threads) equals
    KL(p_ref || p_out) computed from both log-softmaxes in float64, for batch x positions not a
    multiple of the chunk."""
    monkeypatch.setattr(mixed_precision, "_KL_CHUNK", 8 * 5000)  # 8 positions a chunk: 9 chunks and 2 rows
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((2, 37, 5000)).astype(np.float32) * 3
    reference[..., :20] += 10  # peaked, like an LM's next-token distribution
    output = reference + (rng.standard_normal(reference.shape) * noise).astype(np.float32)
    expected = kl(reference.astype(np.float64), output.astype(np.float64))
    # float32 logits resolve a KL to about 1e-8 (the log-softmax version this replaced erred as much)
    assert _KL(reference)(output) == pytest.approx(expected, rel=1e-4, abs=5e-8)
    assert _KL(reference)(reference) == pytest.approx(0.0, abs=5e-8)


def test_sensitivities_match_whole_model_runs(model):
    """The suffix runs from cached block inputs, batched samples, equal whole-model runs of each
    group alone; the proxy measures the coarsest candidate exactly and ranks the others like "all"."""
    base = QuantConfig(block_size=128)
    samples = feeds(3, 4)
    batch = {"input_ids": np.concatenate([f["input_ids"] for f in samples])}
    (reference,) = run(model, batch)
    candidates = "int4_b128,int4_b32,int8_b128"
    exact = search_mixed_precision(load_model(model), base, samples, 6.0, candidates, measure="all")
    proxy = search_mixed_precision(load_model(model), base, samples, 6.0, candidates)
    for group in exact.groups[::3]:
        for candidate in ("int4_b128", "int8_b128"):
            whole = _alone_kl(model, base, group, candidate, batch, reference)
            assert exact.sensitivity[group[0]][candidate] == pytest.approx(whole, rel=1e-3, abs=1e-7)
        assert proxy.sensitivity[group[0]]["int4_b128"] == pytest.approx(exact.sensitivity[group[0]]["int4_b128"],
                                                                         rel=1e-6)
    for candidate in ("int4_b32", "int8_b128"):  # the proxy keeps the order of the groups' sensitivities
        a = np.array([exact.sensitivity[g[0]][candidate] for g in exact.groups])
        b = np.array([proxy.sensitivity[g[0]][candidate] for g in exact.groups])
        ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        assert np.corrcoef(ranks(a), ranks(b))[0, 1] > 0.8, (candidate, a, b)


def test_cli_saves_a_plan_that_quantize_config_reuses(model, tmp_path, capsys):
    src, out, out2, data = (tmp_path / n for n in ("m.onnx", "q.onnx", "q2.onnx", "calib.npz"))
    onnx.save(model, src)
    save_npz(data, feeds(4, 1))
    assert main(["quantize", str(src), str(out), "--block-size", "128", "--calib-data", str(data),
                 "--effective-bits", "5.0", "--candidates", "int4_b128,int8_b128,float"]) == 0
    plan = json.loads((tmp_path / "q.onnx.plan.json").read_text())
    searched = plan["_mixed_precision"]
    assert searched["effective_bits"] <= 5.0 and searched["bits_per_weight"]["nominal"] == searched["effective_bits"]
    stored = searched["bits_per_weight"]["stored"]
    assert stored > searched["effective_bits"]  # scales and padding count there
    assert (f"nominal bits per weight (budget 5.0, {stored:.3f} stored); saved to {tmp_path / 'q.onnx.plan.json'}"
            in capsys.readouterr().out)
    assert main(["quantize", str(src), str(out2), "--config", str(tmp_path / "q.onnx.plan.json"), "--quiet"]) == 0
    first = onnx.load(out)
    second = onnx.load(out2)
    assert [n.op_type for n in first.graph.node] == [n.op_type for n in second.graph.node]
    assert [i.raw_data for i in first.graph.initializer] == [i.raw_data for i in second.graph.initializer]


def test_cli_asymmetric_plan_gives_every_node_zero_points(model, tmp_path):
    """``--asym`` with unmarked candidates: both formats asymmetric (ModelOpt's counting: still 4 / 8 bits),
    every MatMulNBits carries zero points, and onnxruntime runs the output close to the float model."""
    src, out, data = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    save_npz(data, feeds(4, 1))
    assert main(["quantize", str(src), str(out), "--block-size", "32", "--asym", "--calib-data", str(data),
                 "--algo", "gptq", "--effective-bits", "4.8", "--candidates", "int4_b32,int8_b128", "--quiet"]) == 0
    plan = json.loads((tmp_path / "q.onnx.plan.json").read_text())
    assert plan["_mixed_precision"]["effective_bits"] <= 4.8
    assert {o["symmetric"] for o in plan["overrides"].values()} == {False}
    assert {o["bits"] for o in plan["overrides"].values()} == {4, 8}
    quantized = onnx.load(out)
    nbits = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(len(n.input) >= 4 and n.input[3] for n in nbits)
    feed = feeds(1, 9)[0]
    (reference,), (output,) = run(model, feed), run(quantized, feed)
    assert kl(reference, output) < 0.01  # measured 0.003; 0.42 with the zero points dropped


def test_mixed_layers_is_the_genai_builders_choice():
    # by hand from the builder's rule: i < L/8, i >= 7L/8, or (i - round(L/8)) % 3 == 2
    assert upgraded_layers(32) == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert upgraded_layers(30) == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29]
    assert upgraded_layers(18) == [0, 1, 2, 4, 7, 10, 13, 16, 17]
    assert layer_index("/model/layers.12/mlp/down_proj/MatMul") == 12
    assert layer_index("model.layers.3.self_attn.v_proj") == 3 and layer_index("/lm_head/MatMul") is None


def test_cli_presets_upgrade_the_named_nodes(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(KV / "genai"), str(out), "--quiet", "--block-size", "32",
                 "--mixed-preset", "lm_head8,mixed_layers8"]) == 0, capsys.readouterr().err
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"}
    eight = sorted(name for name, b in bits.items() if b == 8)
    layers = upgraded_layers(1 + max(layer_index(n) for n in bits if layer_index(n) is not None))
    assert 0 < len(layers) < 1 + max(layer_index(n) for n in bits if layer_index(n) is not None)
    assert eight == sorted(n for n in bits if "lm_head" in n or (layer_index(n) in layers and (
        "qkv_proj" in n or "down_proj" in n))), bits
    assert all(b == 4 for name, b in bits.items() if name not in eight) and len(eight) < len(bits)
    assert main(["quantize", str(KV / "genai"), str(tmp_path / "bad"), "--mixed-preset", "layers_9bit"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'layers_9bit'" in err and not (tmp_path / "bad").exists()


def _tied_model(table: np.ndarray) -> onnx.ModelProto:
    """``Gather(E, ids) -> fc1 -> Relu -> fc2 -> + residual -> MatMul(h, Transpose(E))``: a torch-style tied table."""
    from onnx import TensorProto, helper, numpy_helper

    d = table.shape[1]
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(table, "embed.weight")] + [
        numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), f"{n}.weight")
        for n in ("fc1", "fc2")]
    nodes = [helper.make_node("Gather", ["embed.weight", "ids"], ["h0"], name="embed"),
             helper.make_node("MatMul", ["h0", "fc1.weight"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "fc2.weight"], ["h3"], name="fc2"),
             helper.make_node("Add", ["h3", "h0"], ["h4"], name="residual"),
             helper.make_node("Transpose", ["embed.weight"], ["w"], perm=[1, 0], name="lm_head_transpose"),
             helper.make_node("MatMul", ["h4", "w"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", 12])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", 12, len(table)])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("measure", ["all", "proxy"])
def test_a_tied_tables_sensitivity_counts_its_gather_too(measure):
    """The quantized model shares one packed table between the Gather and the lm_head, so the search
    measures the lm_head with both uses replaced: the whole model run with the table fake-quantized
    (a suffix from the lm_head's block, fed cached float embeddings, measured less than half of it)."""
    vocab, hidden = 96, 64
    table = (np.random.default_rng(0).standard_normal((vocab, hidden)) * 0.3).astype(np.float32)
    model = _tied_model(table)
    rng = np.random.default_rng(1)
    samples = [{"ids": rng.integers(0, vocab, (1, 12)).astype(np.int64)} for _ in range(3)]
    batch = {"ids": np.concatenate([f["ids"] for f in samples])}
    (reference,) = run(model, batch)
    plan = search_mixed_precision(load_model(model), QuantConfig(block_size=16), samples, 6.0, "int4_b16,int8_b16",
                                  measure=measure)
    fake = onnxq.core.quantize_weight(table.T, 4, 16, True).dequantize().T  # the lm_head's [K, N] blocks
    (both_uses,) = run(_tied_model(np.ascontiguousarray(fake, dtype=np.float32)), batch)
    assert plan.sensitivity["lm_head"]["int4_b16"] == pytest.approx(kl(reference, both_uses), rel=1e-3)
    quantized = onnxq.quantize(model, plan.for_budget(4.0).to_config(QuantConfig(block_size=16)))
    assert {r.name: (r.bits, r.shared_with) for r in records_of(quantized)[0]}["embed"] == (4, "lm_head")
