"""MatMul / Gemm / Transpose->MatMul -> MatMulNBits: ORT runs the rewritten graph and must match numpy."""
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import onnxq
from onnxq import OnnxqError, QuantConfig
from onnxq.api import records_of
from tests.graphs import make_model, matmul_model, run, weight
from tests.nbits_reference import bias_of, dequantized_weight, nbits_nodes


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def single_node_reference(quantized: ir.Model, x: np.ndarray) -> np.ndarray:
    (node,) = nbits_nodes(quantized)
    y = x.astype(np.float64) @ dequantized_weight(node)
    bias = bias_of(node)
    return y if bias is None else y + bias


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_matmul_matches_numpy(bits, symmetric, block_size):
    k, n = 256, 48
    w = weight((k, n), seed=bits + block_size)
    model = onnxq.quantize(matmul_model(w), QuantConfig(bits=bits, block_size=block_size, symmetric=symmetric))
    check(model)
    x = np.random.default_rng(0).standard_normal((2, 7, k)).astype(np.float32)
    (y,) = run(model, {"x": x})
    ref = single_node_reference(model, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # and the quantized weight is a faithful approximation of the original
    assert rel_err(dequantized_weight(nbits_nodes(model)[0]), w) < {2: 0.7, 4: 0.15, 8: 0.01}[bits]


@pytest.mark.parametrize("k", [100, 33, 250])
def test_padded_k(k):
    w = weight((k, 24), seed=k)
    model = onnxq.quantize(matmul_model(w), QuantConfig(bits=4, block_size=32, symmetric=False))
    x = np.random.default_rng(1).standard_normal((3, 7, k)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"x": x})[0], single_node_reference(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemm_with_alpha_beta_bias(trans_b, with_bias):
    k, n = 64, 40
    w = weight((n, k) if trans_b else (k, n), seed=3)
    inits = {"W": w}
    inputs = ["x", "W"]
    if with_bias:
        inits["C"] = weight((n,), seed=4, scale=1.0)
        inputs.append("C")
    model = make_model(
        [helper.make_node("Gemm", inputs, ["y"], name="gemm", transB=trans_b, alpha=0.5, beta=2.0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        inits,
    )
    x = np.random.default_rng(2).standard_normal((5, k)).astype(np.float32)
    (y_float,) = run(model, {"x": x})
    quantized = onnxq.quantize(model)
    check(quantized)
    (y,) = run(quantized, {"x": x})
    (node,) = nbits_nodes(quantized)
    np.testing.assert_allclose(y, single_node_reference(quantized, x), rtol=1e-5, atol=1e-5)
    w_kn = (w.T if trans_b else w) * 0.5
    assert rel_err(dequantized_weight(node), w_kn) < 0.15
    if with_bias:
        np.testing.assert_allclose(bias_of(node), inits["C"] * 2.0, rtol=1e-7)
    assert rel_err(y, y_float) < 0.15
    assert [v.name for v in quantized.graph.outputs] == ["y"]


def test_transpose_matmul_tied_weight():
    """logits = h @ E^T with E the embedding: by default E is packed once at 8 bits and read by both
    the GatherBlockQuantized and the lm_head's MatMulNBits; --no-quantize-embeddings keeps both in float."""
    vocab, hidden = 96, 64
    emb = weight((vocab, hidden), seed=5, scale=1.0)
    model = make_model(
        [
            helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
            helper.make_node("Transpose", ["E"], ["Et"], name="t", perm=[1, 0]),
            helper.make_node("MatMul", ["h", "Et"], ["logits"], name="lm_head"),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
        {"E": emb},
    )
    quantized = onnxq.quantize(model)
    check(quantized)
    ops = [n.op_type for n in quantized.graph]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1 and "Transpose" not in ops
    (head,) = nbits_nodes(quantized)
    assert head.attributes["bits"].as_int() == 8
    assert len([v for v in quantized.graph.initializers.values() if v.const_value.dtype == ir.DataType.UINT8]) == 1
    ids = np.array([[1, 5, 95, 0]], dtype=np.int64)
    (y,) = run(quantized, {"ids": ids})
    table = dequantized_weight(head)  # [hidden, vocab]
    ref = table.T[ids].astype(np.float64) @ table
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    assert np.abs(table.T - emb).max() < np.abs(emb).max() / 100  # 8 bits: close to the float table

    with pytest.raises(onnxq.OnnxqError, match="tied to embedding 'embed', kept in float"):
        onnxq.quantize(model, onnxq.QuantConfig(quantize_embeddings=False))  # nothing else to quantize


def test_shared_weight_is_quantized_once():
    w = weight((64, 32), seed=6)
    model = make_model(
        [
            helper.make_node("MatMul", ["x1", "W"], ["y1"], name="a"),
            helper.make_node("MatMul", ["x2", "W"], ["y2"], name="b"),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 64]) for n in ("x1", "x2")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 32]) for n in ("y1", "y2")],
        {"W": w},
    )
    quantized = onnxq.quantize(model)
    check(quantized)
    a, b = nbits_nodes(quantized)
    assert a.inputs[1] is b.inputs[1] and a.inputs[2] is b.inputs[2]
    assert len(quantized.graph.initializers) == 2  # packed B and scales, once
    records, _ = records_of(quantized)
    assert [r.shared_with for r in records] == [None, "a"]
    x1, x2 = (np.random.default_rng(i).standard_normal((3, 64)).astype(np.float32) for i in (7, 8))
    y1, y2 = run(quantized, {"x1": x1, "x2": x2})
    deq = dequantized_weight(a)
    np.testing.assert_allclose(y1, x1 @ deq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y2, x2 @ deq, rtol=1e-5, atol=1e-5)


def test_shared_weight_with_different_overrides_gets_two_copies():
    w = weight((64, 32), seed=6)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y1"], name="a"), helper.make_node("MatMul", ["x", "W"], ["y2"], name="b")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 32]) for n in ("y1", "y2")],
        {"W": w},
    )
    quantized = onnxq.quantize(model, QuantConfig(overrides={"b": {"bits": 8}}))
    a, b = nbits_nodes(quantized)
    assert a.attributes["bits"].as_int() == 4 and b.attributes["bits"].as_int() == 8
    assert a.inputs[1] is not b.inputs[1]
    x = np.random.default_rng(9).standard_normal((3, 64)).astype(np.float32)
    y1, y2 = run(quantized, {"x": x})
    np.testing.assert_allclose(y2, x @ dequantized_weight(b), rtol=1e-5, atol=1e-5)


def test_fp16_model():
    w = weight((128, 64), seed=10, dtype=np.float16)
    quantized = onnxq.quantize(matmul_model(w), QuantConfig(block_size=32, symmetric=False))
    check(quantized)
    (node,) = nbits_nodes(quantized)
    assert node.inputs[2].const_value.dtype == ir.DataType.FLOAT16
    x = np.random.default_rng(11).standard_normal((2, 7, 128)).astype(np.float16)
    (y,) = run(quantized, {"x": x})
    assert y.dtype == np.float16
    ref = x.astype(np.float64) @ dequantized_weight(node)
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_bf16_model_gets_bf16_scales():
    """ORT's CPU EP has no bf16 MatMul(NBits) kernel (CUDA does): check structure and values."""
    import ml_dtypes

    w32 = weight((64, 32), seed=12)
    w = w32.astype(ml_dtypes.bfloat16)
    tensor = helper.make_tensor("W", TensorProto.BFLOAT16, [64, 32], w.view(np.uint16).tobytes(), raw=True)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 32])], [tensor],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    quantized = onnxq.quantize(proto)
    check(quantized)
    (node,) = nbits_nodes(quantized)
    assert node.inputs[2].const_value.dtype == ir.DataType.BFLOAT16
    assert rel_err(dequantized_weight(node), w.astype(np.float32)) < 0.15


def test_leading_one_batch_dims_of_b():
    w = weight((1, 1, 64, 16), seed=13)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 16])],
        {"W": w},
    )
    x = np.random.default_rng(14).standard_normal((3, 64)).astype(np.float32)
    quantized = onnxq.quantize(model)
    check(quantized)
    (y,) = run(quantized, {"x": x})
    assert y.shape == (1, 1, 3, 16)
    np.testing.assert_allclose(y[0, 0], x @ dequantized_weight(nbits_nodes(quantized)[0]), rtol=1e-5, atol=1e-5)


def test_constant_node_weight_and_subgraph():
    """A MatMul inside an If branch whose weight is an outer-scope initializer is rewritten too."""
    w = weight((32, 16), seed=15)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["t"], name="inner_mm")], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 16])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["W2"], name="w2", value=onnx.numpy_helper.from_array(w * 2)),
         helper.make_node("MatMul", ["x", "W2"], ["e"], name="inner_const")], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 16])],
    )
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)],
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        {"W": w},
    )
    quantized = onnxq.quantize(model)
    check(quantized)
    nodes = {n.name: n for n in nbits_nodes(quantized)}
    assert set(nodes) == {"inner_mm_Q4", "inner_const_Q4"}
    x = np.random.default_rng(16).standard_normal((2, 32)).astype(np.float32)
    (y_then,) = run(quantized, {"cond": np.array(True), "x": x})
    (y_else,) = run(quantized, {"cond": np.array(False), "x": x})
    np.testing.assert_allclose(y_then, x @ dequantized_weight(nodes["inner_mm_Q4"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_else, x @ dequantized_weight(nodes["inner_const_Q4"]), rtol=1e-5, atol=1e-5)


def two_layer_model():
    return make_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="layers.0.fc1"),
         helper.make_node("MatMul", ["h", "W2"], ["y"], name="lm_head")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        {"W1": weight((64, 64), 17), "W2": weight((64, 16), 18)},
    )


def test_include_exclude_and_overrides():
    quantized = onnxq.quantize(two_layer_model(), QuantConfig(exclude=("lm_head",)))
    assert [n.op_type for n in quantized.graph] == ["MatMulNBits", "MatMul"]
    records, skipped = records_of(quantized)
    assert [s.reason for s in skipped] == ["matched by exclude"]
    quantized = onnxq.quantize(two_layer_model(), QuantConfig(include=("fc1$",)))
    assert [n.op_type for n in quantized.graph] == ["MatMulNBits", "MatMul"]
    quantized = onnxq.quantize(two_layer_model(), QuantConfig(overrides={"lm_*": {"bits": 8, "block_size": 16}}))
    bits = {n.name: (n.attributes["bits"].as_int(), n.attributes["block_size"].as_int()) for n in quantized.graph}
    assert bits == {"layers.0.fc1_Q4": (4, 32), "lm_head_Q8": (8, 16)}


def test_accuracy_level_4_runs_close_to_level_0():
    w = weight((256, 64), seed=19)
    x = np.random.default_rng(20).standard_normal((4, 256)).astype(np.float32)
    model0 = onnxq.quantize(matmul_model(w, m_shape=(4,)))
    model4 = onnxq.quantize(matmul_model(w, m_shape=(4,)), QuantConfig(accuracy_level=4))
    assert nbits_nodes(model4)[0].attributes["accuracy_level"].as_int() == 4
    y0, y4 = run(model0, {"x": x})[0], run(model4, {"x": x})[0]
    assert 0 < rel_err(y4, y0) < 0.02  # int8 activations: a small extra error


def test_per_channel_block():
    w = weight((100, 8), seed=21)
    model = onnxq.quantize(matmul_model(w), QuantConfig(bits=8, block_size=-1, symmetric=False))
    (node,) = nbits_nodes(model)
    assert node.attributes["block_size"].as_int() == 128  # next power of two >= K
    x = np.random.default_rng(22).standard_normal((1, 7, 100)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"x": x})[0], single_node_reference(model, x), rtol=1e-5, atol=1e-5)


def test_nan_weights_are_rejected():
    w = weight((64, 16), seed=23)
    w[3, 4] = np.nan
    with pytest.raises(OnnxqError, match="NaN/Inf"):
        onnxq.quantize(matmul_model(w))


def test_nothing_to_quantize():
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="dyn")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], {},
    )
    with pytest.raises(OnnxqError, match="no quantizable MatMul/Gemm node found.*dyn: B is not a constant"):
        onnxq.quantize(model)


@pytest.mark.parametrize("bad", [dict(bits=3), dict(block_size=24), dict(block_size=8), dict(bits=2, block_size=512),
                                 dict(accuracy_level=5), dict(overrides={"x": {"bits": 5}}), dict(include=("(",))])
def test_bad_settings(bad):
    with pytest.raises(OnnxqError):
        QuantConfig(**bad)


def test_input_model_proto_is_not_modified():
    proto = matmul_model(weight((64, 16), seed=24))
    before = proto.SerializeToString()
    onnxq.quantize(proto)
    assert proto.SerializeToString() == before
