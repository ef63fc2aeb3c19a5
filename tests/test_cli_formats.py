"""CLI: --format qdq|bnb4, --quantize-embeddings, convert and unpack round trips."""
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxq.cli import main
from tests.graphs import run

EXAMPLE = str(Path(__file__).resolve().parents[1] / "models" / "example.onnx")
IDS = {"input_ids": np.array([[1, 2, 3, 400, 511]], dtype=np.int64)}


def ops(path):
    return sorted({n.op_type for n in onnx.load(path).graph.node})


@pytest.mark.parametrize("flags,expected", [
    (["--format", "qdq"], "DequantizeLinear"),
    (["--format", "bnb4", "--block-size", "64"], "MatMulBnb4"),
    (["--quantize-embeddings"], "GatherBlockQuantized"),
])
def test_formats_run_in_ort(tmp_path, flags, expected):
    out = tmp_path / "q.onnx"
    assert main(["quantize", EXAMPLE, str(out), "--quiet", *flags]) == 0
    assert expected in ops(out)
    (y,) = run(out, IDS)
    (y_float,) = run(EXAMPLE, IDS)
    assert np.linalg.norm(y - y_float) / np.linalg.norm(y_float) < 0.3


def test_convert_round_trip_and_unpack(tmp_path):
    nbits, qdq, back, unpacked = (tmp_path / f"{n}.onnx" for n in ("nbits", "qdq", "back", "unpacked"))
    assert main(["quantize", EXAMPLE, str(nbits), "--quiet", "--quantize-embeddings"]) == 0
    assert main(["convert", str(nbits), str(qdq), "--to", "qdq"]) == 0
    assert "MatMulNBits" not in ops(qdq) and "DequantizeLinear" in ops(qdq)
    assert main(["convert", str(qdq), str(back), "--to", "nbits"]) == 0
    a, b = onnx.load(nbits), onnx.load(back)
    assert sorted((i.name, i.raw_data) for i in a.graph.initializer) == sorted((i.name, i.raw_data) for i in b.graph.initializer)
    assert main(["unpack", str(nbits), str(unpacked)]) == 0
    assert "MatMulNBits" not in ops(unpacked)
    np.testing.assert_allclose(run(unpacked, IDS)[0], run(nbits, IDS)[0], rtol=1e-4, atol=1e-4)


def test_rejected_format_combinations(tmp_path, capsys):
    assert main(["quantize", EXAMPLE, str(tmp_path / "q.onnx"), "--format", "bnb4", "--bits", "8"]) == 2
    assert "4-bit only" in capsys.readouterr().err
    assert main(["convert", EXAMPLE, str(tmp_path / "c.onnx"), "--to", "qdq"]) == 2
    assert "onnxq: error:" in capsys.readouterr().err
