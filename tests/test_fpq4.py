"""Legacy MatMulFpQ4: blob layout vs a transcription of MLAS MlasQ4GemmPackB; ORT run where the host has the kernel."""
import struct

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxq import OnnxqError, QuantConfig
from onnxq.core import quantize_weight
from onnxq.formats.matmul_fpq4 import pack_fpq4, unpack_fpq4
from onnxq.io import load_model
from onnxq.passes.quantize_weights import QuantizeWeightsPass
from tests.graphs import make_model, matmul_model, weight


def mlas_layout(codes_kn: np.ndarray, scales: np.ndarray, zps) -> bytes:
    """Blob as MLAS lays it out: per column n, per 32-row block: f32 scale, [u8 zp], 16 bytes (row l | row l+16 << 4)."""
    k, n = codes_kn.shape
    out = bytearray()
    for col in range(n):
        for b in range(-(-k // 32)):
            out += struct.pack("<f", float(scales[col, b]))
            if zps is not None:
                out.append(int(zps[col, b]))
            for l in range(16):
                r0, r1 = b * 32 + l, b * 32 + l + 16
                lo = codes_kn[r0, col] if r0 < k else (8 if zps is None else zps[col, b])
                hi = codes_kn[r1, col] if r1 < k else (8 if zps is None else zps[col, b])
                out.append(int(lo) | int(hi) << 4)
    return bytes(out)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 100])
def test_blob_layout_and_roundtrip(symmetric, k):
    qw = quantize_weight(weight((k, 12), seed=k), 4, 32, symmetric)
    blob, blk_type = pack_fpq4(qw)
    assert blk_type == (0 if symmetric else 1)
    codes_kn = qw.codes.reshape(12, -1)[:, :k].T
    assert blob.tobytes() == mlas_layout(codes_kn, qw.scales, qw.zero_points)
    back = unpack_fpq4(blob, k, 12, blk_type)
    np.testing.assert_array_equal(back.dequantize(), qw.dequantize())


def fpq4_session(model):
    """An ORT session, or None when this host's MLAS lacks the FpQ4 kernel (it needs AVX-512)."""
    try:
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT: "4b quantization not yet supported on this hardware platform!"
        if "not yet supported on this hardware platform" in str(exc):
            return None
        raise


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_fpq4_pass(symmetric):
    k, n = 96, 40
    w, c = weight((n, k), seed=1), weight((n,), seed=2)
    model = make_model(
        [helper.make_node("Gemm", ["x", "W", "C"], ["y1"], name="gemm", transB=1),
         helper.make_node("MatMul", ["x", "V"], ["y2"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, [3, n]) for v in ("y1", "y2")],
        {"W": w, "C": c, "V": weight((k, n), seed=3)},
    )
    m = load_model(model)
    assert QuantizeWeightsPass(QuantConfig(format="fpq4", symmetric=symmetric))(m).modified
    onnx.checker.check_model(ir.to_proto(m), full_check=True)
    assert [nd.op_type for nd in m.graph] == ["MatMulFpQ4", "Add", "MatMulFpQ4"]
    fp = [nd for nd in m.graph if nd.op_type == "MatMulFpQ4"]
    for nd in fp:
        assert nd.attributes["blk_quant_type"].as_int() == (0 if symmetric else 1)
        assert nd.inputs[1].const_value.shape == (n * 3 * (20 if symmetric else 21),)
        np.testing.assert_array_equal(nd.inputs[2].const_value.numpy(), [k, n])
    w_gemm = unpack_fpq4(fp[0].inputs[1].const_value.numpy(), k, n, 0 if symmetric else 1).dequantize()
    np.testing.assert_array_equal(w_gemm, quantize_weight(w.T, 4, 32, symmetric).dequantize())
    sess = fpq4_session(m)
    if sess is None:
        pytest.skip("MatMulFpQ4 has no kernel on this host (MLAS FpQ4 GEMM needs AVX-512); layout checked above")
    x = np.random.default_rng(4).standard_normal((3, k)).astype(np.float32)
    y1, y2 = sess.run(None, {"x": x})
    ref1 = x.astype(np.float64) @ w_gemm + c
    np.testing.assert_allclose(y1, ref1, rtol=1e-4, atol=1e-4 * np.abs(ref1).max())


def test_fpq4_rejects_other_layouts():
    with pytest.raises(OnnxqError, match="blocks of 32"):
        QuantizeWeightsPass(QuantConfig(format="fpq4", block_size=64))(load_model(matmul_model(weight((64, 8), 5))))
    m = load_model(matmul_model(weight((64, 8), 5, dtype=np.float16)))
    result = QuantizeWeightsPass(QuantConfig(format="fpq4"))(m)
    assert not result.modified and "float32" in result.skipped[0].reason
