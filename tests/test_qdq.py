"""QDQ pass: blocked DequantizeLinear (opset 21) checked against the ONNX reference evaluator, ORT and onnxq's core."""
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxq import OnnxqError, QuantConfig
from onnxq.core import quantize_weight
from onnxq.io import load_model
from onnxq.graph.opset import upgrade_opset
from onnxq.passes.quantize_weights import QuantizeWeightsPass
from tests.graphs import make_model, matmul_model, weight


def ort_run(model, feeds, fused: bool = False):
    """ORT CPU; ``fused`` lets ORT fuse DQ+MatMul into MatMulNBits (at accuracy level 0, i.e. float activations)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if fused:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    else:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def qdq_config(**kw):
    return QuantConfig(format="qdq", **kw)


def qdq(model, config=None, **kw):
    m = load_model(model)
    result = QuantizeWeightsPass(config or qdq_config(), **kw)(m)
    assert result.modified
    proto = ir.to_proto(m)
    onnx.checker.check_model(proto, full_check=True)
    return m, result, proto


def dq_nodes(model):
    return [n for n in model.graph.all_nodes() if n.op_type == "DequantizeLinear"]


def dq_value(model, node) -> np.ndarray:
    """The DQ output as the ONNX reference evaluator computes it."""
    inputs = [v for v in node.inputs if v is not None]
    inits = [ir.serde.serialize_tensor(v.const_value) for v in inputs]
    for t, v in zip(inits, inputs):
        t.name = v.name
    g = helper.make_graph([ir.serde.serialize_node(node)], "dq", [], [helper.make_tensor_value_info(
        node.outputs[0].name, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    return ReferenceEvaluator(m).run(None, {})[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [128, 100])
def test_matmul_qdq(bits, symmetric, k):
    n = 48
    w = weight((k, n), seed=bits * k)
    config = qdq_config(bits=bits, block_size=32, symmetric=symmetric)
    model, result, proto = qdq(matmul_model(w), config)
    assert model.opset_imports[""] == 21 and model.ir_version >= 10
    (dq,) = dq_nodes(model)
    q = dq.inputs[0].const_value
    assert q.dtype == {(2, True): ir.DataType.INT4, (4, True): ir.DataType.INT4, (8, True): ir.DataType.INT8,
                       (2, False): ir.DataType.UINT4, (4, False): ir.DataType.UINT4,
                       (8, False): ir.DataType.UINT8}[(bits, symmetric)]
    assert (len(dq.inputs) == 2) == symmetric  # symmetric: no zero point
    assert dq.inputs[1].const_value.shape == (-(-k // 32), n)  # last block partial, no padding stored
    # codes are the core quantizer's, mapped to signed ints for symmetric weights
    ref_q = quantize_weight(w, bits, 32, symmetric)
    codes = ref_q.codes.reshape(n, -1)[:, :k].T.astype(np.int16)
    expect = codes - (1 << (bits - 1)) if symmetric else codes
    np.testing.assert_array_equal(q.numpy().astype(np.int16), expect)
    deq = dq_value(model, dq)
    np.testing.assert_array_equal(deq, ref_q.dequantize())  # the ONNX spec gives onnxq's exact values
    x = np.random.default_rng(0).standard_normal((2, 7, k)).astype(np.float32)
    ref = x.astype(np.float64) @ deq
    for fused in (False, True):
        (y,) = ort_run(proto, {"x": x}, fused)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    if bits == 2:
        assert dq.metadata_props["onnxq.bits"] == "2"
    assert result.records[0].relative_error < {2: 0.7, 4: 0.15, 8: 0.01}[bits]


def test_gemm_transpose_shared_embeddings_fp16():
    """One DQ per (weight, orientation, alpha): Gemm transB=1 + alpha, tied Gather/Transpose->MatMul, shared MatMul."""
    vocab, hidden = 96, 64
    e = weight((vocab, hidden), seed=1, scale=1.0)
    w, c = weight((hidden, hidden), seed=2), weight((hidden,), seed=3)
    model = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["h0"], name="embed"),
         helper.make_node("Gemm", ["h0", "W", "C"], ["h1"], name="gemm", transB=1, alpha=0.5, beta=2.0),
         helper.make_node("MatMul", ["h1", "W"], ["h2"], name="mm_a"),
         helper.make_node("MatMul", ["h2", "W"], ["h3"], name="mm_b"),
         helper.make_node("Transpose", ["E"], ["Et"], name="t", perm=[1, 0]),
         helper.make_node("MatMul", ["h3", "Et"], ["logits"], name="lm_head")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [5, vocab])],
        {"E": e, "W": w, "C": c},
    )
    q, result, proto = qdq(model, qdq_config(symmetric=False), embeddings=True)
    dqs = dq_nodes(q)
    assert len(dqs) == 3  # E (axis 1, Gather + lm_head), W^T*0.5 (Gemm, axis 1), W (MatMuls, axis 0)
    axes = sorted(d.attributes["axis"].as_int() for d in dqs)
    assert axes == [0, 1, 1]
    assert not any(v.name in ("E", "W") for v in q.graph.initializers.values())
    gemm = next(n for n in q.graph if n.op_type == "Gemm")
    assert gemm.attributes["alpha"].as_float() == 1.0
    assert {r.name: r.shared_with for r in result.records} == {"gemm": None, "mm_a": None, "mm_b": "mm_a", "lm_head": None,
                                                          "embed": "lm_head"}
    ids = np.array([0, 3, 95, 3, 50])
    deq = {d.outputs[0].name: dq_value(q, d) for d in dqs}
    e_q = next(v for k, v in deq.items() if v.shape == (vocab, hidden))
    w_gemm = next(deq[d.outputs[0].name] for d in dqs if d.outputs[0].uses()[0][0].op_type == "Gemm")
    w_mm = next(deq[d.outputs[0].name] for d in dqs if d.attributes["axis"].as_int() == 0)
    h = e_q[ids].astype(np.float64) @ w_gemm.T + 2.0 * c
    h = h @ w_mm @ w_mm
    ref = h @ e_q.T
    (y,) = ort_run(proto, {"ids": ids})
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.linalg.norm(w_gemm - 0.5 * w) / np.linalg.norm(0.5 * w) < 0.15

    w16 = weight((64, 32), seed=4, dtype=np.float16)
    q16, _, proto16 = qdq(matmul_model(w16))
    (dq16,) = dq_nodes(q16)
    assert dq16.inputs[1].const_value.dtype == ir.DataType.FLOAT16
    x = np.random.default_rng(5).standard_normal((1, 7, 64)).astype(np.float16)
    (y16,) = ort_run(proto16, {"x": x})
    ref16 = x.astype(np.float64) @ dq_value(q16, dq16).astype(np.float64)
    np.testing.assert_allclose(y16, ref16, rtol=1e-2, atol=1e-2 * np.abs(ref16).max())


def test_opset_upgrade_keeps_other_ops_and_big_initializers():
    """An opset-11 model (Split / ReduceMean / Unsqueeze with attribute forms) upgrades to 21 and computes the same."""
    w = weight((64, 32), seed=6)
    big = weight((3, 32), seed=7, scale=1.0)  # > 1 KB: kept out of the converter's copy, reattached as is
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "B"], ["hb"], name="add"),
        helper.make_node("Split", ["hb"], ["s1", "s2"], name="split", axis=1, split=[16, 16]),
        helper.make_node("ReduceMean", ["s1"], ["r"], name="mean", axes=[1], keepdims=0),
        helper.make_node("Unsqueeze", ["r"], ["y"], name="unsq", axes=[1]),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1]),
                        helper.make_tensor_value_info("s2", TensorProto.FLOAT, [3, 16])],
                       {"W": w, "B": big}, opset=11)
    q, _, proto = qdq(model)
    assert q.opset_imports[""] == 21
    np.testing.assert_array_equal(q.graph.initializers["B"].const_value.numpy(), big)
    (dq,) = dq_nodes(q)
    float_model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1]),
                              helper.make_tensor_value_info("s2", TensorProto.FLOAT, [3, 16])],
                             {"W": dq_value(q, dq), "B": big}, opset=11)
    x = np.random.default_rng(8).standard_normal((3, 64)).astype(np.float32)
    for got, ref in zip(ort_run(proto, {"x": x}), ort_run(float_model, {"x": x})):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_opset_upgrade_failure_is_one_clear_error():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("ImageScaler", ["x"], ["y"], scale=2.0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])]),
        opset_imports=[helper.make_opsetid("", 7)])
    m = ir.serde.deserialize_model(model)
    with pytest.raises(OnnxqError, match="cannot upgrade the model from opset 7 to 21") as info:
        upgrade_opset(m)
    assert "\n" not in str(info.value)
    assert m.opset_imports[""] == 7 and [n.op_type for n in m.graph] == ["ImageScaler"]  # left unchanged


def test_override_gives_second_chain_and_exclude_keeps_float():
    w = weight((64, 32), seed=9)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y1"], name="a"), helper.make_node("MatMul", ["x", "W"], ["y2"], name="b"),
         helper.make_node("MatMul", ["x", "W"], ["y3"], name="skip_me")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 32]) for n in ("y1", "y2", "y3")], {"W": w},
    )
    q, result, proto = qdq(model, qdq_config(overrides={"b": {"bits": 8}}, exclude=("skip",)))
    assert sorted(d.inputs[0].const_value.dtype.name for d in dq_nodes(q)) == ["INT4", "INT8"]
    assert "W" in q.graph.initializers and [s.name for s in result.skipped] == ["skip_me"]
    x = np.random.default_rng(10).standard_normal((3, 64)).astype(np.float32)
    y1, y2, y3 = ort_run(proto, {"x": x})
    np.testing.assert_array_equal(y3, ort_run(model, {"x": x})[2])
    assert np.abs(y2 - y3).max() < np.abs(y1 - y3).max()  # 8 bits closer to float than 4 bits
