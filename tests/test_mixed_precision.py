"""Mixed precision under an effective-bits budget: plan validity, reuse as a config, and accuracy vs uniform int4."""
import json

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
from onnxq.recipes.mixed_precision import parse_candidates, search_mixed_precision
from tests.graphs import run
from tests.tiny_transformer import make_tiny_transformer

VOCAB = 97


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


def test_plan_respects_budget_and_groups_and_beats_uniform_int4(model):
    base = QuantConfig(block_size=128)
    plan = search_mixed_precision(load_model(model), base, feeds(4, 1), 4.8, "int4_b128,int8_b128")
    assert 4.25 <= plan.effective_bits <= 4.8
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
    bits = {r.name: r.bits for r in records_of(mixed_model)[0]}
    assert {name: ("int8_b128" if b == 8 else "int4_b128") for name, b in bits.items()} == plan.assignments


def test_budget_below_the_floor_is_an_error(model):
    with pytest.raises(OnnxqError, match="below the smallest possible"):
        search_mixed_precision(load_model(model), QuantConfig(), feeds(2, 1), 4.0, "int4_b32,int8_b32")


def test_cli_saves_a_plan_that_quantize_config_reuses(model, tmp_path, capsys):
    src, out, out2, data = (tmp_path / n for n in ("m.onnx", "q.onnx", "q2.onnx", "calib.npz"))
    onnx.save(model, src)
    save_npz(data, feeds(4, 1))
    assert main(["quantize", str(src), str(out), "--block-size", "128", "--calib-data", str(data),
                 "--effective-bits", "5.0", "--candidates", "int4_b128,int8_b128,float", "--quiet"]) == 0
    plan = json.loads((tmp_path / "q.onnx.plan.json").read_text())
    assert plan["_mixed_precision"]["effective_bits"] <= 5.0
    assert main(["quantize", str(src), str(out2), "--config", str(tmp_path / "q.onnx.plan.json"), "--quiet"]) == 0
    first = onnx.load(out)
    second = onnx.load(out2)
    assert [n.op_type for n in first.graph.node] == [n.op_type for n in second.graph.node]
    assert [i.raw_data for i in first.graph.initializer] == [i.raw_data for i in second.graph.initializer]
