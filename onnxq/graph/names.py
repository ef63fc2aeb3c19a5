"""Unique names for the values and nodes a rewrite adds."""
from __future__ import annotations

import onnx_ir as ir

__all__ = ["unique_name", "initializer_names", "node_names"]


def unique_name(taken: set[str], wanted: str) -> str:
    """``wanted``, or ``wanted_1``, ``wanted_2``, ... : the first not in ``taken`` (which is updated)."""
    name, i = wanted, 1
    while name in taken:
        name, i = f"{wanted}_{i}", i + 1
    taken.add(name)
    return name


def initializer_names(model: ir.Model) -> set[str]:
    """Names of all initializers (main graph and subgraphs): the names new values must avoid."""
    return {v.name for g in (model.graph, *model.graph.subgraphs()) for v in g.initializers.values()}


def node_names(model: ir.Model) -> set[str]:
    """Names of all named nodes (subgraphs included)."""
    return {node.name for node in model.graph.all_nodes() if node.name}
