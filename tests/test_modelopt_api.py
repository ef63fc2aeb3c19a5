"""The ModelOpt-like surface: wildcard configs with enable/disable, and print_quant_summary."""
import io

import numpy as np
import pytest

import onnxq
from onnxq import OnnxqError, QuantConfig
from tests.graphs import run
from tests.tiny_transformer import make_tiny_transformer


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=1, hidden=64, ffn=128, vocab=97, seed=4)


def test_wildcards_later_entries_win_and_disable(model):
    config = {"*": "int4_b32", "*mlp*": "int8_b64_asym", "*fc2*": {"enable": False}, "*lm_head*": "float"}
    quantized = onnxq.quantize(model, config)
    by_name = {n.name: n for n in quantized.graph}
    nbits = {n.name.rsplit("_Q", 1)[0]: (n.attributes["bits"].as_int(), n.attributes["block_size"].as_int(),
                                          len(n.inputs) > 3) for n in quantized.graph if n.op_type == "MatMulNBits"}
    assert nbits["layers.0.self_attn.q_proj"] == (4, 32, False)
    assert nbits["layers.0.mlp.fc1"] == (8, 64, True)
    assert "layers.0.mlp.fc2" not in nbits and by_name["layers.0.mlp.fc2"].op_type == "MatMul"
    assert by_name["lm_head"].op_type == "MatMul"


def test_wildcard_config_with_algorithm_and_reader(model):
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 97, (1, 16)).astype(np.int64)} for _ in range(4)]
    quantized = onnxq.quantize(model, {"*": "int4_b32", "algorithm": "gptq", "calibration": {"samples": 4}}, feeds)
    ids = {"input_ids": rng.integers(0, 97, (2, 16)).astype(np.int64)}
    assert np.isfinite(run(quantized, ids)[0]).all()


def test_bad_wildcard_values():
    with pytest.raises(OnnxqError, match="unknown format"):
        QuantConfig.from_wildcards({"*": "int4_x"})
    with pytest.raises(OnnxqError, match="bits must be 2, 4 or 8"):
        QuantConfig.from_wildcards({"*": "int3_b32"})


def test_print_quant_summary_reads_the_graph(model, tmp_path):
    quantized = onnxq.quantize(model, {"*": "int4_b32_asym", "*lm_head*": "int8_b64"})
    path = tmp_path / "q.onnx"
    onnxq.save(quantized, path)
    infos = onnxq.quant_summary(path)
    assert len(infos) == 7
    lm = next(i for i in infos if i.name.startswith("lm_head"))
    assert lm.data_format == "int8 block 64 sym" and lm.shape == "64x97"
    out = io.StringIO()
    onnxq.print_quant_summary(path, file=out)
    text = out.getvalue()
    assert "int4 block 32 asym" in text and text.strip().endswith("7 MatMulNBits")


def test_summary_command(model, tmp_path, capsys):
    from onnxq.cli import main

    path = tmp_path / "q.onnx"
    onnxq.save(onnxq.quantize(model), path)
    assert main(["summary", str(path)]) == 0
    assert "7 MatMulNBits" in capsys.readouterr().out
    assert main(["summary", str(tmp_path / "missing.onnx")]) == 2
