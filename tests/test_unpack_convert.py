"""unpack_model and convert_model: exact dequantized weights, ORT outputs unchanged, nbits -> qdq -> nbits byte-identical."""
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxq
from onnxq import OnnxqError, QuantConfig
from onnxq.core import quantize_weight
from onnxq.core.nf4 import quantize_weight_bnb4
from onnxq.io import load_model
from onnxq.passes.convert import convert_model
from onnxq.passes.quantize_weights import QuantizeWeightsPass
from onnxq.passes.unpack import unpack_model
from tests.graphs import make_model, matmul_model, weight


def ort_run(model, feeds):
    """ORT CPU without graph optimizations (no DQ+MatMul fusion with int8 activations)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def check(model):
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def lm_model(vocab=96, hidden=64, seed=0, dtype=np.float32):
    """Embedding (tied with lm_head), MatMul, Gemm with bias."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return make_model(
        [helper.make_node("Gather", ["E", "ids"], ["h0"], name="embed"),
         helper.make_node("MatMul", ["h0", "W1"], ["h1"], name="fc1"),
         helper.make_node("Gemm", ["h1", "W2", "C"], ["h"], name="fc2", transB=1),
         helper.make_node("Transpose", ["E"], ["Et"], name="t", perm=[1, 0]),
         helper.make_node("MatMul", ["h", "Et"], ["logits"], name="lm_head")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
        [helper.make_tensor_value_info("logits", elem, [5, vocab])],
        {"E": weight((vocab, hidden), seed, dtype, 1.0), "W1": weight((hidden, 64), seed + 1, dtype),
         "W2": weight((hidden, 64), seed + 2, dtype), "C": weight((hidden,), seed + 3, dtype)},
    )


def quantize_lm(model, config):
    m = load_model(model)
    QuantizeWeightsPass(config, embeddings=True)(m)
    check(m)
    return m


IDS = {"ids": np.array([0, 7, 95, 7, 3], dtype=np.int64)}


@pytest.mark.parametrize("bits,symmetric,hidden", [(4, True, 64), (4, False, 40), (2, False, 64), (8, True, 40)])
def test_unpack_nbits_and_tied_gather(bits, symmetric, hidden):
    model = lm_model(hidden=hidden)
    config = QuantConfig(bits=bits, block_size=32, symmetric=symmetric, quantize_embeddings=True)
    q = quantize_lm(model, config)
    (y_q,) = ort_run(q, IDS)
    unpack_model(q)
    check(q)
    assert not any(n.domain == "com.microsoft" for n in q.graph) and "com.microsoft" not in q.opset_imports
    inits = {n: v.const_value.numpy() for n, v in q.graph.initializers.items()}
    src = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(inits["E_Q%d_float" % bits], quantize_weight(src["E"].T, bits, 32, symmetric).dequantize().T)
    np.testing.assert_array_equal(inits["W1_Q%d_float" % bits], quantize_weight(src["W1"], bits, 32, symmetric).dequantize())
    np.testing.assert_array_equal(inits["W2_Q%d_float" % bits], quantize_weight(src["W2"].T, bits, 32, symmetric).dequantize())
    assert [n.op_type for n in q.graph if n.op_type in ("Gather", "Transpose", "MatMul", "Add")].count("Gather") == 1
    (y,) = ort_run(q, IDS)
    np.testing.assert_allclose(y, y_q, rtol=1e-5, atol=1e-5 * np.abs(y_q).max())


def test_unpack_bnb4_fpq4_and_qdq():
    w = weight((100, 24), seed=5)
    x = np.random.default_rng(6).standard_normal((2, 7, 100)).astype(np.float32)
    m = load_model(matmul_model(w))
    QuantizeWeightsPass(QuantConfig(format="bnb4", quant_type="nf4", block_size=64))(m)
    (y_q,) = ort_run(m, {"x": x})
    unpack_model(m)
    (value,) = m.graph.initializers.values()
    np.testing.assert_array_equal(value.const_value.numpy(), quantize_weight_bnb4(w, "nf4", 64).dequantize())
    np.testing.assert_allclose(ort_run(m, {"x": x})[0], y_q, rtol=1e-5, atol=1e-5)

    m = load_model(matmul_model(w))
    QuantizeWeightsPass(QuantConfig(format="fpq4", symmetric=False))(m)  # no kernel on most hosts: check the weight
    unpack_model(m)
    (value,) = m.graph.initializers.values()
    np.testing.assert_array_equal(value.const_value.numpy(), quantize_weight(w, 4, 32, False).dequantize())

    for bits in (2, 8):
        m = load_model(matmul_model(w))
        QuantizeWeightsPass(QuantConfig(format="qdq", bits=bits, symmetric=False))(m)
        (y_q,) = ort_run(m, {"x": x})
        unpack_model(m)
        assert [n.op_type for n in m.graph] == ["MatMul"]
        (value,) = m.graph.initializers.values()
        np.testing.assert_array_equal(value.const_value.numpy(), quantize_weight(w, bits, 32, False).dequantize())
        np.testing.assert_allclose(ort_run(m, {"x": x})[0], y_q, rtol=1e-6, atol=1e-6)

    with pytest.raises(OnnxqError, match="nothing to unpack"):
        unpack_model(load_model(matmul_model(w)))


def snapshot(model):
    """Nodes (inputs named by producing node, as saved) and initializers."""
    proto = ir.to_proto(model)
    producer = {out: (n.name, i) for n in proto.graph.node for i, out in enumerate(n.output)}
    return ([(n.op_type, n.name, [producer.get(i, i) for i in n.input]) for n in proto.graph.node],
            {n: (v.const_value.dtype, v.const_value.numpy().copy()) for n, v in model.graph.initializers.items()})


@pytest.mark.parametrize("bits,symmetric,hidden,dtype", [(4, True, 64, np.float32), (4, False, 40, np.float32),
                                                         (2, True, 40, np.float32), (8, False, 64, np.float16)])
def test_nbits_qdq_nbits_roundtrip_is_identical(bits, symmetric, hidden, dtype):
    q = quantize_lm(lm_model(hidden=hidden, dtype=dtype), QuantConfig(bits=bits, block_size=32, symmetric=symmetric))
    nodes0, inits0 = snapshot(q)
    if dtype == np.float32:
        (y0,) = ort_run(q, IDS)
    convert_model(q, "qdq")
    check(q)
    assert q.opset_imports[""] == 21 and "com.microsoft" not in q.opset_imports
    dqs = [n for n in q.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 3  # E shared by Gather and lm_head's Transpose
    if dtype == np.float32:
        (y1,) = ort_run(q, IDS)
        np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5 * np.abs(y0).max())
    convert_model(q, "nbits")
    check(q)
    nodes2, inits2 = snapshot(q)
    assert nodes2 == nodes0
    assert inits2.keys() == inits0.keys()
    for name, (dt, arr) in inits0.items():
        assert inits2[name][0] == dt
        np.testing.assert_array_equal(inits2[name][1], arr, err_msg=name)


def test_qdq_pass_output_converts_to_nbits():
    """Gemm (transB=1, bias), Transpose->MatMul and MatMul chains from the QDQ pass become MatMulNBits; 3-bit stays."""
    model = lm_model()
    m = load_model(model)
    QuantizeWeightsPass(QuantConfig(format="qdq", symmetric=False, overrides={"fc1": {"bits": 8}}), embeddings=True)(m)
    (y_qdq,) = ort_run(m, IDS)
    convert_model(m, "nbits")
    check(m)
    ops = [n.op_type for n in m.graph]
    assert ops.count("MatMulNBits") == 3 and "GatherBlockQuantized" in ops and "DequantizeLinear" not in ops
    (y,) = ort_run(m, IDS)
    np.testing.assert_allclose(y, y_qdq, rtol=1e-5, atol=1e-5 * np.abs(y_qdq).max())

    w = weight((64, 16), seed=7)
    m = load_model(matmul_model(w))
    def three_bits(site, weight_kn, settings):
        return quantize_weight(weight_kn, 3, 32, True), 0.0

    QuantizeWeightsPass(QuantConfig(format="qdq"), solver=three_bits)(m)
    with pytest.raises(OnnxqError, match="bits must be 2, 4 or 8 for MatMulNBits, got 3"):
        convert_model(m, "nbits")
    with pytest.raises(OnnxqError, match="convert target"):
        convert_model(m, "int4")


def test_quantize_api_output_unpacks():
    w = weight((128, 32), seed=8)
    q = onnxq.quantize(matmul_model(w), QuantConfig(bits=4, block_size=32, symmetric=True))
    unpack_model(q)
    (value,) = q.graph.initializers.values()
    np.testing.assert_array_equal(value.const_value.numpy(), quantize_weight(w, 4, 32, True).dequantize())


def test_foreign_qdq_per_axis_and_zero_zp_convert_to_nbits():
    """QDQ written by other tools: per-axis int8 with an all-zero zero point, and a per-tensor scale (left as is)."""
    k, n = 100, 16
    rng = np.random.default_rng(9)
    q = rng.integers(-128, 128, (k, n)).astype(np.int8)
    scale = (rng.uniform(0.5, 2, n) / 100).astype(np.float32)
    q2 = rng.integers(-128, 128, (k, n)).astype(np.int8)
    model = make_model(
        [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], name="dq", axis=1),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
         helper.make_node("DequantizeLinear", ["q2", "s2"], ["w2"], name="dq2"),
         helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, [3, n]) for v in ("y", "y2")],
        {"q": q, "s": scale, "z": np.zeros(n, np.int8), "q2": q2, "s2": np.array(0.01, np.float32)}, opset=21,
    )
    x = rng.standard_normal((3, k)).astype(np.float32)
    y_ref, y2_ref = ort_run(model, {"x": x})
    m = load_model(model)
    convert_model(m, "nbits")
    check(m)
    (node,) = [nd for nd in m.graph if nd.op_type == "MatMulNBits"]
    assert node.attributes["block_size"].as_int() == 128 and node.attributes["bits"].as_int() == 8
    assert len(node.inputs) == 3  # symmetric: the zero zero point is the implied 128 of the unsigned codes
    assert [nd.op_type for nd in m.graph].count("DequantizeLinear") == 1  # the per-tensor one stays
    y, y2 = ort_run(m, {"x": x})
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
    np.testing.assert_array_equal(y2, y2_ref)


def test_rank3_weight_qdq_to_nbits_keeps_output_rank():
    w = weight((1, 64, 16), seed=11)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16])], {"W": w},
    )
    m = load_model(model)
    QuantizeWeightsPass(QuantConfig(format="qdq"))(m)
    (dq,) = [n for n in m.graph if n.op_type == "DequantizeLinear"]
    assert dq.inputs[0].const_value.shape == (1, 64, 16) and dq.attributes["axis"].as_int() == 1
    x = np.random.default_rng(12).standard_normal((3, 64)).astype(np.float32)
    (y_qdq,) = ort_run(m, {"x": x})
    convert_model(m, "nbits")
    check(m)
    assert [n.op_type for n in m.graph] == ["MatMulNBits", "Unsqueeze"]
    (y,) = ort_run(m, {"x": x})
    assert y.shape == (1, 3, 16)
    np.testing.assert_allclose(y, y_qdq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[0], x @ quantize_weight(w[0], 4, 32, True).dequantize(), rtol=1e-5, atol=1e-6)
