"""Constant values: reading a constant behind a value, and making new ones (``ir.val`` / ``ir.tensor``)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.graph.names import unique_name

__all__ = ["constant_value", "add_initializer", "constant_source", "constant_tensor", "constant_array"]


def constant_value(array: np.ndarray, name: str, dtype: ir.DataType | None = None) -> ir.Value:
    """A constant ``ir.Value`` named ``name`` holding ``array`` (stored as ``dtype`` when given)."""
    return ir.val(name, const_value=ir.tensor(array, dtype=dtype, name=name))


def add_initializer(graph: ir.Graph, array: np.ndarray, name: str, taken: set[str],
                    dtype: ir.DataType | None = None) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` under a unique form of ``name``."""
    value = constant_value(array, unique_name(taken, name), dtype)
    graph.register_initializer(value)
    return value


def constant_source(value: ir.Value | None) -> tuple[ir.Value, ir.TensorProtocol] | None:
    """``(value, tensor)`` if ``value`` is an initializer or a Constant node's output, else None.

    Initializers that are also listed as graph inputs (old exporters do this) count
    as constants; a rewrite removes them from the inputs once unused.
    """
    if value is None:
        return None
    if value.is_initializer() and value.const_value is not None:
        return value, value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return value, attr.as_tensor()
    return None


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The data of ``value`` when it is an initializer or a Constant node's output, else None."""
    found = constant_source(value)
    return None if found is None else found[1]


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """``constant_tensor(value)`` as a numpy array, or None."""
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()
