"""Undo weight quantization: every quantized op back to float MatMul / Gather on its dequantized weight.

* MatMulNBits -> ``MatMul(A, W)`` (+ ``Add`` of its bias input);
* MatMulBnb4, MatMulFpQ4 -> ``MatMul(A, W)``;
* GatherBlockQuantized -> ``Gather(table, indices)``;
* a DequantizeLinear whose inputs are all constants -> a float initializer.

``W`` holds exactly the values the quantized op computes with (dequantized in float32,
then stored in the op's activation dtype). A packed weight shared by several nodes
becomes one float initializer; a tied embedding (GatherBlockQuantized reading the same
packed B as a MatMulNBits) becomes one table ``[V, D]`` read by the Gather and, through
a Transpose, by the MatMul. Useful to measure quantization error with any runtime, or
to re-quantize with other settings.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.formats import MS_DOMAIN, format_of_node
from onnxq.formats.base import int_attributes
from onnxq.formats.qdq import dequantize_linear_constant, is_constant_dequantize
from onnxq.graph.constants import constant_value
from onnxq.graph.edit import home_graph, remove_unused
from onnxq.graph.names import initializer_names, unique_name

__all__ = ["unpack_model", "UnpackPass", "QUANTIZED_OPS", "packed_source", "packed_weight_key"]

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMulNBits", "MatMulBnb4", "MatMulFpQ4", "GatherBlockQuantized")


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _float_value(array: np.ndarray, dtype: ir.DataType, name: str, taken: set[str]) -> ir.Value:
    return constant_value(array.astype(dtype.numpy()), unique_name(taken, name), dtype)


def packed_source(value: ir.Value) -> ir.Value:
    """The packed initializer behind ``value`` (through the Reshape a shared GatherBlockQuantized reads it by)."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape" and producer.domain == "":
        return producer.inputs[0]
    return value


def _nbits_key(b: ir.Value, scales: ir.Value, zp: ir.Value | None, bits: int, block_size: int) -> tuple:
    return (id(packed_source(b)), id(scales), id(zp), bits, block_size)


def packed_weight_key(node: ir.Node) -> tuple | None:
    """Nodes with equal keys read the same packed weight (MatMulNBits and GatherBlockQuantized share keys)."""
    if node.domain != MS_DOMAIN or node.op_type not in QUANTIZED_OPS:
        return None
    if node.op_type in ("MatMulBnb4", "MatMulFpQ4"):
        return (node.op_type, *(id(v) for v in node.inputs[1:]))
    attrs = int_attributes(node)
    data = node.inputs[0] if node.op_type == "GatherBlockQuantized" else node.inputs[1]
    scales = node.inputs[2]
    zp = _input(node, 3)
    return _nbits_key(data, scales, zp, attrs.get("bits", 4), attrs.get("block_size", 128))


class UnpackPass(ir.passes.InPlacePass):
    """Replace quantized ops and constant DequantizeLinear nodes by float equivalents (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = list(model.graph.all_nodes())
        taken = initializer_names(model)
        names = {n.name for n in nodes if n.name}
        keys = {id(n): packed_weight_key(n) for n in nodes}
        gathered = {keys[id(n)] for n in nodes if n.op_type == "GatherBlockQuantized" and n.domain == MS_DOMAIN}
        self._tables: dict[tuple, ir.Value] = {}  # tied packed weights -> float table [N, K]
        self._weights: dict[tuple, ir.Value] = {}  # other packed weights -> float W [K, N]
        for node in nodes:
            if node.domain == "" and node.op_type == "DequantizeLinear" and is_constant_dequantize(node):
                self._dequantize(node, taken)
            elif node.domain == MS_DOMAIN and node.op_type in QUANTIZED_OPS:
                key = keys[id(node)]
                if node.op_type == "GatherBlockQuantized":
                    self._gather(node, key, nodes, keys, taken, names)
                else:
                    self._matmul(node, key, key in gathered, taken, names)
            else:
                continue
            self.counts[node.op_type] = self.counts.get(node.op_type, 0) + 1
        if not self.counts:
            return ir.passes.PassResult(model, False)
        remove_unused(model)
        if not any(n.domain == MS_DOMAIN for n in model.graph.all_nodes()):
            model.opset_imports.pop(MS_DOMAIN, None)
        logger.info("unpacked %s", ", ".join(f"{c} {op}" for op, c in sorted(self.counts.items())))
        return ir.passes.PassResult(model, True)

    def _dequantize(self, node: ir.Node, taken: set[str]) -> None:
        scale = node.inputs[1]
        dtype = scale.const_value.dtype if scale.const_value is not None else scale.dtype
        out = node.outputs[0]
        value = _float_value(dequantize_linear_constant(node), dtype, out.name or f"{node.name}_float", taken)
        home_graph(node.inputs[0], node).register_initializer(value)
        ir.convenience.replace_all_uses_with(out, value)
        if out.is_graph_output():
            graph = node.graph
            graph.outputs[graph.outputs.index(out)] = value
        node.graph.remove(node, safe=True)

    def _matmul_weight(self, node: ir.Node, key: tuple, tied: bool, taken: set[str]) -> tuple[ir.Value, bool]:
        """``(float value, is_table)``: W [K, N], or the shared table [N, K] for a tied weight."""
        cache = self._tables if tied else self._weights
        if key in cache:
            return cache[key], tied
        w = format_of_node(node).read(node).dequantize()
        # MatMulNBits / MatMulBnb4 store scales in the activation dtype; MatMulFpQ4 is float32 only
        dtype = ir.DataType.FLOAT if node.op_type == "MatMulFpQ4" else node.inputs[2].const_value.dtype
        source = packed_source(node.inputs[1])
        base_name = (source.name or node.name) + "_float"
        value = _float_value(w.T if tied else w, dtype, base_name, taken)
        home_graph(source, node).register_initializer(value)
        cache[key] = value
        return value, tied

    def _matmul(self, node: ir.Node, key: tuple, tied: bool, taken: set[str], names: set[str]) -> None:
        weight, is_table = self._matmul_weight(node, key, tied, taken)
        new_nodes = []
        if is_table:
            transpose = ir.node("Transpose", [weight], attributes={"perm": [1, 0]},
                                name=unique_name(names, f"{node.name}_weight_transpose"))
            new_nodes.append(transpose)
            weight = transpose.outputs[0]
        matmul = ir.node("MatMul", [node.inputs[0], weight], name=unique_name(names, f"{node.name}_float"))
        new_nodes.append(matmul)
        result = matmul.outputs[0]
        bias = _input(node, 5) if node.op_type == "MatMulNBits" else None
        if bias is not None:
            add = ir.node("Add", [result, bias], name=unique_name(names, f"{node.name}_bias"))
            new_nodes.append(add)
            result = add.outputs[0]
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], new_nodes, [node.outputs[0]], [result])

    def _gather(self, node: ir.Node, key: tuple, nodes: list[ir.Node], keys: dict, taken: set[str],
                names: set[str]) -> None:
        if key not in self._tables:
            partner = next((n for n in nodes if n.op_type == "MatMulNBits" and keys[id(n)] == key), None)
            if partner is not None:  # tied: the table is the MatMul weight, transposed (true K, no padding)
                self._matmul_weight(partner, key, True, taken)
            else:
                table = format_of_node(node).read(node).dequantize().T  # [V, Kpad or D]
                source = packed_source(node.inputs[0])
                value = _float_value(table, node.inputs[2].const_value.dtype, (source.name or node.name) + "_float",
                                     taken)
                home_graph(source, node).register_initializer(value)
                self._tables[key] = value
        gather = ir.node("Gather", [self._tables[key], node.inputs[1]], attributes={"axis": 0},
                         name=unique_name(names, f"{node.name}_float"))
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [gather], [node.outputs[0]],
                                                [gather.outputs[0]])


def unpack_model(model: ir.Model) -> ir.Model:
    """Dequantize every quantized op of ``model`` back to float (in place); returns ``model``.

    Raises:
        OnnxqError: nothing to unpack, or a quantized op onnxq cannot read.
    """
    unpack_pass = UnpackPass()
    if not unpack_pass(model).modified:
        raise OnnxqError("nothing to unpack: no MatMulNBits, MatMulBnb4, MatMulFpQ4, GatherBlockQuantized "
                         "or constant DequantizeLinear node found")
    return model
