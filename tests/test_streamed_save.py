"""StreamedSave: packed weights written to the output's external data while the model is quantized.

The CLI streams a calibration-free quantization of an external-data input (``--external-data
auto``) or of any input with ``--external-data always``; the files must hold what
``onnxq.save`` writes after the fact, tensor for tensor (only the offsets may differ).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import onnxq
from onnxq.cli import main
from onnxq.errors import OnnxqError
from onnxq.io import StreamedSave, load_model
from tests.graphs import make_model, run, weight


def _two_layer_model(w0: np.ndarray) -> onnx.ModelProto:
    """``y = ((x @ W0) + b) @ W1``: two quantizable weights, a bias that stays float, a small constant."""
    k, n = w0.shape
    return make_model(
        [helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
         helper.make_node("Add", ["h", "b"], ["h1"], name="add"),
         helper.make_node("MatMul", ["h1", "W1"], ["y"], name="mm1")],
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 96])],
        {"W0": w0, "b": weight((n,), 2), "W1": weight((n, 96), 3)},
    )


def _save_external(proto: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def _without_offsets(path: Path) -> bytes:
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in list(tensor.external_data):
            if entry.key == "offset":
                tensor.external_data.remove(entry)
    return proto.SerializeToString()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".onnxq-" in p.name)


@pytest.mark.parametrize("external_input", [True, False])
def test_streamed_output_equals_saved_output(tmp_path, external_input):
    proto = _two_layer_model(weight((256, 160), 1))
    if external_input:
        src, flags = _save_external(proto, tmp_path / "in" / "float.onnx"), []
    else:
        src, flags = tmp_path / "float.onnx", ["--external-data", "always"]
        onnx.save(proto, src)
    streamed = tmp_path / "out" / "q.onnx"
    streamed.parent.mkdir()
    assert main(["quantize", str(src), str(streamed), "--quiet", *flags]) == 0
    saved = tmp_path / "saved" / "q.onnx"
    saved.parent.mkdir()
    onnxq.save(onnxq.quantize(str(src), onnxq.QuantConfig()), saved, external_data=True)

    assert (streamed.parent / "q.onnx.data").stat().st_size == (saved.parent / "q.onnx.data").stat().st_size
    assert _without_offsets(streamed) == _without_offsets(saved)
    got, expected = _tensors(streamed), _tensors(saved)
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        assert got[name].dtype == array.dtype
        np.testing.assert_array_equal(got[name], array)
    assert _leftovers(streamed.parent) == []
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    np.testing.assert_array_equal(run(streamed, {"x": x})[0], run(saved, {"x": x})[0])


def test_never_writes_one_file(tmp_path):
    src = _save_external(_two_layer_model(weight((256, 160), 1)), tmp_path / "in" / "float.onnx")
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), str(out), "--quiet", "--external-data", "never"]) == 0
    assert not (tmp_path / "q.onnx.data").exists()
    assert _leftovers(tmp_path) == []


def test_error_while_streaming_leaves_the_earlier_output(tmp_path, capsys):
    w = weight((256, 160), 1)
    src_ok = _save_external(_two_layer_model(w), tmp_path / "ok" / "float.onnx")
    w_bad = w.copy()
    w_bad[5, 7] = np.nan
    src_bad = _save_external(_two_layer_model(w_bad), tmp_path / "bad" / "float.onnx")
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src_ok), str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("q.onnx*")}
    assert main(["quantize", str(src_bad), str(out), "--quiet"]) == 2
    assert "NaN/Inf" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.glob("q.onnx*")} == before
    assert _leftovers(tmp_path) == []


def test_streamed_save_api(tmp_path):
    """Values read the written file at once and the committed file after save; no save: nothing left."""
    model = load_model(_save_external(_two_layer_model(weight((256, 160), 1)), tmp_path / "in" / "float.onnx"))
    big = ir.val("big", const_value=ir.tensor(np.arange(4096, dtype=np.float32), name="big"))
    model.graph.register_initializer(big)
    out = tmp_path / "q.onnx"
    with StreamedSave(out) as stream:
        stream.write(big)
        stream.save(model)
    tensor = model.graph.initializers["big"].const_value
    assert isinstance(tensor, ir.ExternalTensor) and Path(tensor.base_dir) == tmp_path
    np.testing.assert_array_equal(tensor.numpy(), np.arange(4096, dtype=np.float32))
    np.testing.assert_array_equal(_tensors(out)["W0"], weight((256, 160), 1))  # the input's tensors copied in
    assert _leftovers(tmp_path) == []

    again = tmp_path / "q2.onnx"
    with pytest.raises(RuntimeError), StreamedSave(again) as stream:
        stream.write(ir.val("v", const_value=ir.tensor(np.ones(1024, np.float32), name="v")))
        raise RuntimeError("stop")
    assert not again.exists() and not (tmp_path / "q2.onnx.data").exists() and _leftovers(tmp_path) == []


def test_streamed_save_refuses_a_missing_folder(tmp_path):
    with pytest.raises(OnnxqError, match="output folder does not exist"), StreamedSave(tmp_path / "no" / "q.onnx"):
        pass
