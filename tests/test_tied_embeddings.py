"""Tied embeddings in every form share one packed weight between the Gather and the lm_head.

Forms (``W: [D, V]`` is the lm_head's MatMul weight, ``E: [V, D]`` an embedding table):

* ONNX Runtime GenAI builder: ``Gather(Transpose(W), ids)`` and ``MatMul(h, W)``;
* torch / Optimum exports: ``Gather(E, ids)`` and ``MatMul(h, Transpose(E))``.

ORT runs the quantized model and must match numpy on the dequantized shared weight.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from tests.nbits_reference import dequantized_weight

V, D, T = 96, 48, 7


def _model(form: str) -> tuple[onnx.ModelProto, np.ndarray]:
    w = (np.random.default_rng(3).standard_normal((D, V)) * 0.2).astype(np.float32)  # W: [D, V]
    if form == "genai":
        inits = [numpy_helper.from_array(w, "lm_head.weight")]
        nodes = [helper.make_node("Transpose", ["lm_head.weight"], ["table"], perm=[1, 0], name="embed_transpose"),
                 helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
                 helper.make_node("MatMul", ["h", "lm_head.weight"], ["logits"], name="lm_head")]
    else:
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "embed.weight")]
        nodes = [helper.make_node("Gather", ["embed.weight", "ids"], ["h"], name="embed"),
                 helper.make_node("Transpose", ["embed.weight"], ["w"], perm=[1, 0], name="lm_head_transpose"),
                 helper.make_node("MatMul", ["h", "w"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, T])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, T, V])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]


@pytest.mark.parametrize("form", ["genai", "optimum"])
@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
def test_tied_embedding_is_stored_once_and_runs(form, fmt):
    model, w = _model(form)
    result = onnxq.api.quantize_with_report(model, onnxq.QuantConfig(format=fmt, block_size=16, symmetric=False,
                                                                      quantize_embeddings=True))
    records = {r.name: r for r in result.records}
    assert set(records) == {"lm_head", "embed"} and records["embed"].shared_with == "lm_head"
    proto = onnxq.api.ir.to_proto(result.model)
    float_inits = [t.name for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
                   and tuple(t.dims) in ((D, V), (V, D))]
    assert float_inits == [], "the float table must be gone"
    ops = [n.op_type for n in proto.graph.node]
    if fmt == "nbits":
        assert ops.count("MatMulNBits") == 1 and ops.count("GatherBlockQuantized") == 1
        (mm,) = [n for n in result.model.graph if n.op_type == "MatMulNBits"]
        deq = dequantized_weight(mm).astype(np.float32)  # [D, V]
        packed = [t for t in proto.graph.initializer if t.data_type == TensorProto.UINT8 and len(t.dims) == 3]
        assert len(packed) == 1, "GatherBlockQuantized reads the MatMulNBits B (through a Reshape)"
    else:
        assert ops.count("DequantizeLinear") == 1
        deq = onnxq.core.quantize_weight(w, 4, 16, False).dequantize()
    ids = np.array([[0, 5, 95, 17, 5, 42, 63]], dtype=np.int64)
    expected = deq.T[ids] @ deq
    np.testing.assert_allclose(_run(proto, ids), expected, rtol=1e-4, atol=1e-4)
