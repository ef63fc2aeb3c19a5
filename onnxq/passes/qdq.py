"""Rewrite constant weights as standard QDQ: ``DequantizeLinear(q, scale, zero_point, axis, block_size)``.

Runtimes other than ORT read blocked DequantizeLinear (ONNX opset 21); ORT itself fuses
``DequantizeLinear(axis=0) -> MatMul`` into MatMulNBits at the extended optimization
level (with ``session.qdq_matmulnbits_accuracy_level``, default 4 = int8 activations).

For every weight site the constant ``B`` (in its stored orientation) is replaced by the
output of one DequantizeLinear; the MatMul / Gemm / Transpose nodes stay. ``W = B``
(MatMul, Gemm transB=0) is written ``q: [K, N], axis=0``; ``W = B^T`` (Gemm transB=1,
Transpose->MatMul, and embedding Gathers with ``quantize_embeddings``) is written
``q: [N, K], axis=1``, so a tied embedding and its lm_head read one DequantizeLinear.
A Gemm's ``alpha`` is folded into the scales (the Gemm gets ``alpha=1``). Each unique
(weight, orientation, alpha, settings) gets exactly one DequantizeLinear chain, so shared
weights stay shared and the model stays valid.

The model's default opset is raised to 21 first (:func:`upgrade_opset`).
"""
from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.errors import OnnxqError
from onnxq.formats.qdq import QDQInitializers, make_dequantize_node, make_qdq_initializers
from onnxq.passes.bnb4 import finite_weight, initializer_names, register_values
from onnxq.passes.gather_quantized import find_gather_sites
from onnxq.passes.matmul_nbits import (
    QuantizedNodeRecord,
    WeightQuantizer,
    _remove_unused,
    _unique_name,
    rtn_weight_quantizer,
)
from onnxq.graph.sites import SkippedNode, WeightSite, find_weight_sites

__all__ = ["QDQ_OPSET", "MatMulToQDQPass", "upgrade_opset", "insert_dequantize"]

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


def insert_dequantize(site_graph: ir.Graph, source: ir.Value, inits: QDQInitializers, name: str) -> ir.Value:
    """Add the DequantizeLinear of ``inits`` where ``source`` is defined; returns its output."""
    node = make_dequantize_node(inits, name=name)
    producer = source.producer()
    if source.is_initializer() or producer is None:
        graph = source.graph or site_graph
        if len(graph):
            graph.insert_before(graph.node(0), node)
        else:
            graph.append(node)
    else:
        producer.graph.insert_after(producer, node)
    return node.outputs[0]


def _rewire(site: WeightSite, dq_out: ir.Value) -> None:
    """Make the site read ``dq_out`` where it read the float constant."""
    if site.kind == "Transpose+MatMul":
        site.transpose_node.replace_input_with(0, dq_out)
    elif site.kind == "Gather":
        site.node.replace_input_with(0, dq_out)
    else:  # MatMul, Gemm
        site.node.replace_input_with(1, dq_out)
        if site.kind == "Gemm" and site.alpha != 1.0:
            site.node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)


class MatMulToQDQPass(ir.passes.InPlacePass):
    """Replace constant MatMul/Gemm (and, on request, Gather) weights by blocked DequantizeLinear.

    Args:
        config: bits (2..8; 2-4 stored as int4/uint4, 5-8 as int8/uint8), block_size,
            symmetric (signed codes, no zero point) or asymmetric (unsigned + zero point),
            node selection and overrides.
        weight_quantizer: ``(site, W [K, N], settings, scale_dtype) -> (QuantizedWeight, error)``.
        quantize_embeddings: also rewrite ``Gather`` on constant float tables.
    """

    def __init__(self, config: QuantConfig | None = None, weight_quantizer: WeightQuantizer = rtn_weight_quantizer,
                 quantize_embeddings: bool = False) -> None:
        super().__init__()
        self.config = config or QuantConfig()
        self.weight_quantizer = weight_quantizer
        self.quantize_embeddings = quantize_embeddings
        self.records: list[QuantizedNodeRecord] = []
        self.skipped: list[SkippedNode] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        upgraded = upgrade_opset(model)
        sites, self.skipped = find_weight_sites(model)
        if self.quantize_embeddings:
            gathers, skipped = find_gather_sites(model)
            sites += gathers
            self.skipped += skipped
        taken = initializer_names(model)
        node_names = {node.name for node in model.graph.all_nodes() if node.name}
        chains: dict[tuple, tuple[ir.Value, QDQInitializers, str, float]] = {}
        for site in sites:
            settings = self.config.settings_for(site.name)
            if settings is None:
                self.skipped.append(SkippedNode(site.name, site.node.op_type, self.config.skip_reason(site.name)))
                continue
            key = (site.weight_key, settings)
            if key not in chains:
                weight = finite_weight(site)
                qweight, err = self.weight_quantizer(site, weight, settings, site.dtype.numpy())
                del weight
                lead = len(site.tensor.shape) - 2
                inits = make_qdq_initializers(qweight, site.dtype, site.source.name or site.name,
                                              transposed=site.transpose, leading_ones=lead)
                register_values(site, inits.values(), taken)
                dq_name = _unique_name(node_names, f"{site.source.name or site.name}_dq")
                dq_out = insert_dequantize(site.node.graph, site.source, inits, dq_name)
                chains[key] = (dq_out, inits, site.name, err)
            dq_out, inits, first, err = chains[key]
            _rewire(site, dq_out)
            self.records.append(QuantizedNodeRecord(
                site.name, site.kind, site.k, site.n, settings.bits, inits.block_size, settings.symmetric, 0,
                site.k * site.n * site.dtype.itemsize, inits.nbytes, err, None if first == site.name else first,
            ))
        if not self.records:
            return ir.passes.PassResult(model, upgraded)
        _remove_unused(model)
        logger.info("QDQ: quantized %d nodes (%d DequantizeLinear chains), skipped %d",
                    len(self.records), len(chains), len(self.skipped))
        return ir.passes.PassResult(model, True)
