"""Partitioning a model's weight sites into transformer blocks for sequential calibration.

GPTQ and AWQ quantize a transformer one block at a time, each block calibrated on
the outputs of the already-quantized blocks before it (arXiv 2210.17323 sec. 4,
arXiv 2306.00978). :func:`find_blocks` recovers those blocks from an ONNX graph.

Heuristic: walk the main graph in topological order and start a new segment at

* every normalization node (``LayerNormalization``, ``SimplifiedLayerNormalization``,
  ``SkipLayerNormalization``, ``SkipSimplifiedLayerNormalization``,
  ``RMSNormalization``, any domain);
* every ``ReduceMean``, and the ``Pow``/``Mul`` feeding one (the first nodes of a
  decomposed LayerNorm ``ReduceMean -> Sub -> Pow -> ReduceMean -> ...`` or RMSNorm
  ``Pow -> ReduceMean -> ...``, as torch exports them);
* the node after every residual ``Add``: an ``Add`` of two non-constant values where
  one input or the output also feeds a normalization (so bias and attention-mask
  ``Add``\\ s do not count).

Extra boundaries inside a norm are harmless: segments without weight sites are
merged into the next segment (trailing ones into the last). Sites sharing one
activation (Q/K/V) always land in the same block: segments a group spans are merged.
A pre-norm decoder layer gives two blocks (attention: q/k/v/o; MLP: up/gate/down)
and the final norm + lm_head a last one. When the graph has no boundary at all,
each group of sites sharing an activation becomes its own block.

Each :class:`Block` also says where to cut the graph to run it alone
(``inputs``: activations computed before the block that depend on some weight
site; values computed from the graph inputs only, like masks and positions, are
recomputed by the probe) and which of its values later blocks need (``outputs``).
"""
from __future__ import annotations

import bisect
import heapq
import logging
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxq.calibration.probe import node_subgraphs
from onnxq.errors import OnnxqError
from onnxq.graph.sites import WeightSite

__all__ = ["Block", "NORM_OPS", "find_blocks"]

logger = logging.getLogger(__name__)

NORM_OPS = frozenset({
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
})


@dataclass
class Block:
    """Consecutive weight sites calibrated together.

    Attributes:
        index: position in the list (topological order).
        sites: the block's weight sites in topological order.
        input_groups: activation value name -> the sites reading it (e.g. one entry
            for q/k/v), in topological order of their first site.
        nodes: the main-graph nodes of the block's segment, topological order.
        inputs: names of the values the block reads that earlier blocks computed and
            that depend on a weight site (the residual stream): feed these (with the
            graph inputs) to run the block alone, e.g. ``ActivationProbe(..., feed_names=inputs)``.
        outputs: names of the values computed here that later blocks' ``inputs`` need.
        start: what opened the block (``"<op> '<node name>'"``, ``"input group '<name>'"``
            or ``"graph start"``).
    """

    index: int
    sites: list[WeightSite]
    input_groups: dict[str, list[WeightSite]]
    nodes: list[ir.Node] = field(repr=False)
    inputs: list[str]
    outputs: list[str]
    start: str


def _topological(graph: ir.Graph) -> list[ir.Node]:
    """The main graph's nodes in graph order if that is topological, else a stable Kahn order."""
    nodes = list(graph)
    index = {id(n): i for i, n in enumerate(nodes)}

    def producers(node: ir.Node) -> list[ir.Node]:
        return [v.producer() for v in node.inputs
                if v is not None and v.producer() is not None and id(v.producer()) in index]

    if all(index[id(p)] < i for i, n in enumerate(nodes) for p in producers(n)):
        return nodes
    pending = {id(n): len({id(p) for p in producers(n)}) for n in nodes}
    users: dict[int, list[ir.Node]] = {}
    for n in nodes:
        for p in {id(p): p for p in producers(n)}.values():
            users.setdefault(id(p), []).append(n)
    ready = [index[id(n)] for n in nodes if pending[id(n)] == 0]
    heapq.heapify(ready)
    order: list[ir.Node] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in users.get(id(node), []):
            pending[id(user)] -= 1
            if pending[id(user)] == 0:
                heapq.heappush(ready, index[id(user)])
    return order if len(order) == len(nodes) else nodes


def _is_constant(value: ir.Value | None) -> bool:
    if value is None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _norm_starts(nodes: list[ir.Node]) -> set[int]:
    """ids of the nodes that open a normalization (fused op, or the first ops of a decomposed one)."""
    starts = set()
    for node in nodes:
        if node.op_type in NORM_OPS:
            starts.add(id(node))
        elif node.op_type == "ReduceMean" and node.domain == "":
            starts.add(id(node))
            source = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
            if source is not None and source.op_type in ("Pow", "Mul") and source.domain == "":
                starts.add(id(source))
    return starts


def _feeds_norm(value: ir.Value, norm_starts: set[int]) -> bool:
    return any(id(user) in norm_starts for user, _ in value.uses())


def _boundaries(nodes: list[ir.Node]) -> dict[int, str]:
    """Segment start position -> description of the node that opens it."""
    norm_starts = _norm_starts(nodes)
    found: dict[int, str] = {}
    for i, node in enumerate(nodes):
        if id(node) in norm_starts:
            found.setdefault(i, f"{node.op_type} {node.name!r}")
        elif node.op_type == "Add" and node.domain == "" and len(node.inputs) == 2 \
                and not any(_is_constant(v) for v in node.inputs):
            if any(_feeds_norm(v, norm_starts) for v in (*node.inputs, node.outputs[0])):
                found.setdefault(i + 1, f"residual Add {node.name!r}")
    return found


def _site_positions(sites: list[WeightSite], nodes: list[ir.Node], graph: ir.Graph) -> list[int]:
    """Position of each site's node, or of the main-graph node whose subgraph holds it."""
    position = {id(n): i for i, n in enumerate(nodes)}
    owner: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for sub in node_subgraphs(node):
            for sub_node in sub.all_nodes():
                owner[id(sub_node)] = i
    result = []
    for site in sites:
        key = id(site.node)
        if key not in position and key not in owner:
            raise OnnxqError(f"weight site {site.name!r} is not a node of this model")
        result.append(position[key] if key in position else owner[key])
    return result


def _site_dependent(nodes: list[ir.Node], site_nodes: set[int]) -> set[int]:
    """ids of the values computed (transitively) from some weight site's output."""
    dependent: set[int] = set()
    for node in nodes:
        uses_site = id(node) in site_nodes or any(v is not None and id(v) in dependent for v in node.inputs)
        if uses_site:
            dependent.update(id(v) for v in node.outputs)
    return dependent


def find_blocks(model: ir.Model, sites: list[WeightSite]) -> list[Block]:
    """Group ``sites`` (from ``find_weight_sites``) into blocks in topological order.

    See the module docstring for the heuristic. Sites inside subgraphs belong to the
    block of the main-graph node (If/Loop/Scan) that holds them.
    """
    if not sites:
        return []
    graph = model.graph
    nodes = _topological(graph)
    site_pos = _site_positions(sites, nodes, graph)
    order = sorted(range(len(sites)), key=lambda j: (site_pos[j], j))
    groups: dict[str, list[int]] = {}
    for j in order:
        groups.setdefault(sites[j].activation.name, []).append(j)

    boundaries = _boundaries(nodes)
    if not boundaries:
        boundaries = {site_pos[js[0]]: f"input group {name!r}" for name, js in groups.items()}
        logger.info("no normalization or residual Add found: one block per activation (%d)", len(groups))
    starts = sorted({0, *boundaries})
    segment_of = [bisect.bisect_right(starts, p) - 1 for p in site_pos]

    # a group spanning several segments merges them (and everything between)
    merged_into = list(range(len(starts)))
    for js in groups.values():
        first, last = min(segment_of[j] for j in js), max(segment_of[j] for j in js)
        for s in range(first + 1, last + 1):
            merged_into[s] = merged_into[first]
    # segments with sites become blocks; site-less segments join the next block (the last, at the end)
    owners = sorted({merged_into[segment_of[j]] for j in order})
    block_of_segment = []
    for s in range(len(starts)):
        root = merged_into[s]
        following = bisect.bisect_left(owners, root)
        block_of_segment.append(min(following, len(owners) - 1))

    ends = starts[1:] + [len(nodes)]
    block_nodes: list[list[ir.Node]] = [[] for _ in owners]
    for s, (lo, hi) in enumerate(zip(starts, ends)):
        block_nodes[block_of_segment[s]].extend(nodes[lo:hi])
    block_sites: list[list[int]] = [[] for _ in owners]
    for j in order:
        block_sites[block_of_segment[segment_of[j]]].append(j)

    node_block = {id(n): b for b, ns in enumerate(block_nodes) for n in ns}
    dependent = _site_dependent(nodes, {id(nodes[p]) for p in site_pos})
    inputs: list[list[str]] = []
    for b, ns in enumerate(block_nodes):
        names: dict[str, None] = {}
        for node in ns:
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and node_block.get(id(producer), b) < b and id(value) in dependent:
                    names[value.name] = None
        inputs.append(list(names))
    produced_in = {v.name: node_block[id(n)] for n in nodes for v in n.outputs}
    outputs: list[list[str]] = [[] for _ in owners]
    for b, names in enumerate(inputs):
        for name in names:
            if name not in outputs[produced_in[name]]:
                outputs[produced_in[name]].append(name)

    blocks = []
    for b, js in enumerate(block_sites):
        input_groups: dict[str, list[WeightSite]] = {}
        for j in js:
            input_groups.setdefault(sites[j].activation.name, []).append(sites[j])
        first_segment = next(s for s in range(len(starts)) if block_of_segment[s] == b)
        start = boundaries.get(starts[first_segment], "graph start")
        blocks.append(Block(b, [sites[j] for j in js], input_groups, block_nodes[b], inputs[b], outputs[b], start))
        logger.debug("block %d (%s): %s", b, start, ", ".join(s.name for s in blocks[-1].sites))
    logger.info("calibration blocks: %d for %d weight sites", len(blocks), len(sites))
    return blocks
