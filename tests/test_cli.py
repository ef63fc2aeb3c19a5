"""``python -m onnxq``: the converter end to end (the failure cases, one line and exit code 2: tests/test_failures.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxq.cli import main
from tests.graphs import matmul_model, run, weight

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "models" / "example.onnx"


@pytest.fixture
def float_model(tmp_path) -> Path:
    path = tmp_path / "float.onnx"
    onnx.save(matmul_model(weight((128, 64), seed=0), name="layers.0.mlp"), path)
    return path


def test_module_entry_point_quantizes_the_example(tmp_path):
    out = tmp_path / "example_q4.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxq", "quantize", str(EXAMPLE), str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lm_head" in proc.stdout and "rel_err" in proc.stdout
    assert "accuracy_level 0" in proc.stderr  # the settings line
    ids = np.array([[1, 2, 3, 400, 511]], dtype=np.int64)
    (y_float,) = run(EXAMPLE, {"input_ids": ids})
    (y_quant,) = run(out, {"input_ids": ids})
    assert np.linalg.norm(y_quant - y_float) / np.linalg.norm(y_float) < 0.3  # 6 random layers at int4
    assert out.stat().st_size < EXAMPLE.stat().st_size * 0.5  # the float embedding table stays for Gather


def test_quantize_settings_reach_the_model(float_model, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(float_model), str(out), "--bits", "8", "--block-size", "64", "--asym",
                 "--accuracy-level", "4"]) == 0
    node = onnx.load(out).graph.node[0]
    attrs = {a.name: a.i for a in node.attribute}
    assert node.op_type == "MatMulNBits" and attrs["bits"] == 8 and attrs["block_size"] == 64 and attrs["accuracy_level"] == 4
    assert len(node.input) == 4  # zero points for --asym
    assert "int8 block 64 asym" not in capsys.readouterr().out  # the table uses columns, not prose


def test_config_file_and_flags(float_model, tmp_path):
    config = tmp_path / "plan.json"
    config.write_text(json.dumps({"bits": 8, "overrides": {"layers.*": {"block_size": 16}}}))
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(float_model), str(out), "--config", str(config), "--bits", "4", "--quiet"]) == 0
    attrs = {a.name: a.i for a in onnx.load(out).graph.node[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 16  # the flag wins over the file; override kept


def test_external_data_output(float_model, tmp_path):
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(float_model), str(out), "--external-data", "always", "--quiet"]) == 0
    assert (tmp_path / "q.onnx.data").stat().st_size > 0
    x = np.random.default_rng(0).standard_normal((1, 7, 128)).astype(np.float32)
    (y,) = run(out, {"x": x})
    (y_float,) = run(float_model, {"x": x})
    assert np.linalg.norm(y - y_float) / np.linalg.norm(y_float) < 0.15


def test_inspect(float_model, capsys):
    assert main(["inspect", str(float_model), "--exclude", "nothing"]) == 0
    out = capsys.readouterr().out
    assert "layers.0.mlp" in out and "int4 block 32 sym" in out and "1 nodes would be quantized" in out


def test_inspect_says_a_quantized_model_is_already_quantized(float_model, tmp_path, capsys):
    quantized = tmp_path / "q.onnx"
    assert main(["quantize", str(float_model), str(quantized), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(quantized)]) == 0
    out = capsys.readouterr().out
    assert "nothing would be quantized (the model is already quantized: 1 MatMulNBits;" in out
    assert "0 nodes would be quantized" in out


def _expect_error(capsys, argv, message, out_path=None):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("onnxq: error: ") and message in err[-1], err
    if out_path is not None:
        assert not out_path.exists()
        assert not [p for p in out_path.parent.iterdir() if p.name.startswith(f".{out_path.name}")]


def test_failed_write_leaves_nothing(float_model, tmp_path, monkeypatch, capsys):
    """A crash in the middle of writing must not leave a half-written model or temp files."""
    import onnx_ir

    def broken_save(model, path, external_data=None, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx_ir, "save", broken_save)
    out = tmp_path / "q.onnx"
    _expect_error(capsys, ["quantize", str(float_model), str(out), "--quiet"], "disk full", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx"]


def test_interrupt_exits_130_and_leaves_nothing(float_model, tmp_path, monkeypatch, capsys):
    import onnx_ir

    def interrupted_save(model, path, external_data=None, **kwargs):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_ir, "save", interrupted_save)
    assert main(["quantize", str(float_model), str(tmp_path / "q.onnx"), "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == "onnxq: interrupted; nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx"]


@pytest.mark.parametrize("mode", ["never", "auto"])
def test_external_data_input_saved_embedded(tmp_path, mode):
    """``never``: untouched initializers of an external-data input are written into the output, not
    referenced; ``auto`` (the default) keeps an external-data input's output in external data."""
    from onnx import TensorProto, helper, numpy_helper

    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    table = weight((50, 64), seed=2)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
         helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 32])],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(weight((64, 32), seed=3), "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    onnx.save(proto, src_dir / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    out = out_dir / "q.onnx"
    assert main(["quantize", str(src_dir / "model.onnx"), str(out), "--quiet", "--external-data", mode]) == 0
    assert (out_dir / "q.onnx.data").exists() == (mode == "auto")
    table_location = {t.name: t.data_location for t in onnx.load(out, load_external_data=False).graph.initializer}["E"]
    assert table_location == (onnx.TensorProto.EXTERNAL if mode == "auto" else onnx.TensorProto.DEFAULT)
    ids = np.array([0, 7, 49], dtype=np.int64)
    (y,) = run(out, {"ids": ids})
    (y_float,) = run(src_dir / "model.onnx", {"ids": ids})
    assert np.linalg.norm(y - y_float) / np.linalg.norm(y_float) < 0.15


def test_block_larger_than_k_is_one_block_over_k(tmp_path, capsys):
    """--block-size 8192 on K=256 would pad K 32x (a model 4x its float size): written as block 256, said so."""
    model, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(matmul_model(weight((256, 64), seed=0)), model)
    assert main(["quantize", str(model), str(out), "--block-size", "8192", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "block_size 8192 is larger than K on 1 of 1 nodes: those use one block over K (block 256" in err
    attrs = {a.name: a.i for a in onnx.load(out).graph.node[0].attribute}
    assert attrs["block_size"] == 256 and out.stat().st_size < model.stat().st_size / 4
    x = np.random.default_rng(0).standard_normal((1, 7, 256)).astype(np.float32)
    (y,) = run(out, {"x": x})
    (y_per_channel,) = run(_quantized(model, tmp_path / "pc.onnx", "--block-size", "-1"), {"x": x})
    np.testing.assert_array_equal(y, y_per_channel)  # the same values as one block over K


def test_padding_of_k_is_reported_with_a_dividing_block(tmp_path, capsys):
    """K = 576 at block 128 (SmolLM2's hidden size): MatMulNBits stores 5 blocks, 640 codes per column; the
    summary says what share of the stored codes is padding, read back from the written B, and names block 64."""
    padded, even = tmp_path / "k576.onnx", tmp_path / "k512.onnx"
    onnx.save(matmul_model(weight((576, 48), seed=0)), padded)
    onnx.save(matmul_model(weight((512, 48), seed=1)), even)
    assert main(["quantize", str(padded), str(tmp_path / "q.onnx"), "--block-size", "128"]) == 0
    out = capsys.readouterr().out
    b = {t.name: t for t in onnx.load(tmp_path / "q.onnx").graph.initializer if t.dims and len(t.dims) == 3}
    (blob,) = b.values()
    n, blocks, blob_bytes = blob.dims
    stored_codes = blocks * blob_bytes * 2  # int4: two codes a byte
    assert (n, stored_codes) == (48, 640)
    share = (stored_codes - 576) / stored_codes
    assert f"the block does not divide K = 576 on 1 of 1 nodes: {share:.1%} of their stored codes are zero padding; " \
           "block 64 divides K" in out
    assert main(["quantize", str(even), str(tmp_path / "q2.onnx"), "--block-size", "128"]) == 0
    assert main(["quantize", str(padded), str(tmp_path / "q3.onnx"), "--block-size", "128", "--format", "qdq"]) == 0
    assert "zero padding" not in capsys.readouterr().out  # K a multiple of the block; QDQ stores no padding


def _quantized(model, out, *flags):
    assert main(["quantize", str(model), str(out), "--quiet", *flags]) == 0
    return out


@pytest.fixture
def token_ids(tmp_path) -> Path:
    """16 windows of 64 tokens for the example model (vocabulary 512)."""
    path = tmp_path / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 512, 16 * 64).astype(np.int64))
    return path


def test_calibrated_run_announces_the_samples_it_uses(token_ids, tmp_path, capsys):
    assert main(["quantize", str(EXAMPLE), str(tmp_path / "q.onnx"), "--algo", "gptq", "--calib-data", str(token_ids),
                 "--seq-len", "64"]) == 0
    settings_line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("onnxq: gptq"))
    assert "16 calibration samples" in settings_line  # the file holds 16 windows; --samples defaults to 128


def test_smoothquant_settings_line_and_no_onnxruntime_advice(token_ids, tmp_path, capsys, caplog):
    assert main(["quantize", str(EXAMPLE), str(tmp_path / "q.onnx"), "--algo", "smoothquant", "--calib-data",
                 str(token_ids), "--seq-len", "64", "--samples", "4"]) == 0
    settings_line = capsys.readouterr().err.splitlines()[0]
    assert settings_line.startswith("onnxq: smoothquant W8A8 (QDQ int8 weights and activations, ")
    assert "SmoothQuant alpha auto, 4 calibration samples" in settings_line and "block 32" not in settings_line
    assert not [r for r in caplog.records if r.name == "root"], "onnxruntime's root-logger warnings reached the user"
