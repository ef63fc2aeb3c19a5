"""The tiny transformer fixture against numpy, and find_blocks on it and on hand-built graphs."""
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxq.calibration import ActivationProbe, find_blocks
from onnxq.graph.sites import find_weight_sites
from tests.graphs import run, weight
from tests.tiny_transformer import NORMS, OUTLIER_CHANNELS, make_tiny_transformer, reference_forward


def sites_and_blocks(model):
    ir_model = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
    sites, _ = find_weight_sites(ir_model)
    return ir_model, sites, find_blocks(ir_model, sites)


def block_names(blocks):
    return [[s.name for s in b.sites] for b in blocks]


@pytest.mark.parametrize("norm", NORMS)
def test_tiny_transformer_matches_numpy(norm):
    model = make_tiny_transformer(norm=norm, seed=1)
    ids = np.random.default_rng(0).integers(0, 97, (2, 11))
    (logits,) = run(model, {"input_ids": ids})
    ref, _ = reference_forward(model, ids, norm=norm)
    assert logits.shape == (2, 11, 97)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_tiny_transformer_mask_and_positions_match_numpy():
    model = make_tiny_transformer(num_layers=1, attention_mask=True, position_ids=True, seq=8)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 97, (2, 8))
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0
    positions = np.stack([np.arange(8), np.arange(3, 11)])
    (logits,) = run(model, {"input_ids": ids, "attention_mask": mask, "position_ids": positions})
    ref, _ = reference_forward(model, ids, attention_mask=mask, position_ids=positions)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_tiny_transformer_has_outlier_channels():
    model = make_tiny_transformer()
    ids = np.random.default_rng(3).integers(0, 97, (1, 16))
    _, inputs = reference_forward(model, ids)
    mean_abs = np.abs(inputs["layers.0.self_attn.q_proj"]).reshape(-1, 64).mean(0)
    others = np.delete(mean_abs, OUTLIER_CHANNELS)
    assert mean_abs[list(OUTLIER_CHANNELS)].min() > 5 * np.median(others)


@pytest.mark.parametrize("norm", NORMS)
def test_blocks_of_tiny_transformer(norm):
    _, sites, blocks = sites_and_blocks(make_tiny_transformer(norm=norm))
    assert len(sites) == 2 * 6 + 1
    attn = [f"self_attn.{n}_proj" for n in "qkvo"]
    mlp = ["mlp.fc1", "mlp.fc2"]
    expected = [[f"layers.{i}.{n}" for n in part] for i in range(2) for part in (attn, mlp)] + [["lm_head"]]
    assert block_names(blocks) == expected
    # q/k/v read one normalized tensor; o, fc1, fc2 and lm_head their own
    assert [[[s.name.split(".")[-1] for s in g] for g in b.input_groups.values()] for b in blocks] == [
        [["q_proj", "k_proj", "v_proj"], ["o_proj"]], [["fc1"], ["fc2"]]] * 2 + [[["lm_head"]]]
    for b in blocks:
        for name, group in b.input_groups.items():
            assert all(s.activation.name == name for s in group)
    # the residual stream chains the blocks: each block's input is the previous block's output
    assert blocks[0].inputs == []
    for prev, cur in zip(blocks, blocks[1:]):
        assert len(cur.inputs) == 1 and cur.inputs == prev.outputs
        assert cur.inputs[0].endswith("_residual/out")
    assert blocks[-1].outputs == []


def test_blocks_run_alone_from_cut_inputs():
    """Probing each block from its cut inputs gives what the full model computes (and numpy)."""
    proto = make_tiny_transformer(norm="decomposed", attention_mask=True)
    model, _, blocks = sites_and_blocks(proto)
    rng = np.random.default_rng(4)
    feed = {"input_ids": rng.integers(0, 97, (2, 9)), "attention_mask": np.ones((2, 9), np.int64)}
    feed["attention_mask"][0, 7:] = 0
    _, ref_inputs = reference_forward(proto, feed["input_ids"], norm="decomposed", attention_mask=feed["attention_mask"])
    cache: dict[str, np.ndarray] = {}
    for block in blocks:
        probe = ActivationProbe(model, [*block.input_groups, *block.outputs], feed_names=block.inputs)
        assert set(probe.input_names) <= {"input_ids", "attention_mask", *block.inputs}
        got = probe.run({**feed, **{n: cache[n] for n in block.inputs}})
        for name, group in block.input_groups.items():
            ref = ref_inputs[group[0].name]
            np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        cache = {n: got[n] for n in block.outputs}
    assert len(probe.input_names) == 1  # lm_head's block needs only the residual stream


def _linear(name, x, k, n, seed):
    return helper.make_node("MatMul", [x, f"{name}.w"], [f"{name}.y"], name=name), {f"{name}.w": weight((k, n), seed)}


def _graph(nodes_inits, inputs, outputs, extra_nodes=(), opset=17, domains=()):
    nodes, inits = [], {}
    for item in nodes_inits:
        if isinstance(item, tuple):
            nodes.append(item[0])
            inits.update(item[1])
        else:
            nodes.append(item)
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs,
                          [onnx.numpy_helper.from_array(a, n) for n, a in inits.items()]),
        opset_imports=[helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in domains]])
    model.ir_version = 9
    return model


def test_post_norm_encoder_blocks():
    """BERT-style post-norm: residual Add -> LayerNormalization closes each sublayer."""
    k = 32
    inits = {f"ln{i}.{p}": np.full(k, 1.0 if p == "g" else 0.0, np.float32) for i in range(3) for p in "gb"}
    items = [
        helper.make_node("LayerNormalization", ["x", "ln0.g", "ln0.b"], ["h0"], name="ln0"),
        _linear("attn.a", "h0", k, k, 1), helper.make_node("Relu", ["attn.a.y"], ["r0"], name="r0"),
        _linear("attn.o", "r0", k, k, 2), helper.make_node("Add", ["attn.o.y", "h0"], ["s1"], name="res1"),
        helper.make_node("LayerNormalization", ["s1", "ln1.g", "ln1.b"], ["h1"], name="ln1"),
        _linear("mlp.fc1", "h1", k, 2 * k, 3), helper.make_node("Relu", ["mlp.fc1.y"], ["r1"], name="r1"),
        _linear("mlp.fc2", "r1", 2 * k, k, 4), helper.make_node("Add", ["mlp.fc2.y", "h1"], ["s2"], name="res2"),
        helper.make_node("LayerNormalization", ["s2", "ln2.g", "ln2.b"], ["y"], name="ln2"),
    ]
    model = _graph(items, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, k])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, k])])
    model.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in inits.items())
    _, _, blocks = sites_and_blocks(model)
    assert block_names(blocks) == [["attn.a", "attn.o"], ["mlp.fc1", "mlp.fc2"]]
    assert blocks[1].inputs == ["s1"] and blocks[0].outputs == ["s1"]


@pytest.mark.parametrize("op,domain", [("SkipLayerNormalization", "com.microsoft"),
                                       ("SkipSimplifiedLayerNormalization", "com.microsoft"),
                                       ("RMSNormalization", "")])
def test_fused_norm_op_types_open_blocks(op, domain):
    k = 16
    norm_inputs = {"SkipLayerNormalization": ["h", "skip", "g", "b"],
                   "SkipSimplifiedLayerNormalization": ["h", "skip", "g"],
                   "RMSNormalization": ["h", "g"]}[op]
    items = [
        _linear("a", "x", k, k, 1), _linear("b", "a.y", k, k, 2),
        helper.make_node(op, norm_inputs, ["n"], name="norm", domain=domain),
        _linear("c", "n", k, k, 3),
        helper.make_node("Add", ["x", "b.y"], ["h"], name="residual"),  # out of order: needs a topological sort
    ]
    model = _graph(items, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k]),
                           helper.make_tensor_value_info("skip", TensorProto.FLOAT, [2, k])],
                   [helper.make_tensor_value_info("c.y", TensorProto.FLOAT, [2, k])], opset=23,
                   domains=[domain] if domain else ())
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.ones(k, np.float32), "g"),
                                    onnx.numpy_helper.from_array(np.zeros(k, np.float32), "b")])
    _, _, blocks = sites_and_blocks(ir.serde.deserialize_model(model))
    # were the op not a norm, the Add would not be residual and each site would be its own block
    assert block_names(blocks) == [["a", "b"], ["c"]]
    assert blocks[1].start == "residual Add 'residual'" and blocks[1].inputs == ["h"]


def test_fallback_one_block_per_activation():
    """No norm, no residual: each group of sites sharing an input is a block (siblings together)."""
    k = 16
    items = [_linear("up", "x", k, k, 1), _linear("gate", "x", k, k, 2),
             helper.make_node("Mul", ["up.y", "gate.y"], ["m"], name="glu"),
             _linear("down", "m", k, k, 3), helper.make_node("Relu", ["down.y"], ["r"], name="relu"),
             _linear("head", "r", k, 4, 4)]
    model = _graph(items, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                   [helper.make_tensor_value_info("head.y", TensorProto.FLOAT, [3, 4])])
    ir_model, _, blocks = sites_and_blocks(model)
    assert block_names(blocks) == [["up", "gate"], ["down"], ["head"]]
    assert [b.start for b in blocks] == ["input group 'x'", "input group 'm'", "input group 'r'"]
    assert blocks[1].inputs == ["m"] and blocks[2].inputs == ["r"] and blocks[1].outputs == ["r"]
    # the cuts are valid: run the last block alone from its input
    x = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
    full = ActivationProbe(ir_model, ["r", "head.y"]).run({"x": x})
    alone = ActivationProbe(ir_model, ["head.y"], feed_names=["r"])
    assert alone.input_names == ["r"]
    np.testing.assert_array_equal(alone.run({"r": full["r"]})["head.y"], full["head.y"])


def test_sibling_sites_split_by_a_boundary_are_merged():
    """A site reading the same activation as an earlier one, after a norm, joins the earlier block."""
    k = 16
    items = [
        _linear("a", "x", k, k, 1),
        helper.make_node("LayerNormalization", ["a.y", "g", "b"], ["n"], name="ln"),
        _linear("b", "n", k, k, 2),
        _linear("late_sibling", "x", k, k, 3),
        helper.make_node("Add", ["b.y", "late_sibling.y"], ["s"], name="sum"),
        helper.make_node("LayerNormalization", ["s", "g", "b"], ["n2"], name="ln2"),
        _linear("c", "n2", k, k, 4),
    ]
    model = _graph(items, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                   [helper.make_tensor_value_info("c.y", TensorProto.FLOAT, [2, k])])
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.ones(k, np.float32), "g"),
                                    onnx.numpy_helper.from_array(np.zeros(k, np.float32), "b")])
    _, _, blocks = sites_and_blocks(model)
    assert block_names(blocks) == [["a", "b", "late_sibling"], ["c"]]
    assert list(blocks[0].input_groups) == ["x", "n"]


def test_subset_of_sites_and_empty():
    model, sites, _ = sites_and_blocks(make_tiny_transformer(num_layers=1))
    blocks = find_blocks(model, [s for s in sites if s.name != "lm_head"])
    assert block_names(blocks)[-1] == ["layers.0.mlp.fc1", "layers.0.mlp.fc2"]
    assert blocks[-1].outputs == []
    assert find_blocks(model, []) == []
