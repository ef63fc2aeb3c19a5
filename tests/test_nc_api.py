"""Neural Compressor's weight-only API: numpy helpers vs NC's formulas, MatMulNBits node and models through ORT.

References are plain per-row transcriptions of NC's formulas (below, written with
scalars and loops), ONNX Runtime's kernels, and tests/nbits_reference.py's
independent unpacker; never the function under test.
"""
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq import OnnxqError
from onnxq.core import qdq_tensor, quant_tensor
from onnxq.core.nc_weight import (
    NC_CLIP_RATIOS,
    qdq_weight_actor,
    qdq_weight_asym,
    qdq_weight_sym,
    quant_weight,
    quant_weight_w_scale,
    search_clip,
)
from onnxq.core.nf4 import FLOAT_MAPPING, INT_MAPPING
from onnxq.formats.weight_only_node import make_matmul_weight_only_node
from onnxq.weight_only import awq_quantize, gptq_quantize, prepare_inputs, rtn_quantize
from tests.graphs import run
from tests.nbits_reference import dequantized_weight
from tests.tiny_transformer import make_tiny_transformer

F32 = np.float32


# --- NC's formulas, one group (a 1-D float32 array) at a time ------------------------------------
def ref_asym(g, bits, quantile=1.0):
    maxq = F32(2**bits - 1)
    wmin = min(F32(g.min()), F32(0)) * F32(quantile)
    wmax = max(F32(g.max()), F32(0)) * F32(quantile)
    if wmin == 0 and wmax == 0:
        wmin, wmax = F32(-1), F32(1)
    scale = F32((wmax - wmin) / maxq)
    zp = F32(np.round(-wmin / scale))
    q = np.array([min(max(F32(np.round(v / scale)) + zp, F32(0)), maxq) for v in g], dtype=F32)
    return q, scale, zp


def ref_sym(g, bits, quantile=1.0, full_range=False):
    maxq, minq = F32(2 ** (bits - 1) - 1), F32(-(2 ** (bits - 1)))
    hi, lo = F32(g.max()), F32(g.min())
    amax = max(abs(hi), abs(lo)) * F32(quantile)
    if amax == 0:
        amax = F32(1)
    if full_range:
        scale = F32(amax / -minq)
        if abs(hi) > abs(lo):
            scale = -scale
    else:
        scale = F32(amax / maxq)
    q = np.array([min(max(F32(np.round(v / scale)), minq), maxq) for v in g], dtype=F32)
    return q, scale


def ref_4bit(g, data_type, quantile=1.0):
    table = np.asarray(FLOAT_MAPPING[data_type], dtype=F32)
    scale = F32(np.abs(g).max() * F32(quantile) / F32(table.max()))
    index = [int(np.argmin(np.abs(table - v / scale))) for v in g]  # ties: the lower entry (table ascending)
    return table[index] * scale, np.asarray(INT_MAPPING[data_type], dtype=F32)[index], scale


def ref_groups(in_features, group_size):
    """NC's torch grouping of one row: full groups of group_size, then the tail."""
    if group_size == -1 or in_features < group_size:
        return [slice(0, in_features)]
    cuts = list(range(0, in_features, group_size)) + [in_features]
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def ref_quant_weight(w, bits, group_size, scheme, quantile=1.0, full_range=False):
    """(qdq [out, in], q [out, in], scale [out, G], zp [out, G] or None) by NC's formulas."""
    groups = ref_groups(w.shape[1], group_size)
    qdq, q = np.zeros_like(w), np.zeros_like(w)
    scale = np.zeros((w.shape[0], len(groups)), F32)
    zp = np.zeros_like(scale)
    for r in range(w.shape[0]):
        for j, cols in enumerate(groups):
            if scheme == "asym":
                q[r, cols], scale[r, j], zp[r, j] = ref_asym(w[r, cols], bits, quantile)
            else:
                q[r, cols], scale[r, j] = ref_sym(w[r, cols], bits, quantile, full_range)
            qdq[r, cols] = (q[r, cols] - zp[r, j]) * scale[r, j]
    return qdq, q, scale, (zp if scheme == "asym" else None)


def seeded(shape, seed, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(F32)


# --- numpy helpers ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("quantile", [1.0, 0.9])
def test_qdq_weight_asym_matches_nc_formula(bits, quantile):
    w = seeded((12, 40), seed=bits)
    w[3] = 0.0  # an all-zero group: NC uses the range [-1, 1]
    w[4] = np.abs(w[4])  # all positive: the range still includes 0
    original = w.copy()
    q, scale, zp = qdq_weight_asym(w, bits, quantile, return_int=True)
    for r in range(w.shape[0]):
        rq, rs, rz = ref_asym(w[r], bits, quantile)
        np.testing.assert_array_equal(q[r], rq)
        assert scale[r, 0] == rs and zp[r, 0] == rz
    np.testing.assert_array_equal(qdq_weight_asym(w, bits, quantile), (q - zp) * scale)
    np.testing.assert_array_equal(w, original)  # never modified in place (NC's is in place)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("full_range", [False, True])
def test_qdq_weight_sym_matches_nc_formula(bits, full_range):
    w = seeded((12, 40), seed=10 + bits)
    w[2] = 0.0
    w[5] = -np.abs(w[5])
    q, scale, zp = qdq_weight_sym(w, bits, 0.95, return_int=True, full_range=full_range)
    assert zp is None
    for r in range(w.shape[0]):
        rq, rs = ref_sym(w[r], bits, 0.95, full_range)
        np.testing.assert_array_equal(q[r], rq)
        assert scale[r, 0] == rs
    np.testing.assert_array_equal(qdq_weight_sym(w, bits, 0.95, full_range=full_range), q * scale)


@pytest.mark.parametrize("scheme", ["asym", "sym"])
def test_full_range_and_asym_agree_with_onnxq_quant_tensor(scheme):
    """NC's torch asym and full-range sym grids are onnxq's (ORT's) grids; only rounding ties may differ."""
    w = seeded((16, 128), seed=21)
    nc = quant_weight(w, 4, 32, scheme, full_range=True)
    ours = qdq_tensor(w, 4, 32, scheme)  # [out*in/32 groups] along rows: the same groups
    scale = np.abs(quant_tensor(w, 4, 32, scheme)[1]).reshape(16, 4).repeat(32, axis=1)
    differs = ~np.isclose(nc, ours, rtol=0, atol=1e-6)
    assert differs.mean() < 1e-3
    assert np.all(np.abs(nc - ours)[differs] <= scale[differs] * 1.0001)  # at most one code apart


@pytest.mark.parametrize("scheme,full_range", [("asym", False), ("sym", False), ("sym", True)])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_quant_weight_groups_along_in_with_tail(scheme, full_range, group_size):
    w = seeded((6, 100), seed=3)  # in=100: groups 32,32,32 + tail 4; 128 > in: one group per row
    qdq_ref, q_ref, s_ref, z_ref = ref_quant_weight(w, 4, group_size, scheme, 0.97, full_range)
    np.testing.assert_array_equal(quant_weight(w, 4, group_size, scheme, 0.97, full_range=full_range), qdq_ref)
    q, s, z = quant_weight(w, 4, group_size, scheme, 0.97, return_int=True, full_range=full_range)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)
    if z_ref is None:
        assert z is None
    else:
        np.testing.assert_array_equal(z, z_ref)


@pytest.mark.parametrize("data_type", ["nf4", "fp4", "fp4_e2m1"])
def test_quant_weight_4bit_float_types(data_type):
    w = seeded((4, 64), seed=5)
    qdq = quant_weight(w, 4, 32, data_type=data_type, quantile=0.9)
    codes, scale, zp = quant_weight(w, 4, 32, data_type=data_type, quantile=0.9, return_int=True)
    assert zp is None and scale.shape == (4, 2)
    for r in range(4):
        for j in range(2):
            values, bit_codes, s = ref_4bit(w[r, 32 * j:32 * (j + 1)], data_type, 0.9)
            np.testing.assert_allclose(qdq[r, 32 * j:32 * (j + 1)], values, rtol=1e-6)
            np.testing.assert_array_equal(codes[r, 32 * j:32 * (j + 1)], bit_codes)
            assert scale[r, j] == pytest.approx(s, rel=1e-6)


def test_qdq_weight_actor_dispatch_and_errors():
    w = seeded((3, 16), seed=6)
    np.testing.assert_array_equal(qdq_weight_actor(w, 4, "sym"), qdq_weight_sym(w, 4))
    np.testing.assert_array_equal(qdq_weight_actor(w, 3, "asym"), qdq_weight_asym(w, 3))
    with pytest.raises(OnnxqError, match="4-bit type"):
        qdq_weight_actor(w, 8, "sym", data_type="nf4")
    with pytest.raises(OnnxqError, match="scheme"):
        qdq_weight_actor(w, 4, "symmetric")
    with pytest.raises(OnnxqError, match="data_type"):
        quant_weight(w, 4, data_type="int4")
    with pytest.raises(OnnxqError, match="NaN"):
        quant_weight(np.full((2, 4), np.nan, F32))
    np.testing.assert_array_equal(quant_weight(w, 0), w)  # num_bits <= 0: unquantized, as NC


@pytest.mark.parametrize("scheme,full_range,data_type", [("asym", False, "int"), ("sym", True, "int"),
                                                         ("sym", False, "int"), ("sym", False, "nf4")])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_quant_weight_w_scale_inverts_quant_weight(scheme, full_range, data_type, group_size):
    w = seeded((8, 80), seed=7)  # in=80: a tail group of 16 when group_size is 32
    q, scale, zp = quant_weight(w, 4, group_size, scheme, data_type=data_type, return_int=True, full_range=full_range)
    codes = quant_weight_w_scale(w, scale, zp, group_size, data_type)
    low, high = (0, 15) if scheme == "asym" else (-8, 7)
    np.testing.assert_array_equal(np.clip(codes, low, high), q)  # NC does not clip here: full range can give +8
    assert np.all(codes[codes != q] == 8) and (full_range or np.array_equal(codes, q))


def test_quant_weight_w_scale_does_not_clip_as_nc():
    w = np.array([[0.0, 1.0, -2.0, 4.0]], F32)
    codes = quant_weight_w_scale(w, np.array([[0.5]], F32), np.array([[1.0]], F32))
    np.testing.assert_array_equal(codes, [[1, 3, -3, 9]])


def test_search_clip_picks_nc_grid_minimum():
    w = seeded((8, 64), seed=8)
    w[0, 0] = 2.0  # an outlier makes clipping worthwhile
    errors = [np.mean((w - ref_quant_weight(w, 4, 32, "asym", r)[0]) ** 2) for r in NC_CLIP_RATIOS]
    assert search_clip(w, 4, 32, "asym") == NC_CLIP_RATIOS[int(np.argmin(errors))]
    assert NC_CLIP_RATIOS[0] == 1.0 and NC_CLIP_RATIOS[-1] == pytest.approx(0.805) and len(NC_CLIP_RATIOS) == 40


# --- make_matmul_weight_only_node ---------------------------------------------------------------
def nc_onnx_quant_tensor_uint(data, bits, group_size, scheme):
    """NC's ONNX ``quant_tensor(data, bits, group_size, scheme, "uint")`` (min/max range, 2*amax/(2^b-1) for sym)."""
    data = data.reshape(-1, group_size).astype(np.float64)
    maxq = 2**bits - 1
    q, scales, zps = np.zeros_like(data), np.ones((len(data), 1)), np.zeros((len(data), 1))
    for i, g in enumerate(data):
        lo, hi = g.min(), g.max()
        if scheme == "sym":
            amax = max(abs(lo), abs(hi))
            scales[i] = 2 * amax / maxq if amax > 0 else 1.0
            zps[i] = 2 ** (bits - 1)
        else:
            scales[i] = (hi - lo) / maxq if hi != lo else 1.0
            zps[i] = min(max(np.round(-lo / scales[i, 0]), 0), maxq)
        q[i] = np.clip(np.round(g / scales[i] + zps[i]), 0, maxq)
    return q.astype(np.uint8), scales, zps.astype(np.uint8)


@pytest.mark.parametrize("bits,scheme", [(4, "asym"), (4, "sym"), (8, "asym"), (2, "asym")])
@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
def test_make_matmul_weight_only_node_runs_in_ort(bits, scheme, scale_dtype):
    k, n, group_size = 80, 24, 32  # K padded to 96: k_blocks = 3 (odd: zero points packed per row)
    w = seeded((k, n), seed=bits)
    k_blocks = -(-k // group_size)
    padded = np.pad(w, ((0, k_blocks * group_size - k), (0, 0)))
    q, scale, zp = nc_onnx_quant_tensor_uint(padded.T, bits, group_size, scheme)
    scale = scale.astype(scale_dtype)
    matmul = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    node, inits = make_matmul_weight_only_node(matmul, (k, n), bits, group_size, k_blocks, q, scale,
                                               zp if scheme == "asym" else None)
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and node.name == "mm_Q%d" % bits
    names = ["W_scale"] + (["W_zp"] if scheme == "asym" else []) + [f"W_Q{bits}G{group_size}"]
    assert [t.name for t in inits] == names
    assert list(node.input) == ["x", f"W_Q{bits}G{group_size}", "W_scale"] + (["W_zp"] if scheme == "asym" else [])
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(scale_dtype))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem, [3, k])],
                              [helper.make_tensor_value_info("y", elem, [3, n])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    x = seeded((3, k), seed=11, scale=1.0).astype(scale_dtype)
    (y,) = run(model, {"x": x})
    dequant = (q.astype(np.float64) - zp.astype(np.float64)) * scale.astype(np.float64)  # [N*k_blocks, gs]
    w_eff = dequant.reshape(n, -1)[:, :k].T
    expected = x.astype(np.float64) @ w_eff
    tol = 1e-5 if scale_dtype == np.float32 else 2e-2
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol * np.abs(expected).max())


def test_make_matmul_weight_only_node_checks_inputs():
    matmul = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    q = np.zeros((8 * 2, 32), np.uint8)
    scale = np.ones((16, 1), F32)
    with pytest.raises(OnnxqError, match="k_blocks"):
        make_matmul_weight_only_node(matmul, (64, 8), 4, 32, 3, q, scale, None)
    with pytest.raises(OnnxqError, match="power of two"):
        make_matmul_weight_only_node(matmul, (64, 8), 4, 24, 3, q, scale, None)
    with pytest.raises(OnnxqError, match="float32 or float16"):
        make_matmul_weight_only_node(matmul, (64, 8), 4, 32, 2, q, scale.astype(np.float64), None)
    with pytest.raises(OnnxqError, match="codes must be in"):
        make_matmul_weight_only_node(matmul, (64, 8), 4, 32, 2, q + 16, scale, None)


# --- rtn / gptq / awq on a small transformer --------------------------------------------------
VOCAB = 97
FP32_NODE = "layers.0.self_attn.q_proj"
INT8_NODE = "layers.1.mlp.fc1"
WEIGHT_CONFIG = {FP32_NODE: "fp32", INT8_NODE: {"bits": 8, "group_size": 64, "scheme": "sym"}}


class Loader:
    """NC-style dataloader: ``batch_size`` and ``(inputs, label)`` items (inputs: one array)."""

    def __init__(self, count, batch_size, seq, seed):
        rng = np.random.default_rng(seed)
        self.batch_size = batch_size
        self.items = [(rng.integers(0, VOCAB, (batch_size, seq)).astype(np.int64), 0) for _ in range(count)]

    def __iter__(self):
        return iter(self.items)


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=2, hidden=64, ffn=128, vocab=VOCAB, seed=3)


@pytest.fixture(scope="module")
def held_out(model):
    feed = {"input_ids": np.random.default_rng(99).integers(0, VOCAB, (4, 32)).astype(np.int64)}
    return feed, run(model, feed)[0]


def output_error(quantized, held_out):
    feed, reference = held_out
    (y,) = run(quantized, feed)
    return float(np.linalg.norm(y - reference) / np.linalg.norm(reference))


def check_weight_config(original, quantized):
    onnx.checker.check_model(quantized)
    nodes = {n.name: n for n in quantized.graph.node}
    orig = {n.name: n for n in original.graph.node}[FP32_NODE]
    kept = nodes[FP32_NODE]
    assert kept.op_type == "MatMul" and list(kept.input) == list(orig.input)
    weights = {t.name: t for t in quantized.graph.initializer}
    original_weights = {t.name: t for t in original.graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(weights[orig.input[1]]),
                                  numpy_helper.to_array(original_weights[orig.input[1]]))
    nbits = {n.name: n for n in ir.from_proto(quantized).graph if n.op_type == "MatMulNBits"}
    assert len(nbits) == 12  # 13 sites, one left in float
    for name, node in nbits.items():
        attrs = {a: node.attributes[a].as_int() for a in ("bits", "block_size")}
        if name == f"{INT8_NODE}_Q8":
            assert attrs == {"bits": 8, "block_size": 64} and len(node.inputs) == 3  # sym: no zero points
        else:
            assert attrs == {"bits": 4, "block_size": 32} and node.inputs[3] is not None  # asym default
    return nbits


@pytest.fixture(scope="module")
def rtn_error(model, held_out):
    quantized = rtn_quantize(model, WEIGHT_CONFIG)
    check_weight_config(model, quantized)
    return output_error(quantized, held_out)


def test_rtn_quantize_weight_config_and_exact_codes(model, held_out, rtn_error):
    quantized = rtn_quantize(model, WEIGHT_CONFIG)
    nbits = check_weight_config(model, quantized)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # per-node settings honoured: the 8-bit node's weight error is far below a 4-bit one's
    name8, name4 = f"{INT8_NODE}_Q8", "layers.1.mlp.fc2_Q4"
    w8, w4 = weights[f"{INT8_NODE}.weight"], weights["layers.1.mlp.fc2.weight"]
    err8 = np.linalg.norm(dequantized_weight(nbits[name8]) - w8) / np.linalg.norm(w8)
    err4 = np.linalg.norm(dequantized_weight(nbits[name4]) - w4) / np.linalg.norm(w4)
    assert err8 < err4 / 8
    # the 4-bit asym grid is NC's torch formula on [out, in] = W^T (onnxq rounds half up: ties may differ)
    nc_qdq = ref_quant_weight(np.ascontiguousarray(w4.T), 4, 32, "asym")[0].T
    assert np.mean(~np.isclose(dequantized_weight(nbits[name4]), nc_qdq, rtol=0, atol=1e-6)) < 1e-3
    assert 0 < rtn_error < 0.5


def test_rtn_quantize_ratios_clip_the_range(model):
    plain = {n.name: n for n in ir.from_proto(rtn_quantize(model)).graph if n.op_type == "MatMulNBits"}
    clipped = {n.name: n for n in ir.from_proto(rtn_quantize(model, ratios={"lm_head.weight": 0.9})).graph
               if n.op_type == "MatMulNBits"}
    ratio = clipped["lm_head_Q4"].inputs[2].const_value.numpy() / plain["lm_head_Q4"].inputs[2].const_value.numpy()
    np.testing.assert_allclose(ratio, 0.9, rtol=1e-5)
    other = "layers.0.mlp.fc1_Q4"
    np.testing.assert_array_equal(clipped[other].inputs[2].const_value.numpy(),
                                  plain[other].inputs[2].const_value.numpy())


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_calibrated_nc_api_beats_rtn(model, held_out, rtn_error, algorithm):
    loader = Loader(count=8, batch_size=2, seq=32, seed=1)  # 16 samples
    if algorithm == "gptq":
        quantized = gptq_quantize(model, loader, WEIGHT_CONFIG, n_samples=16)
    else:
        quantized = awq_quantize(model, loader, WEIGHT_CONFIG, n_samples=16)
    check_weight_config(model, quantized)
    error = output_error(quantized, held_out)
    assert error < rtn_error * 0.8, (algorithm, error, rtn_error)


def test_prepare_inputs_follows_nc_sample_count(model):
    loader = Loader(count=10, batch_size=4, seq=8, seed=2)
    inputs, so = prepare_inputs(model, 10, loader, ["CPUExecutionProvider"])
    assert len(inputs) == 2  # a third batch would take 12 > 10 samples
    np.testing.assert_array_equal(inputs[1]["input_ids"], loader.items[1][0])
    assert type(so).__name__ == "SessionOptions"
    assert len(prepare_inputs(model, -1, loader, [])[0]) == 10
    dicts = [{"input_ids": np.zeros((1, 8), np.int64)}] * 3  # plain feed dicts, no batch_size: 1 each
    assert len(prepare_inputs(model, 2, dicts, [])[0]) == 2
    labelled = [({"input_ids": np.ones((1, 8), np.int64)}, 1), ([np.ones((1, 8), np.int64)], 1)]
    assert [f["input_ids"].sum() for f in prepare_inputs(model, -1, labelled, [])[0]] == [8, 8]
    with pytest.raises(OnnxqError, match="input number mismatch"):
        prepare_inputs(model, 1, [([np.zeros((1, 8), np.int64)] * 2, 0)], [])


def test_weight_config_errors(model):
    loader = Loader(count=2, batch_size=1, seq=8, seed=3)
    with pytest.raises(OnnxqError, match="unknown keys"):
        rtn_quantize(model, {FP32_NODE: {"bits": 4, "dtype": "int"}})
    with pytest.raises(OnnxqError, match="cannot be mixed"):
        gptq_quantize(model, loader, {FP32_NODE: {"bits": 4, "algorithm": "AWQ"}})
    with pytest.raises(OnnxqError, match="bits must be 2, 4 or 8"):
        rtn_quantize(model, {FP32_NODE: {"bits": 3}})
    with pytest.raises(OnnxqError, match="scheme"):
        rtn_quantize(model, scheme="symmetric")
    everything = {n.name: "fp32" for n in model.graph.node if n.op_type == "MatMul"}
    with pytest.raises(OnnxqError, match="no quantizable"):
        rtn_quantize(model, everything)
    with pytest.raises(OnnxqError, match="no calibration sample"):
        gptq_quantize(model, Loader(count=2, batch_size=4, seq=8, seed=3), n_samples=2)


def test_model_path_input_and_onnxq_exports(model, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    quantized = onnxq.rtn_quantize(str(path), num_bits=8, group_size=-1, scheme="sym")
    nodes = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 13
    assert {helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "bits"} == {8}
    assert onnxq.gptq_quantize is gptq_quantize and onnxq.awq_quantize is awq_quantize
    assert isinstance(quantized, onnx.ModelProto)
    assert TensorProto.UINT8 in {t.data_type for t in quantized.graph.initializer}


def test_awq_clip_search_alone_keeps_unit_scales(model):
    """enable_auto_scale=False: no scale is folded anywhere (no Mul inserted, norms untouched)."""
    quantized = awq_quantize(model, Loader(count=4, batch_size=1, seq=16, seed=5), enable_auto_scale=False)
    assert not [n for n in quantized.graph.node if n.op_type == "Mul" and n.name.endswith("_scale")]
    before = {t.name: t.raw_data for t in model.graph.initializer if "norm" in t.name}
    after = {t.name: t.raw_data for t in quantized.graph.initializer if t.name in before}
    assert after == before
