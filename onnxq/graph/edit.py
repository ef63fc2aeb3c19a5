"""Editing a graph around weight sites: where new values go, replacing a site, removing what lost its users."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.graph.constants import add_initializer
from onnxq.graph.names import unique_name
from onnxq.graph.sites import WeightSite

__all__ = ["home_graph", "owner_graph", "register_values", "replace_site", "redirect_weight", "insert_at_source",
           "release", "remove_unused", "only_used_by"]

_SHAPE_READERS = ("Shape", "Size")
"""Readers of a value's shape only: new values of the same shape (rescaled, quantized) change nothing they see."""


def only_used_by(value: ir.Value, consumers: set[int]) -> bool:
    """Whether every reader of ``value`` is one of ``consumers`` (node ids), or reads only its shape;
    a graph output has a reader outside the graph."""
    if value.is_graph_output():
        return False
    return all(id(user) in consumers or (user.op_type in _SHAPE_READERS and user.domain == "")
               for user, _ in value.uses())


def home_graph(value: ir.Value, node: ir.Node) -> ir.Graph:
    """Where values derived from ``value`` (read by ``node``) go: the initializer's own graph, else the node's.

    Outer scopes are visible to subgraphs, so a weight of the main graph read inside an If
    body keeps its replacement in the main graph.
    """
    return value.graph if value.is_initializer() and value.graph is not None else node.graph


def owner_graph(site: WeightSite) -> ir.Graph:
    """The graph whose initializers hold the site's weight."""
    return home_graph(site.source, site.node)


def register_values(graph: ir.Graph, values: list[ir.Value], taken: set[str]) -> None:
    """Give ``values`` unique names (updating ``taken``) and register them as initializers of ``graph``."""
    for value in values:
        value.name = unique_name(taken, value.name)
        if value.const_value is not None:
            value.const_value.name = value.name
        graph.register_initializer(value)


def replace_site(site: WeightSite, nodes: list[ir.Node], result: ir.Value, taken: set[str], *,
                 add_bias: bool) -> None:
    """Replace ``site.node`` by ``nodes`` (computing ``result: [..., N]``), keeping the output's name.

    ``add_bias``: append ``Add(result, beta * C)`` for a Gemm bias the new nodes do not
    include. A MatMul whose B had leading size-1 axes beyond A's rank gets its Unsqueeze.
    """
    graph = site.node.graph
    nodes = list(nodes)
    if add_bias and site.bias is not None:
        bias_value = add_initializer(graph, site.bias_vector().astype(site.dtype.numpy()), f"{site.name}_bias", taken,
                                     site.dtype)
        nodes.append(ir.node("Add", [result, bias_value], name=f"{site.name}_bias_add"))
        result = nodes[-1].outputs[0]
    if site.output_rank_gap:
        axes = add_initializer(graph, np.arange(site.output_rank_gap, dtype=np.int64), f"{site.name}_unsqueeze_axes",
                               taken, ir.DataType.INT64)
        nodes.append(ir.node("Unsqueeze", [result, axes], name=f"{site.name}_unsqueeze"))
        result = nodes[-1].outputs[0]
    ir.convenience.replace_nodes_and_values(graph, site.node, [site.node], nodes, [site.node.outputs[0]], [result])


def insert_at_source(site_graph: ir.Graph, source: ir.Value, node: ir.Node) -> None:
    """Insert ``node`` where ``source`` is defined: first in its graph for an initializer, else after its producer."""
    producer = source.producer()
    if source.is_initializer() or producer is None:
        graph = source.graph or site_graph
        if len(graph):
            graph.insert_before(graph.node(0), node)
        else:
            graph.append(node)
    else:
        producer.graph.insert_after(producer, node)


def release(tensor: ir.TensorProtocol) -> None:
    """Unmap a memory-mapped external weight once it is quantized, so resident memory stays at one weight.

    The tensor maps its file again if it is read later (another site with other settings).
    """
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # someone still holds a view of the data: leave the mapping alone
            pass


def _unused(node: ir.Node) -> bool:
    return not any(out.uses() or out.is_graph_output() for out in node.outputs)


def remove_unused(model: ir.Model) -> None:
    """Drop the nodes that fed rewritten weights (Transpose, Constant, Reshape) once unused, then unused initializers."""
    for graph in (model.graph, *model.graph.subgraphs()):
        changed = True
        while changed:
            changed = False
            for node in reversed(list(graph)):
                if node.op_type in ("Transpose", "Constant", "Reshape") and node.domain == "" and _unused(node):
                    graph.remove(node, safe=True)
                    changed = True
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                if value.is_graph_input():
                    graph.inputs.remove(value)
                del graph.initializers[name]


def redirect_weight(site: WeightSite, weight: ir.Value) -> None:
    """Make the site read ``weight`` where it read its float constant (keeping the site's node).

    ``weight`` holds the constant in its stored orientation; a Gemm's ``alpha`` must already be
    folded into it (the Gemm gets ``alpha=1``).
    """
    if site.kind in ("Transpose+MatMul", "Transpose+Gather"):
        site.transpose_node.replace_input_with(0, weight)
    elif site.kind == "Gather":
        site.node.replace_input_with(0, weight)
    else:  # MatMul, Gemm
        site.node.replace_input_with(1, weight)
        if site.kind == "Gemm" and site.alpha != 1.0:
            site.node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
