"""Small ONNX graphs built with onnx.helper for the rewrite tests (seeded weights)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["weight", "make_model", "matmul_model", "run"]


def weight(shape, seed: int, dtype=np.float32, scale: float = 0.05) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def make_model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def matmul_model(w: np.ndarray, m_shape=("batch", 7), name: str = "mm") -> onnx.ModelProto:
    """``y = x @ W`` with ``x: [*m_shape, K]``."""
    elem = helper.np_dtype_to_tensor_dtype(w.dtype)
    k, n = w.shape[-2:]
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name=name)],
        [helper.make_tensor_value_info("x", elem, [*m_shape, k])],
        [helper.make_tensor_value_info("y", elem, [*m_shape, n])],
        {"W": w},
    )


def run(model, feeds: dict) -> list[np.ndarray]:
    """Run ``model`` (ModelProto, path or ir.Model) on the ORT CPU EP."""
    import onnx_ir as ir
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
