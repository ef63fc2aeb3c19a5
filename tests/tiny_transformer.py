"""A tiny pre-norm decoder built with onnx.helper, shaped like a torch export (seeded weights).

Graph: ``input_ids [batch, seq]`` -> token embedding + position embedding (Gather) ->
per layer ``[norm -> q/k/v MatMul (+bias) sharing the normed input -> causal
multi-head attention (Reshape/Transpose/MatMul/Softmax) -> o_proj MatMul (+bias) ->
residual Add -> norm -> fc1 MatMul (+bias) -> Gelu (Erf form) -> fc2 MatMul (+bias) ->
residual Add]`` -> final norm -> lm_head MatMul -> ``logits [batch, seq, vocab]``.

Node names follow Hugging Face (``layers.0.self_attn.q_proj``); weights are
``<node name>.weight`` ``[in, out]``. A few hidden channels (``OUTLIER_CHANNELS``)
are ~10x larger in the embeddings and the norm gains, like the outlier features
of real LLMs (so AWQ/SmoothQuant scaling has something to do).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["make_tiny_transformer", "reference_forward", "OUTLIER_CHANNELS", "NORMS", "EPS", "MASK_VALUE"]

NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "decomposed")
OUTLIER_CHANNELS = (3, 17)
EPS = 1e-5
MASK_VALUE = -1e9


class _Builder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}

    def const(self, name: str, array) -> str:
        self.inits[name] = np.asarray(array)
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}/out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out


def make_tiny_transformer(
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    ffn: int = 128,
    vocab: int = 97,
    seq: int | None = None,
    norm: str = "LayerNormalization",
    seed: int = 0,
    *,
    attention_mask: bool = False,
    position_ids: bool = False,
    max_positions: int = 128,
) -> onnx.ModelProto:
    """The decoder described in the module docstring, opset 18.

    ``norm``: ``"LayerNormalization"`` (ONNX op), ``"SimplifiedLayerNormalization"``
    (ORT's RMSNorm op) or ``"decomposed"`` (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/
    Div/Mul/Add, as torch exports LayerNorm). ``attention_mask=True`` adds an input
    ``attention_mask [batch, seq]`` (0 = padding key, masked with ``MASK_VALUE``);
    ``position_ids=True`` adds an input ``position_ids [batch, seq]`` (else positions
    are ``0..seq-1``). ``seq``: a static sequence length, or ``None`` for dynamic.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    b = _Builder()

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def gain(shape):
        g = 1.0 + normal(shape, 0.1)
        g[list(OUTLIER_CHANNELS)] *= 4.0
        return g

    def linear(x: str, name: str, k: int, n: int, std_scale: float = 1.0, bias: bool = True) -> str:
        w = b.const(f"{name}.weight", normal((k, n), std_scale / np.sqrt(k)))
        y = b.node("MatMul", [x, w], name)
        if bias:
            y = b.node("Add", [y, b.const(f"{name}.bias", normal((n,), 0.02))], f"{name}/bias_add")
        return y

    def normalize(x: str, name: str) -> str:
        gamma = b.const(f"{name}.weight", gain((hidden,)))
        if norm == "SimplifiedLayerNormalization":
            return b.node(norm, [x, gamma], name, axis=-1, epsilon=EPS)
        beta = b.const(f"{name}.bias", normal((hidden,), 0.02))
        if norm == "LayerNormalization":
            return b.node(norm, [x, gamma, beta], name, axis=-1, epsilon=EPS)
        axes = b.const(f"{name}.axes", np.array([-1], np.int64))
        mean = b.node("ReduceMean", [x, axes], f"{name}/mean", keepdims=1)
        diff = b.node("Sub", [x, mean], f"{name}/sub")
        sq = b.node("Pow", [diff, b.const(f"{name}.two", np.array(2.0, np.float32))], f"{name}/pow")
        var = b.node("ReduceMean", [sq, axes], f"{name}/var", keepdims=1)
        std = b.node("Sqrt", [b.node("Add", [var, b.const(f"{name}.eps", np.array(EPS, np.float32))],
                                      f"{name}/add_eps")], f"{name}/sqrt")
        scaled = b.node("Mul", [b.node("Div", [diff, std], f"{name}/div"), gamma], f"{name}/mul")
        return b.node("Add", [scaled, beta], f"{name}/add")

    # embeddings, positions and the causal mask (functions of the inputs only)
    embed = normal((vocab, hidden), 1.0)
    embed[:, list(OUTLIER_CHANNELS)] *= 10.0
    h = b.node("Gather", [b.const("embed_tokens.weight", embed), "input_ids"], "embed_tokens")
    shape = b.node("Shape", ["input_ids"], "ids_shape")
    seq_len = b.node("Gather", [shape, b.const("one", np.array(1, np.int64))], "seq_len", axis=0)
    zero, step = b.const("zero", np.array(0, np.int64)), b.const("step", np.array(1, np.int64))
    positions = b.node("Range", [zero, seq_len, step], "positions")
    pos_source = "position_ids" if position_ids else positions
    pos_table = b.const("embed_positions.weight", normal((max_positions, hidden), 0.5))
    h = b.node("Add", [h, b.node("Gather", [pos_table, pos_source], "embed_positions")], "embed_add")
    rows = b.node("Unsqueeze", [positions, b.const("axis1", np.array([1], np.int64))], "mask_rows")
    cols = b.node("Unsqueeze", [positions, b.const("axis0", np.array([0], np.int64))], "mask_cols")
    future = b.node("Greater", [cols, rows], "mask_future")
    mask = b.node("Where", [future, b.const("mask_value", np.array(MASK_VALUE, np.float32)),
                            b.const("mask_zero", np.array(0.0, np.float32))], "causal_mask")
    if attention_mask:
        padding = b.node("Cast", ["attention_mask"], "pad_cast", to=TensorProto.FLOAT)
        padding = b.node("Sub", [b.const("pad_one", np.array(1.0, np.float32)), padding], "pad_invert")
        padding = b.node("Mul", [padding, b.const("pad_value", np.array(MASK_VALUE, np.float32))], "pad_scale")
        padding = b.node("Unsqueeze", [padding, b.const("pad_axes", np.array([1, 2], np.int64))], "pad_unsqueeze")
        mask = b.node("Add", [mask, padding], "full_mask")  # [batch, 1, seq, seq]

    split_shape = b.const("split_heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = b.const("merge_heads_shape", np.array([0, 0, hidden], np.int64))
    scale = b.const("attn_scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    for i in range(num_layers):
        p = f"layers.{i}"
        x = normalize(h, f"{p}.input_layernorm")
        q, k, v = (linear(x, f"{p}.self_attn.{n}_proj", hidden, hidden) for n in "qkv")
        q = b.node("Transpose", [b.node("Reshape", [q, split_shape], f"{p}.self_attn/q_split")],
                   f"{p}.self_attn/q_t", perm=[0, 2, 1, 3])
        k = b.node("Transpose", [b.node("Reshape", [k, split_shape], f"{p}.self_attn/k_split")],
                   f"{p}.self_attn/k_t", perm=[0, 2, 3, 1])
        v = b.node("Transpose", [b.node("Reshape", [v, split_shape], f"{p}.self_attn/v_split")],
                   f"{p}.self_attn/v_t", perm=[0, 2, 1, 3])
        scores = b.node("Mul", [b.node("MatMul", [q, k], f"{p}.self_attn/qk"), scale], f"{p}.self_attn/scale")
        probs = b.node("Softmax", [b.node("Add", [scores, mask], f"{p}.self_attn/mask_add")],
                       f"{p}.self_attn/softmax", axis=-1)
        ctx = b.node("Transpose", [b.node("MatMul", [probs, v], f"{p}.self_attn/pv")], f"{p}.self_attn/ctx_t",
                     perm=[0, 2, 1, 3])
        ctx = b.node("Reshape", [ctx, merge_shape], f"{p}.self_attn/merge")
        h = b.node("Add", [h, linear(ctx, f"{p}.self_attn.o_proj", hidden, hidden, 0.5)], f"{p}/attn_residual")
        x = normalize(h, f"{p}.post_attention_layernorm")
        up = linear(x, f"{p}.mlp.fc1", hidden, ffn)
        erf = b.node("Erf", [b.node("Div", [up, b.const("sqrt2", np.array(np.sqrt(2.0), np.float32))],
                                    f"{p}.mlp/gelu_div")], f"{p}.mlp/gelu_erf")
        half = b.node("Mul", [up, b.const("half", np.array(0.5, np.float32))], f"{p}.mlp/gelu_half")
        act = b.node("Mul", [half, b.node("Add", [erf, b.const("gelu_one", np.array(1.0, np.float32))],
                                          f"{p}.mlp/gelu_add")], f"{p}.mlp/gelu")
        h = b.node("Add", [h, linear(act, f"{p}.mlp.fc2", ffn, hidden, 0.5)], f"{p}/mlp_residual")
    x = normalize(h, "norm")
    logits = linear(x, "lm_head", hidden, vocab, bias=False)
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))

    seq_dim = seq if seq is not None else "seq"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq_dim])]
    if attention_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq_dim]))
    if position_ids:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", seq_dim]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", seq_dim, vocab])]
    graph = helper.make_graph(b.nodes, "tiny_transformer", inputs, outputs,
                              [numpy_helper.from_array(a, n) for n, a in b.inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    if norm != "SimplifiedLayerNormalization":  # an onnxruntime op the ONNX checker does not know
        onnx.checker.check_model(model, full_check=True)
    return model


def reference_forward(
    model: onnx.ModelProto,
    input_ids: np.ndarray,
    *,
    norm: str = "LayerNormalization",
    heads: int = 4,
    attention_mask: np.ndarray | None = None,
    position_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """An independent float64 numpy forward of :func:`make_tiny_transformer`'s model.

    Returns ``(logits [batch, seq, vocab], inputs)`` where ``inputs[site name]`` is the
    activation ``[batch, seq, K]`` entering that MatMul (e.g. ``"layers.0.mlp.fc2"``).
    """
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    num_layers = len({n.split(".")[1] for n in w if n.startswith("layers.")})
    batch, seq = input_ids.shape
    hidden = w["embed_tokens.weight"].shape[1]
    head_dim = hidden // heads
    inputs: dict[str, np.ndarray] = {}

    def normalize(x, name):
        if norm == "SimplifiedLayerNormalization":
            return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * w[f"{name}.weight"]
        centered = x - x.mean(-1, keepdims=True)
        return centered / np.sqrt((centered ** 2).mean(-1, keepdims=True) + EPS) * w[f"{name}.weight"] \
            + w[f"{name}.bias"]

    def linear(x, name, bias=True):
        inputs[name] = x
        y = x @ w[f"{name}.weight"]
        return y + w[f"{name}.bias"] if bias else y

    positions = position_ids if position_ids is not None else np.broadcast_to(np.arange(seq), (batch, seq))
    h = w["embed_tokens.weight"][input_ids] + w["embed_positions.weight"][positions]
    mask = np.where(np.arange(seq)[None, :] > np.arange(seq)[:, None], MASK_VALUE, 0.0)  # [seq, seq]
    if attention_mask is not None:
        mask = mask + ((1.0 - attention_mask) * MASK_VALUE)[:, None, None, :]
    for i in range(num_layers):
        p = f"layers.{i}"
        x = normalize(h, f"{p}.input_layernorm")
        q, k, v = (linear(x, f"{p}.self_attn.{n}_proj").reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)
                   for n in "qkv")
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
        h = h + linear(ctx, f"{p}.self_attn.o_proj")
        x = normalize(h, f"{p}.post_attention_layernorm")
        up = linear(x, f"{p}.mlp.fc1")
        act = 0.5 * up * (1.0 + np.vectorize(math.erf)(up / np.sqrt(2.0)))
        h = h + linear(act, f"{p}.mlp.fc2")
    logits = linear(normalize(h, "norm"), "lm_head", bias=False)
    return logits, inputs
