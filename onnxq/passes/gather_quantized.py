"""Quantize embedding tables: ``Gather(table, ids)`` -> com.microsoft GatherBlockQuantized.

A Gather site is ``Gather(E, ids)`` with ``E: [V, D]`` a constant float table and
``axis=0``. Its weight is ``W = E^T: [K = D, N = V]`` (blocks run along D), which is
exactly what a tied lm_head (``h @ Transpose(E)``) quantizes. Run this pass after
:class:`~onnxq.passes.matmul_nbits.MatMulToNBitsPass` and give it that pass's
``quantized_weights``: a table that the lm_head already quantized with the same
settings is not quantized again, GatherBlockQuantized reads MatMulNBits' packed B
(through a Reshape), scales and zero points, so the model stores one copy.
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.errors import OnnxqError
from onnxq.formats.gather_block_quantized import (
    GBQ_DTYPES,
    GatherBlockQuantizedInitializers,
    gather_initializers_from_nbits,
    make_gather_block_quantized_initializers,
    make_gather_block_quantized_nodes,
)
from onnxq.formats.matmul_nbits import MS_DOMAIN, MatMulNBitsInitializers
from onnxq.passes.bnb4 import finite_weight, initializer_names, register_values
from onnxq.passes.matmul_nbits import (
    QuantizedNodeRecord,
    WeightQuantizer,
    _remove_unused,
    _unique_name,
    rtn_weight_quantizer,
)
from onnxq.graph.sites import FLOAT_TYPES, SkippedNode, WeightSite, _constant, node_display_name

__all__ = ["find_gather_sites", "GatherToBlockQuantizedPass", "quantize_embeddings"]

logger = logging.getLogger(__name__)


def find_gather_sites(model: ir.Model) -> tuple[list[WeightSite], list[SkippedNode]]:
    """``Gather(E, ids, axis=0)`` nodes with a constant 2-D float ``E`` (subgraphs included).

    Each is returned as a :class:`WeightSite` of kind ``"Gather"`` with ``W = E^T``
    (``transpose=True``, ``k = D``, ``n = V``, ``activation`` = the indices), so sites
    sharing ``E`` with a tied lm_head have the same ``weight_key``.
    """
    sites: list[WeightSite] = []
    skipped: list[SkippedNode] = []
    for index, node in enumerate(model.graph.all_nodes()):
        if node.op_type != "Gather" or node.domain != "":
            continue
        name = node_display_name(node, index)
        found = _constant(node.inputs[0])
        if found is None:
            continue  # a Gather on activations (shapes, indices...), not an embedding
        source, tensor = found
        axis = node.attributes["axis"].as_int() if node.attributes.get("axis") is not None else 0
        if len(tensor.shape) != 2:
            skipped.append(SkippedNode(name, "Gather", f"table has shape {tuple(tensor.shape)}; need [V, D]"))
        elif axis not in (0, -2):
            skipped.append(SkippedNode(name, "Gather", f"gathers along axis {axis}; need 0"))
        elif tensor.dtype not in FLOAT_TYPES:
            continue  # integer lookup tables are not weights
        else:
            v, d = tensor.shape
            sites.append(WeightSite(node, name, "Gather", node.inputs[1], source, tensor, True, 1.0, None, 1.0,
                                    d, v, tensor.dtype, 0))
    return sites, skipped


class GatherToBlockQuantizedPass(ir.passes.InPlacePass):
    """Replace ``Gather`` on constant float tables with GatherBlockQuantized (uint8 data, 2/4/8 bits).

    Args:
        config: bits / block_size / symmetric / node selection; ``block_size=-1`` uses
            one block of the next power of two >= D.
        weight_quantizer: how a ``[K, N]`` weight becomes a QuantizedWeight (default RTN).
        shared: ``MatMulToNBitsPass.quantized_weights``: initializers to reuse for tied tables.
    """

    def __init__(
        self,
        config: QuantConfig | None = None,
        weight_quantizer: WeightQuantizer = rtn_weight_quantizer,
        shared: Mapping[tuple, tuple[ir.Value, MatMulNBitsInitializers]] | None = None,
    ) -> None:
        super().__init__()
        self.config = config or QuantConfig()
        self.weight_quantizer = weight_quantizer
        self.shared = shared or {}
        self.records: list[QuantizedNodeRecord] = []
        self.skipped: list[SkippedNode] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites, self.skipped = find_gather_sites(model)
        taken = initializer_names(model)
        cache: dict[tuple, tuple[GatherBlockQuantizedInitializers, str, float]] = {}
        for site in sites:
            settings = self.config.settings_for(site.name)
            if settings is None:
                self.skipped.append(SkippedNode(site.name, "Gather", self.config.skip_reason(site.name)))
                continue
            if site.dtype not in GBQ_DTYPES:
                self.skipped.append(SkippedNode(site.name, "Gather", f"GatherBlockQuantized on CPU needs a "
                                                f"float32/float16 table, got {site.dtype.name}"))
                continue
            key = (site.weight_key, settings)
            if key not in cache:
                cache[key] = self._quantize(site, settings, key, taken)
            inits, first, err = cache[key]
            graph = site.node.graph

            def constant(array: np.ndarray, name: str, graph: ir.Graph = graph) -> ir.Value:
                name = _unique_name(taken, name)
                value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.INT64),
                                 const_value=ir.tensor(array, name=name))
                graph.register_initializer(value)
                return value

            nodes, out = make_gather_block_quantized_nodes(
                inits, site.node.inputs[1], name=f"{site.name}_Q{settings.bits}", constant=constant
            )
            ir.convenience.replace_nodes_and_values(graph, site.node, [site.node], nodes, [site.node.outputs[0]], [out])
            self.records.append(QuantizedNodeRecord(
                site.name, "Gather", site.k, site.n, settings.bits, inits.block_size, settings.symmetric, 0,
                site.k * site.n * site.dtype.itemsize, inits.nbytes, err, None if first == site.name else first,
            ))
        if not self.records:
            return ir.passes.PassResult(model, False)
        _remove_unused(model)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        logger.info("GatherBlockQuantized: quantized %d Gather nodes (%d unique tables, %d shared with MatMulNBits), "
                    "skipped %d", len(self.records), len(cache),
                    sum(first.startswith("MatMulNBits ") for _, first, _ in cache.values()), len(self.skipped))
        return ir.passes.PassResult(model, True)

    def _quantize(self, site: WeightSite, settings, key: tuple, taken: set[str]):
        entry = self.shared.get(key)
        if entry is not None and entry[0] is site.source:
            inits = gather_initializers_from_nbits(entry[1])
            weight = finite_weight(site)
            err = float(np.linalg.norm(inits.qweight().dequantize() - weight) / max(np.linalg.norm(weight), 1e-30))
            return inits, f"MatMulNBits {entry[1].b.name}", err
        if settings.bits not in (2, 4, 8):
            raise OnnxqError(f"GatherBlockQuantized holds 2, 4 or 8 bits; node {site.name!r} asks for {settings.bits}")
        weight = finite_weight(site)
        qweight, err = self.weight_quantizer(site, weight, settings, site.dtype.numpy())
        inits = make_gather_block_quantized_initializers(qweight, site.dtype, site.source.name or site.name)
        register_values(site, inits.values(), taken)
        return inits, site.name, err


def quantize_embeddings(
    model: ir.Model,
    config: QuantConfig | None = None,
    shared: Mapping[tuple, tuple[ir.Value, MatMulNBitsInitializers]] | None = None,
    weight_quantizer: WeightQuantizer = rtn_weight_quantizer,
) -> list[QuantizedNodeRecord]:
    """Run :class:`GatherToBlockQuantizedPass` on ``model`` in place; returns its per-node records."""
    quant_pass = GatherToBlockQuantizedPass(config, weight_quantizer, shared)
    quant_pass(model)
    return quant_pass.records
