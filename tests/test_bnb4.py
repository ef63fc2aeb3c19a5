"""MatMul/Gemm/Transpose->MatMul -> MatMulBnb4: packing equals ORT's packer, ORT output equals numpy."""
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi._pybind_state import quantize_matmul_bnb4

from onnxq import OnnxqError, QuantConfig
from onnxq.io import load_model
from onnxq.passes.quantize_weights import QuantizeWeightsPass
from tests.graphs import make_model, matmul_model, run, weight

# Value tables typed from ORT's blockwise_quant_block_bnb4.h (independent of onnxq.core.nf4).
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def bnb4_nodes(model):
    return [n for n in model.graph.all_nodes() if n.op_type == "MatMulBnb4"]


def reader(node) -> np.ndarray:
    """float64 W [K, N] from a MatMulBnb4 node, read with plain numpy."""
    a = {k: v.as_int() for k, v in node.attributes.items()}
    k, n, bs = a["K"], a["N"], a["block_size"]
    table = np.array(NF4 if a["quant_type"] == 1 else [v / 12 for v in FP4], dtype=np.float32)
    packed = node.inputs[1].const_value.numpy()
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[: k * n]
    absmax = np.repeat(node.inputs[2].const_value.numpy().astype(np.float32), bs)[: k * n]
    return (table[codes] * absmax).astype(np.float64).reshape(n, k).T


def bnb4_config(**kw):
    return QuantConfig(format="bnb4", **kw)


def quantize(model, config=None, **kw):
    m = load_model(model)
    result = QuantizeWeightsPass(config or bnb4_config(**kw))(m)
    assert result.modified
    onnx.checker.check_model(ir.to_proto(m), full_check=True)
    return m, result


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("k,block_size", [(128, 64), (100, 16), (96, 256)])
def test_matmul_bnb4_vs_ort_packer_and_numpy(quant_type, k, block_size):
    n = 40
    w = weight((k, n), seed=k + block_size)
    model, result = quantize(matmul_model(w), quant_type=quant_type, block_size=block_size)
    (node,) = bnb4_nodes(model)
    qt = 1 if quant_type == "nf4" else 0
    packed = np.zeros((k * n + 1) // 2, np.uint8)
    absmax = np.zeros(-(-k * n // block_size), np.float32)
    quantize_matmul_bnb4(packed, np.ascontiguousarray(w.T), absmax, block_size, qt, n, k)
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), packed)
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), absmax)
    x = np.random.default_rng(0).standard_normal((2, 7, k)).astype(np.float32)
    (y,) = run(model, {"x": x})
    ref = x.astype(np.float64) @ reader(node)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    deq = reader(node)
    assert np.linalg.norm(deq - w) / np.linalg.norm(w) < (0.12 if qt else 0.2)
    assert result.records[0].relative_error == pytest.approx(np.linalg.norm(deq - w) / np.linalg.norm(w), rel=1e-4)


def test_gemm_transpose_shared_and_bias():
    k, n = 64, 48
    w, c = weight((n, k), seed=1), weight((n,), seed=2, scale=1.0)
    model = make_model(
        [helper.make_node("Gemm", ["x", "W", "C"], ["y1"], name="gemm", transB=1, alpha=0.5, beta=2.0),
         helper.make_node("Transpose", ["W"], ["Wt"], name="t", perm=[1, 0]),
         helper.make_node("MatMul", ["x", "Wt"], ["y2"], name="mm_t"),
         helper.make_node("MatMul", ["x", "Wt"], ["y3"], name="mm_t2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, [3, n]) for v in ("y1", "y2", "y3")],
        {"W": w, "C": c},
    )
    q, result = quantize(model)
    nodes = {nd.name: nd for nd in bnb4_nodes(q)}
    assert set(nodes) == {"gemm_Bnb4", "mm_t_Bnb4", "mm_t2_Bnb4"}
    assert nodes["mm_t_Bnb4"].inputs[1] is nodes["mm_t2_Bnb4"].inputs[1]  # one copy per unique weight
    assert nodes["gemm_Bnb4"].inputs[1] is not nodes["mm_t_Bnb4"].inputs[1]  # alpha differs
    assert [r.shared_with for r in result.records] == [None, None, "mm_t"]
    assert "Transpose" not in [nd.op_type for nd in q.graph]
    x = np.random.default_rng(3).standard_normal((3, k)).astype(np.float32)
    y1, y2, y3 = run(q, {"x": x})
    np.testing.assert_allclose(y1, x @ reader(nodes["gemm_Bnb4"]) + 2.0 * c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y2, x @ reader(nodes["mm_t_Bnb4"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y2, y3)
    assert np.linalg.norm(reader(nodes["gemm_Bnb4"]) - 0.5 * w.T) / np.linalg.norm(0.5 * w) < 0.12


def test_rank3_weight_and_fp16_structure():
    w = weight((1, 64, 16), seed=4)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16])], {"W": w},
    )
    q, _ = quantize(model)
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    (y,) = run(q, {"x": x})
    assert y.shape == (1, 3, 16)
    np.testing.assert_allclose(y[0], x @ reader(bnb4_nodes(q)[0]), rtol=1e-5, atol=1e-5)
    # float16: absmax stored in fp16 (ORT runs MatMulBnb4 fp16 on CUDA only; check values)
    w16 = weight((64, 32), seed=6, dtype=np.float16)
    q16, _ = quantize(matmul_model(w16))
    (node,) = bnb4_nodes(q16)
    assert node.inputs[2].const_value.dtype == ir.DataType.FLOAT16
    assert np.linalg.norm(reader(node) - w16) / np.linalg.norm(w16.astype(np.float64)) < 0.12


def test_bad_settings():
    with pytest.raises(OnnxqError, match="block_size must be one of 16, 32, 64, 128, 256, got 48"):
        bnb4_config(block_size=48)
    with pytest.raises(OnnxqError, match="4-bit"):
        quantize(matmul_model(weight((64, 8), 7)), config=bnb4_config(bits=8))
    m = load_model(matmul_model(weight((64, 8), 7)))
    result = QuantizeWeightsPass(bnb4_config(exclude=("mm",)))(m)
    assert not result.modified and result.skipped[0].reason == "matched by exclude"


def test_chained_matmuls_read_the_rewritten_producer():
    model = make_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="a"), helper.make_node("MatMul", ["h", "W2"], ["y"], name="b")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        {"W1": weight((64, 64), 8), "W2": weight((64, 16), 9)},
    )
    q, _ = quantize(model)
    a, b = bnb4_nodes(q)
    assert b.inputs[0] is a.outputs[0]  # not the output of the removed float MatMul
    x = np.random.default_rng(10).standard_normal((2, 64)).astype(np.float32)
    (y,) = run(q, {"x": x})
    ref = (x.astype(np.float64) @ reader(a)) @ reader(b)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
