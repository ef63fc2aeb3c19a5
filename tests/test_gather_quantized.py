"""Gather -> GatherBlockQuantized: ORT vs an independent numpy reader; tied embedding / lm_head share one packed B."""
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxq import QuantConfig
from onnxq.core import quantize_weight
from onnxq.io import load_model
from onnxq.passes.quantize_weights import QuantizeWeightsPass
from tests.graphs import make_model, run, weight
from tests.nbits_reference import dequantized_weight


def gbq_nodes(model):
    return [n for n in model.graph.all_nodes() if n.op_type == "GatherBlockQuantized"]


def packed_data(value: ir.Value) -> np.ndarray:
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape":
        value = producer.inputs[0]
    arr = value.const_value.numpy()
    return arr.reshape(arr.shape[0], -1)


def table_reader(node) -> np.ndarray:
    """float64 dequantized table [V, Dpad] of a GatherBlockQuantized node (uint8 data, LSB-first codes)."""
    bits, bs = node.attributes["bits"].as_int(), node.attributes["block_size"].as_int()
    data = packed_data(node.inputs[0])
    per = 8 // bits
    codes = ((data[..., None] >> (np.arange(per, dtype=np.uint8) * bits)) & ((1 << bits) - 1)).reshape(data.shape[0], -1)
    v, d = codes.shape
    scales = node.inputs[2].const_value.numpy().astype(np.float64)
    kb = scales.shape[1]
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        zp = node.inputs[3].const_value.numpy()
        zps = ((zp[..., None] >> (np.arange(per, dtype=np.uint8) * bits)) & ((1 << bits) - 1)).reshape(v, -1)[:, :kb]
    else:
        zps = np.full((v, kb), 1 << (bits - 1))
    zps = np.repeat(zps.astype(np.int64), bs, axis=1)[:, :d]
    return (codes.astype(np.int64) - zps) * np.repeat(scales, bs, axis=1)[:, :d]


def quantize_embeddings(model, config):
    """Quantize only the Gather embeddings of ``model`` in place; returns the per-node records."""
    result = QuantizeWeightsPass(config, embeddings=True, site_filter=lambda site: site.kind == "Gather")(model)
    return result.records


def embedding_model(vocab, hidden, dtype=np.float32, tied=False):
    e = weight((vocab, hidden), seed=vocab + hidden, dtype=dtype, scale=1.0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed")]
    outputs = [helper.make_tensor_value_info("h", elem, ["b", "s", hidden])]
    if tied:
        nodes += [helper.make_node("Transpose", ["E"], ["Et"], name="t", perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "Et"], ["logits"], name="lm_head")]
        outputs.append(helper.make_tensor_value_info("logits", elem, ["b", "s", vocab]))
    return make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])], outputs, {"E": e}), e


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("hidden", [64, 40])
def test_gather_block_quantized(bits, symmetric, hidden):
    vocab = 50
    model, e = embedding_model(vocab, hidden)
    m = load_model(model)
    records = quantize_embeddings(m, QuantConfig(bits=bits, block_size=32, symmetric=symmetric))
    onnx.checker.check_model(ir.to_proto(m), full_check=True)
    (node,) = gbq_nodes(m)
    assert "E" not in m.graph.initializers and records[0].shared_with is None
    ids = np.array([[0, 7, 49, 7], [3, 3, 1, 48]], dtype=np.int64)
    (y,) = run(m, {"ids": ids})
    assert y.shape == (2, 4, hidden)
    table = table_reader(node)[:, :hidden]
    np.testing.assert_allclose(y, table[ids], rtol=1e-6, atol=1e-7)
    # the numbers are the core quantizer's for W = E^T
    np.testing.assert_array_equal(table.astype(np.float32), quantize_weight(e.T, bits, 32, symmetric).dequantize().T)
    assert records[0].relative_error < {2: 0.7, 4: 0.15, 8: 0.01}[bits]


def test_fp16_table():
    model, e = embedding_model(40, 64, dtype=np.float16)
    m = load_model(model)
    quantize_embeddings(m, QuantConfig(symmetric=False))
    (node,) = gbq_nodes(m)
    assert node.inputs[2].const_value.dtype == ir.DataType.FLOAT16
    ids = np.array([[1, 39]], dtype=np.int64)
    (y,) = run(m, {"ids": ids})
    np.testing.assert_allclose(y.astype(np.float64), table_reader(node)[ids], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("hidden", [64, 40])
def test_tied_embedding_shares_one_packed_weight(hidden):
    vocab = 96
    model, e = embedding_model(vocab, hidden, tied=True)
    m = load_model(model)
    config = QuantConfig(block_size=32, symmetric=False)
    records = {r.name: r for r in QuantizeWeightsPass(config, embeddings=True)(m).records}
    onnx.checker.check_model(ir.to_proto(m), full_check=True)
    (gbq,) = gbq_nodes(m)
    (mm,) = [n for n in m.graph if n.op_type == "MatMulNBits"]
    reshape = gbq.inputs[0].producer()
    assert reshape.op_type == "Reshape" and reshape.inputs[0] is mm.inputs[1]  # one packed B
    assert gbq.inputs[2] is mm.inputs[2] and gbq.inputs[3] is mm.inputs[3]  # same scales / zero points
    packed = [v for v in m.graph.initializers.values() if v.dtype == ir.DataType.UINT8]
    assert len(packed) == 2  # B and zero points, each once
    assert records["embed"].shared_with == "lm_head"
    ids = np.array([[1, 5, 95, 0]], dtype=np.int64)
    h, logits = run(m, {"ids": ids})
    w = dequantized_weight(mm)  # [hidden, vocab], the MatMulNBits reference reader
    np.testing.assert_allclose(h, w.T[ids], rtol=1e-6, atol=1e-7)  # Gather path
    np.testing.assert_allclose(table_reader(gbq)[:, :hidden], w.T, rtol=0, atol=0)
    ref = h.astype(np.float64) @ w
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())  # MatMul path


def test_tied_with_different_settings_is_not_shared_and_skips():
    model, _ = embedding_model(64, 64, tied=True)
    m = load_model(model)
    config = QuantConfig(overrides={"embed": {"bits": 8}}, quantize_embeddings=True)
    records = {r.name: r for r in QuantizeWeightsPass(config)(m).records}
    (gbq,) = gbq_nodes(m)
    assert gbq.attributes["bits"].as_int() == 8 and records["lm_head"].bits == 4  # an override of the Gather itself
    m = load_model(model)
    config = QuantConfig(overrides={"lm_head": {"bits": 8}}, quantize_embeddings=True)  # the table follows its MatMul
    records = {r.name: r for r in QuantizeWeightsPass(config)(m).records}
    assert records["embed"].shared_with == "lm_head" and records["embed"].bits == 8
    m = load_model(model)
    records = {r.name: r for r in QuantizeWeightsPass(config.with_updates(overrides={"embed": {"bits": 8}}))(m).records}
    (gbq,) = gbq_nodes(m)
    assert gbq.inputs[0].producer() is None and gbq.attributes["bits"].as_int() == 8
    assert records["embed"].shared_with is None
    # Gathers that are not embeddings are left alone; a Gather along axis 1 is skipped with a reason
    model = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["y"], name="cols", axis=1),
         helper.make_node("Shape", ["y"], ["s"], name="shape"),
         helper.make_node("Gather", ["s", "zero"], ["d0"], name="dim0")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 3]), helper.make_tensor_value_info("d0", TensorProto.INT64, [])],
        {"E": weight((8, 64), 1), "zero": np.array(0, dtype=np.int64)},
    )
    m = load_model(model)
    result = QuantizeWeightsPass(QuantConfig(), embeddings=True)(m)
    assert not result.modified
    assert [(s.name, s.reason) for s in result.skipped] == [("cols", "gathers along axis 1; need 0")]
