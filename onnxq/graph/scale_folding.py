"""Dividing a MatMul input by per-channel scales without changing the float model.

AWQ (arXiv 2306.00978) and SmoothQuant (arXiv 2211.10438) multiply weight rows by
``s`` and divide the layers' input ``x: [..., K]`` by ``s``. :func:`fold_input_scale`
does the division where it costs nothing at run time, by rescaling the constants of
the op that produces ``x``:

* ``LayerNormalization`` / ``SimplifiedLayerNormalization`` / ``RMSNormalization``
  (any domain), ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``
  (their output 0): gamma (and beta) divided by ``s``;
* ``Mul(a, c)`` with ``c`` constant: ``c / s``;
* ``Add(a, c)`` with ``c`` constant, when ``a`` can itself be rescaled (the decomposed
  LayerNorm ``... * gamma + beta`` of a torch export): ``c / s`` and ``a`` recursively;
* a float ``MatMul(a, W)`` with constant ``W: [K', K]``: columns of ``W`` divided by ``s``.

This is only valid when every reader of ``x`` (and of every intermediate rescaled
on the way) is one of the given consumers (or reads only its shape: ``Shape``, ``Size``), and
when the producer's constant is not a weight about to be quantized from its current value
(``frozen``); otherwise, or when the producer is none of
the above, a ``Mul(x, 1/s)`` node is inserted in front of the consumers only.
Constants are never changed in place: rescaled copies become new initializers.
"""
from __future__ import annotations

import logging
from typing import Collection, Sequence

import numpy as np
import onnx_ir as ir

from onnxq.graph.constants import add_initializer, constant_tensor
from onnxq.graph.edit import only_used_by
from onnxq.graph.names import unique_name

__all__ = ["fold_input_scale", "is_norm_output", "NORM_GAMMA_INPUTS"]

logger = logging.getLogger(__name__)

NORM_GAMMA_INPUTS = {
    # op type -> (gamma input index, beta input index or None)
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1, None),
    "RMSNormalization": (1, None),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2, None),
}


def is_norm_output(value: ir.Value) -> bool:
    """Whether ``value: [..., K]`` is a normalization's output: output 0 of a :data:`NORM_GAMMA_INPUTS`
    op, or a decomposed norm's end as a torch export writes it: ``Mul(a, gamma)`` with a constant
    per-channel ``gamma``, possibly followed by ``Add(., beta)`` with a constant ``beta``."""
    node = value.producer()
    if node is None:
        return False
    if node.op_type in NORM_GAMMA_INPUTS:
        return node.outputs[0] is value
    if node.op_type not in ("Mul", "Add") or node.domain != "" or len(node.inputs) != 2:
        return False
    k = value.shape[-1] if value.shape is not None and len(value.shape) else None
    for index in (0, 1):
        constant, other = node.inputs[index], node.inputs[1 - index]
        tensor = constant_tensor(constant)
        if tensor is None or other is None or constant_tensor(other) is not None:
            continue
        shape = tuple(tensor.shape.numpy())
        if not shape or any(d != 1 for d in shape[:-1]) or (isinstance(k, int) and shape[-1] != k) \
                or shape[-1] < 2:  # a per-channel vector, not a scalar factor
            continue
        return node.op_type == "Mul" or is_norm_output(other)
    return False


def _new_constant(graph: ir.Graph, like: ir.Value, array: np.ndarray, suffix: str) -> ir.Value:
    """A rescaled copy of the constant ``like``, in its dtype, as a new initializer."""
    dtype = constant_tensor(like).dtype
    return add_initializer(graph, array.astype(dtype.numpy()), f"{like.name or 'const'}_{suffix}",
                           set(graph.initializers), dtype)


def _scaled_vector(value: ir.Value | None, inv: np.ndarray) -> np.ndarray | None:
    """``value`` (a constant broadcastable to ``[K]`` on the last axis) times ``inv``, or None."""
    tensor = constant_tensor(value)
    if tensor is None:
        return None
    array = np.asarray(tensor.numpy(), dtype=np.float32)
    k = inv.shape[0]
    if array.ndim == 0 or array.shape[-1] not in (1, k) or any(d != 1 for d in array.shape[:-1]):
        return None
    return np.broadcast_to(array, (*array.shape[:-1], k)) * inv


def _plan(value: ir.Value, consumers: set[int], inv: np.ndarray, graph: ir.Graph, editable,
          frozen: set[int]) -> list | None:
    """Edits ``[(node, input index, new array, label)]`` that divide ``value`` by ``s``, or None."""
    node = value.producer()
    if node is None or node.graph is not graph or not only_used_by(value, consumers):
        return None
    if (editable is not None and id(node) not in editable) or id(node) in frozen:
        return None
    op = node.op_type
    if op in NORM_GAMMA_INPUTS and node.outputs[0] is value:
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() not in (-1, len(value.shape or ()) - 1):
            return None
        gamma_at, beta_at = NORM_GAMMA_INPUTS[op]
        edits = []
        for index in (gamma_at, beta_at):
            if index is None or index >= len(node.inputs) or node.inputs[index] is None:
                continue
            scaled = _scaled_vector(node.inputs[index], inv)
            if scaled is None:
                return None
            edits.append((node, index, scaled, f"{op} '{node.name}'"))
        return edits or None
    if op == "Mul" and node.domain == "":
        for index in (0, 1):
            scaled = _scaled_vector(node.inputs[index], inv)
            if scaled is not None:
                return [(node, index, scaled, f"Mul '{node.name}'")]
        return None
    if op == "Add" and node.domain == "":
        for index in (0, 1):
            scaled = _scaled_vector(node.inputs[index], inv)
            if scaled is None:
                continue
            inner = _plan(node.inputs[1 - index], {id(node)}, inv, graph, editable, frozen)
            if inner is not None:
                return [(node, index, scaled, f"Add '{node.name}'"), *inner]
        return None
    if op == "MatMul" and node.domain == "":
        tensor = constant_tensor(node.inputs[1])
        if tensor is not None and len(tensor.shape) == 2 and tensor.shape[1] == inv.shape[0]:
            scaled = np.asarray(tensor.numpy(), dtype=np.float32) * inv[None, :]
            return [(node, 1, scaled, f"MatMul '{node.name}'")]
    return None


def fold_input_scale(
    graph: ir.Graph,
    activation: ir.Value,
    consumers: Sequence[ir.Node],
    scales: np.ndarray,
    editable: Collection[ir.Node] | None = None,
    dtype: ir.DataType | None = None,
    frozen: Collection[ir.Node] = (),
) -> str:
    """Make ``consumers`` (nodes of ``graph``) see ``activation / scales`` (``scales: [K]``, last axis).

    ``editable``: when given, only these nodes' constants may be rescaled (e.g. the
    nodes of the block being calibrated, so cached outputs of earlier blocks stay valid).
    ``frozen``: nodes whose constants must not be rescaled: weight sites whose weights are being
    (or will be) quantized from their current values, so a fold into them would be lost.
    ``dtype``: the activation's dtype when its value carries no type (exports without value_info);
    an inserted ``Mul`` holds ``1/scales`` in it.
    Returns a short description of where the division went (for logs and reports).
    """
    inv = (1.0 / np.asarray(scales, dtype=np.float64)).astype(np.float32)
    consumer_ids = {id(n) for n in consumers}
    editable_ids = None if editable is None else {id(n) for n in editable}
    edits = _plan(activation, consumer_ids, inv, graph, editable_ids, {id(n) for n in frozen})
    if edits is not None:
        for node, index, array, _ in edits:
            node.replace_input_with(index, _new_constant(graph, node.inputs[index], array, "awq"))
        return "folded into " + ", ".join(dict.fromkeys(label for *_, label in edits))
    if activation.type is not None:
        dtype = activation.type.dtype
    dtype = dtype or ir.DataType.FLOAT
    inv_value = add_initializer(graph, inv.astype(dtype.numpy()), f"{activation.name}_inv_scale",
                                set(graph.initializers), dtype)
    values = {v.name for v in graph.inputs} | {v.name for node in graph.all_nodes() for v in node.outputs}
    nodes = {node.name for node in graph.all_nodes() if node.name}
    mul = ir.node("Mul", [activation, inv_value], name=unique_name(nodes, f"{activation.name}_scale"))
    mul.outputs[0].name = unique_name(values, f"{activation.name}_scaled")
    mul.outputs[0].type, mul.outputs[0].shape = activation.type, activation.shape
    first = min(consumers, key=lambda n: list(graph).index(n))
    graph.insert_before(first, mul)
    for consumer in consumers:
        for index, value in enumerate(consumer.inputs):
            if value is activation:
                consumer.replace_input_with(index, mul.outputs[0])
    return f"Mul node '{mul.name}' inserted"
