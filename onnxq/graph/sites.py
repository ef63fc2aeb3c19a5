"""Finding the MatMul-like nodes whose weight is a constant ("weight sites").

A site is ``Y = A @ W (+ bias)`` with ``W: [K, N]`` derived from a constant:

* ``MatMul(A, B)`` with B a constant ``[K, N]`` (or ``[1, .., 1, K, N]``);
* ``Gemm(A, B, C)`` with ``transA=0``: ``W = alpha * (B or B^T)``, bias ``beta * C``;
* ``MatMul(A, Transpose(B, perm=[1, 0]))`` with B constant (e.g. a tied lm_head): ``W = B^T``;
* ``Gather(E, ids, axis=0)`` with ``E: [V, D]`` a constant float table (an embedding):
  ``W = E^T: [K = D, N = V]``, so a tied embedding and its lm_head have one ``weight_key``
  (:func:`find_gather_sites`); ``Gather(Transpose(B), ids)`` with ``B: [D, V]`` constant (the
  ONNX Runtime GenAI builder's tied embedding, ``B`` being the lm_head's MatMul weight) is a
  ``"Transpose+Gather"`` site with ``W = B``.

Subgraphs (If/Loop/Scan bodies) are searched too. Nodes that look like sites but
cannot be rewritten are returned as :class:`SkippedNode` with the reason.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.graph.constants import constant_source

__all__ = ["WeightSite", "SkippedNode", "find_weight_sites", "find_gather_sites", "FLOAT_TYPES", "node_display_name",
           "finite_weight", "lm_head_site"]

logger = logging.getLogger(__name__)

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class WeightSite:
    """One rewritable node. ``weight()`` returns float32 ``W: [K, N]``."""

    node: ir.Node
    name: str
    kind: str  # "MatMul" | "Gemm" | "Transpose+MatMul" | "Gather" | "Transpose+Gather"
    activation: ir.Value
    source: ir.Value  # the constant value the weight is read from
    tensor: ir.TensorProtocol  # its data (lazy / memory-mapped for external data)
    transpose: bool
    alpha: float
    bias: ir.Value | None
    beta: float
    k: int
    n: int
    dtype: ir.DataType
    output_rank_gap: int  # leading 1-dims of B that the output keeps (unsqueeze after)
    transpose_node: ir.Node | None = None

    @property
    def is_embedding(self) -> bool:
        """A Gather on a constant table (its ``activation`` is the indices)."""
        return self.kind in ("Gather", "Transpose+Gather")

    @property
    def weight_key(self) -> tuple:
        """Sites with equal keys share one quantized weight."""
        return (id(self.source), self.transpose, self.alpha)

    def bias_vector(self) -> np.ndarray | None:
        """A Gemm's ``beta * C`` as float32 ``[N]``, or None."""
        if self.bias is None:
            return None
        return np.asarray(constant_source(self.bias)[1].numpy(), dtype=np.float32).reshape(-1) * np.float32(self.beta)

    def weight(self) -> np.ndarray:
        """float32 ``[K, N]`` (a fresh array for Gemm alpha / dtype casts; may be a memory-mapped view otherwise)."""
        data = self.tensor.numpy()
        data = data.reshape(data.shape[-2:])
        if self.transpose:
            data = data.T
        if data.dtype != np.float32:
            data = data.astype(np.float32)
        if self.alpha != 1.0:
            data = data * np.float32(self.alpha)
        return data


@dataclass(frozen=True)
class SkippedNode:
    """A MatMul/Gemm left in float, and why."""

    name: str
    op_type: str
    reason: str


def finite_weight(site: WeightSite) -> np.ndarray:
    """``site.weight()`` (float32 ``[K, N]``), refusing NaN/Inf with a one-line error."""
    weight = site.weight()
    if not np.isfinite(weight).all():
        bad = int(np.size(weight) - np.isfinite(weight).sum())
        raise OnnxqError(f"weight {site.source.name!r} of node {site.name!r} has {bad} NaN/Inf values")
    return weight


def node_display_name(node: ir.Node, index: int) -> str:
    """The node's name, or a stable synthetic one for unnamed nodes."""
    return node.name or f"{node.op_type}_{index}"


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _matmul_site(node: ir.Node, name: str) -> WeightSite | str:
    a, b = node.inputs[0], node.inputs[1]
    transpose_node = None
    found = constant_source(b)
    transpose = False
    kind = "MatMul"
    if found is None:
        transpose_node = _transpose_of_constant(b)
        if transpose_node is not None:
            found, transpose, kind = constant_source(transpose_node.inputs[0]), True, "Transpose+MatMul"
    if found is None:
        return "B is not a constant"
    source, tensor = found
    shape = tuple(tensor.shape)
    if len(shape) < 2:
        return f"B has rank {len(shape)}; need [K, N]"
    if any(d != 1 for d in shape[:-2]):
        return f"B has batch dims {shape[:-2]}; only [K, N] or [1.., K, N] is supported"
    rank_a = _rank(a)
    gap = 0
    if len(shape) > 2:
        if rank_a is None:
            return f"B has shape {shape} and A's rank is unknown"
        gap = max(0, len(shape) - rank_a)
    if rank_a is not None and rank_a < 2 and gap == 0:
        return f"A has rank {rank_a}; MatMulNBits needs [.., M, K]"
    k, n = (shape[-1], shape[-2]) if transpose else (shape[-2], shape[-1])
    return WeightSite(node, name, kind, a, source, tensor, transpose, 1.0, None, 1.0, k, n,
                      tensor.dtype, gap, transpose_node)


def _gemm_site(node: ir.Node, name: str) -> WeightSite | str:
    attrs = node.attributes
    if attrs.get("transA") is not None and attrs["transA"].as_int() != 0:
        return "Gemm with transA=1"
    found = constant_source(node.inputs[1])
    if found is None:
        return "B is not a constant"
    source, tensor = found
    shape = tuple(tensor.shape)
    if len(shape) != 2:
        return f"Gemm B has shape {shape}"
    trans_b = attrs.get("transB") is not None and attrs["transB"].as_int() != 0
    alpha = attrs["alpha"].as_float() if attrs.get("alpha") is not None else 1.0
    beta = attrs["beta"].as_float() if attrs.get("beta") is not None else 1.0
    k, n = (shape[1], shape[0]) if trans_b else shape
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        const_bias = constant_source(bias)
        if const_bias is None or const_bias[1].size != n:
            return "Gemm C is not a constant of N elements"
    return WeightSite(node, name, "Gemm", node.inputs[0], source, tensor, trans_b, float(alpha), bias, float(beta),
                      k, n, tensor.dtype, 0)


def find_weight_sites(model: ir.Model) -> tuple[list[WeightSite], list[SkippedNode]]:
    """All rewritable MatMul/Gemm weight sites of ``model`` (subgraphs included), and the skipped ones."""
    sites: list[WeightSite] = []
    skipped: list[SkippedNode] = []
    for index, node in enumerate(model.graph.all_nodes()):
        if node.domain != "" or node.op_type not in ("MatMul", "Gemm"):
            continue
        name = node_display_name(node, index)
        found = _matmul_site(node, name) if node.op_type == "MatMul" else _gemm_site(node, name)
        if isinstance(found, str):
            skipped.append(SkippedNode(name, node.op_type, found))
        elif found.dtype not in FLOAT_TYPES:
            skipped.append(SkippedNode(name, node.op_type, f"weight dtype {found.dtype.name} is not a float type"))
        else:
            sites.append(found)
    return sites, skipped


def find_gather_sites(model: ir.Model) -> tuple[list[WeightSite], list[SkippedNode]]:
    """``Gather(E, ids, axis=0)`` nodes with a constant 2-D float ``E`` (subgraphs included).

    Each is returned as a :class:`WeightSite` of kind ``"Gather"`` with ``W = E^T``
    (``transpose=True``, ``k = D``, ``n = V``, ``activation`` = the indices), so sites
    sharing ``E`` with a tied lm_head have the same ``weight_key``. A table that is
    ``Transpose(B)`` of a constant ``B: [D, V]`` gives a ``"Transpose+Gather"`` site with
    ``W = B`` (``transpose=False``), sharing ``weight_key`` with the lm_head ``MatMul(h, B)``.
    """
    sites: list[WeightSite] = []
    skipped: list[SkippedNode] = []
    for index, node in enumerate(model.graph.all_nodes()):
        if node.op_type != "Gather" or node.domain != "":
            continue
        name = node_display_name(node, index)
        found, kind, transpose_node = constant_source(node.inputs[0]), "Gather", None
        if found is None:
            transpose_node = _transpose_of_constant(node.inputs[0])
            if transpose_node is None:
                continue  # a Gather on activations (shapes, indices...), not an embedding
            found, kind = constant_source(transpose_node.inputs[0]), "Transpose+Gather"
        source, tensor = found
        axis = node.attributes["axis"].as_int() if node.attributes.get("axis") is not None else 0
        if len(tensor.shape) != 2:
            skipped.append(SkippedNode(name, "Gather", f"table has shape {tuple(tensor.shape)}; need [V, D]"))
        elif axis not in (0, -2):
            skipped.append(SkippedNode(name, "Gather", f"gathers along axis {axis}; need 0"))
        elif tensor.dtype not in FLOAT_TYPES:
            continue  # integer lookup tables are not weights
        elif kind == "Gather":
            v, d = tensor.shape
            sites.append(WeightSite(node, name, kind, node.inputs[1], source, tensor, True, 1.0, None, 1.0,
                                    d, v, tensor.dtype, 0))
        else:
            d, v = tensor.shape
            sites.append(WeightSite(node, name, kind, node.inputs[1], source, tensor, False, 1.0, None, 1.0,
                                    d, v, tensor.dtype, 0, transpose_node))
    return sites, skipped


def _transpose_of_constant(value: ir.Value | None) -> ir.Node | None:
    """The ``Transpose(perm=[1, 0])`` node producing ``value`` from a 2-D constant, or None."""
    producer = None if value is None else value.producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain != "":
        return None
    perm = producer.attributes.get("perm")
    inner = constant_source(producer.inputs[0])
    if inner is None or len(inner[1].shape) != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
        return None
    return producer


_MAX_HOPS = 16


def _reaches_graph_output(site: WeightSite, graph: ir.Graph, site_nodes: set[int]) -> bool:
    """Whether the site's output reaches a graph output without passing another weight site (``site_nodes``:
    ids of the weight sites' nodes) within :data:`_MAX_HOPS` nodes: the lm_head, also behind a Cast or a softcap."""
    outputs = {id(v) for v in graph.outputs}
    frontier, seen = [site.node], set()
    for _ in range(_MAX_HOPS):
        following = []
        for node in frontier:
            for value in node.outputs:
                if id(value) in outputs:
                    return True
                for user, _ in value.uses():
                    if id(user) not in seen and id(user) not in site_nodes:
                        seen.add(id(user))
                        following.append(user)
        if not following:
            return False
        frontier = following
    return False


def lm_head_site(sites: Sequence[WeightSite], graph: ir.Graph) -> WeightSite | None:
    """The lm_head among ``sites`` (in graph order): the last one whose output reaches a graph output
    without passing another of them, also behind a Cast or a softcap; None when none does. The last,
    because q/k/v reach a KV-cache model's ``present`` outputs too, through attention."""
    site_nodes = {id(site.node) for site in sites}
    return next((site for site in reversed(sites) if _reaches_graph_output(site, graph, site_nodes)), None)
