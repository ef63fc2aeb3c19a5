"""Raising a model's default-domain opset (QDQ weights need opset 21), without copying large weights."""
from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError

__all__ = ["QDQ_OPSET", "upgrade_opset"]

logger = logging.getLogger(__name__)

QDQ_OPSET = 21
_MIN_IR_VERSION = 10  # int4/uint4 tensors
_BIG_TENSOR = 1024  # initializers above this many bytes are kept out of the converter's copy


def upgrade_opset(model: ir.Model, target: int = QDQ_OPSET) -> bool:
    """Raise ``model``'s default-domain opset to ``target`` in place (ONNX version converter).

    The converter sees the graph with its large initializers turned into inputs (so a
    multi-GB model is not copied); they are reattached, unchanged, afterwards. The
    converted graph is checked with ``onnx.checker``. Returns whether anything changed.

    Raises:
        OnnxqError: the converter has no adapter for some op, or produced an invalid graph.
    """
    current = model.opset_imports.get("")
    model.ir_version = max(model.ir_version or 0, _MIN_IR_VERSION)
    if current is None:
        model.opset_imports[""] = target
        return True
    if current >= target:
        return False
    graph = model.graph
    original_inputs = list(graph.inputs)
    order = list(graph.initializers)
    big = {name: v for name, v in graph.initializers.items()
           if v.const_value is not None and v.const_value.nbytes > _BIG_TENSOR}
    tensors = {name: v.const_value for name, v in big.items()}
    try:
        for name, value in big.items():
            value.shape = value.shape or ir.Shape(tensors[name].shape)
            value.type = value.type or ir.TensorType(tensors[name].dtype)
            del graph.initializers[name]
            value.const_value = None
            if not value.is_graph_input():
                graph.inputs.append(value)
        proto = ir.serde.serialize_model(model)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(original_inputs)
        for name, value in big.items():
            value.const_value = tensors[name]
            graph.register_initializer(value)
        restored = {name: graph.initializers[name] for name in order}
        graph.initializers.clear()
        for value in restored.values():
            graph.register_initializer(value)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises RuntimeError / ValidationError with its reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxqError(f"cannot upgrade the model from opset {current} to {target} for QDQ: {reason}") from None
    new_graph = ir.serde.deserialize_model(converted).graph
    was_input = {v.name for v in original_inputs}
    for value in list(new_graph.inputs):
        if value.name in tensors:
            if value.name not in was_input:
                new_graph.inputs.remove(value)
            value.const_value = tensors[value.name]
            new_graph.register_initializer(value)
    new_order = [n for n in order if n in new_graph.initializers]
    new_order += [n for n in new_graph.initializers if n not in order]
    values = {n: new_graph.initializers[n] for n in new_order}
    new_graph.initializers.clear()
    for value in values.values():
        new_graph.register_initializer(value)
    model.graph = new_graph
    logger.info("upgraded the default opset from %d to %d", current, target)
    return True
