"""Build ``models/example.onnx``: a small MLP language model used by the README's first command.

Structure (fp32, seeded weights): ``input_ids [batch, seq]`` -> Gather embedding
``[512, 128]`` -> 2 x (LayerNormalization -> MatMul 128x512 -> Gelu -> MatMul
512x128 -> residual Add) -> LayerNormalization -> Gemm 128x128 (transB=1, bias)
-> tied lm_head ``Transpose(embedding) -> MatMul`` -> ``logits [batch, seq, 512]``.
It exercises MatMul, Gemm and Transpose->MatMul in one file of about 1.3 MB.

    python scripts/make_example_model.py [--out models/example.onnx]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, FFN, LAYERS = 512, 128, 512, 2


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {"embedding": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32) * 0.5}
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["h0"], name="embed")]
    hidden = "h0"
    for i in range(LAYERS):
        inits[f"ln{i}.scale"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        inits[f"ln{i}.bias"] = (0.05 * rng.standard_normal(HIDDEN)).astype(np.float32)
        inits[f"fc1_{i}.weight"] = (rng.standard_normal((HIDDEN, FFN)) / np.sqrt(HIDDEN)).astype(np.float32)
        inits[f"fc2_{i}.weight"] = (rng.standard_normal((FFN, HIDDEN)) / np.sqrt(FFN)).astype(np.float32)
        nodes += [
            helper.make_node("LayerNormalization", [hidden, f"ln{i}.scale", f"ln{i}.bias"], [f"n{i}"], name=f"layers.{i}.ln", axis=-1),
            helper.make_node("MatMul", [f"n{i}", f"fc1_{i}.weight"], [f"a{i}"], name=f"layers.{i}.fc1"),
            helper.make_node("Gelu", [f"a{i}"], [f"g{i}"], name=f"layers.{i}.gelu", domain="com.microsoft"),
            helper.make_node("MatMul", [f"g{i}", f"fc2_{i}.weight"], [f"m{i}"], name=f"layers.{i}.fc2"),
            helper.make_node("Add", [hidden, f"m{i}"], [f"h{i + 1}"], name=f"layers.{i}.residual"),
        ]
        hidden = f"h{i + 1}"
    inits["final_ln.scale"] = np.ones(HIDDEN, np.float32)
    inits["final_ln.bias"] = np.zeros(HIDDEN, np.float32)
    inits["proj.weight"] = (rng.standard_normal((HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
    inits["proj.bias"] = (0.01 * rng.standard_normal(HIDDEN)).astype(np.float32)
    nodes += [
        helper.make_node("LayerNormalization", [hidden, "final_ln.scale", "final_ln.bias"], ["nf"], name="final_ln", axis=-1),
        helper.make_node("Gemm", ["nf2d", "proj.weight", "proj.bias"], ["p2d"], name="proj", transB=1),
        helper.make_node("Transpose", ["embedding"], ["embedding_t"], name="lm_head.transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["p", "embedding_t"], ["logits"], name="lm_head"),
    ]
    # Gemm needs 2-D input: flatten [batch, seq, H] -> [batch*seq, H] and back.
    inits["flat_shape"] = np.array([-1, HIDDEN], np.int64)
    nodes.insert(-3, helper.make_node("Reshape", ["nf", "flat_shape"], ["nf2d"], name="flatten"))
    nodes.insert(-2, helper.make_node("Shape", ["input_ids"], ["ids_shape"], name="ids_shape"))
    inits["hidden_dim"] = np.array([HIDDEN], np.int64)
    nodes.insert(-2, helper.make_node("Concat", ["ids_shape", "hidden_dim"], ["out_shape"], name="out_shape", axis=0))
    nodes.insert(-2, helper.make_node("Reshape", ["p2d", "out_shape"], ["p"], name="unflatten"))
    graph = helper.make_graph(
        nodes, "example_mlp_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        producer_name="onnxq scripts/make_example_model.py",
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "example.onnx")
    args = parser.parse_args()
    onnx.save(build(), args.out)


if __name__ == "__main__":
    main()
