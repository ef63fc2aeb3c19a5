"""AWQ/SmoothQuant input scales folded into the graph leave the float model's outputs unchanged."""
import numpy as np
import onnx_ir as ir
import pytest

from onnxq.calibration import find_blocks
from onnxq.io import load_model
from onnxq.passes import find_weight_sites
from onnxq.graph.scale_folding import fold_input_scale
from tests.graphs import run
from tests.tiny_transformer import NORMS, make_tiny_transformer


def scale_weight_rows(site, s: np.ndarray) -> None:
    """Multiply the site's weight ``W: [K, N]`` rows by ``s`` (a new initializer, stored as the site reads it)."""
    data = np.asarray(site.tensor.numpy(), dtype=np.float32)
    scaled = data * (s[None, :] if site.transpose else s[:, None])
    name = f"{site.source.name}_scaled_for_{site.name}"
    value = ir.Value(name=name, shape=ir.Shape(scaled.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(scaled, name=name))
    site.node.graph.register_initializer(value)
    index = 1
    site.node.replace_input_with(index, value)


@pytest.mark.parametrize("norm", NORMS)
def test_folding_every_input_group_keeps_outputs(norm):
    proto = make_tiny_transformer(num_layers=2, hidden=64, ffn=128, norm=norm)
    ids = np.random.default_rng(0).integers(0, 97, (2, 9)).astype(np.int64)
    (reference,) = run(proto, {"input_ids": ids})
    model = load_model(proto)
    sites, _ = find_weight_sites(model)
    blocks = find_blocks(model, sites)
    rng = np.random.default_rng(1)
    where = []
    for block in blocks:
        for name, group in block.input_groups.items():
            s = np.exp(rng.normal(0, 0.5, group[0].k)).astype(np.float32)  # scales in ~[0.2, 5]
            where.append(fold_input_scale(model.graph, group[0].activation, [g.node for g in group], s))
            for site in group:
                scale_weight_rows(site, s)
    (folded,) = run(model, {"input_ids": ids})
    np.testing.assert_allclose(folded, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    # q/k/v, up/gate and lm_head inputs come from norms: those scales must be folded, not multiplied at run time
    folded_into_norm = [w for w in where if w.startswith("folded into")]
    assert len(folded_into_norm) == 5, where  # 2 layers x (attn norm, mlp norm) + final norm
    inserted = [w for w in where if w.startswith("Mul node")]
    assert len(inserted) == 4, where  # o_proj and fc2 inputs have no foldable producer


def test_shared_constant_is_copied_not_modified():
    """A norm gain read by another node too is not changed in place: the fold writes a copy."""
    proto = make_tiny_transformer(num_layers=1, hidden=32, ffn=64)
    model = load_model(proto)
    sites, _ = find_weight_sites(model)
    group = [s for s in sites if s.name.endswith(("q_proj", "k_proj", "v_proj"))]
    norm = group[0].activation.producer()
    gamma = norm.inputs[1]
    before = np.array(gamma.const_value.numpy(), copy=True)
    fold_input_scale(model.graph, group[0].activation, [s.node for s in group], np.full(32, 2.0, np.float32))
    np.testing.assert_array_equal(gamma.const_value.numpy(), before)
    np.testing.assert_allclose(norm.inputs[1].const_value.numpy(), before / 2, rtol=1e-6)


def test_other_reader_forces_a_mul_node():
    """When the activation is also read by a node that is not a consumer, nothing upstream may change."""
    proto = make_tiny_transformer(num_layers=1, hidden=32, ffn=64)
    model = load_model(proto)
    sites, _ = find_weight_sites(model)
    q = next(s for s in sites if s.name.endswith("q_proj"))
    where = fold_input_scale(model.graph, q.activation, [q.node], np.full(32, 2.0, np.float32))  # k/v also read it
    assert where.startswith("Mul node")
    assert q.node.inputs[0].producer().op_type == "Mul"
