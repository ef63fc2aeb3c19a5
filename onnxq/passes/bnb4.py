"""Rewrite weight sites into com.microsoft MatMulBnb4 (NF4 / FP4, QLoRA arXiv 2305.14314).

Sites are those of :func:`~onnxq.graph.sites.find_weight_sites` (MatMul, Gemm,
Transpose->MatMul). MatMulBnb4 has no bias input, so a Gemm's ``beta * C`` becomes
an ``Add`` after it. Each unique weight is quantized once and its initializers are
shared by every site that uses it. Also home of the small helpers that replace one
site by a single-output quantized op (used by the MatMulFpQ4 pass too).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.core.nf4 import quant_type_of, quantize_weight_bnb4
from onnxq.errors import OnnxqError
from onnxq.formats.bnb4 import (
    BNB4_DTYPES,
    Bnb4Initializers,
    check_bnb4_block_size,
    make_bnb4_initializers,
    make_matmul_bnb4_node,
)
from onnxq.formats.matmul_nbits import MS_DOMAIN
from onnxq.passes.matmul_nbits import QuantizedNodeRecord, _owner_graph, _remove_unused, _unique_name
from onnxq.graph.sites import SkippedNode, WeightSite, constant_tensor, find_weight_sites, finite_weight

__all__ = ["MatMulToBnb4Pass", "initializer_names", "replace_site_with_node", "finite_weight"]

logger = logging.getLogger(__name__)


def initializer_names(model: ir.Model) -> set[str]:
    """Names of all initializers (main graph and subgraphs): the names new values must avoid."""
    return {v.name for g in (model.graph, *model.graph.subgraphs()) for v in g.initializers.values()}


def register_values(site: WeightSite, values: list[ir.Value], taken: set[str]) -> None:
    """Give ``values`` unique names and register them beside the site's weight."""
    graph = _owner_graph(site)
    for value in values:
        value.name = _unique_name(taken, value.name)
        graph.register_initializer(value)


def _constant_value(graph: ir.Graph, array: np.ndarray, name: str, taken: set[str], dtype: ir.DataType) -> ir.Value:
    name = _unique_name(taken, name)
    tensor = ir.tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def replace_site_with_node(site: WeightSite, node: ir.Node, taken: set[str], *, add_bias: bool = True) -> None:
    """Replace ``site.node`` by ``node`` (``activation -> [..., N]``), then ``+ beta*C`` and Unsqueeze as needed.

    ``add_bias=False`` when ``node`` already includes the Gemm bias. The site's output
    value name is kept.
    """
    graph = site.node.graph
    new_nodes = [node]
    result = node.outputs[0]
    if add_bias and site.bias is not None:
        bias = np.asarray(constant_tensor(site.bias).numpy(), dtype=np.float32).reshape(-1) * np.float32(site.beta)
        bias_value = _constant_value(graph, bias.astype(site.dtype.numpy()), f"{site.name}_bias", taken, site.dtype)
        add = ir.node("Add", [result, bias_value], name=f"{site.name}_bias_add")
        new_nodes.append(add)
        result = add.outputs[0]
    if site.output_rank_gap:
        axes = _constant_value(graph, np.arange(site.output_rank_gap, dtype=np.int64),
                               f"{site.name}_unsqueeze_axes", taken, ir.DataType.INT64)
        unsqueeze = ir.node("Unsqueeze", [result, axes], name=f"{site.name}_unsqueeze")
        new_nodes.append(unsqueeze)
        result = unsqueeze.outputs[0]
    ir.convenience.replace_nodes_and_values(graph, site.node, [site.node], new_nodes, [site.node.outputs[0]], [result])


class MatMulToBnb4Pass(ir.passes.InPlacePass):
    """Replace MatMul / Gemm / Transpose->MatMul on constant weights with MatMulBnb4.

    Args:
        config: node selection (include / exclude / overrides with ``skip``) and the
            per-node ``block_size`` (a power of two >= 16); ``bits`` must be 4.
        quant_type: ``"nf4"`` (1) or ``"fp4"`` (0).
        block_size: overrides the config's block size for every node when given.
    """

    def __init__(self, config: QuantConfig | None = None, quant_type: str | int = "nf4",
                 block_size: int | None = None) -> None:
        super().__init__()
        self.config = config or QuantConfig()
        self.quant_type = quant_type_of(quant_type)
        if block_size is not None:
            check_bnb4_block_size(block_size)
        self.block_size = block_size
        self.records: list[QuantizedNodeRecord] = []
        self.skipped: list[SkippedNode] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites, self.skipped = find_weight_sites(model)
        taken = initializer_names(model)
        cache: dict[tuple, tuple[Bnb4Initializers, str, float]] = {}
        for site in sites:
            settings = self.config.settings_for(site.name)
            if settings is None:
                self.skipped.append(SkippedNode(site.name, site.node.op_type, self.config.skip_reason(site.name)))
                continue
            if site.dtype not in BNB4_DTYPES:
                self.skipped.append(SkippedNode(site.name, site.node.op_type,
                                                f"MatMulBnb4 needs float32/float16 weights, got {site.dtype.name}"))
                continue
            if settings.bits != 4:
                raise OnnxqError(f"MatMulBnb4 stores 4-bit codes; node {site.name!r} asks for bits={settings.bits}")
            block_size = self.block_size if self.block_size is not None else settings.block_size
            check_bnb4_block_size(block_size)
            key = (site.weight_key, block_size)
            if key not in cache:
                weight = finite_weight(site)
                bnb = quantize_weight_bnb4(weight, self.quant_type, block_size, site.dtype.numpy())
                inits = make_bnb4_initializers(bnb, site.dtype, site.source.name or site.name)
                register_values(site, inits.values(), taken)
                err = float(np.linalg.norm(bnb.dequantize() - weight) / max(np.linalg.norm(weight), 1e-30))
                cache[key] = (inits, site.name, err)
            inits, first, err = cache[key]
            # the site's current input: an earlier rewrite may have replaced the node that produced site.activation
            node = make_matmul_bnb4_node(site.node.inputs[0], inits, name=f"{site.name}_Bnb4")
            replace_site_with_node(site, node, taken)
            self.records.append(QuantizedNodeRecord(
                site.name, site.kind, site.k, site.n, 4, block_size, True, 0,
                site.k * site.n * site.dtype.itemsize, inits.nbytes, err, None if first == site.name else first,
            ))
        if not self.records:
            return ir.passes.PassResult(model, False)
        _remove_unused(model)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        logger.info("MatMulBnb4 (%s): quantized %d nodes (%d unique weights), skipped %d",
                    "NF4" if self.quant_type == 1 else "FP4", len(self.records), len(cache), len(self.skipped))
        return ir.passes.PassResult(model, True)
